//! Bounds-checked header parsing. Every packet read goes through [`ptr_at`], so the verifier sees
//! one pattern of checks and no read ever crosses `data_end`.
use core::mem::size_of;

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, VipKey, stat};

use crate::maps::count;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;

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

/// The network layer of a parsed packet; addresses in network byte order.
#[derive(Clone, Copy)]
pub enum L3 {
    V4 { saddr: [u8; 4], daddr: [u8; 4] },
    V6 { saddr: [u8; 16], daddr: [u8; 16] },
}

/// What the balancer needs from a TCP or UDP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l3: L3,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Offset of the TCP/UDP header from the start of the frame.
    pub l4_off: usize,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
}

impl Packet {
    #[inline(always)]
    pub fn vip_key_v4(&self, daddr: [u8; 4]) -> VipKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&daddr);
        VipKey { addr, port: self.dport, proto: self.proto, family: FAMILY_V4 }
    }

    #[inline(always)]
    pub fn vip_key_v6(&self, daddr: [u8; 16]) -> VipKey {
        VipKey { addr: daddr, port: self.dport, proto: self.proto, family: FAMILY_V6 }
    }
}

/// Parses Ethernet, IPv4/IPv6 and the TCP/UDP ports. Anything else is `Err(XDP_PASS)`, counted.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, u32> {
    let pass = |reason| {
        count(reason);
        xdp_action::XDP_PASS
    };
    let ethertype: *const u16 = ptr_at(ctx, 12).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
    // SAFETY: ptr_at checked the bounds.
    let ethertype = u16::from_be(unsafe { ethertype.read_unaligned() });
    let (l3, proto, l4_off) = match ethertype {
        ETH_P_IP => {
            let ip: *const [u8; IPV4_HLEN] =
                ptr_at(ctx, ETH_HLEN).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { &*ip };
            let ihl = (ip[0] & 0x0f) as usize * 4;
            let l3 = L3::V4 {
                saddr: [ip[12], ip[13], ip[14], ip[15]],
                daddr: [ip[16], ip[17], ip[18], ip[19]],
            };
            (l3, ip[9], ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            let ip: *const [u8; IPV6_HLEN] =
                ptr_at(ctx, ETH_HLEN).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
            // SAFETY: ptr_at checked the bounds.
            let ip = unsafe { &*ip };
            let mut saddr = [0u8; 16];
            let mut daddr = [0u8; 16];
            saddr.copy_from_slice(&ip[8..24]);
            daddr.copy_from_slice(&ip[24..40]);
            (L3::V6 { saddr, daddr }, ip[6], ETH_HLEN + IPV6_HLEN)
        }
        _ => return Err(pass(stat::PASS_NOT_IP)),
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(pass(stat::PASS_NOT_L4));
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4_off).ok_or_else(|| pass(stat::PASS_TRUNCATED))?;
    // SAFETY: ptr_at checked the bounds.
    let [sport, dport] = unsafe { ports.read_unaligned() };
    Ok(Packet { l3, proto, l4_off, sport, dport })
}
