//! The TCP relay: bytes both ways between a client and a backend, each direction on its own
//! until its end-of-stream, which is passed on as a half-close (FIN) so protocols that shut
//! down their write side first keep working. Zero-copy with splice(2) through a pipe of
//! `buffer_size` bytes; a plain copy through a buffer of the same size where splice is refused.
//! A connection with no bytes either way for `idle` is closed.
use std::{
    io,
    os::fd::AsFd as _,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use tokio::{io::Interest, net::TcpStream};

use super::sys;

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
/// grow as bytes move, so live connections show in the stats.
pub async fn relay(
    client: &TcpStream,
    backend: &TcpStream,
    opts: RelayOpts,
    to_backend: &AtomicU64,
    to_client: &AtomicU64,
) -> Result<Moved, RelayError> {
    let act = Activity { start: Instant::now(), last_ms: AtomicU64::new(0) };
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
    let moved = match opts.zero_copy.then(|| sys::Pipe::new(opts.buffer_size)) {
        Some(Ok(pipe)) => {
            match splice_half(src, dst, &pipe, opts.buffer_size, act, counter).await {
                Ok(n) => n,
                // splice refused before any byte moved (a kernel or socket type without it).
                Err(SpliceError::Unsupported) => {
                    copy_half(src, dst, opts.buffer_size, act, counter).await?
                }
                Err(SpliceError::Io(e)) => return Err(e),
            }
        }
        _ => copy_half(src, dst, opts.buffer_size, act, counter).await?,
    };
    // The peer may already be gone; the other direction reports that.
    let _ = sys::shutdown_write(dst.as_fd());
    Ok(moved)
}

enum SpliceError {
    Unsupported,
    Io(io::Error),
}

async fn splice_half(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &sys::Pipe,
    chunk: usize,
    act: &Activity,
    counter: &AtomicU64,
) -> Result<u64, SpliceError> {
    let mut total = 0u64;
    loop {
        // Socket → pipe. The pipe is empty here (drained below), so EAGAIN means "no data".
        let n = loop {
            src.readable().await.map_err(SpliceError::Io)?;
            match src
                .try_io(Interest::READABLE, || sys::splice(src.as_fd(), pipe.write.as_fd(), chunk))
            {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if total == 0 && unsupported(&e) => return Err(SpliceError::Unsupported),
                Err(e) => return Err(SpliceError::Io(e)),
            }
        };
        if n == 0 {
            return Ok(total);
        }
        act.touch();
        // Pipe → socket, until the pipe is empty again: at most `chunk` bytes are in flight.
        let mut left = n;
        while left > 0 {
            dst.writable().await.map_err(SpliceError::Io)?;
            match dst
                .try_io(Interest::WRITABLE, || sys::splice(pipe.read.as_fd(), dst.as_fd(), left))
            {
                Ok(m) => {
                    left -= m;
                    total += m as u64;
                    counter.fetch_add(m as u64, Ordering::Relaxed);
                    act.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(SpliceError::Io(e)),
            }
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP))
}

async fn copy_half(
    src: &TcpStream,
    dst: &TcpStream,
    size: usize,
    act: &Activity,
    counter: &AtomicU64,
) -> io::Result<u64> {
    let mut buf = vec![0u8; size];
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        act.touch();
        let mut off = 0;
        while off < n {
            dst.writable().await?;
            match dst.try_write(&buf[off..n]) {
                Ok(m) => {
                    off += m;
                    total += m as u64;
                    counter.fetch_add(m as u64, Ordering::Relaxed);
                    act.touch();
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
        let relay = relay(&pc, &pb, opts, &up, &down);
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
