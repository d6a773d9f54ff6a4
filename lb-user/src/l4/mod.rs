//! The userspace L4 proxy: `[[tcp.listener]]`s relaying TCP (plain, or TLS passthrough routed by
//! the SNI peeked from the ClientHello, or handed to an L7 TLS listener) and UDP sessions, to
//! backends Maglev picks exactly as the XDP path does. Needs no privileges: `lb run` without an
//! `[xdp]` section serves on any port above 1024 as any user.
//!
//! Shape: config → [`L4::build`] (resolve groups and hand-offs; binds nothing) → [`L4::bind`] →
//! [`Bound::spawn`] (one task per listener, stopped by the daemon's shutdown channel).
pub mod balance;
pub mod handoff;
pub mod kernel;
pub mod limit;
pub mod peek;
pub mod proxy_protocol;
pub mod server;
pub mod sni;
pub mod stats;
mod sys;
pub mod tcp;
pub mod udp;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use thiserror::Error;
use tokio::{
    net::{TcpListener, TcpSocket, UdpSocket},
    sync::watch,
    task::JoinSet,
};

pub use handoff::{Handoff, Handoffs, Refused, Target, Targets, TlsHandoff};
pub use stats::{ErrorKind, ListenerSnapshot, ListenerStats};

use crate::{
    config::{Protocol, SniAction, TcpConfig},
    upstream::Groups,
};
use balance::Picker;
use server::{Route, TcpService};
use udp::UdpService;

#[derive(Debug, Error)]
pub enum L4Error {
    #[error("tcp listener {listener:?}: upstream {group:?} does not exist")]
    NoGroup { listener: String, group: String },
    #[error(
        "tcp listener {listener:?}: sni host {host:?} has terminate = {target:?}, but no L7 TLS listener of that name runs in this process"
    )]
    NoHandoff { listener: String, host: String, target: String },
    #[error("tcp listener {listener:?}: a udp listener needs upstream = \"GROUP\"")]
    UdpWithoutUpstream { listener: String },
    #[error("tcp listener {listener:?}: cannot listen on {addr}: {source}{hint}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error, hint: &'static str },
}

enum Service {
    Tcp(Arc<TcpService>),
    Udp(Arc<UdpService>),
}

/// How long connections may finish once the listeners stop: [`server::DRAIN_TIMEOUT`], or
/// `[tcp] upgrade_drain_secs` when a new process took over (set by the daemon as it stops).
#[derive(Clone)]
pub struct Drain(Arc<AtomicU64>);

impl Default for Drain {
    fn default() -> Self {
        Self(Arc::new(AtomicU64::new(server::DRAIN_TIMEOUT.as_millis() as u64)))
    }
}

impl Drain {
    pub fn set(&self, d: Duration) {
        self.0.store(d.as_millis() as u64, Ordering::Relaxed);
    }
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

/// Every L4 listener, resolved against the groups and the L7 hand-offs; nothing bound yet.
pub struct L4 {
    services: Vec<Service>,
    drain: Drain,
}

/// Listeners with their sockets bound.
pub struct Bound {
    listeners: Vec<(Service, Socket)>,
    drain: Drain,
}

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl L4 {
    /// Resolves every listener's routes. Groups are shared with the rest of the daemon (backend
    /// commands change them); `handoffs` are the L7 TLS listeners by name.
    pub fn build(
        config: &TcpConfig,
        groups: &Groups,
        handoffs: &Handoffs,
    ) -> Result<Self, L4Error> {
        // One picker (and Maglev table) per group, shared by every listener using it.
        let mut pickers: BTreeMap<&str, Arc<Picker>> = BTreeMap::new();
        let mut picker = |listener: &str, name: &str| -> Result<Arc<Picker>, L4Error> {
            let group = groups.get(name).ok_or_else(|| L4Error::NoGroup {
                listener: listener.into(),
                group: name.into(),
            })?;
            Ok(pickers
                .entry(group.name.as_str())
                .or_insert_with(|| Arc::new(Picker::new(group.clone())))
                .clone())
        };
        let mut services = Vec::new();
        let drain = Drain::default();
        for l in &config.listeners {
            let stats = Arc::new(ListenerStats::new(&l.name));
            stats::register(stats.clone());
            let default = l.upstream.as_deref().map(|u| picker(&l.name, u)).transpose()?;
            if l.protocol == Protocol::Udp {
                let upstream = default
                    .ok_or_else(|| L4Error::UdpWithoutUpstream { listener: l.name.clone() })?;
                services.push(Service::Udp(Arc::new(UdpService {
                    config: l.clone(),
                    upstream,
                    stats,
                    drain: drain.clone(),
                    per_source: l.max_sessions_per_source.map(limit::PerSource::new),
                })));
                continue;
            }
            let mut routes = sni::SniRoutes::default();
            for r in &l.sni {
                let route = match r.action() {
                    Some(SniAction::Passthrough(u)) => Route::Upstream(picker(&l.name, &u)?),
                    Some(SniAction::Terminate(t)) => {
                        let h = handoffs.get(&t).ok_or_else(|| L4Error::NoHandoff {
                            listener: l.name.clone(),
                            host: r.host.clone(),
                            target: t.clone(),
                        })?;
                        Route::Terminate(t, h.clone())
                    }
                    // Config validation refuses these; skip rather than guess.
                    None => continue,
                };
                routes.insert(&r.host, route);
            }
            let (relay, relay_name) = kernel::Mode::choose(l.relay, l.zero_copy);
            stats.set_relay(relay_name);
            services.push(Service::Tcp(Arc::new(TcpService {
                relay,
                config: l.clone(),
                routes,
                default,
                stats,
                drain: drain.clone(),
                per_source: l.max_connections_per_source.map(limit::PerSource::new),
            })));
        }
        Ok(Self { services, drain })
    }

    /// The counters of every listener, in config order; readable while they run.
    pub fn stats(&self) -> Vec<Arc<ListenerStats>> {
        self.services
            .iter()
            .map(|s| match s {
                Service::Tcp(t) => t.stats.clone(),
                Service::Udp(u) => u.stats.clone(),
            })
            .collect()
    }

    /// Binds every listener's socket.
    pub async fn bind(self) -> Result<Bound, L4Error> {
        self.bind_from(&mut Default::default()).await
    }

    /// Binds every listener's socket, or takes the one a replaced process handed over.
    pub async fn bind_from(
        self,
        inherited: &mut crate::upgrade::Inherited,
    ) -> Result<Bound, L4Error> {
        let mut listeners = Vec::new();
        for s in self.services {
            let (name, addr) = match &s {
                Service::Tcp(t) => (&t.config.name, t.config.listen),
                Service::Udp(u) => (&u.config.name, u.config.listen),
            };
            let err = |source: std::io::Error| {
                let hint = if source.kind() == std::io::ErrorKind::PermissionDenied {
                    ": ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port above 1024"
                } else {
                    ""
                };
                L4Error::Bind { listener: name.clone(), addr, source, hint }
            };
            let shared = match &s {
                Service::Tcp(t) => t.config.reuse_port,
                Service::Udp(u) => u.config.reuse_port,
            };
            let reuse = |fd: &dyn std::os::fd::AsFd| {
                crate::upgrade::overlap::set_reuse_port(&fd.as_fd(), shared).map_err(err)
            };
            let socket = match &s {
                Service::Tcp(_) => match inherited.tcp(crate::upgrade::Kind::Tcp, name, addr) {
                    Some(l) => {
                        reuse(&l)?;
                        Socket::Tcp(TcpListener::from_std(l).map_err(err)?)
                    }
                    None => Socket::Tcp(tcp_listener(addr, shared).map_err(err)?),
                },
                Service::Udp(_) => {
                    let u = match inherited.udp(name, addr) {
                        Some(u) => {
                            reuse(&u)?;
                            UdpSocket::from_std(u).map_err(err)?
                        }
                        None => udp_socket(addr, shared).map_err(err)?,
                    };
                    if shared {
                        // A process that stopped beside this one steered the group its way.
                        crate::upgrade::overlap::clear_steering(&u).map_err(err)?;
                    }
                    Socket::Udp(u)
                }
            };
            listeners.push((s, socket));
        }
        Ok(Bound { listeners, drain: self.drain })
    }
}

/// A listening socket whose accepted connections inherit TCP_NODELAY (one setsockopt per
/// listener rather than per connection), with the L7 listeners' backlog of 4096;
/// SO_REUSEPORT when `shared`.
fn tcp_listener(addr: SocketAddr, shared: bool) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    s.set_reuseaddr(true)?;
    s.set_reuseport(shared)?;
    s.set_nodelay(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

/// A UDP listener socket, SO_REUSEPORT when `shared` (set before bind, so tokio's
/// `UdpSocket::bind` cannot make it).
fn udp_socket(addr: SocketAddr, shared: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Socket as Raw, Type};
    let s = Raw::new(Domain::for_address(addr), Type::DGRAM, None)?;
    s.set_reuse_port(shared)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

impl Bound {
    /// The bound addresses by listener name (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(s, sock)| {
                let name = match s {
                    Service::Tcp(t) => t.config.name.clone(),
                    Service::Udp(u) => u.config.name.clone(),
                };
                let addr = match sock {
                    Socket::Tcp(l) => l.local_addr(),
                    Socket::Udp(u) => u.local_addr(),
                };
                addr.ok().map(|a| (name, a))
            })
            .collect()
    }

    /// How long connections may finish after the listeners stop (the daemon lengthens it for
    /// an upgrade).
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    /// Duplicates of every listening socket, for a process taking over (`lb run --upgrade`).
    pub fn offers(&self) -> std::io::Result<Vec<crate::upgrade::Offer>> {
        use crate::upgrade::{Kind, Offer};
        self.listeners
            .iter()
            .map(|(s, sock)| match (s, sock) {
                (Service::Tcp(t), Socket::Tcp(l)) => {
                    Offer::new(Kind::Tcp, &t.config.name, Some(t.config.listen), l)
                }
                (Service::Udp(u), Socket::Udp(l)) => {
                    Offer::new(Kind::Udp, &u.config.name, Some(u.config.listen), l)
                }
                _ => unreachable!("bind pairs each service with its socket kind"),
            })
            .collect()
    }

    /// Starts one task per listener; they stop (after draining) when `shutdown` turns true.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> JoinSet<std::io::Result<()>> {
        let mut tasks = JoinSet::new();
        for (s, sock) in self.listeners {
            let shutdown = shutdown.clone();
            match (s, sock) {
                (Service::Tcp(svc), Socket::Tcp(l)) => {
                    log::info!("tcp listener {} on {}", svc.config.name, svc.config.listen);
                    tasks.spawn(server::run(l, svc, shutdown));
                }
                (Service::Udp(svc), Socket::Udp(u)) => {
                    log::info!("udp listener {} on {}", svc.config.name, svc.config.listen);
                    tasks.spawn(udp::run(u, svc, shutdown));
                }
                _ => unreachable!("bind pairs each service with its socket kind"),
            }
        }
        tasks
    }
}
