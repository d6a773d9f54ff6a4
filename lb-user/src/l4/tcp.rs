//! The TCP relay: bytes both ways between a client and a backend, each direction on its own
//! until its end-of-stream, which is passed on as a half-close (FIN) so protocols that shut
//! down their write side first keep working. A connection with no bytes either way for `idle`
//! is closed.
//!
//! Each direction starts by copying through a per-thread scratch buffer: a read is written on
//! at once, and only what the destination does not take is kept (in a buffer of the
//! connection's own, at most [`SMALL`] bytes). Small exchanges (requests and answers, TLS
//! handshakes) thus cost two syscalls each way and no per-connection buffer or pipe. A read that
//! fills the scratch buffer marks the direction as bulk: from then on it moves by splice(2)
//! through a pipe of `buffer_size` bytes (taken from a shared pool, as HAProxy's splice-auto
//! does), or, with `zero_copy = false` or where splice is refused, by a plain copy through a
//! `buffer_size` buffer.
use std::{
    cell::RefCell,
    io,
    os::fd::AsFd as _,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

use super::sys;

/// Size of the per-thread scratch buffer, and the read size that marks a direction as bulk.
pub const SMALL: usize = 16 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SMALL].into_boxed_slice());
}

/// How one connection is relayed.
#[derive(Debug, Clone, Copy)]
pub struct RelayOpts {
    pub idle: Duration,
    /// Bytes buffered per direction.
    pub buffer_size: usize,
    pub zero_copy: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("relay: {0}")]
    Io(#[from] io::Error),
}

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub to_backend: u64,
    pub to_client: u64,
}

/// When anything last moved, in ms since `start`; shared by both directions.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// One direction has ended (and half-closed its destination).
    one_ended: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// Relays until both directions have ended, one fails, or the connection idles. The counters
/// grow as bytes move, so live connections show in the stats. The caller closes both sockets
/// when this returns: the FIN of the direction that ended last is that close.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    opts: RelayOpts,
    to_backend: &AtomicU64,
    to_client: &AtomicU64,
) -> Result<Moved, RelayError> {
    let act = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        one_ended: AtomicBool::new(false),
    };
    let both = async {
        tokio::try_join!(
            half(client, backend, opts, &act, to_backend),
            half(backend, client, opts, &act, to_client)
        )
    };
    tokio::select! {
        r = both => {
            let (a, b) = r?;
            Ok(Moved { to_backend: a, to_client: b })
        }
        () = idle_watch(&act, opts.idle) => Err(RelayError::Idle(opts.idle)),
    }
}

async fn idle_watch(act: &Activity, idle: Duration) {
    loop {
        let quiet = act.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}

/// One direction: `src` to `dst` until `src` ends, then a FIN to `dst`.
async fn half(
    src: &TcpStream,
    dst: &TcpStream,
    opts: RelayOpts,
    act: &Activity,
    counter: &AtomicU64,
) -> io::Result<u64> {
    let mut moved = Progress { total: 0, counter, act };
    forward(src, dst, opts, &mut moved).await?;
    // The first direction to end half-closes its destination. When the second ends, both
    // sockets are closed right after, and with both receive queues read to their end that
    // close sends the FIN anyway: one syscall less per connection.
    if !act.one_ended.swap(true, Ordering::Relaxed) {
        // The peer may already be gone; the other direction reports that.
        let _ = sys::shutdown_write(dst.as_fd());
    }
    Ok(moved.total)
}

/// Bytes moved in one direction: the connection's count and the listener's counter.
struct Progress<'a> {
    total: u64,
    counter: &'a AtomicU64,
    act: &'a Activity,
}

impl Progress<'_> {
    fn add(&mut self, n: usize) {
        if n > 0 {
            self.total += n as u64;
            self.counter.fetch_add(n as u64, Ordering::Relaxed);
            self.act.touch();
        }
    }
}

async fn forward(
    src: &TcpStream,
    dst: &TcpStream,
    opts: RelayOpts,
    moved: &mut Progress<'_>,
) -> io::Result<()> {
    if small_phase(src, dst, opts.buffer_size.min(SMALL), moved).await? == Phase::Ended {
        return Ok(());
    }
    if opts.zero_copy
        && let Ok(pipe) = pipes::take(opts.buffer_size)
    {
        match splice_half(src, dst, &pipe, opts.buffer_size, moved).await {
            Ok(()) => {
                // Drained: splice_half ends only with the pipe empty.
                pipes::give(pipe);
                return Ok(());
            }
            // splice refused before any byte moved (a kernel or socket type without it).
            Err(SpliceError::Unsupported) => {}
            // The pipe may hold bytes; it is closed, not pooled.
            Err(SpliceError::Io(e)) => return Err(e),
        }
    }
    copy_half(src, dst, opts.buffer_size, moved).await
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    /// `src` ended.
    Ended,
    /// A read filled the buffer: more is likely queued.
    Bulk,
}

/// Reads into the thread's scratch buffer (at most `limit` bytes) and writes on at once; what
/// `dst` does not take is kept and flushed before the next read, so at most `limit` bytes wait.
async fn small_phase(
    src: &TcpStream,
    dst: &TcpStream,
    limit: usize,
    moved: &mut Progress<'_>,
) -> io::Result<Phase> {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        src.readable().await?;
        // No await while the scratch buffer is borrowed: another task on this thread may use it.
        let step = SCRATCH.with_borrow_mut(|buf| -> io::Result<Option<(usize, usize)>> {
            let buf = &mut buf[..limit];
            let Some(n) = read_some(src, buf)? else { return Ok(None) };
            let mut off = 0;
            while off < n {
                match dst.try_write(&buf[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            pending.extend_from_slice(&buf[off..n]);
            Ok(Some((n, off)))
        })?;
        let Some((n, written)) = step else { continue };
        if n == 0 {
            return Ok(Phase::Ended);
        }
        moved.act.touch();
        moved.add(written);
        if !pending.is_empty() {
            while !pending.is_empty() {
                dst.writable().await?;
                match dst.try_write(&pending) {
                    Ok(m) => {
                        pending.drain(..m);
                        moved.add(m);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            // Idle connections keep no buffer.
            pending = Vec::new();
        }
        if n == limit {
            return Ok(Phase::Bulk);
        }
    }
}

/// Pipes of directions that went bulk, kept for the next such direction (creating and closing
/// a pipe is three syscalls and a kernel allocation). Only empty pipes come back.
mod pipes {
    use std::{io, sync::Mutex};

    use super::sys::Pipe;

    /// Pipes kept; each holds up to `buffer_size` bytes of kernel memory only while in use.
    const KEEP: usize = 64;

    static POOL: Mutex<Vec<(usize, Pipe)>> = Mutex::new(Vec::new());

    fn pool() -> std::sync::MutexGuard<'static, Vec<(usize, Pipe)>> {
        POOL.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pipe sized for `size` bytes, pooled or new.
    pub fn take(size: usize) -> io::Result<Pooled> {
        let mut p = pool();
        if let Some(i) = p.iter().rposition(|(s, _)| *s == size) {
            let (_, pipe) = p.swap_remove(i);
            return Ok(Pooled { size, pipe });
        }
        drop(p);
        Ok(Pooled { size, pipe: Pipe::new(size)? })
    }

    /// Returns an empty pipe to the pool (or closes it when the pool is full).
    pub fn give(p: Pooled) {
        let mut pool = pool();
        if pool.len() < KEEP {
            pool.push((p.size, p.pipe));
        }
    }

    pub struct Pooled {
        size: usize,
        pub pipe: Pipe,
    }

    /// How many pipes wait in the pool (tests).
    #[cfg(test)]
    pub fn pooled() -> usize {
        pool().len()
    }
}

enum SpliceError {
    Unsupported,
    Io(io::Error),
}

async fn splice_half(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &pipes::Pooled,
    chunk: usize,
    moved: &mut Progress<'_>,
) -> Result<(), SpliceError> {
    let pipe = &pipe.pipe;
    let mut spliced = 0u64;
    loop {
        // Socket → pipe. The pipe is empty here (drained below), so EAGAIN means "no data".
        let n = loop {
            src.readable().await.map_err(SpliceError::Io)?;
            match src
                .try_io(Interest::READABLE, || sys::splice(src.as_fd(), pipe.write.as_fd(), chunk))
            {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if spliced == 0 && unsupported(&e) => return Err(SpliceError::Unsupported),
                Err(e) => return Err(SpliceError::Io(e)),
            }
        };
        if n == 0 {
            return Ok(());
        }
        moved.act.touch();
        // Pipe → socket, until the pipe is empty again: at most `chunk` bytes are in flight.
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(SpliceError::Io)?;
            match dst
                .try_io(Interest::WRITABLE, || sys::splice(pipe.read.as_fd(), dst.as_fd(), left))
            {
                Ok(m) => {
                    left -= m;
                    spliced += m as u64;
                    moved.add(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceError::Io(e)),
            }
        }
    }
}

/// One read; `None` when nothing is queued. A short read emptied the receive queue, so it
/// also clears tokio's readiness (as tokio's own `AsyncRead` does): the next wait sleeps until
/// new bytes come instead of finding out with a read that fails with EAGAIN. The readiness
/// cleared is the one from before the read, so bytes that arrive after it still wake us.
fn read_some(src: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    let mut got = 0;
    let r = src.try_io(Interest::READABLE, || {
        got = sys::recv(src.as_fd(), buf)?;
        if got > 0 && got < buf.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(got) }
    });
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok((got > 0).then_some(got)),
        Err(e) => Err(e),
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
}

async fn copy_half(
    src: &TcpStream,
    dst: &TcpStream,
    size: usize,
    moved: &mut Progress<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; size];
    loop {
        src.readable().await?;
        let n = match read_some(src, &mut buf)? {
            Some(0) => return Ok(()),
            Some(n) => n,
            None => continue,
        };
        moved.act.touch();
        let mut off = 0;
        while off < n {
            dst.writable().await?;
            match dst.try_write(&buf[off..n]) {
                Ok(m) => {
                    off += m;
                    moved.add(m);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// Two connected pairs: (client, proxy's client side) and (proxy's backend side, backend).
    async fn pairs() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (d, _) = l.accept().await.unwrap();
        (a, b, c, d)
    }

    async fn relay_both_ways_with_half_close(zero_copy: bool) {
        let (mut client, pc, pb, mut backend) = pairs().await;
        let opts = RelayOpts { idle: Duration::from_secs(10), buffer_size: 4096, zero_copy };
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let relay = async {
            let r = relay(&pc, &pb, opts, &up, &down).await;
            drop((pc, pb));
            r
        };
        let peers = async {
            // The client sends everything and half-closes; the backend reads to EOF, then
            // answers on its still-open side: a half-closed connection keeps working.
            client.write_all(&payload).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert!(got == payload, "payload differs ({} bytes)", got.len());
            backend.write_all(b"after your FIN").await.unwrap();
            backend.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"after your FIN");
        };
        let (moved, ()) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(relay, peers) })
                .await
                .expect("bounded");
        let moved = moved.unwrap();
        assert_eq!(moved, Moved { to_backend: 300_000, to_client: 14 });
        assert_eq!(up.load(Ordering::Relaxed), 300_000);
    }

    #[tokio::test]
    async fn splice_relays_with_half_close() {
        relay_both_ways_with_half_close(true).await;
        // The client's 300 kB went bulk (spliced) and its pipe, drained, was kept for reuse.
        assert!(pipes::pooled() >= 1);
    }

    #[tokio::test]
    async fn copy_relays_with_half_close() {
        relay_both_ways_with_half_close(false).await;
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (mut client, pc, pb, _backend) = pairs().await;
        let opts =
            RelayOpts { idle: Duration::from_millis(300), buffer_size: 4096, zero_copy: true };
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let start = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            let r = relay(&pc, &pb, opts, &up, &down);
            let chatter = async {
                // Activity keeps it open past the idle timeout...
                for _ in 0..4 {
                    client.write_all(b"x").await.unwrap();
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                std::future::pending::<()>().await
            };
            tokio::select! { r = r => r, () = chatter => unreachable!() }
        })
        .await
        .expect("bounded");
        assert!(matches!(r, Err(RelayError::Idle(_))), "{r:?}");
        // ...and silence closes it.
        assert!(start.elapsed() >= Duration::from_millis(700), "{:?}", start.elapsed());
        assert_eq!(up.load(Ordering::Relaxed), 4);
    }
}
