//! The reliability suite's bookkeeping (`tests/rel_*.rs`): short or full runs, the report rows
//! RELIABILITY.md is built from, and the kernel's TCP counters (SYN retransmissions, ...).
use std::io::Write as _;

use crate::netns::Netns;

/// True under `cargo xtask reliability` (`LB_REL_FULL=1`): the full-length versions run.
pub fn full() -> bool {
    std::env::var("LB_REL_FULL").as_deref() == Ok("1")
}

/// `short` in the default test command, `long` in the full run.
pub fn scaled<T>(short: T, long: T) -> T {
    if full() { long } else { short }
}

/// Records one scenario's outcome: printed always, and appended as a JSON line to the file
/// named by `LB_REL_REPORT` (what `cargo xtask reliability` turns into RELIABILITY.md).
pub fn record(scenario: &str, injected: &str, observed: &str, pass: bool) {
    let mode = if full() { "full" } else { "short" };
    eprintln!(
        "REL {scenario} [{mode}] {}: injected: {injected}; observed: {observed}",
        if pass { "PASS" } else { "FAIL" }
    );
    if let Some(path) = std::env::var_os("LB_REL_REPORT") {
        let line = serde_json::json!({
            "scenario": scenario, "mode": mode, "injected": injected,
            "observed": observed, "pass": pass,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The kernel's count of TCP SYN retransmissions in `ns` (TcpExt TCPSynRetrans).
pub fn syn_retransmits(ns: &Netns) -> u64 {
    tcp_ext(ns, "TCPSynRetrans")
}

/// One of the kernel's TcpExt counters in `ns` (/proc/net/netstat), 0 if absent.
pub fn tcp_ext(ns: &Netns, key: &str) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/netstat"]).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(keys), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    keys.split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}
