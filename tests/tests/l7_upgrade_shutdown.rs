//! WebSocket (Upgrade) end to end, no bytes forwarded before the backend's 101, and graceful
//! shutdown with requests in flight.
use std::{net::SocketAddr, time::Duration};

use lb_tests::http::{Backend, Proxy, WAIT, config, get};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b)).await.expect("head in time").unwrap();
        assert_eq!(n, 1, "closed before the end of the head: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A raw backend: reads the upgrade request, reports whether any byte followed it within
/// 200 ms (it must not: the proxy holds them until the 101), answers 101 and echoes.
async fn raw_ws_backend() -> (SocketAddr, oneshot::Receiver<(String, usize)>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let head = read_head(&mut s).await;
        let mut early = [0u8; 64];
        let early_n =
            match tokio::time::timeout(Duration::from_millis(200), s.read(&mut early)).await {
                Ok(Ok(n)) => n,
                _ => 0,
            };
        let _ = tx.send((head, early_n));
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echoes_and_holds_early_bytes() {
    let (backend, report) = raw_ws_backend().await;
    let p = Proxy::start(&config(&[backend], "", "")).await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    // The request and the first frame bytes in one write.
    c.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\nearly",
    )
    .await
    .unwrap();
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"), "{head}");
    let (backend_head, early) = tokio::time::timeout(WAIT, report).await.unwrap().unwrap();
    assert_eq!(early, 0, "bytes reached the backend before its 101");
    let lower = backend_head.to_ascii_lowercase();
    assert!(
        lower.contains("connection: upgrade") && lower.contains("upgrade: websocket"),
        "{backend_head}"
    );
    assert!(lower.contains("sec-websocket-key: dghlihnhbxbszsbub25jzq=="), "{backend_head}");
    // The early bytes come back first, then a later message.
    let mut buf = [0u8; 5];
    tokio::time::timeout(WAIT, c.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"early");
    c.write_all(b"ping!").await.unwrap();
    tokio::time::timeout(WAIT, c.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ping!");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_hyper_backend() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&config(&[b.addr], "", "")).await;
    let mut c = TcpStream::connect(p.addr()).await.unwrap();
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    assert!(read_head(&mut c).await.starts_with("HTTP/1.1 101"));
    for msg in [&b"one"[..], b"two", b"three"] {
        c.write_all(msg).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(WAIT, c.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(buf, msg);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&config(&[b.addr], "", "grace_ms = 5000")).await;
    let addr = p.addr();
    let in_flight = tokio::spawn(async move { get(addr, "x", "/slow/500").await });
    // Wait until the request is at the backend.
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.requests.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = tokio::spawn(p.stop());
    let r = tokio::time::timeout(WAIT, in_flight).await.unwrap().unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "b"));
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
    // The listener is closed: new connections are refused.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_bounds_the_drain() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&config(&[b.addr], "", "grace_ms = 200")).await;
    let addr = p.addr();
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /slow/20000 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while b.requests.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // stop() itself asserts it returns within WAIT, long before the 20 s request would end.
    p.stop().await;
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut out)).await.expect("closed").ok();
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
}
