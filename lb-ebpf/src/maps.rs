//! The maps of the program. Names and value types are the contract in `lb_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use lb_common::{Counter, MAX_SERVICES, VipInfo, VipKey, stat};

#[map(name = "LB_VIPS")]
pub static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "LB_SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

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
