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
