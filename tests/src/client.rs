//! Clients that run inside a namespace: HTTP/1.1 GETs on fresh or kept-alive connections from a
//! chosen source address, a TCP echo round trip, and UDP sockets. Every call is bounded by its timeout.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::Context as _;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::Netns;

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

/// [`connect_from`] run inside `ns`.
pub fn connect_in(
    ns: &Netns,
    source: Option<IpAddr>,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    ns.run(move || connect_from(source, target, timeout))?
}

/// Sends GET / with `connection: close` on an open connection and returns the body.
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

/// GET / on an open keep-alive connection; returns the body (the backend's name).
pub fn keepalive_get(stream: &mut TcpStream) -> anyhow::Result<String> {
    write!(stream, "GET / HTTP/1.1\r\nhost: lb\r\n\r\n")?;
    read_response(stream)
}

/// [`keepalive_get`] on every connection at once: all requests are written first, then each
/// answer is read, the whole within `timeout` (so many dead connections cost one timeout, not
/// one each). The connections keep `timeout` as their read timeout afterwards.
pub fn keepalive_get_all(
    streams: &mut [&mut TcpStream],
    timeout: Duration,
) -> Vec<anyhow::Result<String>> {
    let sent: Vec<std::io::Result<()>> =
        streams.iter_mut().map(|s| write!(s, "GET / HTTP/1.1\r\nhost: lb\r\n\r\n")).collect();
    let deadline = std::time::Instant::now() + timeout;
    let answers = streams
        .iter_mut()
        .zip(sent)
        .map(|(s, sent)| {
            sent?;
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            read_response(s)
        })
        .collect();
    for s in streams.iter_mut() {
        let _ = s.set_read_timeout(Some(timeout));
    }
    answers
}

/// Reads one response from a keep-alive connection: its body.
fn read_response(stream: &mut TcpStream) -> anyhow::Result<String> {
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

/// `n` keep-alive connections from `ns` to `target`, each with the backend that answered its
/// first request (so a test can tell a held flow that moved from one that kept its backend).
pub fn hold(
    ns: &Netns,
    target: SocketAddr,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<(String, TcpStream)>> {
    (0..n)
        .map(|i| {
            let mut c = connect_in(ns, None, target, timeout)?;
            let who = keepalive_get(&mut c).with_context(|| format!("held connection {i}"))?;
            Ok((who, c))
        })
        .collect()
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

/// Connects (from `source` if given), reads the greeting line, sends `payload`, half-closes,
/// and returns (greeting, everything after it). Blocking.
pub fn echo_roundtrip(
    target: SocketAddr,
    source: Option<IpAddr>,
    payload: &[u8],
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut s = connect_from(source, target, crate::T)?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut greeting = String::new();
    r.read_line(&mut greeting)?;
    anyhow::ensure!(!greeting.is_empty(), "closed before the greeting");
    s.write_all(payload)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    r.read_to_end(&mut rest)?;
    Ok((greeting.trim().to_string(), rest))
}

/// Connects (from `source` if given) and reads the greeting line an echo backend sends; the
/// connection stays open for the caller. Blocking; bounded by [`crate::T`].
pub fn greeted(target: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<(String, TcpStream)> {
    let s = connect_from(source, target, crate::T)?;
    let mut greeting = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut greeting)?;
    anyhow::ensure!(!greeting.is_empty(), "closed before the greeting");
    Ok((greeting.trim().to_string(), s))
}

/// Connects to `target` and sends nothing: what the peer wrote before it closed (empty when it
/// just closed, or reset). Blocking; bounded by [`crate::T`].
pub fn read_silently(target: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&target, crate::T)?;
    s.set_read_timeout(Some(crate::T))?;
    let mut b = Vec::new();
    // A reset is a close too.
    let _ = s.read_to_end(&mut b);
    Ok(b)
}

/// Sends one ICMP (ICMPv6) echo request from `ns` to `target` and waits up to `timeout` for
/// the reply: true when it came. Uses ping sockets (the kernel fills the identifier and the
/// checksum), which the call enables in `ns` (`net.ipv4.ping_group_range`, both families).
pub fn ping(ns: &Netns, target: IpAddr, timeout: Duration) -> anyhow::Result<bool> {
    ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")?;
    ns.run(move || -> anyhow::Result<bool> {
        let (domain, proto, request, reply) = match target {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128, 129),
        };
        let sock = Socket::new(domain, Type::DGRAM, Some(proto)).context("ping socket")?;
        sock.set_read_timeout(Some(timeout))?;
        let sock: UdpSocket = sock.into();
        sock.connect(SocketAddr::new(target, 0))?;
        sock.send(&[request, 0, 0, 0, 0, 0, 0, 1, b'l', b'b'])?;
        let mut buf = [0u8; 128];
        // No reply in time, or an ICMP error instead of one (unreachable): not answered.
        Ok(sock.recv(&mut buf).is_ok_and(|n| n >= 8 && buf[0] == reply))
    })?
}

/// A connector for hyper-util's pooled client that opens each TCP connection from `ns` (the
/// client's runtime thread stays where it is: only the socket is made inside).
#[derive(Clone)]
pub struct NetnsConnector {
    ns: std::sync::Arc<Netns>,
}

impl NetnsConnector {
    pub fn new(ns: &Netns) -> Self {
        Self { ns: std::sync::Arc::new(ns.share()) }
    }
}

type Connecting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>,
            > + Send,
    >,
>;

impl tower_service::Service<hyper::Uri> for NetnsConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let ns = self.ns.clone();
        Box::pin(async move {
            let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
            let addr: SocketAddr = authority.parse().map_err(std::io::Error::other)?;
            let connect = move || {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(s)
            };
            let std = tokio::task::spawn_blocking(move || ns.run(connect))
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)??;
            Ok(hyper_util::rt::TokioIo::new(tokio::net::TcpStream::from_std(std)?))
        })
    }
}
