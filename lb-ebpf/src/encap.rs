//! Direct server return: the client's packet goes to its backend untouched, inside an outer
//! IPv4 (IPv4-in-IPv4, protocol 4) or IPv6 (IPv6-in-IPv6, next header 41) header, or inside
//! outer IP + UDP (GUE variant 1: the inner packet right after the UDP header). The backend
//! unwraps it (`lb decap`, or the kernel's ipip/ip6tnl) and answers the client from the VIP
//! itself, so no reply crosses the balancer and nothing is translated. Katran's encap path.
use aya_ebpf::{
    EbpfContext as _, bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext,
};
use lb_common::{
    ENCAP_GUE, ENCAP_V4, ENCAP_V6, FAMILY_V4, FLOW_F_GUE, GUE_PORT, checksum, hash, stat,
};

use crate::{
    fib,
    hdr::{eth, ipv4, ipv6, udp},
    maps::count,
    parse::{Packet, ptr_at},
    scratch::Work,
};

/// IP protocol numbers of the outer header.
const PROTO_IPIP: u8 = 4;
const PROTO_IPV6: u8 = 41;
const PROTO_UDP: u8 = 17;
/// Outer TTL / hop limit: the tunnel is one logical hop, routed like any packet.
const OUTER_TTL: u8 = 64;
/// GUE source ports come from the ephemeral range, picked by flow hash.
const SPORT_BASE: u16 = 49152;

/// The bytes DSR adds in front of a packet of `family`, with GUE or not.
#[inline(always)]
pub fn overhead(family: u8, gue: bool) -> u16 {
    let ip = if family == FAMILY_V4 { ENCAP_V4 } else { ENCAP_V6 };
    if gue { ip + ENCAP_GUE } else { ip }
}

/// The outer UDP source port of a new GUE flow (network byte order): from the ephemeral
/// range by flow hash, so the backend's NIC spreads flows over its queues. Picked once, when
/// the flow is created (`FlowState::encap_sport`).
#[inline(always)]
pub fn gue_sport(p: &Packet) -> u16 {
    let h = hash::five_tuple_hash(&p.src, &p.dst, p.sport, p.dport, p.proto);
    (SPORT_BASE | (h as u16 & 0x3fff)).to_be()
}

/// Wraps the frame for `w.be` (outer source `w.st.snat`, next hop `w.st.hop`) and sends it;
/// the caller checked that it fits the route's MTU with [`overhead`] more. Not inlined: its
/// locals stay out of the forwarding path's frame.
#[inline(never)]
pub fn send(ctx: &XdpContext, w: &mut Work, frame_len: u64) -> Result<u32, u32> {
    let abort = xdp_action::XDP_ABORTED;
    let v4 = w.pkt.family == FAMILY_V4;
    let gue = w.st.flags & FLOW_F_GUE != 0;
    let extra = overhead(w.pkt.family, gue);
    let inner_len = (frame_len as usize).saturating_sub(eth::LEN) as u16;
    // SAFETY: ctx is this program's xdp_md; the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -(extra as i32)) } != 0 {
        return Err(abort);
    }
    let macs: *mut [u8; eth::LEN] = ptr_at(ctx, 0).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds; the frame is ours to modify.
    let e = unsafe { &mut *macs };
    e[eth::DST].copy_from_slice(&w.st.hop.dmac);
    e[eth::SRC].copy_from_slice(&w.st.hop.smac);
    let ethertype = if v4 { eth::P_IPV4 } else { eth::P_IPV6 };
    e[eth::TYPE..eth::TYPE + 2].copy_from_slice(&ethertype.to_be_bytes());
    let ip_len = if v4 { ipv4::LEN } else { ipv6::LEN };
    let inner_proto = if v4 { PROTO_IPIP } else { PROTO_IPV6 };
    let proto = if gue { PROTO_UDP } else { inner_proto };
    if v4 {
        let ip: *mut [u8; ipv4::LEN] = ptr_at(ctx, eth::LEN).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        outer_v4(unsafe { &mut *ip }, w, inner_len + extra, proto);
    } else {
        let ip: *mut [u8; ipv6::LEN] = ptr_at(ctx, eth::LEN).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        outer_v6(unsafe { &mut *ip }, w, inner_len + extra - ENCAP_V6, proto);
    }
    if gue {
        let u: *mut [u8; udp::LEN] = ptr_at(ctx, eth::LEN + ip_len).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let u = unsafe { &mut *u };
        u[0..2].copy_from_slice(&w.st.encap_sport.to_ne_bytes());
        u[2..4].copy_from_slice(&GUE_PORT.to_be_bytes());
        u[4..6].copy_from_slice(&(inner_len + ENCAP_GUE).to_be_bytes());
        // No checksum: the inner packet carries its own (IPv4 allows zero; for IPv6, RFC 6935
        // allows it for tunnels, and `lb decap` accepts it).
        u[udp::CHECK..udp::CHECK + 2].copy_from_slice(&[0, 0]);
    }
    count(stat::DSR_ENCAP);
    Ok(fib::send(ctx, w.st.hop.ifindex))
}

/// An IPv4 header of `total` bytes from the node (`w.st.snat`) to the backend, DF set (the
/// inner packet's path MTU is enforced above, not by fragments), checksum filled.
#[inline(always)]
fn outer_v4(ip: &mut [u8; ipv4::LEN], w: &Work, total: u16, proto: u8) {
    ip[ipv4::VER_IHL] = 0x45;
    ip[1] = 0;
    ip[ipv4::TOTAL_LEN..ipv4::TOTAL_LEN + 2].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 0]);
    ip[ipv4::FRAG..ipv4::FRAG + 2].copy_from_slice(&0x4000u16.to_be_bytes());
    ip[ipv4::TTL] = OUTER_TTL;
    ip[ipv4::PROTO] = proto;
    ip[ipv4::CHECK..ipv4::CHECK + 2].copy_from_slice(&[0, 0]);
    ip[ipv4::SRC].copy_from_slice(&ipv4::of(&w.st.snat));
    ip[ipv4::DST].copy_from_slice(&ipv4::of(&w.be.addr));
    let check = !checksum::fold(checksum::sum(ip, 0));
    ip[ipv4::CHECK..ipv4::CHECK + 2].copy_from_slice(&check.to_ne_bytes());
}

/// An IPv6 header with `payload` bytes after it from the node to the backend.
#[inline(always)]
fn outer_v6(ip: &mut [u8; ipv6::LEN], w: &Work, payload: u16, next: u8) {
    ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    ip[ipv6::PAYLOAD_LEN..ipv6::PAYLOAD_LEN + 2].copy_from_slice(&payload.to_be_bytes());
    ip[ipv6::NEXT] = next;
    ip[ipv6::HOP_LIMIT] = OUTER_TTL;
    ip[ipv6::SRC].copy_from_slice(&w.st.snat);
    ip[ipv6::DST].copy_from_slice(&w.be.addr);
}
