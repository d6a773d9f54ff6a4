//! `lb decap` on a backend namespace for the tests: attached on creation, detached (link and
//! maps unpinned) on drop, also when the test fails.
use anyhow::{Context as _, bail};

use super::{command, pin_path};
use crate::netns::Netns;

/// The decapsulation program attached to an interface of a namespace.
pub struct Decap {
    ns: Netns,
    iface: String,
    pin: String,
}

impl Decap {
    /// `lb decap attach --interface IFACE --vip V... --configure-host` in `ns` (with VIPs:
    /// the host's DSR set-up too), pinned under a test pin path.
    pub fn attach(ns: &Netns, iface: &str, vips: &[&str]) -> anyhow::Result<Self> {
        let pin = pin_path();
        let mut cmd = command(Some(ns))?;
        cmd.args(["decap", "attach", "--interface", iface, "--pin-path", &pin]);
        for v in vips {
            cmd.args(["--vip", v]);
        }
        if !vips.is_empty() {
            cmd.arg("--configure-host");
        }
        let out = cmd.output().context("run lb decap attach")?;
        if !out.status.success() {
            bail!("lb decap attach: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Self { ns: ns.share(), iface: iface.to_string(), pin })
    }

    /// `lb decap status`: where it is attached and its counters.
    pub fn status(&self) -> anyhow::Result<String> {
        let out = command(Some(&self.ns))?
            .args(["decap", "status", "--pin-path", &self.pin])
            .output()
            .context("run lb decap status")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One counter of `lb decap status` (0 when absent).
    pub fn counter(&self, name: &str) -> u64 {
        let status = self.status().unwrap_or_default();
        let line = status.lines().find(|l| l.split_whitespace().next() == Some(name));
        line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    }
}

impl Drop for Decap {
    fn drop(&mut self) {
        if let Ok(mut cmd) = command(Some(&self.ns)) {
            let args = ["decap", "detach", "--interface", &self.iface, "--pin-path", &self.pin];
            let _ = cmd.args(args).output();
        }
    }
}
