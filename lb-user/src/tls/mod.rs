//! TLS with rustls: termination for the L7 listeners (certificates by SNI, reloadable) and
//! verified TLS from the proxy to backends.
mod client;
mod resolver;

use std::{path::PathBuf, sync::Arc};

use rustls::ServerConfig;
use thiserror::Error;

pub use client::client_config;
pub use resolver::SniResolver;

/// A certificate or key that cannot be used, with the file at fault.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// ALPN protocols offered to clients, preferred first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A server config with TLS 1.2 and 1.3 only, ALPN h2 + http/1.1, and certificates from
/// `resolver` (so a reload changes them for new handshakes without a new config).
pub fn server_config(resolver: Arc<SniResolver>) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
