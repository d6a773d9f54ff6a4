//! The check loops: one task per checked service or group, probing its current backends (so
//! backends added at runtime are checked too) with bounded concurrency, and steering the data
//! planes on every decision.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use tokio::{
    sync::Semaphore,
    task::{JoinHandle, JoinSet},
    time::MissedTickBehavior,
};

use super::{Registry, probe};
use crate::config::HealthConfig;

/// Checks in flight at once, over every service and group.
const MAX_CONCURRENT: usize = 256;

/// What the checks steer: implemented by the daemon's state (XDP tables, upstream groups).
pub trait Steer: Send + Sync + 'static {
    /// The current backends of a service or group; `None` when it no longer exists.
    fn backends(&self, name: &str) -> Option<Vec<SocketAddr>>;
    /// Applies the check's verdict. Called after every round (so a backend re-added is set
    /// again); `changed` is true on a transition. Passive ejection is not the check's to undo.
    fn set_health(&self, name: &str, addr: SocketAddr, up: bool, changed: bool);
}

/// The running check loops; dropping it stops them.
pub struct Checker {
    tasks: Vec<JoinHandle<()>>,
}

impl Checker {
    /// Starts a loop per configured check.
    pub fn start(
        checks: &BTreeMap<String, HealthConfig>,
        steer: Arc<dyn Steer>,
        registry: Arc<Registry>,
    ) -> Self {
        let names: Vec<&String> = checks.keys().collect();
        registry.retain_names(&names);
        let limit = Arc::new(Semaphore::new(MAX_CONCURRENT));
        let tasks = checks
            .iter()
            .map(|(name, config)| {
                tokio::spawn(run(
                    name.clone(),
                    Arc::new(config.clone()),
                    steer.clone(),
                    registry.clone(),
                    limit.clone(),
                ))
            })
            .collect();
        Self { tasks }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn run(
    name: String,
    config: Arc<HealthConfig>,
    steer: Arc<dyn Steer>,
    registry: Arc<Registry>,
    limit: Arc<Semaphore>,
) {
    let mut tick = tokio::time::interval(config.interval());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(addrs) = steer.backends(&name) else {
            registry.retain(&name, None);
            continue;
        };
        registry.retain(&name, Some(&addrs));
        let mut probes = JoinSet::new();
        for addr in addrs {
            let (config, limit) = (config.clone(), limit.clone());
            probes.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let result =
                    match tokio::time::timeout(config.timeout(), probe(&config, addr)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {:?}", config.timeout())),
                    };
                (addr, result)
            });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((addr, result)) = done else { continue };
            let error = result.as_ref().err().cloned();
            let (up, changed) = registry.observe(&name, addr, result, config.rise, config.fall);
            if changed && up {
                log::info!("health: {name} backend {addr} is up again");
            } else if changed {
                log::warn!(
                    "health: {name} backend {addr} is down ({}); no new flows or requests go to it",
                    error.unwrap_or_default()
                );
            }
            steer.set_health(&name, addr, up, changed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Two backends: one listening, one not.
    struct Fake {
        addrs: Vec<SocketAddr>,
        calls: Mutex<Vec<(SocketAddr, bool, bool)>>,
    }

    impl Steer for Fake {
        fn backends(&self, name: &str) -> Option<Vec<SocketAddr>> {
            (name == "web").then(|| self.addrs.clone())
        }
        fn set_health(&self, _: &str, addr: SocketAddr, up: bool, changed: bool) {
            self.calls.lock().unwrap().push((addr, up, changed));
        }
    }

    #[tokio::test]
    async fn a_dead_backend_goes_down_within_interval_times_fall() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (live_addr, dead_addr) = (live.local_addr().unwrap(), dead.local_addr().unwrap());
        drop(dead);
        let fake = Arc::new(Fake { addrs: vec![live_addr, dead_addr], calls: Mutex::default() });
        let checks: BTreeMap<String, HealthConfig> = toml::from_str(
            "[web]\ntype = \"tcp\"\ninterval = 0.05\ntimeout = 0.05\nfall = 2\nrise = 1",
        )
        .unwrap();
        let registry = Arc::new(Registry::default());
        let checker = Checker::start(&checks, fake.clone(), registry.clone());
        let start = std::time::Instant::now();
        while registry.get("web", dead_addr).is_none_or(|h| h.up) {
            assert!(start.elapsed() < std::time::Duration::from_secs(2), "not down in time");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        drop(checker);
        assert!(registry.get("web", live_addr).unwrap().up);
        let calls = fake.calls.lock().unwrap();
        assert!(calls.contains(&(dead_addr, false, true)), "{calls:?}");
        assert!(!calls.iter().any(|c| c.0 == live_addr && !c.1));
    }
}
