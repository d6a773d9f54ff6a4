//! `deploy/systemd/lb.service` as it ships, run by systemd: the development machines do not
//! run systemd as PID 1, so it runs as PID 1 of a privileged podman container (standing for a
//! host) in the network namespace of a [`Node`], on an image of the local base with systemd
//! added. The unit's sandbox (capabilities, `NoNewPrivileges`, `ProtectSystem=strict`,
//! `SystemCallFilter`, `RestrictAddressFamilies`, ...) must let lb attach XDP natively, set its
//! sysctls, serve L7 on port 80, reload and stop cleanly; `lb detach` afterwards must find the
//! record the unit's preserved `/run/lb` keeps and undo every change. Skipped like
//! `k8s_image.rs` without root or podman.
use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::bail;
use lb_tests::{
    admin::Admin,
    client::http_get,
    container::{
        Node, base_image, block, cap_mask, podman, release_binary, runtime_or_skip, say, workspace,
    },
    poll_until,
};

/// The base image with systemd (and procps: the unit's ExecReload is `/bin/kill`), kept.
const IMAGE: &str = "localhost/lb-systemd";
/// How often the checks (each a `podman exec`) poll.
const EVERY: Duration = Duration::from_millis(200);

fn systemd_image() -> anyhow::Result<()> {
    if Command::new("podman").args(["image", "exists", IMAGE]).status()?.success() {
        return Ok(());
    }
    base_image()?;
    let dir = std::env::temp_dir().join(lb_tests::netns::unique("sdimg"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("Containerfile"),
        format!(
            "FROM {}\nRUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd systemd-sysv procps && rm -rf /var/lib/apt/lists/*\n",
            lb_tests::container::BASE
        ),
    )?;
    say(&format!("building {IMAGE} (systemd from Debian's mirror, once)"));
    // The build's RUN needs the mirror: the host's network, as debootstrap had.
    let dir_s = dir.display().to_string();
    let built = podman(&["build", "--network", "host", "-t", IMAGE, &dir_s]);
    let _ = std::fs::remove_dir_all(&dir);
    built.map(drop)
}

/// Removes the container (its bpffs, mounted inside, goes with it) and the config file.
struct Cleanup {
    name: String,
    config: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "-f", "-t", "0", &self.name]).output();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// `sh -c SCRIPT` in the container: stdout, or an error with both outputs.
fn exec(name: &str, script: &str) -> anyhow::Result<String> {
    let out = Command::new("podman").args(["exec", name, "sh", "-c", script]).output()?;
    if !out.status.success() {
        bail!(
            "{script:?} in {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn the_hardened_unit_runs_lb_under_systemd() {
    lb_tests::privileged!();
    if !runtime_or_skip() {
        return;
    }
    let root = workspace();
    let binary = release_binary();
    systemd_image().expect("systemd image");
    let net = Node::new().expect("node namespaces and backends");
    let configmap = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let name = lb_tests::netns::unique("sd");
    let cleanup = Cleanup {
        name: name.clone(),
        config: std::env::temp_dir().join(lb_tests::netns::unique("lb.toml")),
    };
    std::fs::write(&cleanup.config, block(&configmap, "lb.toml").unwrap()).unwrap();

    let unit = root.join("deploy/systemd/lb.service");
    let mounts = [
        format!("{}:/usr/local/bin/lb:ro", binary.display()),
        format!("{}:/etc/systemd/system/lb.service:ro", unit.display()),
        format!("{}:/etc/lb/lb.toml:ro", cleanup.config.display()),
    ];
    let network = net.network();
    let mut args = vec!["run", "-d", "--name", &name, "--privileged", "--systemd=always"];
    args.extend(["--network", &network]);
    for m in &mounts {
        args.extend(["-v", m]);
    }
    args.extend([IMAGE, "/sbin/init"]);
    podman(&args).expect("start systemd");
    let booted = poll_until(Duration::from_secs(30), EVERY, || {
        exec(&name, "systemctl is-system-running").is_ok_and(|s| s == "running" || s == "degraded")
    });
    assert!(booted, "systemd did not come up: {}", podman(&["logs", &name]).unwrap_or_default());
    // The node prerequisite the unit states: bpffs mounted before lb starts.
    exec(&name, "mount -t bpf bpf /sys/fs/bpf").unwrap();
    let started = exec(&name, "timeout 60 systemctl start lb");
    let journal = || exec(&name, "journalctl -u lb --no-pager").unwrap_or_default();
    assert!(started.is_ok(), "{started:?}: {}", journal());

    // The sandbox took: the unit's four capabilities, no new privileges, a seccomp filter.
    let pid = exec(&name, "systemctl show -p MainPID --value lb").unwrap();
    let status = exec(&name, &format!("cat /proc/{pid}/status")).unwrap();
    let field = |key: &str| {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_default();
        line[line.find(':').map_or(0, |i| i + 1)..].trim().to_string()
    };
    let want = cap_mask(&["BPF", "PERFMON", "NET_ADMIN", "NET_BIND_SERVICE"]);
    assert_eq!(u64::from_str_radix(&field("CapEff"), 16).unwrap(), want, "{status}");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");

    // XDP native on the node's eth0, the sysctls lb set itself, L7 on port 80, /ready.
    let link = net.node.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("prog/xdp") && !link.contains("xdpgeneric"), "{link}");
    assert_eq!(net.node.sysctl_value("net.ipv4.conf.eth0.forwarding").unwrap(), "1");
    let l7: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let ok = poll_until(Duration::from_secs(5), EVERY, || {
        http_get(&net.client, None, l7, Duration::from_secs(2))
            .is_ok_and(|b| b == "backend-1" || b == "backend-2")
    });
    assert!(ok, "no backend reply through the L7 listener: {}", journal());
    let admin = Admin::new(&net.node, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(admin.request("GET", "/ready").unwrap().0, 200);

    // `systemctl reload` (ExecReload, SIGHUP), then a stop: lb exits 0.
    exec(&name, "timeout 30 systemctl reload lb").unwrap();
    assert!(
        poll_until(Duration::from_secs(5), EVERY, || journal().contains("SIGHUP: config reloaded"))
    );
    exec(&name, "timeout 60 systemctl stop lb").unwrap();
    let result = exec(&name, "systemctl show -p Result --value lb").unwrap();
    assert_eq!(result, "success", "{}", journal());
    say(&format!(
        "systemd_unit: systemd-analyze security: {}",
        exec(&name, "systemd-analyze security lb 2>&1 | tail -1").unwrap_or_default()
    ));

    // The pinned program outlives the unit; `lb detach` finds the record in the preserved
    // /run/lb and undoes everything.
    assert!(net.node.ip(&["-d", "link", "show", "eth0"]).unwrap().contains("prog/xdp"));
    let out = exec(&name, "lb detach --config /etc/lb/lb.toml").unwrap();
    assert!(out.contains("XDP detached") && out.contains("undid sysctl"), "{out}");
    assert!(!net.node.ip(&["-d", "link", "show", "eth0"]).unwrap().contains("prog/xdp"));
    assert_eq!(net.node.sysctl_value("net.ipv4.conf.eth0.forwarding").unwrap(), "0");
    let lo = net.node.ip(&["addr", "show", "dev", "lo"]).unwrap();
    assert!(!lo.contains("203.0.113.10"), "{lo}");
}
