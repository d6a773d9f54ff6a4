//! The service manager's side of an upgrade: SIGUSR2 makes the running process start its own
//! successor (`lb run --config FILE --upgrade`, inside the service's cgroup, as
//! `systemctl kill -s USR2 lb` needs), and a process that is ready tells systemd so
//! (`READY=1`, with `MAINPID=` after an upgrade: the unit's main process is the new one from
//! then on, and the old one's exit is not the service's).
use std::{
    ffi::OsString,
    os::unix::net::UnixDatagram,
    path::Path,
    process::{Command, Stdio},
};

/// SIGUSR2: starts `lb run --config config --upgrade` with this process's binary (as it was
/// started: a binary replaced on disk since is the one that runs) and environment; it takes
/// over through the upgrade socket, as any `lb run --upgrade`.
pub fn spawn_successor(config: Option<&Path>) {
    match config.map(spawn) {
        Some(Ok(pid)) => log::info!("SIGUSR2: started pid {pid} to take over"),
        Some(Err(e)) => log::error!("SIGUSR2: cannot start a successor: {e}"),
        None => log::error!("SIGUSR2: started without a config file; nothing to upgrade to"),
    }
}

fn spawn(config: &Path) -> std::io::Result<u32> {
    let exe: OsString = std::env::args_os().next().unwrap_or_else(|| "lb".into());
    let mut child = Command::new(exe)
        .args(["run", "--upgrade", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .spawn()?;
    let pid = child.id();
    // Reaped here, not left a zombie, when it fails (an invalid config: its errors are in the
    // log, and this process serves on).
    std::thread::spawn(move || match child.wait() {
        Ok(s) if !s.success() => log::error!("upgrade: successor pid {pid} exited with {s}"),
        _ => {}
    });
    Ok(pid)
}

/// Tells the service manager (if `NOTIFY_SOCKET` names one) that this process serves; after
/// an upgrade, also that it is the service's main process now.
pub fn notify_ready(upgraded: bool) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let mut msg = String::from("READY=1\n");
    if upgraded {
        msg.push_str(&format!("MAINPID={}\n", std::process::id()));
    }
    if let Err(e) = send(&path, msg.as_bytes()) {
        log::warn!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy());
    }
}

fn send(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<usize> {
    let sock = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
    // systemd's socket is usually abstract ("@/org/freedesktop/systemd1/notify"...).
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg, &addr)
    } else {
        sock.send_to(msg, path)
    }
}
