//! Harness for the userspace L4 tests: the L4 listeners in-process on loopback (no root),
//! TLS backends with their own generated certificates, named echo backends (TCP and UDP), a
//! backend that reads PROXY headers with its own independent parser, and TLS clients that can
//! send their ClientHello in any fragmentation.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use lb_user::{
    config::Config,
    l4::{Handoffs, L4, ListenerStats},
    upstream,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    sync::{mpsc, watch},
    task::JoinSet,
};

/// Every wait in these tests is bounded by this.
pub const T: Duration = Duration::from_secs(10);

/// The L4 listeners of a config, running in this process until dropped.
pub struct L4Harness {
    pub addrs: HashMap<String, SocketAddr>,
    stats: HashMap<String, Arc<ListenerStats>>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<std::io::Result<()>>,
}

impl L4Harness {
    /// Parses and validates `config` as `lb run` does and starts its `[[tcp.listener]]`s.
    pub async fn start(config: &str, handoffs: Handoffs) -> Self {
        let config = Config::parse(config).unwrap_or_else(|e| panic!("config: {e}\n{config}"));
        let groups = upstream::groups(&config.upstream);
        let l4 = L4::build(&config.tcp, &groups, &handoffs).expect("build");
        let stats = l4.stats().into_iter().map(|s| (s.name.clone(), s)).collect();
        let bound = l4.bind().await.expect("bind");
        let addrs = bound.local_addrs().into_iter().collect();
        let (shutdown, rx) = watch::channel(false);
        let tasks = bound.spawn(rx);
        Self { addrs, stats, shutdown, tasks }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    pub fn stats(&self, listener: &str) -> &ListenerStats {
        &self.stats[listener]
    }

    /// Waits (bounded) until `f` holds on the listener's counters; connection tasks count
    /// after the client has seen the close.
    pub async fn wait_for(&self, listener: &str, what: &str, f: impl Fn(&ListenerStats) -> bool) {
        let s = self.stats(listener);
        for _ in 0..500 {
            if f(s) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{listener}: {what} never held: {:#?}", s.snapshot());
    }

    /// Stops the listeners and waits for them.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while let Some(r) = tokio::time::timeout(T, self.tasks.join_next()).await.expect("stops") {
            r.expect("task").expect("listener");
        }
    }
}

/// A self-signed certificate for `names` and its key.
pub fn cert(names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_pair.serialize_der()));
    (c.cert.der().clone(), key)
}

pub fn server_config(
    cert: &CertificateDer<'static>,
    key: &PrivateKeyDer<'static>,
) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .expect("server config");
    c.alpn_protocols = vec![b"lb-test".to_vec()];
    Arc::new(c)
}

/// A client trusting exactly `roots`.
pub fn client_config(roots: &[&CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    rustls::ClientConfig::builder().with_root_certificates(store).with_no_client_auth()
}

/// A TLS server with its own certificate. Per connection: finishes the handshake, writes
/// `"<name> sni=<sni> alpn=<alpn>\n"`, then echoes until EOF.
pub struct TlsBackend {
    pub addr: SocketAddr,
    pub cert: CertificateDer<'static>,
    _task: tokio::task::JoinHandle<()>,
}

impl TlsBackend {
    pub async fn start(name: &str, names: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, names).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str, names: &[&str]) -> Self {
        let listener = std::net::TcpListener::bind(addr).expect("bind tls backend");
        Self::on(listener, name, names)
    }

    /// Serves on a listener bound elsewhere (e.g. inside a namespace). Needs a runtime.
    pub fn on(listener: std::net::TcpListener, name: &str, names: &[&str]) -> Self {
        let (cert, key) = cert(names);
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&cert, &key));
        let name = name.to_string();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, name) = (acceptor.clone(), name.clone());
                tokio::spawn(async move { serve_tls(acceptor, tcp, &name).await });
            }
        });
        Self { addr, cert, _task: task }
    }
}

/// Serves one TLS connection as [`TlsBackend`] describes; also used for the L7 hand-off.
pub async fn serve_tls<S>(acceptor: tokio_rustls::TlsAcceptor, tcp: S, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(Ok(mut tls)) = tokio::time::timeout(T, acceptor.accept(tcp)).await else { return };
    let (_, conn) = tls.get_ref();
    let sni = conn.server_name().unwrap_or("-").to_string();
    let alpn = conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned());
    let line = format!("{name} sni={sni} alpn={}\n", alpn.as_deref().unwrap_or("-"));
    if tls.write_all(line.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(T, tls.read(&mut buf)).await {
        if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = tls.shutdown().await;
}

/// What a TLS client saw.
#[derive(Debug)]
pub struct TlsSeen {
    /// The leaf certificate the server presented.
    pub cert: CertificateDer<'static>,
    /// The backend's greeting line.
    pub line: String,
    /// What came back for the echo probe.
    pub echo: String,
}

/// Connects to `addr` with rustls (blocking; run it with spawn_blocking), writes the
/// ClientHello with `send_hello`, finishes the handshake, reads the greeting and checks an echo.
pub fn tls_client(
    addr: SocketAddr,
    sni: &str,
    config: rustls::ClientConfig,
    send_hello: impl FnOnce(&mut std::net::TcpStream, &[u8]),
) -> anyhow::Result<TlsSeen> {
    let name = ServerName::try_from(sni.to_string())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, T)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(T))?;
    tcp.set_write_timeout(Some(T))?;
    send_hello(&mut tcp, &hello);
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut line = String::new();
    BufReader::new(&mut tls).read_line(&mut line)?;
    anyhow::ensure!(!line.is_empty(), "no greeting: the connection closed");
    let cert = tls.conn.peer_certificates().and_then(|c| c.first()).cloned().expect("a cert");
    tls.write_all(b"ping through the tunnel")?;
    let mut echo = vec![0u8; 23];
    tls.read_exact(&mut echo)?;
    Ok(TlsSeen { cert, line: line.trim().to_string(), echo: String::from_utf8_lossy(&echo).into() })
}

/// Sends the ClientHello as rustls wrote it.
pub fn whole(tcp: &mut std::net::TcpStream, hello: &[u8]) {
    tcp.write_all(hello).expect("write hello");
}

/// Re-splits TLS records into records of at most `chunk` payload bytes (a valid fragmentation:
/// the handshake transcript covers messages, not records).
pub fn refragment(data: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= data.len() {
        let len = u16::from_be_bytes([data[pos + 3], data[pos + 4]]) as usize;
        let payload = &data[pos + 5..pos + 5 + len];
        for c in payload.chunks(chunk) {
            out.extend_from_slice(&data[pos..pos + 3]);
            out.extend_from_slice(&(c.len() as u16).to_be_bytes());
            out.extend_from_slice(c);
        }
        pos += 5 + len;
    }
    out
}

/// Writes `bytes` one at a time, each in its own TCP segment.
pub fn trickle(tcp: &mut std::net::TcpStream, bytes: &[u8]) {
    for b in bytes {
        tcp.write_all(std::slice::from_ref(b)).expect("write byte");
        std::thread::sleep(Duration::from_micros(300));
    }
}

/// A TCP backend: writes `"<name>\n"`, echoes until the client's FIN, then writes `"eof\n"` and
/// closes: a client that half-closes still gets everything.
pub async fn echo_backend(addr: SocketAddr, name: &str) -> SocketAddr {
    echo_backend_on(std::net::TcpListener::bind(addr).expect("bind echo backend"), name)
}

/// [`echo_backend`] on a listener bound elsewhere (e.g. inside a namespace). Needs a runtime.
pub fn echo_backend_on(listener: std::net::TcpListener, name: &str) -> SocketAddr {
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = TcpListener::from_std(listener).expect("tokio listener");
    let addr = listener.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                if s.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 8192];
                loop {
                    match tokio::time::timeout(T, s.read(&mut buf)).await {
                        Ok(Ok(0)) => break,
                        Ok(Ok(n)) if s.write_all(&buf[..n]).await.is_ok() => {}
                        _ => return,
                    }
                }
                let _ = s.write_all(b"eof\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Connects (from `source` if given), reads the greeting line, sends `payload`, half-closes,
/// and returns (greeting, everything after it). Blocking.
pub fn echo_roundtrip(
    target: SocketAddr,
    source: Option<IpAddr>,
    payload: &[u8],
) -> anyhow::Result<(String, Vec<u8>)> {
    let mut s = crate::servers::connect_from(source, target, T)?;
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

/// A UDP backend answering each datagram with `"<name>:" + datagram`.
pub async fn udp_echo(addr: SocketAddr, name: &str) -> SocketAddr {
    udp_echo_on(std::net::UdpSocket::bind(addr).expect("bind udp backend"), name)
}

/// [`udp_echo`] on a socket bound elsewhere (e.g. inside a namespace). Needs a runtime.
pub fn udp_echo_on(sock: std::net::UdpSocket, name: &str) -> SocketAddr {
    sock.set_nonblocking(true).expect("nonblocking");
    let sock = UdpSocket::from_std(sock).expect("tokio socket");
    let addr = sock.local_addr().unwrap();
    let name = name.to_string();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from).await;
        }
    });
    addr
}

/// What a PROXY-protocol backend read before the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySeen {
    pub version: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The bytes after the header, up to the client's FIN.
    pub payload: Vec<u8>,
}

/// A backend that expects a PROXY header and reports it, parsed independently of lb's parser
/// (fixed offsets for v2, split on spaces for v1). Answers each connection with "ok\n".
pub async fn proxy_backend() -> (SocketAddr, mpsc::UnboundedReceiver<anyhow::Result<ProxySeen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy backend");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let r = tokio::time::timeout(T, s.read_to_end(&mut all)).await;
                let seen = match r {
                    Ok(Ok(_)) => read_proxy_header(&all),
                    _ => Err(anyhow::anyhow!("backend read failed or timed out")),
                };
                let _ = s.write_all(b"ok\n").await;
                let _ = tx.send(seen);
            });
        }
    });
    (addr, rx)
}

fn read_proxy_header(all: &[u8]) -> anyhow::Result<ProxySeen> {
    const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    if all.starts_with(SIG) {
        anyhow::ensure!(all.len() >= 16 && all[12] == 0x21, "v2 PROXY command expected");
        let len = u16::from_be_bytes([all[14], all[15]]) as usize;
        let b = &all[16..16 + len];
        let (src, dst) = match all[13] {
            0x11 => {
                let ip = |i: usize| IpAddr::from([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                (SocketAddr::new(ip(0), port(8)), SocketAddr::new(ip(4), port(10)))
            }
            0x21 => {
                let ip = |i: usize| IpAddr::from(<[u8; 16]>::try_from(&b[i..i + 16]).unwrap());
                let port = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
                (SocketAddr::new(ip(0), port(32)), SocketAddr::new(ip(16), port(34)))
            }
            f => anyhow::bail!("unexpected v2 family {f:#x}"),
        };
        return Ok(ProxySeen { version: 2, src, dst, payload: all[16 + len..].to_vec() });
    }
    let end = all.windows(2).position(|w| w == b"\r\n").ok_or(anyhow::anyhow!("no CRLF"))?;
    let line = std::str::from_utf8(&all[..end])?;
    let f: Vec<&str> = line.split(' ').collect();
    anyhow::ensure!(f.len() == 6 && f[0] == "PROXY", "not a v1 line: {line:?}");
    let src = SocketAddr::new(f[2].parse()?, f[4].parse()?);
    let dst = SocketAddr::new(f[3].parse()?, f[5].parse()?);
    Ok(ProxySeen { version: 1, src, dst, payload: all[end + 2..].to_vec() })
}

/// `lb run` as a child process inside a namespace, optionally as another user (setpriv);
/// SIGTERM then SIGKILL on drop.
pub struct LbProcess {
    pub child: std::process::Child,
    config: std::path::PathBuf,
}

impl LbProcess {
    /// Starts `lb run --config` with `config` in `ns` as `uid` (and gid) if given; returns once
    /// `ready` succeeds (polled for at most 20 s) or fails if lb exits first.
    pub fn start(
        ns: &crate::netns::Netns,
        config: &str,
        uid: Option<u32>,
        ready: impl Fn() -> bool,
    ) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("{}-l4.toml", ns.name));
        std::fs::write(&path, config)?;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns.name]);
        if let Some(uid) = uid {
            cmd.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]);
        }
        let child = cmd
            .arg(crate::lb::lb_binary()?)
            .args(["run", "--config"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let mut lb = Self { child, config: path };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Some(status) = lb.child.try_wait()? {
                anyhow::bail!("lb run exited early with {status}");
            }
            if ready() {
                return Ok(lb);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        anyhow::bail!("lb run did not become ready within 20 s")
    }

    /// The real and effective uid of the running daemon, from /proc.
    pub fn uids(&self) -> anyhow::Result<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or_default();
        Ok(line.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    pub fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
        let _ = std::fs::remove_file(&self.config);
    }
}
