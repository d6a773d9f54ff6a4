//! `lb` as a child process: the one way tests run the daemon ([`Lb`], built with
//! [`LbBuilder`]: config text, admin address and token, uid, pin path, extra environment, the
//! namespace) and one-shot commands ([`command`]). [`Lb::upgrade`] replaces the daemon with
//! `lb run --upgrade`. The daemon is stopped (SIGTERM, then SIGKILL) and its pins removed on
//! drop.
use std::{
    ffi::OsString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{admin::Admin, netns::Netns};

pub mod decap;
mod upgrade;
pub use upgrade::Replaced;

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
            // A directory standing for a host's bpffs (k8s_image.rs) holds the pin directory.
            for sub in std::fs::read_dir(entry.path()).into_iter().flatten().filter_map(Result::ok)
            {
                if sub.path().is_dir() {
                    let _ = lb_user::dataplane::detach(&sub.path());
                }
            }
            let _ = lb_user::dataplane::detach(&entry.path());
        }
    }
}

/// Variables lb reads (`lb_user::config::ENV_VARS`) that must not leak from the developer's
/// shell into a test: a test sets the ones it means.
const LB_ENV: [&str; 7] = [
    "LB_CONFIG",
    "LB_ADMIN",
    "LB_ADMIN_LISTEN",
    "LB_ADMIN_SOCKET",
    "LB_ADMIN_TOKEN",
    "LB_PIN_PATH",
    "LB_UPGRADE_SOCKET",
];

/// How an `lb` process is launched: where, as whom, with what environment.
#[derive(Clone, Default)]
struct Launch {
    ns: Option<String>,
    uid: Option<u32>,
    env: Vec<(String, String)>,
    /// Another `lb` binary than [`lb_binary`] (the benchmarks' baseline build).
    binary: Option<PathBuf>,
}

impl Launch {
    fn command(&self) -> anyhow::Result<Command> {
        let mut argv: Vec<OsString> = Vec::new();
        if let Some(ns) = &self.ns {
            argv.extend(["ip", "netns", "exec", ns].map(OsString::from));
        }
        if let Some(uid) = self.uid {
            // setpriv execs lb, as `ip netns exec` does: the child's pid is lb's.
            argv.extend(
                ["setpriv", &format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]
                    .map(OsString::from),
            );
        }
        argv.push(match &self.binary {
            Some(b) => b.clone().into(),
            None => lb_binary()?.into(),
        });
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        for k in LB_ENV {
            cmd.env_remove(k);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        Ok(cmd)
    }
}

/// An `lb` command (`lb check`, `lb reload`, ...) in `ns` if given, with none of the caller's
/// `LB_*` variables. Add the arguments and run it.
pub fn command(ns: Option<&Netns>) -> anyhow::Result<Command> {
    Launch { ns: ns.map(|n| n.name.clone()), ..Launch::default() }.command()
}

/// What `lb run` is started with; see [`Lb::builder`].
pub struct LbBuilder {
    ns: Netns,
    config: String,
    admin: SocketAddr,
    token: Option<String>,
    launch: Launch,
    pin: Option<String>,
    listening: Vec<(Netns, SocketAddr)>,
}

impl LbBuilder {
    /// Where the harness reaches the admin API (default 127.0.0.1:9901). A config without an
    /// `[admin]` table gets one listening there.
    pub fn admin(mut self, addr: SocketAddr) -> Self {
        self.admin = addr;
        self
    }

    /// The admin token: given to the daemon and to every client command as `LB_ADMIN_TOKEN`,
    /// and sent by [`Lb::admin`]'s requests.
    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self.env("LB_ADMIN_TOKEN", token)
    }

    /// Runs the daemon as `uid` (and the same gid) through setpriv.
    pub fn uid(mut self, uid: u32) -> Self {
        self.launch.uid = Some(uid);
        self
    }

    /// Pins under `pin` (as `LB_PIN_PATH` for the daemon and its commands); everything pinned
    /// there is removed on drop.
    pub fn pin_path(mut self, pin: String) -> Self {
        self.pin = Some(pin.clone());
        self.env("LB_PIN_PATH", &pin)
    }

    /// Runs this `lb` binary instead of the workspace's (an older build, for comparisons).
    pub fn binary(mut self, path: PathBuf) -> Self {
        self.launch.binary = Some(path);
        self
    }

    /// One more variable for the daemon and its commands.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.launch.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Also waits, at start, until a TCP connect from `from` to `addr` succeeds (a listener
    /// the test is about, beyond the admin API).
    pub fn wait_listening(mut self, from: &Netns, addr: SocketAddr) -> Self {
        self.listening.push((from.share(), addr));
        self
    }

    fn text(&self) -> String {
        with_admin(&self.config, self.admin)
    }

    fn write(&self) -> anyhow::Result<PathBuf> {
        let path = std::env::temp_dir().join(format!("{}.toml", crate::netns::unique("lb")));
        std::fs::write(&path, self.text())?;
        Ok(path)
    }

    /// Starts `lb run` and waits (at most 20 s) until `lb status` answers and every
    /// [`LbBuilder::wait_listening`] address accepts; fails if lb exits first.
    pub fn start(self) -> anyhow::Result<Lb> {
        let config = self.write()?;
        // A config that names its own pin directory (the benchmarks) is cleaned up too.
        let pin = self.pin.clone().or_else(|| pin_of(&self.text()));
        let mut launch = self.launch;
        launch.ns = Some(self.ns.name.clone());
        let child = spawn(&launch, &config)?;
        let mut lb = Lb {
            child,
            launch,
            ns: self.ns,
            admin: self.admin,
            token: self.token,
            config,
            pin,
            listening: self.listening,
        };
        lb.wait_ready()?;
        Ok(lb)
    }

    /// Runs `lb run` to its end, for configs or environments it must refuse.
    pub fn run_to_exit(self) -> anyhow::Result<Output> {
        let config = self.write()?;
        let mut launch = self.launch;
        launch.ns = Some(self.ns.name.clone());
        let out = launch.command()?.args(["run", "--config"]).arg(&config).output();
        let _ = std::fs::remove_file(&config);
        // lb unpins a failed first start itself; this covers a run that got further.
        if let Some(pin) = &self.pin {
            let _ = lb_user::dataplane::detach(Path::new(pin));
        }
        out.context("run lb run")
    }
}

/// `config`, led by an `[admin]` table listening on `admin` unless it has one.
fn with_admin(config: &str, admin: SocketAddr) -> String {
    if config.lines().any(|l| l.trim() == "[admin]") {
        config.to_string()
    } else {
        format!("{}{config}", crate::conf::admin(admin))
    }
}

fn spawn(launch: &Launch, config: &Path) -> anyhow::Result<Child> {
    spawn_with(launch, config, &[])
}

fn spawn_with(launch: &Launch, config: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    launch
        .command()?
        .args(["run", "--config"])
        .arg(config)
        .args(extra)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .spawn()
        .context("spawn lb run")
}

fn pin_of(config: &str) -> Option<String> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "pin_path").then(|| v.trim().trim_matches('"').to_string())
    })
}

/// A running `lb run`.
pub struct Lb {
    child: Child,
    launch: Launch,
    ns: Netns,
    /// Where the harness reaches the admin API.
    pub admin: SocketAddr,
    token: Option<String>,
    /// The config file; a test rewrites it before a reload.
    pub config: PathBuf,
    /// The pin directory, removed on drop.
    pin: Option<String>,
    listening: Vec<(Netns, SocketAddr)>,
}

impl Lb {
    /// `lb run` in `ns` with `config` (a TOML text); see [`LbBuilder`] for the rest. Its
    /// upgrade socket is a path of its own (`LB_UPGRADE_SOCKET`), so tests never meet.
    pub fn builder(ns: &Netns, config: impl Into<String>) -> LbBuilder {
        let socket = std::env::temp_dir().join(format!("{}.sock", crate::netns::unique("up")));
        let launch = Launch {
            env: vec![("LB_UPGRADE_SOCKET".into(), socket.display().to_string())],
            ..Launch::default()
        };
        LbBuilder {
            ns: ns.share(),
            config: config.into(),
            admin: "127.0.0.1:9901".parse().expect("address"),
            token: None,
            launch,
            pin: None,
            listening: Vec::new(),
        }
    }

    /// Starts `lb run` in `ns` with `config`, reached at `admin`: the builder's common case.
    pub fn start(ns: &Netns, config: &str, admin: SocketAddr) -> anyhow::Result<Self> {
        Self::builder(ns, config).admin(admin).start()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("lb run exited early with {status}");
            }
            if self.cli(&["status"]).is_ok() && self.listening.iter().all(|(ns, a)| accepts(ns, *a))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("lb run did not answer on {} within 20 s", self.admin)
    }

    /// The namespace the daemon runs in.
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// An admin API client for this daemon (with its token, if it has one).
    pub fn admin(&self) -> Admin {
        Admin::new(&self.ns, self.admin).token(self.token.as_deref())
    }

    /// An `lb ARGS --admin ADDR` client command in the daemon's namespace, as root, with the
    /// daemon's token and pin path.
    pub fn cli_command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut cmd = Launch { uid: None, ..self.launch.clone() }.command()?;
        cmd.args(args).arg("--admin").arg(self.admin.to_string());
        Ok(cmd)
    }

    /// Runs an `lb` client subcommand against this daemon and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli_command(args)?.output().context("spawn lb")?;
        if !out.status.success() {
            bail!("lb {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `lb <args> --json` parsed.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut full = args.to_vec();
        full.push("--json");
        Ok(serde_json::from_str(&self.cli(&full)?)?)
    }

    /// The XDP program's counters by reason (`reasons` of the admin API's `/stats`, what `lb
    /// stats` prints under the table): `drop_no_port`, `flow_expired_syn`, ...
    pub fn reasons(&self) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let stats: serde_json::Value = serde_json::from_str(&self.admin().get("/stats")?)?;
        let list = stats["reasons"].as_array().context("no reasons in /stats")?;
        list.iter()
            .map(|r| {
                let name = r[0].as_str().context("reason name")?;
                Ok((name.to_string(), r[1].as_u64().context("reason count")?))
            })
            .collect()
    }

    /// Replaces the config file (for a reload); an `[admin]` table is added as at start.
    pub fn write_config(&self, text: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(&self.config, with_admin(text, self.admin))?)
    }

    /// The pin directory, if the harness chose it.
    pub fn pin_path(&self) -> Option<&str> {
        self.pin.as_deref()
    }

    /// The daemon's pid (`ip netns exec` and setpriv exec lb, so the child is lb itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The real and effective uid of the running daemon, from /proc.
    pub fn uids(&self) -> anyhow::Result<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
        Ok(line.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// SIGKILL, and waits for it: no drain, no cleanup; what it pinned stays.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Stops the daemon with SIGTERM and waits for it; the pinned program stays.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    /// Starts `lb run` again with the same config (adopting what is pinned).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.launch, &self.config)?;
        self.wait_ready()
    }

    /// Runs `lb detach --config` for this daemon's config (as root, with its pin path).
    pub fn detach(&self) -> anyhow::Result<String> {
        let launch = Launch { uid: None, ..self.launch.clone() };
        let out = launch.command()?.arg("detach").arg("--config").arg(&self.config).output()?;
        if !out.status.success() {
            bail!("lb detach failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn accepts(ns: &Netns, addr: SocketAddr) -> bool {
    ns.run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        .unwrap_or(false)
}

impl Drop for Lb {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.stop();
        }
        // Whatever the test left pinned goes with it (links first, which detaches XDP).
        if let Some(pin) = &self.pin {
            let _ = lb_user::dataplane::detach(std::path::Path::new(pin));
        }
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(self.upgrade_socket());
    }
}
