//! The image (`deploy/Containerfile`) run with podman as the DaemonSet runs it: the security
//! context, capabilities and mounts read from `deploy/kubernetes/daemonset.yaml`, the config
//! and node set-up from `configmap.yaml`, host network inside a namespace of the test's own.
//! XDP attaches natively, the L7 listener on port 80 answers with a backend's reply, the probes
//! pass, and `lb detach` in the same context removes every pin and the program.
//!
//! The network is [`lb_tests::container::Node`]'s, with the ConfigMap's backends. Skipped, saying so, without
//! root or a podman that runs containers (a failure instead under `LB_REQUIRE_PRIVILEGED=1`,
//! where the bootstrap has installed it). `LB_IMAGE_CAPS=BPF,NET_ADMIN,...` replaces the
//! DaemonSet's capability list and `LB_IMAGE_SECCOMP=unconfined` (or a profile's path) the
//! runtime's default seccomp profile: how the minimal list was found (README, "Kubernetes").
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;
use lb_tests::{
    admin::Admin,
    client::http_get,
    container::{
        Node, base_image, block, cap_mask, podman, release_binary, runtime_or_skip, say,
        status_field, workspace,
    },
};

/// Where lb's directory of the host's bpffs appears in the container (daemonset.yaml).
const BPFFS_IN_CONTAINER: &str = "/sys/fs/bpf";
/// The ConfigMap's `[xdp] pin_path`, inside the container.
const PIN_IN_CONTAINER: &str = "/sys/fs/bpf/lb";
const ADMIN_SOCKET: &str = "unix:/run/lb/admin.sock";
const VIP: &str = "203.0.113.10";

/// The lb container's `capabilities.add` list in the DaemonSet (the init container has none):
/// the `- NAME` items after `add:`, comments between them skipped.
fn daemonset_caps(yaml: &str) -> Vec<String> {
    yaml.lines()
        .skip_while(|l| l.trim() != "add:")
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map_while(|l| l.strip_prefix("- "))
        .map(|item| item.split('#').next().unwrap_or("").trim().to_string())
        .collect()
}

/// Removes what the test made, also when it fails: the container(s), the image, the
/// directories, the pins (links first, which detaches XDP).
struct Cleanup {
    containers: Vec<String>,
    image: String,
    dirs: Vec<PathBuf>,
    pins: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("podman").args(["rm", "-f", "-t", "0", c]).output();
        }
        let _ = Command::new("podman").args(["rmi", "-f", &self.image]).output();
        let _ = lb_user::dataplane::detach(&self.pins.join("lb"));
        let _ = std::fs::remove_dir(&self.pins);
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The podman flags that give a container the lb container's context in daemonset.yaml.
fn lb_context(node: &Node, caps: &[String], c: &Cleanup, config: &Path, run: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--network",
        &node.network(),
        // securityContext: drop ALL, add each listed one; not privileged (podman's default).
        "--cap-drop=all",
    ]
    .map(String::from)
    .to_vec();
    args.extend(caps.iter().map(|cap| format!("--cap-add=CAP_{cap}")));
    if let Ok(profile) = std::env::var("LB_IMAGE_SECCOMP") {
        args.push(format!("--security-opt=seccomp={profile}"));
    }
    args.extend(
        [
            // allowPrivilegeEscalation: false.
            "--security-opt=no-new-privileges",
            // seccompProfile: RuntimeDefault is the runtime's default profile: no flag.
            // readOnlyRootFilesystem: true, and without the tmpfs podman would add on /tmp and
            // /run (Kubernetes adds none).
            "--read-only",
            "--read-only-tmpfs=false",
            "--user=0",
            "-e",
            "RUST_LOG=info",
            "-v",
            &format!("{}:/etc/lb:ro", config.display()),
            "-v",
            &format!("{}:{BPFFS_IN_CONTAINER}", c.pins.display()),
            "-v",
            &format!("{}:/run/lb", run.display()),
        ]
        .map(String::from),
    );
    args
}

/// Waits (at most 30 s) until the readiness probe of the DaemonSet passes in `name`; fails
/// with the container's log if it exits first.
fn wait_ready(name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = Command::new("podman")
            .args(["exec", name, "lb", "probe", "ready", "--admin", ADMIN_SOCKET])
            .output()?;
        if probe.status.success() {
            return Ok(());
        }
        let running = podman(&["inspect", "-f", "{{.State.Running}}", name]).unwrap_or_default();
        if running.trim() != "true" || Instant::now() > deadline {
            let log = podman(&["logs", name]).unwrap_or_default();
            let err = Command::new("podman").args(["logs", name]).output().map(|o| o.stderr);
            let err = String::from_utf8_lossy(&err.unwrap_or_default()).into_owned();
            bail!("lb in the container is not ready (running: {}): {log}{err}", running.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The memory cgroup (v1 here) usage of `pid`'s container, in bytes: (now, peak, kernel part).
/// BPF maps are charged to the cgroup that creates them, so this is what a limit must fit.
fn cgroup_memory(pid: &str) -> Option<(u64, u64, u64)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path =
        cgroups.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))?;
    let read = |file: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory{path}/{file}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some((
        read("memory.usage_in_bytes")?,
        read("memory.max_usage_in_bytes")?,
        read("memory.kmem.usage_in_bytes").unwrap_or(0),
    ))
}

#[test]
fn image_runs_with_the_daemonsets_security_context() {
    lb_tests::privileged!();
    if !runtime_or_skip() {
        return;
    }
    let root = workspace();
    // The image packs it (podman build with the workspace as context).
    release_binary();
    let daemonset = std::fs::read_to_string(root.join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let configmap = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    // The podman flags below stand for these lines; the test must change with them.
    for line in [
        "privileged: false",
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
        "type: RuntimeDefault",
        "drop: [\"ALL\"]",
        "mountPath: /sys/fs/bpf\n",
        "path: /sys/fs/bpf/lb\n",
        "mountPath: /run/lb",
        "hostNetwork: true",
    ] {
        assert!(daemonset.contains(line), "daemonset.yaml no longer says {line:?}");
    }
    let mut caps = daemonset_caps(&daemonset);
    assert!(caps.contains(&"NET_BIND_SERVICE".to_string()), "capabilities.add: {caps:?}");
    if let Ok(list) = std::env::var("LB_IMAGE_CAPS") {
        caps = list.split(',').filter(|c| !c.is_empty()).map(String::from).collect();
        say(&format!("k8s_image: LB_IMAGE_CAPS replaces the DaemonSet's capabilities: {caps:?}"));
    }
    let lb_toml = block(&configmap, "lb.toml").unwrap();
    let setup = block(&configmap, "node-setup.sh").unwrap();
    assert!(lb_toml.contains(&format!("pin_path = \"{PIN_IN_CONTAINER}\"")), "{lb_toml}");

    // Made before `cleanup`, so they are dropped after it: the containers go before their
    // namespace.
    let net = Node::new().expect("node namespaces and backends");
    let (node, client) = (&net.node, &net.client);

    base_image().expect("base image");
    let image = format!("localhost/lb:{}", lb_tests::netns::unique("img"));
    let mut cleanup = Cleanup {
        containers: Vec::new(),
        image: image.clone(),
        dirs: Vec::new(),
        // "The host's bpffs" is the tests' own (a bpffs outside /sys, see lb::pin_path), so
        // runs never meet; its lb directory is what the DaemonSet's hostPath names.
        pins: PathBuf::from(lb_tests::lb::pin_path()),
    };
    std::fs::create_dir_all(&cleanup.pins).unwrap();
    // The README's command line, with a tag of this run's own.
    let out = Command::new("podman")
        .args(["build", "-f", "deploy/Containerfile", "-t", &image, "."])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "podman build: {}", String::from_utf8_lossy(&out.stderr));

    // The ConfigMap volume (both files) and the pod's emptyDir for /run/lb.
    let config = std::env::temp_dir().join(lb_tests::netns::unique("cm"));
    let run = std::env::temp_dir().join(lb_tests::netns::unique("run"));
    cleanup.dirs.extend([config.clone(), run.clone()]);
    std::fs::create_dir_all(&config).unwrap();
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(config.join("lb.toml"), &lb_toml).unwrap();
    std::fs::write(config.join("node-setup.sh"), &setup).unwrap();

    // Without the node set-up lb refuses to start, naming the setting and the fix: its
    // /proc/sys is read-only. tcp_migrate_req is checked first (before XDP), forwarding next.
    let refused = |c: &Cleanup| {
        let mut args: Vec<String> = ["run", "--rm"].map(String::from).to_vec();
        args.extend(lb_context(&net, &caps, c, &config, &run));
        args.extend([&image, "run", "--config", "/etc/lb/lb.toml"].map(String::from));
        let out = Command::new("podman").args(&args).output().unwrap();
        assert!(!out.status.success(), "lb ran without the node set-up");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(&cleanup);
    assert!(
        e.contains("cannot set net.ipv4.tcp_migrate_req = 1")
            && e.contains("sysctl -w net.ipv4.tcp_migrate_req=1"),
        "{e}"
    );
    node.sysctl("net.ipv4.tcp_migrate_req", "1").unwrap();
    let e = refused(&cleanup);
    assert!(
        e.contains("cannot set net.ipv4.conf.eth0.forwarding = 1")
            && e.contains("sysctl -w net.ipv4.conf.eth0.forwarding=1"),
        "{e}"
    );
    node.sysctl("net.ipv4.tcp_migrate_req", "0").unwrap();

    // The init container: privileged, the image's sh running the ConfigMap's node-setup.sh.
    let network = net.network();
    let cfg_mount = format!("{}:/etc/lb:ro", config.display());
    let setup_out = podman(&[
        "run",
        "--rm",
        "--privileged",
        "--network",
        &network,
        "-v",
        &cfg_mount,
        "--entrypoint",
        "sh",
        &image,
        "/etc/lb/node-setup.sh",
    ])
    .expect("init container");
    say(&format!("k8s_image: init container: {}", setup_out.trim().replace('\n', "; ")));
    assert_eq!(node.sysctl_value("net.ipv4.conf.eth0.forwarding").unwrap(), "1");
    assert_eq!(node.sysctl_value("net.ipv4.tcp_migrate_req").unwrap(), "1");

    // lb, as the DaemonSet's container.
    let name = lb_tests::netns::unique("lb");
    cleanup.containers.push(name.clone());
    let mut args: Vec<String> = ["run", "-d", "--name", &name].map(String::from).to_vec();
    args.extend(lb_context(&net, &caps, &cleanup, &config, &run));
    args.extend([&image, "run", "--config", "/etc/lb/lb.toml"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&argv).expect("podman run lb");
    wait_ready(&name).expect("ready");

    // The context took: these capabilities only, no new privileges, a seccomp filter.
    let pid = podman(&["inspect", "-f", "{{.State.Pid}}", &name]).unwrap().trim().to_string();
    let want = cap_mask(&caps);
    let eff = u64::from_str_radix(&status_field(&pid, "CapEff"), 16).unwrap();
    assert_eq!(eff, want, "CapEff {eff:x}, want {want:x} ({caps:?})");
    assert_eq!(status_field(&pid, "NoNewPrivs"), "1");
    match std::env::var("LB_IMAGE_SECCOMP") {
        Ok(profile) => {
            say(&format!("k8s_image: LB_IMAGE_SECCOMP replaces the default profile: {profile}"))
        }
        Err(_) => assert_eq!(status_field(&pid, "Seccomp"), "2", "no seccomp filter"),
    }

    // XDP in native mode on the node's eth0.
    let link = node.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("prog/xdp") && !link.contains("xdpgeneric"), "{link}");
    let status =
        podman(&["exec", &name, "lb", "status", "--json", "--admin", ADMIN_SOCKET]).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["xdp"][0]["mode"], "native", "{status}");
    assert_eq!(status["xdp"][0]["interface"], "eth0", "{status}");

    // The L7 listener on port 80 answers a client with a backend's reply, both backends.
    let l7: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        let body = http_get(client, None, l7, Duration::from_secs(3)).expect("GET through lb");
        assert!(body == "backend-1" || body == "backend-2", "{body}");
        seen.insert(body);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let admin = Admin::new(node, "127.0.0.1:9901".parse().unwrap());
    assert_eq!(admin.request("GET", "/ready").unwrap().0, 200);
    assert_eq!(admin.request("GET", "/live").unwrap().0, 200);
    let live = Command::new("podman")
        .args(["exec", &name, "lb", "probe", "live", "--admin", ADMIN_SOCKET])
        .status()
        .unwrap();
    assert!(live.success(), "liveness probe");

    // What the resources in daemonset.yaml are taken from.
    let memory = cgroup_memory(&pid);
    say(&format!(
        "k8s_image: lb after 200 requests: VmRSS {} (peak VmHWM {}); container memory cgroup (now, peak, kernel incl. BPF maps) in MiB: {:?}",
        status_field(&pid, "VmRSS"),
        status_field(&pid, "VmHWM"),
        memory.map(|(a, b, k)| (a >> 20, b >> 20, k >> 20)),
    ));

    // The DaemonSet's memory limit (1Gi) must hold the peak, BPF maps included.
    assert!(daemonset.contains("limits:\n              memory: 1Gi"), "the limit changed");
    if let Some((_, peak, _)) = memory {
        assert!(peak < 1 << 30, "peak {peak} bytes does not fit the DaemonSet's 1Gi limit");
    }

    // SIGTERM (podman stop, as the kubelet stops a pod): lb drains and exits 0; the pinned
    // program stays attached.
    podman(&["stop", "-t", "20", &name]).unwrap();
    let code = podman(&["inspect", "-f", "{{.State.ExitCode}}", &name]).unwrap();
    assert_eq!(code.trim(), "0", "{}", podman(&["logs", &name]).unwrap_or_default());
    assert!(node.ip(&["-d", "link", "show", "eth0"]).unwrap().contains("prog/xdp"));
    assert!(cleanup.pins.join("lb").exists());

    // `lb detach` in the same context and mounts (`kubectl debug` or a Job would run it so).
    let detach = lb_tests::netns::unique("detach");
    cleanup.containers.push(detach.clone());
    let mut args: Vec<String> = ["run", "--rm", "--name", &detach].map(String::from).to_vec();
    args.extend(lb_context(&net, &caps, &cleanup, &config, &run));
    args.extend([&image, "detach", "--config", "/etc/lb/lb.toml"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = podman(&argv).expect("lb detach");
    assert!(out.contains("XDP detached"), "{out}");
    let link = node.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(!link.contains("prog/xdp"), "{link}");
    let left: Vec<_> = std::fs::read_dir(&cleanup.pins).unwrap().collect();
    assert!(left.is_empty(), "pins left: {left:?}");
    let lo = node.ip(&["addr", "show", "dev", "lo"]).unwrap();
    assert!(!lo.contains(VIP), "the VIP stayed on lo: {lo}");
}
