//! The L7 proxy in-process on loopback with real hyper backends: routing, balancing, pooling,
//! header rules, error statuses, retry and ejection.
use std::{collections::HashMap, net::SocketAddr, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode, header};
use lb_tests::http::{Backend, Proxy, WAIT, config, get, send};

fn addrs(b: &[&Backend]) -> Vec<SocketAddr> {
    b.iter().map(|b| b.addr).collect()
}

/// An address nothing listens on (bound, then closed).
async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_with_default_and_404() {
    let (api, v1, wild, def) = (
        Backend::start("api").await,
        Backend::start("v1").await,
        Backend::start("wild").await,
        Backend::start("default").await,
    );
    let cfg = format!(
        r#"
[[http.listener]]
name = "l"
listen = "127.0.0.1:0"
[[http.listener]]
name = "strict"
listen = "127.0.0.1:0"
[[http.route]]
listener = "l"
host = "api.example.com"
upstream = "api"
[[http.route]]
listener = "l"
host = "api.example.com"
path = "/v1"
upstream = "v1"
[[http.route]]
listener = "l"
host = "*.example.com"
upstream = "wild"
[[http.route]]
listener = "l"
upstream = "default"
[[http.route]]
listener = "strict"
host = "only.test"
upstream = "api"
[upstream.api]
backends = ["{}"]
[upstream.v1]
backends = ["{}"]
[upstream.wild]
backends = ["{}"]
[upstream.default]
backends = ["{}"]
"#,
        api.addr, v1.addr, wild.addr, def.addr
    );
    let p = Proxy::start(&cfg).await;
    let l = p.addrs["l"];
    assert_eq!(get(l, "api.example.com", "/x").await.body, "api");
    assert_eq!(get(l, "API.example.com:80", "/v1/users").await.body, "v1");
    assert_eq!(get(l, "api.example.com", "/v10").await.body, "api");
    assert_eq!(get(l, "www.example.com", "/").await.body, "wild");
    assert_eq!(get(l, "other.test", "/").await.body, "default");
    let r = get(p.addrs["strict"], "nope.test", "/").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body, "404 Not Found\n");
    assert_eq!(get(p.addrs["strict"], "only.test", "/").await.body, "api");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_order_and_weights() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cfg = format!(
        r#"
[[http.listener]]
name = "l"
listen = "127.0.0.1:0"
[[http.route]]
listener = "l"
upstream = "u"
[upstream.u]
backends = ["{}", {{ addr = "{}", weight = 2 }}]
"#,
        a.addr, b.addr
    );
    let p = Proxy::start(&cfg).await;
    let mut order = Vec::new();
    for _ in 0..6 {
        order.push(get(p.addr(), "x", "/").await.body);
    }
    assert_eq!(order, ["a", "b", "b", "a", "b", "b"]);
    p.stop().await;
}

async fn spread(p: &Proxy, n: usize, header: Option<(&str, String)>) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for i in 0..n {
        let mut req = Request::get("/").header(header::HOST, "x");
        if let Some((k, v)) = &header {
            req = req.header(*k, v.replace("{i}", &i.to_string()));
        }
        let r = send(p.addr(), req.body(Full::default()).unwrap()).await;
        *seen.entry(r.body).or_insert(0) += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_policies_are_sticky() {
    let (a, b, c) =
        (Backend::start("a").await, Backend::start("b").await, Backend::start("c").await);
    let list = addrs(&[&a, &b, &c]);
    // Header: one value always lands on one backend; many values spread.
    let p = Proxy::start(&config(&list, r#"balance = "hash-header:x-user""#, "")).await;
    assert_eq!(spread(&p, 9, Some(("x-user", "alice".into()))).await.len(), 1);
    assert!(spread(&p, 30, Some(("x-user", "u{i}".into()))).await.len() > 1);
    p.stop().await;
    // Cookie.
    let p = Proxy::start(&config(&list, r#"balance = "hash-cookie:sid""#, "")).await;
    assert_eq!(spread(&p, 9, Some(("cookie", "a=1; sid=xyz".into()))).await.len(), 1);
    assert!(spread(&p, 30, Some(("cookie", "sid=s{i}".into()))).await.len() > 1);
    // Without the cookie: round robin.
    assert_eq!(spread(&p, 3, None).await.len(), 3);
    p.stop().await;
    // Source address: the test client is always 127.0.0.1.
    let p = Proxy::start(&config(&list, r#"balance = "hash-source-ip""#, "")).await;
    assert_eq!(spread(&p, 9, None).await.len(), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_avoids_the_busy_backend() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let p = Proxy::start(&config(&addrs(&[&a, &b]), r#"balance = "least-conn""#, "")).await;
    let addr = p.addr();
    let slow = tokio::spawn(async move { get(addr, "x", "/slow/800").await.body });
    // Wait until the slow request is in flight at its backend.
    let group = p.groups["u"].clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    let busy = loop {
        let set = group.backends();
        if let Some(b) = set.iter().find(|b| b.in_flight.load(Ordering::Relaxed) > 0) {
            break b.addr;
        }
        assert!(tokio::time::Instant::now() < deadline, "slow request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let busy_name = if busy == a.addr { "a" } else { "b" };
    for _ in 0..5 {
        assert_ne!(get(p.addr(), "x", "/").await.body, busy_name, "sent to the busy backend");
    }
    assert_eq!(slow.await.unwrap(), busy_name);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_avoids_the_slow_backend() {
    let fast = Backend::start("fast").await;
    let slow = Backend::start_slow("slow", Duration::from_millis(300)).await;
    let p = Proxy::start(&config(&addrs(&[&fast, &slow]), r#"balance = "p2c-ewma""#, "")).await;
    // Until both have a latency sample the choice is open; bounded warm-up.
    for _ in 0..20 {
        if slow.requests.load(Ordering::Relaxed) > 0 && fast.requests.load(Ordering::Relaxed) > 0 {
            break;
        }
        get(p.addr(), "x", "/").await;
    }
    assert!(slow.requests.load(Ordering::Relaxed) > 0, "warm-up never reached the slow backend");
    // With two backends p2c always compares both: the slow one's peak latency loses.
    for _ in 0..10 {
        assert_eq!(get(p.addr(), "x", "/").await.body, "fast");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reuses_backend_connections() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    for _ in 0..50 {
        // A new client connection each time; the backend side still reuses the pool.
        assert_eq!(get(p.addr(), "x", "/").await.status, StatusCode::OK);
    }
    assert_eq!(a.requests.load(Ordering::Relaxed), 50);
    let conns = a.connections.load(Ordering::Relaxed);
    assert!(conns <= 2, "50 sequential requests took {conns} backend connections");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules() {
    let a = Backend::start("a").await;
    // Untrusted client: its forwarding headers are replaced; hop-by-hop headers dropped both ways.
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    let req = Request::get("/p?q=1")
        .header(header::HOST, "site.test:8080")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil")
        .header("forwarded", "for=6.6.6.6")
        .header(header::CONNECTION, "keep-alive, x-drop-me")
        .header("x-drop-me", "1")
        .header("keep-alive", "timeout=5")
        .header(header::TE, "trailers")
        .header("proxy-authorization", "Basic eA==")
        .header("x-end-to-end", "kept")
        .body(Full::default())
        .unwrap();
    let r = send(p.addr(), req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers.get("x-backend-hop").is_none(), "backend's Connection-listed header dropped");
    let seen = a.last_seen();
    let h = &seen.headers;
    assert_eq!(seen.uri, "/p?q=1");
    assert_eq!(h["host"], "site.test:8080");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "site.test:8080");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"site.test:8080\"");
    assert_eq!(h["x-end-to-end"], "kept");
    // `TE: trailers` is the one TE a proxy passes on (gRPC needs it; RFC 9110 §10.1.4).
    assert_eq!(h["te"], "trailers");
    for gone in ["x-drop-me", "keep-alive", "proxy-authorization", "upgrade"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded");
    }
    assert_ne!(h.get("connection").map(|v| v.to_str().unwrap()), Some("keep-alive, x-drop-me"));
    p.stop().await;

    // Trusted peer: its chain is extended and its proto/host kept.
    let p = Proxy::start(&config(&[a.addr], "", r#"trusted_proxies = ["127.0.0.0/8"]"#)).await;
    let req = Request::get("/")
        .header(header::HOST, "site.test")
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-forwarded-proto", "https")
        .header("forwarded", "for=1.2.3.4;proto=https")
        .body(Full::default())
        .unwrap();
    send(p.addr(), req).await;
    let h = a.last_seen().headers;
    assert_eq!(h["x-forwarded-for"], "1.2.3.4, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "site.test");
    assert_eq!(h["forwarded"], "for=1.2.3.4;proto=https, for=127.0.0.1;proto=http;host=site.test");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "", "")).await;
    let big = "x".repeat(3 * 1024 * 1024);
    let req = Request::post("/echo")
        .header(header::HOST, "x")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let r = send(p.addr(), req).await;
    assert_eq!(r.body.len(), big.len());
    assert!(r.body == big);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_502_503_504() {
    let dead = dead_addr().await;
    // 502: the only backend refuses connections.
    let p = Proxy::start(&config(&[dead], "eject_after = 0", "")).await;
    let r = get(p.addr(), "x", "/").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::BAD_GATEWAY, "502 Bad Gateway\n"));
    // 503: no backend available (all drained).
    p.groups["u"].set_draining(dead, true).unwrap();
    let r = get(p.addr(), "x", "/").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable\n")
    );
    p.stop().await;
    // 504: the backend answers after the response timeout.
    let a = Backend::start("a").await;
    let p = Proxy::start(&config(&[a.addr], "response_timeout_ms = 200", "")).await;
    let r = get(p.addr(), "x", "/slow/2000").await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout\n"));
    assert_eq!(get(p.addr(), "x", "/").await.status, StatusCode::OK);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_retry_and_failures_eject() {
    let a = Backend::start("a").await;
    let dead = dead_addr().await;
    let p = Proxy::start(&config(&[dead, a.addr], "eject_after = 2\neject_ms = 60000", "")).await;
    // Round robin sends every other request to the dead backend first; GET is retried on `a`.
    for _ in 0..4 {
        let r = get(p.addr(), "x", "/").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "a"));
    }
    let dead_b = p.groups["u"].backends().iter().find(|b| b.addr == dead).unwrap().clone();
    assert!(!dead_b.is_available(), "two connect failures in a row eject it");
    // A POST with a body is not retried... but the dead backend is ejected, so it goes to `a`.
    let req = Request::post("/echo")
        .header(header::HOST, "x")
        .body(Full::new(Bytes::from("hi")))
        .unwrap();
    assert_eq!(send(p.addr(), req).await.body, "hi");
    p.stop().await;

    // Not retried: a POST whose first backend refuses gets 502.
    let p = Proxy::start(&config(&[dead, a.addr], "eject_after = 0", "")).await;
    let mut statuses = Vec::new();
    for _ in 0..2 {
        let req = Request::post("/echo")
            .header(header::HOST, "x")
            .body(Full::new(Bytes::from("hi")))
            .unwrap();
        statuses.push(send(p.addr(), req).await.status);
    }
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::BAD_GATEWAY]);
    p.stop().await;
}
