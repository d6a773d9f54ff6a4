//! `cargo xtask bench [--quick]`: installs the peers, builds `lb` and `lb-bench` (the `bench/`
//! crate) in release mode (and the bench-only Pingora proxy, `bench/pingora-lb`, in its own
//! target directory), runs every benchmark section side by side and writes BENCHMARKS.md with
//! the machine and the command, and the SVG plots (with their points as CSV) under
//! `bench/plots/`. `cargo xtask bench --replot` only redraws those SVGs from their CSVs.
use std::{fmt::Write as _, process::Command};

use anyhow::Context as _;

use crate::cmd::{output, step};

/// What the benchmarks drive, from Debian's packages, with a file that shows each is there.
const PEERS: &[(&str, &str)] = &[
    ("wrk", "/usr/bin/wrk"),
    ("nginx-light", "/usr/sbin/nginx"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("iperf3", "/usr/bin/iperf3"),
    ("nghttp2-client", "/usr/bin/h2load"),
    ("libnginx-mod-stream", "/usr/lib/nginx/modules/ngx_stream_module.so"),
    // Pingora's zlib-ng build script runs cmake.
    ("cmake", "/usr/bin/cmake"),
];

/// The bench-only Pingora proxy: its own workspace (excluded from the root one), built from the
/// crate registry with its committed Cargo.lock into `PINGORA_TARGET`.
const PINGORA_MANIFEST: &str = "bench/pingora-lb/Cargo.toml";
const PINGORA_TARGET: &str = "target/pingora";
/// Where the sections write their plots, relative to the repository root (links in
/// BENCHMARKS.md are relative to it too).
const PLOTS: &str = "bench/plots";

/// Sections in report order: (lb-bench subcommand, heading, what it answers).
const SECTIONS: &[(&str, &str)] = &[
    ("xdp-micro", "XDP per-packet cost (BPF_PROG_TEST_RUN)"),
    ("xdp-insitu", "XDP per-packet cost on real traffic (kernel BPF statistics)"),
    ("l4", "L4 end to end: lb XDP against kernel routing, nftables DNAT and HAProxy"),
    (
        "ecmp",
        "DSR on a routed LAN: against full NAT and routing; two lb nodes behind ECMP against one",
    ),
    ("l4user", "Userspace L4: lb TCP proxy and SNI passthrough against HAProxy and nginx stream"),
    ("l7", "L7 HTTP/TLS proxy: lb against nginx, HAProxy and Pingora"),
    ("l7-scale", "L7 scaling: keep-alive requests/s against concurrent connections"),
];

/// `lb-bench replot`: the committed plots redrawn from their CSVs; no peers, nothing measured.
pub fn replot() -> anyhow::Result<()> {
    build()?;
    step("redraw the plots", &["target/release/lb-bench", "replot"], &[("LB_BENCH_PLOTS", PLOTS)])
}

fn build() -> anyhow::Result<()> {
    step(
        "release build",
        &["cargo", "build", "--release", "-p", "lb-user", "-p", "lb-bench", "--bins"],
        &[],
    )
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let missing: Vec<&str> =
        PEERS.iter().filter(|(_, f)| !std::path::Path::new(f).exists()).map(|(p, _)| *p).collect();
    if !missing.is_empty() {
        let env = [("DEBIAN_FRONTEND", "noninteractive")];
        step("apt-get update", &["apt-get", "update", "-qq"], &env)?;
        let mut args = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        step("install benchmark peers", &args, &env)?;
    }
    build()?;
    let root = std::env::current_dir()?;
    let lb = root.join("target/release/lb");
    let bench = root.join("target/release/lb-bench");
    let (pingora, pingora_note) = build_pingora(&root);
    // Plots of sections that no longer exist must not linger.
    let _ = std::fs::remove_dir_all(PLOTS);
    std::fs::create_dir_all(PLOTS)?;
    let mode = if quick { "--quick" } else { "--full" };
    let command = format!("cargo xtask bench{}", if quick { " --quick" } else { "" });
    let mut report = header(&command, &pingora_note);
    for (section, heading) in SECTIONS {
        println!("xtask: bench: {heading}");
        let out = Command::new(&bench)
            .args([section, mode])
            .env("LB_BIN", &lb)
            .env("LB_PINGORA_BIN", &pingora)
            .env("LB_BENCH_PLOTS", PLOTS)
            .env("RUST_LOG", "warn")
            .env("TOKIO_WORKER_THREADS", "2")
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("cannot run {}", bench.display()))?;
        anyhow::ensure!(out.status.success(), "benchmark {section} failed");
        let md = String::from_utf8_lossy(&out.stdout);
        print!("{md}");
        write!(report, "## {heading}\n\n{md}\n")?;
    }
    std::fs::write("BENCHMARKS.md", report)?;
    println!("xtask: bench: wrote BENCHMARKS.md");
    Ok(())
}

/// Builds the Pingora peer (minutes the first time, cached after). Returns the binary to use
/// (empty when the build failed: lb-bench then leaves Pingora out) and a sentence for the report.
fn build_pingora(root: &std::path::Path) -> (std::path::PathBuf, String) {
    let target = root.join(PINGORA_TARGET);
    let built = step(
        "build the Pingora peer (bench/pingora-lb; minutes the first time)",
        &["cargo", "build", "--release", "--locked", "--manifest-path", PINGORA_MANIFEST],
        &[("CARGO_TARGET_DIR", target.to_str().unwrap_or(PINGORA_TARGET))],
    );
    match built {
        Ok(()) => (
            target.join("release/pingora-lb"),
            "Pingora, the Rust peer, is `bench/pingora-lb` (a minimal proxy on Pingora's \
             load-balancing API, round robin, built from crates.io by this command)."
                .into(),
        ),
        Err(e) => {
            println!("xtask: bench: Pingora left out: {e:#}");
            (
                std::path::PathBuf::new(),
                format!(
                    "Pingora is missing from this run: `bench/pingora-lb` did not build ({e:#})."
                ),
            )
        }
    }
}

fn header(command: &str, pingora: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = output(&["nproc"]);
    let kernel = output(&["uname", "-r"]);
    let date = output(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]);
    format!(
        "# Benchmarks\n\nGenerated by `{command}` (as root; it installs the peers it needs). \
         Every table below comes from one run of that command on this machine: {} cores ({cpu}), \
         kernel {}, {}. Peers are measured side by side in the same run on the same namespace \
         topology; the machine is shared and noisy, so compare ratios within a table, not \
         across runs. `--quick` runs one short round per contender; the default runs three. \
         {pingora} Plots are SVG files in `{PLOTS}/` (drawn with plotters) next to CSV files of \
         their points, written by the same command; `cargo xtask bench --replot` redraws the \
         SVGs from the CSVs without measuring.\n\n",
        cores.trim(),
        kernel.trim(),
        date.trim()
    )
}
