//! `cargo xtask`: what cargo alone cannot do: set up a machine, run the whole test suite, run the
//! demo. Kept free of the workspace's crates so it builds before the eBPF toolchain exists.
mod bench;
mod bootstrap;
mod cmd;
mod deploy;
mod reliability;

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
    /// Only the offline check of deploy/ (Kubernetes schemas, `systemd-analyze verify`), as
    /// `test` runs it; needs `cargo build -p lb-user` first.
    Deploy,
    /// Bootstrap, install the peers, and measure lb against them with `lb-bench` (the `bench/`
    /// crate); writes BENCHMARKS.md and the plots with their points in bench/plots/.
    Bench {
        /// One short round per contender (a few minutes) instead of three full ones.
        #[arg(long)]
        quick: bool,
        /// Measure nothing: only redraw bench/plots/*.svg from the CSVs beside them.
        #[arg(long, conflicts_with = "quick")]
        replot: bool,
    },
    /// Bootstrap, then the full-length reliability scenarios, testssl.sh and longer fuzz runs;
    /// writes RELIABILITY.md.
    Reliability {
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 120)]
        fuzz_secs: u64,
        /// Also run the soak for this many seconds.
        #[arg(long)]
        soak_secs: Option<u64>,
        /// Only rewrite RELIABILITY.md: the rows of the last runs (target/*.jsonl) replace or
        /// join the committed ones.
        #[arg(long)]
        report_only: bool,
    },
    /// Bootstrap, then the soak: RSS and open files of `lb run` under steady load; updates
    /// RELIABILITY.md.
    Soak {
        #[arg(long, default_value_t = 600)]
        secs: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bootstrap => bootstrap::run(),
        Task::Test { no_lint } => bootstrap::run().and_then(|()| test(!no_lint)),
        Task::Demo => bootstrap::run().and_then(|()| demo()),
        Task::Deploy => deploy::bootstrap().and_then(|()| deploy::validate()),
        Task::Bench { replot: true, .. } => bootstrap::run().and_then(|()| bench::replot()),
        Task::Bench { quick, .. } => bootstrap::run().and_then(|()| bench::run(quick)),
        Task::Reliability { report_only: true, .. } => reliability::write_markdown(true),
        Task::Reliability { fuzz_secs, soak_secs, .. } => {
            bootstrap::run().and_then(|()| reliability::run(fuzz_secs, soak_secs))
        }
        Task::Soak { secs } => bootstrap::run().and_then(|()| reliability::soak(secs)),
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
    // tests/tests/k8s_image.rs builds the image from the release binary, as the README does.
    cmd::step(
        "build the release binary (the image test packs it)",
        &["cargo", "build", "--release", "-p", "lb-user"],
        &[],
    )?;
    deploy::validate()?;
    // Root-only tests fail instead of skipping here: the README's command must run them all.
    cmd::step(
        "tests",
        // --no-fail-fast: one run reports every failing test binary, not only the first.
        &[
            "cargo",
            "test",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--no-fail-fast",
            "--",
            "--test-threads",
            "2",
        ],
        &[("LB_REQUIRE_PRIVILEGED", "1")],
    )?;
    // A short bounded run of every fuzz target (longer ones: `cargo xtask reliability`).
    reliability::fuzz_short(15)?;
    println!("xtask: all tests passed");
    Ok(())
}

fn demo() -> anyhow::Result<()> {
    cmd::step("build", &["cargo", "build", "--workspace", "--exclude", "lb-ebpf", "--bins"], &[])?;
    cmd::step("demo", &["cargo", "run", "--quiet", "-p", "lb-tests", "--bin", "lb-demo"], &[])
}
