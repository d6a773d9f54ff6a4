//! The PROXY protocol (haproxy's proxy-protocol.txt), versions 1 (text) and 2 (binary): encode
//! the header sent to backends, decode the header trusted sources send to us.
//!
//! Pure functions of `&[u8]` using only `std`: the fuzz targets include this file as is.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature: `\r\n\r\n\0\r\nQUIT\n`.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included (the spec's 107).
pub const V1_MAX: usize = 107;
/// v2 headers with more TLV bytes than this are refused (the spec allows 64 KiB; nobody needs it).
pub const V2_MAX_PAYLOAD: usize = 4096;

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The original client and the address it connected to; `None` for v2 LOCAL (health checks
    /// by the proxy itself), v1 UNKNOWN and address families without IP.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Header bytes to consume from the stream.
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// Neither signature: the peer sent no PROXY header.
    NotProxy,
    /// A PROXY header that breaks the spec.
    Malformed(&'static str),
}

/// The v1 line for a TCP connection from `src` to `dst`. Mixed families are written as TCP6 with
/// the IPv4 address mapped.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!("PROXY {fam} {} {} {} {}\r\n", s.ip(), d.ip(), s.port(), d.port()).into_bytes()
}

/// The v2 header (command PROXY, stream over IPv4 or IPv6) for a TCP connection, no TLVs.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (s.ip(), d.ip()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            out.push(0x11);
            out.extend(12u16.to_be_bytes());
            out.extend(a.octets());
            out.extend(b.octets());
        }
        (a, b) => {
            out.push(0x21);
            out.extend(36u16.to_be_bytes());
            out.extend(v6(a).octets());
            out.extend(v6(b).octets());
        }
    }
    out.extend(s.port().to_be_bytes());
    out.extend(d.port().to_be_bytes());
    out
}

/// The v2 LOCAL header: "this connection is the proxy's own", no addresses.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend([0x20, 0x00, 0, 0]);
    out
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    }
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (canonical(src), canonical(dst));
    if s.is_ipv4() == d.is_ipv4() {
        return (s, d);
    }
    (SocketAddr::new(v6(s.ip()).into(), s.port()), SocketAddr::new(v6(d.ip()).into(), d.port()))
}

/// `::ffff:a.b.c.d` → `a.b.c.d`, so a dual-stack listener reports IPv4 clients as IPv4.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Parses a v1 or v2 header at the start of `data`. `Ok(None)`: a valid prefix, read more.
/// Never panics, whatever the input.
pub fn parse(data: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let n = data.len().min(V2_SIGNATURE.len());
    if data[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() { Ok(None) } else { parse_v2(data) };
    }
    let n = data.len().min(V1_PREFIX.len());
    if data[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() { Ok(None) } else { parse_v1(data) };
    }
    Err(ProxyHeaderError::NotProxy)
}

fn parse_v1(data: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let window = &data[..data.len().min(V1_MAX)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if window.len() >= V1_MAX {
            return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
        }
        if window.contains(&b'\n') {
            return Err(ProxyHeaderError::Malformed("v1 line ends without CR"));
        }
        return Ok(None);
    };
    match data.get(cr + 1) {
        _ if cr + 2 > V1_MAX => {
            return Err(ProxyHeaderError::Malformed("v1 line longer than 107 bytes"));
        }
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyHeaderError::Malformed("v1 CR not followed by LF")),
    }
    let line = std::str::from_utf8(&data[V1_PREFIX.len()..cr])
        .map_err(|_| ProxyHeaderError::Malformed("v1 line is not ASCII"))?;
    let len = cr + 2;
    let parts: Vec<&str> = line.split(' ').collect();
    if parts.first() == Some(&"UNKNOWN") {
        // The rest of the line may hold anything; the receiver ignores it.
        return Ok(Some(ProxyHeader { addrs: None, len }));
    }
    let [fam, src, dst, sport, dport] = parts[..] else {
        return Err(ProxyHeaderError::Malformed("v1 needs 5 fields after PROXY"));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        match fam {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
            _ => {
                return Err(ProxyHeaderError::Malformed(
                    "v1 protocol is not TCP4, TCP6 or UNKNOWN",
                ));
            }
        }
        .map_err(|_| ProxyHeaderError::Malformed("v1 address does not match the protocol"))
    };
    let port = |s: &str| -> Result<u16, ProxyHeaderError> {
        let ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
        let ok = ok && (s == "0" || !s.starts_with('0'));
        ok.then(|| s.parse::<u16>().ok())
            .flatten()
            .ok_or(ProxyHeaderError::Malformed("v1 port is not a number 0-65535"))
    };
    let src = SocketAddr::new(ip(src)?, port(sport)?);
    let dst = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Some(ProxyHeader { addrs: Some((src, dst)), len }))
}

fn parse_v2(data: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let Some(h) = data.get(12..16) else { return Ok(None) };
    let (ver_cmd, fam) = (h[0], h[1]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version is not 2"));
    }
    let cmd = ver_cmd & 0x0f;
    if cmd > 1 {
        return Err(ProxyHeaderError::Malformed("v2 command is neither LOCAL nor PROXY"));
    }
    let payload = u16::from_be_bytes([h[2], h[3]]) as usize;
    if payload > V2_MAX_PAYLOAD {
        return Err(ProxyHeaderError::Malformed("v2 header longer than 4096 bytes"));
    }
    let need = match fam {
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        0x00 => 0,
        _ => return Err(ProxyHeaderError::Malformed("v2 unknown address family")),
    };
    if payload < need {
        return Err(ProxyHeaderError::Malformed("v2 length shorter than its addresses"));
    }
    let len = 16 + payload;
    let Some(body) = data.get(16..len) else { return Ok(None) };
    if cmd == 0 {
        // LOCAL: the addresses, if any, are to be ignored.
        return Ok(Some(ProxyHeader { addrs: None, len }));
    }
    let port = |i: usize| u16::from_be_bytes([body[i], body[i + 1]]);
    let addrs = match fam {
        0x11 | 0x12 => {
            let ip = |i: usize| IpAddr::from([body[i], body[i + 1], body[i + 2], body[i + 3]]);
            Some((SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10))))
        }
        0x21 | 0x22 => {
            let ip = |i: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[i..i + 16]);
                IpAddr::from(b)
            };
            Some((SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34))))
        }
        // Unix sockets and UNSPEC carry no IP address to report.
        _ => None,
    };
    Ok(Some(ProxyHeader { addrs, len }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_matches_the_spec_example_and_round_trips() {
        let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /";
        let h = parse(line).unwrap().unwrap();
        assert_eq!(h.addrs, Some((sa("192.168.0.1:56324"), sa("192.168.0.11:443"))));
        assert_eq!(h.len, 47);
        assert_eq!(encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443")), &line[..47]);
        let enc = encode_v1(sa("[2001:db8::1]:1"), sa("10.0.0.1:65535"));
        assert_eq!(enc, b"PROXY TCP6 2001:db8::1 ::ffff:10.0.0.1 1 65535\r\n");
        let h = parse(&enc).unwrap().unwrap();
        assert_eq!(h.addrs.unwrap().0, sa("[2001:db8::1]:1"));
        assert_eq!(parse(b"PROXY UNKNOWN whatever\r\n").unwrap().unwrap().addrs, None);
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().len, 15);
    }

    #[test]
    fn v2_matches_hand_written_bytes_and_round_trips() {
        let enc = encode_v2(sa("10.1.2.3:4000"), sa("10.9.9.9:443"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend([0x21, 0x11, 0, 12, 10, 1, 2, 3, 10, 9, 9, 9, 0x0f, 0xa0, 0x01, 0xbb]);
        assert_eq!(enc, want);
        let h = parse(&enc).unwrap().unwrap();
        assert_eq!(h.addrs, Some((sa("10.1.2.3:4000"), sa("10.9.9.9:443"))));
        assert_eq!(h.len, 28);
        let enc = encode_v2(sa("[::ffff:10.1.2.3]:4000"), sa("[2001:db8::2]:443"));
        assert_eq!(enc.len(), 52);
        let h = parse(&enc).unwrap().unwrap();
        assert_eq!(h.addrs.unwrap().0, sa("[::ffff:10.1.2.3]:4000"));
        assert_eq!(
            parse(&encode_v2_local()).unwrap().unwrap(),
            ProxyHeader { addrs: None, len: 16 }
        );
        // TLVs after the addresses are skipped.
        let mut tlv = encode_v2(sa("1.2.3.4:5"), sa("5.6.7.8:9"));
        tlv[15] += 5;
        tlv.extend([0x04, 0, 2, 0xab, 0xcd, b'x']);
        assert_eq!(parse(&tlv).unwrap().unwrap().len, 33);
    }

    #[test]
    fn every_prefix_asks_for_more() {
        for whole in
            [encode_v1(sa("1.2.3.4:5"), sa("5.6.7.8:9")), encode_v2(sa("[::1]:5"), sa("[::2]:9"))]
        {
            for n in 0..whole.len() {
                assert_eq!(parse(&whole[..n]), Ok(None), "prefix {n}");
            }
        }
    }

    #[test]
    fn refuses_what_the_spec_forbids() {
        assert_eq!(parse(b"GET / HTTP/1.1"), Err(ProxyHeaderError::NotProxy));
        assert_eq!(parse(b"\x16\x03\x01"), Err(ProxyHeaderError::NotProxy));
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        ] {
            assert!(
                matches!(parse(bad), Err(ProxyHeaderError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
        assert!(matches!(parse(&long), Err(ProxyHeaderError::Malformed(_))));
        let mut v2 = encode_v2(sa("1.2.3.4:5"), sa("5.6.7.8:9"));
        v2[12] = 0x31;
        assert!(matches!(parse(&v2), Err(ProxyHeaderError::Malformed(_))));
        let mut v2 = encode_v2(sa("1.2.3.4:5"), sa("5.6.7.8:9"));
        v2[15] = 4;
        assert!(matches!(parse(&v2), Err(ProxyHeaderError::Malformed(_))));
        let mut v2 = encode_v2(sa("1.2.3.4:5"), sa("5.6.7.8:9"));
        v2[14] = 0x20;
        assert!(matches!(parse(&v2), Err(ProxyHeaderError::Malformed(_))));
    }
}
