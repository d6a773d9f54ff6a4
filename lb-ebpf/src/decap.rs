//! `lb decap`'s XDP program, an object of its own (its three small maps only): on a backend
//! of a DSR service, it strips the outer header a balancer added (IPv4-in-IPv4,
//! IPv6-in-IPv6, or IP in UDP to port 6080) and passes the inner packet, addressed to the
//! VIP, to the local stack, which answers the client directly. For kernels without the
//! ipip/ip6_tunnel/fou modules. Everything else passes untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, GUE_PORT,
    decap::{DecapKey, DecapSettings, MAX_VIPS, stat},
};

#[map(name = "LB_DECAP_VIPS")]
static VIPS: HashMap<DecapKey, u8> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map(name = "LB_DECAP_SETTINGS")]
static SETTINGS: Array<DecapSettings> = Array::with_max_entries(1, 0);
#[map(name = "LB_DECAP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const ETH_LEN: usize = 14;
const P_IPV4: u16 = 0x0800;
const P_IPV6: u16 = 0x86dd;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    match try_decap(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU's program run writes it.
        unsafe { *c += 1 };
    }
}

/// `lb_ebpf::parse::ptr_at`'s twin: linking the library would bring the balancer's maps
/// (exported symbols) into this object, and `lb decap` would create them.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The offset of the inner IP header, or None for a packet that is not DSR-encapsulated.
#[inline(always)]
fn inner_offset(ctx: &XdpContext) -> Option<usize> {
    let eth: *const [u8; ETH_LEN] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    let ethertype = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
    let (proto, l4) = match ethertype {
        P_IPV4 => {
            let ip: *const [u8; 20] = ptr_at(ctx, ETH_LEN)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            // Options, or a fragment: not what a balancer sends; the stack decides.
            if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return None;
            }
            (ip[9], ETH_LEN + 20)
        }
        P_IPV6 => {
            let ip: *const [u8; 40] = ptr_at(ctx, ETH_LEN)?;
            // SAFETY: as above.
            (unsafe { (*ip)[6] }, ETH_LEN + 40)
        }
        _ => return None,
    };
    match proto {
        4 if ethertype == P_IPV4 => Some(l4),
        41 if ethertype == P_IPV6 => Some(l4),
        17 => {
            let udp: *const [u8; 8] = ptr_at(ctx, l4)?;
            // SAFETY: as above.
            let dport = unsafe { u16::from_be_bytes([(*udp)[2], (*udp)[3]]) };
            (dport == GUE_PORT).then_some(l4 + 8)
        }
        _ => None,
    }
}

fn try_decap(ctx: &XdpContext) -> Result<u32, u32> {
    let Some(inner) = inner_offset(ctx) else {
        count(stat::PASS);
        return Ok(xdp_action::XDP_PASS);
    };
    let bad = || {
        count(stat::DROP_BAD_INNER);
        xdp_action::XDP_DROP
    };
    let version: *const u8 = ptr_at(ctx, inner).ok_or_else(bad)?;
    // SAFETY: ptr_at checked the bounds.
    let mut key = DecapKey::default();
    let ethertype = match unsafe { *version } >> 4 {
        4 => {
            let ip: *const [u8; 20] = ptr_at(ctx, inner).ok_or_else(bad)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            key.addr[..4].copy_from_slice(&ip[16..20]);
            key.family = FAMILY_V4;
            P_IPV4
        }
        6 => {
            let ip: *const [u8; 40] = ptr_at(ctx, inner).ok_or_else(bad)?;
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            key.addr.copy_from_slice(&ip[24..40]);
            key.family = FAMILY_V6;
            P_IPV6
        }
        _ => return Err(bad()),
    };
    let filter = SETTINGS.get(0).is_some_and(|s| s.filter != 0);
    // SAFETY: the value is not read.
    if filter && unsafe { VIPS.get(key) }.is_none() {
        count(stat::DROP_NOT_VIP);
        return Err(xdp_action::XDP_DROP);
    }
    // The Ethernet header moves up to just before the inner packet, then the head follows.
    let old: *const [u8; 12] = ptr_at(ctx, 0).ok_or(xdp_action::XDP_ABORTED)?;
    // SAFETY: ptr_at checked the bounds; copied before anything is overwritten.
    let macs = unsafe { *old };
    let at = inner - ETH_LEN;
    let new: *mut [u8; ETH_LEN] = ptr_at(ctx, at).ok_or(xdp_action::XDP_ABORTED)?;
    // SAFETY: ptr_at checked the bounds; the frame is ours to modify.
    let new = unsafe { &mut *new };
    new[..12].copy_from_slice(&macs);
    new[12..].copy_from_slice(&ethertype.to_be_bytes());
    // SAFETY: ctx is this program's xdp_md; the helper checks the new head is in the frame.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, at as i32) } != 0 {
        return Err(xdp_action::XDP_ABORTED);
    }
    count(stat::DECAPSULATED);
    Ok(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
