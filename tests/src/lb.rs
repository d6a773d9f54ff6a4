//! A running `lb run` inside a namespace, stopped (SIGTERM, then SIGKILL) on drop.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::Netns;

/// The `lb` binary next to the test executable (target/<profile>/lb).
pub fn lb_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return Ok(p.into());
    }
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary has no directory")?;
    let candidates = [dir.join("lb"), dir.parent().unwrap_or(dir).join("lb")];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "{} not found: build it first with `cargo build -p lb-user` (cargo xtask test does)",
            candidates[1].display()
        )
    })
}

/// Where tests pin: a bpffs of their own, mounted once outside /sys, because `ip netns exec`
/// remounts /sys (and with it /sys/fs/bpf) for the command it runs.
const TEST_BPFFS: &str = "/run/lb-test-bpffs";

/// A pin directory unique to this run, on the test bpffs.
pub fn pin_path() -> String {
    static MOUNT: std::sync::Once = std::sync::Once::new();
    MOUNT.call_once(|| {
        let _ = std::fs::create_dir_all(TEST_BPFFS);
        let mounted = crate::netns::run(&["stat", "-f", "-c", "%T", TEST_BPFFS])
            .is_ok_and(|t| t.trim() == "bpf_fs");
        if !mounted {
            crate::netns::run(&["mount", "-t", "bpf", "bpf", TEST_BPFFS])
                .expect("mount test bpffs");
        }
        sweep_dead_pins();
    });
    format!("{TEST_BPFFS}/{}", crate::netns::unique("pin"))
}

/// Removes pin directories of test processes that are gone: a run killed by a timeout or
/// SIGKILL never runs its destructors, and each set of pinned maps holds ~350 MiB of kernel
/// memory until removed.
fn sweep_dead_pins() {
    let Ok(entries) = std::fs::read_dir(TEST_BPFFS) else { return };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix("lbt").and_then(|r| r.split('x').next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = lb_user::dataplane::detach(&entry.path());
        }
    }
}

pub struct Lb {
    child: Child,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub ns_name: String,
    /// The config's pin directory, removed on drop.
    pin: Option<String>,
}

fn spawn(ns: &Netns, config: &std::path::Path) -> anyhow::Result<Child> {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(lb_binary()?)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .spawn()
        .context("spawn lb run")
}

fn pin_of(config: &str) -> Option<String> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "pin_path").then(|| v.trim().trim_matches('"').to_string())
    })
}

impl Lb {
    /// Writes `config` to a temp file and starts `lb run` in `ns`; waits until the admin API
    /// answers. The config must set `[admin] listen` to `admin`.
    pub fn start(ns: &Netns, config: &str, admin: SocketAddr) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}-lb.toml", ns.name));
        std::fs::write(&path, config)?;
        let child = spawn(ns, &path)?;
        let mut lb =
            Self { child, admin, config: path, ns_name: ns.name.clone(), pin: pin_of(config) };
        lb.wait_ready(ns)?;
        Ok(lb)
    }

    fn wait_ready(&mut self, ns: &Netns) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("lb run exited early with {status}");
            }
            if self.cli(ns, &["status"]).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("lb run did not answer on {} within 20 s", self.admin)
    }

    /// Runs an `lb` client subcommand in `ns` against this daemon and returns its stdout.
    pub fn cli(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
        let lb = lb_binary()?;
        let admin = self.admin.to_string();
        let mut full = vec![lb.to_str().context("non-UTF-8 path")?];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--admin", &admin]);
        ns.exec(&full)
    }

    /// `lb <args> --json` parsed.
    pub fn json(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = args.to_vec();
        full.push("--json");
        Ok(serde_json::from_str(&self.cli(ns, &full)?)?)
    }

    /// Stops the daemon with SIGTERM and waits for it; the pinned program stays.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.terminate()
    }

    /// Starts `lb run` again with the same config (adopting what is pinned).
    pub fn restart(&mut self, ns: &Netns) -> anyhow::Result<()> {
        self.child = spawn(ns, &self.config)?;
        self.wait_ready(ns)
    }

    /// Runs `lb detach --config` for this daemon's config.
    pub fn detach(&self, ns: &Netns) -> anyhow::Result<String> {
        let lb = lb_binary()?;
        ns.exec(&[
            lb.to_str().context("non-UTF-8 path")?,
            "detach",
            "--config",
            self.config.to_str().context("non-UTF-8 path")?,
        ])
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
        // Whatever the test left pinned goes with it (links first, which detaches XDP).
        if let Some(pin) = &self.pin {
            let _ = lb_user::dataplane::detach(std::path::Path::new(pin));
        }
        let _ = std::fs::remove_file(&self.config);
    }
}
