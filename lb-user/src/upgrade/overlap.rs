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

/// `net.ipv4.tcp_migrate_req` is 0 and cannot be written (a container's read-only /proc/sys).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot set net.ipv4.tcp_migrate_req = 1 ({0}): with reuse_port, connections queued on a listener when this process stops would be reset. Set it on the host (`sysctl -w net.ipv4.tcp_migrate_req=1`, per network namespace; the DaemonSet's init container does) or give lb a writable /proc/sys"
)]
pub struct MigrationError(io::Error);

/// Turns on `net.ipv4.tcp_migrate_req` (per network namespace) when a TCP listener of
/// `config` has `reuse_port`: without it, connections queued on a closing listener are reset.
/// Refuses when it is off and cannot be written: a rolling update would then reset
/// connections, which a warning in a log nobody reads does not prevent. A kernel without the
/// setting (before 5.14) is only warned about: there is nothing to set.
pub fn enable_migration(config: &Config) -> Result<(), MigrationError> {
    let tcp = config.tcp.listeners.iter().filter(|l| l.protocol == Protocol::Tcp);
    let shared = config.http.listener.iter().any(|l| l.reuse_port)
        || tcp.clone().any(|l| l.reuse_port)
        || config.admin.reuse_port;
    if !shared {
        return Ok(());
    }
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(v) if v.trim() == "1" => log::info!("net.ipv4.tcp_migrate_req = 1 (reuse_port)"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => log::warn!(
            "this kernel has no net.ipv4.tcp_migrate_req: with reuse_port, connections queued when this process stops will be reset"
        ),
        _ => {
            std::fs::write(MIGRATE_REQ, "1").map_err(MigrationError)?;
            log::info!(
                "net.ipv4.tcp_migrate_req = 1: with reuse_port, connections queued on a listener this process closes move to the other process"
            );
        }
    }
    Ok(())
}

/// Steers the datagrams of the SO_REUSEPORT group of `socket` to the socket that joined it
/// last (the process started beside this one), so that this one can stop without losing a
/// datagram: UDP has no `tcp_migrate_req`, and a datagram hashed to a socket that closes is
/// gone. A one-instruction classic BPF program, `ret #1`: the group keeps its sockets in the
/// order they joined, the older process first. Alone in the group (or after this socket
/// closes) the index is out of range and the kernel hashes as before.
pub fn steer_to_newest(socket: &impl AsFd) -> io::Result<()> {
    let mut ret_1 =
        [libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: 1 }];
    let prog = libc::sock_fprog { len: 1, filter: ret_1.as_mut_ptr() };
    setsockopt_raw(socket, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
}

/// Removes a steering program a stopped process left on the group of `socket` (it outlives
/// the socket that attached it), so the kernel hashes over every process again. A group
/// without one answers ENOENT, which is fine.
pub fn clear_steering(socket: &impl AsFd) -> io::Result<()> {
    match setsockopt_raw(socket, libc::SO_DETACH_REUSEPORT_BPF, &0i32) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn setsockopt_raw<T>(socket: &impl AsFd, name: libc::c_int, value: &T) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = socket.as_fd().as_raw_fd();
    let len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` points to a live `T` of `len` bytes for the duration of the call; the
    // kernel copies what it needs (the filter program too) before returning.
    let rc =
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, name, (value as *const T).cast(), len) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
