//! `lb run --upgrade` for the tests: replace a running [`Lb`] without a gap ([`Lb::upgrade`],
//! the replaced process as [`Replaced`]), start a second one beside it on shared sockets
//! ([`Lb::start_beside`], `reuse_port`), or run a second `lb run` beside it to its end.
use std::{
    path::{Path, PathBuf},
    process::{Child, ExitStatus, Output},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{Lb, spawn_with, with_admin};

impl Lb {
    /// The upgrade socket this daemon listens on.
    pub fn upgrade_socket(&self) -> PathBuf {
        let var = self.launch.env.iter().rev().find(|(k, _)| k == "LB_UPGRADE_SOCKET");
        PathBuf::from(&var.expect("set by the builder").1)
    }

    /// `lb run --config FILE --upgrade` (with `binary` instead of the workspace's, if given):
    /// returns once the new process answers `lb status` as ready; it is this `Lb` from then
    /// on. The replaced process is returned to wait for: it drains and exits on its own.
    pub fn upgrade(&mut self, binary: Option<&Path>) -> anyhow::Result<Replaced> {
        let mut launch = self.launch.clone();
        if let Some(b) = binary {
            launch.binary = Some(b.to_path_buf());
        }
        let mut child = spawn_with(&launch, &self.config, &["--upgrade"])?;
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("lb run --upgrade exited with {status} before it was ready");
            }
            // The admin socket is shared: the answer is the new process's once it carries
            // its pid.
            let answered = self.json(&["status"]).ok().filter(|s| s["pid"] == pid);
            if answered.is_some_and(|s| s["ready"] == true) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("lb run --upgrade (pid {pid}) was not ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.launch = launch;
        Ok(Replaced { child: std::mem::replace(&mut self.child, child), launch: None })
    }

    /// This process's own admin unix socket (`LB_ADMIN_SOCKET`), if [`Lb::start_beside`]
    /// gave it one.
    pub fn admin_socket(&self) -> Option<PathBuf> {
        let var = self.launch.env.iter().rev().find(|(k, _)| k == "LB_ADMIN_SOCKET");
        var.map(|(_, v)| PathBuf::from(v))
    }

    /// `lb status --json` asked over this process's own admin unix socket.
    pub fn own_status(&self) -> anyhow::Result<serde_json::Value> {
        let socket = self.admin_socket().context("no admin socket of its own")?;
        own_status(&self.launch, &socket)
    }

    /// A second `lb run` (not `--upgrade`) with this daemon's config, every listener of which
    /// has `reuse_port`: it binds beside this one, each process with an admin unix socket of
    /// its own (as each pod of a DaemonSet has its own /run). Returns once the new process
    /// says, over its own socket, that it is ready; it is this `Lb` from then on, and the one
    /// it overlaps is returned still serving, for the test to stop ([`Replaced::terminate`]).
    pub fn start_beside(&mut self) -> anyhow::Result<Replaced> {
        if self.admin_socket().is_none() {
            bail!(
                "the first process needs its own admin socket: start it with LbBuilder::env(\"LB_ADMIN_SOCKET\", ...)"
            );
        }
        let mut launch = self.launch.clone();
        let socket = std::env::temp_dir().join(format!("{}.sock", crate::netns::unique("adm")));
        launch.env.push(("LB_ADMIN_SOCKET".into(), socket.display().to_string()));
        let mut child = spawn_with(&launch, &self.config, &[])?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("the second lb run exited with {status} before it was ready");
            }
            let answered = own_status(&launch, &socket).ok();
            if answered.is_some_and(|s| s["ready"] == true && s["pid"] == child.id()) {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the second lb run (pid {}) was not ready within 30 s", child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let old = std::mem::replace(&mut self.launch, launch);
        Ok(Replaced { child: std::mem::replace(&mut self.child, child), launch: Some(old) })
    }

    /// A second `lb run` (with `args`, e.g. `--upgrade`) beside this daemon, with `config` (a
    /// TOML text, written to a file of its own), run to its end: for starts it must refuse.
    /// This daemon's config file is left as it is.
    pub fn run_beside(&self, config: &str, args: &[&str]) -> anyhow::Result<Output> {
        let path = std::env::temp_dir().join(format!("{}.toml", crate::netns::unique("lb")));
        std::fs::write(&path, with_admin(config, self.admin))?;
        let mut cmd = self.launch.command()?;
        let out = cmd.args(["run", "--config"]).arg(&path).args(args).output();
        let _ = std::fs::remove_file(&path);
        out.context("run a second lb run")
    }
}

/// A process that `lb run --upgrade` replaced, draining; killed on drop if still running.
pub struct Replaced {
    child: Child,
    /// How it was launched, for a process [`Lb::start_beside`] overlaps (its own admin socket).
    launch: Option<super::Launch>,
}

/// `lb status --json` over the admin unix socket `socket`, with `launch`'s namespace.
fn own_status(launch: &super::Launch, socket: &Path) -> anyhow::Result<serde_json::Value> {
    let mut cmd = super::Launch { uid: None, ..launch.clone() }.command()?;
    let admin = format!("unix:{}", socket.display());
    let out = cmd.args(["status", "--json", "--admin", &admin]).output()?;
    if !out.status.success() {
        bail!("lb status over {admin}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

impl Replaced {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `lb status --json` over its own admin unix socket (a process [`Lb::start_beside`]
    /// overlaps): what this process says, not the one beside it.
    pub fn own_status(&self) -> anyhow::Result<serde_json::Value> {
        let launch = self.launch.as_ref().context("not an overlapped process")?;
        let var = launch.env.iter().rev().find(|(k, _)| k == "LB_ADMIN_SOCKET");
        own_status(launch, Path::new(&var.context("no admin socket of its own")?.1))
    }

    /// SIGTERM: it stops accepting and drains, as a kubelet stops a pod.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on the pid of a child this handle owns and has not reaped.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for it to exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("the replaced lb (pid {}) did not exit within {limit:?}", self.pid())
    }
}

impl Drop for Replaced {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
