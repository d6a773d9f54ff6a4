//! A network namespace owned by a test: created on `new`, deleted on drop.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A name no other run on this machine uses: `lbt<pid>x<n><role>`.
pub fn unique(role: &str) -> String {
    format!("lbt{}x{}{role}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

pub struct Netns {
    pub name: String,
    /// False for a [`Netns::share`]d handle: only the owner deletes the namespace.
    owned: bool,
}

impl Netns {
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let name = unique(role);
        run(&["ip", "netns", "add", &name])?;
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A handle on the same namespace that does not delete it when dropped: for threads and
    /// helpers that outlive a borrow while the test keeps the owner.
    pub fn share(&self) -> Self {
        Self { name: self.name.clone(), owned: false }
    }

    /// Runs `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Like [`Netns::exec`] but returns the whole output, failed or not.
    pub fn exec_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .with_context(|| format!("spawn {args:?} in {}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]).map(drop)
    }

    /// A sysctl's value inside the namespace (`sysctl -n`).
    pub fn sysctl_value(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.exec(&["sysctl", "-n", key])?.trim().to_string())
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created by `f` stay in the
    /// namespace and can be used from any thread afterwards.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let file = File::open(format!("/var/run/netns/{}", self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only; the fd is valid for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        // Kill what still runs inside (servers spawned with `ip netns exec`), then delete.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Runs a command and returns its stdout, or an error with its stderr.
pub fn run(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?} (is it installed? `cargo xtask bootstrap`)"))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
