//! The image (`deploy/Containerfile`) run with podman as the DaemonSet runs it: the security
//! context, capabilities and mounts read from `deploy/kubernetes/daemonset.yaml`, the config
//! and node set-up from `configmap.yaml`, host network inside a namespace of the test's own.
//! XDP attaches natively, the L7 listener on port 80 answers with a backend's reply, the probes
//! pass, and `lb detach` in the same context removes every pin and the program.
//!
//! ```text
//!  client ns                 node ns (lb's container)              backend ns
//!  eth0 10.0.0.2/16  <->  eth0 10.0.0.1/16 (XDP)
//!                         b0   10.1.0.1/24         <->   eth0 10.1.0.2/24, 10.1.0.3/24
//! ```
//! The backends are the ConfigMap's (10.1.0.2:80, 10.1.0.3:80). Skipped, saying so, without
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

use anyhow::{Context as _, bail};
use lb_tests::{admin::Admin, backends::HttpBackend, client::http_get, netns::Netns};

/// The base image the Containerfile builds on (its `BASE` default), made with debootstrap
/// once and kept: it takes about two minutes from Debian's mirror.
const BASE: &str = "localhost/lb-base";
/// Where lb's directory of the host's bpffs appears in the container (daemonset.yaml).
const BPFFS_IN_CONTAINER: &str = "/sys/fs/bpf";
/// The ConfigMap's `[xdp] pin_path`, inside the container.
const PIN_IN_CONTAINER: &str = "/sys/fs/bpf/lb";
const ADMIN_SOCKET: &str = "unix:/run/lb/admin.sock";
const VIP: &str = "203.0.113.10";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Written to stderr directly: libtest captures `eprintln!`, and what the test measured (and
/// a skip) must be seen when it passes.
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs podman with `args`: stdout, or an error with stderr.
fn podman(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("podman").args(args).output().context("spawn podman")?;
    if !out.status.success() {
        bail!("podman {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when podman can run a container here; otherwise says why and skips (or fails under
/// `LB_REQUIRE_PRIVILEGED=1`).
fn runtime_or_skip() -> bool {
    let Err(e) = podman(&["info", "--format", "{{.Host.OCIRuntime.Name}}"]) else { return true };
    let why = format!(
        "no container runtime can run here ({e:#}); `cargo xtask bootstrap` installs podman and runc"
    );
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{why}");
    }
    say(&format!("SKIPPED {}: {why}", lb_tests::test_name()));
    false
}

/// The literal block `key: |` of a ConfigMap's `data`, dedented.
fn block(yaml: &str, key: &str) -> anyhow::Result<String> {
    let head = format!("  {key}: |");
    let mut lines = yaml.lines().skip_while(|l| *l != head);
    lines.next().with_context(|| format!("no {key} in the ConfigMap"))?;
    let body: Vec<&str> = lines.take_while(|l| l.is_empty() || l.starts_with("    ")).collect();
    let text: String = body.iter().map(|l| format!("{}\n", l.get(4..).unwrap_or(""))).collect();
    Ok(text.trim_end().to_string() + "\n")
}

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

/// Capability numbers (linux/capability.h) of the names lb might need.
fn cap_bit(name: &str) -> u32 {
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

/// Makes the base image unless it exists: Debian's minbase with iproute2 (lb runs `ip`).
fn base_image() -> anyhow::Result<()> {
    if Command::new("podman").args(["image", "exists", BASE]).status()?.success() {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(lb_tests::netns::unique("rootfs"));
    say(&format!("k8s_image: building {BASE} with debootstrap (about 2 minutes, once)"));
    let made = (|| {
        let dir_s = dir.to_str().context("path")?;
        lb_tests::netns::run(&[
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
        lb_tests::netns::run(&[
            "sh",
            "-c",
            &format!("rm -rf {dir_s}/var/cache/apt/archives/*.deb {dir_s}/var/lib/apt/lists/*"),
        ])?;
        lb_tests::netns::run(&[
            "sh",
            "-c",
            &format!("tar -C {dir_s} -c . | podman import - {BASE}"),
        ])
    })();
    let _ = std::fs::remove_dir_all(&dir);
    made.map(drop)
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
fn lb_context(
    node: &Netns,
    caps: &[String],
    c: &Cleanup,
    config: &Path,
    run: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "--network",
        &format!("ns:/run/netns/{}", node.name),
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

/// `key:` of /proc/PID/status.
fn status_field(pid: &str, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = text.lines().find(|l| l.starts_with(key)).unwrap_or_default();
    line[line.find(':').map_or(0, |i| i + 1)..].trim().to_string()
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
    let binary = root.join("target/release/lb");
    assert!(
        binary.is_file(),
        "{} is missing: the image is built from the release binary; run `cargo build --release -p lb-user` first",
        binary.display()
    );
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

    // The node: eth0 toward the client, b0 toward the ConfigMap's backends. Made before
    // `cleanup`, so they are dropped after it: the containers go before their namespace.
    let node = Netns::new("node").unwrap();
    let client = Netns::new("c").unwrap();
    let backend = Netns::new("b").unwrap();
    let veth = |a: &Netns, an: &str, b: &Netns, bn: &str| {
        a.ip(&["link", "add", an, "type", "veth", "peer", "name", bn, "netns", &b.name]).unwrap();
        a.ip(&["link", "set", an, "up"]).unwrap();
        b.ip(&["link", "set", bn, "up"]).unwrap();
    };
    veth(&node, "eth0", &client, "eth0");
    veth(&node, "b0", &backend, "eth0");
    node.ip(&["addr", "add", "10.0.0.1/16", "dev", "eth0"]).unwrap();
    node.ip(&["addr", "add", "10.1.0.1/24", "dev", "b0"]).unwrap();
    client.ip(&["addr", "add", "10.0.0.2/16", "dev", "eth0"]).unwrap();
    client.ip(&["route", "add", "default", "via", "10.0.0.1"]).unwrap();
    backend.ip(&["addr", "add", "10.1.0.2/24", "dev", "eth0"]).unwrap();
    backend.ip(&["addr", "add", "10.1.0.3/24", "dev", "eth0"]).unwrap();
    backend.ip(&["route", "add", "default", "via", "10.1.0.1"]).unwrap();
    let _b1 = HttpBackend::start(&backend, "10.1.0.2:80".parse().unwrap(), "backend-1").unwrap();
    let _b2 = HttpBackend::start(&backend, "10.1.0.3:80".parse().unwrap(), "backend-2").unwrap();

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
        args.extend(lb_context(&node, &caps, c, &config, &run));
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
    let net = format!("ns:/run/netns/{}", node.name);
    let cfg_mount = format!("{}:/etc/lb:ro", config.display());
    let setup_out = podman(&[
        "run",
        "--rm",
        "--privileged",
        "--network",
        &net,
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
    args.extend(lb_context(&node, &caps, &cleanup, &config, &run));
    args.extend([&image, "run", "--config", "/etc/lb/lb.toml"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    podman(&argv).expect("podman run lb");
    wait_ready(&name).expect("ready");

    // The context took: these capabilities only, no new privileges, a seccomp filter.
    let pid = podman(&["inspect", "-f", "{{.State.Pid}}", &name]).unwrap().trim().to_string();
    let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
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
        let body = http_get(&client, None, l7, Duration::from_secs(3)).expect("GET through lb");
        assert!(body == "backend-1" || body == "backend-2", "{body}");
        seen.insert(body);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let admin = Admin::new(&node, "127.0.0.1:9901".parse().unwrap());
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
    args.extend(lb_context(&node, &caps, &cleanup, &config, &run));
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
