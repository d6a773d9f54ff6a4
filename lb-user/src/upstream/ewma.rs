//! Peak-EWMA latency of one backend (Finagle's and linkerd's load metric): a slower sample
//! takes over at once, faster ones pull the average down with a decay time constant.
use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// How fast old samples fade: after `DECAY` a sample weighs 1/e.
const DECAY: Duration = Duration::from_secs(10);

/// Latency in nanoseconds with the time of its last update; lock-free and approximate (two
/// concurrent updates may lose one sample, which a load metric can afford).
#[derive(Debug, Default)]
pub struct PeakEwma {
    cost_ns: AtomicU64,
    stamp_ns: AtomicU64,
}

fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl PeakEwma {
    /// Adds one observed latency.
    pub fn observe(&self, rtt: Duration) {
        let rtt = rtt.as_nanos().min(u64::MAX as u128) as f64;
        let now = now_ns();
        let last = self.stamp_ns.swap(now, Ordering::Relaxed);
        let cost = self.cost_ns.load(Ordering::Relaxed) as f64;
        let next = if rtt > cost {
            rtt
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            cost * w + rtt * (1.0 - w)
        };
        self.cost_ns.store(next as u64, Ordering::Relaxed);
    }

    /// The current estimate in nanoseconds (0 before any sample).
    pub fn get_ns(&self) -> u64 {
        self.cost_ns.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_slowly() {
        let e = PeakEwma::default();
        e.observe(Duration::from_millis(10));
        assert_eq!(e.get_ns(), 10_000_000);
        e.observe(Duration::from_millis(50));
        assert_eq!(e.get_ns(), 50_000_000, "a slower sample takes over");
        e.observe(Duration::from_millis(1));
        let after = e.get_ns();
        assert!(after <= 50_000_000 && after > 1_000_000, "{after}");
    }
}
