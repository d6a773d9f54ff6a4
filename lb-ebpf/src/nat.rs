//! Header rewriting for full NAT: MACs, addresses, ports, TTL, and incremental checksums
//! (RFC 1624), so no byte of payload is ever read.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    FAMILY_V4, PROTO_UDP,
    checksum::{replace16, replace32, replace128},
};

use crate::{
    hdr::{eth, ipv4, ipv6, tcp, udp},
    parse::{Packet, ptr_at},
};

const L4_OFF_MASK: usize = 0x7f;

/// The new outer identity of a packet.
#[repr(C, align(8))]
pub struct Translation {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Rewrites the frame in place. The packet was parsed by [`crate::parse::parse`], so every
/// header checked there is present; the checks here are for the verifier. Not inlined: one
/// copy serves both directions and its locals get their own stack frame.
#[inline(never)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, t: &Translation) -> Result<(), u32> {
    let abort = xdp_action::XDP_ABORTED;
    let macs: *mut [u8; eth::MACS] = ptr_at(ctx, 0).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds; the frame is ours to modify.
    let macs = unsafe { &mut *macs };
    macs[eth::DST].copy_from_slice(&t.dmac);
    macs[eth::SRC].copy_from_slice(&t.smac);
    // The offset came through the scratch map, so the verifier no longer knows its range; the
    // mask restores one (it is at most 14 + 60 for IPv4 with options).
    let l4_off = pkt.l4_off & L4_OFF_MASK;
    let l4_check_off = if pkt.proto == PROTO_UDP { udp::CHECK } else { tcp::CHECK };
    let check: *mut [u8; 2] = ptr_at(ctx, l4_off + l4_check_off).ok_or(abort)?;
    let ports: *mut [u8; 4] = ptr_at(ctx, l4_off).ok_or(abort)?;
    // SAFETY: ptr_at checked the bounds.
    let mut l4_check = u16::from_ne_bytes(unsafe { *check });
    // An IPv4 UDP checksum of zero means "none"; it stays none.
    let l4_has_check = !(pkt.proto == PROTO_UDP && pkt.family == FAMILY_V4 && l4_check == 0);

    if pkt.family == FAMILY_V4 {
        let ip: *mut [u8; ipv4::LEN] = ptr_at(ctx, eth::LEN).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &mut *ip };
        let (old_src, old_dst, new_src, new_dst) =
            (ipv4::of(&pkt.src), ipv4::of(&pkt.dst), ipv4::of(&t.src), ipv4::of(&t.dst));
        let (check, ttl) = (ipv4::CHECK, ipv4::TTL);
        let mut ip_check = u16::from_ne_bytes([ip[check], ip[check + 1]]);
        ip_check = replace32(ip_check, old_src, new_src);
        ip_check = replace32(ip_check, old_dst, new_dst);
        // TTL shares its checksum word with the protocol.
        let old_ttl_word = u16::from_ne_bytes([ip[ttl], ip[ttl + 1]]);
        ip[ttl] = pkt.ttl - 1;
        ip_check = replace16(ip_check, old_ttl_word, u16::from_ne_bytes([ip[ttl], ip[ttl + 1]]));
        ip[check..check + 2].copy_from_slice(&ip_check.to_ne_bytes());
        ip[ipv4::SRC].copy_from_slice(&new_src);
        ip[ipv4::DST].copy_from_slice(&new_dst);
        if l4_has_check {
            l4_check = replace32(l4_check, old_src, new_src);
            l4_check = replace32(l4_check, old_dst, new_dst);
        }
    } else {
        let ip: *mut [u8; ipv6::LEN] = ptr_at(ctx, eth::LEN).ok_or(abort)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &mut *ip };
        ip[ipv6::HOP_LIMIT] = pkt.ttl - 1;
        ip[ipv6::SRC].copy_from_slice(&t.src);
        ip[ipv6::DST].copy_from_slice(&t.dst);
        l4_check = replace128(l4_check, &pkt.src, &t.src);
        l4_check = replace128(l4_check, &pkt.dst, &t.dst);
    }
    if l4_has_check {
        l4_check = replace16(l4_check, pkt.sport, t.sport);
        l4_check = replace16(l4_check, pkt.dport, t.dport);
        // In UDP a computed zero is sent as all ones (zero would mean "no checksum").
        if pkt.proto == PROTO_UDP && l4_check == 0 {
            l4_check = 0xffff;
        }
        // SAFETY: ptr_at checked the bounds.
        unsafe { *check = l4_check.to_ne_bytes() };
    }
    let (s, d) = (t.sport.to_ne_bytes(), t.dport.to_ne_bytes());
    // SAFETY: ptr_at checked the bounds.
    unsafe { *ports = [s[0], s[1], d[0], d[1]] };
    Ok(())
}
