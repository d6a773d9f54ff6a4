//! `[http]`: the L7 proxy's listeners, routes, limits and timeouts.
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

use super::UpstreamConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default)]
    pub listener: Vec<ListenerConfig>,
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// Peers whose X-Forwarded-* and Forwarded headers are kept (addresses or CIDRs); from any
    /// other peer they are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<Cidr>,
    /// Time allowed to send a request's headers (slowloris), in milliseconds.
    #[serde(default = "default_header_timeout_ms")]
    pub header_timeout_ms: u64,
    /// A client connection with no request in flight for this long is closed, in milliseconds.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Bytes of request line and headers (HTTP/1 read buffer, HTTP/2 header list); over → 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Header count of one request; over → 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Request body bytes; over → 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Client connections open at once per listener; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// On shutdown, how long in-flight requests may take to finish, in milliseconds.
    #[serde(default = "default_grace_ms")]
    pub grace_ms: u64,
    /// A request body that sends nothing for this long gets 408, in milliseconds (never a
    /// backend failure).
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// A request in flight ends when its client takes no response bytes (or its backend sends
    /// none mid-body) for this long, in milliseconds (Envoy's stream idle timeout).
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// An upgraded connection (WebSocket) with no bytes either way for this long is closed,
    /// in milliseconds.
    #[serde(default = "default_tunnel_idle_timeout_ms")]
    pub tunnel_idle_timeout_ms: u64,
    /// Route on the normalized path (dot segments, `//`, unreserved escapes) and forward it.
    #[serde(default = "default_true")]
    pub normalize_path: bool,
    /// One line per request on the `lb::access` log target: `text`, `json` or `off`.
    #[serde(default)]
    pub access_log: AccessLog,
    /// Streams one HTTP/2 client connection may have open at once.
    #[serde(default = "default_h2_streams")]
    pub h2_max_concurrent_streams: u32,
    /// An idle HTTP/2 client connection is PINGed this often, in milliseconds, and closed
    /// when the PING goes unanswered for as long.
    #[serde(default = "default_h2_keepalive_ms")]
    pub h2_keepalive_ms: u64,
}

/// `[http] access_log`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    #[default]
    Text,
    Json,
    Off,
}

impl Default for HttpConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// `[[http.listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// Certificates chosen by SNI; empty means plain HTTP (and h2c by prior knowledge).
    #[serde(default)]
    pub tls: Vec<CertConfig>,
    /// SO_REUSEPORT: a second `lb run` with the same config binds alongside this one
    /// (Kubernetes rolling updates); see `upgrade::overlap`.
    #[serde(default)]
    pub reuse_port: bool,
}

/// One certificate chain and its key, PEM files; names come from the certificate's SANs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[[http.route]]`: the most specific match wins (exact host, then wildcard, then none; then
/// the longest path prefix).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub listener: String,
    /// `api.example.com` or `*.example.com`; absent matches every host.
    pub host: Option<String>,
    /// A path prefix starting with `/`; absent matches every path.
    pub path: Option<String>,
    pub upstream: String,
}

impl HttpConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.stream_idle_timeout_ms)
    }
    pub fn h2_keepalive(&self) -> Duration {
        Duration::from_millis(self.h2_keepalive_ms)
    }
    pub fn tunnel_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.tunnel_idle_timeout_ms)
    }

    pub(super) fn validate(
        &self,
        upstreams: &BTreeMap<String, UpstreamConfig>,
        errors: &mut Vec<String>,
    ) {
        let mut names = HashSet::new();
        for l in &self.listener {
            if !names.insert(l.name.as_str()) {
                errors.push(format!("duplicate http.listener name {:?}", l.name));
            }
        }
        for r in &self.route {
            if !names.contains(r.listener.as_str()) {
                errors.push(format!("http.route: no http.listener named {:?}", r.listener));
            }
            if !upstreams.contains_key(&r.upstream) {
                errors.push(format!("http.route: no [upstream.{}]", r.upstream));
            }
            if let Some(h) = &r.host {
                let bare = h.strip_prefix("*.").unwrap_or(h);
                if bare.is_empty() || bare.contains('*') || bare.contains(':') {
                    errors.push(format!(
                        "http.route host {h:?}: use a name or *.name (no port, one leading *)"
                    ));
                }
            }
            if r.path.as_deref().is_some_and(|p| !p.starts_with('/')) {
                errors.push(format!("http.route path {:?} must start with /", r.path));
            }
        }
        if self.max_header_bytes < 8192 {
            errors.push("http.max_header_bytes must be at least 8192".into());
        }
        if self.max_connections == 0 || self.max_headers == 0 {
            errors.push("http.max_connections and http.max_headers must be at least 1".into());
        }
        if self.max_headers > crate::l7::MAX_HEADERS {
            errors.push(format!(
                "http.max_headers must be at most {} (the parser's field slots)",
                crate::l7::MAX_HEADERS
            ));
        }
        let timeouts = [
            self.header_timeout_ms,
            self.idle_timeout_ms,
            self.body_timeout_ms,
            self.stream_idle_timeout_ms,
            self.tunnel_idle_timeout_ms,
            self.h2_keepalive_ms,
        ];
        if self.h2_max_concurrent_streams == 0 {
            errors.push("http.h2_max_concurrent_streams must be at least 1".into());
        }
        if timeouts.contains(&0) {
            errors.push("http timeouts must be at least 1 ms".into());
        }
    }
}

fn default_header_timeout_ms() -> u64 {
    10_000
}
fn default_idle_timeout_ms() -> u64 {
    60_000
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_max_body_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_grace_ms() -> u64 {
    10_000
}
fn default_body_timeout_ms() -> u64 {
    30_000
}
fn default_stream_idle_timeout_ms() -> u64 {
    300_000
}
fn default_tunnel_idle_timeout_ms() -> u64 {
    3_600_000
}
fn default_true() -> bool {
    true
}
fn default_h2_streams() -> u32 {
    100
}
fn default_h2_keepalive_ms() -> u64 {
    30_000
}

/// An address block, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_eq(u32::from(net) as u128, u32::from(ip) as u128, self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

fn mask_eq(a: u128, b: u128, prefix: u8, bits: u8) -> bool {
    let shift = u32::from(bits - prefix);
    a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => {
                p.parse().ok().filter(|p| *p <= max).ok_or(format!("bad prefix in {s:?}"))?
            }
            None => max,
        };
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.2.3.4".parse().unwrap()));
        assert!(c.contains("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!("fd00::/8".parse::<Cidr>().unwrap().contains("fd12::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
    }
}
