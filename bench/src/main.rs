//! `cargo xtask bench`: measurements for BENCHMARKS.md. Needs root; run through xtask, which
//! installs the peers (wrk, nginx, HAProxy, iperf3) and builds in release mode.
//!
//! Subcommands print Markdown sections on stdout (progress goes to stderr):
//! - `xdp-micro`: per-packet cost under BPF_PROG_TEST_RUN, and how it grows with tracked flows
//!   and backends;
//! - `l4`: end-to-end through the namespace topology, `lb` (XDP) against plain routing,
//!   nftables DNAT and HAProxy, alternating rounds;
//! - `l4user`: the userspace L4 proxy (plain and SNI passthrough) against HAProxy and nginx stream.
//! - `l7`: the L7 proxy against nginx, HAProxy and Pingora: req/s and latency (keep-alive,
//!   Connection: close, h2c), TLS handshakes/s, CPU per 100k requests, RSS with 10k idle
//!   connections;
//! - `l7-scale`: L7 keep-alive req/s against concurrent connections (10 to 10,000);
//! - `xdp-profile [SECS] [new]`: established (or new) flows in a loop, to profile with `perf record`;
//! - `replot`: redraws every plot from the CSV beside it, measuring nothing (no root needed).
//!
//! Plots (SVG) and their points (CSV) go to `LB_BENCH_PLOTS` (default `bench/plots`).
use lb_bench as bench;

const USAGE: &str = "usage: lb-bench xdp-micro|xdp-insitu|l4|ecmp|l4user|l7|l7-scale [--quick|--full]\n       \
                     lb-bench xdp-profile [SECS] [new]\n       lb-bench replot";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if args.first().map(String::as_str) == Some("replot") {
        exit_on(replot());
        return;
    }
    // Before any thread exists: what every daemon started from here inherits. `lb run` logs
    // every request at info (too slow to measure), and gets as many workers as the peers.
    for (key, value) in [("RUST_LOG", "warn"), ("TOKIO_WORKER_THREADS", "2")] {
        if std::env::var_os(key).is_none() {
            // SAFETY: single-threaded here; nothing reads the environment concurrently.
            unsafe { std::env::set_var(key, value) };
        }
    }
    let nofile = bench::procs::raise_nofile();
    if nofile < 20_000 {
        bench::progress(&format!("open-file limit {nofile}: 10k-connection figures will fail"));
    }
    let result = match args.first().map(String::as_str) {
        Some("xdp-micro") => bench::micro::run(quick),
        Some("l4") => bench::l4::run(quick),
        Some("xdp-insitu") => bench::insitu::run(quick),
        Some("ecmp") => bench::ecmp::run(quick),
        Some("l4user") => bench::l4user::run(quick),
        Some("l7") => bench::l7::run(quick),
        Some("l7-scale") => bench::l7::scale(quick),
        Some("xdp-profile") => bench::micro::profile(
            args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10),
            args.iter().any(|a| a == "new"),
        ),
        _ => Err(anyhow::anyhow!(USAGE)),
    };
    exit_on(result);
}

/// `lb-bench replot`: the committed figures redrawn from their points, so a change to the
/// drawing never needs a new measurement.
fn replot() -> anyhow::Result<()> {
    for spec in bench::PLOTS {
        bench::plot::replot(spec)?;
        bench::progress(&format!("redrew {}/{}.svg", bench::plot::dir(), spec.name));
    }
    Ok(())
}

fn exit_on(result: anyhow::Result<()>) {
    if let Err(e) = result {
        eprintln!("lb-bench: {e:#}");
        std::process::exit(1);
    }
}
