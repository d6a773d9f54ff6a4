//! Next hop from the kernel's FIB (`bpf_fib_lookup`) and sending the frame there.
use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::bpf_fib_lookup,
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Hop, stat};

use crate::{
    maps::{DEVMAP, count},
    parse::Packet,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Why no next hop was found.
pub enum FibMiss {
    /// Route known, neighbour not resolved yet.
    NoNeigh,
    /// No route, forwarding disabled, or another failure.
    Other,
}

/// Looks up the route from `src` to `dst` as if the packet arrived on the ingress interface,
/// writes the result into `hop` (the caller stamps its time) and returns the route's MTU (0
/// when the kernel does not report it). Not inlined: the 64-byte parameter block gets its own
/// stack frame, at the end of every call chain.
#[inline(never)]
pub fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    src: &[u8; 16],
    dst: &[u8; 16],
    hop: &mut Hop,
) -> Result<u16, FibMiss> {
    let mut p = MaybeUninit::<FibParams>::uninit();
    // Zeroed word by word: `MaybeUninit::zeroed` becomes a call to a byte-loop memset.
    let zeros = p.as_mut_ptr() as *mut u32;
    for i in 0..core::mem::size_of::<FibParams>() / 4 {
        // SAFETY: within the 64-byte parameter block, which is 4-byte aligned.
        unsafe { zeros.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was just zeroed, and all-zero is a valid bpf_fib_lookup.
    let mut p = unsafe { p.assume_init() };
    p.ifindex = ctx.ingress_ifindex() as u32;
    // tot_len stays 0: the kernel then never answers "fragmentation needed" and returns the
    // route's MTU in the same field instead, which the caller caches with the hop and compares
    // with every packet's length (a cached hop skips this lookup).
    if pkt.family == FAMILY_V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = words(src);
        p.__bindgen_anon_4.ipv6_dst = words(dst);
    }
    // SAFETY: p is a valid bpf_fib_lookup of the size passed.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), &mut p, core::mem::size_of::<FibParams>() as i32, 0)
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            hop.ifindex = p.ifindex;
            hop.smac = p.smac;
            hop.dmac = p.dmac;
            // SAFETY: a u16 union member, written by the kernel on success.
            Ok(unsafe { p.__bindgen_anon_1.mtu_result })
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(FibMiss::NoNeigh),
        _ => Err(FibMiss::Other),
    }
}

/// Keeps the frame's current MACs (for a frame handed to the kernel as it is addressed).
#[inline(always)]
pub fn keep_macs(ctx: &XdpContext, hop: &mut Hop) -> Result<(), u32> {
    use crate::hdr::eth;
    let macs: *const [u8; eth::MACS] =
        crate::parse::ptr_at(ctx, 0).ok_or(xdp_action::XDP_ABORTED)?;
    // SAFETY: ptr_at checked the bounds.
    let macs = unsafe { &*macs };
    hop.ifindex = 0;
    // Not a lookup result: never reused.
    hop.at_ns = 0;
    hop.dmac.copy_from_slice(&macs[eth::DST]);
    hop.smac.copy_from_slice(&macs[eth::SRC]);
    Ok(())
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Sends the (already rewritten) frame out of `ifindex`: back out of the ingress interface
/// with XDP_TX, or to another served interface through the devmap.
#[inline(always)]
pub fn send(ctx: &XdpContext, ifindex: u32) -> u32 {
    if ifindex == ctx.ingress_ifindex() as u32 {
        count(stat::TX);
        return xdp_action::XDP_TX;
    }
    match DEVMAP.redirect(ifindex, 0) {
        Ok(action) => {
            count(stat::REDIRECT);
            action
        }
        Err(_) => {
            count(stat::DROP_REDIRECT);
            xdp_action::XDP_DROP
        }
    }
}
