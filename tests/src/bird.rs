//! bird2 daemons for the BGP tests: a node running the shipped `deploy/bgp/bird.conf` and a
//! router peering with the nodes, each in a namespace, stopped (files removed) on drop.
use std::{path::PathBuf, process::Child};

use crate::netns::{Netns, unique};

/// A bird2 daemon in a namespace.
pub struct Bird {
    ns: Netns,
    dir: PathBuf,
    child: Child,
}

/// The router's AS; nodes are AS [`NODE_AS`], as in the shipped config.
pub const ROUTER_AS: u32 = 65000;
pub const NODE_AS: u32 = 65001;

impl Bird {
    /// Starts `bird -f` in `ns` with `config`.
    pub fn start(ns: &Netns, name: &str, config: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("bird.conf"), config)?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "bird", "-f", "-c"])
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("start bird (cargo xtask bootstrap installs bird2): {e}")
            })?;
        Ok(Self { ns: ns.share(), dir, child })
    }

    /// The shipped node config (`deploy/bgp/bird.conf`) for a node at `node` peering with
    /// the router at `router`.
    pub fn node(ns: &Netns, node: &str, router: &str) -> anyhow::Result<Self> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let shipped = std::fs::read_to_string(root.join("deploy/bgp/bird.conf"))?;
        // 192.0.2.11 first: the router's 192.0.2.1 is its prefix.
        let config =
            shipped.replace("192.0.2.11", node).replace("192.0.2.1 ", &format!("{router} "));
        Self::start(ns, "bird-node", &config)
    }

    /// A router at `addr` with one BGP session per node address, exporting what it learns
    /// to its kernel table with ECMP (`merge paths`) when `kernel` is set.
    pub fn router(ns: &Netns, addr: &str, nodes: &[&str], kernel: bool) -> anyhow::Result<Self> {
        let mut config = format!("router id {addr};\nprotocol device {{ scan time 1; }}\n");
        if kernel {
            config.push_str(
                "protocol kernel {\n  merge paths on;\n  ipv4 { import none; export all; };\n}\n",
            );
        }
        for (i, node) in nodes.iter().enumerate() {
            config.push_str(&format!(
                "protocol bgp node{i} {{\n  local {addr} as {ROUTER_AS};\n  neighbor {node} as {NODE_AS};\n  hold time 3;\n  ipv4 {{ import all; export none; }};\n}}\n"
            ));
        }
        Self::start(ns, "bird-router", &config)
    }

    /// `birdc show route for ADDR all` (empty while bird is starting).
    pub fn route(&self, addr: &str) -> String {
        self.birdc(&["show", "route", "for", addr, "all"])
    }

    /// What `birdc ARGS` prints.
    pub fn birdc(&self, cmd: &[&str]) -> String {
        let sock = self.dir.join("bird.ctl").display().to_string();
        let mut args = vec!["birdc", "-s", &sock];
        args.extend(cmd);
        // birdc exits 1 for "Network not found": the text is the answer either way.
        let out = self.ns.exec_output(&args).map(|o| o.stdout).unwrap_or_default();
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
