//! One HTTP/1 client connection: read a head, serve the exchange, repeat while both sides keep
//! the connection; between requests a plain connection holds no buffer (see `buf.rs`).
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
};

use super::{
    buf::{Buf, Bufs},
    exchange::{self, Outcome},
    head::{self, Head, HeadError},
    write,
};
use crate::{config::HttpConfig, l7::proxy::Ctx};

/// A client stream the codec can serve.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// The bare socket, when nothing sits buffered above it (plain TCP): the connection can
    /// then wait for its next request on the socket alone, its buffers given back.
    fn bare(&self) -> Option<&TcpStream>;
}

impl ClientIo for TcpStream {
    fn bare(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn bare(&self) -> Option<&TcpStream> {
        None
    }
}

/// How long a plain connection stays busy (its exchange state and buffers allocated) after a
/// response while the client sends nothing: a client that sends its next request at once costs
/// no allocation; an idle one holds only the socket and this task's small state.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// Serves `io` until the client or the proxy ends the connection.
pub async fn serve<S: ClientIo>(
    mut io: S,
    peer: SocketAddr,
    ctx: &ArcSwap<Ctx>,
    http: &HttpConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        if let Some(sock) = io.bare() {
            let wait = if first { http.header_timeout() } else { http.idle_timeout() };
            tokio::select! {
                r = tokio::time::timeout(wait, sock.readable()) => {
                    if !matches!(r, Ok(Ok(()))) {
                        break;
                    }
                }
                _ = stopped_lingering(&mut shutdown) => break,
            }
        }
        // Boxed: the exchange's state is large and lives only while the client talks.
        let busy = Box::pin(busy(&mut io, peer, ctx, http, &mut shutdown, &mut first));
        if !busy.await {
            break;
        }
    }
    // Bounded: a TLS close_notify toward a client that reads nothing must not hold the task.
    let _ = tokio::time::timeout(http.header_timeout(), io.shutdown()).await;
}

/// Serves requests while they come; false when the connection is over, true when it went
/// quiet and parks (buffers back in the pool).
async fn busy<S: ClientIo>(
    io: &mut S,
    peer: SocketAddr,
    ctx: &ArcSwap<Ctx>,
    http: &HttpConfig,
    shutdown: &mut watch::Receiver<bool>,
    first: &mut bool,
) -> bool {
    let mut b = Bufs::take();
    let more = loop {
        let keep = exchange_one(io, &mut b, ctx, http, peer, *first, shutdown).await;
        *first = false;
        // A shutdown that came during this exchange did not put `Connection: close` on its
        // response: the client may be sending its next request now, which gets that close.
        if !keep {
            break false;
        }
        if !b.client.is_empty() {
            continue;
        }
        let Some(sock) = io.bare() else { continue };
        match tokio::time::timeout(PARK_AFTER, sock.readable()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break false,
            Err(_) => break true,
        }
    };
    b.give();
    more
}

/// Reads and serves one request; true when the connection can carry another.
async fn exchange_one<S: ClientIo>(
    io: &mut S,
    b: &mut Bufs,
    ctx: &ArcSwap<Ctx>,
    http: &HttpConfig,
    peer: SocketAddr,
    first: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let head = match read_head(io, b, http, first, shutdown).await {
        Ok(Some(h)) => h,
        Ok(None) => return false,
        Err(e) => {
            let status = match e {
                HeadError::Bad(why) => {
                    log::debug!("{peer}: bad request: {why}");
                    hyper::StatusCode::BAD_REQUEST
                }
                HeadError::TooLarge => hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                HeadError::Method => hyper::StatusCode::METHOD_NOT_ALLOWED,
            };
            let ctx = ctx.load();
            ctx.stats.record(status.as_u16(), std::time::Duration::ZERO);
            b.out.clear();
            write::error(&mut b.out, status, true);
            let _ = tokio::time::timeout(http.header_timeout(), io.write_all(&b.out)).await;
            return false;
        }
    };
    let start = Instant::now();
    let ctx = ctx.load_full();
    // Per-request settings come from the listener's current context, so a reload reaches
    // open connections; head limits and timeouts are the listener's own (a restart's).
    let http = &*ctx.http;
    let log = crate::l7::access::enabled(http.access_log);
    if log {
        // The head's bytes are consumed by forward: what the line shows is copied first.
        let hb = &b.client.filled()[..head.len];
        b.access.clear();
        b.access.extend_from_slice(head.method_span.of(hb));
        b.access.push(b' ');
        b.access.extend_from_slice(head.authority.map_or(&b""[..], |a| a.of(hb)));
        b.access.push(b' ');
        b.access.extend_from_slice(head.path(hb));
    }
    let outcome = exchange::forward(io, b, &ctx, http, peer, &head, shutdown).await;
    let Outcome { status, backend, keep, bytes } = outcome;
    if let Some(status) = status {
        ctx.stats.record(status, start.elapsed());
    }
    if log {
        let text = String::from_utf8_lossy(&b.access);
        let mut parts = text.splitn(3, ' ');
        let line = crate::l7::access::Line {
            time: crate::l7::access::now(),
            listener: &ctx.listener,
            client: peer,
            method: parts.next().unwrap_or(""),
            authority: parts.next().unwrap_or(""),
            path: parts.next().unwrap_or(""),
            status: status.unwrap_or(0),
            backend,
            bytes,
            duration: crate::l7::access::millis(start.elapsed()),
        };
        crate::l7::access::write(http.access_log, &line);
    }
    keep
}

/// How long a connection between requests stays open after a shutdown was asked for. Its
/// last response went out without `Connection: close` (the shutdown came later), so a busy
/// client may be sending its next request right now: closing at once would reset that
/// request, waiting a moment answers it (with the close). An idle client gets the close it
/// would have got anyway.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(1);

/// Resolves [`SHUTDOWN_LINGER`] after shutdown is asked for (see there).
async fn stopped_lingering(shutdown: &mut watch::Receiver<bool>) {
    stopped(shutdown).await;
    tokio::time::sleep(SHUTDOWN_LINGER).await;
}

/// Resolves when shutdown is asked for, or when nobody can ask any more.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await.map(|_| ());
}

/// Reads until a whole head is buffered. `Ok(None)`: the connection ends quietly (closed
/// between requests, idle, shutdown, or a head that did not arrive in time).
async fn read_head<S: ClientIo>(
    io: &mut S,
    b: &mut Bufs,
    http: &HttpConfig,
    first: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<Option<Head>, HeadError> {
    // The first request of a connection gets the header timeout from the start (a client
    // that sends nothing is a slowloris too); later ones from their first byte.
    let mut deadline = first.then(|| tokio::time::Instant::now() + http.header_timeout());
    // Bytes already looked at for the end of the head: a head trickled in small reads is
    // parsed once when it can be complete, not once per read.
    let mut scanned = 0;
    loop {
        if !b.client.is_empty() {
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + http.header_timeout());
            let filled = b.client.filled();
            if scanned == 0 || may_end(filled, scanned) {
                let max = http.max_header_bytes;
                if let Some(h) = head::parse(filled, &mut b.fields, http.max_headers, max)? {
                    return Ok(Some(h));
                }
            }
            scanned = filled.len();
            if b.client.spare().is_empty() && !b.client.grow(http.max_header_bytes) {
                return Err(HeadError::TooLarge);
            }
        }
        let read = read_into(io, &mut b.client);
        let n = if scanned > 0 {
            // Inside a head: only its deadline counts (shutdown waits for the request).
            let d = deadline.expect("set with the first byte");
            match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => return Ok(None),
            }
        } else {
            // Between requests: the first byte may take the idle timeout (the header
            // timeout for a connection's first request); shutdown ends the wait.
            let d = deadline.unwrap_or_else(|| tokio::time::Instant::now() + http.idle_timeout());
            tokio::select! {
                r = tokio::time::timeout_at(d, read) => match r {
                    Ok(r) => r,
                    Err(_) => return Ok(None),
                },
                _ = stopped_lingering(shutdown) => return Ok(None),
            }
        };
        match n {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// True when the bytes after `scanned` could complete a head (an empty line, or a bare LF the
/// parser refuses).
fn may_end(filled: &[u8], scanned: usize) -> bool {
    let from = scanned.saturating_sub(3);
    filled[from..].contains(&b'\n')
        && (filled[from..].windows(4).any(|w| w == b"\r\n\r\n")
            || filled[from..].windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'))
}

/// One read into the buffer's spare room.
pub async fn read_into<R: AsyncRead + Unpin>(io: &mut R, buf: &mut Buf) -> std::io::Result<usize> {
    let n = io.read(buf.spare()).await?;
    buf.filled_by(n);
    Ok(n)
}
