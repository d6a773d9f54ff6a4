//! Builds Ethernet frames for packet fixtures, with checksums computed from scratch so they can
//! check the XDP program's incremental updates independently.
use std::net::IpAddr;

use lb_common::checksum::{fold, sum};

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp { flags: u8 },
    Udp,
}

/// A TCP or UDP packet in an Ethernet frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub l4: L4,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// IPv4 flags and fragment offset field (host order), e.g. 0x2000 for "more fragments".
    pub frag: u16,
    pub ttl: u8,
    /// TCP sequence number (default 1000).
    pub seq: u32,
}

impl Frame {
    pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            l4: L4::Tcp { flags },
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0x4000,
            ttl: 64,
            seq: 1000,
        }
    }

    pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Self {
        Self { l4: L4::Udp, payload: payload.to_vec(), ..Self::tcp(src, sport, dst, dport, 0) }
    }

    /// The frame's bytes: Ethernet (fixed MACs), IP, L4 header with a correct checksum, payload.
    pub fn bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let mut out = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&0x0800u16.to_be_bytes());
                let hlen = 20 + self.ip_options.len();
                let mut ip = vec![0x40 | (hlen / 4) as u8, 0];
                ip.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34]);
                ip.extend_from_slice(&self.frag.to_be_bytes());
                ip.extend_from_slice(&[self.ttl, self.proto(), 0, 0]);
                ip.extend_from_slice(&s.octets());
                ip.extend_from_slice(&d.octets());
                ip.extend_from_slice(&self.ip_options);
                let c = !fold(sum(&ip, 0));
                ip[10..12].copy_from_slice(&c.to_ne_bytes());
                out.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                out.extend_from_slice(&0x86ddu16.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                out.extend_from_slice(&[self.proto(), self.ttl]);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            _ => panic!("mixed address families"),
        }
        out.extend_from_slice(&l4);
        out
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp => 17,
        }
    }

    fn l4_bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let check_at = match self.l4 {
            L4::Tcp { flags } => {
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&0u32.to_be_bytes());
                l4.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
                16
            }
            L4::Udp => {
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                6
            }
        };
        l4.extend_from_slice(&self.payload);
        let c = l4_checksum(self.src, self.dst, self.proto(), &l4);
        l4[check_at..check_at + 2].copy_from_slice(&c.to_ne_bytes());
        l4
    }
}

/// The TCP/UDP checksum of `l4` (its checksum field zeroed or not: pass zeroed for a fresh one).
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed address families"),
    }
    let c = !fold(sum(l4, sum(&pseudo, 0)));
    if proto == 17 && c == 0 { 0xffff } else { c }
}

/// True when every checksum in an IPv4/IPv6 TCP/UDP frame verifies from scratch (false for a
/// frame whose headers do not even fit).
pub fn checksums_valid(frame: &[u8]) -> bool {
    checksums(frame).unwrap_or(false)
}

fn checksums(frame: &[u8]) -> Option<bool> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match ethertype {
        0x0800 => {
            let hlen = (frame.get(14)? & 0x0f) as usize * 4;
            let ip = frame.get(14..14 + hlen.max(20))?;
            if fold(sum(ip, 0)) != 0xffff {
                return Some(false);
            }
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            (s.into(), d.into(), ip[9], frame.get(14 + hlen..14 + total)?)
        }
        0x86dd => {
            let ip = frame.get(14..54)?;
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            (s.into(), d.into(), ip[6], frame.get(54..54 + plen)?)
        }
        _ => return Some(false),
    };
    let pseudo_and_l4 = l4_checksum(src, dst, proto, l4);
    // A correct checksum field makes the whole sum come out as zero (0xffff before inversion).
    Some(pseudo_and_l4 == 0 || (proto == 17 && pseudo_and_l4 == 0xffff))
}

/// The fields of a TCP/UDP frame the balancer rewrites, read back for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields {
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
}

/// Reads [`Fields`] from an IPv4/IPv6 TCP/UDP frame.
pub fn fields(frame: &[u8]) -> Fields {
    let dmac = frame[0..6].try_into().unwrap();
    let smac = frame[6..12].try_into().unwrap();
    let (src, dst, ttl, l4): (IpAddr, IpAddr, u8, usize) =
        match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => {
                let s: [u8; 4] = frame[26..30].try_into().unwrap();
                let d: [u8; 4] = frame[30..34].try_into().unwrap();
                (s.into(), d.into(), frame[22], 14 + (frame[14] & 0x0f) as usize * 4)
            }
            _ => {
                let s: [u8; 16] = frame[22..38].try_into().unwrap();
                let d: [u8; 16] = frame[38..54].try_into().unwrap();
                (s.into(), d.into(), frame[21], 54)
            }
        };
    Fields {
        dmac,
        smac,
        src,
        dst,
        sport: u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
        dport: u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
        ttl,
    }
}

/// The outer headers of a DSR-encapsulated frame (IP-in-IP, or IP in UDP), read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outer {
    pub dmac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    /// 4 (IPv4-in-IPv4), 41 (IPv6-in-IPv6) or 17 (GUE).
    pub proto: u8,
    /// The UDP ports and length, for GUE.
    pub udp: Option<(u16, u16, u16)>,
    /// The IPv4 header checksum verifies, the DF bit is set (true for IPv6).
    pub header_ok: bool,
    /// The encapsulated packet, from its IP header on.
    pub inner: Vec<u8>,
}

/// Splits an encapsulated frame into its outer headers and the packet inside; the lengths
/// the outer headers state must match the frame.
pub fn outer(frame: &[u8]) -> Result<Outer, String> {
    let short = || format!("frame too short: {} bytes", frame.len());
    let dmac = frame.get(0..6).ok_or_else(short)?.try_into().expect("6 bytes");
    let (src, dst, proto, header_ok, l4) = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let ip = frame.get(14..34).ok_or_else(short)?;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            if total != frame.len() - 14 {
                return Err(format!(
                    "IPv4 total length {total}, frame carries {}",
                    frame.len() - 14
                ));
            }
            let ok = ip[0] == 0x45 && fold(sum(ip, 0)) == 0xffff && ip[6] & 0x40 != 0;
            let (s, d): ([u8; 4], [u8; 4]) =
                (ip[12..16].try_into().unwrap(), ip[16..20].try_into().unwrap());
            (IpAddr::from(s), IpAddr::from(d), ip[9], ok, 34)
        }
        0x86dd => {
            let ip = frame.get(14..54).ok_or_else(short)?;
            let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if plen != frame.len() - 54 {
                return Err(format!(
                    "IPv6 payload length {plen}, frame carries {}",
                    frame.len() - 54
                ));
            }
            let (s, d): ([u8; 16], [u8; 16]) =
                (ip[8..24].try_into().unwrap(), ip[24..40].try_into().unwrap());
            (IpAddr::from(s), IpAddr::from(d), ip[6], true, 54)
        }
        t => return Err(format!("ethertype {t:#06x}")),
    };
    let (udp, inner) = if proto == 17 {
        let u = frame.get(l4..l4 + 8).ok_or_else(short)?;
        let len = u16::from_be_bytes([u[4], u[5]]);
        if len as usize != frame.len() - l4 {
            return Err(format!("UDP length {len}, frame carries {}", frame.len() - l4));
        }
        let ports = (u16::from_be_bytes([u[0], u[1]]), u16::from_be_bytes([u[2], u[3]]), len);
        (Some(ports), frame[l4 + 8..].to_vec())
    } else {
        (None, frame[l4..].to_vec())
    };
    Ok(Outer { dmac, src, dst, proto, udp, header_ok, inner })
}

/// `frame`'s IP packet wrapped as a DSR balancer sends it: in an outer IPv4 (protocol 4) or
/// IPv6 (protocol 41) header from `src` to `dst`, or with `gue_sport` inside UDP to
/// [`lb_common::GUE_PORT`] first. Built independently of the XDP program's encapsulation.
pub fn wrap(frame: &[u8], src: IpAddr, dst: IpAddr, gue_sport: Option<u16>) -> Vec<u8> {
    let inner = &frame[14..];
    let mut payload = Vec::new();
    let proto = match (gue_sport, src) {
        (Some(sport), _) => {
            payload.extend_from_slice(&sport.to_be_bytes());
            payload.extend_from_slice(&lb_common::GUE_PORT.to_be_bytes());
            payload.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
            payload.extend_from_slice(&[0, 0]); // no UDP checksum, as tunnels send
            17
        }
        (None, IpAddr::V4(_)) => 4,
        (None, IpAddr::V6(_)) => 41,
    };
    payload.extend_from_slice(inner);
    let mut out = frame[..12].to_vec();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = !fold(sum(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_ne_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            out.extend_from_slice(&[proto, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => panic!("mixed address families"),
    }
    out.extend_from_slice(&payload);
    out
}
