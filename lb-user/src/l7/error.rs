//! Proxy errors, classified once and mapped to an HTTP status in one place.
use std::net::SocketAddr;

use hyper::{Response, StatusCode, header};
use thiserror::Error;

use super::body::ResponseBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Error)]
pub enum ProxyError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("no backend available")]
    NoBackend,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("too many request header fields")]
    HeadersTooLarge,
    #[error("request body too large")]
    BodyTooLarge,
    #[error("the request body stalled past body_timeout_ms")]
    BodyTimeout,
    #[error("CONNECT is not served (lb is a reverse proxy)")]
    Method,
    #[error("cannot connect to backend {addr}: {source}")]
    Connect { addr: SocketAddr, source: BoxError },
    #[error("backend {addr} failed: {source}")]
    Upstream { addr: SocketAddr, source: BoxError },
    #[error("backend {addr} timed out")]
    Timeout { addr: SocketAddr },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::Connect { .. } | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The client connection cannot carry another request (its framing or body is unknown).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::BadRequest(_)
                | Self::BodyTooLarge
                | Self::HeadersTooLarge
                | Self::BodyTimeout
                | Self::Method
        )
    }

    /// The backend itself failed: counts toward its ejection.
    pub fn blames_backend(&self) -> bool {
        matches!(self, Self::Connect { .. } | Self::Upstream { .. } | Self::Timeout { .. })
    }

    /// A short plain-text response; details stay in the log, not in the body.
    pub fn response(&self) -> Response<ResponseBody> {
        let status = self.status();
        let mut b = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8");
        if self.closes_connection() {
            b = b.header(header::CONNECTION, "close");
        }
        let text = format!("{} {}\n", status.as_u16(), status.canonical_reason().unwrap_or(""));
        b.body(ResponseBody::full(text.into())).expect("static response parts")
    }
}

/// True when `e` or anything in its source chain is an I/O timeout.
pub fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || err.to_string().contains("timed out")
        {
            return true;
        }
        cur = err.source();
    }
    false
}
