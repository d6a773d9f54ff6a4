//! The maps of the program. Names and value types are the contract in `lb_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    BackendInfo, Counter, DEFAULT_MAX_FLOWS, DEFAULT_MAX_UNCONFIRMED_FLOWS, FlowKey, FlowState,
    IfaceAddrs, MAX_BACKENDS, MAX_SERVICES, NatKey, NatState, RING_SIZE, Settings, SnatPool,
    VipInfo, VipKey, stat, vip_addr_slot,
};

/// Interfaces a balancer may serve; the devmap and address table hold one entry each.
const MAX_IFACES: u32 = 64;

#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "LB_RING")]
pub static RING: Array<u32> = Array::with_max_entries(MAX_SERVICES * RING_SIZE, 0);

#[map(name = "LB_VIP_PORTS")]
pub static VIP_PORTS: Array<u32> = Array::with_max_entries(65536, 0);

#[map(name = "LB_VIP_ADDRS")]
pub static VIP_ADDRS: Array<u32> = Array::with_max_entries(65536, 0);

/// False when no VIP can match: no VIP listens on `port` (network byte order) or no VIP
/// address folds to the slot of `addr`. Two array reads; a true answer may be a false
/// positive (the frame then just takes the longer way).
#[inline(always)]
pub fn maybe_vip(addr: &[u8; 16], family: u8, port: u16) -> bool {
    matches!(VIP_PORTS.get(u16::from_be(port) as u32), Some(&v) if v != 0)
        && matches!(VIP_ADDRS.get(vip_addr_slot(addr, family)), Some(&v) if v != 0)
}

#[map(name = "LB_BACKENDS")]
pub static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);

// One LRU list shared by all CPUs (each CPU takes free entries from it in batches of 128).
// Per-CPU lists (BPF_F_NO_COMMON_LRU) rotate their active list on every insert, which made a
// new flow ~18% slower here (`lb-bench xdp-profile 2 new`).
#[map(name = "LB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

#[map(name = "LB_NAT")]
pub static NAT: LruHashMap<NatKey, NatState> = LruHashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

// Unconfirmed TCP flows live in LRUs of their own: inserting one can only evict another
// unconfirmed flow, so a SYN flood cannot push established flows out of FLOWS and NAT.
#[map(name = "LB_FLOWS_NEW")]
pub static FLOWS_NEW: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_MAX_UNCONFIRMED_FLOWS, 0);

#[map(name = "LB_NAT_NEW")]
pub static NAT_NEW: LruHashMap<NatKey, NatState> =
    LruHashMap::with_max_entries(DEFAULT_MAX_UNCONFIRMED_FLOWS, 0);

#[map(name = "LB_IFACES")]
pub static IFACES: HashMap<u32, IfaceAddrs> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map(name = "LB_SNAT_POOLS")]
pub static SNAT_POOLS: HashMap<u32, SnatPool> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map(name = "LB_DEVMAP")]
pub static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);

#[map(name = "LB_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

#[map(name = "LB_PORT_CURSOR")]
pub static PORT_CURSOR: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "LB_SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map(name = "LB_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "LB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Adds one to a global reason counter.
#[inline(always)]
pub fn count(reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe { *c += 1 };
    }
}

/// Adds a packet (and a new flow if `new_flow`) to a per-CPU counter slot.
#[inline(always)]
pub fn account(map: &PerCpuArray<Counter>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; nothing else writes it while this program runs on this CPU.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).flows += new_flow as u64;
        }
    }
}
