//! The kernel implementation of [`Maps`]: writes go straight to the program's maps.
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use lb_common::{BackendInfo, RING_SIZE, SnatPool, VipInfo, VipKey, maps, vip_addr_slot};

use super::tables::{Maps, TableError};

/// The program's maps, borrowed for a batch of writes.
pub struct KernelMaps<'a>(pub &'a mut Ebpf);

fn map_err(e: impl std::fmt::Display) -> TableError {
    TableError::Map(e.to_string())
}

impl KernelMaps<'_> {
    /// Marks (or clears) the VIP's port and address slot in the filters in front of the
    /// program's lookups.
    pub fn mark(&mut self, vip: &VipKey, port: bool, addr: bool) -> Result<(), TableError> {
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.map(maps::VIP_PORTS)?).map_err(map_err)?;
        m.set(u32::from(u16::from_be(vip.port)), u32::from(port), 0).map_err(map_err)?;
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.map(maps::VIP_ADDRS)?).map_err(map_err)?;
        m.set(vip_addr_slot(&vip.addr, vip.family), u32::from(addr), 0).map_err(map_err)
    }

    fn map(&mut self, name: &str) -> Result<&mut aya::maps::Map, TableError> {
        self.0.map_mut(name).ok_or_else(|| TableError::Map(format!("map {name} missing")))
    }
}

impl Maps for KernelMaps<'_> {
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), TableError> {
        let mut m: HashMap<&mut MapData, VipKey, VipInfo> =
            HashMap::try_from(self.map(maps::VIPS)?).map_err(map_err)?;
        m.insert(key, info, 0).map_err(map_err)?;
        self.mark(key, true, true)
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), TableError> {
        let mut m: HashMap<&mut MapData, VipKey, VipInfo> =
            HashMap::try_from(self.map(maps::VIPS)?).map_err(map_err)?;
        match m.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(e)),
        }
        // The port (address slot) stays marked while another VIP uses it.
        let others: Vec<VipKey> = m.keys().filter_map(Result::ok).collect();
        let port_used = others.iter().any(|k| k.port == key.port);
        let slot = |k: &VipKey| vip_addr_slot(&k.addr, k.family);
        let addr_used = others.iter().any(|k| slot(k) == slot(key));
        self.mark(key, port_used, addr_used)
    }

    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), TableError> {
        let mut m: Array<&mut MapData, BackendInfo> =
            Array::try_from(self.map(maps::BACKENDS)?).map_err(map_err)?;
        m.set(id, info, 0).map_err(map_err)
    }

    fn set_ring(&mut self, service_id: u32, changes: &[(u32, u32)]) -> Result<(), TableError> {
        let mut m: Array<&mut MapData, u32> =
            Array::try_from(self.map(maps::RING)?).map_err(map_err)?;
        let base = service_id * RING_SIZE;
        for &(slot, id) in changes {
            m.set(base + slot, id, 0).map_err(map_err)?;
        }
        Ok(())
    }

    fn set_snat_pool(&mut self, ifindex: u32, pool: &SnatPool) -> Result<(), TableError> {
        let mut m: HashMap<&mut MapData, u32, SnatPool> =
            HashMap::try_from(self.map(maps::SNAT_POOLS)?).map_err(map_err)?;
        m.insert(ifindex, pool, 0).map_err(map_err)
    }

    fn remove_snat_pool(&mut self, ifindex: u32) -> Result<(), TableError> {
        let mut m: HashMap<&mut MapData, u32, SnatPool> =
            HashMap::try_from(self.map(maps::SNAT_POOLS)?).map_err(map_err)?;
        match m.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }
}
