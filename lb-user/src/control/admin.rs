//! The admin API server: HTTP with JSON, loopback by default. Reads are GET; changes are POST,
//! PUT or DELETE, so a stray GET (a browser, a crawler) never changes anything. Every request
//! passes [`guard::check`] first: no browser pages, no rebinding `Host`, JSON bodies only, and
//! the bearer token when one is configured.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpSocket, UnixListener, UnixStream},
    sync::watch,
};

use super::{
    guard, metrics, reload,
    state::{AddBackend, Change, SetWeight, State},
};
use crate::config::AdminConfig;

/// Admin request bodies are small JSON documents.
const MAX_BODY: usize = 64 * 1024;

/// Serves the admin API on `listener` (and on the unix socket `local`, if any) until
/// `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    local: Option<UnixListener>,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        tokio::select! {
            accepted = listener.accept() => serve(accepted?.0, &state),
            Ok((stream, _)) = accept_local(&local) => serve(stream, &state),
            _ = shutdown.changed() => return Ok(()),
        }
    }
}

async fn accept_local(
    local: &Option<UnixListener>,
) -> std::io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
    match local {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

fn serve<S>(stream: S, state: &Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let state = state.clone();
    tokio::spawn(async move {
        let service = service_fn(move |req| handle(req, state.clone()));
        if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
        {
            log::debug!("admin connection: {e}");
        }
    });
}

/// The admin listener a replaced process handed over, else [`bind`].
pub async fn bind_from(
    admin: &AdminConfig,
    inherited: &mut crate::upgrade::Inherited,
) -> anyhow::Result<TcpListener> {
    match inherited.tcp(crate::upgrade::Kind::Admin, "admin", admin.listen) {
        Some(l) => {
            crate::upgrade::overlap::set_reuse_port(&l, admin.reuse_port)?;
            l.set_nonblocking(true)?;
            Ok(TcpListener::from_std(l)?)
        }
        None => bind(admin.listen, admin.reuse_port).await,
    }
}

/// Binds the admin listener (SO_REUSEPORT when `shared`), with an error that says what to
/// change.
pub async fn bind(addr: SocketAddr, shared: bool) -> anyhow::Result<TcpListener> {
    let bind = || {
        let s = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        s.set_reuseaddr(true)?;
        s.set_reuseport(shared)?;
        s.bind(addr)?;
        s.listen(1024)
    };
    bind().map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for the admin API on {addr}: {e}. Is another lb running? Set [admin] listen to a free address"
        )
    })
}

/// The admin API's unix socket of this process (mode 0600; a file left by a dead process is
/// replaced), or None when the config names none.
pub fn bind_local(admin: &AdminConfig) -> anyhow::Result<Option<UnixListener>> {
    let Some(path) = &admin.socket else { return Ok(None) };
    let fail = |e: std::io::Error| {
        anyhow::anyhow!(
            "cannot serve the admin API on the unix socket {}: {e}. Set [admin] socket to a writable path",
            path.display()
        )
    };
    let std = crate::upgrade::bind_private(path).map_err(fail)?;
    std.set_nonblocking(true).map_err(fail)?;
    Ok(Some(UnixListener::from_std(std).map_err(fail)?))
}

type Resp = Response<Full<Bytes>>;

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Probes (kubelet, systemd, load balancers in front) need no token.
    let probe = method == Method::GET && matches!(segments.as_slice(), ["live"] | ["ready"]);
    if let Err(refusal) = guard::check(&req, &state.config.load().admin, probe) {
        let mut resp = error(refusal.status, &refusal.message);
        if refusal.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", hyper::header::HeaderValue::from_static("Bearer"));
        }
        return Ok(resp);
    }
    let resp = match (&method, segments.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &state.status()),
        (&Method::GET, ["live"]) => json(StatusCode::OK, &serde_json::json!({"live": true})),
        (&Method::GET, ["ready"]) => {
            let ready = state.ready.load(std::sync::atomic::Ordering::Relaxed);
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            json(status, &serde_json::json!({ "ready": ready }))
        }
        (&Method::GET, ["metrics"]) => Response::builder()
            .header("content-type", metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from(metrics::render(&state))))
            .expect("static response parts"),
        (&Method::GET, ["config"]) => json(
            StatusCode::OK,
            &serde_json::json!({
                "path": state.config_path.as_ref().map(|p| p.display().to_string()),
                "config": crate::config::redacted(&state.config.load()),
            }),
        ),
        (&Method::GET, ["health"]) => {
            let list: Vec<_> = state
                .health
                .all()
                .into_iter()
                .map(|(name, addr, h)| serde_json::json!({ "service": name, "backend": addr, "health": h }))
                .collect();
            json(StatusCode::OK, &list)
        }
        (&Method::POST, ["reload"]) => match reload::reload(&state).await {
            Ok(report) => {
                for c in &report.changes {
                    log::info!("reload: {c}");
                }
                json(StatusCode::OK, &serde_json::json!({ "ok": true, "changes": report.changes }))
            }
            Err(e) => {
                log::error!("reload: {e}");
                let status =
                    StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                json(status, &serde_json::json!({ "error": e.to_string(), "errors": e.errors() }))
            }
        },
        (&Method::GET, ["stats"]) => result(state.stats(None)),
        (&Method::GET, ["services"]) => result(state.stats(None).map(|s| s.services)),
        (&Method::GET, ["services", name]) => result(state.stats(Some(name))),
        (&Method::POST, ["services", name, "backends"]) => match body::<AddBackend>(req).await {
            Ok(b) => done(state.change(name, b.addr, Change::Add(b.weight))),
            Err(resp) => resp,
        },
        (&Method::DELETE, ["services", name, "backends", addr]) => match addr.parse() {
            Ok(addr) => done(state.change(name, addr, Change::Remove)),
            Err(_) => error(StatusCode::BAD_REQUEST, &format!("{addr:?} is not an ADDR:PORT")),
        },
        (&Method::POST, ["services", name, "backends", addr, action @ ("drain" | "undrain")]) => {
            let change = if *action == "drain" { Change::Drain } else { Change::Undrain };
            match addr.parse() {
                Ok(addr) => done(state.change(name, addr, change)),
                Err(_) => error(StatusCode::BAD_REQUEST, &format!("{addr:?} is not an ADDR:PORT")),
            }
        }
        (&Method::PUT, ["services", name, "backends", addr, "weight"]) => {
            match (addr.parse(), body::<SetWeight>(req).await) {
                (Ok(addr), Ok(w)) => done(state.change(name, addr, Change::Weight(w.weight))),
                (Err(_), _) => {
                    error(StatusCode::BAD_REQUEST, &format!("{addr:?} is not an ADDR:PORT"))
                }
                (_, Err(resp)) => resp,
            }
        }
        (
            _,
            [
                "status" | "live" | "ready" | "metrics" | "config" | "health" | "stats"
                | "services",
            ]
            | ["services", _],
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "read-only resource: use GET"),
        (_, ["reload"]) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST /reload"),
        (_, ["services", _, "backends", ..]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /services/NAME/backends, DELETE /services/NAME/backends/ADDR, POST /services/NAME/backends/ADDR/drain or /undrain, PUT /services/NAME/backends/ADDR/weight",
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            "no such resource; try /status, /stats, /services, /health, /metrics, /config, /ready, /live, POST /reload",
        ),
    };
    Ok(resp)
}

async fn body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Resp> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))
}

fn result<T: serde::Serialize>(r: Result<T, super::state::StateError>) -> Resp {
    match r {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => error(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            &e.to_string(),
        ),
    }
}

fn done(r: Result<(), super::state::StateError>) -> Resp {
    result(r.map(|()| serde_json::json!({"ok": true})))
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Resp {
    let body = serde_json::to_vec_pretty(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn error(status: StatusCode, message: &str) -> Resp {
    json(status, &serde_json::json!({ "error": message }))
}
