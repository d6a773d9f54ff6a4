//! The `lb-rel-backend` process (`src/bin/lb-rel-backend.rs`) in a namespace: a tokio HTTP
//! backend that a test can SIGKILL, and that holds thousands of connections.
use std::{io::Read as _, net::SocketAddr};

use anyhow::Context as _;

use crate::netns::Netns;

/// A running `lb-rel-backend`; SIGKILLed on drop.
pub struct ProcBackend {
    child: std::process::Child,
    pub name: String,
}

impl ProcBackend {
    /// Starts it in `ns` listening on `addrs`; waits until it has bound them.
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> anyhow::Result<Self> {
        let bin = crate::lb::lb_binary()?.with_file_name("lb-rel-backend");
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&bin)
            .arg(name)
            .args(addrs.iter().map(|a| a.to_string()))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {} (cargo build -p lb-tests --bins)", bin.display()))?;
        let mut out = child.stdout.take().context("stdout")?;
        let mut line = [0u8; 6];
        out.read_exact(&mut line).context("lb-rel-backend did not start")?;
        anyhow::ensure!(&line == b"ready\n", "lb-rel-backend: {line:?}");
        Ok(Self { child, name: name.to_string() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for it: its connections are reset by the kernel.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcBackend {
    fn drop(&mut self) {
        self.kill();
    }
}
