//! Request counters of the L7 proxy for `/metrics`: responses by status class and a latency
//! histogram, per backend (on [`super::Backend`], so they survive backend-set changes) and per
//! listener (a registry by name, so they survive reloads that rebuild the listener).
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// Upper bounds of the latency buckets, in seconds (Prometheus' `le`).
pub const BUCKETS: [f64; 12] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Counters of one backend or listener; every update is a relaxed atomic add.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Responses by class: index 0 = 1xx … 4 = 5xx.
    classes: [AtomicU64; 5],
    /// Requests that got no response from the backend (connect error, timeout, reset).
    failures: AtomicU64,
    /// `buckets[i]` counts latencies in (`BUCKETS[i-1]`, `BUCKETS[i]`]: one add per request
    /// (these lines are shared by every worker thread); [`Self::snapshot`] makes them cumulative.
    buckets: [AtomicU64; BUCKETS.len()],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A copy of [`RequestStats`] for rendering.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub classes: [u64; 5],
    pub failures: u64,
    pub buckets: [u64; BUCKETS.len()],
    pub sum_seconds: f64,
    pub count: u64,
}

impl RequestStats {
    /// One response with `status`, `elapsed` after the request arrived.
    pub fn record(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&le| secs <= le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// One request the backend did not answer.
    pub fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut below = 0;
        let buckets = self.buckets.each_ref().map(|b| {
            below += load(b);
            below
        });
        Snapshot {
            classes: self.classes.each_ref().map(load),
            failures: load(&self.failures),
            buckets,
            sum_seconds: load(&self.sum_us) as f64 / 1e6,
            count: load(&self.count),
        }
    }
}

static LISTENERS: Mutex<BTreeMap<String, Arc<RequestStats>>> = Mutex::new(BTreeMap::new());

/// The counters of the L7 listener `name` (created on first use, kept for the process).
pub fn listener(name: &str) -> Arc<RequestStats> {
    let mut map = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(name.to_string()).or_default().clone()
}

/// Every listener's counters, by name.
pub fn listeners() -> Vec<(String, Snapshot)> {
    let map = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
    map.iter().map(|(n, s)| (n.clone(), s.snapshot())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_and_cumulative_buckets() {
        let s = RequestStats::default();
        s.record(200, Duration::from_millis(3));
        s.record(503, Duration::from_millis(300));
        s.record(404, Duration::from_secs(30));
        s.record_failure();
        let snap = s.snapshot();
        assert_eq!(snap.classes, [0, 1, 0, 1, 1]);
        assert_eq!(snap.failures, 1);
        assert_eq!(snap.count, 3);
        assert_eq!(snap.buckets[0], 0, "3 ms is over 1 ms");
        assert_eq!(snap.buckets[1], 1, "≤ 5 ms");
        assert_eq!(snap.buckets[7], 2, "≤ 0.5 s");
        assert_eq!(snap.buckets[11], 2, "30 s is over the last bound");
    }
}
