//! A Kubernetes API server of the tests' own, for EndpointSlices only, speaking the real
//! protocol over HTTPS (no API server can be installed here): a list with its
//! resourceVersion, watches that replay history after a resourceVersion and then stream
//! ADDED/MODIFIED/DELETED events and BOOKMARKs, a 410 Gone ERROR event for an expired
//! resourceVersion, bearer-token auth, and a stop and restart on the same port. The objects
//! are kept across restarts, as etcd keeps them; open watches end with the server.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};

use crate::netns::Netns;

pub mod observe;
mod serve;

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
    counts: Counts,
}

/// What the server has answered so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub lists: u64,
    pub watches: u64,
    pub bookmarks: u64,
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
                    _ = serve::accept(listener, acceptor, world, token) => {}
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

    /// Lists served, watches started, BOOKMARKs sent.
    pub fn counts(&self) -> Counts {
        self.world.lock().unwrap().counts
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
