//! One L7 listener: accept with a connection limit, terminate TLS, serve HTTP/1.1 and HTTP/2
//! (ALPN or prior knowledge) with header-read and idle timeouts, drain gracefully on shutdown.
use std::{convert::Infallible, future::pending, net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

use hyper::{server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;

use super::{
    L7Error,
    body::Active,
    h1,
    proxy::{self, Ctx},
    route::Router,
    upstream::Upstream,
};
use crate::{
    config::{Config, HttpConfig, ListenerConfig},
    tls::{SniResolver, TlsError, server_config},
};

/// Pending connections a listener queues before `accept` (capped by net.core.somaxconn).
const LISTEN_BACKLOG: u32 = 4096;
/// What an HTTP/2 prior-knowledge connection starts with; anything else on a plain listener
/// is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A listener's server, built from the config without binding (see [`Server::bind`]).
pub struct Server {
    pub name: String,
    pub listen: SocketAddr,
    /// SO_REUSEPORT (`reuse_port`): an overlapping process may bind `listen` too.
    pub reuse_port: bool,
    /// Routes and upstreams, read per request so a reload reaches open connections too.
    ctx: ArcSwap<Ctx>,
    http: Arc<HttpConfig>,
    tls: Option<(Arc<SniResolver>, TlsAcceptor)>,
    /// HTTP/2 connections (h2c prior knowledge, ALPN h2); HTTP/1 is `h1/`'s.
    h2: http2::Builder<TokioExecutor>,
}

impl Server {
    pub fn new(
        listener: &ListenerConfig,
        config: &Config,
        upstreams: &std::collections::HashMap<String, Arc<Upstream>>,
    ) -> Result<Self, L7Error> {
        let http = Arc::new(config.http.clone());
        let tls = if listener.tls.is_empty() {
            None
        } else {
            let resolver = Arc::new(
                SniResolver::load(&listener.tls)
                    .map_err(|source| L7Error::Tls { listener: listener.name.clone(), source })?,
            );
            let acceptor = TlsAcceptor::from(server_config(resolver.clone()));
            Some((resolver, acceptor))
        };
        let routes = config.http.route.iter().filter(|r| r.listener == listener.name);
        let ctx = Arc::new(Ctx {
            listener: listener.name.clone(),
            router: Router::new(routes),
            upstreams: upstreams.clone(),
            http: http.clone(),
            tls: tls.is_some(),
            stats: crate::upstream::stats::listener(&listener.name),
        });
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(http.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(http.h2_max_concurrent_streams)
            .keep_alive_interval(Some(http.h2_keepalive()))
            .keep_alive_timeout(http.h2_keepalive())
            // Rapid reset (CVE-2023-44487): a client that resets streams faster than the
            // server completes them gets GOAWAY (ENHANCE_YOUR_CALM) past this many.
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256));
        let ctx = ArcSwap::new(ctx);
        let (name, listen, reuse_port) =
            (listener.name.clone(), listener.listen, listener.reuse_port);
        Ok(Self { name, listen, reuse_port, ctx, http, tls, h2 })
    }

    /// Takes `other`'s routes, upstreams, per-request limits and certificates (a reload of the
    /// same listener): requests that start from now on use them, on open connections too.
    /// Header timeouts and connection limits stay (they take a restart).
    pub fn update_from(&self, other: &Server) {
        self.ctx.store(other.ctx.load_full());
        if let (Some((mine, _)), Some((theirs, _))) = (&self.tls, &other.tls) {
            mine.adopt(theirs);
        }
    }

    /// The listening socket a replaced process handed over for this listener, else a new one.
    pub async fn bind_from(
        &self,
        inherited: &mut crate::upgrade::Inherited,
    ) -> Result<TcpListener, L7Error> {
        let err = |source| L7Error::Bind { listener: self.name.clone(), addr: self.listen, source };
        match inherited.tcp(crate::upgrade::Kind::Http, &self.name, self.listen) {
            Some(l) => {
                crate::upgrade::overlap::set_reuse_port(&l, self.reuse_port).map_err(err)?;
                TcpListener::from_std(l).map_err(err)
            }
            None => self.bind().await,
        }
    }

    /// Binds the configured address.
    pub async fn bind(&self) -> Result<TcpListener, L7Error> {
        let bind = || {
            let socket = if self.listen.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_reuseport(self.reuse_port)?;
            socket.bind(self.listen)?;
            // tokio's default backlog (128) drops SYNs in a burst of new connections while
            // the accept loop catches up; the kernel caps this at net.core.somaxconn.
            socket.listen(LISTEN_BACKLOG)
        };
        bind().map_err(|source| L7Error::Bind {
            listener: self.name.clone(),
            addr: self.listen,
            source,
        })
    }

    /// Re-reads this listener's certificates (new handshakes use them); no-op without TLS.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some((resolver, _)) => resolver.reload(),
            None => Ok(()),
        }
    }

    /// Serves `listener` until `shutdown` turns true (or its sender goes away), then stops
    /// accepting and gives open connections `grace_ms` to finish their requests.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let limit = Arc::new(Semaphore::new(self.http.max_connections));
        let mut conns = JoinSet::new();
        loop {
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => p.expect("never closed"),
                _ = stopped(&mut shutdown) => break,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        log::warn!("{}: accept: {e}", self.name);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stopped(&mut shutdown) => break,
            };
            while conns.try_join_next().is_some() {}
            conns.spawn(self.clone().connection(stream, peer, Some(permit), shutdown.clone()));
        }
        drop(listener);
        let open = conns.len();
        if open > 0 {
            log::info!(
                "{}: draining {open} connections for up to {:?}",
                self.name,
                self.http.grace()
            );
        }
        let drained = tokio::time::timeout(self.http.grace(), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            log::warn!(
                "{}: {} connections still busy after the grace period; closing",
                self.name,
                conns.len()
            );
            conns.shutdown().await;
        }
        Ok(())
    }

    /// Serves a connection the userspace L4 listener accepted and handed over (an SNI route
    /// with `terminate = "NAME"`): its ClientHello is still unread, so it goes through this
    /// listener's TLS acceptor like any other. It counts against the L4 listener's connection
    /// limit, not this one's, and stops with `shutdown` like the daemon's other connections.
    pub fn adopt(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) {
        tokio::spawn(self.clone().connection(stream, peer, None, shutdown));
    }

    /// True when this listener terminates TLS (only those can take L4 hand-offs, and a reload
    /// that toggles TLS replaces the listener).
    pub fn terminates_tls(&self) -> bool {
        self.tls.is_some()
    }

    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _permit: Option<OwnedSemaphorePermit>,
        shutdown: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        if self.tls.is_some() {
            // Boxed: this task's size is what every idle plain connection holds, and a TLS
            // stream is large.
            return Box::pin(self.serve_tls(stream, peer, shutdown)).await;
        }
        match self.sniff(&stream).await {
            Some(false) => h1::serve(stream, peer, &self.ctx, &self.http, shutdown).await,
            Some(true) => Box::pin(self.serve_h2(TokioIo::new(stream), peer, shutdown)).await,
            None => log::debug!("{}: {peer} sent nothing within the header timeout", self.name),
        }
    }

    /// Whether a plain connection starts with the HTTP/2 preface (prior knowledge): true, or
    /// false for HTTP/1; None when the client sent nothing within the header timeout.
    async fn sniff(&self, stream: &TcpStream) -> Option<bool> {
        let deadline = tokio::time::Instant::now() + self.http.header_timeout();
        let mut first = [0u8; 3];
        loop {
            let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
            let n = peeked.ok()?.ok()?;
            if n == 0 {
                return None;
            }
            // "PRI" is no HTTP/1 method (RFC 9113 §3.4 reserves it), so three bytes decide.
            if n == first.len() || !H2_PREFACE.starts_with(&first[..n]) {
                return Some(n == first.len() && first[..] == H2_PREFACE[..n]);
            }
            // One or two bytes of a segment: peek would return them again at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn serve_tls(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        shutdown: watch::Receiver<bool>,
    ) {
        let Some((_, acceptor)) = &self.tls else { return };
        // The handshake shares the header timeout: a silent client is a slowloris too.
        match tokio::time::timeout(self.http.header_timeout(), acceptor.accept(stream)).await {
            // Exactly the protocol ALPN chose: h2, or HTTP/1.1 (also without ALPN).
            Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                self.clone().serve_h2(TokioIo::new(tls), peer, shutdown).await
            }
            Ok(Ok(tls)) => h1::serve(tls, peer, &self.ctx, &self.http, shutdown).await,
            Ok(Err(e)) => log::debug!("{}: TLS handshake with {peer}: {e}", self.name),
            Err(_) => log::debug!("{}: TLS handshake with {peer} timed out", self.name),
        }
    }

    async fn serve_h2<I>(
        self: Arc<Self>,
        io: I,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (active_tx, mut active_rx) = watch::channel(0usize);
        let server = self.clone();
        let service = service_fn(move |req| {
            let active = Active::new(&active_tx);
            let ctx = server.ctx.load_full();
            async move { Ok::<_, Infallible>(proxy::handle(ctx, peer, req, active).await) }
        });
        let conn = self.h2.serve_connection(io, service);
        tokio::pin!(conn);
        let idle = idle(&mut active_rx, self.http.idle_timeout());
        tokio::pin!(idle);
        let mut closing = false;
        loop {
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        log::debug!("{}: connection from {peer}: {e}", self.name);
                    }
                    return;
                }
                _ = &mut idle, if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = stopped(&mut shutdown), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Resolves when shutdown is asked for, or when nobody can ask any more.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await.map(|_| ());
}

/// Resolves once the connection has had no request in progress for `timeout`.
async fn idle(active: &mut watch::Receiver<usize>, timeout: Duration) {
    loop {
        if *active.borrow_and_update() == 0 {
            match tokio::time::timeout(timeout, active.changed()).await {
                Err(_) => return,
                Ok(Err(_)) => pending::<()>().await,
                Ok(Ok(())) => {}
            }
        } else if active.changed().await.is_err() {
            pending::<()>().await;
        }
    }
}
