//! TLS termination (SNI exact and wildcard, ALPN h2 and http/1.1, reload), h2c downstream, and
//! TLS / HTTP/2 to backends, with certificates generated in the test.
use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_tests::http::{Backend, Proxy, Reply, WAIT, read, temp_dir, tls_client, write_cert};
use rustls_pki_types::{ServerName, pem::PemObject as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Handshakes with `sni`, returns the certificate the proxy chose and the negotiated ALPN.
async fn handshake(
    addr: SocketAddr,
    sni: &str,
    client: Arc<rustls::ClientConfig>,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>, Option<Vec<u8>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        TlsConnector::from(client).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp),
    )
    .await
    .unwrap()
    .expect("handshake");
    let (_, conn) = tls.get_ref();
    let cert = conn.peer_certificates().unwrap()[0].to_vec();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    (tls, cert, alpn)
}

async fn h2_get(
    io: impl hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    uri: &str,
) -> Reply {
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get(uri).body(Full::<Bytes>::default()).unwrap();
    read(tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap()).await
}

async fn h1_get(
    io: impl hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    host: &str,
) -> Reply {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/").header("host", host).body(Full::<Bytes>::default()).unwrap();
    read(tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sni_alpn_and_reload() {
    let dir = temp_dir("tls");
    let a = write_cert(&dir, "a", &["a.test"]);
    let w = write_cert(&dir, "w", &["*.wild.test"]);
    let backend = Backend::start("b").await;
    let cfg = format!(
        r#"
[[http.listener]]
name = "tls"
listen = "127.0.0.1:0"
tls = [{{ cert = {:?}, key = {:?} }}, {{ cert = {:?}, key = {:?} }}]
[[http.route]]
listener = "tls"
upstream = "u"
[upstream.u]
backends = ["{}"]
"#,
        a.cert, a.key, w.cert, w.key, backend.addr
    );
    let p = Proxy::start(&cfg).await;
    let addr = p.addr();
    let roots = [a.der.as_slice(), w.der.as_slice()];

    // Exact name, ALPN h2.
    let (tls, cert, alpn) =
        handshake(addr, "a.test", tls_client(&roots, &[b"h2", b"http/1.1"])).await;
    assert_eq!(cert, a.der);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let r = h2_get(TokioIo::new(tls), "https://a.test/").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"));
    let seen = backend.last_seen();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "a.test");
    assert_eq!(seen.version, Version::HTTP_11, "h2 downstream, HTTP/1.1 to the backend");

    // Wildcard, ALPN http/1.1.
    let (tls, cert, alpn) =
        handshake(addr, "x.wild.test", tls_client(&roots, &[b"http/1.1"])).await;
    assert_eq!(cert, w.der);
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1_get(TokioIo::new(tls), "x.wild.test").await.body, "b");

    // Reload: new certificate files take effect for new handshakes.
    let a2 = write_cert(&dir, "a", &["a.test"]);
    p.servers[0].reload_tls().unwrap();
    let (_, cert, _) = handshake(addr, "a.test", tls_client(&[a2.der.as_slice()], &[b"h2"])).await;
    assert_eq!(cert, a2.der);

    // TLS 1.2 only clients are served too.
    let mut store = rustls::RootCertStore::empty();
    store.add(a2.der.clone().into()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls12 = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let (tls, _, _) = handshake(addr, "a.test", Arc::new(tls12)).await;
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    p.stop().await;
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_downstream() {
    let backend = Backend::start("b").await;
    let p = Proxy::start(&lb_tests::http::config(&[backend.addr], "", "")).await;
    let tcp = TcpStream::connect(p.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // Several concurrent streams on one connection.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let req =
            Request::get(format!("http://h2c.test/{i}")).body(Full::<Bytes>::default()).unwrap();
        let fut = sender.send_request(req);
        tasks.push(tokio::spawn(async move { read(fut.await.unwrap()).await }));
    }
    for t in tasks {
        assert_eq!(tokio::time::timeout(WAIT, t).await.unwrap().unwrap().body, "b");
    }
    assert_eq!(backend.last_seen().headers["host"], "h2c.test", "Host from :authority");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_h2_to_backends_with_verification() {
    let dir = temp_dir("up-tls");
    let cert = write_cert(&dir, "backend", &["backend.test"]);
    let server_config = |alpn: &[&[u8]]| {
        let chain = vec![rustls_pki_types::CertificateDer::from(cert.der.clone())];
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&cert.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(c)
    };
    let h2_backend = Backend::start_tls("h2tls", server_config(&[b"h2"])).await;
    let h1_backend = Backend::start_tls("h1tls", server_config(&[b"http/1.1"])).await;
    let plain_h2 = Backend::start("h2c").await;
    let cfg = format!(
        r#"
[[http.listener]]
name = "l"
listen = "127.0.0.1:0"
[[http.route]]
listener = "l"
path = "/h2"
upstream = "h2"
[[http.route]]
listener = "l"
path = "/h1"
upstream = "h1"
[[http.route]]
listener = "l"
path = "/h2c"
upstream = "h2c"
[[http.route]]
listener = "l"
path = "/badsni"
upstream = "bad"
[upstream.h2]
backends = ["{h2}"]
http2 = true
tls = {{ sni = "backend.test", ca = {ca:?} }}
[upstream.h1]
backends = ["{h1}"]
tls = {{ sni = "backend.test", ca = {ca:?} }}
[upstream.h2c]
backends = ["{h2c}"]
http2 = true
[upstream.bad]
backends = ["{h1}"]
tls = {{ sni = "other.test", ca = {ca:?} }}
"#,
        h2 = h2_backend.addr,
        h1 = h1_backend.addr,
        h2c = plain_h2.addr,
        ca = cert.cert
    );
    let p = Proxy::start(&cfg).await;
    let r = lb_tests::http::get(p.addr(), "x", "/h2").await;
    assert_eq!(r.body, "h2tls");
    assert_eq!(h2_backend.last_seen().version, Version::HTTP_2);
    let r = lb_tests::http::get(p.addr(), "x", "/h1").await;
    assert_eq!(r.body, "h1tls");
    assert_eq!(h1_backend.last_seen().version, Version::HTTP_11);
    let r = lb_tests::http::get(p.addr(), "x", "/h2c").await;
    assert_eq!(r.body, "h2c");
    assert_eq!(plain_h2.last_seen().version, Version::HTTP_2);
    // The certificate does not name other.test: verification fails, nothing is sent.
    let before = h1_backend.requests.load(std::sync::atomic::Ordering::Relaxed);
    let r = lb_tests::http::get(p.addr(), "x", "/badsni").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(h1_backend.requests.load(std::sync::atomic::Ordering::Relaxed), before);
    p.stop().await;
    std::fs::remove_dir_all(dir).ok();
}
