//! Who may talk to the admin API. A page in a browser on the host can reach a loopback
//! listener (a `no-cors` fetch or a form POST goes out even though the page cannot read the
//! answer), and DNS rebinding lets a page send requests whose `Host` is the attacker's name.
//! The admin API's clients are lb's CLI, probes and scrapers, none of which is a browser, so
//! every request is checked before anything else:
//! - a `Host` that is not the admin address, a loopback address or `localhost` → 403 (a
//!   rebinding request carries the attacker's DNS name);
//! - an `Origin` header, or `Sec-Fetch-Site` other than `none` (a user typing the URL) → 403:
//!   only browsers send them, and a page's request always carries one;
//! - a change (any method but GET and HEAD) without `Content-Type: application/json` → 415:
//!   the bodies a page can send without a CORS preflight are forms and plain text;
//! - then the bearer token, when one is configured (the probes `/live` and `/ready` need
//!   none).
use std::net::{IpAddr, SocketAddr};

use hyper::{Method, Request, StatusCode, header};

use crate::config::AdminConfig;

/// Why a request is refused: the status and the message that says what to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }
}

/// Checks `req` against the rules above. `probe`: `/live` or `/ready`, which need no token.
pub fn check<B>(req: &Request<B>, admin: &AdminConfig, probe: bool) -> Result<(), Refusal> {
    let headers = req.headers();
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or_default();
        if !host_allowed(host, admin.listen) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {host:?} is not this admin API's address: use {} (or localhost); a name that resolves here is refused because a web page could use it (DNS rebinding)",
                    admin.listen
                ),
            ));
        }
    }
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if headers.contains_key(header::ORIGIN) || fetch_site.is_some_and(|s| s != "none") {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "requests from web pages are refused: the admin API is for the lb CLI and tools (curl, probes, scrapers)",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD && !json(req) {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "changes need Content-Type: application/json (the lb CLI sends it; with curl add -H 'content-type: application/json')",
        ));
    }
    if !probe && !authorized(req, admin) {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token: pass --token or set LB_ADMIN_TOKEN",
        ));
    }
    Ok(())
}

/// `localhost`, a loopback address, the listen address, or any address when `listen` is a
/// wildcard; the port is not compared (a port forward may change it).
fn host_allowed(host: &str, listen: SocketAddr) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip == listen.ip() || listen.ip().is_unspecified(),
        Err(_) => false,
    }
}

/// The media type is `application/json` (parameters such as `charset` allowed).
fn json<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// True without a configured token, or when the request carries it.
fn authorized<B>(req: &Request<B>, admin: &AdminConfig) -> bool {
    let Some(token) = &admin.token else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

/// Compares without an early exit, so the time taken says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let diff = a.iter().zip(b).fold(a.len() ^ b.len(), |d, (x, y)| d | usize::from(x ^ y));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(listen: &str, token: Option<&str>) -> AdminConfig {
        let mut a: AdminConfig = toml::from_str(&format!("listen = {listen:?}")).unwrap();
        a.token = token.map(str::to_string);
        a
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut r = Request::builder().method(method).uri("/services/web/backends");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(()).unwrap()
    }

    fn status(r: Result<(), Refusal>) -> u16 {
        r.map_or_else(|e| e.status.as_u16(), |()| 200)
    }

    #[test]
    fn hosts() {
        let lo: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        for ok in
            ["127.0.0.1:9901", "localhost:9901", "LOCALHOST", "[::1]:9901", "127.0.0.2", "[::1]"]
        {
            assert!(host_allowed(ok, lo), "{ok}");
        }
        for bad in ["evil.example:9901", "10.0.0.1:9901", "localhost.evil.example", "[fe80::1]"] {
            assert!(!host_allowed(bad, lo), "{bad}");
        }
        let node: SocketAddr = "10.0.0.1:9901".parse().unwrap();
        assert!(host_allowed("10.0.0.1:9901", node));
        assert!(!host_allowed("10.0.0.2:9901", node));
        let any: SocketAddr = "0.0.0.0:9901".parse().unwrap();
        assert!(host_allowed("192.0.2.7:9901", any), "a wildcard listen: any address literal");
        assert!(!host_allowed("lb.example:9901", any), "but never a name");
    }

    #[test]
    fn browsers_forms_and_tokens() {
        let a = admin("127.0.0.1:9901", None);
        let cli = [("host", "127.0.0.1:9901"), ("content-type", "application/json")];
        assert_eq!(status(check(&req("POST", &cli), &a, false)), 200);
        assert_eq!(status(check(&req("GET", &[("host", "127.0.0.1:9901")]), &a, false)), 200);
        let json_utf8 = [("content-type", "Application/JSON; charset=utf-8")];
        assert_eq!(status(check(&req("DELETE", &json_utf8), &a, false)), 200);
        let page = [
            ("host", "127.0.0.1:9901"),
            ("origin", "https://evil.example"),
            ("content-type", "text/plain"),
        ];
        assert_eq!(status(check(&req("POST", &page), &a, false)), 403);
        let no_cors_get = [("sec-fetch-site", "cross-site")];
        assert_eq!(status(check(&req("GET", &no_cors_get), &a, false)), 403);
        let typed_url = [("sec-fetch-site", "none")];
        assert_eq!(status(check(&req("GET", &typed_url), &a, false)), 200);
        let form = [("content-type", "application/x-www-form-urlencoded")];
        assert_eq!(status(check(&req("POST", &form), &a, false)), 415);
        assert_eq!(status(check(&req("POST", &[]), &a, false)), 415);
        let rebound = [("host", "attacker.example:9901"), ("content-type", "application/json")];
        assert_eq!(status(check(&req("POST", &rebound), &a, false)), 403);

        let t = admin("127.0.0.1:9901", Some("secret"));
        assert_eq!(status(check(&req("POST", &cli), &t, false)), 401);
        let with = [("content-type", "application/json"), ("authorization", "Bearer secret")];
        assert_eq!(status(check(&req("POST", &with), &t, false)), 200);
        assert_eq!(status(check(&req("GET", &[]), &t, true)), 200, "probes need no token");
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret-token", b"secret-token"));
        assert!(!constant_time_eq(b"secret-token", b"secret-tokex"));
        assert!(!constant_time_eq(b"secret", b"secret-token"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
