//! lb in containers (podman, as the bootstrap sets it up): the local Debian base image, the
//! ConfigMap's pieces, and the "node" the deployment tests run it on:
//!
//! ```text
//!  client ns                 node ns (lb's container)              backend ns
//!  eth0 10.0.0.2/16  <->  eth0 10.0.0.1/16 (XDP)
//!                         b0   10.1.0.1/24         <->   eth0 10.1.0.2/24, 10.1.0.3/24
//! ```
//! with the ConfigMap's backends (10.1.0.2:80, 10.1.0.3:80) answering with their names.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{backends::HttpBackend, netns::Netns};

/// The base image the Containerfile builds on (its `BASE` default), made with debootstrap
/// once and kept: it takes about two minutes from Debian's mirror.
pub const BASE: &str = "localhost/lb-base";

/// The workspace root (deploy/, target/).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The release binary the images pack; fails with the command that builds it.
pub fn release_binary() -> PathBuf {
    let binary = workspace().join("target/release/lb");
    assert!(
        binary.is_file(),
        "{} is missing: the images pack the release binary; run `cargo build --release -p lb-user` first",
        binary.display()
    );
    binary
}

/// Written to stderr directly: libtest captures `eprintln!`, and what the test measured (and
/// a skip) must be seen when it passes.
pub fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs podman with `args`: stdout, or an error with stderr.
pub fn podman(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("podman").args(args).output().context("spawn podman")?;
    if !out.status.success() {
        bail!("podman {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when podman can run a container here; otherwise says why and skips (or fails under
/// `LB_REQUIRE_PRIVILEGED=1`).
pub fn runtime_or_skip() -> bool {
    let Err(e) = podman(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]) else { return true };
    let why = format!(
        "no container runtime can run here ({e:#}); `cargo xtask bootstrap` installs podman and runc"
    );
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{why}");
    }
    say(&format!("SKIPPED {}: {why}", crate::test_name()));
    false
}

/// The literal block `key: |` of a ConfigMap's `data`, dedented.
pub fn block(yaml: &str, key: &str) -> anyhow::Result<String> {
    let head = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| *l != head);
    lines.next().with_context(|| format!("no {key} in the ConfigMap"))?;
    let body: Vec<&str> = lines.take_while(|l| l.is_empty() || l.starts_with("    ")).collect();
    let text: String = body.iter().map(|l| format!("{}\n", l.get(4..).unwrap_or(""))).collect();
    Ok(text.trim_end().to_string() + "\n")
}

/// Capability numbers (linux/capability.h) of the names lb might need.
pub fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "IPC_LOCK" => 14,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} is not in the test's table"),
    }
}

/// The effective-capability mask of `names` (as /proc/PID/status shows CapEff, parsed).
pub fn cap_mask<S: AsRef<str>>(names: &[S]) -> u64 {
    names.iter().map(|c| 1u64 << cap_bit(c.as_ref())).sum()
}

/// Makes the base image unless it exists: Debian's minbase with iproute2 (lb runs `ip`).
pub fn base_image() -> anyhow::Result<()> {
    if Command::new("podman").args(["image", "exists", BASE]).status()?.success() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(crate::netns::unique("rootfs"));
    say(&format!("building {BASE} with debootstrap (about 2 minutes, once)"));
    let made = (|| {
        let dir_s = dir.to_str().context("path")?;
        crate::netns::run(&[
            "timeout",
            "900",
            "debootstrap",
            "--variant=minbase",
            "--include=iproute2,ca-certificates",
            "bookworm",
            dir_s,
            "http://deb.debian.org/debian",
        ])?;
        // The package cache is half the tree and no use in an image.
        crate::netns::run(&[
            "sh",
            "-c",
            &format!("rm -rf {dir_s}/var/cache/apt/archives/*.deb {dir_s}/var/lib/apt/lists/*"),
        ])?;
        crate::netns::run(&["sh", "-c", &format!("tar -C {dir_s} -c . | podman import - {BASE}")])
    })();
    let _ = std::fs::remove_dir_all(&dir);
    made.map(drop)
}

/// `key:` of /proc/PID/status.
pub fn status_field(pid: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_default();
    line[line.find(':').map_or(0, |i| i + 1)..].trim().to_string()
}

/// The node, its client and its backends; everything goes on drop.
pub struct Node {
    pub node: Netns,
    pub client: Netns,
    pub backend: Netns,
    _backends: Vec<HttpBackend>,
}

impl Node {
    /// Builds the namespaces and starts `backend-1` on 10.1.0.2:80 and `backend-2` on
    /// 10.1.0.3:80.
    pub fn new() -> anyhow::Result<Self> {
        let node = Netns::new("node")?;
        let client = Netns::new("c")?;
        let backend = Netns::new("b")?;
        let veth = |a: &Netns, an: &str, b: &Netns, bn: &str| -> anyhow::Result<()> {
            a.ip(&["link", "add", an, "type", "veth", "peer", "name", bn, "netns", &b.name])?;
            a.ip(&["link", "set", an, "up"])?;
            b.ip(&["link", "set", bn, "up"]).map(drop)
        };
        veth(&node, "eth0", &client, "eth0")?;
        veth(&node, "b0", &backend, "eth0")?;
        node.ip(&["addr", "add", "10.0.0.1/16", "dev", "eth0"])?;
        node.ip(&["addr", "add", "10.1.0.1/24", "dev", "b0"])?;
        client.ip(&["addr", "add", "10.0.0.2/16", "dev", "eth0"])?;
        client.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        backend.ip(&["addr", "add", "10.1.0.2/24", "dev", "eth0"])?;
        backend.ip(&["addr", "add", "10.1.0.3/24", "dev", "eth0"])?;
        backend.ip(&["route", "add", "default", "via", "10.1.0.1"])?;
        let b1 = HttpBackend::start(&backend, "10.1.0.2:80".parse()?, "backend-1")?;
        let b2 = HttpBackend::start(&backend, "10.1.0.3:80".parse()?, "backend-2")?;
        Ok(Self { node, client, backend, _backends: vec![b1, b2] })
    }

    /// podman's `--network` value that puts a container in the node's namespace.
    pub fn network(&self) -> String {
        format!("ns:/run/netns/{}", self.node.name)
    }
}
