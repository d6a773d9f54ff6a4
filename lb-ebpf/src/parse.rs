//! Bounds-checked header parsing. Every packet read goes through [`ptr_at`], so the verifier sees
//! one pattern of checks and no read ever crosses `data_end`.
use core::mem::size_of;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, stat};

use crate::{
    hdr::{eth, icmp, ipv4, ipv6, ports, tcp, udp},
    maps::count,
};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// The big-endian 16-bit field at `at` of a header.
#[inline(always)]
pub fn be16<const N: usize>(h: &[u8; N], at: usize) -> u16 {
    u16::from_be_bytes([h[at], h[at + 1]])
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` if it does not fit.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What the balancer needs from a TCP or UDP packet. Addresses and ports in network byte order;
/// an IPv4 address fills the first 4 bytes of its 16. Aligned so that copies of its addresses
/// into map keys compile to word moves instead of byte moves.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct Packet {
    // Addresses first, at 8-byte aligned offsets: copies into keys become word moves.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    /// [`PROTO_TCP`], [`PROTO_UDP`], or [`PROTO_ICMP`]/[`PROTO_ICMPV6`] (then the ports are
    /// the ICMP header's first four bytes, and `l4_off` is where it starts).
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Hop limit / TTL.
    pub ttl: u8,
    pub sport: u16,
    pub dport: u16,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    /// The IP packet's length (IPv4 total length, or IPv6 payload + header), host byte order.
    pub ip_len: u16,
    /// TCP sequence number, host byte order (0 for UDP).
    pub seq: u32,
    /// Sequence space the TCP segment takes: payload, plus one for SYN and one for FIN.
    pub seq_len: u32,
}

/// Zeroes an 8-byte aligned address with two word stores (a plain `= [0; 16]` of both
/// addresses becomes a call to a byte-loop memset in BPF).
#[inline(always)]
pub fn zero16(a: &mut [u8; 16]) {
    let words = a.as_mut_ptr() as *mut u64;
    // SAFETY: every caller passes a field of an align(8) struct at an 8-byte aligned offset.
    unsafe {
        words.write_volatile(0);
        words.add(1).write_volatile(0);
    }
}

/// Parses Ethernet, IPv4/IPv6 and the TCP/UDP header into `pkt`. Anything the balancer does not
/// handle is `Err(XDP_PASS)`, counted by reason: the kernel gets it unchanged.
#[inline(always)]
pub fn parse(ctx: &XdpContext, pkt: &mut Packet) -> Result<(), u32> {
    let pass = |reason| {
        count(reason);
        xdp_action::XDP_PASS
    };
    let ethertype: *const [u8; 2] =
        ptr_at(ctx, eth::TYPE).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
    // SAFETY: ptr_at checked the bounds.
    let ethertype = u16::from_be_bytes(unsafe { *ethertype });
    zero16(&mut pkt.src);
    zero16(&mut pkt.dst);
    let (family, proto, l4_off, ip_len, ttl) = match ethertype {
        eth::P_IPV4 => {
            let ip: *const [u8; ipv4::LEN] =
                ptr_at(ctx, eth::LEN).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { &*ip };
            let ihl = (ip[ipv4::VER_IHL] & 0x0f) as usize * 4;
            if ip[ipv4::VER_IHL] >> 4 != 4 || ihl < ipv4::LEN {
                return Err(pass(stat::PASS_BAD_HEADER));
            }
            // Non-first fragments carry no ports; first fragments are incomplete. Both go to
            // the kernel, which reassembles what is for this host.
            if be16(ip, ipv4::FRAG) & ipv4::FRAG_MASK != 0 {
                return Err(pass(stat::PASS_FRAGMENT));
            }
            pkt.src[..4].copy_from_slice(&ip[ipv4::SRC]);
            pkt.dst[..4].copy_from_slice(&ip[ipv4::DST]);
            let total = be16(ip, ipv4::TOTAL_LEN);
            (FAMILY_V4, ip[ipv4::PROTO], eth::LEN + ihl, total, ip[ipv4::TTL])
        }
        eth::P_IPV6 => {
            let ip: *const [u8; ipv6::LEN] =
                ptr_at(ctx, eth::LEN).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { &*ip };
            pkt.src.copy_from_slice(&ip[ipv6::SRC]);
            pkt.dst.copy_from_slice(&ip[ipv6::DST]);
            let len = be16(ip, ipv6::PAYLOAD_LEN).saturating_add(ipv6::LEN as u16);
            (FAMILY_V6, ip[ipv6::NEXT], eth::LEN + ipv6::LEN, len, ip[ipv6::HOP_LIMIT])
        }
        _ => return Err(pass(stat::PASS_NOT_IP)),
    };
    let (tcp_flags, seq, seq_len) = match proto {
        PROTO_TCP => {
            let h: *const [u8; tcp::LEN] =
                ptr_at(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let h = unsafe { &*h };
            let flags = h[tcp::FLAGS];
            // Lengths from the headers, not the frame (which may carry Ethernet padding); a
            // bogus header only yields a bogus length, used for RST checks alone.
            let headers = (l4_off - eth::LEN) as u32 + (h[tcp::DATA_OFF] >> 4) as u32 * 4;
            let payload = (ip_len as u32).saturating_sub(headers);
            let len = payload + (flags & tcp::SYN != 0) as u32 + (flags & tcp::FIN != 0) as u32;
            let s = tcp::SEQ;
            (flags, u32::from_be_bytes([h[s], h[s + 1], h[s + 2], h[s + 3]]), len)
        }
        PROTO_UDP => {
            ptr_at::<[u8; udp::LEN]>(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            (0, 0, 0)
        }
        // Maybe an error about a balanced flow: `icmp::error` reads the rest.
        PROTO_ICMP | PROTO_ICMPV6 => {
            ptr_at::<[u8; icmp::LEN]>(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            (0, 0, 0)
        }
        // IPv6 extension headers, GRE, SCTP, ...
        _ => return Err(pass(stat::PASS_NOT_L4)),
    };
    let p: *const [u8; ports::LEN] =
        ptr_at(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
    // SAFETY: ptr_at checked the bounds.
    let p = unsafe { *p };
    pkt.family = family;
    pkt.proto = proto;
    pkt.l4_off = l4_off;
    pkt.sport = u16::from_ne_bytes([p[0], p[1]]);
    pkt.dport = u16::from_ne_bytes([p[2], p[3]]);
    pkt.tcp_flags = tcp_flags;
    pkt.seq = seq;
    pkt.seq_len = seq_len;
    pkt.ip_len = ip_len;
    pkt.ttl = ttl;
    Ok(())
}
