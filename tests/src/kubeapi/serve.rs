//! The fake API server's HTTP side: bearer-token check, the list, and watch streams that poll
//! the history (replay after a resourceVersion, new events, BOOKMARKs, a 410 ERROR event).
use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, channel::Channel, combinators::BoxBody};
use hyper::{Request, Response, body::Frame};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::World;

/// How often an open watch looks for new events, and sends a BOOKMARK.
const POLL: Duration = Duration::from_millis(20);
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

type Body = BoxBody<Bytes, Infallible>;

pub(super) async fn accept(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    world: Arc<Mutex<World>>,
    token: String,
) {
    while let Ok((tcp, _)) = listener.accept().await {
        let (acceptor, world, token) = (acceptor.clone(), world.clone(), token.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let svc = hyper::service::service_fn(move |req| {
                let (world, token) = (world.clone(), token.clone());
                async move { Ok::<_, Infallible>(handle(&world, &token, req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

fn reply(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code })
}

fn handle(
    world: &Arc<Mutex<World>>,
    token: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let bearer = req.headers().get("authorization").and_then(|v| v.to_str().ok());
    if bearer != Some(&format!("Bearer {token}")) {
        return reply(401, status(401, "Unauthorized", "Unauthorized"));
    }
    let path = req.uri().path();
    let namespace = path
        .strip_prefix("/apis/discovery.k8s.io/v1/namespaces/")
        .and_then(|p| p.strip_suffix("/endpointslices"));
    let (Some(namespace), true) = (namespace, req.method() == hyper::Method::GET) else {
        return reply(
            404,
            status(404, "NotFound", &format!("{} {path}: not served here", req.method())),
        );
    };
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let service = match query.get("labelSelector").map(|s| s.split_once('=')) {
        Some(Some(("kubernetes.io/service-name", s))) => Some(s.to_string()),
        None => None,
        Some(_) => {
            return reply(
                400,
                status(400, "BadRequest", "only kubernetes.io/service-name=NAME is served"),
            );
        }
    };
    let namespace = namespace.to_string();
    // `ns` is where the object lives (its key, or the event's record).
    let matches = move |ns: &str, obj: &Value| {
        ns == namespace
            && service
                .as_ref()
                .is_none_or(|s| obj["metadata"]["labels"]["kubernetes.io/service-name"] == *s)
    };
    let mut w = world.lock().unwrap();
    if query.get("watch").map(String::as_str) != Some("true") {
        w.counts.lists += 1;
        let items: Vec<&Value> =
            w.slices.iter().filter(|((ns, _), o)| matches(ns, o)).map(|(_, o)| o).collect();
        return reply(
            200,
            json!({
                "kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                "metadata": { "resourceVersion": w.rv.to_string() }, "items": items,
            }),
        );
    }
    w.counts.watches += 1;
    let from: u64 = query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(w.rv);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
    let (world, epoch, gone) = (world.clone(), w.epoch, from < w.compacted);
    drop(w);
    tokio::spawn(async move {
        let expired = |rv: u64, compacted: u64| {
            let s =
                status(410, "Expired", &format!("too old resource version: {rv} ({compacted})"));
            Bytes::from(json!({ "type": "ERROR", "object": s }).to_string() + "\n")
        };
        if gone {
            let compacted = world.lock().unwrap().compacted;
            let _ = tx.send(Frame::data(expired(from, compacted))).await;
            return;
        }
        let mut sent = from;
        let mut last_mark = tokio::time::Instant::now();
        loop {
            let (lines, ended, rv) = {
                let w = world.lock().unwrap();
                let lines: Vec<(u64, String)> = w
                    .history
                    .iter()
                    .filter(|(rv, ns, line)| *rv > sent && matches(ns, &line_object(line)))
                    .map(|(rv, _, line)| (*rv, line.clone()))
                    .collect();
                (lines, (w.epoch != epoch).then_some(w.compacted), w.rv)
            };
            if let Some(compacted) = ended {
                let _ = tx.send(Frame::data(expired(sent, compacted))).await;
                return;
            }
            for (rv, line) in lines {
                if tx.send(Frame::data(Bytes::from(line))).await.is_err() {
                    return;
                }
                sent = rv;
            }
            if bookmarks && last_mark.elapsed() >= BOOKMARK_EVERY {
                last_mark = tokio::time::Instant::now();
                let mark = json!({ "type": "BOOKMARK", "object": {
                    "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
                    "metadata": { "resourceVersion": rv.to_string() } } });
                if tx.send(Frame::data(Bytes::from(mark.to_string() + "\n"))).await.is_err() {
                    return;
                }
                world.lock().unwrap().counts.bookmarks += 1;
                sent = sent.max(rv);
            }
            tokio::time::sleep(POLL).await;
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body.boxed())
        .expect("response")
}

fn line_object(line: &str) -> Value {
    serde_json::from_str::<Value>(line).map(|mut v| v["object"].take()).unwrap_or_default()
}

/// Decodes `%XX` escapes (and `+`) in a query value.
fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
