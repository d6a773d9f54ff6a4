//! Active health checks: every backend of each `[health.NAME]` service or group is probed
//! every `interval`; `fall` failures in a row take it out of the XDP Maglev table and the
//! proxy's pool, `rise` successes bring it back. The state per backend is kept here for the
//! admin API, `lb backend list` and `/metrics`.
mod checker;
mod probe;

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use serde::{Deserialize, Serialize};

pub use checker::{Checker, Steer};
pub use probe::probe;

/// What the checks decided about one backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendHealth {
    pub up: bool,
    /// Results in a row that disagree with `up` (toward `rise` or `fall`).
    pub streak: u32,
    /// Checks run so far.
    pub checks: u64,
    /// Times `up` changed.
    pub changes: u64,
    /// Why the last failed check failed.
    pub last_error: Option<String>,
}

impl Default for BackendHealth {
    /// A backend starts up: checks take it out, so a restart never blackholes a service.
    fn default() -> Self {
        Self { up: true, streak: 0, checks: 0, changes: 0, last_error: None }
    }
}

impl BackendHealth {
    /// Counts one check result; returns true when `up` changed.
    pub fn observe(&mut self, result: Result<(), String>, rise: u32, fall: u32) -> bool {
        self.checks += 1;
        let ok = result.is_ok();
        if let Err(e) = result {
            self.last_error = Some(e);
        }
        if ok == self.up {
            self.streak = 0;
            return false;
        }
        self.streak += 1;
        if self.streak >= if self.up { fall } else { rise } {
            self.up = ok;
            self.streak = 0;
            self.changes += 1;
            return true;
        }
        false
    }
}

/// The health of every checked backend, by (service or group, address).
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<(String, SocketAddr), BackendHealth>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, SocketAddr), BackendHealth>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The checked state of one backend; `None` when it is not checked.
    pub fn get(&self, name: &str, addr: SocketAddr) -> Option<BackendHealth> {
        self.lock().get(&(name.to_string(), addr)).cloned()
    }

    /// Every checked backend.
    pub fn all(&self) -> Vec<(String, SocketAddr, BackendHealth)> {
        let mut v: Vec<_> =
            self.lock().iter().map(|((n, a), h)| (n.clone(), *a, h.clone())).collect();
        v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        v
    }

    /// Counts a result; returns (up, changed).
    fn observe(
        &self,
        name: &str,
        addr: SocketAddr,
        result: Result<(), String>,
        rise: u32,
        fall: u32,
    ) -> (bool, bool) {
        let mut map = self.lock();
        let h = map.entry((name.to_string(), addr)).or_default();
        let changed = h.observe(result, rise, fall);
        (h.up, changed)
    }

    /// Forgets the backends of `name` not in `keep` (removed ones), or all of `name`.
    fn retain(&self, name: &str, keep: Option<&[SocketAddr]>) {
        self.lock().retain(|(n, a), _| n != name || keep.is_some_and(|k| k.contains(a)));
    }

    /// Forgets every name not in `names` (a reload removed its check).
    pub fn retain_names(&self, names: &[&String]) {
        self.lock().retain(|(n, _), _| names.contains(&n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = BackendHealth::default();
        let fail = || Err("refused".to_string());
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(Ok(()), 2, 3), "a success resets the streak");
        assert!(!h.observe(fail(), 2, 3));
        assert!(!h.observe(fail(), 2, 3));
        assert!(h.observe(fail(), 2, 3), "third failure in a row");
        assert!(!h.up);
        assert_eq!(h.last_error.as_deref(), Some("refused"));
        assert!(!h.observe(Ok(()), 2, 3));
        assert!(!h.observe(fail(), 2, 3), "a failure resets the rise streak");
        assert!(!h.observe(Ok(()), 2, 3));
        assert!(h.observe(Ok(()), 2, 3));
        assert!(h.up);
        assert_eq!((h.checks, h.changes), (10, 2));
    }

    #[test]
    fn registry_forgets_removed_backends() {
        let r = Registry::default();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        r.observe("web", a, Ok(()), 1, 1);
        r.observe("web", b, Err("x".into()), 1, 1);
        assert!(!r.get("web", b).unwrap().up);
        r.retain("web", Some(&[a]));
        assert!(r.get("web", b).is_none());
        r.retain_names(&[]);
        assert!(r.all().is_empty());
    }
}
