//! The frames of the upgrade socket: a 4-byte big-endian length, a JSON message, and the
//! descriptors it carries (SCM_RIGHTS on the same `sendmsg`).
use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut, Write as _},
    net::SocketAddr,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// A message is a few hundred bytes; anything larger is not lb talking.
const MAX_FRAME: usize = 64 * 1024;
/// Descriptors one `recvmsg` can bring (each socket goes in a frame of its own).
const MAX_FDS: usize = 4;

/// What a listening socket is for, so the new process puts it where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// An `[[http.listener]]`.
    Http,
    /// A TCP `[[tcp.listener]]`.
    Tcp,
    /// A UDP `[[tcp.listener]]`.
    Udp,
    /// The admin API.
    Admin,
    /// The upgrade socket itself (`name` is its path).
    Upgrade,
}

/// The messages, in the order they go: `Hello` (new → old), `Socket`s and `Done` (old → new),
/// `Ready` (new → old), `Stopping` (old → new). `Running` answers a `Hello` that is not an
/// upgrade (a second `lb run`), `Refused` one the old process cannot serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Msg {
    Hello { pid: u32, upgrade: bool },
    Socket { kind: Kind, name: String, listen: Option<SocketAddr> },
    Done { pid: u32 },
    Ready { pid: u32 },
    Stopping,
    Running { pid: u32 },
    Refused { reason: String },
}

/// Sends `msg` with `fds` attached.
pub fn send(sock: &UnixStream, msg: &Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent =
        sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&frame)], cmsgs, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain data.
    (&mut &*sock).write_all(&frame[sent..])
}

/// Reads frames, collecting the descriptors that arrive with their bytes (in order: a stream
/// keeps the order of bytes and of the rights attached to them).
pub struct Reader {
    sock: UnixStream,
    buf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Reader {
    pub fn new(sock: UnixStream) -> Self {
        Self { sock, buf: Vec::new(), fds: VecDeque::new() }
    }

    /// The socket, to send on or to set timeouts.
    pub fn sock(&self) -> &UnixStream {
        &self.sock
    }

    /// The next message and the descriptor it carries, if any. EOF is `UnexpectedEof`.
    pub fn recv(&mut self) -> io::Result<(Msg, Option<OwnedFd>)> {
        loop {
            if let Some(len) =
                self.buf.get(..4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            {
                if len > MAX_FRAME {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "upgrade frame too large",
                    ));
                }
                if self.buf.len() >= 4 + len {
                    let msg: Msg = serde_json::from_slice(&self.buf[4..4 + len])
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.buf.drain(..4 + len);
                    let fd = match msg {
                        Msg::Socket { .. } => Some(self.fds.pop_front().ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                "a socket frame came without its descriptor",
                            )
                        })?),
                        _ => None,
                    };
                    return Ok((msg, fd));
                }
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
                // nothing else owns them.
                self.fds.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let n = msg.bytes;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the other lb closed the upgrade socket",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn frames_carry_their_descriptors_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let l1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let m1 = Msg::Socket {
            kind: Kind::Tcp,
            name: "a".into(),
            listen: Some(l1.local_addr().unwrap()),
        };
        let m2 = Msg::Socket {
            kind: Kind::Udp,
            name: "b".into(),
            listen: Some(l2.local_addr().unwrap()),
        };
        send(&a, &m1, &[l1.as_fd()]).unwrap();
        send(&a, &m2, &[l2.as_fd()]).unwrap();
        send(&a, &Msg::Done { pid: 7 }, &[]).unwrap();
        drop(a);
        let mut r = Reader::new(b);
        let (got, fd) = r.recv().unwrap();
        assert_eq!(got, m1);
        let l = std::net::TcpListener::from(fd.unwrap());
        assert_eq!(l.local_addr().unwrap(), l1.local_addr().unwrap());
        let (got, fd) = r.recv().unwrap();
        assert_eq!(got, m2);
        let u = std::net::UdpSocket::from(fd.unwrap());
        assert_eq!(u.local_addr().unwrap(), l2.local_addr().unwrap());
        let (done, fd) = r.recv().unwrap();
        assert!(done == Msg::Done { pid: 7 } && fd.is_none());
        assert_eq!(r.recv().unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0xff, 0xff, 0xff, 0xff, b'x']).unwrap();
        assert_eq!(Reader::new(b).recv().unwrap_err().kind(), io::ErrorKind::InvalidData);
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[0, 0, 0, 3, b'{', b'}', b'x']).unwrap();
        assert_eq!(Reader::new(b).recv().unwrap_err().kind(), io::ErrorKind::InvalidData);
    }
}
