//! A read-side guard under hyper for HTTP/1 connections: it sees each request head as raw bytes
//! before hyper does, because hyper quietly normalizes two ambiguous framings instead of
//! refusing them (it drops Content-Length when Transfer-Encoding is present and merges equal
//! duplicate Content-Length headers), and accepts control bytes in chunk extensions.
//!
//! A refused head reaches hyper as an unparsable request line, so hyper answers its own 400 and
//! closes; nothing of it is ever forwarded. The guard follows body framing (Content-Length,
//! chunked) to find the next head, and steps aside for good when it cannot follow: HTTP/2
//! preface, upgrade or CONNECT requests, oversized heads (hyper then answers 431).
use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf as _, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What ends a refused head for hyper: a NUL is invalid anywhere in a head, so hyper answers
/// 400 whatever part of the head it already has.
const REFUSED: &[u8] = b"\x00\r\n\r\n";
/// What hyper gets instead of a bad chunk-size line: an invalid size, which fails the body.
const BAD_CHUNK: &[u8] = b"X\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Passing `n` more body bytes.
    Body(u64),
    /// Collecting a chunk-size line.
    ChunkSize,
    /// Passing `n` chunk bytes, then CRLF (counted in `n`).
    ChunkData(u64),
    /// Collecting trailer lines until an empty one.
    Trailers,
    /// Not following any more: every byte goes through as read.
    Pass,
    /// Refused: hyper has its error input; the rest is dropped.
    Done,
}

/// Shared between a plain HTTP/1 connection's guard (inside hyper) and its server task, which
/// parks the connection between requests (see `server.rs`): hyper's buffers are freed while
/// the client is quiet.
#[derive(Debug, Default)]
pub struct Park {
    /// The last read found the socket empty with nothing held or pending for hyper: hyper is
    /// waiting at a message boundary.
    idle: AtomicBool,
    /// The server asked hyper to close: `poll_shutdown` leaves the socket open.
    requested: AtomicBool,
}

impl Park {
    /// True when hyper waits for the client at a message boundary.
    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// The next shutdown from hyper keeps the socket (the server takes it back).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }
}

/// Wraps a client stream; writes go straight through.
pub struct H1Guard<T> {
    inner: T,
    state: State,
    /// Bytes of the line or head being collected.
    held: BytesMut,
    /// How many bytes of `held` (a head) hyper already has.
    released: usize,
    /// Bytes checked and ready for hyper.
    out: BytesMut,
    max_head: usize,
    eof: bool,
    park: Option<Arc<Park>>,
}

impl<T> H1Guard<T> {
    pub fn new(inner: T, max_head: usize) -> Self {
        Self {
            inner,
            state: State::Head,
            held: BytesMut::new(),
            released: 0,
            out: BytesMut::new(),
            max_head,
            eof: false,
            park: None,
        }
    }

    /// A guard whose connection the server may park between requests.
    pub fn parkable(inner: T, max_head: usize, park: Arc<Park>) -> Self {
        Self { park: Some(park), ..Self::new(inner, max_head) }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Between two messages, with nothing held back and nothing hyper has not taken: a new
    /// hyper connection can take over from here.
    pub fn at_boundary(&self) -> bool {
        self.state == State::Head
            && self.held.is_empty()
            && self.released == 0
            && self.out.is_empty()
            && !self.eof
    }

    /// hyper writes: whatever read found the socket empty before is stale (hyper is not back
    /// to waiting for a request until it reads again).
    fn writing(&self) {
        if let Some(p) = &self.park {
            p.idle.store(false, Ordering::Relaxed);
        }
    }

    /// Back to serving after a park: frees the (empty) buffers and clears the flags.
    pub fn unpark(&mut self) {
        self.held = BytesMut::new();
        self.out = BytesMut::new();
        if let Some(p) = &self.park {
            p.idle.store(false, Ordering::Relaxed);
            p.requested.store(false, Ordering::Relaxed);
        }
    }

    fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                State::Pass => {
                    self.out.extend_from_slice(input);
                    return;
                }
                State::Done => return,
                State::Body(n) | State::ChunkData(n) => {
                    let take = (n as usize).min(input.len());
                    self.out.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::ChunkData(_), 0) => State::ChunkSize,
                        (State::Body(_), l) => State::Body(l),
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head => {
                    let start = self.held.len().saturating_sub(3);
                    self.held.extend_from_slice(input);
                    input = &[];
                    if self.held.starts_with(H2_PREFACE) {
                        self.pass_held();
                        continue;
                    }
                    let Some(pos) = find(&self.held[start..], b"\r\n\r\n").map(|p| p + start + 4)
                    else {
                        if self.held.len() > self.max_head {
                            self.pass_held();
                        } else {
                            // Hand over all but a possible start of the terminator, so hyper's
                            // header timer sees a slow client, but never a complete head. The
                            // first byte always goes (no head is one byte long): it lets the
                            // h1/h2 detection end and hyper's header timer start.
                            let upto = self
                                .held
                                .len()
                                .saturating_sub(3)
                                .max(self.released)
                                .max(self.held.len().min(1));
                            self.out.extend_from_slice(&self.held[self.released..upto]);
                            self.released = upto;
                        }
                        continue;
                    };
                    let head = self.held.split_to(pos);
                    let rest = self.held.split();
                    let released = std::mem::take(&mut self.released);
                    self.state = self.head(&head, released);
                    self.feed(&rest);
                }
                State::ChunkSize | State::Trailers => {
                    let start = self.held.len().saturating_sub(1);
                    self.held.extend_from_slice(input);
                    input = &[];
                    let Some(pos) = find(&self.held[start..], b"\r\n").map(|p| p + start + 2)
                    else {
                        if self.held.len() > self.max_head {
                            self.pass_held();
                        }
                        continue;
                    };
                    let line = self.held.split_to(pos);
                    let rest = self.held.split();
                    self.state = if self.state == State::ChunkSize {
                        self.chunk_size(&line)
                    } else {
                        self.out.extend_from_slice(&line);
                        if line.len() == 2 { State::Head } else { State::Trailers }
                    };
                    self.feed(&rest);
                }
            }
        }
    }

    /// Stops following: everything held and everything after goes through unchanged.
    fn pass_held(&mut self) {
        self.state = State::Pass;
        let held = self.held.split();
        self.out.extend_from_slice(&held[self.released.min(held.len())..]);
        self.released = 0;
    }

    /// A complete head of which hyper already has the first `released` bytes.
    fn head(&mut self, head: &[u8], released: usize) -> State {
        match check_head(head) {
            Ok(next) => {
                self.out.extend_from_slice(&head[released..]);
                next
            }
            Err(why) => {
                log::debug!("refused request head: {why}");
                self.out.extend_from_slice(REFUSED);
                State::Done
            }
        }
    }

    fn chunk_size(&mut self, line: &[u8]) -> State {
        let body = &line[..line.len() - 2];
        let (size, ext) = match body.iter().position(|&b| b == b';') {
            Some(i) => (&body[..i], &body[i..]),
            None => (body, &[][..]),
        };
        let size = trim_ws(size);
        let ok_ext = ext.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
        let n = (!size.is_empty() && size.len() <= 15 && ok_ext)
            .then(|| std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s, 16).ok()))
            .flatten();
        match n {
            Some(0) => {
                self.out.extend_from_slice(line);
                State::Trailers
            }
            Some(n) => {
                self.out.extend_from_slice(line);
                State::ChunkData(n + 2)
            }
            None => {
                self.out.extend_from_slice(BAD_CHUNK);
                State::Done
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim_ws(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !matches!(c, b' ' | b'\t')).map_or(s, |e| e + 1);
    &b[s..e]
}

/// The framing of a head's body, or why the head is refused.
fn check_head(head: &[u8]) -> Result<State, &'static str> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut cl: Option<&[u8]> = None;
    let mut te = false;
    let mut upgrade = request_line.starts_with(b"CONNECT ");
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], trim_ws(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            if cl.is_some() {
                return Err("more than one Content-Length");
            }
            cl = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if te && cl.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if upgrade {
        // The connection may switch protocols after this request: stop following.
        return Ok(State::Pass);
    }
    if te {
        return Ok(State::ChunkSize);
    }
    match cl {
        None => Ok(State::Head),
        Some(v) => match std::str::from_utf8(v).ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(0) => Ok(State::Head),
            Some(n) if v.iter().all(u8::is_ascii_digit) => Ok(State::Body(n)),
            _ => Err("invalid Content-Length"),
        },
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof || this.state == State::Done {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [MaybeUninit::<u8>::uninit(); 8192];
            let mut rb = ReadBuf::uninit(&mut tmp);
            if Pin::new(&mut this.inner).poll_read(cx, &mut rb)?.is_pending() {
                if let Some(p) = &this.park {
                    p.idle.store(this.at_boundary(), Ordering::Relaxed);
                }
                return Poll::Pending;
            }
            if let Some(p) = &this.park {
                p.idle.store(false, Ordering::Relaxed);
            }
            if rb.filled().is_empty() {
                // EOF: hand over any partial unit so hyper sees what the client sent.
                this.eof = true;
                this.pass_held();
            } else {
                this.feed(rb.filled());
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for H1Guard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writing();
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.park.as_ref().is_some_and(|p| p.requested.load(Ordering::Relaxed)) {
            // Parking, not closing: the server task keeps the socket.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writing();
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper would read when `input` arrives whole and when it arrives byte by byte.
    fn both(input: &[u8]) -> [Vec<u8>; 2] {
        let mut whole = H1Guard::new((), 8192);
        whole.feed(input);
        let mut split = H1Guard::new((), 8192);
        for b in input {
            split.feed(std::slice::from_ref(b));
        }
        [whole.out.to_vec(), split.out.to_vec()]
    }

    fn through(input: &[u8]) -> Vec<u8> {
        let [whole, split] = both(input);
        assert_eq!(whole, split, "split-independent");
        whole
    }

    #[test]
    fn good_pipelined_requests_pass_unchanged() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(through(input), input);
    }

    #[test]
    fn ambiguous_heads_never_reach_hyper_whole() {
        for (input, good_heads) in [
            (&b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..], 0),
            (b"POST / HTTP/1.1\r\ncontent-length: 5\r\nContent-Length: 5\r\n\r\nhello", 0),
            // The second, pipelined request is the smuggled one.
            (b"GET / HTTP/1.1\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 1),
        ] {
            for out in both(input) {
                let before = out.strip_suffix(REFUSED).expect("ends refused");
                let heads = before.windows(4).filter(|w| w == b"\r\n\r\n").count();
                assert_eq!(heads, good_heads, "{:?}", String::from_utf8_lossy(&out));
            }
        }
    }

    #[test]
    fn bad_chunk_lines_become_invalid_sizes() {
        let out = through(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;\x01\r\nhello\r\n0\r\n\r\n",
        );
        assert!(out.ends_with(BAD_CHUNK));
    }

    #[test]
    fn steps_aside_for_h2_and_upgrades() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12";
        assert_eq!(through(h2), h2);
        let up = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(through(up), up);
    }
}
