//! Helpers for the reliability suite (`tests/rel_*.rs`): short or full runs, the report rows
//! RELIABILITY.md is built from, process samples (RSS, open files), the open-file limit,
//! backends that misbehave on purpose, and continuous load that records when each failure
//! happened.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{netns::Netns, servers::http_get};

/// True under `cargo xtask reliability` (`LB_REL_FULL=1`): the full-length versions run.
pub fn full() -> bool {
    std::env::var("LB_REL_FULL").as_deref() == Ok("1")
}

/// `short` in the default test command, `long` in the full run.
pub fn scaled<T>(short: T, long: T) -> T {
    if full() { long } else { short }
}

/// Records one scenario's outcome: printed always, and appended as a JSON line to the file
/// named by `LB_REL_REPORT` (what `cargo xtask reliability` turns into RELIABILITY.md).
pub fn record(scenario: &str, injected: &str, observed: &str, pass: bool) {
    let mode = if full() { "full" } else { "short" };
    eprintln!(
        "REL {scenario} [{mode}] {}: injected: {injected}; observed: {observed}",
        if pass { "PASS" } else { "FAIL" }
    );
    if let Some(path) = std::env::var_os("LB_REL_REPORT") {
        let line = serde_json::json!({
            "scenario": scenario, "mode": mode, "injected": injected,
            "observed": observed, "pass": pass,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Raises this process's soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The soft open-file limit of process `pid` (from /proc/PID/limits).
pub fn nofile_of(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What a process holds at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kb: u64,
    pub fds: u64,
}

/// RSS (VmRSS) and open file descriptors of `pid`.
pub fn sample(pid: u32) -> Sample {
    let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
    Sample { rss_kb, fds }
}

/// The pid of the `lb run` started with `config` (its path is unique to the test). `ip netns
/// exec` execs lb, so the process found is lb itself.
pub fn lb_pid(config: &std::path::Path) -> Option<u32> {
    let want = config.to_str()?;
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<String> =
            cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_lb = args.iter().any(|a| a == "run") && args.iter().any(|a| a == want);
        (is_lb && !args[0].ends_with("ip")).then_some(pid)
    })
}

/// How a [`FaultyBackend`] misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Accepts and reads, never answers (connections stay open).
    Silent,
    /// Reads the request, writes the start of a status line, then resets (RST).
    ResetMidResponse,
}

/// A TCP server that accepts connections and misbehaves on each; stops on drop (connections
/// it holds close then).
pub struct FaultyBackend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultyBackend {
    pub fn start(ns: &Netns, addr: SocketAddr, fault: Fault) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), accepted.clone());
        std::thread::spawn(move || {
            let held = Arc::new(Mutex::new(Vec::new()));
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::Relaxed);
                        let held = held.clone();
                        std::thread::spawn(move || misbehave(stream, fault, &held));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
            held.lock().unwrap().clear();
        });
        Ok(Self { addr, accepted, stop })
    }
}

impl Drop for FaultyBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn misbehave(mut stream: TcpStream, fault: Fault, held: &Mutex<Vec<TcpStream>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    match fault {
        Fault::Silent => {
            // Keep it open (and unanswered) until the server stops.
            held.lock().unwrap().push(stream);
        }
        Fault::ResetMidResponse => {
            let mut buf = [0u8; 4096];
            if stream.read(&mut buf).unwrap_or(0) == 0 {
                return;
            }
            let _ = stream.write_all(b"HTTP/1.1 20");
            let sock = socket2::SockRef::from(&stream);
            let _ = sock.set_linger(Some(Duration::ZERO));
            // Dropping with linger 0 sends RST.
        }
    }
}

/// What a [`Traffic`] run saw.
#[derive(Debug, Default, Clone)]
pub struct TrafficReport {
    pub ok: u64,
    pub failed: u64,
    /// (when the request began, since the start; target; error) of every failure.
    pub failures: Vec<(Duration, SocketAddr, String)>,
    /// Bodies (backend names) with counts.
    pub seen: std::collections::BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl TrafficReport {
    /// Requests per second over the run.
    pub fn rate(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The first few failures, for assertion messages.
    pub fn sample_failures(&self) -> Vec<String> {
        self.failures.iter().take(8).map(|(t, a, e)| format!("{t:?} {a}: {e}")).collect()
    }
}

/// Continuous GETs from `threads` threads in `ns`, a fresh connection each, round robin over
/// `targets`, until stopped or `limit` has passed.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<TrafficReport>>,
    pub sent: Arc<AtomicU64>,
    pub start: Instant,
}

impl Traffic {
    pub fn start(ns: &Netns, targets: Vec<SocketAddr>, threads: usize, limit: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let handles = (0..threads)
            .map(|t| {
                let name = ns.name.clone();
                let (s, n, targets) = (stop.clone(), sent.clone(), targets.clone());
                std::thread::spawn(move || {
                    let ns = Netns { name };
                    let mut report = TrafficReport::default();
                    let mut i = t;
                    while !s.load(Ordering::Relaxed) && start.elapsed() < limit {
                        let target = targets[i % targets.len()];
                        i += 1;
                        let began = start.elapsed();
                        match http_get(&ns, None, target, Duration::from_secs(3)) {
                            Ok(body) => {
                                report.ok += 1;
                                *report.seen.entry(body).or_default() += 1;
                            }
                            Err(e) => {
                                report.failed += 1;
                                report.failures.push((began, target, format!("{e:#}")));
                                // A refused connect returns at once: do not spin on it.
                                std::thread::sleep(Duration::from_millis(5));
                            }
                        }
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    // Not ours to delete: the test owns the namespace.
                    std::mem::forget(ns);
                    report
                })
            })
            .collect();
        Self { stop, threads: handles, sent, start }
    }

    /// Waits until at least `n` more requests were sent (bounded by 20 s).
    pub fn wait_for(&self, n: u64) {
        let start = self.sent.load(Ordering::Relaxed);
        crate::ops::wait_until(Duration::from_secs(20), || {
            self.sent.load(Ordering::Relaxed) >= start + n
        });
    }

    pub fn stop(self) -> TrafficReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = TrafficReport::default();
        for t in self.threads {
            let r = t.join().expect("traffic thread");
            all.ok += r.ok;
            all.failed += r.failed;
            all.failures.extend(r.failures);
            for (k, v) in r.seen {
                *all.seen.entry(k).or_default() += v;
            }
        }
        all.failures.sort_by_key(|f| f.0);
        all.elapsed = self.start.elapsed();
        all
    }
}

/// `[xdp]` interfaces of a topology as a TOML list body.
pub fn toml_list<S: std::fmt::Display>(items: impl IntoIterator<Item = S>) -> String {
    items.into_iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
}

/// A [`lb-rel-backend`](../bin/lb-rel-backend.rs) process in a namespace; SIGKILLed on drop.
pub struct ProcBackend {
    child: std::process::Child,
    pub name: String,
}

impl ProcBackend {
    /// Starts it in `ns` listening on `addrs`; waits until it has bound them.
    pub fn start(ns: &Netns, name: &str, addrs: &[SocketAddr]) -> anyhow::Result<Self> {
        use anyhow::Context as _;
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

/// One admin API request with an optional JSON body, from inside `ns`: (status, body).
pub fn admin_call(
    ns: &Netns,
    admin: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, String)> {
    use anyhow::Context as _;
    let mut s = ns.run(move || TcpStream::connect_timeout(&admin, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {admin}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.get(9..12).context("short status line")?.parse()?;
    Ok((status, body.to_string()))
}

/// The kernel's count of TCP SYN retransmissions in `ns` (TcpExt TCPSynRetrans).
pub fn syn_retransmits(ns: &Netns) -> u64 {
    let text = ns.exec(&["cat", "/proc/net/netstat"]).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(keys), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    keys.split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The loopback set-up of the single-backend load tests: a namespace with one backend process
/// on 127.0.0.1:18080; `lb` is to listen on 127.0.0.1:8080 with its admin API on :9901.
pub struct Loopback {
    /// Declared first: dropped (killed) before its namespace goes.
    pub server: ProcBackend,
    pub ns: Netns,
    pub backend: SocketAddr,
    pub admin: SocketAddr,
    pub listen: SocketAddr,
}

impl Loopback {
    pub fn new(role: &str) -> anyhow::Result<Self> {
        let ns = Netns::new(role)?;
        let backend: SocketAddr = "127.0.0.1:18080".parse()?;
        let server = ProcBackend::start(&ns, "backend", &[backend])?;
        Ok(Self {
            server,
            ns,
            backend,
            admin: "127.0.0.1:9901".parse()?,
            listen: "127.0.0.1:8080".parse()?,
        })
    }
}
