//! Continuous load: fresh-connection GETs from threads in a namespace, round robin over targets
//! (and client source addresses), that records when each failure began and which backend
//! answered each success.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{client::http_get, netns::Netns};

/// What a [`Load`] run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// (when the request began, since the start; target; error) of every failure, in order.
    pub failures: Vec<(Duration, SocketAddr, String)>,
    /// Bodies (backend names) with counts.
    pub seen: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// Requests per second over the run.
    pub fn rate(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The first few failures, for assertion messages.
    pub fn sample_failures(&self) -> Vec<String> {
        self.failures.iter().take(8).map(|(t, a, e)| format!("{t:?} {a}: {e}")).collect()
    }
}

/// What to send; [`Load::start`] starts it.
pub struct LoadBuilder {
    ns: Netns,
    targets: Vec<SocketAddr>,
    sources: Vec<Option<IpAddr>>,
    threads: usize,
    limit: Duration,
}

impl LoadBuilder {
    /// Sending threads (default 1).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Stops on its own after `limit` (default 60 s): a failed test never loads forever.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Client source addresses to go round (default: the kernel's choice).
    pub fn sources(mut self, sources: &[IpAddr]) -> Self {
        self.sources = sources.iter().copied().map(Some).collect();
        self
    }

    pub fn start(self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let start = Instant::now();
        let handles = (0..self.threads)
            .map(|t| {
                let ns = self.ns.share();
                let (s, n, answered) = (stop.clone(), sent.clone(), ok.clone());
                let (targets, sources, limit) =
                    (self.targets.clone(), self.sources.clone(), self.limit);
                std::thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut i = t;
                    while !s.load(Ordering::Relaxed) && start.elapsed() < limit {
                        let target = targets[i % targets.len()];
                        let source = sources[i % sources.len()];
                        i += 1;
                        let began = start.elapsed();
                        match http_get(&ns, source, target, Duration::from_secs(3)) {
                            Ok(body) => {
                                report.ok += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
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
                    report
                })
            })
            .collect();
        Load { stop, threads: handles, sent, ok, start }
    }
}

/// Load running in the background until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
    pub sent: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    pub start: Instant,
}

impl Load {
    /// GETs from `ns` to `targets`; see [`LoadBuilder`] for the options.
    pub fn builder(ns: &Netns, targets: Vec<SocketAddr>) -> LoadBuilder {
        LoadBuilder {
            ns: ns.share(),
            targets,
            sources: vec![None],
            threads: 1,
            limit: Duration::from_secs(60),
        }
    }

    /// One thread, at most 60 s.
    pub fn start(ns: &Netns, targets: Vec<SocketAddr>) -> Self {
        Self::builder(ns, targets).start()
    }

    /// Waits until at least `n` more requests were sent (bounded by 20 s).
    pub fn wait_for(&self, n: u64) {
        let start = self.sent.load(Ordering::Relaxed);
        crate::wait_until(Duration::from_secs(20), || {
            self.sent.load(Ordering::Relaxed) >= start + n
        });
    }

    /// Requests answered so far, without stopping.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads {
            let r = t.join().expect("load thread");
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

/// What a [`KeepAlive`] run saw.
#[derive(Debug, Default, Clone)]
pub struct KeepAliveReport {
    pub ok: u64,
    pub failed: u64,
    /// Responses that carried `Connection: close` (the client then opened a new connection).
    pub closed_by_header: u64,
    /// Connections closed (FIN, no byte of a response) when the next request went out: the
    /// server closed between requests; the request is sent again on a new connection, as
    /// HTTP/1.1 clients do (RFC 9112 §9.3.1). Counted, not failed.
    pub closed_idle: u64,
    pub failures: Vec<String>,
}

/// Keep-alive GETs on `conns` connections, one thread each, until [`KeepAlive::stop`]; a
/// connection the server closes cleanly is replaced by a new one.
pub struct KeepAlive {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<KeepAliveReport>>,
    ok: Arc<AtomicU64>,
}

impl KeepAlive {
    /// Starts `conns` clients in `ns` against `target` (each stops on its own after 60 s).
    pub fn start(ns: &Netns, target: SocketAddr, conns: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let threads = (0..conns)
            .map(|_| {
                let (ns, stop, ok) = (ns.share(), stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let mut report = KeepAliveReport::default();
                    let mut conn = None;
                    while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60)
                    {
                        let fresh = conn.is_none();
                        let s = match conn.take() {
                            Some(s) => s,
                            None => match crate::client::connect_in(&ns, None, target, T) {
                                Ok(s) => s,
                                Err(e) => {
                                    report.failed += 1;
                                    report.failures.push(format!("connect: {e:#}"));
                                    std::thread::sleep(Duration::from_millis(5));
                                    continue;
                                }
                            },
                        };
                        match exchange(s) {
                            Exchange::Kept(s) => conn = Some(s),
                            Exchange::Closed => report.closed_by_header += 1,
                            Exchange::Idle if !fresh => {
                                report.closed_idle += 1;
                                continue;
                            }
                            Exchange::Idle => {
                                report.failed += 1;
                                report.failures.push("a new connection closed unanswered".into());
                                continue;
                            }
                            Exchange::Failed(e) => {
                                report.failed += 1;
                                report.failures.push(e);
                                continue;
                            }
                        }
                        report.ok += 1;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    report
                })
            })
            .collect();
        Self { stop, threads, ok }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> KeepAliveReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = KeepAliveReport::default();
        for t in self.threads {
            let r = t.join().expect("keep-alive thread");
            all.ok += r.ok;
            all.failed += r.failed;
            all.closed_by_header += r.closed_by_header;
            all.closed_idle += r.closed_idle;
            all.failures.extend(r.failures);
        }
        all
    }
}

/// The bound on one request.
const T: Duration = Duration::from_secs(3);

enum Exchange {
    Kept(std::net::TcpStream),
    Closed,
    Idle,
    Failed(String),
}

/// One GET on `s`: answered (and the connection kept or closed by the header), closed before
/// any byte of a response, or failed (a reset, a timeout, a short or non-200 response).
fn exchange(mut s: std::net::TcpStream) -> Exchange {
    use std::io::{Read as _, Write as _};
    if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nhost: lb\r\n\r\n") {
        return Exchange::Failed(format!("write: {e}"));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Exchange::Idle,
            Ok(0) => return Exchange::Failed("closed inside a response".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Exchange::Failed(format!("read: {e}")),
        }
        match crate::client::one_response(&buf) {
            Ok(None) => {}
            Ok(Some(_)) => {
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                return if head.contains("\r\nconnection: close\r\n") {
                    Exchange::Closed
                } else {
                    Exchange::Kept(s)
                };
            }
            Err(e) => return Exchange::Failed(format!("{e:#}")),
        }
    }
}

/// Opens `n` UDP sessions through `target` from `ns`: `n` sockets (one source port each), one
/// `size`-byte datagram from each, sent `batch` at a time with the replies read before the
/// next batch (so no socket buffer overflows). Returns the sockets (the sessions live while
/// the proxy keeps them) and how many got their reply. Blocking; each reply waited for at
/// most [`crate::T`].
pub fn udp_sessions(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    size: usize,
    batch: usize,
) -> anyhow::Result<(Vec<std::net::UdpSocket>, usize)> {
    ns.run(move || -> anyhow::Result<_> {
        let payload = vec![b'x'; size];
        let mut socks = Vec::with_capacity(n);
        let mut replies = 0;
        let mut buf = vec![0u8; size + 64];
        while socks.len() < n {
            let start = socks.len();
            for _ in 0..batch.min(n - start) {
                let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
                s.connect(target)?;
                s.set_read_timeout(Some(crate::T))?;
                s.send(&payload)?;
                socks.push(s);
            }
            replies += socks[start..].iter().filter(|s| s.recv(&mut buf).is_ok()).count();
        }
        Ok((socks, replies))
    })?
}
