//! The XDP balancer: parse, classify, then either forward a client's packet to its backend or
//! turn a backend's reply back toward the client (full NAT both ways). Stages are plain
//! functions joined with `?`; an `Err` carries the action, so every early exit says what
//! happens to the packet, and each is counted.
#![no_std]
// For `atomic_cxchg` (mem::claim): the BPF target spec offers no compare-and-swap atomics.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
// Map keys are passed by reference on purpose: `Borrow<K>` by value would copy 40-byte keys
// onto the 512-byte BPF stack.
#![allow(clippy::needless_borrows_for_generic_args)]

pub mod encap;
pub mod fib;
pub mod flow;
pub mod hdr;
pub mod icmp;
pub mod maps;
pub mod mem;
pub mod nat;
pub mod parse;
pub mod scratch;
pub mod snat;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{FLOW_F_CONFIRMED, FLOW_F_DSR, FLOW_F_GUE, HOP_TTL_NS, PROTO_TCP, VIP_F_DSR, stat};

use crate::{
    flow::Tracked,
    maps::{
        BACKEND_STATS, FLOWS, FLOWS_NEW, NAT, NAT_NEW, SERVICE_STATS, VIPS, account, count,
        maybe_vip,
    },
    nat::rewrite,
    parse::parse,
    scratch::Work,
};

/// Runs the balancer on one frame and returns the XDP action.
#[inline(always)]
pub fn balance(ctx: &XdpContext) -> u32 {
    count(stat::RX);
    let Some(w) = scratch::work() else {
        return xdp_action::XDP_PASS;
    };
    match try_balance(ctx, w) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_balance(ctx: &XdpContext, w: &mut Work) -> Result<u32, u32> {
    parse(ctx, &mut w.pkt)?;
    flow::load_settings(&mut w.s);
    if w.pkt.proto == parse::PROTO_ICMP || w.pkt.proto == parse::PROTO_ICMPV6 {
        return icmp::error(ctx, w);
    }
    // Most frames that are not for a VIP are told apart by port and address with two array
    // reads: replies from backends and other traffic never reach the flow and VIP lookups.
    if maybe_vip(&w.pkt.dst, w.pkt.family, w.pkt.dport) {
        return forward(ctx, w);
    }
    reply(ctx, w)
}

/// Frame length as XDP sees it, for byte counters.
#[inline(always)]
fn frame_len(ctx: &XdpContext) -> u64 {
    (ctx.data_end() - ctx.data()) as u64
}

/// Client → VIP becomes balancer → backend; a frame that is not for a VIP goes on to
/// `reply`. A tracked flow is looked up first, so established packets cost one hash lookup;
/// only misses look the VIP up. Not inlined: the two directions then get separate stack
/// frames instead of one frame holding both.
#[inline(never)]
fn forward(ctx: &XdpContext, w: &mut Work) -> Result<u32, u32> {
    flow::make_key(w);
    // The coarse clock (one tick, a few ms, behind) is enough for every timer here: idle and
    // close timeouts in seconds, the 1 s next-hop cache, 100 ms last-seen updates. It reads a
    // variable where bpf_ktime_get_ns reads the TSC, which costs more under a hypervisor.
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    w.now = now;
    let tracked = flow::lookup(w, now);
    let (service_id, new) = match tracked {
        Tracked::Live(ptr, confirmed) => {
            count(stat::VIP_HIT);
            if w.pkt.ttl <= 1 {
                // The kernel answers with ICMP time exceeded.
                count(stat::PASS_TTL);
                return Ok(xdp_action::XDP_PASS);
            }
            count(stat::FLOW_HIT);
            // SAFETY: a valid map value.
            let (id, generation) = unsafe { ((*ptr).backend_id, (*ptr).generation) };
            if !flow::backend(id, &mut w.be) || w.be.generation != generation {
                count(stat::DROP_BACKEND_GONE);
                return Err(xdp_action::XDP_DROP);
            }
            // SAFETY: as above.
            mem::copy(&mut w.st, unsafe { &*ptr });
            if now.wrapping_sub(w.st.hop.at_ns) > HOP_TTL_NS {
                flow::route_to_backend(ctx, w, false, now)?;
                // SAFETY: as above; a racing refresh writes an equally fresh hop.
                unsafe {
                    mem::copy(&mut (*ptr).hop, &w.st.hop);
                    (*ptr).mtu = w.st.mtu;
                }
                if w.st.flags & FLOW_F_DSR == 0 {
                    flow::check_nat(w, confirmed, now)?;
                }
            }
            // SAFETY: a valid map value (see flow::touch on concurrent updates).
            let st = unsafe { &mut *ptr };
            let add = flow::client_flags_of(&w.pkt, st);
            flow::touch(st, add, w.pkt.proto, now);
            if !confirmed && add & FLOW_F_CONFIRMED != 0 {
                w.st.flags |= add;
                w.st.last_seen_ns = now;
                w.st.client_next = st.client_next;
                flow::promote(w)?;
            }
            (w.be.service_id, false)
        }
        tracked => {
            // IPv4 keys carry the address in the first 4 bytes; parse zeroed the rest.
            w.vk.port = w.pkt.dport;
            w.vk.proto = w.pkt.proto;
            w.vk.family = w.pkt.family;
            w.vk._pad = [0; 4];
            mem::copy16(&mut w.vk.addr, &w.pkt.dst);
            // SAFETY: the value is plain data, copied out at once.
            let Some(vip) = (unsafe { VIPS.get(&w.vk) }).copied() else {
                // Not a VIP after all (the filter's false positive): maybe a reply. Called from
                // here rather than signalled with `Ok(None)`: LLVM leaves an `Option`'s unused
                // payload register unset across the call, which the verifier refuses to read.
                return reply(ctx, w);
            };
            count(stat::VIP_HIT);
            if w.pkt.ttl <= 1 {
                count(stat::PASS_TTL);
                return Ok(xdp_action::XDP_PASS);
            }
            count(stat::FLOW_MISS);
            if w.pkt.proto == PROTO_TCP && !flow::is_syn(&w.pkt) && vip.flags & VIP_F_DSR == 0 {
                // Its NAT state is gone (or never was): the backend would not know it. (A DSR
                // service balances it by the ring: `flow::create_dsr`.)
                count(stat::DROP_NOT_SYN);
                return Err(xdp_action::XDP_DROP);
            }
            // An ended flow's NAT entry is left alone: the port may already be another
            // flow's (reclaimed), and only its owner or one reclaimer may change it. Its flow
            // entry goes when the new TCP flow starts in FLOWS_NEW: lookups try FLOWS first.
            if let Tracked::Ended(true) = tracked {
                let _ = FLOWS.remove(&w.key);
            }
            flow::create(ctx, w, &vip, now)?;
            count(stat::FLOW_NEW);
            (vip.service_id, true)
        }
    };
    let len = frame_len(ctx);
    // A DSR packet grows by its outer header: the client hears the MTU minus that, so its
    // path MTU leaves room for it.
    let dsr = w.st.flags & FLOW_F_DSR != 0;
    let extra = if dsr { encap::overhead(w.pkt.family, w.st.flags & FLOW_F_GUE != 0) } else { 0 };
    if icmp::exceeds(len + extra as u64, w.st.mtu) {
        return icmp::too_big(ctx, &w.pkt, w.st.mtu.saturating_sub(extra));
    }
    account(&SERVICE_STATS, service_id, len, new);
    account(&BACKEND_STATS, w.st.backend_id, len, new);
    if dsr {
        return encap::send(ctx, w, len);
    }
    mem::copy16(&mut w.t.src, &w.st.snat);
    mem::copy16(&mut w.t.dst, &w.be.addr);
    w.t.sport = w.st.nat_port;
    w.t.dport = w.be.port;
    w.t.smac = w.st.hop.smac;
    w.t.dmac = w.st.hop.dmac;
    rewrite(ctx, &w.pkt, &w.t)?;
    Ok(fib::send(ctx, w.st.hop.ifindex))
}

/// Backend → balancer (a tracked SNAT port) becomes VIP → client; anything else passes.
#[inline(never)]
fn reply(ctx: &XdpContext, w: &mut Work) -> Result<u32, u32> {
    let port = u16::from_be(w.pkt.dport);
    if port < w.s.nat_port_min || port > w.s.nat_port_max {
        count(stat::PASS_NOT_VIP);
        return Ok(xdp_action::XDP_PASS);
    }
    mem::copy16(&mut w.nk.backend, &w.pkt.src);
    mem::copy16(&mut w.nk.snat, &w.pkt.dst);
    w.nk.backend_port = w.pkt.sport;
    w.nk.nat_port = w.pkt.dport;
    w.nk.proto = w.pkt.proto;
    w.nk.family = w.pkt.family;
    w.nk._pad = 0;
    // Confirmed flows first: most replies cost one lookup.
    let (ns_ptr, confirmed) = match NAT.get_ptr_mut(&w.nk) {
        Some(p) => (p, true),
        None => match NAT_NEW.get_ptr_mut(&w.nk) {
            Some(p) => (p, false),
            None => {
                count(stat::PASS_NOT_VIP);
                return Ok(xdp_action::XDP_PASS);
            }
        },
    };
    // SAFETY: a valid map value, copied out.
    mem::copy(&mut w.ns, unsafe { &*ns_ptr });
    if ctx.ingress_ifindex() as u32 != w.ns.backend_ifindex {
        // Claims to come from a backend but arrived where that backend is not reached: a
        // spoofed reply (translating it would let anyone inject into the flow).
        count(stat::DROP_WRONG_IFACE);
        return Err(xdp_action::XDP_DROP);
    }
    count(stat::REPLY);
    if w.pkt.ttl <= 1 {
        count(stat::PASS_TTL);
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The client-side flow only needs to hear about a reply that closes it (TCP FIN/RST),
    // answers its SYN, or keeps it alive (UDP, whose idle time counts both directions); skipping the lookup
    // otherwise saves a hash lookup on most replies.
    let add = flow::backend_flags_of(&w.pkt);
    // SAFETY: a valid map value; a racing writer stores an equally recent time.
    unsafe {
        if now.saturating_sub((*ns_ptr).last_seen_ns) > flow::TOUCH_NS {
            (*ns_ptr).last_seen_ns = now;
        }
    }
    if add != 0 || w.pkt.proto != PROTO_TCP {
        let st = if confirmed {
            FLOWS.get_ptr_mut(&w.ns.flow)
        } else {
            FLOWS_NEW.get_ptr_mut(&w.ns.flow)
        };
        if let Some(st) = st {
            // SAFETY: a valid map value (see flow::touch on concurrent updates).
            flow::touch(unsafe { &mut *st }, add, w.pkt.proto, now);
        }
    }
    let len = frame_len(ctx);
    account(&SERVICE_STATS, w.ns.service_id, len, false);
    account(&BACKEND_STATS, w.ns.backend_id, len, false);
    // Translate toward the client: from the VIP, to the client.
    mem::copy16(&mut w.t.src, &w.ns.flow.dst);
    mem::copy16(&mut w.t.dst, &w.ns.flow.src);
    w.t.sport = w.ns.flow.dport;
    w.t.dport = w.ns.flow.sport;
    let mut pass = false;
    if now.wrapping_sub(w.ns.hop.at_ns) > HOP_TTL_NS {
        match fib::lookup(ctx, &w.pkt, &w.t.src, &w.t.dst, &mut w.ns.hop) {
            Ok(mtu) => {
                w.ns.hop.at_ns = now;
                w.ns.mtu = mtu;
                // SAFETY: a valid map value; a racing refresh writes an equally fresh hop.
                unsafe {
                    mem::copy(&mut (*ns_ptr).hop, &w.ns.hop);
                    (*ns_ptr).mtu = mtu;
                }
            }
            // Translate but let the kernel forward it: it resolves the client's neighbour on
            // the way, and later replies take the fast path. The frame keeps its MACs.
            Err(fib::FibMiss::NoNeigh) => {
                fib::keep_macs(ctx, &mut w.ns.hop)?;
                pass = true;
            }
            Err(fib::FibMiss::Other) => {
                count(stat::DROP_NO_ROUTE);
                return Err(xdp_action::XDP_DROP);
            }
        }
    }
    if icmp::exceeds(len, w.ns.mtu) {
        return icmp::too_big(ctx, &w.pkt, w.ns.mtu);
    }
    w.t.smac = w.ns.hop.smac;
    w.t.dmac = w.ns.hop.dmac;
    rewrite(ctx, &w.pkt, &w.t)?;
    if pass {
        count(stat::PASS_NO_NEIGH);
        return Ok(xdp_action::XDP_PASS);
    }
    Ok(fib::send(ctx, w.ns.hop.ifindex))
}
