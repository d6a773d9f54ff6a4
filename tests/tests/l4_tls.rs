//! TLS passthrough routed by SNI, end to end on loopback with real rustls clients and backends
//! that each terminate TLS with their own certificate; mixed with termination by an L7 TLS
//! listener (a rustls acceptor behind the hand-off) on the same port. No root needed.
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use lb_tests::{
    T,
    backends::{TlsBackend, echo_backend, serve_tls},
    client::read_silently,
    conf,
    l4::{L4Harness, RELAYS, relay_key},
    tls::{TlsSeen, cert, client_config, refragment, server_config, tls_client, trickle, whole},
};
use lb_user::l4::{ErrorKind, Handoff, Handoffs, Refused, TlsHandoff};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;

struct Setup {
    lb: L4Harness,
    db: TlsBackend,
    api: TlsBackend,
    fallback: TlsBackend,
    /// The certificate the L7 listener presents for *.example.com.
    l7_cert: CertificateDer<'static>,
    /// (sni, alpn) of every connection handed to the L7 listener.
    handed: mpsc::UnboundedReceiver<(Option<String>, Vec<Vec<u8>>, SocketAddr)>,
}

impl Setup {
    fn roots(&self) -> rustls::ClientConfig {
        client_config(&[&self.db.cert, &self.api.cert, &self.fallback.cert, &self.l7_cert])
    }
}

/// The listeners with `edge` relaying by `relay` (one of [`RELAYS`]).
async fn setup_with(relay: &str) -> Setup {
    let db = TlsBackend::start("db", &["db.example.com"]).await;
    let api = TlsBackend::start("api", &["*.api.example.com"]).await;
    let fallback = TlsBackend::start("fallback", &["fallback.test"]).await;
    let echo = echo_backend("127.0.0.1:0".parse().unwrap(), "echo").await;

    // The L7 side: a rustls acceptor with its own certificate, reached through the hand-off.
    let (l7_cert, l7_key) = cert(&["*.example.com", "queued.example.org"]);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config(&l7_cert, &l7_key));
    let (seen_tx, handed) = mpsc::unbounded_channel();
    let acc = acceptor.clone();
    let public = move |c: Handoff| -> Result<(), Refused> {
        let _ = seen_tx.send((c.sni.clone(), c.alpn.clone(), c.client));
        let acc = acc.clone();
        tokio::spawn(async move { serve_tls(acc, c.stream, "l7").await });
        Ok(())
    };
    // The other shape of hand-off: a bounded queue read by an accept loop.
    let (queue_tx, mut queue_rx) = mpsc::channel::<Handoff>(16);
    tokio::spawn(async move {
        while let Some(c) = queue_rx.recv().await {
            tokio::spawn(serve_tls(acceptor.clone(), c.stream, "queued"));
        }
    });
    let mut handoffs = Handoffs::new();
    handoffs.insert("public".into(), Arc::new(public) as Arc<dyn TlsHandoff>);
    handoffs.insert("queue".into(), Arc::new(queue_tx) as Arc<dyn TlsHandoff>);

    let db_route = "{ host = \"db.example.com\", upstream = \"db\", passthrough = true }";
    let edge = format!(
        "sni = [ {db_route},\n        {{ host = \"*.api.example.com\", upstream = \"api\", passthrough = true }},\n        {{ host = \"*.example.com\", terminate = \"public\" }},\n        {{ host = \"queued.example.org\", terminate = \"queue\" }} ]\nupstream = \"fallback\"\npeek_timeout = 2\n{}",
        relay_key(relay)
    );
    let config = [
        conf::upstream("db", &conf::list([db.addr])),
        conf::upstream("api", &conf::list([api.addr])),
        conf::upstream("fallback", &conf::list([fallback.addr])),
        conf::upstream("echo", &conf::list([echo])),
        conf::tcp("edge", "127.0.0.1:0", &edge),
        conf::tcp(
            "strict",
            "127.0.0.1:0",
            &format!("sni = [ {db_route} ]\npeek_timeout = 0.5\nzero_copy = false\n"),
        ),
        conf::tcp(
            "plainish",
            "127.0.0.1:0",
            &format!("sni = [ {db_route} ]\nupstream = \"echo\"\n"),
        ),
    ]
    .concat();
    let lb = L4Harness::start(&config, handoffs).await;
    lb.expect_relay("edge", relay);
    Setup { lb, db, api, fallback, l7_cert, handed }
}

async fn setup() -> Setup {
    setup_with("kernel").await
}

/// Runs a blocking TLS client off the runtime.
async fn client(
    addr: SocketAddr,
    sni: &'static str,
    config: rustls::ClientConfig,
    send: impl FnOnce(&mut std::net::TcpStream, &[u8]) + Send + 'static,
) -> TlsSeen {
    tokio::task::spawn_blocking(move || tls_client(addr, sni, config, send))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("TLS client for {sni}: {e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_sni_and_the_client_sees_the_backend_certificate() {
    let s = setup().await;
    let edge = s.lb.addr("edge");
    let db = client(edge, "db.example.com", s.roots(), whole).await;
    assert_eq!(db.cert, s.db.cert, "the db backend's own certificate");
    assert_eq!(db.line, "db sni=db.example.com alpn=-");
    assert_eq!(db.echo, "ping through the tunnel");
    let api = client(edge, "v2.api.example.com", s.roots(), whole).await;
    assert_eq!(api.cert, s.api.cert);
    assert!(api.line.starts_with("api sni=v2.api.example.com"), "{}", api.line);
    assert_ne!(s.db.cert, s.api.cert);
    s.lb.wait_for("edge", "2 relayed", |st| st.relayed.load(Ordering::Relaxed) == 2).await;
    let st = s.lb.stats("edge");
    assert!(st.bytes_to_backend.load(Ordering::Relaxed) > 500);
    assert!(st.bytes_to_client.load(Ordering::Relaxed) > 500);
    s.lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_one_byte_at_a_time_and_over_many_records_by_each_relay() {
    for mode in RELAYS {
        hello_in_pieces(mode).await;
    }
}

async fn hello_in_pieces(mode: &str) {
    let s = setup_with(mode).await;
    let edge = s.lb.addr("edge");
    let one = client(edge, "db.example.com", s.roots(), trickle).await;
    assert_eq!(one.cert, s.db.cert);
    // 40-byte records, sent whole.
    let recs = client(edge, "db.example.com", s.roots(), |tcp, hello| {
        let r = refragment(hello, 40);
        let records = (r.len() - hello.len()) / 5 + 1;
        assert!(records >= 4, "{records} records for {} bytes", hello.len());
        tcp.write_all(&r).unwrap();
    })
    .await;
    assert_eq!(recs.cert, s.db.cert);
    // Both at once: 3-byte records written one byte per segment.
    let both = client(edge, "x.api.example.com", s.roots(), |tcp, hello| {
        trickle(tcp, &refragment(hello, 3))
    })
    .await;
    assert_eq!(both.cert, s.api.cert);
    assert_eq!(s.lb.stats("edge").errors(ErrorKind::BadClientHello), 0);
    s.lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_client_hello_spanning_several_records() {
    let s = setup().await;
    let mut config = s.roots();
    // ~40 KiB of ALPN protocols: rustls splits the ClientHello into 16 KiB records.
    config.alpn_protocols =
        (0..200).map(|i| format!("proto-{i:03}-{}", "x".repeat(190)).into_bytes()).collect();
    config.alpn_protocols.push(b"lb-test".to_vec());
    let seen = client(s.lb.addr("edge"), "db.example.com", config, |tcp, hello| {
        assert!(hello.len() > 3 * 13_000, "ClientHello of {} bytes", hello.len());
        let records = refragment(hello, 1 << 14).len() - hello.len();
        assert_eq!(records, 0, "rustls already used records of at most 2^14");
        tcp.write_all(hello).unwrap();
    })
    .await;
    assert_eq!(seen.cert, s.db.cert);
    assert_eq!(seen.line, "db sni=db.example.com alpn=lb-test");
    s.lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sni_goes_to_the_default_upstream() {
    let s = setup().await;
    let mut config = s.roots();
    config.enable_sni = false;
    let seen = client(s.lb.addr("edge"), "fallback.test", config, whole).await;
    assert_eq!(seen.cert, s.fallback.cert);
    assert_eq!(seen.line, "fallback sni=- alpn=-");
    // An SNI no route names also goes there.
    let mut config = s.roots();
    config.enable_sni = true;
    let seen = client(s.lb.addr("edge"), "fallback.test", config, whole).await;
    assert_eq!(seen.cert, s.fallback.cert);
    s.lb.stop().await;
}

/// Sends `bytes` and returns what came back before the proxy closed the connection.
fn send_and_read(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    let _ = tcp.write_all(bytes);
    // The FIN tells a proxy still waiting for more that no more comes.
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    // A reset is a close too.
    let _ = tcp.read_to_end(&mut back);
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_closed_and_counted_never_a_panic() {
    let s = setup().await;
    let (edge, strict, plain) = (s.lb.addr("edge"), s.lb.addr("strict"), s.lb.addr("plainish"));
    let out = tokio::task::spawn_blocking(move || {
        // Looks like a TLS handshake record, but a ServerHello inside: closed, not relayed.
        let a = send_and_read(edge, &[22, 3, 1, 0, 4, 2, 0, 0, 0]);
        // 200 random buffers that start like TLS: each closed, none relayed.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..200 {
            let mut g = vec![22u8, 3, 1];
            for _ in 0..(i % 60) + 2 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                g.push(x as u8);
            }
            // Keep the record length plausible so the parser sees the body.
            g[3] = 0;
            if g.len() > 4 {
                g[4] = (g.len() - 5) as u8;
            }
            let back = send_and_read(edge, &g);
            assert!(back.is_empty(), "garbage {i} got an answer");
        }
        // Not TLS at all, on a listener without a default upstream: closed.
        let b = send_and_read(strict, b"GET / HTTP/1.1\r\n\r\n");
        // Not TLS, with a default upstream: relayed there (the listener's contract).
        let c = send_and_read(plain, b"hello");
        (a, b, c)
    })
    .await
    .unwrap();
    assert!(out.0.is_empty() && out.1.is_empty());
    assert_eq!(out.2, b"echo\nhelloeof\n");
    s.lb.wait_for("edge", "201 bad ClientHellos", |st| {
        let e = |k| st.errors(k);
        e(ErrorKind::BadClientHello) + e(ErrorKind::EarlyEof) + e(ErrorKind::PeekTimeout) == 201
    })
    .await;
    assert!(s.lb.stats("edge").errors(ErrorKind::BadClientHello) >= 150);
    assert_eq!(s.lb.stats("edge").relayed.load(Ordering::Relaxed), 0);
    s.lb.wait_for("strict", "not_tls", |st| st.errors(ErrorKind::NotTls) == 1).await;

    // Silence: closed after peek_timeout (0.5 s) and counted.
    let back = tokio::task::spawn_blocking(move || read_silently(strict)).await.unwrap().unwrap();
    assert!(back.is_empty());
    s.lb.wait_for("strict", "peek_timeout", |st| st.errors(ErrorKind::PeekTimeout) == 1).await;
    // A TLS client whose SNI has no route and no default: closed, counted.
    let cfg = s.roots();
    let r = tokio::task::spawn_blocking(move || tls_client(strict, "nope.example.net", cfg, whole))
        .await
        .unwrap();
    assert!(r.is_err());
    s.lb.wait_for("strict", "no_route", |st| st.errors(ErrorKind::NoRoute) == 1).await;
    s.lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_and_termination_share_one_port() {
    let mut s = setup().await;
    let edge = s.lb.addr("edge");
    let mut cfg = s.roots();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"lb-test".to_vec()];
    let l7 = client(edge, "www.example.com", cfg, whole).await;
    assert_eq!(l7.cert, s.l7_cert, "terminated by the L7 listener with its own certificate");
    assert_eq!(l7.line, "l7 sni=www.example.com alpn=lb-test");
    assert_eq!(l7.echo, "ping through the tunnel");
    let db = client(edge, "db.example.com", s.roots(), trickle).await;
    assert_eq!(db.cert, s.db.cert, "same port, passthrough");
    let q = client(edge, "queued.example.org", s.roots(), whole).await;
    assert_eq!(q.cert, s.l7_cert);
    assert!(q.line.starts_with("queued sni=queued.example.org"), "{}", q.line);

    let (sni, alpn, from) = s.handed.recv().await.unwrap();
    assert_eq!(sni.as_deref(), Some("www.example.com"));
    assert_eq!(alpn, [b"h2".to_vec(), b"lb-test".to_vec()]);
    assert!(from.ip().is_loopback());
    s.lb.wait_for("edge", "2 handed off, 1 relayed", |st| {
        st.handed_off.load(Ordering::Relaxed) == 2 && st.relayed.load(Ordering::Relaxed) == 1
    })
    .await;
    s.lb.stop().await;
}
