//! `cargo xtask bench`: measurements for BENCHMARKS.md. Needs root; run through xtask, which
//! installs the peers (wrk, nginx, HAProxy, iperf3) and builds in release mode.
//!
//! Subcommands print Markdown sections on stdout (progress goes to stderr):
//! - `xdp-micro`: per-packet cost under BPF_PROG_TEST_RUN, and how it grows with tracked flows
//!   and backends;
//! - `l4`: end-to-end through the namespace topology, `lb` (XDP) against plain routing,
//!   nftables DNAT and HAProxy, alternating rounds;
//! - `l4user`: the userspace L4 proxy (plain and SNI passthrough) against HAProxy and nginx stream.
mod bench;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let result = match args.first().map(String::as_str) {
        Some("xdp-micro") => bench::micro::run(quick),
        Some("l4") => bench::l4::run(quick),
        Some("xdp-insitu") => bench::insitu::run(quick),
        Some("l4user") => bench::l4user::run(quick),
        _ => Err(anyhow::anyhow!("usage: lb-bench xdp-micro|xdp-insitu|l4|l4user [--quick]")),
    };
    if let Err(e) = result {
        eprintln!("lb-bench: {e:#}");
        std::process::exit(1);
    }
}
