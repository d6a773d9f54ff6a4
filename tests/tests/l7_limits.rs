//! Limits an attacker cannot walk around (issue 11 item 4): a stalled request body, a client
//! that stops reading, an idle tunnel, the per-backend cap, HTTP/2 stream limits.
use std::{sync::atomic::Ordering, time::Duration};

use lb_tests::http::{Backend, Proxy, WAIT, config, scripted_backend};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("closed in time").ok();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_never_ejects_the_backend() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "eject_after = 1", "body_timeout_ms = 300")).await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc").await.unwrap();
    let resp = String::from_utf8_lossy(&read_all(&mut s).await).into_owned();
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp:?}");
    let backend = &p.groups["u"].backends()[0];
    assert!(!backend.ejected.load(Ordering::Relaxed), "a slow client is not the backend's fault");
    let ok = lb_tests::http::get(p.addr(), "x", "/").await;
    assert_eq!(ok.body, "a");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n".to_vec();
    big.resize(big.len() + 64 * 1024 * 1024, b'x');
    let (backend, _) = scripted_backend(Box::leak(big.into_boxed_slice())).await;
    let p = Proxy::start(&config(&[backend], "", "stream_idle_timeout_ms = 300")).await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    // Read nothing while the proxy's writes fill the socket buffers, then drain what came.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = read_all(&mut s).await;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    assert!(got.len() < 64 * 1024 * 1024, "the whole body went through: {}", got.len());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_is_closed() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&config(&[b.addr], "", "tunnel_idle_timeout_ms = 300")).await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, c.read(&mut buf)).await.unwrap().unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 101"));
    c.write_all(b"ping").await.unwrap();
    let n = tokio::time::timeout(WAIT, c.read(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf[..n], b"ping");
    // Then silence: the proxy closes the tunnel.
    let rest = read_all(&mut c).await;
    assert!(rest.is_empty(), "{rest:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_backend_cap_answers_503_beyond_it() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "max_connections_per_backend = 1", "")).await;
    let addr = p.addr();
    let slow = tokio::spawn(async move { lb_tests::http::get(addr, "x", "/slow/1000").await });
    for _ in 0..100 {
        if a.requests.load(Ordering::Relaxed) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.requests.load(Ordering::Relaxed), 1, "the first request is in flight");
    let second = lb_tests::http::get(addr, "x", "/").await;
    assert_eq!(second.status, hyper::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(slow.await.unwrap().status, hyper::StatusCode::OK);
    let third = lb_tests::http::get(addr, "x", "/").await;
    assert_eq!(third.status, hyper::StatusCode::OK, "room again once the first is done");
    p.stop().await;
}

/// The SETTINGS frame an h2c client gets first carries the stream limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_announces_its_stream_limit() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "h2_max_concurrent_streams = 7")).await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(WAIT, s.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!(head[3], 4, "SETTINGS first");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut payload)).await.unwrap().unwrap();
    let streams = payload
        .chunks(6)
        .find(|p| p[..2] == [0, 3])
        .map(|p| u32::from_be_bytes([p[2], p[3], p[4], p[5]]));
    assert_eq!(streams, Some(7));
    // A client that never ACKs the SETTINGS would hold the drain for the whole grace period.
    drop(s);
    p.stop().await;
}
