//! The new process's side of an upgrade: ask the running process for its sockets, and tell it
//! when to stop. Also the check that a plain `lb run` is not started over a running one
//! unless every listener can be shared with it (`overlap`).
use std::{io, os::unix::net::UnixStream, time::Duration};

use crate::config::Config;

use super::{
    Inherited, Offer, UpgradeError,
    wire::{self, Msg, Reader},
};

/// How long the old process may take to answer a step of the hand-over (it answers at once;
/// this only bounds a wedged one).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// What `lb run` starts from: the sockets of the process it replaces (none for a plain start)
/// and the connection on which it says it is ready.
#[derive(Default)]
pub struct Takeover {
    pub sockets: Inherited,
    conn: Option<Reader>,
    old_pid: u32,
    /// The pid of a running lb this plain start binds beside (every listener `reuse_port`).
    pub overlapping: Option<u32>,
}

/// For `lb run --upgrade` (`upgrade`), takes the running process's sockets over the upgrade
/// socket of `config`; for a plain `lb run`, fails if a running lb answers there and a
/// listener of `config` lacks `reuse_port` (its socket is in use: the start would fail on
/// that bind, less clearly).
pub fn begin(config: &Config, upgrade: bool) -> Result<Takeover, UpgradeError> {
    let path = &config.admin.upgrade_socket;
    let shown = path.display().to_string();
    let io = |source: io::Error| UpgradeError::Io { path: shown.clone(), source };
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(source) if upgrade => return Err(UpgradeError::Connect { path: shown, source }),
        // Nobody there (no file, or a dead process's): a plain start goes ahead.
        Err(_) => return Ok(Takeover::default()),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io)?;
    let mut reader = Reader::new(stream);
    let hello = Msg::Hello { pid: std::process::id(), upgrade };
    wire::send(reader.sock(), &hello, &[]).map_err(io)?;
    if !upgrade {
        let pid = match reader.recv().map_err(io)? {
            (Msg::Running { pid }, _) => pid,
            (other, _) => return Err(UpgradeError::Protocol(format!("{other:?}"))),
        };
        let lacking = super::overlap::lacking(config);
        if !lacking.is_empty() {
            return Err(UpgradeError::Running { pid, path: shown, lacking: lacking.join(", ") });
        }
        log::info!(
            "lb pid {pid} runs with this config's sockets: binding beside it (reuse_port); it keeps the XDP maps until it stops"
        );
        return Ok(Takeover { overlapping: Some(pid), ..Takeover::default() });
    }
    let mut sockets = Inherited::default();
    loop {
        match reader.recv().map_err(io)? {
            (Msg::Socket { kind, name, listen }, Some(fd)) => {
                sockets.sockets.push(Offer { kind, name, listen, fd });
            }
            (Msg::Done { pid }, _) => {
                log::info!(
                    "upgrade: pid {pid} handed over {} listening sockets",
                    sockets.sockets.len()
                );
                return Ok(Takeover {
                    sockets,
                    conn: Some(reader),
                    old_pid: pid,
                    overlapping: None,
                });
            }
            (Msg::Refused { reason }, _) => return Err(UpgradeError::Refused(reason)),
            (other, _) => return Err(UpgradeError::Protocol(format!("{other:?}"))),
        }
    }
}

impl Takeover {
    /// Whether this start takes over from a running process (`lb run --upgrade`).
    pub fn is_upgrade(&self) -> bool {
        self.conn.is_some()
    }

    /// Tells the replaced process (if any) that this one serves: it stops accepting and
    /// drains. Sockets nobody took (listeners the new config dropped) are closed here; the old
    /// process closes its copies as it exits. Then tells a service manager, if any. This
    /// process serves already, so a replaced one that does not answer (it crashed meanwhile)
    /// is logged, not fatal: both accept on the same sockets until it is gone.
    pub fn ready(&mut self) {
        let upgraded = self.conn.is_some();
        if let Err(e) = self.hand_over() {
            log::warn!("upgrade: pid {} did not confirm it stops: {e}", self.old_pid);
        }
        super::systemd::notify_ready(upgraded);
    }

    fn hand_over(&mut self) -> Result<(), UpgradeError> {
        let skipped = std::mem::take(&mut self.sockets);
        if !skipped.is_empty() {
            let names: Vec<String> = skipped.sockets.iter().map(|o| o.name.clone()).collect();
            log::info!("upgrade: not serving {} (gone from the config)", names.join(", "));
        }
        let Some(reader) = self.conn.as_mut() else { return Ok(()) };
        let io = |source: io::Error| UpgradeError::Io { path: "(connected)".into(), source };
        let ready = Msg::Ready { pid: std::process::id() };
        tokio::task::block_in_place(|| {
            wire::send(reader.sock(), &ready, &[]).map_err(io)?;
            match reader.recv().map_err(io)? {
                (Msg::Stopping, _) => Ok(()),
                (other, _) => Err(UpgradeError::Protocol(format!("{other:?}"))),
            }
        })?;
        log::info!("upgrade: took over from pid {}; it stops accepting and drains", self.old_pid);
        self.conn = None;
        Ok(())
    }
}
