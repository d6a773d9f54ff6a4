//! ICMP and ICMPv6 error frames for packet fixtures: built with checksums computed from scratch,
//! and read back (outer addresses, type, the quoted packet) with every checksum verified the
//! same way, independently of the XDP program's incremental updates.
use std::net::IpAddr;

use lb_common::checksum::{fold, sum};

/// ICMP "destination unreachable" and its "fragmentation needed" code; ICMPv6 "packet too big".
pub const DEST_UNREACH: u8 = 3;
pub const FRAG_NEEDED: u8 = 4;
pub const PORT_UNREACH: u8 = 3;
pub const V6_DEST_UNREACH: u8 = 1;
pub const V6_PACKET_TOO_BIG: u8 = 2;
pub const V6_PORT_UNREACH: u8 = 4;

/// An ICMP error from `src` to `dst` quoting `quoted` (an IP packet, or its first bytes); `rest`
/// is the header's last four bytes (the MTU for "too big").
pub fn error(src: IpAddr, dst: IpAddr, kind: u8, code: u8, rest: u32, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let c = !fold(sum(&icmp, 0));
            icmp[2..4].copy_from_slice(&c.to_ne_bytes());
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = !fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let c = !fold(sum(&icmp, pseudo6(src, dst, icmp.len())));
            icmp[2..4].copy_from_slice(&c.to_ne_bytes());
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            out.extend_from_slice(&[58, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(&icmp);
    out
}

fn pseudo6(src: IpAddr, dst: IpAddr, len: usize) -> u32 {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else { panic!("IPv6 only") };
    let mut p = Vec::new();
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 58]);
    sum(&p, 0)
}

/// An ICMP frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Icmp {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub kind: u8,
    pub code: u8,
    /// The header's last four bytes (the MTU of "too big").
    pub rest: u32,
    /// The quoted packet, as carried.
    pub quoted: Vec<u8>,
}

/// Reads an ICMP/ICMPv6 frame, or says what is wrong with it (lengths, protocol, or any
/// checksum: outer IPv4 header, ICMP with ICMPv6's pseudo-header, quoted IPv4 header).
pub fn parse(frame: &[u8]) -> Result<Icmp, String> {
    let get = |r: std::ops::Range<usize>| frame.get(r).ok_or("frame too short".to_string());
    let (src, dst, ttl, icmp): (IpAddr, IpAddr, u8, &[u8]) =
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => {
                let ip = get(14..34)?;
                if ip[0] != 0x45 || ip[9] != 1 {
                    return Err(format!("not a plain ICMP IPv4 header: {ip:02x?}"));
                }
                if fold(sum(ip, 0)) != 0xffff {
                    return Err("outer IPv4 checksum".into());
                }
                let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
                let s: [u8; 4] = ip[12..16].try_into().unwrap();
                let d: [u8; 4] = ip[16..20].try_into().unwrap();
                (s.into(), d.into(), ip[8], get(34..14 + total)?)
            }
            0x86dd => {
                let ip = get(14..54)?;
                if ip[6] != 58 {
                    return Err(format!("next header {} is not ICMPv6", ip[6]));
                }
                let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
                let s: [u8; 16] = ip[8..24].try_into().unwrap();
                let d: [u8; 16] = ip[24..40].try_into().unwrap();
                (s.into(), d.into(), ip[7], get(54..54 + plen)?)
            }
            t => return Err(format!("ethertype {t:#x}")),
        };
    let initial = if src.is_ipv6() { pseudo6(src, dst, icmp.len()) } else { 0 };
    if fold(sum(icmp, initial)) != 0xffff {
        return Err("ICMP checksum".into());
    }
    let quoted = icmp[8..].to_vec();
    if src.is_ipv4() && quoted.len() >= 20 && fold(sum(&quoted[..20], 0)) != 0xffff {
        return Err("quoted IPv4 header checksum".into());
    }
    Ok(Icmp {
        dmac: frame[0..6].try_into().unwrap(),
        smac: frame[6..12].try_into().unwrap(),
        src,
        dst,
        ttl,
        kind: icmp[0],
        code: icmp[1],
        rest: u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
        quoted,
    })
}

/// Addresses and ports of a quoted TCP/UDP packet: (src, sport, dst, dport).
pub fn quoted_tuple(quoted: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let (src, dst, l4): (IpAddr, IpAddr, usize) = if quoted[0] >> 4 == 4 {
        let s: [u8; 4] = quoted[12..16].try_into().unwrap();
        let d: [u8; 4] = quoted[16..20].try_into().unwrap();
        (s.into(), d.into(), (quoted[0] & 0x0f) as usize * 4)
    } else {
        let s: [u8; 16] = quoted[8..24].try_into().unwrap();
        let d: [u8; 16] = quoted[24..40].try_into().unwrap();
        (s.into(), d.into(), 40)
    };
    let port = |at: usize| u16::from_be_bytes([quoted[at], quoted[at + 1]]);
    (src, port(l4), dst, port(l4 + 2))
}
