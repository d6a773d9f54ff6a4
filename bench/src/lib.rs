//! The sections of `lb-bench` (each prints Markdown), its plots, and the peers and clients they
//! drive; topology, namespaces and backends come from the test harness (`lb-tests`).
pub mod clients;
pub mod ecmp;
pub mod insitu;
pub mod l4;
pub mod l4user;
pub mod l7;
pub mod micro;
pub mod peers;
pub mod plot;
pub mod procs;
pub mod tools;

/// Every chart the sections draw, for `lb-bench replot`.
pub const PLOTS: [&plot::Spec; 5] =
    [&micro::FLOWS, &micro::BACKENDS, &l7::THROUGHPUT, &l7::SCALE_RPS, &l7::SCALE_P99];

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// Progress on stderr, so stdout stays the report.
pub fn progress(msg: &str) {
    eprintln!("lb-bench: {msg}");
}
