//! Connections to an upstream group's HTTP/1.1 backends: connect (plain or TLS with the
//! group's SNI and verification), and keep idle ones per backend for reuse. The request's own
//! task drives the connection it takes: no connection task, no channel, no per-request spawn.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// A connection to a backend.
pub enum UpIo {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpIo {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(t) => t,
            Self::Tls(t) => t.get_ref().0,
        }
    }

    /// Still usable after sitting idle: the backend has sent nothing (no FIN, no stray bytes).
    /// tokio keeps the socket's readiness, so the common case costs no system call.
    fn is_clean(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        if self.tcp().poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        // Ready may be stale (the last read filled its buffer exactly): ask the socket. A TLS
        // connection's bytes cannot be peeked at without rustls, so it is given up instead.
        let Self::Tcp(t) = self else { return false };
        let mut probe = [0u8; 1];
        matches!(t.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_read(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_write(cx, buf),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_flush(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => Pin::new(t).poll_shutdown(cx),
            Self::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

struct Idle {
    io: UpIo,
    since: Instant,
}

/// TLS toward the backends: the connector and the fixed server name.
pub struct Tls {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
}

/// The idle connections of one group, by backend.
pub struct Pool {
    idle: Mutex<Vec<(SocketAddr, Vec<Idle>)>>,
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
    tls: Option<Tls>,
}

impl Pool {
    pub fn new(
        max_idle: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
        tls: Option<Tls>,
    ) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            connect_timeout,
            tls,
        })
    }

    /// The most recently used idle connection to `addr` that is still good.
    pub fn take(&self, addr: SocketAddr) -> Option<UpIo> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let (_, list) = idle.iter_mut().find(|(a, _)| *a == addr)?;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < self.idle_timeout && c.io.is_clean() {
                return Some(c.io);
            }
        }
        None
    }

    /// Keeps `io` for the next request to `addr` (oldest ones past the timeout or the cap go).
    pub fn put(&self, addr: SocketAddr, io: UpIo) {
        if self.max_idle == 0 {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = match idle.iter().position(|(a, _)| *a == addr) {
            Some(i) => &mut idle[i].1,
            None => {
                idle.push((addr, Vec::with_capacity(self.max_idle.min(64))));
                &mut idle.last_mut().expect("just pushed").1
            }
        };
        let stale = list.iter().take_while(|c| now - c.since >= self.idle_timeout).count();
        list.drain(..stale);
        if list.len() >= self.max_idle {
            list.remove(0);
        }
        list.push(Idle { io, since: now });
    }

    /// A new connection to `addr` within the connect timeout (TLS handshake included).
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<UpIo> {
        connect(addr, self.connect_timeout, self.tls.as_ref()).await
    }
}

/// A new connection to `addr` within `timeout` (TLS handshake included).
pub async fn connect(addr: SocketAddr, timeout: Duration, tls: Option<&Tls>) -> io::Result<UpIo> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out())??;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else { return Ok(UpIo::Tcp(tcp)) };
    let handshake = tls.connector.connect(tls.name.clone(), tcp);
    let stream = tokio::time::timeout(timeout, handshake).await.map_err(|_| timed_out())??;
    Ok(UpIo::Tls(Box::new(stream)))
}
