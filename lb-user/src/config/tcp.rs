//! The `[[tcp.listener]]` section: userspace L4 listeners (TCP relay, TLS passthrough routed by
//! SNI, hand-off to an L7 TLS listener, UDP sessions) and their PROXY protocol settings.
use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use super::{Cidr, Protocol, UpstreamConfig};

/// `[tcp]`: every userspace L4 listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    #[serde(default, rename = "listener")]
    pub listeners: Vec<TcpListenerConfig>,
    /// Seconds the relays of a process that `lb run --upgrade` replaced may go on before they
    /// are cut (a SIGTERM gives them 10 s).
    #[serde(default = "default_upgrade_drain_secs")]
    pub upgrade_drain_secs: u64,
}

/// Long enough for most request/response protocols; long-lived relays (SSH, databases) may
/// want more.
const DEFAULT_UPGRADE_DRAIN_SECS: u64 = 60;

fn default_upgrade_drain_secs() -> u64 {
    DEFAULT_UPGRADE_DRAIN_SECS
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self { listeners: Vec::new(), upgrade_drain_secs: DEFAULT_UPGRADE_DRAIN_SECS }
    }
}

/// One `[[tcp.listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    /// TLS routes by SNI; empty means a plain relay that never looks at the bytes.
    #[serde(default)]
    pub sni: Vec<SniRoute>,
    /// The upstream group for streams no SNI route matches, or that are not TLS.
    pub upstream: Option<String>,
    /// The PROXY protocol header sent to backends before the client's bytes.
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// Sources (CIDRs) whose connections must start with a PROXY header (v1 or v2), whose
    /// client address then replaces the peer's. Everyone else's bytes are relayed as they are.
    #[serde(default)]
    pub accept_proxy_from: Vec<Cidr>,
    /// Closes a connection (or ends a UDP session) with no bytes either way for this long.
    #[serde(default)]
    pub idle_timeout: Option<Secs>,
    /// How long a client may take to send its ClientHello or its PROXY header.
    #[serde(default = "default_peek_timeout")]
    pub peek_timeout: Secs,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Secs,
    /// Concurrent connections (TCP) or sessions (UDP); more wait in the kernel's backlog (TCP)
    /// or are dropped and counted (UDP).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TCP: connections one client (an IPv4 address, an IPv6 /64) may hold at once; more are
    /// closed as soon as accepted and counted (`source_limit`). Absent: no per-source limit.
    #[serde(default)]
    pub max_connections_per_source: Option<usize>,
    /// UDP: sessions one client (an IPv4 address, an IPv6 /64) may hold at once; datagrams
    /// that would open more are dropped and counted (`source_limit`). Absent: no limit.
    #[serde(default)]
    pub max_sessions_per_source: Option<usize>,
    /// Bytes buffered per direction of a connection (the pipe size when splicing).
    #[serde(default = "default_buffer_size")]
    pub buffer_size: usize,
    /// splice(2) between the sockets when the kernel allows it; false forces plain copies.
    #[serde(default = "yes")]
    pub zero_copy: bool,
    /// SO_REUSEPORT: a second `lb run` with the same config binds alongside this one
    /// (Kubernetes rolling updates); see `upgrade::overlap`.
    #[serde(default)]
    pub reuse_port: bool,
    /// How relayed bytes move (TCP only); unset means the userspace relay `zero_copy` says
    /// (splice, or copy).
    #[serde(default)]
    pub relay: Option<Relay>,
}

/// `relay = "kernel" | "splice" | "copy"`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Relay {
    /// A BPF sockhash redirects each socket's bytes to its peer inside the kernel.
    Kernel,
    /// Userspace: small exchanges copied, bulk spliced through a pipe.
    Splice,
    /// Userspace: always copied through a buffer.
    Copy,
}

/// `{ host = "db.example.com", upstream = "db", passthrough = true }` or
/// `{ host = "*.example.com", terminate = "public" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    /// An exact host name, or `*.` + a domain: matches every name under it (any depth; the
    /// longest matching domain wins).
    pub host: String,
    pub upstream: Option<String>,
    #[serde(default)]
    pub passthrough: bool,
    /// The L7 TLS listener of this process that terminates these connections.
    pub terminate: Option<String>,
}

/// What an SNI route does with a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniAction {
    /// Relay every byte untouched to a backend of this upstream group.
    Passthrough(String),
    /// Hand the connection, ClientHello unread, to the L7 listener of this name.
    Terminate(String),
}

impl SniRoute {
    /// The action, once validated.
    pub fn action(&self) -> Option<SniAction> {
        match (&self.upstream, self.passthrough, &self.terminate) {
            (Some(u), true, None) => Some(SniAction::Passthrough(u.clone())),
            (None, false, Some(l)) => Some(SniAction::Terminate(l.clone())),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    None,
    V1,
    V2,
}

/// Seconds, written as a number (`30`, `0.5`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Secs(pub Duration);

impl<'de> Deserialize<'de> for Secs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !(v.is_finite() && v > 0.0 && v <= 1e7) {
            return Err(serde::de::Error::custom(format!(
                "{v} is not a duration: write seconds as a positive number, e.g. 30 or 0.5"
            )));
        }
        Ok(Secs(Duration::from_secs_f64(v)))
    }
}

fn default_peek_timeout() -> Secs {
    Secs(Duration::from_secs(5))
}
fn default_connect_timeout() -> Secs {
    Secs(Duration::from_secs(5))
}
fn default_max_connections() -> usize {
    10_000
}
fn default_buffer_size() -> usize {
    64 * 1024
}
fn yes() -> bool {
    true
}

impl TcpListenerConfig {
    /// The idle timeout in force: the configured one, else 300 s for TCP and 30 s for UDP.
    pub fn idle(&self) -> Duration {
        match (self.idle_timeout, self.protocol) {
            (Some(s), _) => s.0,
            (None, Protocol::Tcp) => Duration::from_secs(300),
            (None, Protocol::Udp) => Duration::from_secs(30),
        }
    }

    /// True when `addr` may prefix its connection with a PROXY header.
    pub fn trusts(&self, addr: IpAddr) -> bool {
        self.accept_proxy_from.iter().any(|c| c.contains(addr))
    }
}

/// Lower-cases a route host and checks its shape; `None` when it is not a usable name.
pub fn normalize_host(host: &str) -> Option<String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let name = h.strip_prefix("*.").unwrap_or(&h);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then_some(h)
}

impl TcpConfig {
    /// Appends every problem found; each message names the fix.
    pub fn validate(&self, upstreams: &BTreeMap<String, UpstreamConfig>, errors: &mut Vec<String>) {
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        for l in &self.listeners {
            let at = format!("tcp listener {:?}", l.name);
            if !names.insert(&l.name) {
                errors.push(format!(
                    "duplicate tcp listener name {:?}: give each [[tcp.listener]] its own name",
                    l.name
                ));
            }
            // Port 0 (the kernel picks one) never collides.
            if l.listen.port() != 0 && !binds.insert((l.listen, l.protocol)) {
                errors.push(format!(
                    "{at}: {} ({:?}) is already used by another tcp listener",
                    l.listen, l.protocol
                ));
            }
            match &l.upstream {
                Some(u) if !upstreams.contains_key(u) => {
                    errors.push(format!("{at}: upstream {u:?} is not defined: add [upstream.{u}]"))
                }
                _ => {}
            }
            let passthrough = l.sni.iter().filter_map(|r| match r.action() {
                Some(SniAction::Passthrough(u)) => Some(u),
                _ => None,
            });
            for u in l.upstream.iter().cloned().chain(passthrough) {
                if let Some(b) = upstreams.get(&u).and_then(|c| c.balance.as_ref())
                    && !b.applies_to_l4()
                {
                    errors.push(format!(
                        "{at}: upstream {u:?} has balance = \"{b}\", which an L4 listener cannot apply: use hash-source-ip (the default), round-robin or least-conn, or a separate upstream for the L7 routes"
                    ));
                }
            }
            if l.upstream.is_none() && l.sni.is_empty() {
                errors.push(format!(
                    "{at}: nothing to route to: set upstream = \"GROUP\" or add sni routes"
                ));
            }
            if l.max_connections == 0 {
                errors.push(format!("{at}: max_connections must be at least 1"));
            }
            for (key, v, proto) in [
                ("max_connections_per_source", l.max_connections_per_source, Protocol::Tcp),
                ("max_sessions_per_source", l.max_sessions_per_source, Protocol::Udp),
            ] {
                match v {
                    Some(0) => errors.push(format!("{at}: {key} must be at least 1")),
                    Some(_) if l.protocol != proto => errors.push(format!(
                        "{at}: {key} applies to protocol = \"{}\" listeners only: use {}",
                        if proto == Protocol::Tcp { "tcp" } else { "udp" },
                        if proto == Protocol::Tcp {
                            "max_sessions_per_source"
                        } else {
                            "max_connections_per_source"
                        }
                    )),
                    _ => {}
                }
            }
            if !(4096..=16 << 20).contains(&l.buffer_size) {
                errors.push(format!(
                    "{at}: buffer_size {} is out of range: use 4096 to 16777216 bytes",
                    l.buffer_size
                ));
            }
            if l.protocol == Protocol::Udp {
                if !l.sni.is_empty() {
                    errors.push(format!(
                        "{at}: sni routes need TLS over TCP: remove them or use protocol = \"tcp\""
                    ));
                }
                if l.relay.is_some() {
                    errors.push(format!(
                        "{at}: relay applies to TCP listeners only (UDP datagrams are relayed by lb itself): remove it"
                    ));
                }
                if l.proxy_protocol != ProxyProtocol::None || !l.accept_proxy_from.is_empty() {
                    errors.push(format!(
                        "{at}: the PROXY protocol is supported on TCP listeners only: remove proxy_protocol/accept_proxy_from"
                    ));
                }
            }
            let mut hosts = HashSet::new();
            for r in &l.sni {
                let Some(host) = normalize_host(&r.host) else {
                    errors.push(format!(
                        "{at}: sni host {:?} is not a host name or \"*.\" + a domain",
                        r.host
                    ));
                    continue;
                };
                if !hosts.insert(host.clone()) {
                    errors.push(format!("{at}: sni host {:?} is listed twice", r.host));
                }
                match r.action() {
                    Some(SniAction::Passthrough(u)) if !upstreams.contains_key(&u) => {
                        errors.push(format!(
                            "{at}: sni host {:?} routes to upstream {u:?}, which is not defined: add [upstream.{u}]",
                            r.host
                        ));
                    }
                    Some(_) => {}
                    None => errors.push(format!(
                        "{at}: sni host {:?} needs either upstream = \"GROUP\" with passthrough = true, or terminate = \"L7 LISTENER\"",
                        r.host
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn parses_the_issue_example() {
        let c = Config::parse(
            r#"
            [upstream.db]
            backends = ["10.0.0.5:5432"]
            [upstream.fallback]
            backends = ["10.0.0.6:443"]
            [[tcp.listener]]
            name = "tls-edge"
            listen = "0.0.0.0:443"
            protocol = "tcp"
            sni = [ { host = "db.example.com", upstream = "db", passthrough = true },
                    { host = "*.example.com", terminate = "public" } ]
            upstream = "fallback"
            proxy_protocol = "v2"
            accept_proxy_from = ["10.0.0.0/8", "::1"]
            idle_timeout = 0.5
            "#,
        )
        .unwrap();
        let l = &c.tcp.listeners[0];
        assert_eq!(l.sni[0].action(), Some(SniAction::Passthrough("db".into())));
        assert_eq!(l.sni[1].action(), Some(SniAction::Terminate("public".into())));
        assert_eq!(l.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(l.idle(), Duration::from_millis(500));
        assert!(l.trusts("10.9.8.7".parse().unwrap()));
        assert!(l.trusts("::ffff:10.1.1.1".parse().unwrap()));
        assert!(l.trusts("::1".parse().unwrap()));
        assert!(!l.trusts("11.0.0.1".parse().unwrap()));
        assert!(!l.trusts("::2".parse().unwrap()));
        assert!(l.zero_copy);
    }

    #[test]
    fn bad_listeners_are_all_reported() {
        let err = Config::parse(
            r#"
            [upstream.a]
            backends = ["10.0.0.5:53"]
            [upstream.h]
            balance = "hash-header:x-user"
            backends = ["10.0.0.7:53"]
            [[tcp.listener]]
            name = "h"
            listen = "0.0.0.0:54"
            upstream = "h"
            [[tcp.listener]]
            name = "x"
            listen = "0.0.0.0:53"
            protocol = "udp"
            upstream = "a"
            proxy_protocol = "v1"
            max_connections_per_source = 3
            relay = "kernel"
            sni = [ { host = "a.example", upstream = "a", passthrough = true } ]
            [[tcp.listener]]
            name = "x"
            listen = "0.0.0.0:53"
            protocol = "udp"
            upstream = "nope"
            [[tcp.listener]]
            name = "y"
            listen = "0.0.0.0:443"
            max_connections_per_source = 0
            sni = [ { host = "a..b", upstream = "a", passthrough = true },
                    { host = "c.example", upstream = "a" },
                    { host = "d.example", upstream = "zz", passthrough = true },
                    { host = "E.example", terminate = "p" }, { host = "e.example.", terminate = "p" } ]
            "#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "sni routes need TLS",
            "PROXY protocol is supported on TCP listeners only",
            "relay applies to TCP listeners only",
            "duplicate tcp listener name \"x\"",
            "is already used",
            "upstream \"nope\" is not defined",
            "\"a..b\" is not a host name",
            "\"c.example\" needs either",
            "upstream \"zz\", which is not defined",
            "\"e.example.\" is listed twice",
            "max_connections_per_source applies to protocol = \"tcp\" listeners only: use max_sessions_per_source",
            "max_connections_per_source must be at least 1",
            "upstream \"h\" has balance = \"hash-header:x-user\", which an L4 listener cannot apply",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../../README.md");
        let section = readme.split("## Userspace L4").nth(1).expect("README section");
        let toml = section.split("```toml").nth(1).and_then(|t| t.split("```").next()).unwrap();
        let c = Config::parse(toml).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.tcp.listeners.len(), 2);
    }

    #[test]
    fn cidrs_and_durations_refuse_nonsense() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix, 0);
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains("1.2.3.4".parse().unwrap()));
        assert!("::/0".parse::<Cidr>().unwrap().contains("2001:db8::1".parse().unwrap()));
        let err = Config::parse(
            "[upstream.a]\n[[tcp.listener]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"a\"\nidle_timeout = -1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a duration"), "{err}");
    }
}
