//! What the admin API reports and changes: the running daemon's shared state.
use std::{net::SocketAddr, sync::Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    config::Config,
    dataplane::{Dataplane, DataplaneError, tables::TableError},
    upstream::{GroupError, Groups},
};

/// Shared by the admin handlers. The data plane sits behind a mutex: map syscalls happen on
/// admin requests and health changes, never on a packet or request path.
pub struct State {
    pub config: Config,
    pub dataplane: Option<Mutex<Dataplane>>,
    pub groups: Groups,
}

#[derive(Debug, Error)]
pub enum StateError {
    #[error("no service or upstream group named {0:?}; `lb backend list` shows them")]
    NotFound(String),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Group(#[from] GroupError),
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
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Attachment {
    pub interface: String,
    pub mode: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub reasons: Vec<(String, u64)>,
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
}

/// A backend change requested through the admin API.
#[derive(Debug, Deserialize, Serialize)]
pub struct AddBackend {
    pub addr: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The kinds of backend change.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    Add(u32),
    Remove,
    Drain,
}

impl State {
    fn dataplane(&self) -> Option<std::sync::MutexGuard<'_, Dataplane>> {
        self.dataplane.as_ref().map(|d| d.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn status(&self) -> Status {
        let (xdp, adopted) = match self.dataplane() {
            Some(dp) => (
                dp.attached()
                    .iter()
                    .map(|(i, m)| Attachment { interface: i.clone(), mode: m.as_str().into() })
                    .collect(),
                dp.adopted,
            ),
            None => (Vec::new(), false),
        };
        Status { version: env!("CARGO_PKG_VERSION").into(), xdp, adopted }
    }

    fn xdp_service_names(&self) -> Vec<String> {
        self.config.xdp.iter().flat_map(|x| x.services.iter().map(|s| s.name.clone())).collect()
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
            match change {
                Change::Add(w) => {
                    dp.add_backend(service, addr, w)?;
                    crate::dataplane::host::keep_neighbour(addr.ip());
                }
                Change::Remove => dp.remove_backend(service, addr)?,
                Change::Drain => dp.drain_backend(service, addr)?,
            }
            log::info!("backend {addr} of XDP service {service}: {change:?}");
            return Ok(());
        }
        let group = self.groups.get(service).ok_or_else(|| StateError::NotFound(service.into()))?;
        match change {
            Change::Add(w) => group.add(addr, w)?,
            Change::Remove => group.remove(addr)?,
            Change::Drain => group.drain(addr)?,
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
            for s in self.config.xdp.iter().flat_map(|x| x.services.iter()) {
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
        for (name, group) in &self.groups {
            if only.is_some_and(|o| o != name) || self.xdp_service_names().contains(name) {
                continue;
            }
            let backends = group
                .backends()
                .iter()
                .map(|b| BackendStats {
                    addr: b.addr,
                    weight: b.weight,
                    state: if b.draining.load(std::sync::atomic::Ordering::Relaxed) {
                        "draining"
                    } else if !b.healthy.load(std::sync::atomic::Ordering::Relaxed) {
                        "down"
                    } else {
                        "up"
                    }
                    .into(),
                    slots: 0,
                    packets: 0,
                    bytes: 0,
                    flows: 0,
                    active: b.in_flight.load(std::sync::atomic::Ordering::Relaxed),
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
        Ok(Stats { services, reasons })
    }
}
