//! Bounds-checked header parsing. Every packet read goes through [`ptr_at`], so the verifier sees
//! one pattern of checks and no read ever crosses `data_end`.
use core::mem::size_of;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, stat};

use crate::maps::count;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const ICMP_HLEN: usize = 8;

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
    let ethertype: *const [u8; 2] = ptr_at(ctx, 12).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
    // SAFETY: ptr_at checked the bounds.
    let ethertype = u16::from_be_bytes(unsafe { *ethertype });
    zero16(&mut pkt.src);
    zero16(&mut pkt.dst);
    let (family, proto, l4_off, ip_len, ttl) = match ethertype {
        ETH_P_IP => {
            let ip: *const [u8; IPV4_HLEN] =
                ptr_at(ctx, ETH_HLEN).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { &*ip };
            let ihl = (ip[0] & 0x0f) as usize * 4;
            if ip[0] >> 4 != 4 || ihl < IPV4_HLEN {
                return Err(pass(stat::PASS_BAD_HEADER));
            }
            // Non-first fragments carry no ports; first fragments are incomplete. Both go to
            // the kernel, which reassembles what is for this host.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err(pass(stat::PASS_FRAGMENT));
            }
            pkt.src[..4].copy_from_slice(&ip[12..16]);
            pkt.dst[..4].copy_from_slice(&ip[16..20]);
            (FAMILY_V4, ip[9], ETH_HLEN + ihl, u16::from_be_bytes([ip[2], ip[3]]), ip[8])
        }
        ETH_P_IPV6 => {
            let ip: *const [u8; IPV6_HLEN] =
                ptr_at(ctx, ETH_HLEN).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { &*ip };
            pkt.src.copy_from_slice(&ip[8..24]);
            pkt.dst.copy_from_slice(&ip[24..40]);
            let len = u16::from_be_bytes([ip[4], ip[5]]).saturating_add(IPV6_HLEN as u16);
            (FAMILY_V6, ip[6], ETH_HLEN + IPV6_HLEN, len, ip[7])
        }
        _ => return Err(pass(stat::PASS_NOT_IP)),
    };
    let (tcp_flags, seq, seq_len) = match proto {
        PROTO_TCP => {
            let tcp: *const [u8; TCP_HLEN] =
                ptr_at(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let tcp = unsafe { &*tcp };
            let flags = tcp[13];
            // Lengths from the headers, not the frame (which may carry Ethernet padding); a
            // bogus header only yields a bogus length, used for RST checks alone.
            let headers = (l4_off - ETH_HLEN) as u32 + (tcp[12] >> 4) as u32 * 4;
            let payload = (ip_len as u32).saturating_sub(headers);
            let len = payload + (flags & 0x02 != 0) as u32 + (flags & 0x01 != 0) as u32;
            (flags, u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), len)
        }
        PROTO_UDP => {
            ptr_at::<[u8; UDP_HLEN]>(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            (0, 0, 0)
        }
        // Maybe an error about a balanced flow: `icmp::error` reads the rest.
        PROTO_ICMP | PROTO_ICMPV6 => {
            ptr_at::<[u8; ICMP_HLEN]>(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            (0, 0, 0)
        }
        // IPv6 extension headers, GRE, SCTP, ...
        _ => return Err(pass(stat::PASS_NOT_L4)),
    };
    let ports: *const [u8; 4] = ptr_at(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
    // SAFETY: ptr_at checked the bounds.
    let ports = unsafe { *ports };
    pkt.family = family;
    pkt.proto = proto;
    pkt.l4_off = l4_off;
    pkt.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    pkt.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    pkt.tcp_flags = tcp_flags;
    pkt.seq = seq;
    pkt.seq_len = seq_len;
    pkt.ip_len = ip_len;
    pkt.ttl = ttl;
    Ok(())
}
