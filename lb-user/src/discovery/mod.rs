//! Backend sets that come from an API instead of the config file (`backends_from`): one
//! watcher task per service, each change applied through the same path as `lb backend`, and
//! whether each source is `synced` or `stale` for `lb status`.
pub mod kubernetes;
pub mod reconcile;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    config::{BackendsFrom, Config},
    control::state::{Change, State},
};
use reconcile::{Step, Want};

/// Where one service's backends come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The XDP service or upstream group.
    pub service: String,
    pub from: BackendsFrom,
    /// `[kubernetes] kubeconfig`; `None`: in-cluster credentials.
    pub kubeconfig: Option<PathBuf>,
    /// Only IPv4 (`Some(true)`) or IPv6 (`Some(false)`) addresses: an XDP service's VIP
    /// family (full NAT keeps the family); an upstream group takes both.
    pub family: Option<bool>,
}

/// Every `backends_from` of `config`.
pub fn sources(config: &Config) -> Vec<Source> {
    let kubeconfig = config.kubernetes.kubeconfig.clone();
    let xdp = config.xdp.iter().flat_map(|x| &x.services).filter_map(|s| {
        let from = s.backends_from.clone()?;
        Some((s.name.clone(), from, Some(s.vip.is_ipv4())))
    });
    let groups = config
        .upstream
        .iter()
        .filter_map(|(name, u)| Some((name.clone(), u.backends_from.clone()?, None)));
    xdp.chain(groups)
        .map(|(service, from, family)| Source {
            service,
            from,
            kubeconfig: kubeconfig.clone(),
            family,
        })
        .collect()
}

/// How one source stands, as `/status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceStatus {
    pub service: String,
    /// `kubernetes:NAMESPACE/SERVICE port NAME`.
    pub source: String,
    pub state: SourceState,
    /// Ready backends the source listed last (drained ones not counted).
    pub backends: usize,
    /// Why it is stale.
    #[serde(default)]
    pub error: Option<String>,
}

/// Whether a source's set is the API's latest.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceState {
    /// The set is what the API said last.
    Synced,
    /// The API cannot be reached, or has not answered yet: the last known set keeps serving.
    Stale,
}

impl std::fmt::Display for SourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Synced => "synced",
            Self::Stale => "stale",
        })
    }
}

/// Why a source is stale before its first answer.
const NOT_YET: &str = "no list from the API yet";

/// The running watchers and what they report; lives in [`State`].
pub struct Registry {
    status: Mutex<BTreeMap<String, SourceStatus>>,
    tasks: Mutex<Vec<(Source, JoinHandle<()>)>>,
    /// Bumped after a reload, so each watcher puts its set back.
    resync: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { status: Mutex::default(), tasks: Mutex::default(), resync: watch::channel(0).0 }
    }
}

impl Registry {
    fn status(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SourceStatus>> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every source, by service name.
    pub fn statuses(&self) -> Vec<SourceStatus> {
        self.status().values().cloned().collect()
    }

    pub fn resyncs(&self) -> watch::Receiver<u64> {
        self.resync.subscribe()
    }

    /// Makes every watcher apply its set again (after a reload, or once this process took the
    /// XDP maps over from another).
    pub fn resync(&self) {
        self.resync.send_modify(|n| *n += 1);
    }

    fn set(&self, service: &str, f: impl FnOnce(&mut SourceStatus)) {
        if let Some(s) = self.status().get_mut(service) {
            f(s);
        }
    }

    /// The API answered and `backends` is its set.
    pub fn synced(&self, service: &str, backends: usize) {
        self.set(service, |s| {
            if s.state != SourceState::Synced {
                log::info!("backends of {service} from {}: synced", s.source);
            }
            s.state = SourceState::Synced;
            s.backends = backends;
            s.error = None;
        });
    }

    /// The API failed (`why`); the last known set keeps serving.
    pub fn stale(&self, service: &str, why: &str) {
        self.set(service, |s| {
            if s.state != SourceState::Stale || s.error.as_deref() == Some(NOT_YET) {
                log::warn!(
                    "backends of {service} from {}: stale, keeping the last set: {why}",
                    s.source
                );
            }
            s.state = SourceState::Stale;
            s.error = Some(why.into());
        });
    }
}

/// Starts a watcher for each source of the running config and stops those it no longer has
/// (at start, and after each reload); the others keep running and put their set back.
pub fn sync(state: &Arc<State>) {
    let wanted = sources(&state.config.load());
    let reg = &state.discovery;
    let mut tasks = reg.tasks.lock().unwrap_or_else(|e| e.into_inner());
    tasks.retain(|(src, task)| {
        let keep = wanted.contains(src);
        if !keep {
            task.abort();
            reg.status().remove(&src.service);
        }
        keep
    });
    for src in wanted {
        if tasks.iter().any(|(s, _)| *s == src) {
            continue;
        }
        let status = SourceStatus {
            service: src.service.clone(),
            source: format!("kubernetes:{} port {}", src.from.kubernetes, src.from.port),
            state: SourceState::Stale,
            backends: 0,
            error: Some(NOT_YET.into()),
        };
        reg.status().insert(src.service.clone(), status);
        let task = tokio::spawn(kubernetes::run(state.clone(), src.clone()));
        tasks.push((src, task));
    }
    reg.resync();
}

/// Makes `source`'s service serve exactly `want`; returns how many backends that is. Holds the
/// reload lock, so a reload never writes a set read before one of these changes.
pub async fn apply(state: &State, source: &Source, want: &BTreeMap<SocketAddr, Want>) -> usize {
    let up = want.values().filter(|w| **w == Want::Up).count();
    // An XDP service while another process writes the maps (an overlapping start or an
    // upgrade): that one applies the API's set; this one catches up once it takes them over.
    if source.family.is_some() && (state.dataplane.get().is_none() || state.xdp_paused()) {
        return up;
    }
    let _serial = state.runtime.lock().await;
    let service = &source.service;
    let have: Vec<(SocketAddr, bool)> = match state.stats(Some(service)) {
        Ok(stats) => stats
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|b| (b.addr, b.state == "draining"))
            .collect(),
        Err(e) => {
            log::warn!("backends of {service}: {e}");
            return 0;
        }
    };
    for (addr, step) in reconcile::diff(&have, want) {
        let done = match step {
            Step::Add => state.change(service, addr, Change::Add(1)),
            Step::Remove => state.change(service, addr, Change::Remove),
            Step::Drain => state.change(service, addr, Change::Drain),
            Step::Undrain => state.change(service, addr, Change::Undrain),
        };
        if let Err(e) = done {
            log::warn!(
                "backend {addr} of {service} from {}: {step:?}: {e}",
                source.from.kubernetes
            );
        }
    }
    up
}

/// `services` with the backends each `backends_from` service serves now in place of its
/// (empty) list, so that `apply` keeps the API's set: a reload keeps it as it is (drains and
/// all); a start on adopted maps keeps the previous run's backends, and their tracked flows,
/// until the first list says otherwise.
pub fn with_current_backends(
    dp: &crate::dataplane::Dataplane,
    services: &[crate::config::ServiceConfig],
) -> Vec<crate::config::ServiceConfig> {
    use crate::config::BackendSpec;
    let mut out = services.to_vec();
    for s in out.iter_mut().filter(|s| s.backends_from.is_some()) {
        s.backends = match dp.tables().backends(&s.name) {
            Ok(list) => list
                .iter()
                .map(|b| BackendSpec::Weighted { addr: b.addr, weight: b.weight })
                .collect(),
            Err(_) => {
                let adopted = dp.tables().recovered_backends(s.vip, s.protocol);
                adopted.into_iter().map(BackendSpec::Addr).collect()
            }
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_the_backends_from_of_the_config_with_their_family() {
        let c = Config::parse(
            r#"
            [kubernetes]
            kubeconfig = "/k"
            [xdp]
            interfaces = ["eth0"]
            [[xdp.service]]
            name = "web6"
            vip = "[2001:db8::1]:80"
            backends_from = { kubernetes = "prod/web", port = "http" }
            [[xdp.service]]
            name = "static"
            vip = "10.0.0.1:80"
            backends = ["10.1.0.2:80"]
            [upstream.api]
            backends_from = { kubernetes = "prod/api", port = "8080" }
            "#,
        )
        .unwrap();
        let got: Vec<(String, Option<bool>)> =
            sources(&c).into_iter().map(|s| (s.service, s.family)).collect();
        assert_eq!(got, [("web6".to_string(), Some(false)), ("api".to_string(), None)]);
        assert!(sources(&c).iter().all(|s| s.kubeconfig.as_deref() == Some("/k".as_ref())));
    }
}
