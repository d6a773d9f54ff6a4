//! A backend as written in the config: `"10.1.0.2:80"` or `{ addr = "10.1.0.3:80", weight = 2 }`.
use std::net::SocketAddr;

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum BackendSpec {
    Addr(SocketAddr),
    Weighted {
        addr: SocketAddr,
        #[serde(default = "one")]
        weight: u32,
    },
}

fn one() -> u32 {
    1
}

impl BackendSpec {
    pub fn addr(&self) -> SocketAddr {
        match *self {
            BackendSpec::Addr(a) | BackendSpec::Weighted { addr: a, .. } => a,
        }
    }

    pub fn weight(&self) -> u32 {
        match *self {
            BackendSpec::Addr(_) => 1,
            BackendSpec::Weighted { weight, .. } => weight,
        }
    }
}

/// `backends_from = { kubernetes = "NAMESPACE/SERVICE", port = "NAME" }`: the backend set comes
/// from the Service's EndpointSlices instead of a `backends` list.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendsFrom {
    /// `NAMESPACE/SERVICE`.
    pub kubernetes: String,
    /// The EndpointSlice port's name (a number also matches the port number).
    pub port: String,
}

impl BackendsFrom {
    /// The namespace and the Service name, once validated.
    pub fn service(&self) -> Option<(&str, &str)> {
        let (ns, svc) = self.kubernetes.split_once('/')?;
        let dns_label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        (dns_label(ns) && dns_label(svc)).then_some((ns, svc))
    }

    /// Appends what is wrong; `at` is the key path the messages name (`upstream.api` or
    /// `xdp.service` with `name`), `listed` whether `backends` is given too.
    pub(super) fn validate(&self, at: &str, listed: bool, errors: &mut Vec<String>) {
        if listed {
            errors.push(format!("{at}.backends and backends_from are both given: the backend set comes from one place, remove one of them"));
        }
        if self.service().is_none() {
            errors.push(format!("{at}.backends_from.kubernetes = {:?} is not NAMESPACE/SERVICE (lowercase DNS labels), e.g. \"default/web\"", self.kubernetes));
        }
        if self.port.is_empty() {
            errors.push(format!("{at}.backends_from.port is empty: name the Service port (its `name`, or its number)"));
        }
    }
}
