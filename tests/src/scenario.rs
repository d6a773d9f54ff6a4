//! "Namespaces + backends + config + `lb run`" in one call, the set-up of the end-to-end tests:
//!
//! ```ignore
//! let s = Scenario::topology(3).xdp_service("").l7("public", L7, "").start()?;
//! s.get(WEB)?; // from the client namespace through the balancer
//! ```
//! [`Scenario::topology`] is the client/balancer/backends topology ([`crate::topology`]) with
//! a backend named `backend-I` on port 80 of each backend namespace; [`Scenario::loopback`]
//! is one namespace with the backends on 127.0.0.1:18080 upwards and `lb` beside them. The
//! [`Running`] handle drops `lb` first, then the backends, then the namespaces.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Mutex,
    time::Duration,
};

use crate::{
    admin::Admin,
    backends::{HttpBackend, ProcBackend, Reply},
    client::http_get,
    conf,
    lb::{Lb, LbBuilder, pin_path},
    netns::Netns,
    topology::{Topology, VIP4},
};

/// The XDP service [`Scenario::xdp_service`] adds: `web` on VIP4:80.
pub const WEB: SocketAddr = SocketAddr::V4(SocketAddrV4::new(VIP4, 80));
/// Where the topology's L7 listeners listen: the balancer's address toward the client.
pub const L7: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 8080));
/// Every request of the scenario helpers is bounded by this.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// What runs as each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// An [`HttpBackend`] answering with its name.
    Http,
    /// An `lb-rel-backend` process ([`ProcBackend`]).
    Process,
    /// Nothing: the test starts its own.
    Nothing,
}

/// A running backend of a scenario.
pub enum Server {
    Http(HttpBackend),
    Process(ProcBackend),
}

/// The set-up to build; see the module docs.
pub struct Scenario {
    backends: usize,
    loopback: bool,
    serve: Serve,
    names: Vec<String>,
    bind: Option<SocketAddr>,
    xdp_extra: String,
    xdp_services: Vec<String>,
    body: String,
    l7: Vec<(String, SocketAddr, String)>,
    token: Option<String>,
}

impl Scenario {
    /// The namespace topology with `backends` backends, each serving HTTP on port 80.
    pub fn topology(backends: usize) -> Self {
        Self {
            backends,
            loopback: false,
            serve: Serve::Http,
            names: (1..=backends).map(|i| format!("backend-{i}")).collect(),
            bind: None,
            xdp_extra: String::new(),
            xdp_services: Vec::new(),
            body: String::new(),
            l7: Vec::new(),
            token: None,
        }
    }

    /// One namespace with `backends` HTTP backends on 127.0.0.1:18080, :18081, ...
    pub fn loopback(backends: usize) -> Self {
        Self { loopback: true, ..Self::topology(backends) }
    }

    /// What the backends run (default [`Serve::Http`]).
    pub fn serve(mut self, serve: Serve) -> Self {
        self.serve = serve;
        self
    }

    /// The backends' names (default `backend-1`, ...), also their answers.
    pub fn names(mut self, names: &[&str]) -> Self {
        self.names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Where topology backends bind (default 0.0.0.0:80; `[::]:80` serves IPv6 too).
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = Some(addr);
        self
    }

    /// XDP service `web` on [`WEB`] over every backend, with `extra` keys (e.g. the hash).
    pub fn xdp_service(self, extra: &str) -> Self {
        let backends = conf::list(self.backend_addrs());
        self.xdp_raw(&conf::xdp_service("web", WEB, &backends, extra))
    }

    /// Any `[[xdp.service]]` text; the `[xdp]` table on the balancer's interfaces comes with it.
    pub fn xdp_raw(mut self, service: &str) -> Self {
        self.xdp_services.push(service.to_string());
        self
    }

    /// Keys for the `[xdp]` table (mode, ...).
    pub fn xdp_extra(mut self, extra: &str) -> Self {
        self.xdp_extra = extra.to_string();
        self
    }

    /// An L7 listener `name` on `listen` routing to upstream `app` over every backend, with
    /// `extra` keys for the upstream.
    pub fn l7(mut self, name: &str, listen: SocketAddr, extra: &str) -> Self {
        self.l7.push((name.to_string(), listen, extra.to_string()));
        self
    }

    /// More config text (health checks, `[http]` settings, an own `[admin]`, ...).
    pub fn config(mut self, text: &str) -> Self {
        self.body.push_str(text);
        self
    }

    /// The admin token `lb` and the harness's clients use.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    /// The address each backend serves on, as a config names it.
    pub fn backend_addrs(&self) -> Vec<SocketAddr> {
        (0..self.backends).map(|i| backend_addr(self.loopback, i)).collect()
    }

    /// Builds the namespaces, starts the backends and `lb run`, waits until it answers.
    pub fn start(self) -> anyhow::Result<Running> {
        self.start_with(|b| b)
    }

    /// [`Scenario::start`] with more settings for `lb` (uid, env, ...).
    pub fn start_with(self, lb: impl FnOnce(LbBuilder) -> LbBuilder) -> anyhow::Result<Running> {
        let net = if self.loopback {
            Net::Loopback(Netns::new("s")?)
        } else {
            Net::Topology(Topology::new(self.backends)?)
        };
        let backends = self.backend_addrs();
        let mut running = Running {
            lb: None,
            servers: Mutex::default(),
            names: self.names.clone(),
            serve: self.serve,
            bind: self.bind,
            backends,
            net,
        };
        for i in 0..self.backends {
            let server = running.launch(i)?;
            running.servers.get_mut().expect("not poisoned").push(server);
        }
        let mut text = String::new();
        if !self.xdp_services.is_empty() {
            text.push_str(&conf::xdp(running.interfaces(), &self.xdp_extra));
            text.push_str(&self.xdp_services.concat());
        }
        text.push_str(&self.body);
        for (name, listen, extra) in &self.l7 {
            text.push_str(&conf::l7(name, listen, "app", &running.backend_list(), extra));
        }
        let mut builder = Lb::builder(running.balancer(), text);
        if !self.xdp_services.is_empty() {
            builder = builder.pin_path(pin_path());
        }
        if let Some(t) = &self.token {
            builder = builder.token(t);
        }
        running.lb = Some(lb(builder).start()?);
        Ok(running)
    }
}

fn backend_addr(loopback: bool, i: usize) -> SocketAddr {
    if loopback {
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 18080 + i as u16)
    } else {
        SocketAddr::new(Ipv4Addr::new(10, 1, i as u8 + 1, 2).into(), 80)
    }
}

enum Net {
    Topology(Topology),
    Loopback(Netns),
}

/// A built scenario. Fields drop in order: `lb`, the backends, the namespaces.
pub struct Running {
    lb: Option<Lb>,
    /// Behind a lock so a test can stop and start backends while it holds `&Running`.
    servers: Mutex<Vec<Option<Server>>>,
    names: Vec<String>,
    serve: Serve,
    bind: Option<SocketAddr>,
    /// The address of each backend, as the config names it.
    pub backends: Vec<SocketAddr>,
    net: Net,
}

impl Running {
    /// The running `lb`.
    pub fn lb(&self) -> &Lb {
        self.lb.as_ref().expect("lb is running")
    }

    /// The running `lb`, to stop or restart it.
    pub fn lb_mut(&mut self) -> &mut Lb {
        self.lb.as_mut().expect("lb is running")
    }

    /// The topology (not for a loopback scenario).
    pub fn topo(&self) -> &Topology {
        match &self.net {
            Net::Topology(t) => t,
            Net::Loopback(_) => panic!("a loopback scenario has no topology"),
        }
    }

    /// The topology, to change it under a running `lb` (not for a loopback scenario).
    pub fn topo_mut(&mut self) -> &mut Topology {
        match &mut self.net {
            Net::Topology(t) => t,
            Net::Loopback(_) => panic!("a loopback scenario has no topology"),
        }
    }

    /// Where clients run: the client namespace, or the one namespace of a loopback scenario.
    pub fn client(&self) -> &Netns {
        match &self.net {
            Net::Topology(t) => &t.client,
            Net::Loopback(ns) => ns,
        }
    }

    /// Where `lb` runs.
    pub fn balancer(&self) -> &Netns {
        match &self.net {
            Net::Topology(t) => &t.lb,
            Net::Loopback(ns) => ns,
        }
    }

    /// Backend `i`'s namespace.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        match &self.net {
            Net::Topology(t) => &t.backends[i].ns,
            Net::Loopback(ns) => ns,
        }
    }

    /// The balancer's interfaces (none on loopback).
    pub fn interfaces(&self) -> Vec<String> {
        match &self.net {
            Net::Topology(t) => t.lb_interfaces(),
            Net::Loopback(_) => Vec::new(),
        }
    }

    /// The address each backend serves on.
    pub fn backend_addrs(&self) -> &[SocketAddr] {
        &self.backends
    }

    /// Every backend address as the body of a TOML list.
    pub fn backend_list(&self) -> String {
        conf::list(&self.backends)
    }

    /// The admin API client of `lb`.
    pub fn admin(&self) -> Admin {
        self.lb().admin()
    }

    /// GET `target` from the client namespace on a fresh connection: the body.
    pub fn get(&self, target: SocketAddr) -> anyhow::Result<String> {
        http_get(self.client(), None, target, TIMEOUT)
    }

    /// [`Running::get`] from client address `source`.
    pub fn get_from(&self, source: IpAddr, target: SocketAddr) -> anyhow::Result<String> {
        http_get(self.client(), Some(source), target, TIMEOUT)
    }

    /// Stops backend `i` (an HTTP backend closes its listener, a process is SIGKILLed).
    pub fn stop_backend(&self, i: usize) {
        let old = self.servers.lock().expect("not poisoned")[i].take();
        drop(old);
    }

    /// Starts backend `i` again as it first ran.
    pub fn start_backend(&self, i: usize) -> anyhow::Result<()> {
        let server = self.launch(i)?;
        self.servers.lock().expect("not poisoned")[i] = server;
        Ok(())
    }

    /// Replaces backend `i` with an [`HttpBackend`] answering as `reply`.
    pub fn replace_backend(&self, i: usize, reply: Reply) -> anyhow::Result<()> {
        self.stop_backend(i);
        let b = HttpBackend::with(self.backend_ns(i), self.backends[i], &self.names[i], reply)?;
        self.servers.lock().expect("not poisoned")[i] = Some(Server::Http(b));
        Ok(())
    }

    fn launch(&self, i: usize) -> anyhow::Result<Option<Server>> {
        let ns = self.backend_ns(i);
        let addr = match (&self.net, self.bind) {
            (Net::Topology(_), Some(bind)) => bind,
            (Net::Topology(_), None) => "0.0.0.0:80".parse()?,
            (Net::Loopback(_), _) => self.backends[i],
        };
        let name = &self.names[i];
        Ok(match self.serve {
            Serve::Http => Some(Server::Http(HttpBackend::start(ns, addr, name)?)),
            Serve::Process => Some(Server::Process(ProcBackend::start(ns, name, &[addr])?)),
            Serve::Nothing => None,
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // `lb` first: it must not see its backends or namespaces vanish under it.
        self.lb = None;
        self.servers.get_mut().map(Vec::clear).ok();
    }
}
