//! An upgraded connection (WebSocket and other `101 Switching Protocols`): bytes both ways
//! until either side ends, nothing moves for the tunnel idle timeout, or the listener stops.
use std::{
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use super::{buf::Buf, conn::ClientIo, pool::UpIo};

/// Joins client and backend. Bytes either side sent early (after its head) go first.
pub async fn run<S: ClientIo>(
    io: &mut S,
    up: &mut UpIo,
    client: &mut Buf,
    upstream: &mut Buf,
    idle: Duration,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) {
    if !upstream.is_empty() && io.write_all(upstream.filled()).await.is_err() {
        return;
    }
    upstream.clear();
    if !client.is_empty() && up.write_all(client.filled()).await.is_err() {
        return;
    }
    client.clear();
    let origin = Instant::now();
    let last = AtomicU64::new(0);
    let mut a = Watched { io, origin, last: &last };
    let mut b = Watched { io: up, origin, last: &last };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                log::debug!("upgraded connection ended: {e}");
            }
        }
        () = quiet(origin, &last, idle) => log::debug!("upgraded connection idle for {idle:?}; closed"),
        // A tunnel has no message boundary to drain at: it ends with the listener.
        () = super::conn::stopped(shutdown) => log::debug!("upgraded connection closed by shutdown"),
    }
}

/// Resolves once nothing has moved for `idle`.
async fn quiet(origin: Instant, last: &AtomicU64, idle: Duration) {
    loop {
        let since = Duration::from_millis(last.load(Ordering::Relaxed));
        let due = origin + since + idle;
        if Instant::now() >= due {
            return;
        }
        tokio::time::sleep_until(due.into()).await;
    }
}

/// A stream that notes when bytes last moved (milliseconds since `origin`).
struct Watched<'a, T> {
    io: &'a mut T,
    origin: Instant,
    last: &'a AtomicU64,
}

impl<T> Watched<'_, T> {
    fn touch(&self) {
        self.last.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut *self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(_))) {
            self.touch();
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}
