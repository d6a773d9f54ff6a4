//! Bad HTTP input (issue 8): a request-smuggling and desync corpus beyond `l7_strict.rs`, each
//! case asserted on the bytes the backend received (rejected, or forwarded with one unambiguous
//! framing, never a hidden second request); h2 → h1 downgrade cases as hand-built frames;
//! oversized heads and bodies with the default limits. Runs the proxy in-process on loopback.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    backends::raw::{RawBackend, RawRequest},
    h2,
    http::{Proxy, config},
    rel,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// What a case must lead to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 400/413/431 (or h2 stream/connection error) and nothing reaches the backend.
    Reject,
    /// Exactly these (path, body) requests reach the backend.
    Forward(&'static [(&'static str, &'static [u8])]),
    /// Either of the above, as long as what reaches the backend is unambiguous and no
    /// `/smuggled` request is among it.
    Either,
}

const H: &str = "Host: x\r\n";

fn corpus() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let c = |s: String| s.into_bytes();
    vec![
        (
            "TE chunked, chunked",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}"
            )),
            Reject,
        ),
        (
            "two TE headers",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            )),
            Reject,
        ),
        (
            "TE identity",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            )),
            Reject,
        ),
        (
            "TE tab OWS",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding:\tchunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )),
            Forward(&[("/", b"hello")]),
        ),
        (
            "TE upper case",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )),
            Forward(&[("/", b"hello")]),
        ),
        (
            "TE obs-folded",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\nhello"
            )),
            Reject,
        ),
        (
            "TE behind underscore + CL",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Content-Length: 5\r\nTransfer_Encoding: chunked\r\nConnection: close\r\n\r\nhello"
            )),
            Reject,
        ),
        (
            "CL duplicate, differing case",
            c(format!("POST / HTTP/1.1\r\n{H}Content-Length: 5\r\ncontent-length: 5\r\n\r\nhello")),
            Reject,
        ),
        (
            "CL leading zeros",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Content-Length: 005\r\nConnection: close\r\n\r\nhello"
            )),
            Either,
        ),
        (
            "CL vertical tab",
            c(format!("POST / HTTP/1.1\r\n{H}Content-Length:\x0b5\r\n\r\nhello")),
            Reject,
        ),
        (
            "CL beyond u64",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Content-Length: 99999999999999999999999\r\n\r\nhello"
            )),
            Reject,
        ),
        (
            "CL on GET hides a request in its body",
            c(format!(
                "GET / HTTP/1.1\r\n{H}Content-Length: {}\r\nConnection: close\r\n\r\n{smuggled}",
                smuggled.len()
            )),
            Forward(&[("/", b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")]),
        ),
        ("obs-fold with tab", c(format!("GET / HTTP/1.1\r\n{H}X-A: b\r\n\tc\r\n\r\n")), Reject),
        ("NUL in header name", c(format!("GET / HTTP/1.1\r\n{H}X-\0A: b\r\n\r\n")), Reject),
        ("bare CR in header value", c(format!("GET / HTTP/1.1\r\n{H}X-A: a\rb\r\n\r\n")), Reject),
        (
            "non-ASCII header name",
            c(format!("GET / HTTP/1.1\r\n{H}Tr\u{e4}nsfer-Encoding: chunked\r\n\r\n")),
            Reject,
        ),
        ("whitespace before first header", c(format!("GET / HTTP/1.1\r\n {H}\r\n")), Reject),
        (
            "bare LF line ends",
            c("GET / HTTP/1.1\nHost: x\nConnection: close\n\n".to_string()),
            Either,
        ),
        (
            "bare LF line ends with CL + TE",
            c(format!(
                "POST / HTTP/1.1\nHost: x\nContent-Length: 5\nTransfer-Encoding: chunked\n\n0\r\n\r\n{smuggled}"
            )),
            Either,
        ),
        (
            "chunk size 0x prefix",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n{smuggled}"
            )),
            Reject,
        ),
        (
            "negative chunk size",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n{smuggled}"
            )),
            Reject,
        ),
        (
            "chunk size with leading space",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n 5\r\nhello\r\n0\r\n\r\n"
            )),
            Either,
        ),
        (
            "chunk longer than its size",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n{smuggled}"
            )),
            Either,
        ),
        (
            "bare LF after chunk size",
            c(format!(
                "POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n{smuggled}"
            )),
            Either,
        ),
        (
            "HTTP/1.0 body without length, pipelined",
            c(format!("POST / HTTP/1.0\r\n{H}\r\n{smuggled}")),
            Forward(&[("/", b"")]),
        ),
        (
            "Upgrade refused by backend, then CL + TE",
            c(format!(
                "GET /up HTTP/1.1\r\n{H}Connection: upgrade\r\nUpgrade: websocket\r\n\r\nPOST /p HTTP/1.1\r\n{H}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            )),
            Either,
        ),
        (
            "absolute-form to another host",
            c("GET http://evil.example/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                .to_string()),
            Either,
        ),
    ]
}

/// Writes `bytes`, then reads until the proxy closes or stays quiet for 500 ms.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    read_quiet(&mut s).await
}

async fn read_quiet(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await
    {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    out
}

/// Checks `seen` against `expect`; returns the problem, if any.
fn judge(first_status: &str, seen: &[RawRequest], expect: Expect) -> Option<String> {
    if let Some(r) = seen.iter().find_map(|r| r.ambiguity().map(|a| format!("{a} in {:?}", r.head)))
    {
        return Some(format!("forwarded ambiguously: {r}"));
    }
    if seen.iter().any(|r| r.path() == "/smuggled") {
        return Some("a smuggled request reached the backend".into());
    }
    let rejected = ["400", "413", "431"].contains(&first_status);
    let got: Vec<(String, Vec<u8>)> =
        seen.iter().map(|r| (r.path().to_string(), r.body.clone())).collect();
    match expect {
        Expect::Reject if !(rejected && seen.is_empty()) => {
            Some(format!("not rejected: status {first_status}, backend saw {got:?}"))
        }
        Expect::Forward(want) => {
            let want: Vec<(String, Vec<u8>)> =
                want.iter().map(|(p, b)| (p.to_string(), b.to_vec())).collect();
            (got != want)
                .then(|| format!("backend saw {got:?}, wanted {want:?} (status {first_status})"))
        }
        _ => None,
    }
}

fn status_of(resp: &[u8]) -> String {
    String::from_utf8_lossy(resp).get(9..12).unwrap_or("none").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_is_rejected_or_normalised() {
    let backend = RawBackend::start().await;
    let p = Proxy::start(&config(&[backend.addr], "", "")).await;
    let mut problems = Vec::new();
    let (mut rejected, mut forwarded) = (0, 0);
    let cases = corpus();
    for (name, bytes, expect) in &cases {
        backend.clear();
        let resp = exchange(p.addr(), bytes).await;
        // The backend may still be reading a forwarded request.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = backend.requests();
        let status = status_of(&resp);
        if seen.is_empty() {
            rejected += 1
        } else {
            forwarded += 1
        }
        eprintln!(
            "{name}: status {status}, backend saw {:?}",
            seen.iter().map(|r| r.path().to_string()).collect::<Vec<_>>()
        );
        if let Some(why) = judge(&status, &seen, *expect) {
            problems.push(format!("{name}: {why}"));
        }
    }
    // HTTP/1.0 close-delimited response: relayed whole, and the pooled connection is not
    // reused for it (the next request on the same client connection gets its own answer).
    backend.clear();
    let resp = exchange(
        p.addr(),
        format!(
            "GET /http10 HTTP/1.1\r\n{H}\r\nGET /after HTTP/1.1\r\n{H}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let text = String::from_utf8_lossy(&resp);
    let paths: Vec<String> = backend.requests().iter().map(|r| r.path().to_string()).collect();
    if !(text.contains("until-close")
        && text.matches("HTTP/1.1 200").count() == 2
        && paths == ["/http10", "/after"])
    {
        problems.push(format!(
            "HTTP/1.0 close-delimited response: client got {text:?}, backend saw {paths:?}"
        ));
    }
    let total = cases.len() + 1;
    rel::record(
        "HTTP/1 smuggling corpus",
        &format!(
            "{total} raw-byte cases (CL/TE variants, duplicate CL, chunk-size tricks, bare LF, obs-fold, header-name tricks, Upgrade pipelining, HTTP/1.0 close-delimited)"
        ),
        &format!(
            "{rejected} rejected, {} forwarded unambiguously, {} problems{}",
            forwarded + 1,
            problems.len(),
            if problems.is_empty() { String::new() } else { format!(": {problems:?}") }
        ),
        problems.is_empty(),
    );
    assert!(problems.is_empty(), "{problems:#?}");
    p.stop().await;
}

/// HPACK header fields (name, value).
type Fields<'a> = Vec<(&'a [u8], &'a [u8])>;

/// One h2c request built by hand: (frames after the preface, what the client sent).
async fn h2_request(
    addr: SocketAddr,
    fields: &[(&[u8], &[u8])],
    data: Option<&[u8]>,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut bytes = h2::PREFACE.to_vec();
    bytes.extend(h2::frame(h2::SETTINGS, 0, 0, &[]));
    let flags = h2::END_HEADERS | if data.is_none() { h2::END_STREAM } else { 0 };
    bytes.extend(h2::frame(h2::HEADERS, flags, 1, &h2::block(fields)));
    if let Some(d) = data {
        bytes.extend(h2::frame(h2::DATA, h2::END_STREAM, 1, d));
    }
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&bytes).await.expect("write");
    h2::parse(&read_quiet(&mut s).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_to_h1_downgrade_cases_are_refused() {
    let backend = RawBackend::start().await;
    let p = Proxy::start(&config(&[backend.addr], "", "")).await;
    let base: Vec<(&[u8], &[u8])> =
        vec![(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x")];
    let with = |extra: &[(&'static [u8], &'static [u8])]| {
        let mut f = base.clone();
        f.extend_from_slice(extra);
        f
    };
    let cases: Vec<(&str, Fields, Option<&[u8]>)> = vec![
        ("connection header", with(&[(b"connection", b"keep-alive")]), None),
        (
            "transfer-encoding header",
            with(&[(b"transfer-encoding", b"chunked")]),
            Some(b"0\r\n\r\n"),
        ),
        ("te other than trailers", with(&[(b"te", b"gzip")]), None),
        ("keep-alive header", with(&[(b"keep-alive", b"timeout=5")]), None),
        ("upgrade header", with(&[(b"upgrade", b"websocket")]), None),
        ("content-length above the data", with(&[(b"content-length", b"10")]), Some(b"abc")),
        ("content-length below the data", with(&[(b"content-length", b"1")]), Some(b"abc")),
        (
            "two differing content-lengths",
            with(&[(b"content-length", b"3"), (b"content-length", b"4")]),
            Some(b"abc"),
        ),
        (
            "CRLF in a header value",
            with(&[(b"x-a", b"b\r\ntransfer-encoding: chunked")]),
            Some(b"abc"),
        ),
        ("upper-case header name", with(&[(b"Content-Length", b"3")]), Some(b"abc")),
        (
            "space in :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/ HTTP/1.1\r\nx: y"),
                (b":authority", b"x"),
            ],
            None,
        ),
    ];
    let mut problems = Vec::new();
    for (name, fields, data) in &cases {
        backend.clear();
        let frames = h2_request(p.addr(), fields, *data).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = backend.requests();
        let refused = frames.iter().any(|(t, _, s, payload)| {
            (*t == h2::RST_STREAM && *s == 1)
                || *t == h2::GOAWAY
                // :status 400 is HPACK static index 12 (0x8c).
                || (*t == h2::HEADERS && *s == 1 && payload.first() == Some(&0x8c))
        });
        eprintln!("h2 {name}: refused {refused}, backend saw {}", seen.len());
        if !refused || !seen.is_empty() {
            problems.push(format!(
                "{name}: refused {refused}, backend saw {:?}",
                seen.iter().map(|r| r.head.clone()).collect::<Vec<_>>()
            ));
        }
    }
    rel::record(
        "h2 → h1 downgrade",
        &format!(
            "{} h2c requests with connection-specific headers, CL mismatches, CRLF in values, bad names",
            cases.len()
        ),
        &format!(
            "{} refused (RST_STREAM/GOAWAY/400) with nothing forwarded; problems: {problems:?}",
            cases.len() - problems.len()
        ),
        problems.is_empty(),
    );
    assert!(problems.is_empty(), "{problems:#?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_and_bodies_get_431_and_413_with_default_limits() {
    let backend = RawBackend::start().await;
    let p = Proxy::start(&config(&[backend.addr], "", "")).await;
    // Defaults: 64 KiB of head, 100 headers, 10 MiB of body.
    let big_header = format!("GET / HTTP/1.1\r\n{H}X-Big: {}\r\n\r\n", "a".repeat(70_000));
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\n{H}{many}\r\n");
    let big_cl = format!("POST / HTTP/1.1\r\n{H}Content-Length: {}\r\n\r\n", 10 * 1024 * 1024 + 1);
    let mut results = Vec::new();
    for (name, req, want) in [
        ("70 KB header", big_header, "431"),
        ("150 headers", many, "431"),
        ("CL 10 MiB + 1", big_cl, "413"),
    ] {
        let status = status_of(&exchange(p.addr(), req.as_bytes()).await);
        results.push((name, status, want));
    }
    // A chunked body that grows past the limit: 413 once it does, the backend never gets a
    // complete request.
    let mut s = TcpStream::connect(p.addr()).await.unwrap();
    s.write_all(format!("POST / HTTP/1.1\r\n{H}Transfer-Encoding: chunked\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let chunk = format!("100000\r\n{}\r\n", "b".repeat(0x100000));
    for _ in 0..11 {
        if s.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let status = status_of(&read_quiet(&mut s).await);
    results.push(("chunked 11 MiB", status, "413"));
    let seen = backend.requests().len();
    let ok = results.iter().all(|(_, s, w)| s == w) && seen == 0;
    rel::record(
        "oversized heads and bodies",
        "70 KB header, 150 headers, Content-Length 10 MiB + 1, 11 MiB chunked (default limits)",
        &format!("{results:?}; backend saw {seen} requests"),
        ok,
    );
    assert!(ok, "{results:?}, backend saw {seen}");
    p.stop().await;
}
