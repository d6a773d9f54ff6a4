//! Backend-failure warnings, rate limited: under overload every request can fail the same way,
//! and a line per request buries the log (and costs more than the request). Up to
//! [`PER_SECOND`] lines a second; then one line a second says how many were left out.
use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

const PER_SECOND: u64 = 10;

/// The second the counts belong to (Unix seconds).
static SECOND: AtomicU64 = AtomicU64::new(0);
/// Warnings seen in that second.
static SEEN: AtomicU64 = AtomicU64::new(0);

/// Logs `msg` at warn level unless [`PER_SECOND`] warnings already went out this second.
pub fn backend_failure(msg: std::fmt::Arguments<'_>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (log_it, left_out) = admit(now);
    if left_out > 0 {
        log::warn!("{left_out} more backend failure warnings left out in the last second");
    }
    if log_it {
        log::warn!("{msg}");
    }
}

/// Counts one warning at Unix second `now`: whether to log it, and how many the previous
/// second left out (reported once, by the first warning of a new second).
fn admit(now: u64) -> (bool, u64) {
    let second = SECOND.load(Ordering::Relaxed);
    let mut left_out = 0;
    if now != second
        && SECOND.compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    {
        left_out = SEEN.swap(0, Ordering::Relaxed).saturating_sub(PER_SECOND);
    }
    (SEEN.fetch_add(1, Ordering::Relaxed) < PER_SECOND, left_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_a_second_then_a_count_of_the_rest() {
        let first: Vec<bool> = (0..12).map(|_| admit(1_000).0).collect();
        assert_eq!(first.iter().filter(|&&x| x).count(), 10);
        assert!(!first[10] && !first[11]);
        assert_eq!(admit(1_001), (true, 2));
        assert_eq!(admit(1_001), (true, 0));
    }
}
