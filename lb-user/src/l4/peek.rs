//! Looking at a connection's first bytes without consuming them (MSG_PEEK), until a parser
//! decides: the ClientHello stays in the socket for the backend or the L7 listener to read.
use std::{io, os::fd::AsFd as _};

use tokio::{io::Interest, net::TcpStream};

use super::sys;

#[derive(Debug)]
pub enum PeekError<E> {
    /// The parser refused the bytes.
    Parse(E),
    /// `max` bytes were not enough for the parser.
    TooLarge,
    /// The client closed before the parser was satisfied.
    Eof,
    Io(io::Error),
}

/// Peeks until `parse` returns `Ok(Some(_))` or an error. The caller bounds the time.
///
/// The buffer starts small and doubles up to `max`, so idle connections cost little. A peek that
/// sees no new bytes clears tokio's readiness, so the next wait sleeps until the kernel reports
/// new data (edge-triggered) instead of spinning on the bytes already there.
pub async fn peek_until<T, E>(
    stream: &TcpStream,
    max: usize,
    mut parse: impl FnMut(&[u8]) -> Result<Option<T>, E>,
) -> Result<T, PeekError<E>> {
    let mut buf = vec![0u8; max.min(2048)];
    let mut seen = 0usize;
    loop {
        let ready = stream.ready(Interest::READABLE).await.map_err(PeekError::Io)?;
        let r = stream.try_io(Interest::READABLE, || {
            let n = sys::peek(stream.as_fd(), &mut buf)?;
            if n == seen && n != 0 && n < buf.len() {
                // Nothing new: tell tokio to wait for the next readiness event.
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match r {
            Ok(0) => return Err(PeekError::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() && seen > 0 {
                    return Err(PeekError::Eof);
                }
                continue;
            }
            Err(e) => return Err(PeekError::Io(e)),
        };
        seen = n;
        match parse(&buf[..n]) {
            Ok(Some(v)) => return Ok(v),
            Err(e) => return Err(PeekError::Parse(e)),
            Ok(None) if n < buf.len() => {}
            Ok(None) if buf.len() >= max => return Err(PeekError::TooLarge),
            Ok(None) => buf.resize((buf.len() * 2).min(max), 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::{io::AsyncWriteExt as _, net::TcpListener};

    use super::*;

    /// Wants `want` bytes, then returns how many it saw.
    fn need(want: usize) -> impl FnMut(&[u8]) -> Result<Option<usize>, ()> {
        move |b| Ok((b.len() >= want).then_some(b.len()))
    }

    #[tokio::test]
    async fn waits_for_trickled_bytes_grows_and_consumes_nothing() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let writer = tokio::spawn(async move {
            for i in 0..10u8 {
                c.write_all(&[i]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c.write_all(&[7u8; 5000]).await.unwrap();
            c
        });
        let got = tokio::time::timeout(Duration::from_secs(10), peek_until(&s, 8192, need(5010)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, 5010);
        let mut c = writer.await.unwrap();
        // Still all there.
        let mut buf = vec![0u8; 6000];
        assert_eq!(sys::peek(s.as_fd(), &mut buf).unwrap(), 5010);
        // Too little room, and a client that gives up.
        let r = peek_until(&s, 4096, need(99_999)).await;
        assert!(matches!(r, Err(PeekError::TooLarge)), "{r:?}");
        c.shutdown().await.unwrap();
        drop(c);
        let r = tokio::time::timeout(Duration::from_secs(10), peek_until(&s, 8192, need(99_999)))
            .await
            .unwrap();
        assert!(matches!(r, Err(PeekError::Eof)), "{r:?}");
    }
}
