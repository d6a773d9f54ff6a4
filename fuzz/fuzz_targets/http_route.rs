//! HTTP inputs from clients and backends: the Host header and path through the router (the
//! answer is one of the configured upstreams or none) and the path normalizer, raw bytes through
//! the HTTP/1 codec's request and response head parsers (spans stay inside the head), and
//! through the chunked walker in arbitrary read sizes (the same verdict as in one piece).
#![no_main]
use std::sync::OnceLock;

use lb_user::{
    config::RouteConfig,
    l7::{
        h1::{body::Chunked, head, response},
        path,
        route::{Router, bare_host},
    },
};
use libfuzzer_sys::fuzz_target;

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

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    // Routing: the text up to the first newline is the Host, the rest the path.
    let text = String::from_utf8_lossy(rest);
    let (host, path) = text.split_once('\n').unwrap_or((&text, "/"));
    let _ = bare_host(host);
    if let Some(u) = router().route(Some(host), path) {
        assert!(UPSTREAMS.contains(&u), "{u}");
    }
    assert_eq!(router().route(Some("other.test"), "/x"), Some("default"));
    let mut normal = Vec::new();
    if path::normalize(path, &mut normal) {
        assert!(normal.starts_with(b"/"));
        assert!(!normal.windows(2).any(|w| w == b"//"), "{normal:?}");
        assert!(!normal.windows(4).any(|w| w == b"/../"), "{normal:?}");
    }

    // Heads: whatever the bytes, a parsed head's fields lie inside it.
    let mut fields = Vec::new();
    if let Ok(Some(h)) = head::parse(rest, &mut fields, 100, 65536) {
        assert!(h.len <= rest.len());
        assert!(fields.iter().all(|f| f.value.end as usize <= h.len && f.name.end as usize <= h.len));
    }
    if let Ok(Some(r)) = response::parse(rest, &mut fields, first & 1 == 1, 65536) {
        assert!(r.len <= rest.len() && (100..600).contains(&r.code));
    }

    // The chunked walker: in reads of 1..=64 bytes it agrees with one read of everything.
    let step = usize::from(first % 64) + 1;
    let mut whole = Chunked::new(4096);
    let verdict = whole.feed(rest);
    let mut parts = Chunked::new(4096);
    let mut taken = 0;
    let mut failed = false;
    for piece in rest.chunks(step) {
        match parts.feed(piece) {
            Ok(n) => taken += n,
            Err(_) => {
                failed = true;
                break;
            }
        }
        if parts.is_done() {
            break;
        }
    }
    match verdict {
        Ok(n) => {
            assert!(!failed, "refused in pieces, accepted whole");
            assert_eq!((taken, parts.is_done()), (n, whole.is_done()));
        }
        Err(_) => assert!(failed, "accepted in pieces, refused whole"),
    }
});
