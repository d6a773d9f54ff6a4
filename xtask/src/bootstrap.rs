//! Puts a fresh machine of this kind in shape to build and test lb: Debian packages, the nightly
//! rust-src the eBPF build needs, bpf-linker built against LLVM 22, cargo-fuzz, a mounted
//! bpffs, podman's settings for this machine. Every step checks first and skips what is there; every failure is one sentence that
//! says what is wrong.
use anyhow::{Context as _, bail};

use crate::cmd::{ok, output, step};

/// Debian packages the build and the tests use, with a file that shows each is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("iproute2", "/usr/sbin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("nftables", "/usr/sbin/nft"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("curl", "/usr/bin/curl"),
    ("util-linux", "/usr/bin/setpriv"),
    ("procps", "/usr/sbin/sysctl"),
    ("systemd", "/usr/bin/systemd-analyze"),
    // The image test (`tests/tests/k8s_image.rs`): a local base image from Debian's mirror
    // (no registry is reachable) and podman on runc (see [`containers_conf`]).
    ("podman", "/usr/bin/podman"),
    ("runc", "/usr/sbin/runc"),
    ("debootstrap", "/usr/sbin/debootstrap"),
    // BGP: the node and router daemons of the `[announce]` tests (deploy/bgp/bird.conf).
    ("bird2", "/usr/sbin/bird"),
    // Go and the packaged Go libraries that ../shared/tools/h2spec/build.sh compiles h2spec
    // against (GOPATH mode, no module proxy).
    ("golang-go", "/usr/bin/go"),
    ("golang-golang-x-net-dev", "/usr/share/gocode/src/golang.org/x/net"),
    ("golang-golang-x-sys-dev", "/usr/share/gocode/src/golang.org/x/sys"),
    ("golang-github-spf13-cobra-dev", "/usr/share/gocode/src/github.com/spf13/cobra"),
    ("golang-github-spf13-pflag-dev", "/usr/share/gocode/src/github.com/spf13/pflag"),
    ("golang-github-fatih-color-dev", "/usr/share/gocode/src/github.com/fatih/color"),
    ("golang-github-mattn-go-colorable-dev", "/usr/share/gocode/src/github.com/mattn/go-colorable"),
    ("golang-github-mattn-go-isatty-dev", "/usr/share/gocode/src/github.com/mattn/go-isatty"),
    (
        "golang-github-inconshreveable-mousetrap-dev",
        "/usr/share/gocode/src/github.com/inconshreveable/mousetrap",
    ),
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bootstrap needs root (it installs packages, mounts bpffs, and the tests create network namespaces): run it as root"
        );
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
        && !std::path::Path::new("/proc/sys/kernel/unprivileged_bpf_disabled").exists()
    {
        bail!(
            "this kernel has no BPF support (no /proc/sys/kernel/unprivileged_bpf_disabled): lb needs a kernel built with CONFIG_BPF_SYSCALL and XDP"
        );
    }
    packages()?;
    netns_check()?;
    bpffs()?;
    containers_conf()?;
    rust()?;
    bpf_linker()?;
    crate::reliability::cargo_fuzz()?;
    crate::deploy::bootstrap()?;
    h2spec()?;
    grpc_python()?;
    println!("xtask: bootstrap: ready");
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !std::path::Path::new(file).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    step("apt-get update", &["apt-get", "update", "-qq"], &env).context(
        "cannot reach Debian's package mirror; check the network or install the packages by hand",
    )?;
    let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    step("install packages", &args, &env)
}

fn netns_check() -> anyhow::Result<()> {
    let name = format!("lb-bootstrap-{}", std::process::id());
    if !ok(&["ip", "netns", "add", &name]) {
        bail!(
            "cannot create a network namespace (`ip netns add` failed): the tests need CONFIG_NET_NS and CAP_SYS_ADMIN"
        );
    }
    let _ = ok(&["ip", "netns", "del", &name]);
    Ok(())
}

fn bpffs() -> anyhow::Result<()> {
    if output(&["stat", "-f", "-c", "%T", "/sys/fs/bpf"]).trim() == "bpf_fs" {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    step("mount bpffs", &["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], &[])
        .context("cannot mount bpffs at /sys/fs/bpf; lb pins its program and maps there")
}

/// podman's settings for this machine kind: crun (Debian's default runtime) refuses its hybrid
/// cgroup layout, and setting rlimits in a container is not permitted here, so every run would
/// fail without `runtime = "runc"` and `default_ulimits = []`.
const CONTAINERS_CONF: &str = "/etc/containers/containers.conf";
const CONTAINERS_SETTINGS: &str =
    "[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = \"runc\"\n";

fn containers_conf() -> anyhow::Result<()> {
    match std::fs::read_to_string(CONTAINERS_CONF) {
        Ok(text)
            if text.contains("default_ulimits = []") && text.contains("runtime = \"runc\"") =>
        {
            Ok(())
        }
        Ok(_) => bail!(
            "{CONTAINERS_CONF} exists without lb's settings: add `default_ulimits = []` under [containers] and `runtime = \"runc\"` under [engine] (podman cannot run containers here otherwise)"
        ),
        Err(_) => {
            println!("xtask: write {CONTAINERS_CONF} (runc, no default ulimits)");
            std::fs::create_dir_all("/etc/containers")?;
            std::fs::write(CONTAINERS_CONF, CONTAINERS_SETTINGS)
                .with_context(|| format!("cannot write {CONTAINERS_CONF}"))
        }
    }
}

fn rust() -> anyhow::Result<()> {
    if !output(&["rustup", "toolchain", "list"]).contains("nightly") {
        step(
            "install nightly toolchain",
            &["rustup", "toolchain", "install", "nightly", "--profile", "minimal"],
            &[],
        )
        .context("the eBPF crate needs a nightly toolchain and rustup could not install one")?;
    }
    let installed =
        output(&["rustup", "component", "list", "--toolchain", "nightly", "--installed"]);
    for component in ["rust-src", "clippy"] {
        if !installed.lines().any(|l| l.starts_with(component)) {
            step(
                &format!("nightly {component}"),
                &["rustup", "component", "add", component, "--toolchain", "nightly"],
                &[],
            )?;
        }
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if ok(&["bpf-linker", "--version"]) {
        return Ok(());
    }
    // bpf-linker's default LLVM (23) is not packaged here; build it against Debian's LLVM 22,
    // which matches the nightly's LLVM. Its build script reads LLVM_PREFIX.
    step(
        "build bpf-linker against LLVM 22 (about 3 minutes)",
        &["cargo", "install", "bpf-linker", "--no-default-features", "--features", "llvm-22"],
        &[("LLVM_PREFIX", LLVM_PREFIX), ("LLVM_SYS_221_PREFIX", LLVM_PREFIX)],
    )
    .context("bpf-linker did not build; the XDP program cannot be compiled without it")
}

/// Where the conformance tests (`tests/tests/l7_h2spec.rs`) look for h2spec.
const H2SPEC: &str = "/opt/lb-tools/bin/h2spec";

fn h2spec() -> anyhow::Result<()> {
    if ok(&[H2SPEC, "--version"]) {
        return Ok(());
    }
    // No registry packages h2spec: shared/ holds its pinned source and the script that builds
    // it with Debian's Go. It sits beside the project's clone (in CI too), so it is found
    // relative to the workspace root, not the current directory.
    let xtask = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = xtask.parent().unwrap_or(xtask);
    let script = workspace.join("../shared/tools/h2spec/build.sh");
    if !script.exists() {
        bail!(
            "{} is missing: h2spec is built from the pinned source in shared/, which must sit beside the project's clone",
            script.display()
        );
    }
    step("build h2spec (HTTP/2 conformance)", &["bash", &script.display().to_string(), H2SPEC], &[])
        .context("h2spec did not build; the HTTP/2 conformance test needs it")
}

/// Pinned so that the gRPC tests (`tests/tests/l7_grpc.rs`) meet the same two implementations
/// everywhere: grpcio (C core) and grpclib (pure Python, on h2), with the protobuf runtime and
/// protoc (grpcio-tools) that generate the test's stubs.
const GRPC_PYTHON: &[(&str, &str)] = &[
    ("grpcio", "1.85.1"),
    ("grpcio-tools", "1.85.1"),
    ("grpclib", "0.4.9"),
    ("protobuf", "7.36.2"),
    ("h2", "4.4.1"),
];

fn grpc_python() -> anyhow::Result<()> {
    let python = format!("{}/bin/python", crate::deploy::VENV);
    let want: Vec<String> = GRPC_PYTHON.iter().map(|(p, v)| format!("({p:?}, {v:?})")).collect();
    let check = format!(
        "import importlib.metadata as m, sys; sys.exit(any(m.version(p) != v for p, v in [{}]))",
        want.join(", ")
    );
    if ok(&[&python, "-c", &check]) {
        return Ok(());
    }
    let pins: Vec<String> = GRPC_PYTHON.iter().map(|(p, v)| format!("{p}=={v}")).collect();
    let pip = format!("{}/bin/pip", crate::deploy::VENV);
    let mut args = vec![pip.as_str(), "install", "-q"];
    args.extend(pins.iter().map(String::as_str));
    step("install grpcio, grpcio-tools, grpclib (gRPC tests)", &args, &[])
        .context("cannot install the gRPC Python packages from PyPI; the gRPC tests need them")
}
