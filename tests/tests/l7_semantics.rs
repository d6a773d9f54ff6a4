//! HTTP semantics the L7 proxy holds (issue 11 item 3): Host rules, absolute-form targets,
//! `TE: trailers` both ways, `:authority` toward HTTP/2 backends, path normalization.
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use lb_tests::http::{Backend, Proxy, WAIT, config, h2c, raw, scripted_backend, two_routes};

fn status_line(resp: &str) -> &str {
    resp.lines().next().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_there_once() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    for bytes in [
        &b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.test, b.test\r\nConnection: close\r\n\r\n",
    ] {
        let resp = raw(p.addr(), bytes).await;
        assert!(status_line(&resp).starts_with("HTTP/1.1 400"), "{bytes:?}: {resp:?}");
    }
    assert_eq!(a.requests.load(Ordering::Relaxed), 0, "nothing was forwarded");
    // HTTP/1.0 may omit Host.
    let resp = raw(p.addr(), b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_authority_replaces_host() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let cfg = two_routes("", "host = \"a.test\"", a.addr, b.addr);
    let p = Proxy::start(&cfg).await;
    let resp = raw(
        p.addr(),
        b"GET http://a.test/x?y=1 HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.ends_with('a'), "routed by the target's authority: {resp:?}");
    let seen = a.last_seen();
    assert_eq!(seen.headers["host"], "a.test", "Host replaced by the authority");
    assert_eq!(seen.uri, "/x?y=1", "origin form toward the backend");
    assert_eq!(seen.headers.get_all("host").iter().count(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_and_host_must_agree() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    let mut sender = h2c(p.addr()).await;
    let req = Request::get("http://a.test/")
        .header("host", "b.test")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let req = Request::get("http://a.test/").body(Full::<Bytes>::default()).unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(a.requests.load(Ordering::Relaxed), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_reaches_h2_backends_with_the_clients_authority() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "http2 = true", "")).await;
    // From an HTTP/1.1 client.
    let resp = raw(
        p.addr(),
        b"GET /p HTTP/1.1\r\nHost: site.test\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp:?}");
    let seen = a.last_seen();
    assert_eq!(seen.version, hyper::Version::HTTP_2);
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.uri, "http://site.test/p", ":authority is the client's");
    // From an h2 client.
    let mut sender = h2c(p.addr()).await;
    let req = Request::get("http://h2.test/q")
        .header("te", "trailers")
        .body(Full::<Bytes>::default())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = a.last_seen();
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.uri, "http://h2.test/q");
    assert!(seen.headers.get("host").is_none(), "no host beside :authority");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_clients_get_response_trailers() {
    let (backend, mut heads) = scripted_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n",
    )
    .await;
    let p = Proxy::start(&config(&[backend], "", "")).await;
    let resp =
        raw(p.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n")
            .await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(resp.contains("\r\n\r\n5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n"), "{resp:?}");
    assert!(resp.to_ascii_lowercase().contains("trailer: grpc-status"), "{resp:?}");
    let head = heads.recv().await.unwrap().to_ascii_lowercase();
    assert!(head.contains("te: trailers"), "{head}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_the_normalized_path() {
    let admin = Backend::start("admin").await;
    let public = Backend::start("public").await;
    let cfg = |normalize: bool| {
        let keys = format!("normalize_path = {normalize}");
        two_routes(&keys, "path = \"/admin\"", admin.addr, public.addr)
    };
    let p = Proxy::start(&cfg(true)).await;
    for path in ["/public/../admin/x", "/%61dmin/x", "//admin/x", "/./admin/x"] {
        let req = format!("GET {path}?q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let resp = raw(p.addr(), req.as_bytes()).await;
        assert!(resp.ends_with("admin"), "{path}: {resp:?}");
        assert_eq!(admin.last_seen().uri, "/admin/x?q=1", "{path} forwarded normalized");
    }
    p.stop().await;
    // Without forwarding the normalized form, routing still uses it.
    let p = Proxy::start(&cfg(false)).await;
    let req = b"GET /public/../admin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert!(raw(p.addr(), req).await.ends_with("admin"));
    assert_eq!(admin.last_seen().uri, "/public/../admin/x");
    p.stop().await;
}

/// `hash-source-ip` on L7 picks with the Maglev table and client hash of the XDP and L4 paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_source_ip_agrees_with_the_l4_paths() {
    let backends =
        [Backend::start("a").await, Backend::start("b").await, Backend::start("c").await];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let p = Proxy::start(&config(&addrs, "balance = \"hash-source-ip\"", "")).await;
    let picker = lb_user::l4::balance::Picker::new(p.groups["u"].clone());
    let mut seen = std::collections::BTreeSet::new();
    for last in 1..=40u8 {
        let ip = std::net::Ipv4Addr::new(127, 0, 0, last);
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((ip, 0).into()).unwrap();
        let mut s = sock.connect(p.addr()).await.unwrap();
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, s.read_to_string(&mut out)).await.unwrap().unwrap();
        let answered = out.rsplit("\r\n\r\n").next().unwrap_or("").to_string();
        let expected = picker.pick(ip.into()).unwrap().addr;
        let name = backends.iter().find(|b| b.addr == expected).unwrap().name.clone();
        assert_eq!(answered, name, "client {ip}");
        seen.insert(name);
    }
    assert!(seen.len() > 1, "40 clients spread over the backends: {seen:?}");
    p.stop().await;
}

/// HEAD through an HTTP/2 backend: the backend's Content-Length describes a body that a HEAD
/// response never carries; the client gets the head, not a reset stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_through_h2_backends() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "http2 = true", "")).await;
    let mut sender = h2c(p.addr()).await;
    let req = Request::head("http://x/").body(Full::<Bytes>::default()).unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = raw(p.addr(), b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(resp.ends_with("\r\n\r\n"), "no body after a HEAD response: {resp:?}");
    p.stop().await;
}

/// A proxy-made error to a `Connection: close` request ends the connection as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_honour_connection_close() {
    let p = Proxy::start(&config(&[], "", "")).await;
    let resp = raw(p.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(status_line(&resp).starts_with("HTTP/1.1 503"), "{resp:?}");
    assert!(resp.to_ascii_lowercase().contains("connection: close"), "{resp:?}");
    p.stop().await;
}
