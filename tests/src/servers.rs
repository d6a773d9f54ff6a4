//! Small servers and clients that run inside a namespace: HTTP backends that name themselves,
//! UDP echo, and request helpers with a chosen source address.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

/// An HTTP/1.1 server answering every request with its name; stops on drop.
pub struct HttpBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl HttpBackend {
    /// Starts the server in `ns` on `addr` (port 0 picks one).
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let listener =
            ns.run(move || TcpListener::bind(addr))?.with_context(|| format!("bind {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let (s, r, n) = (stop.clone(), requests.clone(), name.to_string());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, n) = (r.clone(), n.clone());
                        std::thread::spawn(move || serve_http(stream, &n, &r));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Self { addr, name: name.to_string(), requests, stop })
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve_http(mut stream: TcpStream, name: &str, requests: &AtomicU64) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
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
            requests.fetch_add(1, Ordering::Relaxed);
            let body = format!("{name}\n");
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

/// One HTTP/1.1 GET over a fresh connection from `ns`, bound to `source` if given; returns the
/// body. Times out after `timeout`.
pub fn http_get(
    ns: &Netns,
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    let stream = ns.run(move || connect_from(source, target, timeout))??;
    request_on(stream, target, timeout)
}

/// Connects to `target` from `source` (port chosen by the kernel). Call inside a namespace.
pub fn connect_from(
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(target), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = source {
        sock.bind(&SocketAddr::new(src, 0).into()).with_context(|| format!("bind {src}"))?;
    }
    sock.connect_timeout(&target.into(), timeout).with_context(|| format!("connect {target}"))?;
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// Sends GET / on an open connection and returns the body.
pub fn request_on(
    mut stream: TcpStream,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET / HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n")?;
    let mut resp = String::new();
    stream.read_to_string(&mut resp).context("read response")?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no end of headers in response")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "unexpected response: {head}");
    Ok(body.trim().to_string())
}

/// A UDP socket bound in `ns` (to `source` if given) that sends datagrams to `target`.
pub fn udp_socket(
    ns: &Netns,
    source: Option<IpAddr>,
    target: SocketAddr,
) -> anyhow::Result<UdpSocket> {
    let bind = match source {
        Some(s) => SocketAddr::new(s, 0),
        None if target.is_ipv4() => "0.0.0.0:0".parse()?,
        None => "[::]:0".parse()?,
    };
    let sock = ns.run(move || UdpSocket::bind(bind))??;
    sock.connect(target)?;
    Ok(sock)
}
