//! `lb run --upgrade` for the tests: replace a running [`Lb`] without a gap ([`Lb::upgrade`],
//! the replaced process as [`Replaced`]), or run a second `lb run` beside it to its end.
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
        Ok(Replaced { child: std::mem::replace(&mut self.child, child) })
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
}

impl Replaced {
    pub fn pid(&self) -> u32 {
        self.child.id()
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
