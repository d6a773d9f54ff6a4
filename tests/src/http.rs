//! L7 test helpers on loopback (no root): hyper backends that report what they saw, the L7
//! proxy running in-process from a config, and clients (hyper h1/h2, raw bytes, TLS).
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Version, body::Incoming, header, service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use lb_user::{config::Config, upstream::Groups};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// Bound on every wait in these helpers.
pub const WAIT: Duration = Duration::from_secs(10);

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: Version,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An HTTP/1.1 + h2c backend on 127.0.0.1 answering with its name. Paths: `/slow/MS` waits MS
/// milliseconds first, `/echo` returns the request body, `/ws` switches protocols and echoes.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub requests: Arc<AtomicU64>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicU64>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        Self::serve(listener, name, None, Duration::ZERO)
    }

    /// A backend on a listener the caller bound (an IPv6 address, say).
    pub fn serve_on(listener: TcpListener, name: &str) -> Self {
        Self::serve(listener, name, None, Duration::ZERO)
    }

    /// A backend that takes `delay` for every response.
    pub async fn start_slow(name: &str, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        Self::serve(listener, name, None, delay)
    }

    /// A backend speaking TLS with `config` (h1 or h2 by ALPN).
    pub async fn start_tls(name: &str, config: Arc<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        Self::serve(listener, name, Some(tokio_rustls::TlsAcceptor::from(config)), Duration::ZERO)
    }

    fn serve(
        listener: TcpListener,
        name: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
        delay: Duration,
    ) -> Self {
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, c, s, n) = (requests.clone(), connections.clone(), seen.clone(), name.to_string());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::Relaxed);
                let (r, s, n, tls) = (r.clone(), s.clone(), n.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        backend_handle(req, n.clone(), r.clone(), s.clone(), delay)
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acc) => {
                            if let Ok(tls) = acc.accept(stream).await {
                                let _ = builder
                                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Self { addr, name: name.to_string(), requests, connections, seen, task }
    }

    pub fn last_seen(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().expect("the backend saw a request")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend_handle(
    mut req: Request<Incoming>,
    name: String,
    requests: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    delay: Duration,
) -> Result<Response<Full<Bytes>>, Infallible> {
    requests.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(delay).await;
    let path = req.uri().path().to_string();
    if path == "/ws" {
        let up = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = up.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    seen.lock().unwrap().push(Seen {
        version: parts.version,
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    let out = if path == "/echo" { body } else { Bytes::from(name) };
    Ok(Response::builder()
        .header("x-backend-hop", "1")
        .header(header::CONNECTION, "x-backend-hop")
        .body(Full::new(out))
        .unwrap())
}

/// The L7 proxy running in-process, every listener bound as configured (use port 0).
pub struct Proxy {
    /// Listener name → bound address.
    pub addrs: HashMap<String, SocketAddr>,
    pub groups: Groups,
    pub servers: Vec<Arc<lb_user::l7::Server>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<std::io::Result<()>>>,
}

impl Proxy {
    pub async fn start(config: &str) -> Self {
        let config = Config::parse(config).expect("valid config");
        let groups = lb_user::upstream::groups(&config.upstream);
        let servers = lb_user::l7::build(&config, &groups).expect("build l7");
        let (shutdown, rx) = watch::channel(false);
        let mut addrs = HashMap::new();
        let mut tasks = Vec::new();
        for s in &servers {
            let listener = s.bind().await.expect("bind listener");
            addrs.insert(s.name.clone(), listener.local_addr().unwrap());
            tasks.push(tokio::spawn(s.clone().run(listener, rx.clone())));
        }
        Self { addrs, groups, servers, shutdown, tasks }
    }

    pub fn addr(&self) -> SocketAddr {
        *self.addrs.values().next().expect("one listener")
    }

    /// Asks every listener to stop and waits (bounded) until they have drained.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            tokio::time::timeout(WAIT, t).await.expect("drained in time").unwrap().unwrap();
        }
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// Sends `req` over a fresh HTTP/1.1 connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let resp = tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    read(resp).await
}

pub async fn read(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(WAIT, body.collect()).await.expect("body in time");
    let body = String::from_utf8_lossy(&body.expect("body").to_bytes()).into_owned();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// `GET path` with a Host header over a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    let req = Request::get(path).header(header::HOST, host).body(Full::default()).unwrap();
    send(addr, req).await
}

/// Writes `bytes`, then reads until the proxy closes the connection (bounded by [`WAIT`]).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("closed in time").ok();
    String::from_utf8_lossy(&out).into_owned()
}

/// A config with one plain listener `l` routing everything to upstream `u` over `backends`,
/// plus `extra` TOML appended (more `[http]` keys go in `http_keys`).
pub fn config(backends: &[SocketAddr], upstream_keys: &str, http_keys: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        r#"
[http]
{http_keys}
[[http.listener]]
name = "l"
listen = "127.0.0.1:0"
[[http.route]]
listener = "l"
upstream = "u"
[upstream.u]
backends = [{}]
{upstream_keys}
"#,
        list.join(", ")
    )
}

/// A self-signed certificate for `names`, written under a fresh temp directory.
pub struct TestCert {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub der: Vec<u8>,
}

pub fn write_cert(dir: &std::path::Path, stem: &str, names: &[&str]) -> TestCert {
    let c =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("rcgen");
    std::fs::create_dir_all(dir).unwrap();
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
    TestCert { cert, key, der: c.cert.der().to_vec() }
}

/// A unique temp directory for this test run.
pub fn temp_dir(test: &str) -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "lb-l7-{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A TLS client config trusting exactly `roots` (DER), offering `alpn`.
pub fn tls_client(roots: &[&[u8]], alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(rustls_pki_types::CertificateDer::from(r.to_vec())).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// A backend on 127.0.0.1 that reads each request head and answers it with `response` as is
/// (raw bytes: trailers, odd framing), reporting every head it read.
pub async fn scripted_backend(
    response: &'static [u8],
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(Ok(n)) = tokio::time::timeout(WAIT, s.read(&mut chunk)).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// An HTTP/2 client connection (h2c by prior knowledge) to `addr`.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// A config with one plain listener `l`: requests matching `first` (route keys such as
/// `host = "a.test"` or `path = "/admin"`) go to upstream `a`, all others to `b`.
pub fn two_routes(http_keys: &str, first: &str, a: SocketAddr, b: SocketAddr) -> String {
    format!(
        r#"
[http]
{http_keys}
[[http.listener]]
name = "l"
listen = "127.0.0.1:0"
[[http.route]]
listener = "l"
{first}
upstream = "a"
[[http.route]]
listener = "l"
upstream = "b"
[upstream.a]
backends = ["{a}"]
[upstream.b]
backends = ["{b}"]
"#
    )
}

/// A config with a plain listener `h2c` and a TLS listener `tls` (certificate `cert`), both
/// routing to upstream `u`: the HTTP/2 backend `backend`.
pub fn h2c_and_tls(backend: SocketAddr, cert: &TestCert) -> String {
    format!(
        r#"
[[http.listener]]
name = "h2c"
listen = "127.0.0.1:0"
[[http.listener]]
name = "tls"
listen = "127.0.0.1:0"
tls = [{{ cert = {:?}, key = {:?} }}]
[[http.route]]
listener = "h2c"
upstream = "u"
[[http.route]]
listener = "tls"
upstream = "u"
[upstream.u]
backends = ["{backend}"]
http2 = true
"#,
        cert.cert, cert.key
    )
}
