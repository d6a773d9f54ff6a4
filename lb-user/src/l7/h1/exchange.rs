//! One request on the HTTP/1 codec: route, pick a backend, send the rewritten head and the
//! body as it is validated, read the response head (relaying interim ones), then the response
//! body in the framing the client understands. Retries body-less idempotent requests when no
//! response head came back.
use std::{
    future::{Future as _, poll_fn},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::Poll,
    time::{Duration, Instant},
};

use hyper::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{
    body::{Chunked, Framing},
    bridge,
    buf::{Buf, Bufs},
    conn::{ClientIo, read_into},
    head::{Field, Head, Method},
    pool::UpIo,
    response::{self, Response},
    tunnel, write,
};
use crate::{
    config::{Balance, HttpConfig},
    l7::{ProxyError, proxy::Ctx, upstream::Upstream},
    upstream::Backend,
};

/// At most this many backends are tried for one request.
const MAX_ATTEMPTS: usize = 3;

/// How an exchange ended.
#[derive(Debug)]
pub struct Outcome {
    /// The status the client got (None: the connection ended without a response).
    pub status: Option<u16>,
    pub backend: Option<SocketAddr>,
    /// The connection can carry another request.
    pub keep: bool,
    /// Response body bytes sent.
    pub bytes: u64,
}

/// The request body still to come from the client.
pub(super) enum ReqBody {
    Done,
    Length(u64),
    Chunked(Chunked),
}

impl ReqBody {
    pub(super) fn is_done(&self) -> bool {
        match self {
            Self::Done => true,
            Self::Length(n) => *n == 0,
            Self::Chunked(c) => c.is_done(),
        }
    }

    /// [`ReqBody::take`], appending the payload (chunk framing removed) to `out`.
    pub(super) fn take_data(
        &mut self,
        avail: &[u8],
        limit: u64,
        out: &mut Vec<u8>,
    ) -> Result<usize, ProxyError> {
        let Self::Chunked(c) = self else {
            let n = self.take(avail, limit)?;
            out.extend_from_slice(&avail[..n]);
            return Ok(n);
        };
        let k = c
            .feed_data(avail, |d| out.extend_from_slice(d))
            .map_err(|_| ProxyError::BadRequest("invalid chunked body"))?;
        if c.data > limit {
            return Err(ProxyError::BodyTooLarge);
        }
        Ok(k)
    }

    /// How many bytes at the front of `avail` belong to the body (validated).
    fn take(&mut self, avail: &[u8], limit: u64) -> Result<usize, ProxyError> {
        match self {
            Self::Done => Ok(0),
            Self::Length(n) => {
                let k = (*n).min(avail.len() as u64);
                *n -= k;
                Ok(k as usize)
            }
            Self::Chunked(c) => {
                let k =
                    c.feed(avail).map_err(|_| ProxyError::BadRequest("invalid chunked body"))?;
                if c.data > limit {
                    return Err(ProxyError::BodyTooLarge);
                }
                Ok(k)
            }
        }
    }
}

/// Why an attempt on one backend failed.
enum Failed {
    /// The client's side: answered with this error (or nothing if the client is gone).
    Client(Option<ProxyError>),
    /// The backend's side; `again`: nothing of the request can have been processed, so a
    /// retryable request may go to another backend.
    Backend { err: ProxyError, again: bool },
}

fn backend_io(addr: SocketAddr, e: std::io::Error) -> ProxyError {
    if e.kind() == std::io::ErrorKind::TimedOut {
        ProxyError::Timeout { addr }
    } else {
        ProxyError::Upstream { addr, source: e.into() }
    }
}

/// Serves `head` (whose bytes start `b.client`).
pub async fn forward<S: ClientIo>(
    io: &mut S,
    b: &mut Bufs,
    ctx: &Ctx,
    http: &HttpConfig,
    peer: SocketAddr,
    head: &Head,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Outcome {
    let closing = *shutdown.borrow();
    // The client or a shutdown ends the connection after this exchange, whatever happens.
    let ends = head.close || closing;
    let mut body = match head.framing {
        Framing::Empty | Framing::Close => ReqBody::Done,
        Framing::Length(n) => ReqBody::Length(n),
        Framing::Chunked => ReqBody::Chunked(Chunked::new(http.max_header_bytes)),
    };
    let prepared = prepare(b, ctx, http, peer, head);
    b.client.consume(head.len);
    let (upstream, key, bridged) = match prepared {
        Ok(p) => p,
        Err(e) => return answer(io, b, http, ends, &e, None, body.is_done()).await,
    };
    if let Some(req) = bridged {
        let done = body.is_done();
        let key = key.as_deref();
        let bridged = bridge::forward(io, b, ctx, http, head, &upstream, key, req, body, closing);
        return match bridged.await {
            Ok(outcome) => outcome,
            Err((e, addr, body_read)) => {
                if e.blames_backend() {
                    crate::l7::warn::backend_failure(format_args!("{}: {e}", ctx.listener));
                }
                answer(io, b, http, ends, &e, addr, done || body_read).await
            }
        };
    }
    if let Framing::Length(n) = head.framing
        && n > http.max_body_bytes
    {
        return answer(io, b, http, ends, &ProxyError::BodyTooLarge, None, false).await;
    }
    // The first body bytes ride with the head in one write.
    match body.take(b.client.filled(), http.max_body_bytes) {
        Ok(n) => {
            b.out.extend_from_slice(&b.client.filled()[..n]);
            b.client.consume(n);
        }
        Err(e) => return answer(io, b, http, ends, &e, None, false).await,
    }
    let retryable = head.method.is_idempotent() && body.is_done() && head.upgrade.is_none();
    let mut tried = [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_ATTEMPTS];
    let mut attempts = 0;
    let mut last: Option<(ProxyError, SocketAddr)> = None;
    let (mut up, backend, resp, took) = loop {
        let Some(backend) = upstream.pick(peer.ip(), key.as_deref(), &tried[..attempts]) else {
            let (err, addr) = last.map_or((ProxyError::NoBackend, None), |(e, a)| (e, Some(a)));
            return answer(io, b, http, ends, &err, addr, body.is_done()).await;
        };
        let addr = backend.addr;
        tried[attempts] = addr;
        attempts += 1;
        let in_flight = backend.start();
        if !upstream.has_room(&in_flight) {
            drop(in_flight);
            last = last.or(Some((ProxyError::NoBackend, addr)));
            if attempts < MAX_ATTEMPTS {
                continue;
            }
            return answer(io, b, http, ends, &ProxyError::NoBackend, Some(addr), body.is_done())
                .await;
        }
        let sent = Instant::now();
        match attempt(io, b, &upstream, addr, &mut body, head, http).await {
            Ok((up, resp)) => {
                drop(in_flight);
                break (up, backend, resp, sent.elapsed());
            }
            Err(Failed::Client(err)) => {
                let Some(err) = err else {
                    return Outcome { status: None, backend: Some(addr), keep: false, bytes: 0 };
                };
                return answer(io, b, http, ends, &err, Some(addr), false).await;
            }
            Err(Failed::Backend { err, again }) => {
                eject(&upstream, &backend);
                if again && retryable && attempts < MAX_ATTEMPTS {
                    crate::l7::warn::backend_failure(format_args!(
                        "{}: {err}; retrying on another backend",
                        ctx.listener
                    ));
                    last = Some((err, addr));
                    continue;
                }
                crate::l7::warn::backend_failure(format_args!("{}: {err}", ctx.listener));
                return answer(io, b, http, ends, &err, Some(addr), body.is_done()).await;
            }
        }
    };
    backend.latency.observe(took);
    backend.requests.record(resp.code, took);
    backend.record_success();
    let addr = backend.addr;
    let _in_flight = backend.start();
    let ok = |keep, bytes| Outcome { status: Some(resp.code), backend: Some(addr), keep, bytes };
    if resp.code == 101 {
        if head.upgrade.is_none() {
            let err = ProxyError::Upstream {
                addr,
                source: "101 to a request that asked for no upgrade".into(),
            };
            return answer(io, b, http, ends, &err, Some(addr), false).await;
        }
        let hb = &b.upstream.filled()[..resp.len];
        b.out.clear();
        write::response(&mut b.out, hb, &resp, &b.rfields, write::BodyOut::AsIs, true, 1);
        b.upstream.consume(resp.len);
        if write_timeout(io, &b.out, http.stream_idle_timeout()).await.is_ok() {
            let idle = http.tunnel_idle_timeout();
            tunnel::run(io, &mut up, &mut b.client, &mut b.upstream, idle, shutdown).await;
        }
        return ok(false, 0);
    }
    let mode = write::BodyOut::for_client(resp.framing, head.minor);
    let keep = !head.close && !closing && body.is_done() && mode != write::BodyOut::Close;
    b.out.clear();
    write::response(
        &mut b.out,
        &b.upstream.filled()[..resp.len],
        &resp,
        &b.rfields,
        mode,
        keep,
        head.minor,
    );
    b.upstream.consume(resp.len);
    let mut sent = 0;
    let relayed =
        relay(io, &mut up, &mut b.upstream, &mut b.out, resp.framing, mode, http, &mut sent).await;
    match relayed {
        Ok(clean) => {
            if clean && !resp.close && body.is_done() {
                upstream.pool.put(addr, up);
            }
            ok(keep, sent)
        }
        Err(e) => {
            log::debug!("{}: {peer}: response from {addr} cut short: {e}", ctx.listener);
            ok(false, sent)
        }
    }
}

/// Routes the request and writes the backend-bound head into `b.out`: the upstream, the hash
/// key of its policy, and for an HTTP/2 upstream the request the bridge sends instead.
type Prepared = (Arc<Upstream>, Option<Vec<u8>>, Option<bridge::Request>);

fn prepare(
    b: &mut Bufs,
    ctx: &Ctx,
    http: &HttpConfig,
    peer: SocketAddr,
    head: &Head,
) -> Result<Prepared, ProxyError> {
    let hb = &b.client.filled()[..head.len];
    let bad = || ProxyError::BadRequest("request target is not ASCII");
    let authority = match head.authority {
        Some(a) => Some(std::str::from_utf8(a.of(hb)).map_err(|_| bad())?),
        None => None,
    };
    let target = std::str::from_utf8(head.path(hb)).map_err(|_| bad())?;
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    let normalized = crate::l7::path::normalize(path, &mut b.path);
    let route_path = if normalized { std::str::from_utf8(&b.path).unwrap_or(path) } else { path };
    let name = ctx.router.route(authority, route_path).ok_or(ProxyError::NoRoute)?;
    let upstream = ctx.upstreams.get(name).ok_or(ProxyError::NoRoute)?;
    let key = hash_key(&upstream.group.policy().http, peer.ip(), hb, &b.fields);
    if upstream.config.http2 {
        let mut path = if normalized && http.normalize_path { b.path.clone() } else { Vec::new() };
        if path.is_empty() {
            path.extend_from_slice(head.path(hb));
        } else {
            path.extend_from_slice(query.as_bytes());
        }
        let req = bridge::Request::new(hb, head, &b.fields, &path, peer, ctx)?;
        return Ok((upstream.clone(), key, Some(req)));
    }
    let fwd = write::Forwarding {
        addr: crate::l7::headers::unmapped(peer.ip()),
        proto: if ctx.tls { "https" } else { "http" },
        trusted: ctx.http.trusted_proxies.iter().any(|c| c.contains(peer.ip())),
    };
    if normalized && http.normalize_path {
        b.path.extend_from_slice(query.as_bytes());
        write::request(&mut b.out, hb, head, &b.fields, &b.path, &fwd);
    } else {
        write::request(&mut b.out, hb, head, &b.fields, head.path(hb), &fwd);
    }
    Ok((upstream.clone(), key, None))
}

/// The hash input of the `hash-*` policies (copied: the head's bytes are consumed next).
fn hash_key(balance: &Balance, client: IpAddr, hb: &[u8], fields: &[Field]) -> Option<Vec<u8>> {
    fn named<'a>(
        fields: &'a [Field],
        hb: &'a [u8],
        name: &'a str,
    ) -> impl Iterator<Item = &'a Field> + 'a {
        fields.iter().filter(move |f| f.name.of(hb).eq_ignore_ascii_case(name.as_bytes()))
    }
    match balance {
        Balance::HashSourceIp => Some(match client {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }),
        Balance::HashHeader(name) => {
            named(fields, hb, name).next().map(|f| f.value.of(hb).to_vec())
        }
        Balance::HashCookie(name) => named(fields, hb, "cookie")
            .flat_map(|f| f.value.of(hb).split(|&c| c == b';'))
            .filter_map(|kv| {
                let kv = kv.trim_ascii();
                let eq = kv.iter().position(|&c| c == b'=')?;
                Some((&kv[..eq], &kv[eq + 1..]))
            })
            .find(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| v.to_vec()),
        _ => None,
    }
}

fn eject(upstream: &Upstream, backend: &Arc<Backend>) {
    backend.requests.record_failure();
    let may = upstream.group.may_eject();
    backend.record_failure(upstream.config.eject_after, upstream.config.eject_for(), may);
}

/// Sends the request to `addr` and reads its response head.
async fn attempt<S: ClientIo>(
    io: &mut S,
    b: &mut Bufs,
    upstream: &Upstream,
    addr: SocketAddr,
    body: &mut ReqBody,
    head: &Head,
    http: &HttpConfig,
) -> Result<(UpIo, Response), Failed> {
    let backend_err = |err, again| Failed::Backend { err, again };
    let mut up = match upstream.pool.take(addr) {
        Some(c) => c,
        None => upstream.pool.connect(addr).await.map_err(|e| {
            let err = if e.kind() == std::io::ErrorKind::TimedOut {
                ProxyError::Timeout { addr }
            } else {
                ProxyError::Connect { addr, source: e.into() }
            };
            backend_err(err, true)
        })?,
    };
    up.write_all(&b.out).await.map_err(|e| backend_err(backend_io(addr, e), true))?;
    b.upstream.clear();
    let mut interim = false;
    let mut deadline = None;
    let max_head = http.max_header_bytes;
    loop {
        if !b.upstream.is_empty() {
            let filled = b.upstream.filled();
            match response::parse(filled, &mut b.rfields, head.method == Method::Head, max_head) {
                Err(why) => {
                    return Err(backend_err(
                        ProxyError::Upstream { addr, source: why.into() },
                        false,
                    ));
                }
                Ok(Some(r)) if r.is_interim() => {
                    // 1xx are for HTTP/1.1 clients only (RFC 9110 §15.2).
                    if head.minor == 1 {
                        b.out.clear();
                        let mode = write::BodyOut::AsIs;
                        write::response(
                            &mut b.out,
                            &filled[..r.len],
                            &r,
                            &b.rfields,
                            mode,
                            true,
                            1,
                        );
                        let sent = write_timeout(io, &b.out, http.stream_idle_timeout()).await;
                        sent.map_err(|_| Failed::Client(None))?;
                    }
                    b.upstream.consume(r.len);
                    interim = true;
                    continue;
                }
                Ok(Some(r)) => return Ok((up, r)),
                Ok(None) => {
                    if b.upstream.spare().is_empty() && !b.upstream.grow(max_head) {
                        let source = "response head too large".into();
                        return Err(backend_err(ProxyError::Upstream { addr, source }, false));
                    }
                }
            }
        }
        if !body.is_done() {
            pump(io, &mut up, &mut b.client, &mut b.upstream, body, http, addr).await?;
            continue;
        }
        let d = *deadline.get_or_insert_with(|| {
            tokio::time::Instant::now() + upstream.config.response_timeout()
        });
        // No complete response head yet (a partial one may be buffered) and nothing sent to
        // the client: a retryable request can still go to another backend.
        let nothing_yet = !interim;
        match tokio::time::timeout_at(d, read_into(&mut up, &mut b.upstream)).await {
            Err(_) => return Err(backend_err(ProxyError::Timeout { addr }, false)),
            Ok(Ok(0)) => {
                let source = "connection closed before the response head".into();
                return Err(backend_err(ProxyError::Upstream { addr, source }, nothing_yet));
            }
            Ok(Err(e)) => return Err(backend_err(backend_io(addr, e), nothing_yet)),
            Ok(Ok(_)) => {}
        }
    }
}

/// Moves the request body from the client to the backend as it is validated, until the body
/// has been sent or the backend starts answering (bytes in `upstream`, perhaps a 100 Continue
/// or an early error). A client that sends nothing for `body_timeout` gets 408.
async fn pump<S: ClientIo>(
    io: &mut S,
    up: &mut UpIo,
    client: &mut Buf,
    upstream: &mut Buf,
    body: &mut ReqBody,
    http: &HttpConfig,
    addr: SocketAddr,
) -> Result<(), Failed> {
    let addr_err = |e: std::io::Error| Failed::Backend { err: backend_io(addr, e), again: false };
    let idle = http.body_timeout();
    let limit = http.max_body_bytes;
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    // Validated bytes at the front of `client` not written yet.
    let mut pending = 0usize;
    poll_fn(|cx| {
        loop {
            let spare = upstream.spare();
            if !spare.is_empty() {
                let mut rb = ReadBuf::new(spare);
                match Pin::new(&mut *up).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                            return Poll::Ready(Err(addr_err(e)));
                        }
                        upstream.filled_by(n);
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(addr_err(e))),
                    Poll::Pending => {}
                }
            }
            if pending > 0 {
                match Pin::new(&mut *up).poll_write(cx, &client.filled()[..pending]) {
                    Poll::Ready(Ok(0)) => {
                        let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                        return Poll::Ready(Err(addr_err(e)));
                    }
                    Poll::Ready(Ok(n)) => {
                        client.consume(n);
                        pending -= n;
                        sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(addr_err(e))),
                    Poll::Pending => {
                        if sleep.as_mut().poll(cx).is_ready() {
                            let e = std::io::Error::from(std::io::ErrorKind::TimedOut);
                            return Poll::Ready(Err(addr_err(e)));
                        }
                        return Poll::Pending;
                    }
                }
            }
            if body.is_done() {
                return Poll::Ready(Ok(()));
            }
            if !client.is_empty() {
                match body.take(client.filled(), limit) {
                    Ok(n) => pending = n,
                    Err(e) => return Poll::Ready(Err(Failed::Client(Some(e)))),
                }
                continue;
            }
            let mut rb = ReadBuf::new(client.spare());
            match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                    let n = rb.filled().len();
                    client.filled_by(n);
                    sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                }
                Poll::Ready(_) => return Poll::Ready(Err(Failed::Client(None))),
                Poll::Pending => {
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(Failed::Client(Some(ProxyError::BodyTimeout))));
                    }
                    return Poll::Pending;
                }
            }
        }
    })
    .await
}

/// Relays the response body (the head is in `out`), counting body bytes in `sent`; true when
/// the backend connection ends clean (the whole body read, nothing after it).
#[expect(clippy::too_many_arguments, reason = "the exchange's parts, borrowed apart")]
async fn relay<S: ClientIo>(
    io: &mut S,
    up: &mut UpIo,
    upstream: &mut Buf,
    out: &mut Vec<u8>,
    framing: Framing,
    mode: write::BodyOut,
    http: &HttpConfig,
    sent: &mut u64,
) -> std::io::Result<bool> {
    use write::BodyOut;
    let idle = http.stream_idle_timeout();
    let invalid = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut left = if let Framing::Length(n) = framing { n } else { 0 };
    let mut chunks = Chunked::new(http.max_header_bytes);
    loop {
        let avail = upstream.filled();
        let (n, done, verbatim) = match (framing, mode) {
            (Framing::Empty, _) => (0, true, true),
            (Framing::Length(_), _) => {
                let n = left.min(avail.len() as u64);
                left -= n;
                (n as usize, left == 0, true)
            }
            (Framing::Chunked, BodyOut::Chunked) => {
                let n = chunks.feed(avail).map_err(|e| invalid(&e.to_string()))?;
                (n, chunks.is_done(), true)
            }
            (Framing::Chunked, _) => {
                let n = chunks
                    .feed_data(avail, |d| out.extend_from_slice(d))
                    .map_err(|e| invalid(&e.to_string()))?;
                (n, chunks.is_done(), false)
            }
            (Framing::Close, BodyOut::Chunked) => {
                if !avail.is_empty() {
                    use std::io::Write as _;
                    let _ = write!(out, "{:x}\r\n", avail.len());
                    out.extend_from_slice(avail);
                    out.extend_from_slice(b"\r\n");
                }
                (avail.len(), false, false)
            }
            (Framing::Close, _) => (avail.len(), false, true),
        };
        if verbatim && out.is_empty() {
            write_timeout(io, &avail[..n], idle).await?;
        } else {
            if verbatim {
                out.extend_from_slice(&avail[..n]);
            }
            if !out.is_empty() {
                write_timeout(io, out, idle).await?;
            }
        }
        out.clear();
        upstream.consume(n);
        *sent += n as u64;
        if done {
            return Ok(upstream.is_empty());
        }
        match tokio::time::timeout(idle, read_into(up, upstream)).await {
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(Ok(0)) if framing == Framing::Close => {
                if mode == BodyOut::Chunked {
                    write_timeout(io, b"0\r\n\r\n", idle).await?;
                }
                return Ok(false);
            }
            Ok(Ok(0)) => return Err(invalid("backend closed mid-body")),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Writes all of `bytes`, failing when the peer takes nothing for `idle` (a client that stops
/// reading: Envoy's stream idle timeout).
pub(super) async fn write_timeout<W: AsyncWrite + Unpin>(
    io: &mut W,
    bytes: &[u8],
    idle: Duration,
) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        // A write the socket takes at once (nearly all of them) arms no timer.
        let now = poll_fn(|cx| match Pin::new(&mut *io).poll_write(cx, rest) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending => Poll::Ready(None),
        });
        let n = match now.await {
            Some(r) => r?,
            None => match tokio::time::timeout(idle, io.write(rest)).await {
                Ok(r) => r?,
                Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            },
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        rest = &rest[n..];
    }
    Ok(())
}

/// Answers `err` to the client. The connection stays open only when `may_keep` (the request
/// was read whole), nothing `ends` it (the client's `Connection: close`, a shutdown) and the
/// error does not put its framing in doubt.
async fn answer<S: ClientIo>(
    io: &mut S,
    b: &mut Bufs,
    http: &HttpConfig,
    ends: bool,
    err: &ProxyError,
    backend: Option<SocketAddr>,
    may_keep: bool,
) -> Outcome {
    let status: StatusCode = err.status();
    let keep = may_keep && !ends && !err.closes_connection();
    b.out.clear();
    write::error(&mut b.out, status, !keep);
    let sent = write_timeout(io, &b.out, http.stream_idle_timeout()).await.is_ok();
    Outcome { status: Some(status.as_u16()), backend, keep: keep && sent, bytes: 0 }
}
