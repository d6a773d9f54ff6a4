//! Bench-only: the smallest HTTP proxy on Pingora's load-balancing API (round robin over the
//! backends, upstream keep-alive pool), so `lb-bench l7` can measure Pingora as the Rust peer.
//!
//! `pingora-lb --threads N --listen ADDR... [--h2c] [--tls ADDR --cert PEM --key PEM] BACKEND...`
//! (`--h2c` lets the plain listeners take HTTP/2 with prior knowledge besides HTTP/1.1).
use std::sync::Arc;

use async_trait::async_trait;
use pingora::{
    apps::HttpServerOptions, listeners::tls::TlsSettings, prelude::*,
    server::configuration::ServerConf,
};

struct Lb(Arc<LoadBalancer<RoundRobin>>);

#[async_trait]
impl ProxyHttp for Lb {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let backend = self.0.select(b"", 256).ok_or_else(|| Error::new_str("no backend"))?;
        Ok(Box::new(HttpPeer::new(backend, false, String::new())))
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut threads, mut listen, mut h2c, mut tls, mut cert, mut key) =
        (2, Vec::new(), false, None, None, None);
    let mut backends = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => threads = args.next().and_then(|t| t.parse().ok()).expect("--threads N"),
            "--listen" => listen.extend(args.next()),
            "--h2c" => h2c = true,
            "--tls" => tls = args.next(),
            "--cert" => cert = args.next(),
            "--key" => key = args.next(),
            _ => backends.push(a),
        }
    }
    let mut conf = ServerConf::new().expect("default server conf");
    conf.threads = threads;
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let upstreams = LoadBalancer::try_from_iter(backends).expect("backend addresses");
    let mut proxy = http_proxy_service(&server.configuration, Lb(Arc::new(upstreams)));
    for addr in &listen {
        proxy.add_tcp(addr);
    }
    if h2c {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        proxy.app_logic_mut().expect("proxy app").server_options = Some(options);
    }
    if let Some(addr) = tls {
        let mut settings = TlsSettings::intermediate(
            cert.as_deref().expect("--cert PEM"),
            key.as_deref().expect("--key PEM"),
        )
        .expect("TLS certificate and key");
        settings.enable_h2();
        proxy.add_tls_with_settings(&addr, None, settings);
    }
    server.add_service(proxy);
    server.run_forever();
}
