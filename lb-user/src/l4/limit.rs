//! Per-source limits of the L4 listeners (`max_connections_per_source` on TCP,
//! `max_sessions_per_source` on UDP): how many connections or sessions each client holds now.
//!
//! The table is bounded by construction: an entry exists only while one of its slots is held,
//! and every slot belongs to a connection or session the listener's `max_connections` already
//! caps, so a flood of distinct sources fills `max_connections`, never this table. IPv6
//! clients count per /64: one host usually owns a whole /64, and a per-address limit would give
//! it 2^64 of them.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// What a source is counted under: the IPv4 address (mapped addresses count as IPv4), or the
/// first 64 bits of the IPv6 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
}

impl SourceKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(a) => Self::V4(a.octets()),
            IpAddr::V6(a) => {
                let mut p = [0u8; 8];
                p.copy_from_slice(&a.octets()[..8]);
                Self::V6Prefix(p)
            }
        }
    }
}

/// Connections (or sessions) held per source, at most `max` each.
#[derive(Debug)]
pub struct PerSource {
    max: u32,
    held: Mutex<HashMap<SourceKey, u32>>,
}

/// One connection's place in its source's count; dropping it frees the place.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<PerSource>,
    key: SourceKey,
}

impl PerSource {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self { max: max.min(u32::MAX as usize) as u32, held: Mutex::default() })
    }

    /// A place for one more connection of `ip`, or `None` when its source holds `max` already.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = SourceKey::of(ip);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot { table: self.clone(), key })
    }

    /// Sources holding at least one place now.
    pub fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.table.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn counts_per_source_and_forgets_sources_that_hold_nothing() {
        let t = PerSource::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = t.acquire(a).unwrap();
        let s2 = t.acquire("::ffff:10.0.0.1".parse().unwrap()).expect("mapped counts as IPv4");
        assert!(t.acquire(a).is_none(), "the third of one source");
        let other = t.acquire("10.0.0.2".parse().unwrap()).expect("another source unaffected");
        drop(s1);
        let s3 = t.acquire(a).expect("a freed place is reused");
        assert_eq!(t.sources(), 2);
        drop((s2, s3, other));
        assert_eq!(t.sources(), 0, "no entry outlives its connections");
    }

    #[test]
    fn ipv6_counts_per_64_and_the_table_is_as_large_as_what_is_held() {
        let t = PerSource::new(3);
        let net = 0x2001_0db8_0000_0001_u128 << 64;
        let held: Vec<_> = (1..=3u128).map(|i| t.acquire(Ipv6Addr::from(net | i).into())).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(t.acquire(Ipv6Addr::from(net | 99).into()).is_none(), "same /64");
        assert!(t.acquire(Ipv6Addr::from(net + (1 << 64)).into()).is_some(), "next /64");
        // 10,000 distinct sources, one place each: exactly 10,000 entries while held, none after.
        let many: Vec<_> =
            (0..10_000u32).map(|i| t.acquire(Ipv4Addr::from(i).into()).unwrap()).collect();
        assert_eq!(t.sources(), 10_000 + 1);
        drop(many);
        drop(held);
        assert_eq!(t.sources(), 0);
    }
}
