//! `cargo xtask`: what cargo alone cannot do: set up a machine, run the whole test suite, run the
//! demo. Kept free of the workspace's crates so it builds before the eBPF toolchain exists.
mod bench;
mod bootstrap;
mod cmd;
mod deploy;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (idempotent; needs root).
    Bootstrap,
    /// Bootstrap, then lints and every test: unit, packet fixtures, end-to-end in namespaces.
    Test {
        /// Skip clippy and rustfmt.
        #[arg(long)]
        no_lint: bool,
    },
    /// Bootstrap, build, and show traffic through lb in a sandbox of namespaces.
    Demo,
    /// Bootstrap, install the peers, and measure lb against them; writes BENCHMARKS.md.
    Bench {
        /// One short round per contender (a few minutes) instead of three full ones.
        #[arg(long)]
        quick: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bootstrap => bootstrap::run(),
        Task::Test { no_lint } => bootstrap::run().and_then(|()| test(!no_lint)),
        Task::Demo => bootstrap::run().and_then(|()| demo()),
        Task::Bench { quick } => bootstrap::run().and_then(|()| bench::run(quick)),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn test(lint: bool) -> anyhow::Result<()> {
    if lint {
        cmd::step("rustfmt", &["cargo", "fmt", "--all", "--", "--check"], &[])?;
        cmd::step(
            "clippy (host crates)",
            &[
                "cargo",
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
        cmd::step(
            "clippy (eBPF crate)",
            &[
                "cargo",
                "+nightly",
                "clippy",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )?;
    }
    cmd::step(
        "build",
        &["cargo", "build", "--workspace", "--exclude", "lb-ebpf", "--all-targets"],
        &[],
    )?;
    deploy::validate()?;
    // Root-only tests fail instead of skipping here: the README's command must run them all.
    cmd::step(
        "tests",
        &["cargo", "test", "--workspace", "--exclude", "lb-ebpf", "--", "--test-threads", "2"],
        &[("LB_REQUIRE_PRIVILEGED", "1")],
    )?;
    fuzz(FUZZ_SECONDS)?;
    println!("xtask: all tests passed");
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test`. For a longer run see fuzz/README.md:
/// `cd fuzz && cargo +nightly fuzz run TARGET -- -max_total_time=3600 -jobs=2`.
const FUZZ_SECONDS: u32 = 20;

/// A short, bounded run of every cargo-fuzz target (nightly; the crate is outside the workspace).
fn fuzz(seconds: u32) -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let limit = format!("-max_total_time={seconds}");
    for target in ["client_hello", "proxy_header"] {
        // New inputs go to the (ignored) corpus dir; the checked-in seeds are read only.
        let corpus = root.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("seeds").join(target);
        cmd::step(
            &format!("fuzz {target} ({seconds} s)"),
            &[
                "cargo",
                "+nightly",
                "fuzz",
                "run",
                "--fuzz-dir",
                root.to_str().unwrap_or("fuzz"),
                target,
                corpus.to_str().unwrap_or_default(),
                seeds.to_str().unwrap_or_default(),
                "--",
                &limit,
            ],
            &[],
        )?;
    }
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    cmd::step("build", &["cargo", "build", "--workspace", "--exclude", "lb-ebpf", "--bins"], &[])?;
    cmd::step("demo", &["cargo", "run", "--quiet", "-p", "lb-tests", "--bin", "lb-demo"], &[])
}
