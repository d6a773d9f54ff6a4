//! The XDP services as the daemon manages them: service and backend ids, the Maglev ring of each
//! service, and the map writes that keep the kernel in step. Pure control logic over a
//! [`Maps`] trait, so it is tested without root against [`MemMaps`].
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

use lb_common::{
    BACKEND_F_ACTIVE, BackendInfo, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_SERVICES,
    MAX_SNAT_ADDRS, SnatPool, VIP_F_DSR, VIP_F_FIVE_TUPLE, VIP_F_GUE, VipInfo, VipKey,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{
    snat::{Pool, SnatPools},
    vip_key,
};
use crate::{
    config::{Encap, Forwarding, HashMode, Protocol, ServiceConfig},
    maglev,
};

/// The kernel maps the tables write to.
pub trait Maps {
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), TableError>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), TableError>;
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), TableError>;
    /// Writes `(slot, backend id)` pairs of one service's ring.
    fn set_ring(&mut self, service_id: u32, changes: &[(u32, u32)]) -> Result<(), TableError>;
    /// Writes the SNAT address pool of interface `ifindex` (one map update).
    fn set_snat_pool(&mut self, ifindex: u32, pool: &SnatPool) -> Result<(), TableError>;
    fn remove_snat_pool(&mut self, ifindex: u32) -> Result<(), TableError>;
}

#[derive(Debug, Error)]
pub enum TableError {
    #[error("no XDP service named {0:?}; `lb backend list` shows them")]
    NoService(String),
    #[error("service {service:?} has no backend {addr}")]
    NoBackend { service: String, addr: SocketAddr },
    #[error("service {service:?} already has backend {addr}")]
    Exists { service: String, addr: SocketAddr },
    #[error("backend {addr} is not of the address family of service {service:?}'s VIP")]
    Family { service: String, addr: SocketAddr },
    #[error("weight must be at least 1 (drain a backend to stop new flows)")]
    ZeroWeight,
    #[error(
        "all {MAX_BACKENDS} backend ids are in use: remove backends or raise lb_common::MAX_BACKENDS"
    )]
    BackendsFull,
    #[error("all {MAX_SERVICES} service ids are in use: raise lb_common::MAX_SERVICES")]
    ServicesFull,
    #[error(
        "an xdp.snat pool has more than {MAX_SNAT_ADDRS} addresses of one family: list fewer or raise lb_common::MAX_SNAT_ADDRS"
    )]
    SnatPoolFull,
    #[error("map update failed: {0}")]
    Map(String),
}

/// A backend of an XDP service, as listed by the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendView {
    pub addr: SocketAddr,
    pub weight: u32,
    pub id: u32,
    pub draining: bool,
    pub healthy: bool,
    /// Maglev slots it owns now (0 when draining or unhealthy).
    pub slots: u32,
}

#[derive(Debug, Clone)]
struct Backend {
    addr: SocketAddr,
    weight: u32,
    id: u32,
    draining: bool,
    healthy: bool,
}

#[derive(Debug)]
struct Service {
    id: u32,
    key: VipKey,
    flags: u32,
    backends: Vec<Backend>,
    /// The ring as last written: slot → backend id (0 = none).
    ring: Vec<u32>,
}

/// What a previous daemon left in pinned maps.
#[derive(Default)]
struct Recovered {
    service_ids: HashMap<VipKey, u32>,
    backend_ids: HashMap<(u32, SocketAddr), u32>,
}

/// Every XDP service and backend, and what the kernel holds for them.
pub struct Tables {
    ring_size: u32,
    services: BTreeMap<String, Service>,
    /// Generation per backend id, bumped on every reuse of the id.
    generations: Vec<u32>,
    used_ids: Vec<bool>,
    recovered: Recovered,
    snat: SnatPools,
}

impl Tables {
    pub fn new(ring_size: u32) -> Self {
        Self {
            ring_size,
            services: BTreeMap::new(),
            generations: vec![0; MAX_BACKENDS as usize],
            used_ids: vec![false; MAX_BACKENDS as usize],
            recovered: Recovered::default(),
            snat: SnatPools::default(),
        }
    }

    /// Adopts what a previous daemon left in pinned maps: service ids by VIP and backend ids
    /// (with generations) by (service, address), so tracked flows keep their backend. The next
    /// [`Tables::apply`] reuses them and retires the rest.
    pub fn recover(&mut self, vips: &[(VipKey, VipInfo)], backends: &[(u32, BackendInfo)]) {
        for (key, info) in vips {
            self.recovered.service_ids.insert(*key, info.service_id);
        }
        for (id, b) in backends {
            if let Some(g) = self.generations.get_mut(*id as usize) {
                *g = b.generation;
            }
            if b.flags & BACKEND_F_ACTIVE != 0 {
                self.recovered.backend_ids.insert((b.service_id, backend_addr(b)), *id);
            }
        }
    }

    /// Makes the services exactly `configs` (adds, updates and removes), keeping the ids of
    /// services and backends that stay. Returns the (service, backend) pairs whose runtime
    /// drain it ended, for the reload's report.
    pub fn apply(
        &mut self,
        configs: &[ServiceConfig],
        maps: &mut dyn Maps,
    ) -> Result<Vec<(String, SocketAddr)>, TableError> {
        let mut undrained = Vec::new();
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|n| !configs.iter().any(|c| &c.name == *n))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name, maps)?;
        }
        for c in configs {
            let key = vip_key(c.vip, c.protocol);
            if self.services.get(&c.name).is_some_and(|s| s.key != key) {
                self.remove_service(&c.name, maps)?;
            }
            if !self.services.contains_key(&c.name) {
                let id = self.service_id_for(&key)?;
                let ring = vec![0; self.ring_size as usize];
                let svc = Service { id, key, flags: 0, backends: Vec::new(), ring };
                self.services.insert(c.name.clone(), svc);
            }
            let wanted: Vec<SocketAddr> = c.backends.iter().map(|b| b.addr()).collect();
            let current: Vec<SocketAddr> =
                self.services[&c.name].backends.iter().map(|b| b.addr).collect();
            for addr in current.iter().filter(|a| !wanted.contains(a)) {
                self.remove_backend_quiet(&c.name, *addr, maps)?;
            }
            for b in &c.backends {
                let svc = self.services.get_mut(&c.name).expect("inserted above");
                if let Some(x) = svc.backends.iter_mut().find(|x| x.addr == b.addr()) {
                    // The file is the truth: its weight, and a runtime drain ends; with
                    // `backends_from` the API is, and its drains stay.
                    x.weight = b.weight();
                    if x.draining && c.backends_from.is_none() {
                        x.draining = false;
                        undrained.push((c.name.clone(), x.addr));
                    }
                } else {
                    self.insert_backend(&c.name, b.addr(), b.weight(), maps)?;
                }
            }
            let svc = self.services.get_mut(&c.name).expect("inserted above");
            svc.flags = vip_flags(c);
            self.sync(&c.name, maps)?;
        }
        // Whatever a previous daemon had that this config does not: retire it.
        let leftovers: Vec<u32> = self.recovered.backend_ids.drain().map(|(_, id)| id).collect();
        for id in leftovers {
            self.retire(id, maps)?;
        }
        let stale: Vec<VipKey> = self.recovered.service_ids.drain().map(|(k, _)| k).collect();
        for key in stale {
            maps.remove_vip(&key)?;
        }
        Ok(undrained)
    }

    /// Makes the SNAT address pools exactly `pools` (see [`SnatPools::apply`]); returns what
    /// changed.
    pub fn apply_snat(
        &mut self,
        pools: &[Pool],
        maps: &mut dyn Maps,
    ) -> Result<Vec<String>, TableError> {
        self.snat.apply(pools, maps)
    }

    /// Adopts the SNAT pools a previous daemon pinned (by ifindex).
    pub fn recover_snat(&mut self, pinned: &[(u32, SnatPool)]) {
        self.snat.recover(pinned);
    }

    /// Adds a backend at runtime; it takes new flows at once.
    pub fn add_backend(
        &mut self,
        service: &str,
        addr: SocketAddr,
        weight: u32,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        if weight == 0 {
            return Err(TableError::ZeroWeight);
        }
        let svc = self.service(service)?;
        if svc.backends.iter().any(|b| b.addr == addr) {
            return Err(TableError::Exists { service: service.into(), addr });
        }
        if (svc.key.family == FAMILY_V4) != addr.is_ipv4() {
            return Err(TableError::Family { service: service.into(), addr });
        }
        self.insert_backend(service, addr, weight, maps)?;
        self.sync(service, maps)
    }

    /// Removes a backend: no new flows, and its tracked flows stop being forwarded.
    pub fn remove_backend(
        &mut self,
        service: &str,
        addr: SocketAddr,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        self.remove_backend_quiet(service, addr, maps)
    }

    /// Drains a backend (no new flows; tracked flows keep going until they end), or ends a
    /// drain (it takes new flows again).
    pub fn set_draining(
        &mut self,
        service: &str,
        addr: SocketAddr,
        draining: bool,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        self.backend_mut(service, addr)?.draining = draining;
        self.sync(service, maps)
    }

    /// Gives a backend a new weight: the ring is recomputed, tracked flows stay.
    pub fn set_weight(
        &mut self,
        service: &str,
        addr: SocketAddr,
        weight: u32,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        if weight == 0 {
            return Err(TableError::ZeroWeight);
        }
        self.backend_mut(service, addr)?.weight = weight;
        self.sync(service, maps)
    }

    /// Marks a backend healthy or not (health checks); unhealthy ones get no new flows.
    pub fn set_health(
        &mut self,
        service: &str,
        addr: SocketAddr,
        healthy: bool,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        let b = self.backend_mut(service, addr)?;
        if b.healthy == healthy {
            return Ok(());
        }
        b.healthy = healthy;
        self.sync(service, maps)
    }

    /// Service names with their ids, in name order.
    pub fn services(&self) -> Vec<(String, u32)> {
        self.services.iter().map(|(n, s)| (n.clone(), s.id)).collect()
    }

    /// A service's backends.
    pub fn backends(&self, service: &str) -> Result<Vec<BackendView>, TableError> {
        let svc = self.service(service)?;
        Ok(svc
            .backends
            .iter()
            .map(|b| BackendView {
                addr: b.addr,
                weight: b.weight,
                id: b.id,
                draining: b.draining,
                healthy: b.healthy,
                slots: svc.ring.iter().filter(|&&id| id == b.id).count() as u32,
            })
            .collect())
    }

    /// The backends adopted maps hold for the service at `vip` (a previous run's), until
    /// `apply` keeps or retires them: a service whose set comes from an API starts from these.
    pub fn recovered_backends(&self, vip: SocketAddr, protocol: Protocol) -> Vec<SocketAddr> {
        let key = vip_key(vip, protocol);
        let Some(&sid) = self.recovered.service_ids.get(&key) else { return Vec::new() };
        let mut out: Vec<SocketAddr> =
            self.recovered.backend_ids.keys().filter(|(s, _)| *s == sid).map(|(_, a)| *a).collect();
        out.sort();
        out
    }

    /// The ring of a service as last written (slot → backend id, 0 = none).
    pub fn ring(&self, service: &str) -> Result<&[u32], TableError> {
        Ok(&self.service(service)?.ring)
    }

    fn service(&self, name: &str) -> Result<&Service, TableError> {
        self.services.get(name).ok_or_else(|| TableError::NoService(name.into()))
    }

    fn backend_mut(&mut self, service: &str, addr: SocketAddr) -> Result<&mut Backend, TableError> {
        let svc =
            self.services.get_mut(service).ok_or_else(|| TableError::NoService(service.into()))?;
        svc.backends
            .iter_mut()
            .find(|b| b.addr == addr)
            .ok_or_else(|| TableError::NoBackend { service: service.into(), addr })
    }

    fn service_id_for(&mut self, key: &VipKey) -> Result<u32, TableError> {
        let in_use =
            |id: u32, services: &BTreeMap<String, Service>| services.values().any(|s| s.id == id);
        if let Some(id) = self.recovered.service_ids.remove(key)
            && !in_use(id, &self.services)
        {
            return Ok(id);
        }
        (0..MAX_SERVICES)
            .find(|&id| {
                !in_use(id, &self.services)
                    && !self.recovered.service_ids.values().any(|&r| r == id)
            })
            .ok_or(TableError::ServicesFull)
    }

    fn insert_backend(
        &mut self,
        service: &str,
        addr: SocketAddr,
        weight: u32,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        let service_id = self.service(service)?.id;
        let id = match self.recovered.backend_ids.remove(&(service_id, addr)) {
            Some(id) if !self.used_ids[id as usize] => id,
            _ => {
                let reserved: Vec<u32> = self.recovered.backend_ids.values().copied().collect();
                let id = (1..MAX_BACKENDS)
                    .find(|&id| !self.used_ids[id as usize] && !reserved.contains(&id))
                    .ok_or(TableError::BackendsFull)?;
                self.generations[id as usize] = self.generations[id as usize].wrapping_add(1);
                id
            }
        };
        self.used_ids[id as usize] = true;
        let info = backend_info(addr, service_id, self.generations[id as usize]);
        maps.set_backend(id, &info)?;
        let svc = self.services.get_mut(service).expect("checked above");
        svc.backends.push(Backend { addr, weight, id, draining: false, healthy: true });
        Ok(())
    }

    fn remove_backend_quiet(
        &mut self,
        service: &str,
        addr: SocketAddr,
        maps: &mut dyn Maps,
    ) -> Result<(), TableError> {
        let svc =
            self.services.get_mut(service).ok_or_else(|| TableError::NoService(service.into()))?;
        let pos = svc
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| TableError::NoBackend { service: service.into(), addr })?;
        let b = svc.backends.remove(pos);
        // Out of the ring first, so no new flow picks an id that is about to go inactive.
        self.sync(service, maps)?;
        self.retire(b.id, maps)
    }

    /// Marks backend id `id` inactive in the kernel (its tracked flows stop) and frees it; the
    /// generation stays, so a later owner of the id gets a new one.
    fn retire(&mut self, id: u32, maps: &mut dyn Maps) -> Result<(), TableError> {
        let generation = self.generations[id as usize];
        maps.set_backend(id, &BackendInfo { generation, ..Default::default() })?;
        self.used_ids[id as usize] = false;
        Ok(())
    }

    fn remove_service(&mut self, name: &str, maps: &mut dyn Maps) -> Result<(), TableError> {
        let svc = self.services.remove(name).ok_or_else(|| TableError::NoService(name.into()))?;
        maps.remove_vip(&svc.key)?;
        let clear: Vec<(u32, u32)> = svc
            .ring
            .iter()
            .enumerate()
            .filter(|(_, id)| **id != 0)
            .map(|(s, _)| (s as u32, 0))
            .collect();
        maps.set_ring(svc.id, &clear)?;
        for b in svc.backends {
            self.retire(b.id, maps)?;
        }
        Ok(())
    }

    /// Recomputes a service's ring, writes the slots that changed, then its VIP entry.
    fn sync(&mut self, name: &str, maps: &mut dyn Maps) -> Result<(), TableError> {
        let ring_size = self.ring_size;
        let svc = self.services.get_mut(name).ok_or_else(|| TableError::NoService(name.into()))?;
        let live: Vec<&Backend> =
            svc.backends.iter().filter(|b| !b.draining && b.healthy).collect();
        let entries: Vec<maglev::Entry> =
            live.iter().map(|b| maglev::Entry { addr: b.addr, weight: b.weight }).collect();
        let table = maglev::table(&entries, ring_size);
        let next: Vec<u32> = table
            .iter()
            .map(|&i| if i == maglev::EMPTY { 0 } else { live[i as usize].id })
            .collect();
        let changes: Vec<(u32, u32)> = next
            .iter()
            .zip(&svc.ring)
            .enumerate()
            .filter(|(_, (n, o))| n != o)
            .map(|(slot, (n, _))| (slot as u32, *n))
            .collect();
        maps.set_ring(svc.id, &changes)?;
        svc.ring = next;
        maps.set_vip(&svc.key, &VipInfo { service_id: svc.id, flags: svc.flags })
    }
}

fn backend_info(addr: SocketAddr, service_id: u32, generation: u32) -> BackendInfo {
    let mut a = [0u8; 16];
    let family = match addr.ip() {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            FAMILY_V4
        }
        IpAddr::V6(v6) => {
            a = v6.octets();
            FAMILY_V6
        }
    };
    BackendInfo {
        addr: a,
        port: addr.port().to_be(),
        family,
        _pad: 0,
        flags: BACKEND_F_ACTIVE,
        generation,
        service_id,
    }
}

fn backend_addr(b: &BackendInfo) -> SocketAddr {
    let ip: IpAddr = if b.family == FAMILY_V4 {
        [b.addr[0], b.addr[1], b.addr[2], b.addr[3]].into()
    } else {
        b.addr.into()
    };
    SocketAddr::new(ip, u16::from_be(b.port))
}

/// An in-memory stand-in for the kernel maps, for tests of the control logic.
#[derive(Default)]
pub struct MemMaps {
    pub vips: HashMap<VipKey, VipInfo>,
    pub backends: HashMap<u32, BackendInfo>,
    pub rings: HashMap<u32, HashMap<u32, u32>>,
    pub ring_writes: usize,
    pub snat_pools: HashMap<u32, SnatPool>,
    pub snat_writes: usize,
}

impl Maps for MemMaps {
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), TableError> {
        self.vips.insert(*key, *info);
        Ok(())
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), TableError> {
        self.vips.remove(key);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), TableError> {
        self.backends.insert(id, *info);
        Ok(())
    }
    fn set_ring(&mut self, service_id: u32, changes: &[(u32, u32)]) -> Result<(), TableError> {
        let ring = self.rings.entry(service_id).or_default();
        for &(slot, id) in changes {
            ring.insert(slot, id);
        }
        self.ring_writes += changes.len();
        Ok(())
    }
    fn set_snat_pool(&mut self, ifindex: u32, pool: &SnatPool) -> Result<(), TableError> {
        self.snat_pools.insert(ifindex, *pool);
        self.snat_writes += 1;
        Ok(())
    }
    fn remove_snat_pool(&mut self, ifindex: u32) -> Result<(), TableError> {
        self.snat_pools.remove(&ifindex);
        Ok(())
    }
}

/// The `VIP_F_*` bits of a service: hashing and forwarding.
fn vip_flags(c: &ServiceConfig) -> u32 {
    let hash = if c.hash == HashMode::FiveTuple { VIP_F_FIVE_TUPLE } else { 0 };
    let forwarding = match (c.forwarding, c.encap.unwrap_or_default()) {
        (Forwarding::Nat, _) => 0,
        (Forwarding::Dsr, Encap::Ipip) => VIP_F_DSR,
        (Forwarding::Dsr, Encap::Gue) => VIP_F_DSR | VIP_F_GUE,
    };
    hash | forwarding
}

#[cfg(test)]
mod tests;
