//! Strict HTTP/1 framing as raw bytes on a socket, limits and timeouts of the L7 proxy.
use std::{net::SocketAddr, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode, header};
use lb_tests::http::{Backend, Proxy, WAIT, config, get, raw, send};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_malformed_requests_get_400_and_are_not_forwarded() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "CL and TE",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "TE and CL",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        ),
        ("duplicate CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
        ("CL list", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello"),
        ("differing CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("invalid CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\nhello"),
        ("signed CL", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello"),
        ("TE not chunked", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("TE obfuscated", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("TE in 1.0", b"POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
        ("invalid header name", b"GET / HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n"),
        ("space in header name", b"GET / HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n"),
        ("double space in request line", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("junk after version", b"GET / HTTP/1.1 junk\r\nHost: x\r\n\r\n"),
        ("bad version", b"GET / HTTP/9.Z\r\nHost: x\r\n\r\n"),
        ("binary garbage", b"\x01\x02\x03 / HTTP/1.1\r\n\r\n"),
        ("bare LF in request line", b"GET /\nHTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    for (name, bytes) in cases {
        let resp = raw(p.addr(), bytes).await;
        assert!(status_line(&resp).starts_with("HTTP/1.1 400"), "{name}: got {resp:?}");
    }
    assert_eq!(a.requests.load(Ordering::Relaxed), 0, "nothing reached the backend");
    // Control: a well-formed request on the same listener works.
    let ok = raw(p.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(status_line(&ok).starts_with("HTTP/1.1 200"), "{ok}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_size_gets_400_and_closes() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    for body in [
        &b"zz\r\nhello\r\n0\r\n\r\n"[..],
        b"5;\x01\r\nhello\r\n0\r\n\r\n",
        b"fffffffffffffffffff\r\n",
    ] {
        let mut req =
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let resp = raw(p.addr(), &req).await;
        assert!(status_line(&resp).starts_with("HTTP/1.1 400"), "{body:?}: {resp:?}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_give_431() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "max_header_bytes = 8192\nmax_headers = 20")).await;
    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..30 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let resp = raw(p.addr(), &many).await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 431"), "count: {resp:?}");
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    let resp = raw(p.addr(), big.as_bytes()).await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 431"), "bytes: {resp:?}");
    assert_eq!(a.requests.load(Ordering::Relaxed), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_gives_413() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "max_body_bytes = 1000")).await;
    // Declared too large: refused before forwarding.
    let resp =
        raw(p.addr(), b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n").await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 413"), "{resp:?}");
    assert_eq!(a.requests.load(Ordering::Relaxed), 0);
    // Chunked past the limit: cut off while streaming.
    let mut req = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(format!("258\r\n{}\r\n", "b".repeat(600)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(p.addr(), &req).await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 413"), "{resp:?}");
    // Within the limit: fine.
    let ok = Request::post("/echo")
        .header(header::HOST, "x")
        .body(Full::new(Bytes::from("y".repeat(1000))))
        .unwrap();
    assert_eq!(send(p.addr(), ok).await.body.len(), 1000);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_time_out() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "header_timeout_ms = 300")).await;
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("closed by the proxy").ok();
    let text = String::from_utf8_lossy(&out);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert_eq!(a.requests.load(Ordering::Relaxed), 0);
    p.stop().await;
}

async fn wait_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("closed in time") {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "idle_timeout_ms = 300")).await;
    // HTTP/1.1: one request, then silence.
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    wait_closed(&mut s).await;
    // h2c: a connection with no stream gets GOAWAY and is closed.
    let s = TcpStream::connect(p.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(s),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("http://x/").body(Full::<Bytes>::default()).unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), StatusCode::OK);
    tokio::time::timeout(WAIT, conn).await.expect("h2 connection closed in time").unwrap().ok();
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_holds_further_clients() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "max_connections = 1")).await;
    let mut first = TcpStream::connect(p.addr()).await.unwrap();
    first.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(WAIT, first.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The second connection waits in the accept queue while the first is open.
    let mut second = TcpStream::connect(p.addr()).await.unwrap();
    second.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
    assert!(early.is_err(), "served beyond max_connections");
    drop(first);
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, second.read_to_end(&mut out)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    p.stop().await;
}

/// A listener whose accept queue is full and never drained: SYNs to it go unanswered.
fn black_hole() -> (socket2::Socket, SocketAddr, Vec<std::net::TcpStream>) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into()).unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..4 {
        let c = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        c.set_nonblocking(true).unwrap();
        let _ = c.connect(&addr.into());
        fill.push(c.into());
    }
    std::thread::sleep(Duration::from_millis(50));
    (s, addr, fill)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_gives_504() {
    let (_hole, addr, _fill) = black_hole();
    let p = Proxy::start(&config(&[addr], "connect_timeout_ms = 200\neject_after = 0", "")).await;
    let r = get(p.addr(), "x", "/").await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.body);
    p.stop().await;
}

/// Reads `n` complete responses (each with a Content-Length) from a keep-alive connection and
/// returns their status lines.
async fn read_responses(s: &mut TcpStream, n: usize) -> Vec<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let mut statuses = Vec::new();
        let mut rest = &buf[..];
        while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&rest[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if rest.len() < end + 4 + len {
                break;
            }
            statuses.push(head.lines().next().unwrap_or("").to_string());
            rest = &rest[end + 4 + len..];
        }
        if statuses.len() >= n {
            assert!(rest.is_empty() && statuses.len() == n, "extra bytes: {statuses:?}");
            return statuses;
        }
        let k = tokio::time::timeout(WAIT, s.read(&mut chunk)).await.expect("responses").unwrap();
        assert!(k > 0, "closed after {statuses:?}");
        buf.extend_from_slice(&chunk[..k]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_behave_the_same_after_pauses() {
    // Between requests a quiet plain HTTP/1 connection is parked without hyper's buffers
    // (server.rs); the pauses give it the chance, and nothing may show from the outside.
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    let pause = || tokio::time::sleep(Duration::from_millis(50));
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        assert_eq!(read_responses(&mut s, 1).await, ["http/1.1 200 ok"]);
        pause().await;
    }
    // Pipelined after a pause: both answered.
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_responses(&mut s, 2).await.len(), 2);
    pause().await;
    // A head split by a pause.
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    pause().await;
    s.write_all(b"st: x\r\n\r\n").await.unwrap();
    assert_eq!(read_responses(&mut s, 1).await, ["http/1.1 200 ok"]);
    pause().await;
    // Still strict: an ambiguous head is refused and the connection closed.
    let forwarded = a.requests.load(Ordering::Relaxed);
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("closed by the proxy").ok();
    let text = String::from_utf8_lossy(&out);
    assert!(status_line(&text).starts_with("HTTP/1.1 400"), "{text:?}");
    assert_eq!(a.requests.load(Ordering::Relaxed), forwarded, "nothing more forwarded");
    p.stop().await;
}

/// Requests that switched the old read-side guard off for the rest of a connection: each is
/// refused itself or leaves the next request on the connection checked as strictly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn former_guard_bypasses_are_refused() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    let smuggle: &[u8] =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
    // An Upgrade field without `Connection: upgrade`, then CL+TE on the same connection.
    let mut both = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: foo\r\n\r\n".to_vec();
    both.extend_from_slice(smuggle);
    let resp = raw(p.addr(), &both).await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(resp.contains("HTTP/1.1 400"), "the smuggled request is refused: {resp:?}");
    assert_eq!(a.requests.load(Ordering::Relaxed), 1, "only the first reached the backend");
    // A head ending in bare LFs.
    let resp = raw(p.addr(), b"GET / HTTP/1.1\nHost: x\n\n").await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 400"), "{resp:?}");
    // An upgrade the backend refuses (200, no switch) keeps the connection strict.
    let mut up =
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo\r\n\r\n".to_vec();
    up.extend_from_slice(smuggle);
    let resp = raw(p.addr(), &up).await;
    assert!(resp.contains("HTTP/1.1 400"), "{resp:?}");
    assert_eq!(a.requests.load(Ordering::Relaxed), 2);
    // 60 KB of trailer lines: refused in bounded time and stack; the proxy lives on.
    let mut trailers =
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
    for _ in 0..20_000 {
        trailers.extend_from_slice(b"a:\r\n");
    }
    trailers.extend_from_slice(b"\r\n");
    let resp = raw(p.addr(), &trailers).await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 4"), "{:?}", status_line(&resp));
    let ok = raw(p.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(status_line(&ok).starts_with("HTTP/1.1 200"), "{ok}");
    p.stop().await;
}
