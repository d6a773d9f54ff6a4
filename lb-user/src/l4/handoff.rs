//! The hand-off from the L4 listener to an L7 TLS listener of the same process, for SNI routes
//! with `terminate = "NAME"`: the L4 side has read the ClientHello with MSG_PEEK only, so the L7
//! side gets a plain `TcpStream` positioned at the first byte of the TLS handshake and can run
//! its usual rustls acceptor on it.
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use arc_swap::ArcSwapOption;
use tokio::{net::TcpStream, sync::mpsc};

/// A connection handed to an L7 listener.
#[derive(Debug)]
pub struct Handoff {
    /// The client's socket; nothing has been consumed from it except a trusted PROXY header.
    pub stream: TcpStream,
    /// The client: the peer, or the source a trusted PROXY header named.
    pub client: SocketAddr,
    /// The address the client connected to (from the PROXY header when there was one).
    pub local: SocketAddr,
    /// What the ClientHello said (lower-cased host name; ALPN in the client's order).
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    /// The L4 listener that accepted it.
    pub listener: String,
}

/// An L7 TLS listener that accepts connections from the L4 proxy.
pub trait TlsHandoff: Send + Sync {
    /// Takes the connection over; must return quickly (spawn the work). On `Err` the
    /// connection has been dropped (closed) and the L4 side counts it as `handoff_failed`.
    fn handoff(&self, conn: Handoff) -> Result<(), Refused>;
}

/// The L7 listener could not take a connection (queue full, shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the L7 listener refused the connection")]
pub struct Refused;

/// Any closure works, e.g. `|c: Handoff| { tokio::spawn(serve(c)); Ok(()) }`.
impl<F: Fn(Handoff) -> Result<(), Refused> + Send + Sync> TlsHandoff for F {
    fn handoff(&self, conn: Handoff) -> Result<(), Refused> {
        self(conn)
    }
}

/// A bounded queue to an accept loop: a full queue refuses the connection instead of waiting.
impl TlsHandoff for mpsc::Sender<Handoff> {
    fn handoff(&self, conn: Handoff) -> Result<(), Refused> {
        self.try_send(conn).map_err(|_| Refused)
    }
}

/// The L7 listeners by the name SNI routes use in `terminate = "NAME"`.
pub type Handoffs = HashMap<String, Arc<dyn TlsHandoff>>;

/// A hand-off target that follows reloads: the `terminate = "NAME"` routes hold one per name,
/// and the daemon points it at the L7 TLS listener of that name serving now. A reload that
/// rebuilds the listener (TLS toggled) repoints it; one that turns TLS off or removes the
/// listener leaves it pointing nowhere, and hand-offs are refused (`handoff_failed`).
#[derive(Default)]
pub struct Target(ArcSwapOption<Box<dyn TlsHandoff>>);

impl Target {
    pub fn point(&self, to: Option<Box<dyn TlsHandoff>>) {
        self.0.store(to.map(Arc::new));
    }
}

impl TlsHandoff for Target {
    fn handoff(&self, conn: Handoff) -> Result<(), Refused> {
        match &*self.0.load() {
            Some(t) => t.handoff(conn),
            None => Err(Refused),
        }
    }
}

/// The repointable targets by L7 listener name.
pub type Targets = HashMap<String, Arc<Target>>;
