//! Upstream groups at runtime: the backend set of each `[upstream.NAME]`, swapped atomically when
//! it changes, so the request path reads it without a lock.
mod balance;
mod ewma;
pub mod stats;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use thiserror::Error;

pub use balance::hash_key;
pub use ewma::PeakEwma;

use crate::config::{Balance, UpstreamConfig};

/// One backend of a group. Counters live here so they survive backend-set changes: a new set
/// reuses the `Arc<Backend>` of every backend it keeps.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Changed in place (`lb backend weight`, a reload), so counters and in-flight counts stay;
    /// the group swaps its set at the same time, which tells the L4 picker's cache to rebuild.
    weight: AtomicU32,
    /// No new connections or requests; established ones finish.
    pub draining: AtomicBool,
    /// The active health check's verdict (up until a check says otherwise, and always up
    /// without checks).
    pub checked_up: AtomicBool,
    /// Taken out by passive ejection (consecutive failed requests) until its timer ends.
    /// Kept apart from `checked_up`: neither verdict overrides or cuts short the other.
    pub ejected: AtomicBool,
    /// Requests or connections in flight to this backend.
    pub in_flight: AtomicU64,
    /// Consecutive failed requests (connect errors, timeouts); reset by a success.
    pub failures: AtomicU32,
    /// Response latency, for `p2c-ewma`.
    pub latency: PeakEwma,
    /// Responses by class and latency, for `/metrics`.
    pub requests: stats::RequestStats,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight: AtomicU32::new(weight),
            draining: AtomicBool::new(false),
            checked_up: AtomicBool::new(true),
            ejected: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            latency: PeakEwma::default(),
            requests: stats::RequestStats::default(),
        }
    }

    /// The share of new work, relative to the group's other backends.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// May receive new work: checked up, not ejected, not draining.
    pub fn is_available(&self) -> bool {
        self.checked_up.load(Ordering::Relaxed)
            && !self.ejected.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A request to this backend succeeded: the failure streak ends.
    pub fn record_success(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }

    /// A request to this backend failed. After `eject_after` in a row the backend is ejected
    /// for `eject_for` (passive ejection) if `may_eject`; returns true when this call
    /// ejected it. Needs a tokio runtime (the timer that brings the backend back).
    pub fn record_failure(
        self: &Arc<Self>,
        eject_after: u32,
        eject_for: Duration,
        may_eject: bool,
    ) -> bool {
        let streak = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if eject_after == 0 || streak < eject_after || !may_eject {
            return false;
        }
        if self.ejected.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        log::warn!("backend {} ejected for {eject_for:?} after {streak} failures", self.addr);
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(eject_for).await;
            me.ejected.store(false, Ordering::Relaxed);
            log::info!("backend {} back from ejection", me.addr);
        });
        true
    }
}

/// One request in flight to a backend (see [`Backend::start`]).
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
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

/// How a group balances. Swapped whole by a reload, in place: everything holding the group (L4
/// listeners, L7 upstreams, health checks, `lb backend`) keeps the one group and follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `balance` as written; absent means each proxy's default.
    pub configured: Option<Balance>,
    /// What the L7 proxy applies ([`Group::pick`]): `configured`, else round robin.
    pub http: Balance,
}

impl Policy {
    pub fn of(config: &UpstreamConfig) -> Self {
        Self { configured: config.balance.clone(), http: config.http_balance() }
    }
}

/// A named backend set.
#[derive(Debug)]
pub struct Group {
    pub name: String,
    /// How [`Group::pick`] and the L4 picker choose.
    policy: ArcSwap<Policy>,
    backends: ArcSwap<Vec<Arc<Backend>>>,
    /// Round-robin position (also the tie breaker and the random seed of other policies).
    next: AtomicU64,
}

impl Group {
    pub fn new(name: &str, config: &UpstreamConfig) -> Self {
        let list =
            config.backends.iter().map(|b| Arc::new(Backend::new(b.addr(), b.weight()))).collect();
        Self {
            name: name.to_string(),
            policy: ArcSwap::from_pointee(Policy::of(config)),
            backends: ArcSwap::from_pointee(list),
            next: AtomicU64::new(0),
        }
    }

    /// The balancing policy now (a cheap borrowed snapshot).
    pub fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.policy.load()
    }

    /// Changes the policy (a reload); backends, their state and counters stay.
    pub fn set_policy(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// Whether passive ejection may take one more backend out: it never leaves fewer than
    /// half of the group available (Envoy caps ejection the same way). When failures are the
    /// balancer's own or everyone's (overload, its source ports run out), ejecting every
    /// backend would turn a slowdown into a 503 for every request.
    pub fn may_eject(&self) -> bool {
        let list = self.backends.load();
        let available = list.iter().filter(|b| b.is_available()).count();
        available > 1 && (available - 1) * 2 >= list.len()
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

    /// Makes the backend set exactly `specs` (a reload: the file is the truth). A kept backend
    /// keeps its `Arc<Backend>` (in-flight count, health, counters) and takes the file's weight;
    /// a drain made at runtime ends. Returns what changed beyond the set itself (undrained
    /// backends), for the reload report.
    pub fn set_backends(&self, specs: &[crate::config::BackendSpec]) -> Vec<SocketAddr> {
        let mut undrained = Vec::new();
        self.backends.rcu(|cur| {
            undrained.clear();
            let list: Vec<Arc<Backend>> = specs
                .iter()
                .map(|s| match cur.iter().find(|b| b.addr == s.addr()) {
                    Some(b) => {
                        b.weight.store(s.weight(), Ordering::Relaxed);
                        if b.draining.swap(false, Ordering::Relaxed) {
                            undrained.push(b.addr);
                        }
                        b.clone()
                    }
                    None => Arc::new(Backend::new(s.addr(), s.weight())),
                })
                .collect();
            Arc::new(list)
        });
        undrained
    }

    /// Stops new work to `addr` (`draining`) or lets it take new work again.
    pub fn set_draining(&self, addr: SocketAddr, draining: bool) -> Result<(), GroupError> {
        self.member(addr)?.draining.store(draining, Ordering::Relaxed);
        Ok(())
    }

    /// Gives `addr` a new weight; its counters, health and drain state stay.
    pub fn set_weight(&self, addr: SocketAddr, weight: u32) -> Result<(), GroupError> {
        if weight == 0 {
            return Err(GroupError::ZeroWeight);
        }
        self.member(addr)?.weight.store(weight, Ordering::Relaxed);
        // A new set pointer: the L4 picker rebuilds its Maglev table for the new weight.
        self.backends.rcu(|cur| Arc::new(cur.to_vec()));
        Ok(())
    }

    fn member(&self, addr: SocketAddr) -> Result<Arc<Backend>, GroupError> {
        self.backends().iter().find(|b| b.addr == addr).cloned().ok_or(GroupError::NotFound(addr))
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

    #[tokio::test]
    async fn active_verdicts_and_passive_ejection_do_not_override_each_other() {
        let g = group();
        let b = g.backends()[0].clone();
        assert!(b.record_failure(1, Duration::from_millis(50), true), "ejected");
        b.checked_up.store(true, Ordering::Relaxed);
        assert!(!b.is_available(), "a passing check does not cut an ejection short");
        b.checked_up.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!b.ejected.load(Ordering::Relaxed), "the ejection ended");
        assert!(!b.is_available(), "its end does not bring back a backend the check says down");
        b.checked_up.store(true, Ordering::Relaxed);
        assert!(b.is_available());
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
        g.set_draining(a, true).unwrap();
        assert!(!g.backends()[0].is_available());
        g.set_draining(a, false).unwrap();
        assert!(g.backends()[0].is_available(), "undrained");
        let set = g.backends();
        g.set_weight(a, 4).unwrap();
        assert_eq!(g.backends()[0].weight(), 4);
        assert_eq!(g.backends()[0].in_flight.load(Ordering::Relaxed), 5, "a weight keeps counters");
        assert!(!Arc::ptr_eq(&set, &g.backends()), "a new set: the L4 table rebuilds");
        assert_eq!(g.set_weight(a, 0), Err(GroupError::ZeroWeight));
        assert_eq!(
            g.set_weight("10.9.9.9:80".parse().unwrap(), 2),
            Err(GroupError::NotFound("10.9.9.9:80".parse().unwrap()))
        );
        g.remove(a).unwrap();
        assert_eq!(g.remove(a), Err(GroupError::NotFound(a)));
        assert_eq!(g.backends().iter().map(|b| b.weight()).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn set_backends_keeps_kept_backends_and_their_state() {
        let g = group();
        let before = g.backends();
        before[0].in_flight.store(7, Ordering::Relaxed);
        before[1].checked_up.store(false, Ordering::Relaxed);
        before[1].draining.store(true, Ordering::Relaxed);
        let specs: Vec<crate::config::BackendSpec> = toml::from_str::<UpstreamConfig>(
            r#"backends = ["10.0.0.1:80", { addr = "10.0.0.2:80", weight = 5 }, "10.0.0.9:80"]"#,
        )
        .unwrap()
        .backends;
        assert_eq!(g.set_backends(&specs), ["10.0.0.2:80".parse().unwrap()], "undrained");
        let after = g.backends();
        assert!(Arc::ptr_eq(&before[0], &after[0]), "a kept backend: the same Arc");
        assert!(Arc::ptr_eq(&before[1], &after[1]), "a new weight: still the same Arc");
        assert_eq!(after[1].weight(), 5);
        assert!(!after[1].draining.load(Ordering::Relaxed), "the file is the truth");
        assert!(
            !after[1].checked_up.load(Ordering::Relaxed),
            "health carries over a weight change"
        );
        assert_eq!(after[2].addr, "10.0.0.9:80".parse().unwrap());
        let config: UpstreamConfig =
            toml::from_str("balance = \"least-conn\"\nbackends = [\"10.0.0.1:80\"]").unwrap();
        g.set_policy(Policy::of(&config));
        assert_eq!(g.policy().http, Balance::LeastConn);
        assert!(Arc::ptr_eq(&g.backends()[0], &before[0]), "a policy change keeps the backends");
    }
}
