//! Helpers for the control-plane tests (`tests/ops_*.rs`): raw admin API requests with or
//! without a token, a keep-alive GET, continuous load that counts failures, a slow backend,
//! and a wait loop with a deadline.
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

use anyhow::Context as _;

use crate::{netns::Netns, servers::http_get};

/// One HTTP/1.1 request to the admin API at `admin` from inside `ns`: (status, body).
pub fn admin_request(
    ns: &Netns,
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = ns.run(move || TcpStream::connect_timeout(&admin, Duration::from_secs(3)))??;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {admin}\r\n{auth}content-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.get(9..12).context("short status line")?.parse()?;
    Ok((status, body.to_string()))
}

/// GET / on an open keep-alive connection; returns the body (the backend's name).
pub fn keepalive_get(stream: &mut TcpStream) -> anyhow::Result<String> {
    write!(stream, "GET / HTTP/1.1\r\nhost: lb\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        anyhow::ensure!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(body) = one_response(&buf)? {
            return Ok(body);
        }
    }
}

/// The body of a complete `200` response with a Content-Length at the start of `buf`, `None`
/// while more bytes are needed, an error for another status.
pub fn one_response(buf: &[u8]) -> anyhow::Result<Option<String>> {
    let text = String::from_utf8_lossy(buf);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return Ok(None) };
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    if body.len() < len {
        return Ok(None);
    }
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(Some(body.trim().to_string()))
}

/// Polls `f` every 20 ms until it returns true; false once `limit` has passed.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// Every error, with the target.
    pub errors: Vec<String>,
    /// Bodies seen (backend names), with counts.
    pub seen: std::collections::BTreeMap<String, u64>,
}

/// Continuous GETs from `ns`, one fresh connection each, round robin over `targets`, until
/// stopped (at most 60 s).
pub struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<LoadReport>>,
    pub sent: Arc<AtomicU64>,
}

impl Load {
    pub fn start(ns: &Netns, targets: Vec<SocketAddr>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let name = ns.name.clone();
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let ns = Netns { name };
            let mut report = LoadReport::default();
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                let target = targets[i % targets.len()];
                i += 1;
                match http_get(&ns, None, target, Duration::from_secs(3)) {
                    Ok(body) => {
                        report.ok += 1;
                        *report.seen.entry(body).or_default() += 1;
                    }
                    Err(e) => {
                        report.failed += 1;
                        report.errors.push(format!("{target}: {e:#}"));
                    }
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
            // Not ours to delete: the test owns the namespace.
            std::mem::forget(ns);
            report
        });
        Self { stop, thread: Some(thread), sent }
    }

    /// Waits until at least `n` more requests were sent (bounded by 20 s).
    pub fn wait_for(&self, n: u64) {
        let start = self.sent.load(Ordering::Relaxed);
        wait_until(Duration::from_secs(20), || self.sent.load(Ordering::Relaxed) >= start + n);
    }

    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("stopped once").join().expect("load thread")
    }
}

/// An HTTP/1.1 backend that waits `delay` before answering each request with `name`;
/// records when each request arrived. Stops on drop.
pub struct SlowBackend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    pub arrived: Arc<Mutex<Vec<Instant>>>,
}

impl SlowBackend {
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        name: &str,
        delay: Duration,
    ) -> anyhow::Result<Self> {
        let listener = ns.run(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let arrived = Arc::new(Mutex::new(Vec::new()));
        let (s, a, name) = (stop.clone(), arrived.clone(), name.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let (a, name) = (a.clone(), name.clone());
                        std::thread::spawn(move || {
                            let _ = stream.set_nonblocking(false);
                            let mut buf = [0u8; 4096];
                            if stream.read(&mut buf).unwrap_or(0) == 0 {
                                return;
                            }
                            a.lock().unwrap().push(Instant::now());
                            std::thread::sleep(delay);
                            let body = format!("{name}\n");
                            let _ = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            );
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Self { addr, stop, arrived })
    }
}

impl Drop for SlowBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
