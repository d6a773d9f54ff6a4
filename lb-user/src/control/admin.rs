//! The admin API server: HTTP with JSON, loopback by default. Reads are GET; changes are POST
//! or DELETE, so a stray GET (a browser, a crawler) never changes anything.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use super::state::{AddBackend, Change, State};

/// Admin request bodies are small JSON documents.
const MAX_BODY: usize = 64 * 1024;

/// Serves the admin API on `listener` until `shutdown` turns true.
pub async fn run(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.changed() => return Ok(()),
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, state.clone()));
            if let Err(e) =
                http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                log::debug!("admin connection: {e}");
            }
        });
    }
}

/// Binds the admin listener, with an error that says what to change.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen for the admin API on {addr}: {e}. Is another lb running? Set [admin] listen to a free address"
        )
    })
}

type Resp = Response<Full<Bytes>>;

async fn handle(req: Request<Incoming>, state: Arc<State>) -> Result<Resp, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (&method, segments.as_slice()) {
        (&Method::GET, ["status"]) => json(StatusCode::OK, &state.status()),
        (&Method::GET, ["live"]) => json(StatusCode::OK, &serde_json::json!({"live": true})),
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
        (&Method::POST, ["services", name, "backends", addr, "drain"]) => match addr.parse() {
            Ok(addr) => done(state.change(name, addr, Change::Drain)),
            Err(_) => error(StatusCode::BAD_REQUEST, &format!("{addr:?} is not an ADDR:PORT")),
        },
        (_, ["status" | "live" | "stats" | "services"] | ["services", _]) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "read-only resource: use GET")
        }
        (_, ["services", _, "backends", ..]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "use POST /services/NAME/backends, DELETE /services/NAME/backends/ADDR or POST /services/NAME/backends/ADDR/drain",
        ),
        _ => error(StatusCode::NOT_FOUND, "no such resource; try /status, /stats or /services"),
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
