//! HTTP/1 clients of HTTP/2 backends: the request head (already parsed and checked by the
//! codec) becomes an HTTP/2 request, its body is read whole (bounded by `max_body_bytes`), and
//! the backend's response is written back in HTTP/1.1 framing, trailers included when the
//! client asked for them with `TE: trailers`.
use std::{io::Write as _, net::SocketAddr};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{
    HeaderMap, Method,
    header::{HeaderName, HeaderValue},
};

use super::{
    buf::Bufs,
    conn::{ClientIo, read_into},
    exchange::{Outcome, ReqBody, write_timeout},
    head::{Head, Kind},
};
use crate::{
    config::HttpConfig,
    l7::{
        ProxyError,
        body::{FaultFlag, RequestBody},
        headers,
        proxy::{self, Ctx, Outgoing},
        upstream::Upstream,
    },
};

/// What the bridge keeps of the head once its bytes are consumed.
pub struct Request {
    pub method: Method,
    pub authority: Option<String>,
    pub path: String,
    pub headers: HeaderMap,
    pub client: std::net::IpAddr,
}

impl Request {
    /// The head as an HTTP/2 request: hop-by-hop fields dropped (`TE: trailers` kept),
    /// forwarding fields added.
    pub fn new(
        hb: &[u8],
        head: &Head,
        fields: &[super::head::Field],
        path: &[u8],
        peer: SocketAddr,
        ctx: &Ctx,
    ) -> Result<Self, ProxyError> {
        let bad = || ProxyError::BadRequest("a field that HTTP/2 cannot carry");
        let method = Method::from_bytes(head.method_span.of(hb)).map_err(|_| bad())?;
        let mut map = HeaderMap::with_capacity(fields.len() + 4);
        for f in fields {
            let keep = matches!(
                f.kind,
                Kind::Other | Kind::XForwardedFor | Kind::XForwardedProto | Kind::XForwardedHost
            ) || f.kind == Kind::Forwarded
                || f.kind == Kind::Connection;
            if !keep {
                continue;
            }
            let name = HeaderName::from_bytes(f.name.of(hb)).map_err(|_| bad())?;
            let value = HeaderValue::from_bytes(f.value.of(hb)).map_err(|_| bad())?;
            map.append(name, value);
        }
        // Connection and what it lists go (kept above only so this sees them).
        headers::strip_hop_by_hop(&mut map);
        if head.te_trailers {
            map.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
        }
        let authority = head
            .authority
            .map(|a| String::from_utf8_lossy(a.of(hb)).into_owned())
            .filter(|a| !a.is_empty());
        let client = headers::Client {
            addr: peer.ip(),
            proto: if ctx.tls { "https" } else { "http" },
            host: authority.as_deref(),
            trusted: ctx.http.trusted_proxies.iter().any(|c| c.contains(peer.ip())),
        };
        headers::add_forwarded(&mut map, client);
        let path = String::from_utf8_lossy(path).into_owned();
        Ok(Self { method, authority, path, headers: map, client: peer.ip() })
    }
}

/// Sends `req` (its body still in the client's buffer or socket) and relays the answer.
#[expect(clippy::too_many_arguments, reason = "one call site, the codec's exchange")]
pub async fn forward<S: ClientIo>(
    io: &mut S,
    b: &mut Bufs,
    ctx: &Ctx,
    http: &HttpConfig,
    head: &Head,
    upstream: &Upstream,
    key: Option<&[u8]>,
    req: Request,
    mut body: ReqBody,
    closing: bool,
) -> Result<Outcome, (ProxyError, Option<SocketAddr>, bool)> {
    let mut whole = Vec::new();
    while !body.is_done() {
        if b.client.is_empty() {
            let read = tokio::time::timeout(http.body_timeout(), read_into(io, &mut b.client));
            match read.await {
                Err(_) => return Err((ProxyError::BodyTimeout, None, false)),
                Ok(Ok(0) | Err(_)) => {
                    return Ok(Outcome { status: None, backend: None, keep: false, bytes: 0 });
                }
                Ok(Ok(_)) => {}
            }
        }
        // Chunk framing is HTTP/1's: the payload alone goes on.
        let n = body
            .take_data(b.client.filled(), http.max_body_bytes, &mut whole)
            .map_err(|e| (e, None, false))?;
        b.client.consume(n);
    }
    let retryable = req.method == Method::GET
        || req.method == Method::HEAD
        || req.method == Method::OPTIONS
        || (whole.is_empty() && matches!(req.method, Method::PUT | Method::DELETE));
    let outgoing = Outgoing {
        method: req.method,
        authority: req.authority.as_deref(),
        path_and_query: &req.path,
        headers: req.headers,
        retryable: retryable && whole.is_empty(),
        client: req.client,
    };
    let fault = FaultFlag::default();
    let body = RequestBody::full(Bytes::from(whole));
    let sent = proxy::send(ctx, upstream, key, outgoing, body, &fault)
        .await
        .map_err(|(e, a)| (e, a, true))?;
    let addr = sent.backend.addr;
    let status = sent.resp.status();
    let (mut parts, mut resp_body) = sent.resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers);
    let no_body = head.method == super::head::Method::Head
        || status.is_informational()
        || status == hyper::StatusCode::NO_CONTENT
        || status == hyper::StatusCode::NOT_MODIFIED;
    let length = parts.headers.contains_key(hyper::header::CONTENT_LENGTH);
    let chunked = !no_body && !length && head.minor == 1;
    let keep = !head.close && !closing && (no_body || length || chunked);
    let out = &mut b.out;
    out.clear();
    let _ =
        write!(out, "HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
    }
    out.extend_from_slice(if keep { b"\r\n".as_slice() } else { b"Connection: close\r\n\r\n" });
    let idle = http.stream_idle_timeout();
    let done =
        |keep| Ok(Outcome { status: Some(status.as_u16()), backend: Some(addr), keep, bytes: 0 });
    let cut = || {
        Ok(Outcome { status: Some(status.as_u16()), backend: Some(addr), keep: false, bytes: 0 })
    };
    if write_timeout(io, out, idle).await.is_err() {
        return cut();
    }
    if no_body {
        return done(keep);
    }
    let mut trailers = None;
    loop {
        let frame = match tokio::time::timeout(idle, resp_body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => return cut(),
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                out.clear();
                if chunked && !data.is_empty() {
                    let _ = write!(out, "{:x}\r\n", data.len());
                }
                out.extend_from_slice(&data);
                if chunked && !data.is_empty() {
                    out.extend_from_slice(b"\r\n");
                }
                if write_timeout(io, out, idle).await.is_err() {
                    return cut();
                }
                continue;
            }
            Err(f) => f,
        };
        if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    if chunked {
        out.clear();
        out.extend_from_slice(b"0\r\n");
        // Trailers only for a client that said it takes them (RFC 9110 §6.5.1).
        for (name, value) in trailers.iter().flatten().filter(|_| head.te_trailers) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if write_timeout(io, out, idle).await.is_err() {
            return cut();
        }
    }
    done(keep && (length || chunked))
}
