//! HTTP routing inputs from clients: the Host header and path through the router (the answer is
//! one of the configured upstreams or none), and raw request bytes through the HTTP/1 guard in
//! arbitrary read sizes (no panic, no loop, and it only ever adds a few bytes of its own).
#![no_main]
use std::{
    pin::Pin,
    sync::OnceLock,
    task::{Context, Poll, Waker},
};

use lb_user::{
    config::RouteConfig,
    l7::{
        h1guard::H1Guard,
        route::{Router, normalize_host},
    },
};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

const UPSTREAMS: [&str; 5] = ["api", "api-v1", "wild", "static", "default"];

fn router() -> &'static Router {
    static R: OnceLock<Router> = OnceLock::new();
    R.get_or_init(|| {
        let r = |host: Option<&str>, path: Option<&str>, upstream: &str| RouteConfig {
            listener: "l".into(),
            host: host.map(Into::into),
            path: path.map(Into::into),
            upstream: upstream.into(),
        };
        Router::new(&[
            r(Some("api.example.com"), None, "api"),
            r(Some("api.example.com"), Some("/v1"), "api-v1"),
            r(Some("*.example.com"), None, "wild"),
            r(None, Some("/static/"), "static"),
            r(None, None, "default"),
        ])
    })
}

/// Hands out `data` in reads of `step` bytes.
struct Chunks<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    // Routing: the text up to the first newline is the Host, the rest the path.
    let text = String::from_utf8_lossy(rest);
    let (host, path) = text.split_once('\n').unwrap_or((&text, "/"));
    let _ = normalize_host(host);
    if let Some(u) = router().route(Some(host), path) {
        assert!(UPSTREAMS.contains(&u), "{u}");
    }
    assert_eq!(router().route(Some("other.test"), "/x"), Some("default"));

    // The guard: everything hyper would read, in reads of 1..=64 bytes.
    let step = usize::from(first % 64) + 1;
    let mut guard = H1Guard::new(Chunks { data: rest, step }, 1024);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut buf = [0u8; 97];
    for _ in 0..rest.len() * 2 + 64 {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            Poll::Ready(Err(_)) | Poll::Pending => break,
        }
    }
    // A refusal or a bad chunk line adds at most a few bytes of its own.
    assert!(out.len() <= rest.len() + 8, "{} bytes out of {}", out.len(), rest.len());
});
