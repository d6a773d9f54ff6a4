//! The client side toward one upstream group: a keep-alive pool per backend shared by every
//! thread (hyper-util's pooled client, keyed by scheme and backend address), HTTP/1.1 or
//! HTTP/2, plain or TLS with SNI and verification.
use std::{collections::HashMap, sync::Arc};

use hyper::Uri;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use rustls_pki_types::ServerName;

use super::{
    L7Error,
    body::RequestBody,
    h1::pool::{Pool, Tls},
    h2pool::H2Pool,
};
use crate::{
    config::{UpstreamConfig, UpstreamTls},
    upstream::{Group, Groups},
};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// One group with the client that reaches its backends.
pub struct Upstream {
    pub group: Arc<Group>,
    pub config: UpstreamConfig,
    pub client: HttpClient,
    /// `http` or `https`: the scheme of the URIs sent to the pool.
    pub scheme: &'static str,
    /// HTTP/1.1 backend connections for the HTTP/1 codec (`h1/`); `client` serves HTTP/2
    /// clients of HTTP/1.1 backends.
    pub pool: Arc<Pool>,
    /// HTTP/2 backends (`http2 = true`).
    pub h2: H2Pool,
    /// `hash-source-ip`: the Maglev table and client hash of the L4 paths, so one client meets
    /// the same backend on the XDP, userspace L4 and L7 paths of one backend set.
    pub by_client: Option<crate::l4::balance::Picker>,
}

impl Upstream {
    /// A backend for `client` not in `tried`: by the group's policy, or by Maglev for
    /// `hash-source-ip`.
    pub fn pick(
        &self,
        client: std::net::IpAddr,
        key: Option<&[u8]>,
        tried: &[std::net::SocketAddr],
    ) -> Option<Arc<crate::upstream::Backend>> {
        match &self.by_client {
            Some(p) => p.pick_avoiding(client, tried),
            None => self.group.pick(key, tried),
        }
    }

    /// False when `in_flight` (with this request counted) exceeds `max_connections_per_backend`:
    /// the request goes to another backend, or gets 503 (not the backend's fault).
    pub fn has_room(&self, in_flight: &crate::upstream::InFlight) -> bool {
        let cap = self.config.max_connections_per_backend;
        cap == 0 || in_flight.backend().in_flight.load(std::sync::atomic::Ordering::Relaxed) <= cap
    }
}

impl Upstream {
    pub fn new(group: Arc<Group>, config: &UpstreamConfig) -> Result<Self, L7Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout()));
        let pool_tls = |alpn: &[u8]| -> Result<Option<Tls>, L7Error> {
            let Some(t) = &config.tls else { return Ok(None) };
            let mut c = tls_config(&group.name, t)?;
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Some(Tls {
                connector: tokio_rustls::TlsConnector::from(Arc::new(c)),
                name: server_name(&group.name, &t.sni)?,
            }))
        };
        let h2 = H2Pool::new(config.connect_timeout(), pool_tls(b"h2")?);
        let pool_tls = pool_tls(b"http/1.1")?;
        let pool = Pool::new(
            config.pool_max_idle,
            config.pool_idle_timeout(),
            config.connect_timeout(),
            pool_tls,
        );
        let (tls, scheme) = match &config.tls {
            Some(t) => (tls_config(&group.name, t)?, "https"),
            // Plain groups share the connector type; http:// URIs never start a handshake.
            None => (plain_placeholder(), "http"),
        };
        let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
        let builder = match &config.tls {
            Some(t) => builder.with_server_name_resolver(FixedServerNameResolver::new(
                server_name(&group.name, &t.sni)?,
            )),
            None => builder,
        };
        let connector = if config.http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout())
            .pool_max_idle_per_host(config.pool_max_idle)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(config.http2)
            // The proxy sets Host from the client's request; the URI carries the backend.
            .set_host(false)
            .build(connector);
        let by_client = (config.http_balance() == crate::config::Balance::HashSourceIp)
            .then(|| crate::l4::balance::Picker::new(group.clone()));
        Ok(Self { group, config: config.clone(), client, scheme, pool, h2, by_client })
    }

    /// The URI of `path_and_query` on backend `addr`: the pool key is its scheme + authority.
    pub fn uri(&self, addr: std::net::SocketAddr, path_and_query: &str) -> Uri {
        let s = format!("{}://{addr}{path_and_query}", self.scheme);
        s.parse().unwrap_or_else(|_| Uri::from_static("/"))
    }
}

fn server_name(group: &str, sni: &str) -> Result<ServerName<'static>, L7Error> {
    ServerName::try_from(sni.to_string()).map_err(|_| L7Error::Upstream {
        group: group.to_string(),
        message: format!("tls.sni {sni:?} is not a DNS name"),
    })
}

fn tls_config(group: &str, t: &UpstreamTls) -> Result<rustls::ClientConfig, L7Error> {
    crate::tls::client_config(t)
        .map_err(|e| L7Error::Upstream { group: group.to_string(), message: e.to_string() })
}

fn plain_placeholder() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the defaults")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
}

/// A client for every configured group.
pub fn build(
    configs: &std::collections::BTreeMap<String, UpstreamConfig>,
    groups: &Groups,
) -> Result<HashMap<String, Arc<Upstream>>, L7Error> {
    let mut out = HashMap::new();
    for (name, config) in configs {
        let group = groups.get(name).cloned().unwrap_or_else(|| Arc::new(Group::new(name, config)));
        out.insert(name.clone(), Arc::new(Upstream::new(group, config)?));
    }
    Ok(out)
}
