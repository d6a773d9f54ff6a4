//! A UDP listener of the userspace L4 proxy: one session per client address (address and
//! port), each with its own connected socket to the backend the group's policy picks for the
//! client (Maglev over its address by default), so replies find their way back; sessions with
//! no datagram either way for the idle timeout are swept.
//!
//! Memory: a session holds no buffer. Datagrams from clients land in the listener's one buffer;
//! a session's reply task waits for readiness holding nothing, then receives into its worker
//! thread's buffer and sends at once without awaiting, so 10,000 sessions cost their sockets,
//! tasks and table entries (about 1-2 KiB each), not 10,000 buffers.
use std::{
    cell::RefCell,
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::UdpSocket,
    sync::{oneshot, watch},
};

use super::{
    balance::Picker,
    limit::{PerSource, SourceSlot},
    stats::{ErrorKind, ListenerStats},
};
use crate::{config::TcpListenerConfig, upstream::Backend};

/// The largest datagram relayed (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;
/// After the listener stops, a session with no datagram for this long is over: the replies
/// to what it relayed have come back.
const LINGER_QUIET: Duration = Duration::from_secs(1);
/// Replies relayed per wake-up of a session's task before it lets others run.
const REPLIES_PER_WAKE: usize = 64;

thread_local! {
    /// The buffer replies are received into on this worker thread; never held across an await.
    static REPLY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; MAX_DATAGRAM]);
}

/// After steering datagrams away (reuse_port), the listener reads on until it has had none
/// for this long (datagrams queued before the steering), and for at most `STEERED_MAX`.
const STEERED_QUIET: Duration = Duration::from_millis(200);
const STEERED_MAX: Duration = Duration::from_secs(2);

pub struct UdpService {
    pub config: TcpListenerConfig,
    pub upstream: Arc<Picker>,
    pub stats: Arc<ListenerStats>,
    /// How long sessions may linger after the listener stops.
    pub drain: super::Drain,
    /// `max_sessions_per_source`, counted by client address.
    pub per_source: Option<Arc<PerSource>>,
}

/// What a session and its reply task share.
struct Link {
    upstream: UdpSocket,
    /// Last datagram either way, in ms since the listener started.
    last_ms: AtomicU64,
}

struct Session {
    link: Arc<Link>,
    backend: Arc<Backend>,
    _slot: Option<SourceSlot>,
    /// Dropping it stops the session's reply task.
    _stop: oneshot::Sender<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves until `shutdown` turns true; sessions end with it.
pub async fn run(
    socket: UdpSocket,
    svc: Arc<UdpService>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let socket = Arc::new(socket);
    let start = Instant::now();
    let idle = svc.config.idle();
    let mut sessions: HashMap<SocketAddr, Session> = HashMap::new();
    let mut sweep =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(5)));
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // With reuse_port, stopping steers new datagrams to the process beside this one, then
    // reads what is already queued here until the socket has been quiet a moment.
    let mut quiet_until: Option<tokio::time::Instant> = None;
    let mut steered_end = tokio::time::Instant::now();
    loop {
        let quiet = async {
            match quiet_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let (n, client) = tokio::select! {
            _ = shutdown.changed(), if quiet_until.is_none() => {
                if !svc.config.reuse_port {
                    break;
                }
                if let Err(e) = crate::upgrade::overlap::steer_to_newest(&*socket) {
                    log::warn!("listener {}: cannot steer datagrams to the next process: {e}", svc.config.name);
                    break;
                }
                steered_end = tokio::time::Instant::now() + STEERED_MAX;
                quiet_until = Some(tokio::time::Instant::now() + STEERED_QUIET);
                continue;
            }
            _ = quiet => break,
            _ = sweep.tick() => {
                let now = start.elapsed().as_millis() as u64;
                let before = sessions.len();
                sessions.retain(|_, s| now.saturating_sub(s.link.last_ms.load(Ordering::Relaxed)) < idle.as_millis() as u64);
                let expired = (before - sessions.len()) as u64;
                svc.stats.udp_sessions_expired.fetch_add(expired, Ordering::Relaxed);
                svc.stats.udp_sessions_active.store(sessions.len() as u64, Ordering::Relaxed);
                continue;
            }
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    log::debug!("listener {}: recv: {e}", svc.config.name);
                    continue;
                }
            },
        };
        if let Some(t) = quiet_until.as_mut() {
            *t = (tokio::time::Instant::now() + STEERED_QUIET).min(steered_end);
        }
        if !sessions.contains_key(&client) {
            if sessions.len() >= svc.config.max_connections {
                svc.stats.error(ErrorKind::OverLimit);
                continue;
            }
            let slot = match &svc.per_source {
                Some(t) => match t.acquire(client.ip()) {
                    Some(slot) => Some(slot),
                    None => {
                        svc.stats.error(ErrorKind::SourceLimit);
                        continue;
                    }
                },
                None => None,
            };
            match open(&svc, &socket, client, start, slot).await {
                Ok(s) => {
                    sessions.insert(client, s);
                    svc.stats.udp_sessions_created.fetch_add(1, Ordering::Relaxed);
                    svc.stats.udp_sessions_active.store(sessions.len() as u64, Ordering::Relaxed);
                }
                Err(kind) => {
                    svc.stats.error(kind);
                    continue;
                }
            }
        }
        let s = &sessions[&client];
        s.link.last_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        match s.link.upstream.send(&buf[..n]).await {
            Ok(_) => {
                svc.stats.datagrams_to_backend.fetch_add(1, Ordering::Relaxed);
                svc.stats.bytes_to_backend.fetch_add(n as u64, Ordering::Relaxed);
            }
            // A refused earlier datagram (ICMP port unreachable) surfaces here; keep going.
            Err(_) => svc.stats.error(ErrorKind::Io),
        }
    }
    // Replies to datagrams already relayed still come back through the sessions' sockets
    // (and go out of the listening socket, which they share): keep the sessions until they
    // go quiet, within the drain time. After an upgrade the new process, reading the same
    // socket, answers the clients' next datagrams.
    let quiet = idle.min(LINGER_QUIET);
    let deadline = tokio::time::Instant::now() + svc.drain.get();
    while !sessions.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(quiet / 4).await;
        let now = start.elapsed().as_millis() as u64;
        sessions.retain(|_, s| {
            now.saturating_sub(s.link.last_ms.load(Ordering::Relaxed)) < quiet.as_millis() as u64
        });
    }
    drop(sessions);
    svc.stats.udp_sessions_active.store(0, Ordering::Relaxed);
    Ok(())
}

/// A new session: pick the backend, connect a socket to it, start relaying its replies.
async fn open(
    svc: &Arc<UdpService>,
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
    start: Instant,
    slot: Option<SourceSlot>,
) -> Result<Session, ErrorKind> {
    let backend = svc.upstream.pick(client.ip()).ok_or(ErrorKind::NoBackend)?;
    let bind: SocketAddr =
        if backend.addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let upstream = UdpSocket::bind(bind).await.map_err(|_| ErrorKind::Io)?;
    upstream.connect(backend.addr).await.map_err(|_| ErrorKind::ConnectFailed)?;
    let link =
        Arc::new(Link { upstream, last_ms: AtomicU64::new(start.elapsed().as_millis() as u64) });
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(replies(link.clone(), listener.clone(), svc.clone(), client, start, stopped));
    backend.in_flight.fetch_add(1, Ordering::Relaxed);
    Ok(Session { link, backend, _slot: slot, _stop: stop })
}

/// Relays a session's replies until it is dropped. Waits for readiness holding no buffer, then
/// receives into the thread's buffer and sends without awaiting: a reply the listening socket
/// cannot take now is dropped (and counted), as a full socket buffer drops UDP anywhere.
async fn replies(
    link: Arc<Link>,
    listener: Arc<UdpSocket>,
    svc: Arc<UdpService>,
    client: SocketAddr,
    start: Instant,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            r = link.upstream.readable() => if r.is_err() { break },
        }
        REPLY_BUF.with_borrow_mut(|buf| {
            for _ in 0..REPLIES_PER_WAKE {
                let n = match link.upstream.try_recv(buf) {
                    Ok(n) => n,
                    // Clears tokio's readiness: the next wait sleeps until a reply comes.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    // A refused datagram (ICMP port unreachable) surfaces here; keep going.
                    Err(_) => {
                        svc.stats.error(ErrorKind::Io);
                        continue;
                    }
                };
                link.last_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                match listener.try_send_to(&buf[..n], client) {
                    Ok(_) => {
                        svc.stats.datagrams_to_client.fetch_add(1, Ordering::Relaxed);
                        svc.stats.bytes_to_client.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => svc.stats.error(ErrorKind::Io),
                }
            }
        });
    }
}
