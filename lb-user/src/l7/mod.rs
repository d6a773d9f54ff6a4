//! The L7 proxy: HTTP/1.1 and HTTP/2 listeners (TLS optional), routing by host and path,
//! balancing over upstream groups, pooled connections to backends.
pub mod access;
mod body;
mod error;
mod framing;
pub mod h1;
mod h2pool;
mod headers;
pub mod path;
mod proxy;
pub mod route;
mod server;
mod upstream;
mod warn;

use std::{net::SocketAddr, sync::Arc};

use thiserror::Error;

pub use error::ProxyError;
/// The most header fields one HTTP/1 head may carry (`http.max_headers` is capped here).
pub const MAX_HEADERS: usize = h1::head::MAX_FIELDS;
pub use server::Server;

use crate::{config::Config, tls::TlsError, upstream::Groups};

/// Why the L7 proxy cannot start.
#[derive(Debug, Error)]
pub enum L7Error {
    #[error("http.listener {listener}: {source}")]
    Tls { listener: String, source: TlsError },
    #[error("http.listener {listener}: cannot listen on {addr}: {source}")]
    Bind { listener: String, addr: SocketAddr, source: std::io::Error },
    #[error("upstream.{group}: {message}")]
    Upstream { group: String, message: String },
}

/// Builds a server per `[[http.listener]]` over the runtime `groups` (shared with the admin
/// API and the L4 proxy); binds nothing.
pub fn build(config: &Config, groups: &Groups) -> Result<Vec<Arc<Server>>, L7Error> {
    let upstreams = upstream::build(&config.upstream, groups)?;
    config.http.listener.iter().map(|l| Server::new(l, config, &upstreams).map(Arc::new)).collect()
}
