//! The CLI side of the admin API: one request per command.
use std::net::SocketAddr;

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Sends one request to the daemon's admin API and returns the JSON body.
pub async fn call(
    admin: SocketAddr,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let stream = TcpStream::connect(admin).await.map_err(|e| {
        anyhow!("cannot reach the lb admin API at {admin}: {e}. Is `lb run` running? Pass --admin ADDR if it listens elsewhere")
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", admin.to_string())
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await.context("admin request failed")?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .with_context(|| format!("admin API answered {status} with a non-JSON body"))?;
    if !status.is_success() {
        // A list of errors (a rejected reload) reads best one per line.
        if let Some(list) = value.get("errors").and_then(|e| e.as_array()) {
            let lines: Vec<&str> = list.iter().filter_map(|e| e.as_str()).collect();
            return Err(anyhow!("the daemon refused ({status}):\n  {}", lines.join("\n  ")));
        }
        let msg = value.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error");
        return Err(anyhow!("the daemon refused: {msg} ({status})"));
    }
    Ok(value)
}
