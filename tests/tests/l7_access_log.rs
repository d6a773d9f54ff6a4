//! `[http] access_log`: one line per request on the `lb::access` target, as text or as one
//! JSON object with fixed field names; `off` writes nothing. Also L7 over IPv6 listeners and
//! backends.
use std::sync::Mutex;

use lb_tests::http::{Backend, Proxy, config, raw};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target() == "lb::access"
    }
    fn log(&self, r: &log::Record<'_>) {
        if r.target() == "lb::access" {
            LINES.lock().unwrap().push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

/// The lines of IPv4 clients (the IPv6 test runs alongside and logs too).
fn take() -> Vec<String> {
    let mut lines = LINES.lock().unwrap();
    let (mine, rest): (Vec<String>, Vec<String>) =
        lines.drain(..).partition(|l| l.contains("127.0.0.1"));
    *lines = rest;
    mine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_formats() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let a = Backend::start("a").await;

    let p = Proxy::start(&config(&[a.addr], "", "access_log = \"json\"")).await;
    let resp =
        raw(p.addr(), b"GET /x?y=1 HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    p.stop().await;
    let lines = take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("one JSON object");
    assert_eq!(v["listener"], "l");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["authority"], "site.test");
    assert_eq!(v["path"], "/x?y=1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["backend"], a.addr.to_string());
    assert_eq!(v["bytes"], 1, "the body \"a\"");
    assert!(v["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(v["time"].as_f64().unwrap() > 1.7e9 && v["duration"].as_f64().unwrap() >= 0.0);

    let p = Proxy::start(&config(&[a.addr], "", "access_log = \"text\"")).await;
    raw(p.addr(), b"GET /t HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n").await;
    p.stop().await;
    let lines = take();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("\"GET site.test/t\" 200"), "{}", lines[0]);

    let p = Proxy::start(&config(&[a.addr], "", "access_log = \"off\"")).await;
    raw(p.addr(), b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    p.stop().await;
    assert!(take().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_listener_and_backends() {
    let l = tokio::net::TcpListener::bind("[::1]:0").await.expect("IPv6 loopback");
    let b = Backend::serve_on(l, "v6");
    let cfg = config(&[b.addr], "", "").replace("127.0.0.1:0", "[::1]:0");
    let p = Proxy::start(&cfg).await;
    assert!(p.addr().is_ipv6());
    let resp = raw(p.addr(), b"GET / HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("v6"), "{resp}");
    let seen = b.last_seen();
    assert_eq!(seen.headers["x-forwarded-for"], "::1");
    assert_eq!(seen.headers["forwarded"], "for=\"[::1]\";proto=http;host=\"[::1]\"");
    p.stop().await;
}
