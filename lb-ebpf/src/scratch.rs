//! Per-CPU working memory for one packet. BPF gives a call chain 512 bytes of stack in all;
//! the flow, NAT and route records of a new flow alone exceed that, so they live here (as in
//! Katran) and the stages pass one pointer around.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{BackendInfo, FlowKey, FlowState, NatKey, NatState, Settings, VipKey};

use crate::{nat::Translation, parse::Packet};

#[repr(C)]
pub struct Work {
    pub pkt: Packet,
    /// The packet an ICMP error quotes (addresses, ports, protocol).
    pub inner: Packet,
    pub key: FlowKey,
    /// The VIP key, built only when no tracked flow matched.
    pub vk: VipKey,
    pub st: FlowState,
    pub be: BackendInfo,
    pub t: Translation,
    pub nk: NatKey,
    pub ns: NatState,
    pub s: Settings,
    /// `bpf_ktime_get_coarse_ns` at the start of this packet (forward path).
    pub now: u64,
}

/// Not pinned and not shared with userspace: nothing in it outlives one packet.
#[map(name = "LB_SCRATCH")]
static SCRATCH: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's working memory.
#[inline(always)]
pub fn work() -> Option<&'static mut Work> {
    // SAFETY: a per-CPU slot used by one program run at a time on this CPU (XDP does not
    // nest), and it is fully written before it is read for each packet.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
