//! The few socket syscalls tokio does not wrap: splice(2) through a pipe (zero-copy relay), a
//! non-consuming peek, a plain read whose result decides tokio's readiness, and a write-side
//! shutdown through a shared reference, and the socket options the kernel relay needs (cookie,
//! receive low-water mark, bytes written). The only unsafe
//! code of the L4 proxy; each call is a plain syscall on file descriptors we own or borrow.
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

/// A kernel pipe used as the buffer between two sockets; both ends non-blocking.
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl Pipe {
    /// A pipe holding about `size` bytes (the kernel rounds up to a power-of-two number of
    /// pages and caps unprivileged users at /proc/sys/fs/pipe-max-size; the default then stays).
    pub fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the 2-element array it is given.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = size.min(i32::MAX as usize) as libc::c_int;
        // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ takes an int. Failure is harmless.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(Self { read, write })
    }
}

/// Moves up to `len` bytes from `from` to `to` without copying through userspace; one end must
/// be a pipe. Never blocks on the pipe; the sockets are non-blocking already.
pub fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are valid for the call (borrowed); null offsets mean "current
    // position", which is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Reads what a non-blocking socket has queued, up to `buf.len()` bytes. `Ok(0)` means the
/// peer closed its side; WouldBlock means nothing is queued.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf, which we borrow mutably.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Copies the bytes waiting in a socket's receive queue into `buf` without consuming them.
/// `Ok(0)` means the peer closed its side; WouldBlock means nothing is queued.
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf, which we borrow mutably.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Sets SO_PEEK_OFF: each MSG_PEEK then copies from `off` bytes into the receive queue and
/// moves the offset past what it copied, so a peek sees only bytes not peeked before; -1 turns
/// it off. TCP has it since Linux 6.9; older kernels answer EOPNOTSUPP or EINVAL.
pub fn set_peek_off(fd: BorrowedFd<'_>, off: i32) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a local int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            (&off as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Half-closes a socket (sends FIN) through a shared reference, so both relay directions can
/// run on `&TcpStream` at once.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown on a valid, borrowed descriptor.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The socket's cookie (`SO_COOKIE`): a number the kernel gives each socket and never reuses
/// while it runs; the kernel relay's maps are keyed by it.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a u64 we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(cookie) }
}

/// Sets `SO_RCVLOWAT`. On TCP this also runs the socket's data-ready callback when bytes are
/// queued, which is how the kernel relay gets bytes that arrived before a socket joined its
/// sockhash (the callback of a joined socket hands them to the verdict program, in order).
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from a value we own, of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Bytes ever written into a TCP socket's send queue: those acknowledged (`tcpi_bytes_acked`)
/// plus those still queued (`SIOCOUTQ`). Read in that order it never counts a byte twice, so
/// it never overstates what was written (acknowledged bytes only leave the queue).
pub fn tcp_written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: tcp_info is plain integers; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `queued`, which we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + queued.max(0) as u64)
}

/// Bytes in a TCP socket's receive queue not yet read (`SIOCINQ`).
pub fn queued(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one int into `queued`, which we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as usize)
}

/// What a socket has to say, learnt without reading from it (a socket in the kernel relay's
/// sockhash has the relay's receive path, whose answers differ from plain TCP's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// Nothing: no byte queued, no FIN, no error.
    Nothing,
    /// Bytes wait in its receive queue.
    Queued,
    /// Its peer sent FIN and every byte before it has left the receive queue.
    Eof,
}

/// Classifies a socket with a zero-timeout poll(2) and `SIOCINQ`; a pending socket error (a
/// reset) is returned as the error.
pub fn said(fd: BorrowedFd<'_>) -> io::Result<Said> {
    let mut p =
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: poll reads and writes the one pollfd we own; timeout 0 never blocks.
    let rc = unsafe { libc::poll(&raw mut p, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if p.revents & libc::POLLERR != 0 {
        let mut err: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `err`, which we own.
        unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                (&raw mut err).cast(),
                &mut len,
            )
        };
        return Err(io::Error::from_raw_os_error(if err == 0 { libc::EIO } else { err }));
    }
    let closed = p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0;
    // POLLIN without a FIN: bytes in the receive queue or, on a socket in a sockhash, bytes
    // the verdict program passed to it (which SIOCINQ does not count).
    Ok(if queued(fd)? > 0 || (p.revents & libc::POLLIN != 0 && !closed) {
        Said::Queued
    } else if closed {
        Said::Eof
    } else {
        Said::Nothing
    })
}

/// Registers a socket with tokio's reactor for readability alone (a `TcpStream` is registered
/// for writing too, so every ACK that frees send space wakes the reactor).
pub fn watch_readable(
    s: std::net::TcpStream,
) -> io::Result<tokio::io::unix::AsyncFd<std::net::TcpStream>> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: a std TcpStream owns its descriptor: it stays open, and is the one `as_raw_fd`
    // returns, until the stream is dropped, which only the AsyncFd can do.
    unsafe { AsyncFd::register_with_interest(s, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// CLOCK_MONOTONIC in ns, the clock of `bpf_ktime_get_ns` (which `Instant` does not expose).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `t`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{TcpListener, TcpStream},
        os::fd::AsFd as _,
    };

    use super::*;

    #[test]
    fn peek_does_not_consume_and_splice_moves_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        a.write_all(b"hello").unwrap();
        let mut buf = [0u8; 16];
        // Loopback delivers synchronously, but allow for scheduling.
        let mut n = 0;
        for _ in 0..100 {
            n = peek(b.as_fd(), &mut buf).unwrap_or(0);
            if n == 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(&buf[..n], b"hello");
        let pipe = Pipe::new(4096).unwrap();
        assert_eq!(splice(b.as_fd(), pipe.write.as_fd(), 64).unwrap(), 5);
        let mut out = [0u8; 5];
        let mut r = std::fs::File::from(pipe.read);
        r.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"hello");
        shutdown_write(a.as_fd()).unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(b.read(&mut buf).unwrap(), 0);
    }
}
