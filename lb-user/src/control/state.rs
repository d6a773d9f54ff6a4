//! What the admin API reports and changes: the running daemon's shared state.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::reload::Runtime;
use crate::{
    config::Config,
    dataplane::{
        Dataplane, DataplaneError,
        changes::HostChange,
        tables::TableError,
        writer::{self, WriterLock},
    },
    health::{self, BackendHealth},
    l4::ListenerSnapshot,
    upstream::{GroupError, Groups},
};

/// How long a process whose successor died waits for the successor's writer lock to go.
const RETAKE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Shared by the admin handlers. The data plane sits behind a mutex: map syscalls happen on
/// admin requests and health changes, never on a packet or request path. The config and the
/// groups are swapped whole by a reload.
pub struct State {
    pub config: ArcSwap<Config>,
    /// Set once this process writes the XDP maps: at start, or later when another process
    /// held them (an overlapping start) and let go.
    pub dataplane: OnceLock<Mutex<Dataplane>>,
    pub groups: ArcSwap<Groups>,
    /// Where the config was read from; a reload reads it again.
    pub config_path: Option<PathBuf>,
    /// What the health checks decided, per backend.
    pub health: Arc<health::Registry>,
    /// Config applied, XDP attached, listeners bound; false again once shutdown starts.
    pub ready: AtomicBool,
    /// The L7 listeners and health checkers; its lock also serializes reloads.
    pub runtime: tokio::sync::Mutex<Runtime>,
    /// The right to write the XDP maps (`dataplane::writer`), while this process has it;
    /// without it (see [`State::xdp_paused`]) it writes them no more.
    pub xdp_writer: Mutex<Option<WriterLock>>,
    /// The `backends_from` watchers and whether each is synced.
    pub discovery: crate::discovery::Registry,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("no service or upstream group named {0:?}; `lb backend list` shows them")]
    NotFound(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(
        "XDP service {0:?}: another lb process writes the XDP maps now (one that took over with `lb run --upgrade`, or the one this process waits to take over from; `lb status` says which): send the change to it"
    )]
    HandedOver(String),
}

impl StateError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            StateError::NotFound(_) => 404,
            StateError::Dataplane(DataplaneError::Table(
                TableError::NoService(_) | TableError::NoBackend { .. },
            )) => 404,
            StateError::Group(GroupError::NotFound(_)) => 404,
            StateError::Dataplane(DataplaneError::Table(
                TableError::Exists { .. } | TableError::Family { .. } | TableError::ZeroWeight,
            )) => 409,
            StateError::Group(GroupError::Exists(_) | GroupError::ZeroWeight) => 409,
            StateError::HandedOver(_) => 503,
            _ => 500,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub xdp: Vec<Attachment>,
    /// True when this daemon adopted a pinned program and maps from a previous run.
    pub adopted: bool,
    /// Config applied, XDP attached, listeners bound.
    #[serde(default)]
    pub ready: bool,
    /// Services and groups that cannot serve: no backend up (L7 answers 503, XDP drops).
    #[serde(default)]
    pub unavailable: Vec<String>,
    /// What `lb run` changed on the host (sysctls, VIP addresses, neighbours), with the values
    /// before; `lb detach` undoes them.
    #[serde(default)]
    pub host: Vec<HostChange>,
    /// The daemon's process id (which process answers, during an upgrade).
    #[serde(default)]
    pub pid: u32,
    /// Who writes the XDP maps: "this process", or why not (empty without `[xdp]`).
    #[serde(default)]
    pub xdp_writer: String,
    /// With `[announce]`: each VIP, announced or withdrawn.
    #[serde(default)]
    pub announce: Vec<super::announce::Announcement>,
    /// How each TCP `[[tcp.listener]]` relays: `kernel`, `splice` or `copy`, with why the
    /// kernel relay is not used when it is not.
    #[serde(default)]
    pub relays: std::collections::BTreeMap<String, String>,
    /// Each service whose backends come from an API (`backends_from`): `synced` or `stale`.
    #[serde(default)]
    pub sources: Vec<crate::discovery::SourceStatus>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub interface: String,
    pub mode: String,
    /// How the link came about: `new`, `updated in place` (a previous run's pinned link), or
    /// `replaced` (the pinned one was dead: its interface deleted or re-created).
    #[serde(default)]
    pub link: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub reasons: Vec<(String, u64)>,
    /// The userspace L4 listeners' counters (`[[tcp.listener]]`), in config order; only in the
    /// full `/stats`, not for one service.
    #[serde(default)]
    pub l4: Vec<ListenerSnapshot>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceStats {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Clone)]
pub struct BackendStats {
    pub addr: SocketAddr,
    pub weight: u32,
    pub state: String,
    /// Maglev slots (XDP) owned now.
    pub slots: u32,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
    /// In flight (proxied groups).
    pub active: u64,
    /// Responses relayed from this backend (proxied groups).
    #[serde(default)]
    pub requests: u64,
    /// What the health checks decided (absent when the service or group is not checked).
    #[serde(default)]
    pub health: Option<BackendHealth>,
}

/// A backend change requested through the admin API.
#[derive(Debug, Deserialize, Serialize)]
pub struct AddBackend {
    pub addr: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
}

/// The body of `PUT /services/NAME/backends/ADDR/weight`.
#[derive(Debug, Deserialize, Serialize)]
pub struct SetWeight {
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The kinds of backend change.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    /// A new backend with this weight.
    Add(u32),
    Remove,
    /// No new flows; open ones finish.
    Drain,
    /// The end of a drain.
    Undrain,
    /// A new weight for a backend already there.
    Weight(u32),
}

impl State {
    /// The state of a daemon that has not started its listeners yet (not ready).
    pub fn new(
        config: Config,
        dataplane: Option<(Dataplane, WriterLock)>,
        groups: Groups,
        config_path: Option<PathBuf>,
    ) -> Self {
        let (dataplane, writer) = match dataplane {
            Some((dp, lock)) => (OnceLock::from(Mutex::new(dp)), Some(lock)),
            None => (OnceLock::new(), None),
        };
        Self {
            config: ArcSwap::from_pointee(config),
            dataplane,
            groups: ArcSwap::from_pointee(groups),
            config_path,
            health: Arc::default(),
            ready: AtomicBool::new(false),
            runtime: tokio::sync::Mutex::new(Runtime::default()),
            xdp_writer: Mutex::new(writer),
            discovery: crate::discovery::Registry::default(),
        }
    }

    pub fn dataplane(&self) -> Option<std::sync::MutexGuard<'_, Dataplane>> {
        self.dataplane.get().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, Option<WriterLock>> {
        self.xdp_writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This process writes the XDP maps from now on: the data plane it started once another
    /// process let go of them.
    pub fn install_dataplane(&self, dp: Dataplane, lock: WriterLock) {
        *self.writer() = Some(lock);
        if self.dataplane.set(Mutex::new(dp)).is_err() {
            log::warn!("a data plane was installed twice; the first stays");
        }
    }

    /// True while another process owns the XDP maps (one taking over with `lb run
    /// --upgrade`, or the one this process overlaps): this one holds no writer lock, and
    /// refuses backend changes, skips health writes and refuses reloads.
    pub fn xdp_paused(&self) -> bool {
        self.config.load().xdp.is_some() && self.writer().is_none()
    }

    /// Stops writing the XDP maps and lets another process take them (a successor taking
    /// over, or an overlapping process once this one stops).
    pub fn release_xdp(&self) {
        if let Some(lock) = self.writer().take() {
            log::info!("XDP maps under {} released to the next writer", lock.path().display());
        }
    }

    /// Writes the XDP maps again after a successor went away before it was ready: only if no
    /// other process took them meanwhile. A successor that is still exiting may hold the lock
    /// a moment longer than its socket, hence the wait.
    pub async fn retake_xdp(&self) {
        let Some(pin) = self.config.load().xdp.as_ref().map(|x| x.pin_path.clone()) else {
            return;
        };
        let wait = tokio::time::timeout(RETAKE_WAIT, WriterLock::wait(&pin)).await;
        match wait {
            Ok(Ok(lock)) => *self.writer() = Some(lock),
            Err(_) => log::warn!(
                "XDP maps under {}: another lb (pid {}) writes them now; this one leaves them alone",
                pin.display(),
                writer::holder(&pin).unwrap_or(0)
            ),
            Ok(Err(e)) => {
                log::warn!("XDP maps under {}: cannot take the writer lock: {e}", pin.display())
            }
        }
    }

    fn xdp_writer_status(&self) -> String {
        let Some(xdp) = &self.config.load().xdp else { return String::new() };
        if self.writer().is_some() {
            return "this process".into();
        }
        match writer::holder(&xdp.pin_path) {
            Some(pid) if pid != std::process::id() => format!("pid {pid}"),
            _ => "nobody (handed over)".into(),
        }
    }

    pub fn status(&self) -> Status {
        let config = self.config.load();
        let (xdp, adopted, host, announce) = match self.dataplane() {
            Some(dp) => (
                dp.attached()
                    .iter()
                    .map(|a| Attachment {
                        interface: a.interface.clone(),
                        mode: a.mode.as_str().into(),
                        link: a.linked.as_str().into(),
                    })
                    .collect(),
                dp.adopted,
                dp.host().changes().to_vec(),
                super::announce::status(&dp, &config),
            ),
            None => (Vec::new(), false, Vec::new(), Vec::new()),
        };
        let unavailable = match self.stats(None) {
            Ok(stats) => stats
                .services
                .iter()
                .filter(|s| !s.backends.iter().any(|b| b.state == "up"))
                .map(|s| format!("{}: no backend up", s.name))
                .collect(),
            Err(e) => vec![e.to_string()],
        };
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            xdp,
            adopted,
            ready: self.ready.load(Ordering::Relaxed),
            unavailable,
            host,
            pid: std::process::id(),
            xdp_writer: self.xdp_writer_status(),
            announce,
            relays: self.relays(),
            sources: self.discovery.statuses(),
        }
    }

    fn relays(&self) -> std::collections::BTreeMap<String, String> {
        let config = self.config.load();
        let names: Vec<&str> = config.tcp.listeners.iter().map(|l| l.name.as_str()).collect();
        crate::l4::stats::registered(&names)
            .into_iter()
            .filter_map(|l| Some((l.name, l.relay?)))
            .collect()
    }

    fn xdp_service_names(&self) -> Vec<String> {
        let config = self.config.load();
        config.xdp.iter().flat_map(|x| x.services.iter().map(|s| s.name.clone())).collect()
    }

    /// Changes a backend of an XDP service or of an upstream group.
    pub fn change(
        &self,
        service: &str,
        addr: SocketAddr,
        change: Change,
    ) -> Result<(), StateError> {
        if let Some(mut dp) = self.dataplane()
            && dp.tables().services().iter().any(|(n, _)| n == service)
        {
            if self.xdp_paused() {
                return Err(StateError::HandedOver(service.into()));
            }
            match change {
                Change::Add(w) => {
                    dp.add_backend(service, addr, w)?;
                    dp.host_mut().keep_neighbour(addr.ip());
                }
                Change::Remove => dp.remove_backend(service, addr)?,
                Change::Drain => dp.set_draining(service, addr, true)?,
                Change::Undrain => dp.set_draining(service, addr, false)?,
                Change::Weight(w) => dp.set_weight(service, addr, w)?,
            }
            log::info!("backend {addr} of XDP service {service}: {change:?}");
            return Ok(());
        }
        if self.dataplane.get().is_none() && self.xdp_service_names().iter().any(|n| n == service) {
            return Err(StateError::HandedOver(service.into()));
        }
        let groups = self.groups.load();
        let group = groups.get(service).ok_or_else(|| StateError::NotFound(service.into()))?;
        match change {
            Change::Add(w) => group.add(addr, w)?,
            Change::Remove => group.remove(addr)?,
            Change::Drain => group.set_draining(addr, true)?,
            Change::Undrain => group.set_draining(addr, false)?,
            Change::Weight(w) => group.set_weight(addr, w)?,
        }
        log::info!("backend {addr} of upstream group {service}: {change:?}");
        Ok(())
    }

    /// Every service (XDP first, then upstream groups) with counters and backends; `only`
    /// restricts to one name.
    pub fn stats(&self, only: Option<&str>) -> Result<Stats, StateError> {
        let mut services = Vec::new();
        let mut reasons = Vec::new();
        if let Some(dp) = self.dataplane() {
            let ids = dp.tables().services();
            let config = self.config.load();
            for s in config.xdp.iter().flat_map(|x| x.services.iter()) {
                if only.is_some_and(|o| o != s.name) {
                    continue;
                }
                let Some((_, id)) = ids.iter().find(|(n, _)| *n == s.name) else { continue };
                let c = dp.service_counter(*id)?;
                let backends = dp
                    .backends(&s.name)?
                    .into_iter()
                    .map(|(v, c)| BackendStats {
                        addr: v.addr,
                        weight: v.weight,
                        state: if v.draining {
                            "draining"
                        } else if !v.healthy {
                            "down"
                        } else {
                            "up"
                        }
                        .into(),
                        slots: v.slots,
                        packets: c.packets,
                        bytes: c.bytes,
                        flows: c.flows,
                        active: 0,
                        requests: 0,
                        health: self.health.get(&s.name, v.addr),
                    })
                    .collect();
                services.push(ServiceStats {
                    name: s.name.clone(),
                    vip: s.vip.to_string(),
                    protocol: format!("{:?}", s.protocol).to_lowercase(),
                    packets: c.packets,
                    bytes: c.bytes,
                    flows: c.flows,
                    backends,
                });
            }
            reasons = dp.stats()?.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
        }
        let xdp_names = self.xdp_service_names();
        for (name, group) in self.groups.load().iter() {
            if only.is_some_and(|o| o != name) || xdp_names.contains(name) {
                continue;
            }
            let backends = group
                .backends()
                .iter()
                .map(|b| BackendStats {
                    addr: b.addr,
                    weight: b.weight(),
                    state: if b.draining.load(Ordering::Relaxed) {
                        "draining"
                    } else if !b.checked_up.load(Ordering::Relaxed) {
                        "down"
                    } else if b.ejected.load(Ordering::Relaxed) {
                        // Passive: the proxy saw consecutive failures (eject_after).
                        "ejected"
                    } else {
                        "up"
                    }
                    .into(),
                    slots: 0,
                    packets: 0,
                    bytes: 0,
                    flows: 0,
                    active: b.in_flight.load(Ordering::Relaxed),
                    requests: b.requests.snapshot().count,
                    health: self.health.get(name, b.addr),
                })
                .collect();
            services.push(ServiceStats {
                name: name.clone(),
                vip: String::new(),
                protocol: "proxy".into(),
                packets: 0,
                bytes: 0,
                flows: 0,
                backends,
            });
        }
        if let Some(o) = only
            && services.is_empty()
        {
            return Err(StateError::NotFound(o.into()));
        }
        let l4 = if only.is_none() {
            let config = self.config.load();
            let names: Vec<&str> = config.tcp.listeners.iter().map(|l| l.name.as_str()).collect();
            crate::l4::stats::registered(&names)
        } else {
            Vec::new()
        };
        Ok(Stats { services, reasons, l4 })
    }
}

/// The health checks steer the XDP tables and the upstream groups through the state.
impl health::Steer for State {
    fn backends(&self, name: &str) -> Option<Vec<SocketAddr>> {
        if let Some(dp) = self.dataplane()
            && let Ok(list) = dp.tables().backends(name)
        {
            return Some(list.iter().map(|b| b.addr).collect());
        }
        let groups = self.groups.load();
        Some(groups.get(name)?.backends().iter().map(|b| b.addr).collect())
    }

    fn set_health(&self, name: &str, addr: SocketAddr, up: bool, _changed: bool) {
        if let Some(mut dp) = self.dataplane()
            && dp.tables().backends(name).is_ok()
        {
            if self.xdp_paused() {
                return;
            }
            // Idempotent: only a change rewrites the backend's Maglev slots.
            if let Err(e) = dp.set_health(name, addr, up) {
                log::debug!("health: {name} {addr}: {e}");
            }
            return;
        }
        let groups = self.groups.load();
        let Some(b) =
            groups.get(name).and_then(|g| g.backends().iter().find(|b| b.addr == addr).cloned())
        else {
            return;
        };
        // The check's own verdict, every round; passive ejection has a flag of its own.
        b.checked_up.store(up, Ordering::Relaxed);
    }
}
