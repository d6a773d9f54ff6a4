//! A Kubernetes API server of the tests' own, for EndpointSlices only, speaking the real
//! protocol over HTTPS (no API server can be installed here): a list with its
//! resourceVersion, watches that replay history after a resourceVersion and then stream
//! ADDED/MODIFIED/DELETED events and BOOKMARKs, a 410 Gone ERROR event for an expired
//! resourceVersion, bearer-token auth, and a stop and restart on the same port. The objects
//! are kept across restarts, as etcd keeps them; open watches end with the server.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, channel::Channel, combinators::BoxBody};
use hyper::{Request, Response, body::Frame};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::netns::Netns;

/// How often an open watch looks for new events, and sends a BOOKMARK.
const POLL: Duration = Duration::from_millis(20);
const BOOKMARK_EVERY: Duration = Duration::from_secs(1);

/// One endpoint of a slice and its conditions (`None`: the field is absent).
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl Endpoint {
    pub fn ready(addr: IpAddr) -> Self {
        Self { addr, ready: Some(true), serving: Some(true), terminating: Some(false) }
    }
    pub fn not_ready(addr: IpAddr) -> Self {
        Self { addr, ready: Some(false), serving: Some(false), terminating: Some(false) }
    }
    /// A pod shutting down that still serves (the drained case).
    pub fn terminating(addr: IpAddr) -> Self {
        Self { addr, ready: Some(false), serving: Some(true), terminating: Some(true) }
    }
}

/// What the server holds, across restarts.
#[derive(Default)]
struct World {
    rv: u64,
    /// (namespace, name) → the EndpointSlice object.
    slices: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, namespace, watch event line).
    history: Vec<(u64, String, String)>,
    /// resourceVersions up to this one are expired (410 Gone).
    compacted: u64,
    /// Bumped by [`KubeApi::expire`]: open watches end with a 410.
    epoch: u64,
    lists: u64,
    watches: u64,
}

/// The running server generation: its thread stops on the oneshot.
struct Serving {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

/// The fake API server in a namespace; see the module doc. Stops on drop.
pub struct KubeApi {
    ns: Netns,
    pub addr: SocketAddr,
    pub token: String,
    world: Arc<Mutex<World>>,
    tls: Arc<rustls::ServerConfig>,
    dir: PathBuf,
    serving: Option<Serving>,
}

impl KubeApi {
    /// Starts the server on a free port of 127.0.0.1 in `ns`, with a new self-signed
    /// certificate (its CA file and a kubeconfig beside it, see [`KubeApi::kubeconfig`]).
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        Self::start_at(ns, std::env::temp_dir().join(crate::netns::unique("kubeapi")))
    }

    /// [`KubeApi::start`] with its files in `dir` (known before the server starts, for a
    /// config written first).
    pub fn start_at(ns: &Netns, dir: PathBuf) -> anyhow::Result<Self> {
        let c = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])?;
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
        let tls = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![c.cert.der().clone()], key)?;
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("ca.crt"), c.cert.pem())?;
        let mut api = Self {
            ns: ns.share(),
            addr: "127.0.0.1:0".parse()?,
            token: format!("token-{}", crate::netns::unique("t")),
            world: Arc::default(),
            tls: Arc::new(tls),
            dir,
            serving: None,
        };
        api.restart()?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://{}\n    certificate-authority: {}\nusers:\n- name: lb\n  user:\n    token: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: lb\ncurrent-context: fake\n",
            api.addr,
            api.dir.join("ca.crt").display(),
            api.token
        );
        std::fs::write(api.kubeconfig(), kubeconfig)?;
        Ok(api)
    }

    /// A kubeconfig for this server: its CA and bearer token.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Stops serving: the port closes, open watches end mid-stream.
    pub fn stop(&mut self) {
        if let Some(s) = self.serving.take() {
            let _ = s.stop.send(());
            let _ = s.thread.join();
        }
    }

    /// Serves again (on the same port once it has one), with the objects it had.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let addr = self.addr;
        let listener = self.ns.run(move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        self.addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (world, tls, token) = (self.world.clone(), self.tls.clone(), self.token.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            let rt = rt.expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                tokio::select! {
                    _ = stopped => {}
                    _ = accept(listener, acceptor, world, token) => {}
                }
            });
            // Dropping the runtime drops every connection task: their sockets close.
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        self.serving = Some(Serving { stop, thread });
        Ok(())
    }

    /// Creates or replaces EndpointSlice `name` of Service `service` in `namespace`, with one
    /// port (`port_name`, `port`) and `endpoints`: an ADDED or MODIFIED event.
    pub fn set_slice(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
        (port_name, port): (&str, u16),
        endpoints: &[Endpoint],
    ) {
        let mut w = self.world.lock().unwrap();
        w.rv += 1;
        let key = (namespace.to_string(), name.to_string());
        let kind = if w.slices.contains_key(&key) { "MODIFIED" } else { "ADDED" };
        let family =
            if endpoints.first().is_some_and(|e| e.addr.is_ipv6()) { "IPv6" } else { "IPv4" };
        let eps: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                let mut c = serde_json::Map::new();
                for (k, v) in
                    [("ready", e.ready), ("serving", e.serving), ("terminating", e.terminating)]
                {
                    if let Some(v) = v {
                        c.insert(k.into(), v.into());
                    }
                }
                json!({ "addresses": [e.addr.to_string()], "conditions": c, "nodeName": "node-1" })
            })
            .collect();
        let obj = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("uid-{namespace}-{name}"),
                "resourceVersion": w.rv.to_string(),
                "generation": w.rv,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": family,
            "endpoints": eps,
            "ports": [{ "name": port_name, "port": port, "protocol": "TCP" }],
        });
        let rv = w.rv;
        w.history.push((rv, namespace.into(), event(kind, &obj)));
        w.slices.insert(key, obj);
    }

    /// Deletes EndpointSlice `name`: a DELETED event.
    pub fn delete_slice(&self, namespace: &str, name: &str) {
        let mut w = self.world.lock().unwrap();
        let Some(mut obj) = w.slices.remove(&(namespace.to_string(), name.to_string())) else {
            return;
        };
        w.rv += 1;
        obj["metadata"]["resourceVersion"] = w.rv.to_string().into();
        let rv = w.rv;
        w.history.push((rv, namespace.into(), event("DELETED", &obj)));
    }

    /// Compacts the history: every resourceVersion so far is expired, and each open watch ends
    /// with a 410 Gone ERROR event, as after an etcd compaction.
    pub fn expire(&self) {
        let mut w = self.world.lock().unwrap();
        w.compacted = w.rv;
        w.epoch += 1;
    }

    /// Lists served, watches started.
    pub fn counts(&self) -> (u64, u64) {
        let w = self.world.lock().unwrap();
        (w.lists, w.watches)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn event(kind: &str, obj: &Value) -> String {
    json!({ "type": kind, "object": obj }).to_string() + "\n"
}

type Body = BoxBody<Bytes, Infallible>;

async fn accept(
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
        w.lists += 1;
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
    w.watches += 1;
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
