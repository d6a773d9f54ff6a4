//! `[upstream.NAME]`: a named group of backends shared by the L7 proxy and the userspace L4
//! proxy (`lb backend add|remove|drain|list NAME` changes it at runtime), with how the L7 proxy
//! balances over it and talks to it.
use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use serde::Deserialize;

use super::{BackendSpec, BackendsFrom};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// round-robin | least-conn | p2c-ewma | hash-source-ip | hash-header:NAME | hash-cookie:NAME.
    /// Absent: round-robin for the L7 proxy, hash-source-ip (Maglev, as XDP) for L4 listeners.
    #[serde(default)]
    pub balance: Option<Balance>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// The backend set from Kubernetes EndpointSlices instead of `backends`.
    pub backends_from: Option<BackendsFrom>,
    /// TCP connect timeout to one backend, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time from sending a request until the backend's response headers arrive, in milliseconds.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Idle keep-alive connections kept per backend.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// How long an idle pooled connection is kept, in milliseconds.
    #[serde(default = "default_pool_idle_timeout_ms")]
    pub pool_idle_timeout_ms: u64,
    /// Speak HTTP/2 (prior knowledge, or ALPN with `tls`) to the backends.
    #[serde(default)]
    pub http2: bool,
    /// TLS to the backends; absent means plain TCP.
    pub tls: Option<UpstreamTls>,
    /// Consecutive connect or response failures that eject a backend (0 never ejects).
    #[serde(default = "default_eject_after")]
    pub eject_after: u32,
    /// How long an ejected backend gets no requests, in milliseconds.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// Requests in flight to one backend at most (its connections, for HTTP/1.1); beyond it
    /// another backend is tried, and 503 when none has room (Envoy's circuit breaker). 0: no cap.
    #[serde(default)]
    pub max_connections_per_backend: u64,
}

/// TLS from the proxy to the backends of a group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified in the certificate.
    pub sni: String,
    /// PEM file of CA certificates to trust; absent means the Mozilla roots (webpki-roots).
    pub ca: Option<PathBuf>,
}

impl UpstreamConfig {
    /// The policy the L7 proxy applies (round robin unless `balance` says otherwise).
    pub fn http_balance(&self) -> Balance {
        self.balance.clone().unwrap_or_default()
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_idle_timeout_ms)
    }
    pub fn eject_for(&self) -> Duration {
        Duration::from_millis(self.eject_ms)
    }

    pub(super) fn validate(&self, name: &str, errors: &mut Vec<String>) {
        if let Some(from) = &self.backends_from {
            from.validate(&format!("upstream.{name}"), !self.backends.is_empty(), errors);
        }
        let mut seen = std::collections::HashSet::new();
        for b in &self.backends {
            if b.weight() == 0 {
                errors.push(format!("upstream.{name}: backend {} has weight 0", b.addr()));
            }
            if !seen.insert(b.addr()) {
                errors.push(format!("upstream.{name}: backend {} is listed twice", b.addr()));
            }
        }
        if self.connect_timeout_ms == 0 || self.response_timeout_ms == 0 {
            errors.push(format!("upstream.{name}: timeouts must be at least 1 ms"));
        }
        if let Some(tls) = &self.tls
            && rustls_pki_types::ServerName::try_from(tls.sni.as_str()).is_err()
        {
            errors.push(format!("upstream.{name}: tls.sni {:?} is not a DNS name", tls.sni));
        }
    }
}

fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_response_timeout_ms() -> u64 {
    30_000
}
fn default_pool_max_idle() -> usize {
    64
}
fn default_pool_idle_timeout_ms() -> u64 {
    60_000
}
fn default_eject_after() -> u32 {
    5
}
fn default_eject_ms() -> u64 {
    10_000
}

/// A balancing policy, written as the documented strings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum Balance {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest requests in flight per unit of weight.
    LeastConn,
    /// Power of two random choices, scored by peak-EWMA latency times load.
    P2cEwma,
    /// Consistent hash of the client IP address.
    HashSourceIp,
    /// Consistent hash of a request header's value (falls back to round robin without it).
    HashHeader(String),
    /// Consistent hash of a cookie's value (falls back to round robin without it).
    HashCookie(String),
}

impl Balance {
    /// Whether an L4 listener can apply it: it sees no request (no header, no cookie) and
    /// measures no response latency.
    pub fn applies_to_l4(&self) -> bool {
        matches!(self, Self::HashSourceIp | Self::RoundRobin | Self::LeastConn)
    }
}

impl FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let named = |prefix: &str| -> Option<Result<String, String>> {
            let name = s.strip_prefix(prefix)?;
            Some(if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
                Err(format!("balance {s:?}: {prefix} needs a name, as in {prefix}x-user"))
            } else {
                Ok(name.to_string())
            })
        };
        match s {
            "round-robin" => Ok(Self::RoundRobin),
            "least-conn" => Ok(Self::LeastConn),
            "p2c-ewma" => Ok(Self::P2cEwma),
            "hash-source-ip" => Ok(Self::HashSourceIp),
            _ => {
                if let Some(h) = named("hash-header:") {
                    let h = h?;
                    hyper::header::HeaderName::from_str(&h)
                        .map_err(|_| format!("balance {s:?}: {h:?} is not a header name"))?;
                    Ok(Self::HashHeader(h.to_ascii_lowercase()))
                } else if let Some(c) = named("hash-cookie:") {
                    Ok(Self::HashCookie(c?))
                } else {
                    Err(format!(
                        "unknown balance {s:?}; use round-robin | least-conn | p2c-ewma | hash-source-ip | hash-header:NAME | hash-cookie:NAME"
                    ))
                }
            }
        }
    }
}

impl TryFrom<String> for Balance {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RoundRobin => f.write_str("round-robin"),
            Self::LeastConn => f.write_str("least-conn"),
            Self::P2cEwma => f.write_str("p2c-ewma"),
            Self::HashSourceIp => f.write_str("hash-source-ip"),
            Self::HashHeader(h) => write!(f, "hash-header:{h}"),
            Self::HashCookie(c) => write!(f, "hash-cookie:{c}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_balance_string_round_trips() {
        for s in [
            "round-robin",
            "least-conn",
            "p2c-ewma",
            "hash-source-ip",
            "hash-header:x-user",
            "hash-cookie:session",
        ] {
            assert_eq!(s.parse::<Balance>().unwrap().to_string(), s);
        }
        assert_eq!(
            "hash-header:X-User".parse::<Balance>(),
            Ok(Balance::HashHeader("x-user".into()))
        );
        for bad in ["rr", "hash-header:", "hash-header:a b", "hash-cookie:"] {
            assert!(bad.parse::<Balance>().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_apply() {
        let c: UpstreamConfig = toml::from_str(r#"backends = ["10.0.0.1:80"]"#).unwrap();
        assert_eq!(c.balance, None);
        assert_eq!(c.http_balance(), Balance::RoundRobin);
        assert!(!c.http2 && c.tls.is_none());
        assert_eq!(c.connect_timeout(), Duration::from_secs(3));
    }
}
