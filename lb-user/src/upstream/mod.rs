//! Upstream groups at runtime: the backend set of each `[upstream.NAME]`, swapped atomically when
//! it changes, so the request path reads it without a lock.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use thiserror::Error;

use crate::config::UpstreamConfig;

/// One backend of a group. Counters live here so they survive backend-set changes: a new set
/// reuses the `Arc<Backend>` of every backend it keeps.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
    /// No new connections or requests; established ones finish.
    pub draining: AtomicBool,
    /// Health as decided by checks and passive failures.
    pub healthy: AtomicBool,
    /// Requests or connections in flight to this backend.
    pub in_flight: AtomicU64,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            draining: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
        }
    }

    /// May receive new work: healthy and not draining.
    pub fn is_available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum GroupError {
    #[error("backend {0} is already in the group")]
    Exists(SocketAddr),
    #[error("backend {0} is not in the group; `lb backend list` shows the members")]
    NotFound(SocketAddr),
    #[error("weight must be at least 1 (drain a backend to stop new work)")]
    ZeroWeight,
}

/// A named backend set.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    backends: ArcSwap<Vec<Arc<Backend>>>,
}

impl Group {
    pub fn new(name: &str, config: &UpstreamConfig) -> Self {
        let list =
            config.backends.iter().map(|b| Arc::new(Backend::new(b.addr(), b.weight()))).collect();
        Self { name: name.to_string(), backends: ArcSwap::from_pointee(list) }
    }

    /// The current backend set (a snapshot; cheap).
    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    pub fn add(&self, addr: SocketAddr, weight: u32) -> Result<(), GroupError> {
        if weight == 0 {
            return Err(GroupError::ZeroWeight);
        }
        let mut result = Ok(());
        self.backends.rcu(|cur| {
            if cur.iter().any(|b| b.addr == addr) {
                result = Err(GroupError::Exists(addr));
                return cur.clone();
            }
            result = Ok(());
            let mut next: Vec<_> = cur.iter().cloned().collect();
            next.push(Arc::new(Backend::new(addr, weight)));
            Arc::new(next)
        });
        result
    }

    pub fn remove(&self, addr: SocketAddr) -> Result<(), GroupError> {
        let mut result = Ok(());
        self.backends.rcu(|cur| {
            if !cur.iter().any(|b| b.addr == addr) {
                result = Err(GroupError::NotFound(addr));
                return cur.clone();
            }
            result = Ok(());
            Arc::new(cur.iter().filter(|b| b.addr != addr).cloned().collect())
        });
        result
    }

    pub fn drain(&self, addr: SocketAddr) -> Result<(), GroupError> {
        let set = self.backends();
        let b = set.iter().find(|b| b.addr == addr).ok_or(GroupError::NotFound(addr))?;
        b.draining.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// Every group by name.
pub type Groups = BTreeMap<String, Arc<Group>>;

/// Builds the groups of a config.
pub fn groups(config: &BTreeMap<String, UpstreamConfig>) -> Groups {
    config.iter().map(|(name, c)| (name.clone(), Arc::new(Group::new(name, c)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group() -> Group {
        let config: UpstreamConfig =
            toml::from_str(r#"backends = ["10.0.0.1:80", { addr = "10.0.0.2:80", weight = 3 }]"#)
                .unwrap();
        Group::new("api", &config)
    }

    #[test]
    fn add_remove_drain_keep_the_other_backends_state() {
        let g = group();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:80".parse().unwrap();
        g.backends()[0].in_flight.store(5, Ordering::Relaxed);
        assert_eq!(g.add(c, 1), Ok(()));
        assert_eq!(g.add(c, 1), Err(GroupError::Exists(c)));
        assert_eq!(g.add(c, 0), Err(GroupError::ZeroWeight));
        assert_eq!(g.backends().len(), 3);
        assert_eq!(g.backends()[0].in_flight.load(Ordering::Relaxed), 5, "counters survive");
        g.drain(a).unwrap();
        assert!(!g.backends()[0].is_available());
        g.remove(a).unwrap();
        assert_eq!(g.remove(a), Err(GroupError::NotFound(a)));
        assert_eq!(g.backends().iter().map(|b| b.weight).collect::<Vec<_>>(), [3, 1]);
    }
}
