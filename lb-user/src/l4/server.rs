//! A TCP listener of the userspace L4 proxy: accept, learn the client (trusted PROXY header),
//! route (SNI peeked from the ClientHello, or the default upstream), then relay to a backend or
//! hand the connection to an L7 TLS listener.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};

use super::{
    balance::Picker,
    handoff::{Handoff, TlsHandoff},
    kernel::{self, Mode},
    limit::PerSource,
    peek::{PeekError, peek_feed, peek_until},
    proxy_protocol::{self, canonical},
    sni::{self, HelloError, SniRoutes},
    stats::{ErrorKind, Gauge, ListenerStats},
    tcp::{self, RelayError, RelayOpts},
};
use crate::{
    config::{ProxyProtocol, TcpListenerConfig},
    upstream::InFlight,
};

/// How long connections may finish after shutdown before they are cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a connection goes.
#[derive(Clone)]
pub enum Route {
    Upstream(Arc<Picker>),
    Terminate(String, Arc<dyn TlsHandoff>),
}

/// Everything a TCP listener's connections share.
pub struct TcpService {
    pub config: TcpListenerConfig,
    pub routes: SniRoutes<Route>,
    pub default: Option<Arc<Picker>>,
    pub stats: Arc<ListenerStats>,
    /// Kernel or userspace relay, chosen when the listener was built.
    pub relay: super::kernel::Mode,
    /// How long connections may finish after the listener stops.
    pub drain: super::Drain,
    /// `max_connections_per_source`, counted by peer address.
    pub per_source: Option<Arc<PerSource>>,
}

/// Accepts until `shutdown` turns true, then lets connections finish for `service.drain`.
/// One accept loop per listener: accepting is a small part of a connection's work (which runs
/// in its own task on any worker), and several loops on one socket all woke for each new
/// connection, the losers only to get EAGAIN.
pub async fn run(
    listener: TcpListener,
    service: Arc<TcpService>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limit = Arc::new(Semaphore::new(service.config.max_connections));
    accept_loop(listener, service, limit, shutdown).await
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<TcpService>,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        // Waiting for a permit before accepting leaves extra clients in the kernel's backlog.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("listener {}: accept: {e}", service.config.name);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        service.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // PROXY senders carry many clients: the limit is for the ones connecting directly.
        let slot = match &service.per_source {
            Some(t) if !service.config.trusts(peer.ip()) => match t.acquire(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    // Closed before anything is read or spawned: a reset, so neither side
                    // keeps the connection in TIME_WAIT.
                    service.stats.error(ErrorKind::SourceLimit);
                    let _ = stream.set_zero_linger();
                    continue;
                }
            },
            _ => None,
        };
        let service = service.clone();
        conns.spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let _active = Gauge::up(&service.stats.active);
            if let Err(kind) = serve(&service, stream, peer).await {
                service.stats.error(kind);
                log::debug!("listener {}: {peer}: {}", service.config.name, kind.as_str());
            }
        });
        // Reap finished connections without waiting: waiting on the set would wake this task
        // (often on the other worker thread) for every connection that ends.
        while conns.try_join_next().is_some() {}
    }
    // Closed before the drain: with reuse_port the kernel moves what is queued on it to the
    // process beside this one (the daemon closes its other copies too).
    drop(listener);
    let drained = tokio::time::timeout(service.drain.get(), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::info!(
            "listener {}: cutting {} connections after drain",
            service.config.name,
            conns.len()
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// One connection, start to end.
async fn serve(svc: &TcpService, mut client: TcpStream, peer: SocketAddr) -> Result<(), ErrorKind> {
    let cfg = &svc.config;
    // TCP_NODELAY comes from the listening socket (accepted sockets inherit it).
    // The local address is asked of the kernel only when something needs it (a PROXY header
    // to the backend, a hand-off), not for every plain relay.
    let (mut src, mut dst) = (canonical(peer), None);

    if cfg.trusts(peer.ip()) {
        let max = 16 + proxy_protocol::V2_MAX_PAYLOAD;
        let header = tokio::time::timeout(
            cfg.peek_timeout.0,
            peek_until(&client, max, proxy_protocol::parse),
        )
        .await
        .map_err(|_| ErrorKind::ProxyHeaderTimeout)?
        .map_err(|e| match e {
            PeekError::Eof => ErrorKind::EarlyEof,
            PeekError::Io(_) => ErrorKind::Io,
            PeekError::Parse(_) | PeekError::TooLarge => ErrorKind::ProxyHeaderBad,
        })?;
        // The header is queued in full (we peeked it), so this read does not wait.
        let mut skip = vec![0u8; header.len];
        client.read_exact(&mut skip).await.map_err(|_| ErrorKind::Io)?;
        if let Some((s, d)) = header.addrs {
            (src, dst) = (canonical(s), Some(canonical(d)));
        }
    }

    let mut hello = None;
    let route = if svc.routes.is_empty() {
        svc.default.clone().map(Route::Upstream)
    } else {
        let peeked = tokio::time::timeout(
            cfg.peek_timeout.0,
            peek_feed(&client, &mut sni::HelloReader::default()),
        )
        .await
        .map_err(|_| ErrorKind::PeekTimeout)?;
        match peeked {
            Ok(h) => {
                let r = h.sni.as_deref().and_then(|s| svc.routes.find(s)).cloned();
                if r.is_some() {
                    svc.stats.sni_routed.fetch_add(1, Ordering::Relaxed);
                }
                hello = Some(h);
                match (r, &svc.default) {
                    (Some(r), _) => Some(r),
                    (None, Some(d)) => Some(Route::Upstream(d.clone())),
                    (None, None) => return Err(ErrorKind::NoRoute),
                }
            }
            Err(PeekError::Parse(HelloError::NotTls)) => match &svc.default {
                Some(d) => Some(Route::Upstream(d.clone())),
                None => return Err(ErrorKind::NotTls),
            },
            Err(PeekError::Parse(_) | PeekError::TooLarge) => {
                return Err(ErrorKind::BadClientHello);
            }
            Err(PeekError::Eof) => return Err(ErrorKind::EarlyEof),
            Err(PeekError::Io(_)) => return Err(ErrorKind::Io),
        }
    };

    match route.ok_or(ErrorKind::NoRoute)? {
        Route::Terminate(_, target) => {
            let (sni, alpn) = hello.map(|h| (h.sni, h.alpn)).unwrap_or_default();
            let local = local_addr(&client, dst)?;
            let conn = Handoff {
                stream: client,
                client: src,
                local,
                sni,
                alpn,
                listener: cfg.name.clone(),
            };
            target.handoff(conn).map_err(|_| ErrorKind::HandoffFailed)?;
            svc.stats.handed_off.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Route::Upstream(picker) => {
            let read_header = cfg.trusts(peer.ip());
            relay_to(svc, client, read_header, &picker, src, dst).await
        }
    }
}

/// The address the client connected to (what a PROXY header reports as the destination).
fn local_addr(client: &TcpStream, known: Option<SocketAddr>) -> Result<SocketAddr, ErrorKind> {
    match known {
        Some(a) => Ok(a),
        None => client.local_addr().map(canonical).map_err(|_| ErrorKind::Io),
    }
}

/// Backends tried per connection: the client's own, then up to two others.
pub const CONNECT_TRIES: usize = 3;

/// Connects to the client's backend; when that fails (refused, unreachable, timed out), to the
/// next ones Maglev gives the client among the available backends, [`CONNECT_TRIES`] in all.
async fn connect(
    svc: &TcpService,
    picker: &Picker,
    client: IpAddr,
) -> Result<(InFlight, TcpStream), ErrorKind> {
    let cfg = &svc.config;
    // Allocates only once a connect has failed.
    let mut failed: Vec<SocketAddr> = Vec::new();
    loop {
        let Some(backend) = picker.pick_avoiding(client, &failed) else {
            return Err(if failed.is_empty() {
                ErrorKind::NoBackend
            } else {
                ErrorKind::ConnectFailed
            });
        };
        if !failed.is_empty() {
            svc.stats.connect_retries.fetch_add(1, Ordering::Relaxed);
        }
        // Counted from the pick, so least-conn sees connections still connecting.
        let in_flight = backend.start();
        match tokio::time::timeout(cfg.connect_timeout.0, TcpStream::connect(backend.addr)).await {
            Ok(Ok(s)) => return Ok((in_flight, s)),
            Ok(Err(e)) => log::debug!("listener {}: connect {}: {e}", cfg.name, backend.addr),
            Err(_) => log::debug!("listener {}: connect {}: timed out", cfg.name, backend.addr),
        }
        svc.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
        failed.push(backend.addr);
        if failed.len() >= CONNECT_TRIES {
            return Err(ErrorKind::ConnectFailed);
        }
    }
}

async fn relay_to(
    svc: &TcpService,
    client: TcpStream,
    read_header: bool,
    picker: &Picker,
    src: SocketAddr,
    dst: Option<SocketAddr>,
) -> Result<(), ErrorKind> {
    let cfg = &svc.config;
    let (in_flight, mut upstream) = connect(svc, picker, src.ip()).await?;
    let backend = in_flight.backend();
    let _ = upstream.set_nodelay(true);
    let header = match cfg.proxy_protocol {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => Some(proxy_protocol::encode_v1(src, local_addr(&client, dst)?)),
        ProxyProtocol::V2 => Some(proxy_protocol::encode_v2(src, local_addr(&client, dst)?)),
    };
    if let Some(h) = header {
        upstream.write_all(&h).await.map_err(|_| ErrorKind::Io)?;
        svc.stats.bytes_to_backend.fetch_add(h.len() as u64, Ordering::Relaxed);
    }
    svc.stats.relayed.fetch_add(1, Ordering::Relaxed);
    let opts =
        RelayOpts { idle: cfg.idle(), buffer_size: cfg.buffer_size, zero_copy: cfg.zero_copy };
    let r = relay_with(svc, client, read_header, upstream, opts).await;
    match r {
        Ok(_) => Ok(()),
        Err(RelayError::Idle(_)) => Err(ErrorKind::IdleTimeout),
        Err(RelayError::Io(e)) => {
            log::debug!("listener {}: relay with {}: {e}", cfg.name, backend.addr);
            Err(ErrorKind::Io)
        }
    }
}

/// Relays in the kernel when the listener does and this connection can join; else in userspace.
/// Both sockets are closed when this returns.
async fn relay_with(
    svc: &TcpService,
    client: TcpStream,
    read_header: bool,
    upstream: TcpStream,
    mut opts: RelayOpts,
) -> Result<tcp::Moved, RelayError> {
    let (up, down) = (&svc.stats.bytes_to_backend, &svc.stats.bytes_to_client);
    let (client, upstream) = match svc.relay {
        Mode::Kernel(k) => {
            match kernel::relay(k, read_header, client, upstream, opts, up, down).await {
                Ok(done) => return done,
                Err(n) => {
                    log::debug!("listener {}: relayed in userspace: {}", svc.config.name, n.why);
                    (n.client, n.backend)
                }
            }
        }
        Mode::User { zero_copy } => {
            opts.zero_copy = zero_copy;
            (client, upstream)
        }
    };
    tcp::relay(&client, &upstream, opts, up, down).await
}
