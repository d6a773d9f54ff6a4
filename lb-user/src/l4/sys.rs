//! The few socket syscalls tokio does not wrap: splice(2) through a pipe (zero-copy relay), a
//! non-consuming peek, a plain read whose result decides tokio's readiness, and a write-side
//! shutdown through a shared reference. The only unsafe
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
