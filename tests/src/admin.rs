//! The admin API client of the tests: raw HTTP/1.1 from inside a namespace, so a test sees the
//! status and body exactly as an operator's tool would, with or without a token.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::Context as _;

use crate::netns::Netns;

/// Requests to one daemon's admin API from inside its namespace.
pub struct Admin {
    ns: Netns,
    addr: SocketAddr,
    token: Option<String>,
}

impl Admin {
    /// A client for the admin API at `addr` as seen from `ns`, without a token.
    pub fn new(ns: &Netns, addr: SocketAddr) -> Self {
        Self { ns: ns.share(), addr, token: None }
    }

    /// The same client sending `token` as its bearer token (none for `None`).
    pub fn token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(str::to_string);
        self
    }

    /// `method path` with an empty body: (status, body).
    pub fn request(&self, method: &str, path: &str) -> anyhow::Result<(u16, String)> {
        self.send(method, path, None)
    }

    /// `method path` with an optional JSON body: (status, body).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, String)> {
        let auth = self.token.as_ref().map(|t| format!("authorization: Bearer {t}\r\n"));
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        // As the CLI: every change says its body is JSON (the daemon refuses others).
        let kind = if method == "GET" { "" } else { "content-type: application/json\r\n" };
        self.raw(&format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\n{}{kind}content-length: {}\r\nconnection: close\r\n\r\n{body}",
            self.addr,
            auth.unwrap_or_default(),
            body.len()
        ))
    }

    /// Sends `request` exactly as given (head and body; it should say `connection: close`):
    /// (status, body). For the requests the CLI never makes: a browser's, a rebinding one.
    pub fn raw(&self, request: &str) -> anyhow::Result<(u16, String)> {
        let addr = self.addr;
        let mut s =
            self.ns.run(move || TcpStream::connect_timeout(&addr, Duration::from_secs(3)))??;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (head, body) = resp.split_once("\r\n\r\n").context("no end of headers")?;
        let status = head.get(9..12).context("short status line")?.parse()?;
        Ok((status, body.to_string()))
    }

    /// The body of `GET path`, which must answer 200.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let (status, body) = self.request("GET", path)?;
        anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
        Ok(body)
    }

    /// The value of the Prometheus sample `series` (name and labels) on `/metrics` now.
    pub fn metric(&self, series: &str) -> u64 {
        sample(&self.get("/metrics").expect("/metrics"), series)
    }
}

/// The value of the Prometheus sample `series` (name and labels) in `text`.
pub fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
}
