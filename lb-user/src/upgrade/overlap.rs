//! Two `lb run` processes on the same sockets at once, for rolling updates that start the new
//! process before stopping the old one (a DaemonSet with `maxSurge: 1`). Listeners with
//! `reuse_port = true` are bound with SO_REUSEPORT, so the second process binds beside the
//! first and the kernel spreads new connections over both. When the first gets SIGTERM it
//! closes its listeners at once; `net.ipv4.tcp_migrate_req = 1` makes the kernel move the
//! connections still queued on them (accept queue and half-open) to the other process instead
//! of resetting them. The XDP maps keep one writer (`dataplane::writer`).
use std::{io, os::fd::AsFd};

use crate::config::{Config, Protocol};

const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// The listeners of `config` that cannot be shared with an overlapping process (no
/// `reuse_port`), named as the config names them.
pub fn lacking(config: &Config) -> Vec<String> {
    let http = config.http.listener.iter().filter(|l| !l.reuse_port);
    let tcp = config.tcp.listeners.iter().filter(|l| !l.reuse_port);
    let mut out: Vec<String> = http.map(|l| format!("http listener {:?}", l.name)).collect();
    out.extend(tcp.map(|l| format!("tcp listener {:?}", l.name)));
    if !config.admin.reuse_port {
        out.push("admin.listen".into());
    }
    out
}

/// SO_REUSEPORT on a socket, also one already listening (a socket a replaced process handed
/// over): the kernel forms the group when a second socket binds.
pub fn set_reuse_port(socket: &impl AsFd, on: bool) -> io::Result<()> {
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::ReusePort, &on)
        .map_err(io::Error::from)
}

/// Turns on `net.ipv4.tcp_migrate_req` (per network namespace) when a TCP listener of
/// `config` has `reuse_port`: without it, connections queued on a closing listener are reset.
pub fn enable_migration(config: &Config) {
    let tcp = config.tcp.listeners.iter().filter(|l| l.protocol == Protocol::Tcp);
    let shared = config.http.listener.iter().any(|l| l.reuse_port)
        || tcp.clone().any(|l| l.reuse_port)
        || config.admin.reuse_port;
    if !shared {
        return;
    }
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(v) if v.trim() == "1" => log::info!("net.ipv4.tcp_migrate_req = 1 (reuse_port)"),
        _ => match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => log::info!(
                "net.ipv4.tcp_migrate_req = 1: with reuse_port, connections queued on a listener this process closes move to the other process"
            ),
            Err(e) => log::warn!(
                "cannot set net.ipv4.tcp_migrate_req = 1 ({e}): with reuse_port, connections queued when this process stops will be reset; set it on the host (sysctl -w net.ipv4.tcp_migrate_req=1)"
            ),
        },
    }
}
