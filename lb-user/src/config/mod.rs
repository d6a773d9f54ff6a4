//! The one TOML config of lb: parse → validate, with no socket bound and no program loaded, so
//! `lb check` and tests can use it freely.
mod backend;
mod env;
mod health;
mod http;
mod lines;
mod tcp;
mod upstream;
mod xdp;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use thiserror::Error;

pub use backend::{BackendSpec, BackendsFrom};
pub use env::{ENV_VARS, redacted};
pub use health::{CheckKind, HealthConfig};
pub use http::{AccessLog, CertConfig, Cidr, HttpConfig, ListenerConfig, RouteConfig};
pub use tcp::{ProxyProtocol, Relay, Secs, SniAction, SniRoute, TcpConfig, TcpListenerConfig};
pub use upstream::{Balance, UpstreamConfig, UpstreamTls};
pub use xdp::{
    DEFAULT_PIN_PATH, Encap, Forwarding, HashMode, Protocol, ServiceConfig, SnatConfig, XdpConfig,
    XdpMode,
};

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    /// The XDP (kernel) L4 balancer; absent means no program is loaded.
    pub xdp: Option<XdpConfig>,
    /// Named backend groups for the L7 and userspace L4 proxies.
    #[serde(default)]
    pub upstream: BTreeMap<String, UpstreamConfig>,
    /// Userspace L4 listeners (TCP/UDP relay, TLS passthrough by SNI).
    #[serde(default)]
    pub tcp: TcpConfig,
    /// The L7 (HTTP/TLS) proxy: listeners, routes, limits.
    #[serde(default)]
    pub http: HttpConfig,
    /// Active health checks by service or upstream group name (`[health.NAME]`).
    #[serde(default)]
    pub health: BTreeMap<String, HealthConfig>,
    /// Routes for the XDP VIPs in a kernel table, for a BGP daemon to announce.
    pub announce: Option<AnnounceConfig>,
    /// How to reach the Kubernetes API for `backends_from` (absent: in-cluster credentials).
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// The text this config was parsed from (for `GET /config`, redacted there).
    #[serde(skip)]
    pub source: String,
}

/// `[announce]`: while an XDP service has a backend up, its VIP has a route in routing table
/// `table` (lb speaks no BGP: bird2's kernel protocol or FRR's `ip import-table` exports it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    pub table: u32,
    /// Withdraw every route when `lb run` stops (the pinned program keeps forwarding, so by
    /// default they stay until `lb detach`).
    #[serde(default)]
    pub withdraw_on_stop: bool,
}

impl AnnounceConfig {
    fn validate(&self, xdp: bool, errors: &mut Vec<String>) {
        if !xdp {
            errors.push("[announce] announces XDP VIPs, but there is no [xdp] section: add one, or remove [announce]".into());
        }
        let reserved = match self.table {
            0 => Some("unspecified"),
            253 => Some("default"),
            254 => Some("main"),
            255 => Some("local"),
            _ => None,
        };
        if let Some(name) = reserved {
            errors.push(format!("announce.table = {} is the kernel's {name} table: a blackhole route for each VIP there would change this host's forwarding; use a table of its own, e.g. table = 100", self.table));
        }
    }
}

/// `[kubernetes]`: the API server that `backends_from = { kubernetes = ... }` watches.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// A kubeconfig file (its current context); absent: the pod's service account
    /// (KUBERNETES_SERVICE_HOST/PORT and /var/run/secrets/kubernetes.io/serviceaccount).
    pub kubeconfig: Option<PathBuf>,
}

/// Where the admin API listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token every request must carry (except /live and /ready); env LB_ADMIN_TOKEN.
    pub token: Option<String>,
    /// Allow a non-loopback `listen` without a token (anyone who reaches it controls lb).
    #[serde(default)]
    pub allow_insecure: bool,
    /// The unix socket (mode 0600) over which `lb run --upgrade` takes the listening sockets
    /// of the running process; env LB_UPGRADE_SOCKET.
    #[serde(default = "default_upgrade_socket")]
    pub upgrade_socket: PathBuf,
    /// SO_REUSEPORT on `listen`, so that an overlapping process can bind it too.
    #[serde(default)]
    pub reuse_port: bool,
    /// A unix socket (mode 0600) that serves the admin API of this process only, whatever
    /// else binds `listen`: what probes use while two processes overlap.
    pub socket: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            allow_insecure: false,
            upgrade_socket: default_upgrade_socket(),
            reuse_port: false,
            socket: None,
        }
    }
}

/// Where the upgrade socket is when the config names none.
pub const DEFAULT_UPGRADE_SOCKET: &str = "/run/lb/upgrade.sock";

fn default_upgrade_socket() -> PathBuf {
    DEFAULT_UPGRADE_SOCKET.into()
}

impl AdminConfig {
    fn validate(&self, errors: &mut Vec<String>) {
        if self.token.as_deref().is_some_and(|t| t.len() < 16) {
            errors.push(
                "admin.token is shorter than 16 characters: use a long random string (e.g. `openssl rand -hex 32`)".into(),
            );
        }
        if !self.listen.ip().is_loopback() && self.token.is_none() && !self.allow_insecure {
            errors.push(format!(
                "admin.listen = \"{}\" is not a loopback address and no token is set: anyone who reaches it could change lb. Set [admin] token (or LB_ADMIN_TOKEN), listen on 127.0.0.1, or set allow_insecure = true",
                self.listen
            ));
        }
    }
}

/// The admin address used when the config names none.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

fn default_admin_listen() -> SocketAddr {
    DEFAULT_ADMIN.parse().expect("valid default")
}

/// A config that cannot be used, with what to do about it.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {} error(s):\n{}", .errors.len(), .errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, errors: Vec<String> },
}

impl Config {
    /// Reads, parses and validates a config file, with the environment's overrides
    /// ([`ENV_VARS`]) applied.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::parse_with_env(&text, &|k| std::env::var(k).ok()).map_err(|e| match e {
            ConfigError::Parse { message, .. } => {
                ConfigError::Parse { path: path.display().to_string(), message }
            }
            ConfigError::Invalid { errors, .. } => {
                ConfigError::Invalid { path: path.display().to_string(), errors }
            }
            other => other,
        })
    }

    /// Parses and validates config text (no environment overrides).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, &|_| None)
    }

    /// Parses config text, applies overrides from `env`, validates; every semantic error
    /// starts with the line of the key it is about.
    pub fn parse_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: String::new(), message: e.to_string() })?;
        config.source = text.to_string();
        let mut errors = env::apply(&mut config, env);
        config.admin.validate(&mut errors);
        for (name, h) in &config.health {
            let service = config.xdp.iter().flat_map(|x| &x.services).any(|s| &s.name == name);
            h.validate(name, service || config.upstream.contains_key(name), &mut errors);
        }
        if let Some(xdp) = &config.xdp {
            xdp.validate(&mut errors);
        }
        if let Some(a) = &config.announce {
            a.validate(config.xdp.is_some(), &mut errors);
        }
        config.tcp.validate(&config.upstream, &mut errors);
        for (name, u) in &config.upstream {
            u.validate(name, &mut errors);
        }
        config.http.validate(&config.upstream, &mut errors);
        if config.kubernetes.kubeconfig.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            errors.push("kubernetes.kubeconfig is empty: name a kubeconfig file, or remove the key to use the pod's service account".into());
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: String::new(), errors: lines::locate(text, errors) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let c = Config::parse(
            r#"
            [admin]
            listen = "127.0.0.1:9901"
            [xdp]
            interfaces = ["eth0", "eth1"]
            mode = "native"
            [[xdp.service]]
            name = "web"
            vip = "10.0.0.100:80"
            protocol = "tcp"
            hash = "source-ip"
            backends = ["10.1.0.2:80", { addr = "10.1.0.3:80", weight = 2 }]
            "#,
        )
        .unwrap();
        let xdp = c.xdp.unwrap();
        assert_eq!(xdp.interfaces, ["eth0", "eth1"]);
        assert_eq!(xdp.mode, XdpMode::Native);
        assert_eq!(xdp.services[0].backends[1].weight(), 2);
        assert_eq!(xdp.services[0].backends[0].weight(), 1);
    }

    #[test]
    fn parses_the_documented_l7_example() {
        let c = Config::parse(
            r#"
            [[http.listener]]
            name = "public"
            listen = "0.0.0.0:8443"
            tls = [{ cert = "a.pem", key = "a.key" }, { cert = "b.pem", key = "b.key" }]
            [[http.route]]
            listener = "public"
            host = "api.example.com"
            path = "/v1"
            upstream = "api"
            [upstream.api]
            balance = "round-robin"
            backends = ["10.1.0.2:8080", { addr = "10.1.0.3:8080", weight = 2 }]
            "#,
        )
        .unwrap();
        assert_eq!(c.http.listener[0].tls.len(), 2);
        assert_eq!(c.http.route[0].path.as_deref(), Some("/v1"));
        assert_eq!(c.upstream["api"].balance, Some(Balance::RoundRobin));
        assert_eq!(c.upstream["api"].backends[1].weight(), 2);
    }

    #[test]
    fn l7_semantic_errors_are_reported() {
        let err = Config::parse(
            r#"
            [[http.listener]]
            name = "a"
            listen = "127.0.0.1:0"
            [[http.route]]
            listener = "b"
            host = "*.*.x"
            path = "v1"
            upstream = "missing"
            [upstream.u]
            balance = "hash-header:"
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("hash-header: needs a name"), "{err}");
        let err = Config::parse(
            r#"
            [[http.listener]]
            name = "a"
            listen = "127.0.0.1:0"
            [[http.route]]
            listener = "b"
            host = "*.*.x"
            path = "v1"
            upstream = "missing"
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no http.listener named \"b\""), "{err}");
        assert!(err.contains("no [upstream.missing]"), "{err}");
        assert!(err.contains("one leading *"), "{err}");
        assert!(err.contains("must start with /"), "{err}");
    }

    #[test]
    fn parses_backends_from_and_the_kubeconfig() {
        let c = Config::parse(
            r#"
            [kubernetes]
            kubeconfig = "/etc/lb/kubeconfig"
            [xdp]
            interfaces = ["eth0"]
            [[xdp.service]]
            name = "web"
            vip = "10.0.0.100:80"
            backends_from = { kubernetes = "prod/web", port = "http" }
            [upstream.api]
            backends_from = { kubernetes = "prod/api", port = "8080" }
            "#,
        )
        .unwrap();
        let from = c.xdp.unwrap().services[0].backends_from.clone().unwrap();
        assert_eq!(from.service(), Some(("prod", "web")));
        assert_eq!(from.port, "http");
        assert_eq!(
            c.upstream["api"].backends_from.as_ref().unwrap().service(),
            Some(("prod", "api"))
        );
        assert_eq!(c.kubernetes.kubeconfig.as_deref(), Some(Path::new("/etc/lb/kubeconfig")));
        let none = Config::parse("[upstream.api]\nbackends = []\n").unwrap();
        assert_eq!(none.kubernetes, KubernetesConfig::default());
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let err = Config::parse("[admin]\nlisten = \"127.0.0.1:1\"\nlsten = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("unknown field `lsten`"), "{msg}");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let err = Config::parse(
            r#"
            [xdp]
            interfaces = []
            [[xdp.service]]
            name = "a"
            vip = "10.0.0.1:80"
            backends = []
            [[xdp.service]]
            name = "a"
            vip = "10.0.0.1:80"
            backends = ["[::1]:80"]
            "#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("xdp.interfaces is empty"), "{err}");
        assert!(err.contains("duplicate service name \"a\""), "{err}");
        assert!(err.contains("same VIP"), "{err}");
        assert!(err.contains("IPv6 backend"), "{err}");
    }
}
