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

/// A parser fed a stream's bytes as they arrive (see [`super::sni::HelloReader`]).
pub trait Incremental {
    type Out;
    type Err;
    /// Takes the bytes after those fed before.
    fn feed(&mut self, new: &[u8]) -> Result<Option<Self::Out>, Self::Err>;
    /// How many more bytes it can use now (so no peek reads past what it parses).
    fn wants(&self) -> usize;
}

impl Incremental for super::sni::HelloReader {
    type Out = super::sni::ClientHello;
    type Err = super::sni::HelloError;
    fn feed(&mut self, new: &[u8]) -> Result<Option<Self::Out>, Self::Err> {
        super::sni::HelloReader::feed(self, new)
    }
    fn wants(&self) -> usize {
        super::sni::HelloReader::wants(self)
    }
}

/// Peeks until `parser` is satisfied, feeding it each byte once. With SO_PEEK_OFF (Linux 6.9+)
/// every peek copies only bytes not peeked before, at most what the parser wants next (one TLS
/// record at most); without it each peek copies from the start again and only the new part is
/// fed. Peeks land in a per-thread buffer and are fed before the next await, so a waiting
/// connection holds only what its parser keeps. The caller bounds the time; `parser` bounds
/// the length. The peek offset is turned off again before returning.
pub async fn peek_feed<P: Incremental>(
    stream: &TcpStream,
    parser: &mut P,
) -> Result<P::Out, PeekError<P::Err>> {
    let offset = sys::set_peek_off(stream.as_fd(), 0).is_ok().then_some(PeekOffset(stream));
    // Bytes fed so far: what a peek from the start skips when there is no offset.
    let mut seen = 0usize;
    loop {
        let ready = stream.ready(Interest::READABLE).await.map_err(PeekError::Io)?;
        let mut fed = None;
        let r = stream.try_io(Interest::READABLE, || {
            SCRATCH.with_borrow_mut(|buf| {
                let skip = if offset.is_some() { 0 } else { seen };
                let end = skip + parser.wants().max(1);
                if buf.len() < end {
                    buf.resize(end, 0);
                }
                let n = sys::peek(stream.as_fd(), &mut buf[..end])?;
                if n <= skip && n != 0 {
                    // Nothing new: tell tokio to wait for the next readiness event.
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                if n > skip {
                    seen += n - skip;
                    fed = Some(parser.feed(&buf[skip..n]));
                }
                Ok(n)
            })
        });
        match r {
            Ok(0) => return Err(PeekError::Eof),
            Ok(_) => match fed {
                Some(Ok(Some(v))) => return Ok(v),
                Some(Err(e)) => return Err(PeekError::Parse(e)),
                _ => {}
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if ready.is_read_closed() && (seen > 0 || offset.is_some()) {
                    return Err(PeekError::Eof);
                }
            }
            Err(e) => return Err(PeekError::Io(e)),
        }
    }
}

thread_local! {
    /// Where [`peek_feed`] peeks on this worker thread: one TLS record (or, without a peek
    /// offset, what was fed plus one record: at most `sni::MAX_PEEK`).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Turns the peek offset off when dropped, also when the caller's timeout drops the peek.
struct PeekOffset<'a>(&'a TcpStream);

impl Drop for PeekOffset<'_> {
    fn drop(&mut self) {
        let _ = sys::set_peek_off(self.0.as_fd(), -1);
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

    /// A connection whose client sends `slow` bytes (0, 1, ...) one at a time, then `fast` bytes
    /// of 7 at once; the client comes back from the task when it is done.
    async fn trickled(
        slow: u8,
        fast: usize,
    ) -> (tokio::net::TcpStream, tokio::task::JoinHandle<tokio::net::TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let writer = tokio::spawn(async move {
            for i in 0..slow {
                c.write_all(&[i]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            c.write_all(&vec![7u8; fast]).await.unwrap();
            c
        });
        (s, writer)
    }

    /// Wants `total` bytes in pieces of at most `chunk`; counts what it was fed.
    struct Count {
        total: usize,
        chunk: usize,
        fed: usize,
    }

    impl Incremental for Count {
        type Out = usize;
        type Err = ();
        fn feed(&mut self, new: &[u8]) -> Result<Option<usize>, ()> {
            assert!(new.len() <= self.wants(), "fed {} past what it wanted", new.len());
            self.fed += new.len();
            Ok((self.fed == self.total).then_some(self.fed))
        }
        fn wants(&self) -> usize {
            (self.total - self.fed).min(self.chunk)
        }
    }

    #[tokio::test]
    async fn feeds_each_trickled_byte_once_and_consumes_nothing() {
        let (s, writer) = trickled(50, 3000).await;
        let mut p = Count { total: 3050, chunk: 1000, fed: 0 };
        let got = tokio::time::timeout(Duration::from_secs(10), peek_feed(&s, &mut p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, 3050);
        let mut c = writer.await.unwrap();
        // Still all there, and a plain peek (the offset turned off) sees it from the start.
        let mut buf = vec![0u8; 4000];
        assert_eq!(sys::peek(s.as_fd(), &mut buf).unwrap(), 3050);
        assert_eq!(&buf[..3], &[0, 1, 2]);
        c.shutdown().await.unwrap();
        let mut p = Count { total: 99_999, chunk: 1000, fed: 0 };
        let r = tokio::time::timeout(Duration::from_secs(10), peek_feed(&s, &mut p)).await.unwrap();
        assert!(matches!(r, Err(PeekError::Eof)), "{r:?}");
        assert_eq!(p.fed, 3050);
    }

    #[tokio::test]
    async fn waits_for_trickled_bytes_grows_and_consumes_nothing() {
        let (s, writer) = trickled(10, 5000).await;
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
