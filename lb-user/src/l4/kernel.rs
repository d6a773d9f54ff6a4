//! The kernel relay (`relay = "kernel"`): once a connection's backend is connected, both sockets
//! join a sockhash whose stream verdict program (the `lb-relay` object) redirects each one's
//! received bytes to the other's send queue inside the kernel. Userspace does nothing per
//! exchange: it waits for end-of-stream or an error on either socket, half-closes the peer once
//! everything redirected before the FIN has reached the peer's send queue, reads the program's
//! counters on a timer (byte counters, idle timeout), and takes both sockets out at the end.
//!
//! Bytes that arrived before a socket joined (a peeked ClientHello, anything after a PROXY
//! header) are still in its receive queue: setting `SO_RCVLOWAT` runs the joined socket's
//! data-ready callback, which feeds that queue to the verdict program first, in order.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use lb_common::relay::{self, RelayPeer};
use tokio::{io::Interest, net::TcpStream};

use super::{
    sys::{self, Said},
    tcp::{Moved, RelayError, RelayOpts},
};
use crate::config::Relay;

/// The `lb-relay` object: the verdict program and its two maps, nothing of the XDP program.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-relay"));

/// How often a relayed connection's counters are folded into the listener's (and its idle time
/// checked, when that comes sooner).
const STATS_TICK: Duration = Duration::from_secs(2);

/// How long an ended direction may take to hand its last redirected bytes to the peer's send
/// queue before the peer is half-closed anyway (the kernel's work queue usually takes
/// microseconds; a peer whose send buffer stays full is the slow case).
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// The loaded program and its maps, shared by every listener of the process.
pub struct KernelRelay {
    maps: Mutex<Maps>,
}

struct Maps {
    socks: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, RelayPeer>,
    // Owns the program and its attachment to `socks`; dropping it detaches.
    _ebpf: Ebpf,
}

static RELAY: OnceLock<Result<KernelRelay, String>> = OnceLock::new();

/// The process's kernel relay, loaded on first use; the error says why it is unavailable (and
/// is logged once, the first time it is asked for).
pub fn get() -> Result<&'static KernelRelay, &'static str> {
    RELAY
        .get_or_init(|| {
            let r = KernelRelay::load().map_err(|e| e.to_string());
            if let Err(e) = &r {
                log::warn!("kernel relay unavailable, tcp listeners splice or copy: {e}");
            }
            r
        })
        .as_ref()
        .map_err(String::as_str)
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the relay program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the relay object has no {0}")]
    Missing(&'static str),
    #[error("relay map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("relay program: {0}")]
    Program(#[from] aya::programs::ProgramError),
}

impl KernelRelay {
    fn load() -> Result<Self, LoadError> {
        // Needs CAP_BPF and CAP_NET_ADMIN (root): an unprivileged daemon fails here, at once.
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(LoadError::Missing(name))
        };
        let socks: SockHash<MapData, u64> = take(&mut ebpf, relay::maps::SOCKS)?.try_into()?;
        let peers: HashMap<MapData, u64, RelayPeer> =
            take(&mut ebpf, relay::maps::PEERS)?.try_into()?;
        let prog: &mut SkSkb = ebpf
            .program_mut(relay::PROGRAM)
            .ok_or(LoadError::Missing(relay::PROGRAM))?
            .try_into()?;
        prog.load()?;
        prog.attach(socks.fd())?;
        Ok(Self { maps: Mutex::new(Maps { socks, peers, _ebpf: ebpf }) })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, cookie: u64) -> Option<RelayPeer> {
        self.maps().peers.get(&cookie, 0).ok()
    }
}

/// Why a connection could not be relayed in the kernel.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Nothing moved yet: the caller relays this connection in userspace instead (maps full,
    /// a socket the kernel refuses).
    #[error("joining the relay maps: {0}")]
    NotJoined(String),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// One side of a joined connection.
struct Side<'a> {
    stream: &'a TcpStream,
    cookie: u64,
    /// What [`sys::tcp_written`] said when the socket joined (a PROXY header counts there).
    written_at_join: u64,
    /// This side's counter (bytes received here and redirected) as last folded.
    seen: u64,
    /// The listener counter for bytes this side receives.
    counter: &'a AtomicU64,
    ended: bool,
}

/// Both sockets in the maps; taking them out (and folding the last counts) on drop, however
/// the relay ends: done, failed, idle or aborted by a drain that ran out.
struct Joined<'a> {
    relay: &'a KernelRelay,
    sides: [Side<'a>; 2],
    start: Instant,
}

impl Joined<'_> {
    /// Adds what the program counted since the last call to the listener counters; returns the
    /// latest activity (ns of CLOCK_MONOTONIC) of either side, 0 for none.
    fn fold(&mut self) -> u64 {
        let mut last = 0;
        for side in &mut self.sides {
            if let Some(e) = self.relay.entry(side.cookie) {
                side.counter.fetch_add(e.bytes.saturating_sub(side.seen), Ordering::Relaxed);
                side.seen = side.seen.max(e.bytes);
                last = last.max(e.last_ns);
            }
        }
        last
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        self.fold();
        let mut maps = self.relay.maps();
        for side in &self.sides {
            // Closing a socket takes it out of the sockhash anyway; the peer entry must go.
            let _ = maps.socks.remove(&side.cookie);
            let _ = maps.peers.remove(&side.cookie);
        }
    }
}

/// Relays `client` and `backend` in the kernel until both directions have ended, one fails, or
/// the connection idles, as [`super::tcp::relay`] does in userspace.
pub async fn relay(
    relay: &KernelRelay,
    client: &TcpStream,
    backend: &TcpStream,
    opts: RelayOpts,
    to_backend: &AtomicU64,
    to_client: &AtomicU64,
) -> Result<Moved, JoinError> {
    let mut joined = join(relay, client, backend, to_backend, to_client)?;
    let r = watch(&mut joined, opts.idle).await;
    joined.fold();
    let moved = Moved { to_backend: joined.sides[0].seen, to_client: joined.sides[1].seen };
    r.map(|()| moved).map_err(JoinError::Relay)
}

fn join<'a>(
    relay: &'a KernelRelay,
    client: &'a TcpStream,
    backend: &'a TcpStream,
    to_backend: &'a AtomicU64,
    to_client: &'a AtomicU64,
) -> Result<Joined<'a>, JoinError> {
    let not = |e: io::Error| JoinError::NotJoined(e.to_string());
    let side = |stream: &'a TcpStream, counter| -> Result<Side<'a>, JoinError> {
        Ok(Side {
            stream,
            cookie: sys::socket_cookie(stream.as_fd()).map_err(not)?,
            written_at_join: sys::tcp_written(stream.as_fd()).map_err(not)?,
            seen: 0,
            counter,
            ended: false,
        })
    };
    let sides = [side(client, to_backend)?, side(backend, to_client)?];
    let (c, b) = (sides[0].cookie, sides[1].cookie);
    let joined = Joined { relay, sides, start: Instant::now() };
    {
        let mut maps = relay.maps();
        // Peers first: a socket in the sockhash without an entry would drop what it receives.
        for (me, peer) in [(c, b), (b, c)] {
            let entry = RelayPeer { peer, ..Default::default() };
            maps.peers.insert(me, entry, 0).map_err(|e| JoinError::NotJoined(e.to_string()))?;
        }
        for s in &joined.sides {
            maps.socks
                .insert(s.cookie, s.stream.as_raw_fd(), 0)
                .map_err(|e| JoinError::NotJoined(e.to_string()))?;
        }
    }
    for s in &joined.sides {
        // Hands what was queued before the join to the program. A failure here would leave
        // those bytes until the next arrival; it cannot fail on a TCP socket we own.
        if let Err(e) = sys::set_rcvlowat(s.stream.as_fd(), 1) {
            log::debug!("kernel relay: SO_RCVLOWAT: {e}");
        }
    }
    Ok(joined)
}

/// Waits for EOF or an error on each side, reading counters every [`STATS_TICK`].
async fn watch(j: &mut Joined<'_>, idle: Duration) -> Result<(), RelayError> {
    loop {
        if j.sides.iter().all(|s| s.ended) {
            return Ok(());
        }
        let last_ns = j.fold();
        let quiet = match last_ns {
            0 => j.start.elapsed(),
            ns => {
                Duration::from_nanos(sys::monotonic_ns().saturating_sub(ns)).min(j.start.elapsed())
            }
        };
        if quiet >= idle {
            return Err(RelayError::Idle(idle));
        }
        let tick = STATS_TICK.min(idle - quiet);
        let (a, b) = (&j.sides[0], &j.sides[1]);
        let seen = tokio::select! {
            r = wait(a), if !a.ended => (0, r?),
            r = wait(b), if !b.ended => (1, r?),
            () = tokio::time::sleep(tick) => continue,
        };
        match seen {
            (i, Said::Eof) => {
                j.fold();
                let (src, dst) = (&j.sides[i], &j.sides[1 - i]);
                flush(src, dst).await?;
                // The peer may already be gone; its own wake-up reports that.
                let _ = sys::shutdown_write(dst.stream.as_fd());
                j.sides[i].ended = true;
            }
            (i, Said::Queued | Said::Nothing) => {
                // Bytes the callback has not handed on (they raced the join): run it again.
                let _ = sys::set_rcvlowat(j.sides[i].stream.as_fd(), 1);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Waits until the socket has something to say: EOF, an error (a reset), or bytes of its own.
async fn wait(side: &Side<'_>) -> Result<Said, RelayError> {
    let s = side.stream;
    loop {
        s.ready(Interest::READABLE).await?;
        // Nothing to say clears tokio's readiness (a wake-up for bytes the program took away),
        // so the next wait sleeps.
        match s.try_io(Interest::READABLE, || match sys::said(s.as_fd())? {
            Said::Nothing => Err(io::ErrorKind::WouldBlock.into()),
            said => Ok(said),
        }) {
            Ok(Said::Eof) => {
                // The FIN is seen without the socket lock, maybe while the softirq that brought
                // it still runs the program on the bytes before it: a call that takes the lock
                // waits for that, so the counters read next include them.
                sys::tcp_written(s.as_fd())?;
                return Ok(Said::Eof);
            }
            Ok(said) => return Ok(said),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(RelayError::Io(e)),
        }
    }
}

/// Waits (bounded by [`FLUSH_WAIT`]) until every byte `src` received before its FIN, which the
/// program redirected, is in `dst`'s send queue, so a FIN on `dst` goes after them.
async fn flush(src: &Side<'_>, dst: &Side<'_>) -> Result<(), RelayError> {
    let deadline = Instant::now() + FLUSH_WAIT;
    let mut pause = Duration::from_micros(50);
    loop {
        let want = src.seen;
        let written = sys::tcp_written(dst.stream.as_fd())?.saturating_sub(dst.written_at_join);
        if written >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(RelayError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} redirected bytes never reached the peer", want - written),
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// How a listener's connections are relayed, decided once when the listener is built.
#[derive(Clone, Copy)]
pub enum Mode {
    Kernel(&'static KernelRelay),
    /// Userspace; `zero_copy` false means copy only.
    User {
        zero_copy: bool,
    },
}

impl Mode {
    /// The mode for a listener and what `lb status` says about it: `kernel`, `splice`, `copy`,
    /// or the userspace mode followed by why the kernel relay is not used.
    pub fn choose(relay: Option<Relay>, zero_copy: bool) -> (Self, String) {
        let user = |zero_copy: bool| {
            (Self::User { zero_copy }, if zero_copy { "splice" } else { "copy" }.to_string())
        };
        match relay {
            Some(Relay::Copy) => user(false),
            Some(Relay::Splice) => user(zero_copy),
            Some(Relay::Kernel) | None => match get() {
                Ok(k) => (Self::Kernel(k), "kernel".into()),
                Err(why) => {
                    let (mode, name) = user(zero_copy);
                    (mode, format!("{name} (kernel relay unavailable: {why})"))
                }
            },
        }
    }
}
