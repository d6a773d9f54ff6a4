//! The CLI side of the admin API: one request per command, over TCP or the unix socket
//! `[admin] socket`.
use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use anyhow::{Context as _, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};

/// Where the admin API of a running daemon answers: `HOST:PORT`, or `unix:PATH` for the unix
/// socket of one process (what probes use while two processes share `listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for AdminAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Self::Unix(path.into()));
        }
        s.parse().map(Self::Tcp).map_err(|_| {
            format!("{s:?} is not an admin address: give HOST:PORT (127.0.0.1:9901) or unix:PATH")
        })
    }
}

impl fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => a.fmt(f),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One HTTP/1 connection to the admin API.
async fn connect(
    admin: &AdminAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let unreachable = |e: std::io::Error| {
        anyhow!(
            "cannot reach the lb admin API at {admin}: {e}. Is `lb run` running? Pass --admin ADDR if it listens elsewhere"
        )
    };
    macro_rules! handshake {
        ($stream:expr) => {{
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new($stream)).await?;
            tokio::spawn(conn);
            sender
        }};
    }
    Ok(match admin {
        AdminAddr::Tcp(a) => handshake!(TcpStream::connect(a).await.map_err(unreachable)?),
        AdminAddr::Unix(p) => handshake!(UnixStream::connect(p).await.map_err(unreachable)?),
    })
}

/// Sends one request to the daemon's admin API and returns the JSON body.
pub async fn call(
    admin: &AdminAddr,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let mut sender = connect(admin).await?;
    let host = match admin {
        AdminAddr::Tcp(a) => a.to_string(),
        AdminAddr::Unix(_) => "localhost".into(),
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
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
