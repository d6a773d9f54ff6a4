//! The access log: one line per request on the `lb::access` log target (`[http] access_log`),
//! as text or as one JSON object per line with fixed field names. Built only when the line is
//! written: a deployment that logs at `warn` pays nothing per request.
use std::{net::SocketAddr, time::Duration};

use serde::Serialize;

use crate::config::AccessLog;

/// One request, as the access log shows it.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    /// Seconds since the Unix epoch, with milliseconds.
    pub time: f64,
    pub listener: &'a str,
    pub client: SocketAddr,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub backend: Option<SocketAddr>,
    /// Response body bytes sent to the client (known length for HTTP/2 clients).
    pub bytes: u64,
    /// Milliseconds from the complete request head to the end of the response.
    pub duration: f64,
}

/// True when a line would be written: the caller builds one only then.
pub fn enabled(format: AccessLog) -> bool {
    format != AccessLog::Off && log::log_enabled!(target: "lb::access", log::Level::Info)
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

pub fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

/// Writes `line` in `format`.
pub fn write(format: AccessLog, line: &Line<'_>) {
    match format {
        AccessLog::Off => {}
        AccessLog::Json => match serde_json::to_string(line) {
            Ok(json) => log::info!(target: "lb::access", "{json}"),
            Err(e) => log::warn!("access log: {e}"),
        },
        AccessLog::Text => log::info!(
            target: "lb::access",
            "{} {} \"{} {}{}\" {} backend={} bytes={} {:.1}ms",
            line.listener,
            line.client,
            line.method,
            line.authority,
            line.path,
            line.status,
            line.backend.map_or_else(|| "-".to_string(), |b| b.to_string()),
            line.bytes,
            line.duration
        ),
    }
}
