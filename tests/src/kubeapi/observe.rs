//! What `lb` says about a `backends_from` service: its backends and their states (over the
//! admin API, `lb backend list`, or one process's own admin socket), its source in `/status`,
//! and a sampler that records every set served while something happens.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{lb::Lb, netns::Netns, wait_until};

/// A service's backends and their states (`up`, `draining`, ...).
pub type Listed = BTreeMap<SocketAddr, String>;

/// The backends of the first service in a `/services/NAME` body (what `lb backend list NAME
/// --json` prints).
pub fn backends(v: &Value) -> Listed {
    let list = v["services"][0]["backends"].as_array().into_iter().flatten();
    list.filter_map(|b| Some((b["addr"].as_str()?.parse().ok()?, b["state"].as_str()?.into())))
        .collect()
}

/// `service`'s backends from the admin API (empty when it does not answer).
pub fn listed(lb: &Lb, service: &str) -> Listed {
    let body = lb.admin().get(&format!("/services/{service}")).ok();
    body.and_then(|b| serde_json::from_str(&b).ok()).map(|v| backends(&v)).unwrap_or_default()
}

/// `lb backend list SERVICE --json` over one process's own admin socket (when two overlap).
pub fn listed_over(ns: &Netns, socket: &Path, service: &str) -> Listed {
    let Ok(lb) = crate::lb::lb_binary() else { return Listed::new() };
    let (lb, admin) = (lb.display().to_string(), format!("unix:{}", socket.display()));
    let out = ns.exec(&[&lb, "backend", "list", service, "--admin", &admin, "--json"]);
    out.ok().and_then(|o| serde_json::from_str(&o).ok()).map(|v| backends(&v)).unwrap_or_default()
}

/// Waits (at most `within`) until the admin API lists exactly `expected`, then checks that
/// `lb backend list` says the same; panics naming `what` otherwise.
pub fn expect_listed(lb: &Lb, service: &str, expected: &Listed, within: Duration, what: &str) {
    let start = Instant::now();
    let ok = wait_until(within, || listed(lb, service) == *expected);
    let (after, now) = (start.elapsed(), listed(lb, service));
    assert!(ok, "{what}: after {after:?} lb lists {now:?}, want {expected:?}");
    let cli = lb.json(&["backend", "list", service]).expect("lb backend list");
    assert_eq!(backends(&cli), *expected, "{what}: lb backend list");
}

/// The first (in these tests, the one) source in `/status`.
pub fn source(lb: &Lb) -> Value {
    let status = lb.admin().get("/status").ok();
    let status: Value = status.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    status["sources"][0].clone()
}

/// Its state: `synced` or `stale` (empty when lb does not answer).
pub fn source_state(lb: &Lb) -> String {
    source(lb)["state"].as_str().unwrap_or("").to_string()
}

/// Samples `service`'s backends every 10 ms until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Listed>>,
}

impl Sampler {
    pub fn start(lb: &Lb, service: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (admin, path, s) = (lb.admin(), format!("/services/{service}"), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let body = admin.get(&path).ok();
                if let Some(v) = body.and_then(|b| serde_json::from_str::<Value>(&b).ok()) {
                    seen.push(backends(&v));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        Self { stop, thread }
    }

    /// Every set seen, in order.
    pub fn finish(self) -> Vec<Listed> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler thread")
    }
}
