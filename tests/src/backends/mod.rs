//! Every backend the tests run, by kind:
//! - [`HttpBackend`]: an HTTP/1.1 server in a namespace (threads) that answers with its name,
//!   slowly, never, or with a reset ([`Reply`]);
//! - [`ProcBackend`]: the `lb-rel-backend` process (SIGKILLable, holds thousands of
//!   connections);
//! - `stream`: tokio TCP echo, UDP echo, PROXY-protocol and TLS backends;
//! - `raw`: an HTTP/1.1 backend that records the exact bytes of each request.
//!
//! The hyper backends of the in-process L7 tests are [`crate::http::Backend`].
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns::Netns;

mod process;
pub mod raw;
pub mod stream;

pub use process::ProcBackend;
pub use stream::{
    ProxySeen, TlsBackend, counting_backend_on, echo_backend, echo_backend_on, proxy_backend,
    resetting_backend, serve_tls, stalling_backend, udp_echo, udp_echo_on,
};

/// How an [`HttpBackend`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// `200` with its name as the body, at once; keep-alive unless the client closes.
    Name,
    /// As `Name`, after waiting this long for each request.
    Slow(Duration),
    /// Accepts and reads, never answers (connections stay open until the server stops).
    Silent,
    /// Reads the request, writes the start of a status line, then resets (RST).
    ResetMidResponse,
}

/// An HTTP/1.1 server in a namespace, one thread per connection; stops on drop (connections it
/// holds close then).
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: String,
    /// Requests answered or held.
    pub requests: Arc<AtomicU64>,
    /// TCP connections accepted.
    pub accepted: Arc<AtomicU64>,
    /// When each request head arrived.
    pub arrived: Arc<Mutex<Vec<Instant>>>,
    /// The client address of each accepted connection, as the backend sees it.
    pub peers: Arc<Mutex<Vec<std::net::IpAddr>>>,
    stop: Arc<AtomicBool>,
}

impl HttpBackend {
    /// Starts the server in `ns` on `addr` (port 0 picks one), answering with `name`.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        Self::with(ns, addr, name, Reply::Name)
    }

    /// Starts the server answering as `reply` says.
    pub fn with(ns: &Netns, addr: SocketAddr, name: &str, reply: Reply) -> anyhow::Result<Self> {
        let listener =
            ns.run(move || TcpListener::bind(addr))?.with_context(|| format!("bind {addr}"))?;
        listener.set_nonblocking(true)?;
        let b = Self {
            addr: listener.local_addr()?,
            name: name.to_string(),
            requests: Arc::default(),
            accepted: Arc::default(),
            arrived: Arc::default(),
            peers: Arc::default(),
            stop: Arc::default(),
        };
        let (stop, accepted, peers) = (b.stop.clone(), b.accepted.clone(), b.peers.clone());
        let served = Served {
            name: b.name.clone(),
            requests: b.requests.clone(),
            arrived: b.arrived.clone(),
        };
        std::thread::spawn(move || {
            // Silent connections live here, so they close when the server stops.
            let held = Arc::new(Mutex::new(Vec::new()));
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        peers.lock().unwrap().push(peer.ip());
                        let (served, held) = (served.clone(), held.clone());
                        std::thread::spawn(move || served.serve(stream, reply, &held));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
            held.lock().unwrap().clear();
        });
        Ok(b)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a connection thread records and answers with.
#[derive(Clone)]
struct Served {
    name: String,
    requests: Arc<AtomicU64>,
    arrived: Arc<Mutex<Vec<Instant>>>,
}

impl Served {
    fn serve(&self, mut stream: TcpStream, reply: Reply, held: &Mutex<Vec<TcpStream>>) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
        match reply {
            Reply::Silent => held.lock().unwrap().push(stream),
            Reply::ResetMidResponse => {
                let mut buf = [0u8; 4096];
                if stream.read(&mut buf).unwrap_or(0) == 0 {
                    return;
                }
                self.requests.fetch_add(1, Ordering::Relaxed);
                let _ = stream.write_all(b"HTTP/1.1 20");
                // Dropping with linger 0 sends RST.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
            Reply::Name => self.answer(stream, Duration::ZERO),
            Reply::Slow(delay) => self.answer(stream, delay),
        }
    }

    fn answer(&self, mut stream: TcpStream, delay: Duration) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(n) = stream.read(&mut chunk) else { return };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let close = head.contains("connection: close");
                buf.drain(..end + 4);
                self.arrived.lock().unwrap().push(Instant::now());
                self.requests.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(delay);
                let body = format!("{}\n", self.name);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n{}\r\n{body}",
                    body.len(),
                    if close { "connection: close\r\n" } else { "" }
                );
                if stream.write_all(resp.as_bytes()).is_err() || close {
                    return;
                }
            }
        }
    }
}
