//! The request path: check framing and limits, route, pick a backend, forward with the header
//! rules, retry an idempotent request on another backend when connecting fails or the backend
//! closes the connection before answering, relay the response (or the upgraded connection),
//! log one line.
use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Version,
    body::{Body as _, Incoming},
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;

use super::{
    body::{Active, Fault, FaultFlag, RequestBody, ResponseBody},
    error::{ProxyError, is_timeout},
    framing,
    h2pool::SendError,
    headers,
    route::Router,
    upstream::Upstream,
};
use crate::{config::HttpConfig, upstream::hash_key};

/// At most this many backends are tried for one request.
const MAX_ATTEMPTS: usize = 3;

/// What every request on one listener needs.
pub struct Ctx {
    pub listener: String,
    pub router: Router,
    pub upstreams: HashMap<String, Arc<Upstream>>,
    pub http: Arc<HttpConfig>,
    /// The listener terminates TLS (X-Forwarded-Proto https).
    pub tls: bool,
    /// Responses by class and latency of this listener (`/metrics`).
    pub stats: Arc<crate::upstream::stats::RequestStats>,
}

/// Serves one request; never fails (errors become responses).
pub async fn handle(
    ctx: Arc<Ctx>,
    peer: SocketAddr,
    req: Request<Incoming>,
    active: Active,
) -> Response<ResponseBody> {
    let start = Instant::now();
    let format = ctx.http.access_log;
    // The access line's fields, only when it is written.
    let access = super::access::enabled(format).then(|| {
        let host = host_of(&req).unwrap_or_default();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
        (req.method().clone(), host, path)
    });
    let (mut resp, backend) = match forward(&ctx, peer, req).await {
        Ok(ok) => ok,
        Err((e, backend)) => {
            if e.blames_backend() {
                super::warn::backend_failure(format_args!("{}: {e}", ctx.listener));
            } else {
                log::debug!("{}: {peer}: {e}", ctx.listener);
            }
            (e.response(), backend)
        }
    };
    resp.body_mut().hold(active);
    ctx.stats.record(resp.status().as_u16(), start.elapsed());
    if let Some((method, host, path)) = access {
        let line = super::access::Line {
            time: super::access::now(),
            listener: &ctx.listener,
            client: peer,
            method: method.as_str(),
            authority: &host,
            path: &path,
            status: resp.status().as_u16(),
            backend,
            bytes: resp.body().size_hint().exact().unwrap_or(0),
            duration: super::access::millis(start.elapsed()),
        };
        super::access::write(format, &line);
    }
    resp
}

type Forwarded = (Response<ResponseBody>, Option<SocketAddr>);
type Failure = (ProxyError, Option<SocketAddr>);

async fn forward(
    ctx: &Ctx,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Forwarded, Failure> {
    let fail = |e| (e, None);
    if req.headers().len() > ctx.http.max_headers {
        return Err(fail(ProxyError::HeadersTooLarge));
    }
    framing::check(req.version(), req.headers()).map_err(|m| fail(ProxyError::BadRequest(m)))?;
    if req.body().size_hint().lower() > ctx.http.max_body_bytes {
        return Err(fail(ProxyError::BodyTooLarge));
    }
    // RFC 9113 §8.3.1: `:authority` and `host` must name the same authority.
    if let (Some(a), Some(h)) = (req.uri().authority(), req.headers().get(header::HOST))
        && !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes())
    {
        return Err(fail(ProxyError::BadRequest(":authority and host disagree")));
    }
    let host = host_of(&req);
    let mut normalized = Vec::new();
    let path = req.uri().path();
    let route_path = if super::path::normalize(path, &mut normalized) {
        std::str::from_utf8(&normalized).unwrap_or(path)
    } else {
        path
    };
    let name = ctx.router.route(host.as_deref(), route_path).ok_or(fail(ProxyError::NoRoute))?;
    let upstream = ctx.upstreams.get(name).ok_or(fail(ProxyError::NoRoute))?;
    let key = hash_key(&upstream.group.policy().http, peer.ip(), req.headers());

    let upgrade = if req.version() == Version::HTTP_11 {
        headers::requested_upgrade(req.headers())
    } else {
        None
    };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let te_trailers = parts
        .headers
        .get_all(header::TE)
        .iter()
        .any(|v| super::h1::head::has_token(v.as_bytes(), b"trailers"));
    let mut out_headers = parts.headers;
    headers::strip_hop_by_hop(&mut out_headers);
    if te_trailers {
        // The one TE a proxy passes on: gRPC backends refuse requests without it.
        out_headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let trusted = ctx.http.trusted_proxies.iter().any(|c| c.contains(peer.ip()));
    let proto = if ctx.tls { "https" } else { "http" };
    let client = headers::Client { addr: peer.ip(), proto, host: host.as_deref(), trusted };
    headers::add_forwarded(&mut out_headers, client);
    if let Some(u) = &upgrade {
        out_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        out_headers.insert(header::UPGRADE, u.clone());
    }
    let mut path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    if !normalized.is_empty() && ctx.http.normalize_path {
        let query = path_and_query.find('?').map(|i| path_and_query[i..].to_string());
        path_and_query = String::from_utf8(normalized).unwrap_or(path_and_query);
        path_and_query.push_str(query.as_deref().unwrap_or(""));
    }
    // Only a request without a body can be sent twice: the body of a failed attempt is gone.
    let retryable = is_idempotent(&parts.method) && body.is_end_stream();
    let head_request = parts.method == Method::HEAD;
    let fault = FaultFlag::default();
    let body = RequestBody::new(body, ctx.http.max_body_bytes, fault.clone());
    let outgoing = Outgoing {
        method: parts.method,
        authority: host.as_deref(),
        path_and_query: &path_and_query,
        headers: out_headers,
        retryable,
        client: peer.ip(),
    };
    let sent = send(ctx, upstream, key.as_deref(), outgoing, body, &fault).await?;
    let addr = sent.backend.addr;
    let resp = match (sent.resp.status(), client_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some(client_up)) => {
            tunnel(sent.resp, client_up, sent.in_flight)
        }
        (StatusCode::SWITCHING_PROTOCOLS, None) => {
            let source = "101 to a request that asked for no upgrade".into();
            return Err((ProxyError::Upstream { addr, source }, Some(addr)));
        }
        _ => {
            let (mut parts, body) = sent.resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            // Our own version toward the client, not the backend's (RFC 9110 §6.2).
            parts.version = Version::HTTP_11;
            if head_request {
                // An HTTP/2 backend's body of a HEAD response reports the Content-Length of
                // the body it does not send; passed on, the client's stream would be reset.
                return Ok((
                    Response::from_parts(parts, ResponseBody::full(Bytes::new())),
                    Some(addr),
                ));
            }
            Response::from_parts(parts, ResponseBody::upstream(body, sent.in_flight))
        }
    };
    Ok((resp, Some(addr)))
}

/// A request on its way to a backend, whatever the client spoke.
pub struct Outgoing<'a> {
    pub method: Method,
    /// The client's authority (`:authority` toward HTTP/2 backends, else the Host field).
    pub authority: Option<&'a str>,
    pub path_and_query: &'a str,
    /// Hop-by-hop fields removed, forwarding fields added.
    pub headers: HeaderMap,
    /// Body-less and idempotent: may go to another backend when no response head came.
    pub retryable: bool,
    /// The client's address (`hash-source-ip`).
    pub client: std::net::IpAddr,
}

/// A backend's response head, with the backend and its in-flight count.
pub struct Sent {
    pub resp: Response<Incoming>,
    pub backend: Arc<crate::upstream::Backend>,
    pub in_flight: crate::upstream::InFlight,
}

/// Picks a backend and sends `out` with the response timeout; retries a retryable request on
/// other backends when connecting fails or the connection ends before a response head (not on
/// a response timeout: the backend may still be working on it).
pub async fn send(
    ctx: &Ctx,
    upstream: &Upstream,
    key: Option<&[u8]>,
    mut out: Outgoing<'_>,
    body: RequestBody,
    fault: &FaultFlag,
) -> Result<Sent, Failure> {
    let h2 = upstream.config.http2;
    if h2 {
        // HTTP/2 carries the authority as `:authority`, from the URI.
        out.headers.remove(header::HOST);
    } else if !out.headers.contains_key(header::HOST)
        && let Some(h) = out.authority.and_then(|h| HeaderValue::from_str(h).ok())
    {
        out.headers.insert(header::HOST, h);
    }
    let mut body = Some(body);
    // Backends tried so far: tried[..attempts].
    let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_ATTEMPTS];
    let mut attempts = 0;
    let mut last_error = None;
    loop {
        let Some(backend) = upstream.pick(out.client, key, &tried[..attempts]) else {
            // Nothing left to retry on: the last failure is the answer.
            return Err(last_error.unwrap_or((ProxyError::NoBackend, None)));
        };
        let addr = backend.addr;
        tried[attempts] = addr;
        attempts += 1;
        let in_flight = backend.start();
        if !upstream.has_room(&in_flight) {
            drop(in_flight);
            if attempts < MAX_ATTEMPTS {
                last_error = last_error.or(Some((ProxyError::NoBackend, Some(addr))));
                continue;
            }
            return Err((ProxyError::NoBackend, Some(addr)));
        }
        let attempt_body = if out.retryable {
            RequestBody::empty()
        } else {
            body.take().unwrap_or_else(RequestBody::empty)
        };
        let mut up = Request::new(attempt_body);
        *up.method_mut() = out.method.clone();
        *up.headers_mut() = out.headers.clone();
        let sent = Instant::now();
        let result = if h2 {
            *up.version_mut() = Version::HTTP_2;
            let authority = out.authority.map_or_else(|| addr.to_string(), str::to_string);
            let uri = format!("{}://{authority}{}", upstream.scheme, out.path_and_query);
            *up.uri_mut() = uri.parse().unwrap_or_else(|_| upstream.uri(addr, out.path_and_query));
            let call = upstream.h2.send(addr, up);
            tokio::time::timeout(upstream.config.response_timeout(), call).await.map(|r| {
                r.map_err(|e| match e {
                    SendError::Connect(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                        ProxyError::Timeout { addr }
                    }
                    SendError::Connect(io) => ProxyError::Connect { addr, source: io.into() },
                    SendError::Http(e) if is_timeout(&e) => ProxyError::Timeout { addr },
                    SendError::Http(e) => ProxyError::Upstream { addr, source: e.into() },
                })
            })
        } else {
            *up.version_mut() = Version::HTTP_11;
            *up.uri_mut() = upstream.uri(addr, out.path_and_query);
            let call = upstream.client.request(up);
            tokio::time::timeout(upstream.config.response_timeout(), call).await.map(|r| {
                r.map_err(|e| {
                    if is_timeout(&e) {
                        ProxyError::Timeout { addr }
                    } else if e.is_connect() {
                        ProxyError::Connect { addr, source: e.into() }
                    } else {
                        ProxyError::Upstream { addr, source: e.into() }
                    }
                })
            })
        };
        let eject = |b: &Arc<crate::upstream::Backend>| {
            b.requests.record_failure();
            let may = upstream.group.may_eject();
            b.record_failure(upstream.config.eject_after, upstream.config.eject_for(), may)
        };
        match result {
            Err(_elapsed) => {
                eject(&backend);
                return Err((ProxyError::Timeout { addr }, Some(addr)));
            }
            Ok(Err(err)) => {
                match fault.get() {
                    Fault::TooLarge => return Err((ProxyError::BodyTooLarge, Some(addr))),
                    Fault::Broken => {
                        let err = ProxyError::BadRequest("unreadable request body");
                        return Err((err, Some(addr)));
                    }
                    Fault::None => {}
                }
                eject(&backend);
                let again = !matches!(err, ProxyError::Timeout { .. })
                    || matches!(err, ProxyError::Connect { .. });
                if again && out.retryable && attempts < MAX_ATTEMPTS {
                    super::warn::backend_failure(format_args!(
                        "{}: {err}; retrying on another backend",
                        ctx.listener
                    ));
                    last_error = Some((err, Some(addr)));
                    continue;
                }
                return Err((err, Some(addr)));
            }
            Ok(Ok(resp)) => {
                let took = sent.elapsed();
                backend.latency.observe(took);
                backend.requests.record(resp.status().as_u16(), took);
                backend.record_success();
                return Ok(Sent { resp, backend, in_flight });
            }
        }
    }
}

/// Answers 101 to the client and joins both upgraded connections once hyper hands them over.
/// Bytes the client sent after its request stay in hyper's buffer until then, so nothing
/// reaches the backend before its 101.
fn tunnel(
    mut resp: Response<Incoming>,
    client_up: hyper::upgrade::OnUpgrade,
    in_flight: crate::upstream::InFlight,
) -> Response<ResponseBody> {
    let backend_up = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
    }
    tokio::spawn(async move {
        let _in_flight = in_flight;
        match tokio::try_join!(client_up, backend_up) {
            Ok((c, b)) => {
                let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
                    log::debug!("upgraded connection ended: {e}");
                }
            }
            Err(e) => log::debug!("upgrade failed: {e}"),
        }
    });
    Response::from_parts(parts, ResponseBody::full(Bytes::new()))
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The Host header, or the URI's authority (HTTP/2).
fn host_of<B>(req: &Request<B>) -> Option<String> {
    let h: &HeaderMap = req.headers();
    h.get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
}
