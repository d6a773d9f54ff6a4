//! `[health.NAME]`: active health checks of the backends of the XDP service or upstream group
//! called NAME (TCP connect, or HTTP(S) GET with an expected status), with rise/fall counts.
use std::time::Duration;

use serde::Deserialize;

use super::Secs;

/// One check, run against every backend of its service or group.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// tcp (connect) | http | https (GET `path`, expect `expect`).
    #[serde(rename = "type", default)]
    pub kind: CheckKind,
    /// The request path of http and https checks.
    #[serde(default = "default_path")]
    pub path: String,
    /// The status an http(s) check expects.
    #[serde(default = "default_expect")]
    pub expect: u16,
    /// Host header (and SNI for https); default: the backend's address.
    pub host: Option<String>,
    /// Seconds between two checks of a backend (e.g. 2 or 0.5).
    #[serde(default = "default_interval")]
    pub interval: Secs,
    /// Seconds one check may take; at most `interval`.
    #[serde(default = "default_timeout")]
    pub timeout: Secs,
    /// Successes in a row that bring a down backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that take an up backend out.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect that completes.
    #[default]
    Tcp,
    /// HTTP/1.1 GET with the expected status.
    Http,
    /// HTTP/1.1 GET over TLS (the certificate is not verified: this checks liveness).
    Https,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
        }
    }
}

fn default_path() -> String {
    "/".into()
}
fn default_expect() -> u16 {
    200
}
fn default_interval() -> Secs {
    Secs(Duration::from_secs(2))
}
fn default_timeout() -> Secs {
    Secs(Duration::from_secs(1))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl HealthConfig {
    pub fn interval(&self) -> Duration {
        self.interval.0
    }
    pub fn timeout(&self) -> Duration {
        self.timeout.0
    }

    /// Appends every problem; `exists` tells whether NAME is a service or group.
    pub(super) fn validate(&self, name: &str, exists: bool, errors: &mut Vec<String>) {
        if !exists {
            errors.push(format!(
                "health.{name}: no [[xdp.service]] or [upstream.{name}] named {name:?}: name the service or upstream group to check"
            ));
        }
        if self.kind != CheckKind::Tcp && !self.path.starts_with('/') {
            errors.push(format!(
                "health.{name}.path {:?} must start with /, e.g. path = \"/healthz\"",
                self.path
            ));
        }
        if !(100..=599).contains(&self.expect) {
            errors.push(format!(
                "health.{name}.expect = {} is not an HTTP status: use 100..=599, e.g. expect = 200",
                self.expect
            ));
        }
        if self.timeout.0 > self.interval.0 {
            errors.push(format!(
                "health.{name}.timeout ({:?}) is longer than health.{name}.interval ({:?}): use timeout <= interval so a backend is out within interval x fall",
                self.timeout.0, self.interval.0
            ));
        }
        if self.rise == 0 || self.fall == 0 {
            errors.push(format!(
                "health.{name}: rise and fall must be at least 1, e.g. rise = 2, fall = 3"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_seconds() {
        let h: HealthConfig =
            toml::from_str("type = \"http\"\ninterval = 0.5\ntimeout = 0.25").unwrap();
        assert_eq!(h.kind, CheckKind::Http);
        assert_eq!(h.interval(), Duration::from_millis(500));
        assert_eq!(h.timeout(), Duration::from_millis(250));
        assert_eq!((h.rise, h.fall, h.expect, h.path.as_str()), (2, 3, 200, "/"));
        assert!(toml::from_str::<HealthConfig>("interval = -1").is_err());
        assert!(toml::from_str::<HealthConfig>("type = \"udp\"").is_err());
    }
}
