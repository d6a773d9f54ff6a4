//! Load the benchmark tools cannot give: TLS full handshakes per second (rustls client,
//! resumption off), and thousands of idle keep-alive connections held open.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::netns::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// New TLS connections per second from `ns` to `addr`: `conns` loops, each connecting, doing a
/// full handshake (TLS 1.3, no session resumption), sending one `Connection: close` GET and
/// reading the response until the server closes. Returns (connections/s, failures).
pub fn tls_connections(
    ns: &Netns,
    addr: SocketAddr,
    root_der: &[u8],
    conns: usize,
    secs: u32,
) -> anyhow::Result<(f64, u64)> {
    let config = client_config(root_der)?;
    ns.run(move || -> anyhow::Result<(f64, u64)> {
        // Two client threads, like the balancers' two workers (wrk/h2load use one thread but
        // a TLS client does as much work per handshake as the server).
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs.into());
        rt.block_on(async {
            let tasks: Vec<_> = (0..conns)
                .map(|_| {
                    let (config, ok, failed) = (config.clone(), ok.clone(), failed.clone());
                    tokio::spawn(async move {
                        let connector = tokio_rustls::TlsConnector::from(config);
                        while Instant::now() < deadline {
                            let r = tokio::time::timeout(
                                Duration::from_secs(2),
                                one_tls_request(&connector, addr),
                            )
                            .await;
                            let counter = if matches!(r, Ok(Ok(()))) { &ok } else { &failed };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        });
        let elapsed = start.elapsed().as_secs_f64();
        Ok((ok.load(Ordering::Relaxed) as f64 / elapsed, failed.load(Ordering::Relaxed)))
    })?
}

fn client_config(root_der: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls_pki_types::CertificateDer::from(root_der.to_vec()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.resumption = rustls::client::Resumption::disabled();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

async fn one_tls_request(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(super::peers::SERVER_NAME)?;
    let mut tls = connector.connect(name, tcp).await?;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        super::peers::SERVER_NAME
    );
    tls.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    // A server may close without close_notify: what was read before counts.
    let _ = tls.read_to_end(&mut buf).await;
    anyhow::ensure!(buf.starts_with(b"HTTP/1.1 200"), "no 200 response");
    Ok(())
}

/// Idle keep-alive connections, each after one completed request; they close (with RST, so
/// the client keeps no TIME_WAIT) when dropped.
pub struct Idle(pub Vec<TcpStream>);

impl Drop for Idle {
    fn drop(&mut self) {
        for s in &self.0 {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Opens `n` connections from `ns` to `addr` on 8 threads, sends one keep-alive GET on each and
/// reads its response; returns the ones that got a 200. Gives up after 60 s (a proxy that
/// stops serving new connections would otherwise cost 5 s per attempt).
pub fn idle_connections(ns: &Netns, addr: SocketAddr, n: usize) -> anyhow::Result<Idle> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let streams = ns.run(move || {
        let threads = 8;
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        (t..n)
                            .step_by(threads)
                            .take_while(|_| Instant::now() < deadline)
                            .filter_map(|_| one_keepalive(addr).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect::<Vec<_>>()
        })
    })?;
    Ok(Idle(streams))
}

fn one_keepalive(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", super::peers::SERVER_NAME).as_bytes(),
    )?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let k = s.read(&mut chunk)?;
        anyhow::ensure!(k > 0, "closed before the response ended");
        buf.extend_from_slice(&chunk[..k]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            anyhow::ensure!(head.starts_with("http/1.1 200"), "not a 200 response");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Ok(s);
            }
        }
    }
}
