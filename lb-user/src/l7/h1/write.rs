//! Heads written on the way through: the request toward the backend and the response toward
//! the client, built straight from the parsed ranges into the connection's output buffer
//! (hop-by-hop fields dropped, forwarding fields added) with no header map in between.
use std::io::Write as _;

use super::{
    body::Framing,
    head::{Field, Head, Kind, tokens},
    response::Response,
};
use crate::l7::headers;

/// What the proxy adds about the client.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding {
    /// The client's address (IPv4-mapped IPv6 shown as IPv4).
    pub addr: std::net::IpAddr,
    /// `http` or `https`, as the client spoke to the proxy.
    pub proto: &'static str,
    /// The client is a proxy whose forwarding fields are kept and extended.
    pub trusted: bool,
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// True when a `Connection` field of the head lists `name` (RFC 9110 §7.6.1).
fn listed(hb: &[u8], fields: &[Field], name: &[u8]) -> bool {
    fields
        .iter()
        .filter(|f| f.kind == Kind::Connection)
        .any(|f| tokens(f.value.of(hb)).any(|t| t.eq_ignore_ascii_case(name)))
}

/// The request head for an HTTP/1.1 backend: `path` is the origin-form target to send (the
/// client's, or its normalized form).
pub fn request(
    out: &mut Vec<u8>,
    hb: &[u8],
    head: &Head,
    fields: &[Field],
    path: &[u8],
    fwd: &Forwarding,
) {
    out.clear();
    out.extend_from_slice(head.method_span.of(hb));
    out.push(b' ');
    out.extend_from_slice(path);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let authority = head.authority.map(|a| a.of(hb));
    if let Some(a) = authority {
        // First, and the absolute form's authority when there was one (RFC 9112 §3.2.2).
        field(out, b"Host", a);
    }
    let trusted = fwd.trusted;
    let (mut xfp, mut xfh) = (false, false);
    for f in fields {
        let (name, value) = (f.name.of(hb), f.value.of(hb));
        match f.kind {
            Kind::Host
            | Kind::Connection
            | Kind::Upgrade
            | Kind::Te
            | Kind::Hop
            | Kind::XForwardedFor
            | Kind::Forwarded => {}
            Kind::ContentLength => field(out, b"Content-Length", value),
            Kind::TransferEncoding => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            Kind::XForwardedProto | Kind::XForwardedHost if !trusted => {}
            Kind::XForwardedProto | Kind::XForwardedHost => {
                xfp |= f.kind == Kind::XForwardedProto;
                xfh |= f.kind == Kind::XForwardedHost;
                field(out, name, value);
            }
            Kind::Other => {
                if !(head.conn_other && listed(hb, fields, name)) {
                    field(out, name, value);
                }
            }
        }
    }
    if let Some(u) = head.upgrade {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        field(out, b"Upgrade", u.of(hb));
    } else if head.te_trailers {
        // RFC 9110 §10.1.4: TE is hop-by-hop, so its sender lists it in Connection.
        out.extend_from_slice(b"TE: trailers\r\nConnection: te\r\n");
    }
    let c = fwd;
    out.extend_from_slice(b"X-Forwarded-For: ");
    if trusted {
        prior(out, hb, fields, Kind::XForwardedFor);
    }
    headers::write_addr(out, c.addr);
    out.extend_from_slice(b"\r\n");
    if !xfp {
        field(out, b"X-Forwarded-Proto", c.proto.as_bytes());
    }
    if let (false, Some(a)) = (xfh, authority) {
        field(out, b"X-Forwarded-Host", a);
    }
    out.extend_from_slice(b"Forwarded: ");
    if trusted {
        prior(out, hb, fields, Kind::Forwarded);
    }
    headers::write_forwarded(out, c.addr, c.proto, authority);
    out.extend_from_slice(b"\r\n\r\n");
}

/// The values of every field of `kind`, each followed by `, `.
fn prior(out: &mut Vec<u8>, hb: &[u8], fields: &[Field], kind: Kind) {
    for f in fields.iter().filter(|f| f.kind == kind) {
        out.extend_from_slice(f.value.of(hb));
        out.extend_from_slice(b", ");
    }
}

/// How the client receives a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOut {
    /// No body, or one with the backend's Content-Length.
    AsIs,
    /// Chunked: the backend's chunks verbatim, or a close-delimited body re-encoded.
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients of bodies without a length).
    Close,
}

impl BodyOut {
    /// The client-side encoding of a backend body framed as `framing`.
    pub fn for_client(framing: Framing, client_minor: u8) -> Self {
        match (framing, client_minor) {
            (Framing::Empty | Framing::Length(_), _) => Self::AsIs,
            (Framing::Chunked | Framing::Close, 1) => Self::Chunked,
            (Framing::Chunked | Framing::Close, _) => Self::Close,
        }
    }
}

/// The response head toward the client (always HTTP/1.1, RFC 9110 §6.2). `keep`: the client
/// connection stays open after it (an HTTP/1.0 client is told so explicitly).
pub fn response(
    out: &mut Vec<u8>,
    hb: &[u8],
    r: &Response,
    fields: &[Field],
    body: BodyOut,
    keep: bool,
    client_minor: u8,
) {
    let _ = write!(out, "HTTP/1.1 {} ", r.code);
    out.extend_from_slice(r.reason.of(hb));
    out.extend_from_slice(b"\r\n");
    let switching = r.code == 101;
    for f in fields {
        let (name, value) = (f.name.of(hb), f.value.of(hb));
        match f.kind {
            Kind::Connection | Kind::Te | Kind::Hop | Kind::TransferEncoding | Kind::Upgrade => {}
            Kind::ContentLength if body != BodyOut::AsIs => {}
            _ if r.conn_other && listed(hb, fields, name) => {}
            _ => field(out, name, value),
        }
    }
    if switching {
        out.extend_from_slice(b"Connection: upgrade\r\n");
        if let Some(u) = r.upgrade {
            field(out, b"Upgrade", u.of(hb));
        }
    } else if r.is_interim() {
        // Nothing about the connection in an interim response.
    } else {
        if body == BodyOut::Chunked {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        }
        if !keep {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if client_minor == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// A response the proxy makes itself: `status` with a short text body.
pub fn error(out: &mut Vec<u8>, status: hyper::StatusCode, close: bool) {
    let reason = status.canonical_reason().unwrap_or("");
    let code = status.as_u16();
    let body_len = 3 + 1 + reason.len() + 1;
    let _ = write!(
        out,
        "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {body_len}\r\n"
    );
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(out, "\r\n{code} {reason}\n");
}
