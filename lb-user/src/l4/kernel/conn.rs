//! One connection in the kernel relay: joining the maps, watching both sockets for FIN, resets
//! and idleness, renewing the program's budgets, and catching up from userspace when a peer
//! fell behind and the program paused a socket.
use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use lb_common::relay::{BACKLOG, RelayCounts, RelayPeer};
use tokio::{io::unix::AsyncFd, net::TcpStream};

use super::KernelRelay;
use crate::l4::{
    sys::{self, Said},
    tcp::{Moved, RelayError, RelayOpts},
};

/// How often a relayed connection's counters are folded into the listener's (and its idle time
/// checked, when that comes sooner).
const STATS_TICK: Duration = Duration::from_secs(2);

/// How often a busy connection's budgets are renewed: a peer that keeps up then never pauses
/// below [`BACKLOG`] / this much time (16 MiB / 20 ms = 800 MiB/s); a faster one pauses now and
/// then and catches up from userspace.
const BUSY_TICK: Duration = Duration::from_millis(20);

/// How long an ended direction may take to hand its last redirected bytes to the peer's send
/// queue before the peer is half-closed anyway (the kernel's work queue usually takes
/// microseconds; a peer whose send buffer stays full is the slow case).
const FLUSH_WAIT: Duration = Duration::from_secs(10);

/// A connection that could not join the relay maps (maps full, a socket the kernel refuses):
/// nothing moved yet, so the caller relays it in userspace instead.
pub struct NotJoined {
    pub why: String,
    pub client: TcpStream,
    pub backend: TcpStream,
}

/// A socket of a joined connection, watched for reading only: registered for writing too (as a
/// `TcpStream` is), every ACK that frees send space would wake the event loop for nothing.
type Watched = AsyncFd<std::net::TcpStream>;

/// One side of a joined connection.
struct Side<'a> {
    stream: &'a Watched,
    cookie: u64,
    /// What [`sys::tcp_written`] said when the socket joined (a PROXY header counts there).
    written_at_join: u64,
    /// This side's counter (bytes received here and redirected) as last folded.
    seen: u64,
    /// The program's counts for this socket, as last read.
    counts: RelayCounts,
    /// Bytes userspace has read here of those the program passed while paused.
    drained: u64,
    /// Bytes userspace has written into this socket since the join (passed bytes of the peer).
    sent_by_user: u64,
    /// The budget last given to the program for this socket.
    budget: u64,
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
            if let Some(c) = self.relay.counts(side.cookie) {
                side.counter.fetch_add(c.bytes.saturating_sub(side.seen), Ordering::Relaxed);
                side.seen = side.seen.max(c.bytes);
                last = last.max(c.last_ns);
                side.counts = c;
            }
        }
        last
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        self.fold();
        let mut maps = self.relay.maps();
        // The reverse of joining: the program stops taking bytes first. Closing a socket
        // takes it out of the sockhashes anyway; the peer entry must go.
        for side in &self.sides {
            let _ = maps.socks.remove(&side.cookie);
        }
        for side in &self.sides {
            let _ = maps.targets.remove(&side.cookie);
            let _ = maps.peers.remove(&side.cookie);
            let _ = maps.counts.remove(&side.cookie);
        }
    }
}

/// Relays `client` and `backend` in the kernel until both directions have ended, one fails, or
/// the connection idles, as [`super::tcp::relay`] does in userspace; the sockets are closed
/// when this returns, except when they could not join. `partly_read`: userspace has read from
/// the client's socket (a PROXY header).
pub async fn relay(
    relay: &KernelRelay,
    partly_read: bool,
    client: TcpStream,
    backend: TcpStream,
    opts: RelayOpts,
    to_backend: &AtomicU64,
    to_client: &AtomicU64,
) -> Result<Result<Moved, RelayError>, NotJoined> {
    if partly_read {
        match drain(&client, &backend, to_backend).await {
            Ok(true) => {}
            Ok(false) => {
                let why = "the client kept sending while its read queue was emptied".to_string();
                return Err(NotJoined { why, client, backend });
            }
            Err(e) => return Ok(Err(RelayError::Io(e))),
        }
    }
    let watched = |s: TcpStream| sys::watch_readable(s.into_std()?);
    let (client, backend) = match (watched(client), watched(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => return Ok(Err(RelayError::Io(e))),
    };
    let why = match join(relay, &client, &backend, to_backend, to_client) {
        Ok(mut joined) => {
            let r = watch(&mut joined, opts.idle).await;
            joined.fold();
            let moved = Moved { to_backend: joined.sides[0].seen, to_client: joined.sides[1].seen };
            // Out of the maps before the sockets close.
            drop(joined);
            return Ok(r.map(|()| moved));
        }
        Err(why) => why,
    };
    let back = |w: Watched| TcpStream::from_std(w.into_inner());
    match (back(client), back(backend)) {
        (Ok(client), Ok(backend)) => Err(NotJoined { why, client, backend }),
        (Err(e), _) | (_, Err(e)) => Ok(Err(RelayError::Io(e))),
    }
}

/// Most bytes [`drain`] moves; past that the connection is relayed in userspace.
const DRAIN_MAX: usize = 256 * 1024;

/// Empties the client's receive queue into the backend, in userspace, before the join, when
/// userspace has read from it (a PROXY header). The kernel hands a joined socket's queue to the
/// program skb by skb, ignoring what was already read from the first one, so the rest of the
/// header's segment would be relayed with the header again (and TCP appends new bytes to the
/// last queued skb, so reading up to any count is not enough). Once a read finds the queue
/// empty, every skb that comes is whole. False when the client kept sending past
/// [`DRAIN_MAX`]; the bytes moved are counted either way.
async fn drain(client: &TcpStream, backend: &TcpStream, counter: &AtomicU64) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    let mut moved = 0;
    while moved < DRAIN_MAX {
        // A plain recv, not tokio's: its cached readiness may not know of bytes just come.
        let n = match sys::recv(client.as_fd(), &mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            backend.writable().await?;
            match backend.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        moved += n;
    }
    Ok(false)
}

/// Puts both sockets in the maps; on failure, takes out what went in and says why.
fn join<'a>(
    relay: &'a KernelRelay,
    client: &'a Watched,
    backend: &'a Watched,
    to_backend: &'a AtomicU64,
    to_client: &'a AtomicU64,
) -> Result<Joined<'a>, String> {
    let side = |stream: &'a Watched, counter| -> io::Result<Side<'a>> {
        let fd = stream.get_ref().as_fd();
        Ok(Side {
            stream,
            cookie: sys::socket_cookie(fd)?,
            written_at_join: sys::tcp_written(fd)?,
            seen: 0,
            counts: RelayCounts::default(),
            drained: 0,
            sent_by_user: 0,
            budget: BACKLOG,
            counter,
            ended: false,
        })
    };
    let sides = [
        side(client, to_backend).map_err(|e| e.to_string())?,
        side(backend, to_client).map_err(|e| e.to_string())?,
    ];
    let (c, b) = (sides[0].cookie, sides[1].cookie);
    let joined = Joined { relay, sides, start: Instant::now() };
    {
        let mut maps = relay.maps();
        // Peers and targets first, both sockets, then the map with the program: whatever
        // the first socket to join receives finds its entry and its peer already in.
        for (me, peer) in [(c, b), (b, c)] {
            let entry = RelayPeer { peer, budget: BACKLOG, ..Default::default() };
            maps.peers.insert(me, entry, 0).map_err(|e| e.to_string())?;
            maps.counts.insert(me, RelayCounts::default(), 0).map_err(|e| e.to_string())?;
        }
        for s in &joined.sides {
            let fd = s.stream.as_raw_fd();
            maps.targets.insert(s.cookie, fd, 0).map_err(|e| e.to_string())?;
        }
        for s in &joined.sides {
            maps.socks.insert(s.cookie, s.stream.as_raw_fd(), 0).map_err(|e| e.to_string())?;
        }
    }
    for s in &joined.sides {
        // Hands what was queued before the join to the program. A failure here would leave
        // those bytes until the next arrival; it cannot fail on a TCP socket we own.
        if let Err(e) = sys::set_rcvlowat(s.stream.get_ref().as_fd(), 1) {
            log::debug!("kernel relay: SO_RCVLOWAT: {e}");
        }
    }
    Ok(joined)
}

/// Waits for EOF or an error on each side, reading counters every [`STATS_TICK`].
async fn watch(j: &mut Joined<'_>, idle: Duration) -> Result<(), RelayError> {
    let mut before = 0;
    loop {
        if j.sides.iter().all(|s| s.ended) {
            return Ok(());
        }
        let last_ns = j.fold();
        // Busy (bytes moved fast since the last look): look again soon, so the budgets grow
        // before they run out and the program keeps redirecting instead of pausing.
        let now: u64 = j.sides.iter().map(|s| s.seen).sum();
        let busy = now - before >= BACKLOG / 16;
        before = now;
        let quiet = match last_ns {
            0 => j.start.elapsed(),
            ns => {
                Duration::from_nanos(sys::monotonic_ns().saturating_sub(ns)).min(j.start.elapsed())
            }
        };
        if quiet >= idle {
            return Err(RelayError::Idle(idle));
        }
        j.refresh_budgets()?;
        let tick = if busy { BUSY_TICK } else { STATS_TICK }.min(idle - quiet);
        let (a, b) = (&j.sides[0], &j.sides[1]);
        let seen = tokio::select! {
            r = wait(a), if !a.ended => (0, r?),
            r = wait(b), if !b.ended => (1, r?),
            () = tokio::time::sleep(tick) => continue,
        };
        j.fold();
        let (i, said) = seen;
        let s = &j.sides[i];
        if s.counts.passed > s.drained {
            // Paused: what the program left here goes on from userspace first (before an EOF).
            j.catch_up(i, idle).await?;
            continue;
        }
        match said {
            Said::Eof => {
                let (src, dst) = (&j.sides[i], &j.sides[1 - i]);
                flush(src, dst).await?;
                // The peer may already be gone; its own wake-up reports that.
                let _ = sys::shutdown_write(dst.stream.get_ref().as_fd());
                j.sides[i].ended = true;
            }
            Said::Queued | Said::Nothing => {
                // Bytes the callback has not handed on (they raced the join): run it again.
                let _ = sys::set_rcvlowat(j.sides[i].stream.get_ref().as_fd(), 1);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Bytes of passed data moved per [`Joined::catch_up`] before the other side gets a turn.
const CATCH_UP_MAX: u64 = 1 << 20;

impl Joined<'_> {
    /// Gives each socket's program a budget of what its peer has sent on plus [`BACKLOG`] (and
    /// tells it what userspace has read of what it passed), when that moves the budget on by
    /// a quarter of the backlog or more: one map update per direction and busy tick.
    fn refresh_budgets(&mut self) -> io::Result<()> {
        for i in 0..2 {
            let budget = progress(&self.sides[1 - i])? + BACKLOG;
            let s = &self.sides[i];
            if budget >= s.budget + BACKLOG / 4 {
                self.give(i, budget)?;
            }
        }
        Ok(())
    }

    fn give(&mut self, i: usize, budget: u64) -> io::Result<()> {
        let (me, peer) = (self.sides[i].cookie, self.sides[1 - i].cookie);
        let resume_at = self.sides[i].drained;
        self.relay.set_peer(me, RelayPeer { peer, budget, resume_at, _pad: 0 })?;
        self.sides[i].budget = budget;
        Ok(())
    }

    /// Side `i` is paused (its peer fell [`BACKLOG`] behind): once everything redirected has
    /// reached the peer, reads what the program passed to this socket and writes it to the
    /// peer, in order, then gives a new budget; the program resumes redirecting with the next
    /// bytes once userspace has read all it passed. Bounded: the peer is at most
    /// `BACKLOG` behind, the passed bytes sit in this socket's receive buffer (its TCP window
    /// closes when that is full), and userspace holds one 16 KiB buffer.
    async fn catch_up(&mut self, i: usize, idle: Duration) -> Result<(), RelayError> {
        flush(&self.sides[i], &self.sides[1 - i]).await?;
        let mut buf = [0u8; 16 * 1024];
        let mut moved = 0;
        while moved < CATCH_UP_MAX {
            let (src, dst) = (&self.sides[i], &self.sides[1 - i]);
            let avail = src.counts.passed - src.drained;
            if avail == 0 {
                break;
            }
            let want = (avail as usize).min(buf.len());
            // Only bytes the program passed (tcp_bpf's receive returns those first, in order).
            let n = match sys::recv(src.stream.get_ref().as_fd(), &mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(RelayError::Io(e)),
            };
            write_all(dst.stream.get_ref(), &buf[..n], idle).await?;
            src.counter.fetch_add(n as u64, Ordering::Relaxed);
            self.sides[i].drained += n as u64;
            self.sides[1 - i].sent_by_user += n as u64;
            moved += n as u64;
            if self.sides[i].counts.passed == self.sides[i].drained {
                self.fold();
            }
        }
        let budget = progress(&self.sides[1 - i])? + BACKLOG;
        self.give(i, budget)?;
        Ok(())
    }
}

/// Bytes of the peer's own redirected ones that have reached `dst`'s send queue since the join.
fn progress(dst: &Side<'_>) -> io::Result<u64> {
    let written = sys::tcp_written(dst.stream.get_ref().as_fd())?;
    Ok(written.saturating_sub(dst.written_at_join).saturating_sub(dst.sent_by_user))
}

/// Writes all of `buf` to a non-blocking socket watched for reading only: waits by sleeping
/// (a peer too slow to take 16 KiB is one that moves little), giving up after `idle` without
/// progress.
async fn write_all(
    dst: &std::net::TcpStream,
    mut buf: &[u8],
    idle: Duration,
) -> Result<(), RelayError> {
    use std::io::Write as _;
    let mut pause = Duration::from_micros(100);
    let mut last = Instant::now();
    while !buf.is_empty() {
        match (&*dst).write(buf) {
            Ok(n) => {
                buf = &buf[n..];
                last = Instant::now();
                pause = Duration::from_micros(100);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if last.elapsed() >= idle {
                    return Err(RelayError::Idle(idle));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(RelayError::Io(e)),
        }
    }
    Ok(())
}

/// Waits until the socket has something to say: EOF, an error (a reset), or bytes of its own.
async fn wait(side: &Side<'_>) -> Result<Said, RelayError> {
    let fd = side.stream.get_ref().as_fd();
    loop {
        let mut ready = side.stream.readable().await?;
        match sys::said(fd)? {
            // A wake-up for bytes the program took away: clear the readiness seen (not any
            // that came since), so the next wait sleeps.
            Said::Nothing => ready.clear_ready(),
            Said::Eof => {
                // The FIN is seen without the socket lock, maybe while the softirq that brought
                // it still runs the program on the bytes before it: a call that takes the lock
                // waits for that, so the counters read next include them.
                sys::tcp_written(fd)?;
                return Ok(Said::Eof);
            }
            Said::Queued => return Ok(Said::Queued),
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
        let written = progress(dst)?;
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
