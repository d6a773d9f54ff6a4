//! Hitless upgrades (`lb run --upgrade`): the running process hands its listening sockets to
//! a new one over the unix socket `[admin] upgrade_socket` with SCM_RIGHTS; the new one serves
//! on them (and binds only what is new), says it is ready, and the old one stops accepting,
//! drains and exits. No socket is ever closed in between, so no connection is refused.
//!
//! Sequence: new → `Hello` → old pauses its XDP map writes (the new one is about to adopt the
//! pinned maps) and sends one `Socket` per listener, then `Done`; new → `Ready` once it
//! serves; old → `Stopping`, then drains. If the new process goes away before `Ready`, the old
//! one resumes its XDP writes and keeps everything (it never stopped serving).
pub mod overlap;
pub mod systemd;
mod take;
pub mod wire;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{net::UnixListener, sync::mpsc};

pub use take::{Takeover, begin};
pub use wire::Kind;
use wire::{Msg, Reader};

use crate::control::state::State;

/// How long the old process waits for the new one to become ready (it loads XDP, reads
/// certificates, binds): past this it keeps everything, as if the new one had died.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Error)]
pub enum UpgradeError {
    #[error(
        "no running lb answers on the upgrade socket {path}: {source}. Start without --upgrade, or point [admin] upgrade_socket (LB_UPGRADE_SOCKET) at the running one's"
    )]
    Connect { path: String, source: io::Error },
    #[error(
        "another lb (pid {pid}) is running with the upgrade socket {path}: use `lb run --upgrade` to take over from it without a gap, set reuse_port = true on {lacking} to run beside it, or stop it first"
    )]
    Running { pid: u32, path: String, lacking: String },
    #[error("the running lb refused the upgrade: {0}")]
    Refused(String),
    #[error("upgrade socket {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("the running lb sent {0:?} where the upgrade protocol expects something else")]
    Protocol(String),
}

/// A listening socket the running process offers to its successor (a duplicate descriptor).
pub struct Offer {
    kind: Kind,
    name: String,
    listen: Option<SocketAddr>,
    fd: OwnedFd,
}

impl Offer {
    /// Offers `socket` (duplicated) as `kind` `name` configured on `listen`.
    pub fn new(
        kind: Kind,
        name: &str,
        listen: Option<SocketAddr>,
        socket: &impl AsFd,
    ) -> io::Result<Self> {
        Ok(Self { kind, name: name.into(), listen, fd: socket.as_fd().try_clone_to_owned()? })
    }
}

/// The sockets received from the old process, taken one by one by the parts that use them;
/// what nobody takes (listeners the new config removed) is closed when this is dropped.
#[derive(Default)]
pub struct Inherited {
    sockets: Vec<Offer>,
}

impl Inherited {
    /// The socket of `kind` configured on `listen` (and, for port 0, named `name`).
    fn take(&mut self, kind: Kind, name: &str, listen: Option<SocketAddr>) -> Option<OwnedFd> {
        let i = self.sockets.iter().position(|o| {
            o.kind == kind
                && o.listen == listen
                && (listen.is_some_and(|l| l.port() != 0) || o.name == name)
        })?;
        let o = self.sockets.swap_remove(i);
        log::info!(
            "{} {:?}: took over the listening socket (fd {})",
            kind_str(kind),
            o.name,
            o.fd.as_raw_fd()
        );
        Some(o.fd)
    }

    /// A TCP listener (L7, userspace L4, admin) handed over for `name` on `listen`.
    pub fn tcp(
        &mut self,
        kind: Kind,
        name: &str,
        listen: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        self.take(kind, name, Some(listen)).map(std::net::TcpListener::from)
    }

    /// A UDP listener handed over for `name` on `listen`.
    pub fn udp(&mut self, name: &str, listen: SocketAddr) -> Option<std::net::UdpSocket> {
        self.take(Kind::Udp, name, Some(listen)).map(std::net::UdpSocket::from)
    }

    /// Whether nothing is left to take.
    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::Http => "http listener",
        Kind::Tcp => "tcp listener",
        Kind::Udp => "udp listener",
        Kind::Admin => "admin API",
        Kind::Upgrade => "upgrade socket",
    }
}

/// The upgrade socket of this process: the inherited one if the path is unchanged, else bound
/// at `path` (mode 0600). A stale socket file (nobody answers) is replaced. None, with a
/// warning, when it cannot be bound (an unprivileged run without /run/lb): then upgrades are
/// off, the rest serves as usual.
pub fn listen(path: &Path, inherited: &mut Inherited) -> Option<UnixListener> {
    let name = path.display().to_string();
    let std = match inherited.take(Kind::Upgrade, &name, None) {
        Some(fd) => std::os::unix::net::UnixListener::from(fd),
        None => match bind_private(path) {
            Ok(l) => l,
            Err(e) => {
                log::warn!(
                    "upgrade socket {name}: {e}; `lb run --upgrade` cannot take over from this process"
                );
                return None;
            }
        },
    };
    let listener = std.set_nonblocking(true).and_then(|()| UnixListener::from_std(std));
    match listener {
        Ok(l) => {
            log::info!("upgrade socket on {name}");
            Some(l)
        }
        Err(e) => {
            log::warn!("upgrade socket {name}: {e}");
            None
        }
    }
}

/// A unix socket at `path` only this user can reach (mode 0600, in a 0700 directory it
/// creates), replacing a file left by a dead process: the upgrade socket and the admin API's
/// `[admin] socket`.
pub fn bind_private(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    // `begin` found nobody answering here (a file left is a dead process's), or a process
    // this one overlaps: the newest process owns the path, so an upgrade reaches it.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// What a serving daemon offers a successor, and the socket it waits for one on.
pub struct Successor {
    offers: Vec<Offer>,
    socket: Option<UnixListener>,
}

impl Successor {
    /// Duplicates the sockets fixed at start (userspace L4, admin, the upgrade socket, which
    /// is bound or taken here).
    pub fn prepare(
        config: &crate::config::Config,
        l4: &crate::l4::Bound,
        admin: &tokio::net::TcpListener,
        inherited: &mut Inherited,
    ) -> io::Result<Self> {
        let mut offers = l4.offers()?;
        offers.push(Offer::new(Kind::Admin, "admin", Some(config.admin.listen), admin)?);
        let socket = listen(&config.admin.upgrade_socket, inherited);
        if let Some(u) = &socket {
            let path = config.admin.upgrade_socket.display().to_string();
            offers.push(Offer::new(Kind::Upgrade, &path, None, u)?);
        }
        Ok(Self { offers, socket })
    }

    /// Answers upgrade requests; the receiver yields the pid of the successor that took over
    /// (never, without a socket). Dropping the guard stops answering and closes the copies
    /// of the listening sockets kept for a successor.
    pub fn serve(self, state: &Arc<State>) -> (mpsc::Receiver<u32>, Offering) {
        let (tx, rx) = mpsc::channel(1);
        let task = self.socket.map(|socket| {
            tokio::spawn(serve(socket, state.clone(), self.offers, tx)).abort_handle()
        });
        (rx, Offering(task))
    }
}

/// The task that offers this process's sockets to a successor; aborted on drop.
pub struct Offering(Option<tokio::task::AbortHandle>);

impl Drop for Offering {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Answers upgrade requests on `listener` until one succeeds; then sends the successor's pid
/// on `handed` (the daemon drains and exits). `offers` are the sockets fixed at start
/// (userspace L4, admin, this socket); the L7 ones come from the runtime at hand-over time,
/// as a reload may have changed them.
async fn serve(
    listener: UnixListener,
    state: Arc<State>,
    offers: Vec<Offer>,
    handed: mpsc::Sender<u32>,
) {
    let offers = Arc::new(offers);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                log::warn!("upgrade socket: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Reloads wait while a hand-over runs: the sockets offered are the ones served.
        let runtime = state.runtime.lock().await;
        let l7 = match runtime.offers() {
            Ok(o) => o,
            Err(e) => {
                log::warn!("upgrade: cannot duplicate the L7 listeners: {e}");
                continue;
            }
        };
        let (state2, offers) = (state.clone(), offers.clone());
        let session = tokio::task::spawn_blocking(move || {
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            session(stream, &state2, offers.iter().chain(l7.iter()))
        });
        let outcome = session.await.unwrap_or_else(|e| Err(io::Error::other(e)));
        // The runtime lock is released last: a reload that waited for it sees the outcome.
        let _runtime = runtime;
        match outcome {
            Ok(Some(pid)) => {
                let _ = handed.send(pid).await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                // Nothing was given up: the sockets are shared, never closed here.
                state.retake_xdp().await;
                log::warn!(
                    "upgrade: the new process went away before it was ready ({e}); this one keeps serving and writing the XDP maps"
                );
            }
        }
    }
}

/// One connection on the upgrade socket; the successor's pid once it is ready, None when it
/// only asked who runs.
fn session<'a>(
    stream: std::os::unix::net::UnixStream,
    state: &State,
    offers: impl Iterator<Item = &'a Offer>,
) -> io::Result<Option<u32>> {
    let me = std::process::id();
    // The socket is 0600; this also holds where it was made reachable by mistake.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    let uid = nix::unistd::geteuid().as_raw();
    if peer.uid() != uid && peer.uid() != 0 {
        let reason = format!("uid {} may not take over from uid {uid}", peer.uid());
        wire::send(&stream, &Msg::Refused { reason: reason.clone() }, &[])?;
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, reason));
    }
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = Reader::new(stream);
    let (hello, _) = reader.recv()?;
    let pid = match hello {
        Msg::Hello { upgrade: false, .. } => {
            wire::send(reader.sock(), &Msg::Running { pid: me }, &[])?;
            return Ok(None);
        }
        Msg::Hello { pid, upgrade: true } => pid,
        other => return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{other:?}"))),
    };
    log::info!(
        "upgrade: pid {pid} is taking over; XDP map writes paused until it is ready or gone"
    );
    // The successor adopts the pinned maps as soon as it has the sockets.
    state.release_xdp();
    for o in offers {
        let msg = Msg::Socket { kind: o.kind, name: o.name.clone(), listen: o.listen };
        wire::send(reader.sock(), &msg, &[o.fd.as_fd()])?;
    }
    wire::send(reader.sock(), &Msg::Done { pid: me }, &[])?;
    reader.sock().set_read_timeout(Some(READY_TIMEOUT))?;
    match reader.recv()? {
        (Msg::Ready { .. }, _) => {
            wire::send(reader.sock(), &Msg::Stopping, &[])?;
            log::info!("upgrade: pid {pid} is ready; this process stops accepting and drains");
            Ok(Some(pid))
        }
        (other, _) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("{other:?}"))),
    }
}
