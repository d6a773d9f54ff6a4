//! Reload: read the config file again, validate it, then apply only what changed: XDP services
//! (ids and tracked flows kept), SNAT address pools (`[[xdp.snat]]`; new flows use the new
//! addresses, tracked flows keep theirs), upstream backend sets (kept backends keep their state), L7
//! routes, upstreams and certificates (open connections pick them up on their next request),
//! added and removed listeners, health checks. A config that is invalid, or that changes what
//! only a restart can change, is refused whole and the running one stays.
use std::{net::SocketAddr, os::fd::AsFd as _, sync::Arc};

use serde::Serialize;
use thiserror::Error;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use super::state::State;
use crate::{
    config::{Config, ConfigError},
    dataplane::snat,
    health::Checker,
    l7::{self, Server},
    upstream::{Group, Groups, Policy},
};

/// One serving L7 listener.
struct Running {
    server: Arc<Server>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
    /// A second handle on the listening socket, to hand it to a rebuilt server.
    socket: std::net::TcpListener,
}

/// What the daemon runs besides the admin API: L7 listeners and health checkers.
#[derive(Default)]
pub struct Runtime {
    listeners: Vec<Running>,
    /// Listeners a reload removed, finishing their connections.
    draining: Vec<JoinHandle<std::io::Result<()>>>,
    checker: Option<Checker>,
    /// The L4 hand-off targets by L7 listener name, pointed at the listener serving now.
    pub targets: crate::l4::Targets,
}

impl Runtime {
    /// Serves `server` on `listener`.
    pub fn serve(&mut self, server: Arc<Server>, listener: TcpListener) -> std::io::Result<()> {
        let socket = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(server.clone().run(listener, stopped.clone()));
        self.point(&server, server.terminates_tls().then_some(stopped));
        self.listeners.push(Running { server, stop, task, socket });
        Ok(())
    }

    /// Points the hand-off target named like `server` at it (`Some`: it serves, with TLS, until
    /// `stopped`), or nowhere.
    fn point(&self, server: &Arc<Server>, stopped: Option<watch::Receiver<bool>>) {
        let Some(target) = self.targets.get(&server.name) else { return };
        target.point(stopped.map(|stopped| {
            let server = server.clone();
            Box::new(move |h: crate::l4::Handoff| {
                server.adopt(h.stream, h.client, stopped.clone());
                Ok(())
            }) as Box<dyn crate::l4::TlsHandoff>
        }));
    }

    /// (Re)starts the health checks of `config`, keeping what was learned about kept backends.
    pub fn check(&mut self, state: &Arc<State>, config: &Config) {
        self.checker = None;
        self.checker = Some(Checker::start(&config.health, state.clone(), state.health.clone()));
    }

    /// Duplicates of the L7 listening sockets, for a process taking over (`lb run --upgrade`).
    pub fn offers(&self) -> std::io::Result<Vec<crate::upgrade::Offer>> {
        self.listeners
            .iter()
            .map(|r| {
                let (name, listen) = (&r.server.name, Some(r.server.listen));
                crate::upgrade::Offer::new(crate::upgrade::Kind::Http, name, listen, &r.socket)
            })
            .collect()
    }

    /// Stops checking, stops accepting, and waits for every listener to drain (each within
    /// `http.grace_ms`).
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.checker = None;
        for r in &self.listeners {
            let _ = r.stop.send(true);
        }
        let tasks = self.listeners.drain(..).map(|r| r.task).chain(self.draining.drain(..));
        for task in tasks.collect::<Vec<_>>() {
            task.await.map_err(std::io::Error::other)??;
        }
        Ok(())
    }
}

/// Why a reload was refused or failed.
#[derive(Debug, Error)]
pub enum ReloadError {
    /// Nothing was applied; the running config stays.
    #[error("config rejected, the running config stays: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// Applying failed part way (a kernel map update, a socket); the rest of the new config
    /// was not applied.
    #[error("reload failed while applying: {0}")]
    Apply(String),
}

impl ReloadError {
    pub fn status(&self) -> u16 {
        match self {
            ReloadError::Invalid(_) => 400,
            ReloadError::Apply(_) => 500,
        }
    }
    pub fn errors(&self) -> Vec<String> {
        match self {
            ReloadError::Invalid(e) => e.clone(),
            ReloadError::Apply(e) => vec![e.clone()],
        }
    }
}

/// What a reload changed, for the caller and the log.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub changes: Vec<String>,
}

/// Reads the config file again and applies it (see the module doc).
pub async fn reload(state: &Arc<State>) -> Result<ReloadReport, ReloadError> {
    let mut runtime = state.runtime.lock().await;
    if state.xdp_paused() {
        return Err(ReloadError::Invalid(vec![
            "another lb process writes the XDP maps (one that took over with `lb run --upgrade`, or the one this process waits to take over from): reload that one".into(),
        ]));
    }
    let path = state.config_path.as_ref().ok_or_else(|| {
        ReloadError::Invalid(vec!["this daemon was started without a config file".into()])
    })?;
    let new = Config::load(path).map_err(|e| ReloadError::Invalid(messages(e)))?;
    let old = state.config.load_full();
    let restart = needs_restart(&old, &new);
    if !restart.is_empty() {
        return Err(ReloadError::Invalid(restart));
    }
    let mut changes = Vec::new();

    // Everything that can fail without side effects first: groups, clients, certificates,
    // sockets of new listeners.
    let old_groups = state.groups.load_full();
    let mut groups = Groups::new();
    let mut keep_sets = Vec::new();
    let mut policies = Vec::new();
    for (name, u) in &new.upstream {
        let group = match old_groups.get(name) {
            // The group itself stays (every L4 listener, health check and L7 upstream holds
            // it); a new policy is swapped into it when the reload applies.
            Some(g) => {
                let policy = Policy::of(u);
                if g.policy().configured != policy.configured {
                    let show = |b: &Option<crate::config::Balance>| {
                        b.as_ref().map_or("(default)".to_string(), |b| b.to_string())
                    };
                    changes.push(format!(
                        "upstream {name}: balance {} → {}",
                        show(&g.policy().configured),
                        show(&policy.configured)
                    ));
                    policies.push((g.clone(), policy));
                }
                // With backends_from the API is the truth: its watcher keeps the set.
                if u.backends_from.is_none() {
                    keep_sets.push((g.clone(), u.backends.clone()));
                }
                g.clone()
            }
            None => {
                changes.push(format!("upstream {name}: added"));
                Arc::new(Group::new(name, u))
            }
        };
        groups.insert(name.clone(), group);
    }
    changes.extend(
        old_groups
            .keys()
            .filter(|n| !groups.contains_key(*n))
            .map(|n| format!("upstream {n}: removed")),
    );
    let servers =
        l7::build(&new, &groups).map_err(|e| ReloadError::Invalid(vec![e.to_string()]))?;
    let mut bound = Vec::new();
    for s in &servers {
        if !runtime.listeners.iter().any(|r| r.server.listen == s.listen) {
            let l = s.bind().await.map_err(|e| ReloadError::Invalid(vec![e.to_string()]))?;
            bound.push((s.clone(), l));
        }
    }

    // SNAT pools are checked against the host's addresses before anything is applied.
    let pools = match &new.xdp {
        Some(xdp) => {
            snat::resolve(&xdp.snat).map_err(|e| ReloadError::Invalid(vec![e.to_string()]))?
        }
        None => Vec::new(),
    };

    // Apply. XDP first: `apply` is idempotent and keeps service and backend ids, so tracked
    // flows keep their backend; only changed services' rings are rewritten. SNAT pools before
    // services, so new backends' first flows already spread over added addresses.
    if let (Some(dp), Some(xdp)) = (state.dataplane.get(), &new.xdp) {
        let mut dp = dp.lock().unwrap_or_else(|e| e.into_inner());
        changes.extend(dp.apply_snat(&pools).map_err(|e| ReloadError::Apply(e.to_string()))?);
        // backends_from services keep the API's set (their file lists none).
        let services = crate::discovery::with_current_backends(&dp, &xdp.services);
        let undrained = dp.apply(&services).map_err(|e| ReloadError::Apply(e.to_string()))?;
        for (service, addr) in undrained {
            changes
                .push(format!("xdp service {service}: {addr} undrained (the file is the truth)"));
        }
        // VIPs that left the config stop being local; new ones become local.
        crate::daemon::sync_host(&mut dp, &xdp.interfaces, &services)
            .map_err(|e| ReloadError::Apply(e.to_string()))?;
        changes.push(format!("xdp: {} services applied", xdp.services.len()));
    }
    for (group, policy) in policies {
        group.set_policy(policy);
    }
    for (group, specs) in keep_sets {
        let before: Vec<(SocketAddr, u32)> =
            group.backends().iter().map(|b| (b.addr, b.weight())).collect();
        let after: Vec<(SocketAddr, u32)> = specs.iter().map(|b| (b.addr(), b.weight())).collect();
        let undrained = group.set_backends(&specs);
        if before != after {
            changes.push(format!("upstream {}: backends {before:?} → {after:?}", group.name));
        }
        for addr in undrained {
            changes
                .push(format!("upstream {}: {addr} undrained (the file is the truth)", group.name));
        }
    }
    state.groups.store(Arc::new(groups));

    // L7: same address and TLS or not → the running server takes the new routes, upstreams
    // and certificates; same address, TLS toggled → a new server takes over the socket;
    // a new address → the socket bound above; an address gone → that listener drains.
    let mut next = Vec::new();
    let mut old_listeners = std::mem::take(&mut runtime.listeners);
    for s in servers {
        match old_listeners.iter().position(|r| r.server.listen == s.listen) {
            Some(i) if old_listeners[i].server.terminates_tls() == s.terminates_tls() => {
                let r = old_listeners.remove(i);
                r.server.update_from(&s);
                // reuse_port applies to the socket in place (the group forms at the next bind).
                crate::upgrade::overlap::set_reuse_port(&r.socket, s.reuse_port)
                    .map_err(|e| ReloadError::Apply(e.to_string()))?;
                changes.push(format!(
                    "listener {} on {}: routes, upstreams, certificates updated",
                    s.name, s.listen
                ));
                next.push(r);
            }
            Some(i) => {
                let r = old_listeners.remove(i);
                let socket = r.socket.try_clone().map_err(|e| ReloadError::Apply(e.to_string()))?;
                crate::upgrade::overlap::set_reuse_port(&socket, s.reuse_port)
                    .map_err(|e| ReloadError::Apply(e.to_string()))?;
                let listener =
                    TcpListener::from_std(socket).map_err(|e| ReloadError::Apply(e.to_string()))?;
                let _ = r.stop.send(true);
                runtime.point(&r.server, None);
                runtime.draining.push(r.task);
                changes.push(format!("listener {} on {}: rebuilt (TLS changed)", s.name, s.listen));
                bound.push((s, listener));
            }
            None => {}
        }
    }
    for r in old_listeners {
        changes
            .push(format!("listener {} on {}: removed, draining", r.server.name, r.server.listen));
        let _ = r.stop.send(true);
        runtime.point(&r.server, None);
        runtime.draining.push(r.task);
    }
    runtime.listeners = next;
    for (s, l) in bound {
        if !changes.iter().any(|c| c.contains(&format!("listener {} on {}:", s.name, s.listen))) {
            changes.push(format!("listener {} on {}: added", s.name, s.listen));
        }
        runtime.serve(s, l).map_err(|e| ReloadError::Apply(e.to_string()))?;
    }
    runtime.draining.retain(|t| !t.is_finished());

    state.config.store(Arc::new(new));
    let config = state.config.load_full();
    runtime.check(state, &config);
    crate::discovery::sync(state);
    Ok(ReloadReport { changes })
}

fn messages(e: ConfigError) -> Vec<String> {
    match e {
        ConfigError::Invalid { path, errors } => {
            errors.into_iter().map(|m| format!("{path}: {m}")).collect()
        }
        other => vec![other.to_string()],
    }
}

/// What differs between `old` and `new` that only a restart can change.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut differs = |what: &str, changed: bool| {
        if changed {
            out.push(format!("{what} changed: a reload cannot apply that; nothing was applied. `lb run --config FILE --upgrade` applies it without a gap (a new process takes over the listening sockets)"));
        }
    };
    differs("admin.listen", old.admin.listen != new.admin.listen);
    differs("admin.reuse_port", old.admin.reuse_port != new.admin.reuse_port);
    differs("admin.socket", old.admin.socket != new.admin.socket);
    let table = |c: &Config| c.announce.as_ref().map(|a| a.table);
    differs("announce.table", table(old) != table(new));
    match (&old.xdp, &new.xdp) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            differs("xdp.interfaces", a.interfaces != b.interfaces);
            differs("xdp.mode", a.mode != b.mode);
            differs("xdp.pin_path", a.pin_path != b.pin_path);
            differs("xdp.max_flows", a.max_flows != b.max_flows);
            differs("xdp.udp_idle_timeout", a.udp_idle_timeout != b.udp_idle_timeout);
            differs("xdp.tcp_syn_timeout", a.tcp_syn_timeout != b.tcp_syn_timeout);
            differs("xdp.tcp_idle_timeout", a.tcp_idle_timeout != b.tcp_idle_timeout);
            differs(
                "xdp.max_unconfirmed_flows",
                a.max_unconfirmed_flows != b.max_unconfirmed_flows,
            );
            differs("xdp.nat_ports", a.nat_ports != b.nat_ports);
        }
        _ => differs("[xdp] (added or removed)", true),
    }
    let (a, b) = (&old.http, &new.http);
    differs("http.header_timeout_ms", a.header_timeout_ms != b.header_timeout_ms);
    differs("http.idle_timeout_ms", a.idle_timeout_ms != b.idle_timeout_ms);
    differs("http.max_header_bytes", a.max_header_bytes != b.max_header_bytes);
    differs("http.max_headers", a.max_headers != b.max_headers);
    differs("http.max_connections", a.max_connections != b.max_connections);
    differs("http.grace_ms", a.grace_ms != b.grace_ms);
    differs(
        "http.h2_max_concurrent_streams",
        a.h2_max_concurrent_streams != b.h2_max_concurrent_streams,
    );
    differs("http.h2_keepalive_ms", a.h2_keepalive_ms != b.h2_keepalive_ms);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_changes_are_named() {
        let a = Config::parse("[xdp]\ninterfaces = [\"eth0\"]\n").unwrap();
        let b = Config::parse("[xdp]\ninterfaces = [\"eth1\"]\n[http]\ngrace_ms = 5\n").unwrap();
        let c =
            Config::parse("[xdp]\ninterfaces = [\"eth0\"]\n[upstream.x]\nbackends = []\n").unwrap();
        let out = needs_restart(&a, &b);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].starts_with("xdp.interfaces changed") && out[1].starts_with("http.grace_ms")
        );
        assert!(needs_restart(&a, &c).is_empty(), "upstreams reload");
        let pool = "[[xdp.snat]]\ninterface = \"eth0\"\naddresses = [\"10.1.0.10\"]\n";
        let d = Config::parse(&format!("[xdp]\ninterfaces = [\"eth0\"]\n{pool}")).unwrap();
        assert!(needs_restart(&a, &d).is_empty(), "SNAT pools reload (addresses added at runtime)");
    }
}
