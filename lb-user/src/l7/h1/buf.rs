//! The buffers of an HTTP/1 connection, owned by it while it talks and lent back to a
//! per-thread pool while it waits for its next request: an idle keep-alive connection holds
//! no buffer, and a busy one allocates none per request.
use std::cell::RefCell;

use super::head::Field;

/// Bytes read from a peer and not yet consumed.
#[derive(Debug)]
pub struct Buf {
    /// Always fully initialised; `start..end` is the unconsumed part.
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(size: usize) -> Self {
        Self { data: vec![0; size], start: 0, end: 0 }
    }

    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    pub fn clear(&mut self) {
        (self.start, self.end) = (0, 0);
    }

    /// Room to read into at the end, moving the unconsumed bytes to the front when that makes
    /// more room; empty when the buffer is full.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start > 0 && self.end == self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        &mut self.data[self.end..]
    }

    /// `n` bytes were read into [`Buf::spare`].
    pub fn filled_by(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Doubles the capacity up to `max` (for a head that does not fit yet); false at `max`.
    pub fn grow(&mut self, max: usize) -> bool {
        if self.data.len() >= max {
            return false;
        }
        let size = (self.data.len() * 2).min(max);
        self.data.resize(size, 0);
        true
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }
}

/// A connection's working set.
#[derive(Debug)]
pub struct Bufs {
    /// From the client.
    pub client: Buf,
    /// From the backend.
    pub upstream: Buf,
    /// Heads being written (request toward the backend, response toward the client).
    pub out: Vec<u8>,
    /// The request head's fields.
    pub fields: Vec<Field>,
    /// The response head's fields.
    pub rfields: Vec<Field>,
    /// The request's normalized path, when it differs.
    pub path: Vec<u8>,
    /// The access line's request part (method, authority, path), when the log is on.
    pub access: Vec<u8>,
}

/// Bytes of the client-side buffer (it grows to `max_header_bytes` for a larger head): a
/// typical request head in one read. Small, because every connection busy at once holds one.
pub const SIZE: usize = 4 * 1024;
/// Bytes of the backend-side buffer: a typical response head and a small body in one read.
pub const UPSTREAM_SIZE: usize = 8 * 1024;
/// Buffers kept per thread for connections that wake up.
const KEEP: usize = 64;

thread_local! {
    #[expect(clippy::vec_box, reason = "connections hold `Box<Bufs>`: the pool moves pointers")]
    static POOL: RefCell<Vec<Box<Bufs>>> = const { RefCell::new(Vec::new()) };
}

impl Bufs {
    /// A working set from this thread's pool, or a new one.
    pub fn take() -> Box<Self> {
        POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| {
            Box::new(Self {
                client: Buf::new(SIZE),
                upstream: Buf::new(UPSTREAM_SIZE),
                out: Vec::with_capacity(SIZE),
                fields: Vec::with_capacity(32),
                rfields: Vec::with_capacity(32),
                path: Vec::new(),
                access: Vec::new(),
            })
        })
    }

    /// Returns a working set to this thread's pool (a grown one is shrunk back first).
    pub fn give(mut self: Box<Self>) {
        for (b, size) in [(&mut self.client, SIZE), (&mut self.upstream, UPSTREAM_SIZE)] {
            b.clear();
            if b.capacity() > size {
                *b = Buf::new(size);
            }
        }
        if self.out.capacity() > 4 * SIZE {
            self.out = Vec::with_capacity(SIZE);
        }
        self.out.clear();
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < KEEP {
                p.push(self);
            }
        });
    }
}
