//! `[upstream.NAME]`: a named group of backends shared by the L7 proxy and the userspace L4
//! proxy (`lb backend add|remove|drain|list NAME` changes it at runtime).
use serde::Deserialize;

use super::BackendSpec;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// round-robin | least-conn | p2c-ewma | hash-source-ip | hash-header:NAME | hash-cookie:NAME
    #[serde(default = "default_balance")]
    pub balance: String,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

fn default_balance() -> String {
    "round-robin".into()
}
