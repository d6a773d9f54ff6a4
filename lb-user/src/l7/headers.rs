//! Header rules between client and backend: hop-by-hop headers removed (RFC 9110 §7.6.1),
//! X-Forwarded-For/-Proto/-Host and Forwarded (RFC 7239) added, incoming ones kept only from
//! trusted proxies.
use std::net::IpAddr;

use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that only concern one connection, whatever `Connection` lists.
/// (`Trailer` is not one: RFC 9110 §6.6.2 keeps it end to end.)
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers and those named in `Connection`; `Upgrade` too (the proxy
/// re-adds it for an upgrade it forwards).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The protocol a request asks to switch to (`Connection: upgrade` with `Upgrade`).
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned()).flatten()
}

/// What the proxy knows about the client side of a request.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub addr: IpAddr,
    /// `http` or `https`, as the client spoke to the proxy.
    pub proto: &'static str,
    /// The Host (or :authority) the client sent.
    pub host: Option<&'a str>,
    /// The client is a proxy whose forwarding headers are believed.
    pub trusted: bool,
}

/// The client's address as forwarding fields show it: IPv4-mapped IPv6 as IPv4.
pub fn unmapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

/// Writes `addr` as text (no allocation: straight into `out`).
pub fn write_addr(out: &mut Vec<u8>, addr: IpAddr) {
    use std::io::Write as _;
    let _ = write!(out, "{addr}");
}

/// Writes one RFC 7239 element: `for=ADDR;proto=PROTO[;host=HOST]`.
pub fn write_forwarded(out: &mut Vec<u8>, addr: IpAddr, proto: &str, host: Option<&[u8]>) {
    out.extend_from_slice(b"for=");
    match addr {
        IpAddr::V4(_) => write_addr(out, addr),
        IpAddr::V6(_) => {
            out.extend_from_slice(b"\"[");
            write_addr(out, addr);
            out.extend_from_slice(b"]\"");
        }
    }
    out.extend_from_slice(b";proto=");
    out.extend_from_slice(proto.as_bytes());
    if let Some(host) = host {
        out.extend_from_slice(b";host=");
        push_quoted_if_needed(out, host);
    }
}

/// Adds the forwarding headers; from an untrusted client, its own are dropped first so it
/// cannot forge an address.
pub fn add_forwarded(headers: &mut HeaderMap, c: Client<'_>) {
    let addr = unmapped(c.addr);
    let prior_xff = if c.trusted { joined(headers, &X_FORWARDED_FOR) } else { None };
    let prior_fwd = if c.trusted { joined(headers, &header::FORWARDED) } else { None };
    if !c.trusted {
        for h in [&X_FORWARDED_PROTO, &X_FORWARDED_HOST] {
            headers.remove(h);
        }
    }
    headers.remove(&X_FORWARDED_FOR);
    headers.remove(header::FORWARDED);

    let mut xff = prior_xff.map(|p| p + ", ").unwrap_or_default().into_bytes();
    write_addr(&mut xff, addr);
    set(headers, X_FORWARDED_FOR, &xff);
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(c.proto));
    }
    if let Some(host) = c.host
        && !headers.contains_key(&X_FORWARDED_HOST)
    {
        set(headers, X_FORWARDED_HOST, host.as_bytes());
    }
    let mut fwd = prior_fwd.map(|p| p + ", ").unwrap_or_default().into_bytes();
    write_forwarded(&mut fwd, addr, c.proto, c.host.map(str::as_bytes));
    set(headers, header::FORWARDED, &fwd);
}

fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let parts: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &[u8]) {
    // Values come from parsed headers and addresses, so they are valid; skip rather than panic.
    if let Ok(v) = HeaderValue::from_bytes(value) {
        headers.insert(name, v);
    }
}

/// RFC 7239 values are tokens or quoted strings; `host:port` needs quotes.
fn push_quoted_if_needed(out: &mut Vec<u8>, v: &[u8]) {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if v.iter().all(tchar) {
        out.extend_from_slice(v);
    } else {
        out.push(b'"');
        for &b in v {
            if b == b'\\' || b == b'"' {
                out.push(b'\\');
            }
            out.push(b);
        }
        out.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "close, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn upgrade_needs_connection_upgrade() {
        assert!(requested_upgrade(&map(&[("upgrade", "websocket")])).is_none());
        let h = map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")]);
        assert_eq!(requested_upgrade(&h).unwrap(), "websocket");
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let c = Client {
            addr: "10.0.0.1".parse().unwrap(),
            proto: "http",
            host: Some("a.test:8080"),
            trusted: false,
        };
        add_forwarded(&mut h, c);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "a.test:8080");
        assert_eq!(h["forwarded"], "for=10.0.0.1;proto=http;host=\"a.test:8080\"");
    }

    #[test]
    fn trusted_forwarding_headers_are_extended() {
        let mut h = map(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "2.2.2.2"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=1.1.1.1"),
        ]);
        let c = Client {
            addr: "::1".parse().unwrap(),
            proto: "http",
            host: Some("a.test"),
            trusted: true,
        };
        add_forwarded(&mut h, c);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, ::1");
        assert_eq!(h["x-forwarded-proto"], "https", "kept from a trusted proxy");
        assert_eq!(h["forwarded"], "for=1.1.1.1, for=\"[::1]\";proto=http;host=a.test");
    }
}
