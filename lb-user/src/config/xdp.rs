//! The `[xdp]` section: interfaces, attach mode, SNAT address pools and the kernel-balanced
//! services.
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;

use super::{BackendSpec, BackendsFrom};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdpConfig {
    /// Every interface where client packets or backend replies arrive.
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub mode: XdpMode,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// Where the program, its links and maps are pinned, so forwarding survives restarts.
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Capacity of the flow table (and of the NAT table), in flows.
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// Capacity of the tables of unconfirmed TCP flows (SYN seen, handshake not finished), in
    /// flows; a SYN flood evicts only these. Default: a quarter of `max_flows`.
    #[serde(default)]
    pub max_unconfirmed_flows: Option<u32>,
    /// Seconds after which an idle UDP flow is new again (and may go to another backend).
    #[serde(default = "default_udp_idle")]
    pub udp_idle_timeout: u64,
    /// Seconds a TCP flow may stay unconfirmed (SYN forwarded, no client ACK after the
    /// backend's SYN-ACK) before it ends and frees its SNAT port.
    #[serde(default = "default_tcp_syn")]
    pub tcp_syn_timeout: u64,
    /// Seconds an established TCP flow may go without a packet in either direction.
    #[serde(default = "default_tcp_idle")]
    pub tcp_idle_timeout: u64,
    /// The SNAT source ports `[first, last]`; keep them out of the host's ephemeral range.
    #[serde(default = "default_nat_ports")]
    pub nat_ports: [u16; 2],
    /// SNAT address pools (`[[xdp.snat]]`): an interface listed here takes its SNAT sources
    /// from these addresses instead of its own first address.
    #[serde(default, rename = "snat")]
    pub snat: Vec<SnatConfig>,
}

/// One `[[xdp.snat]]` table: the SNAT addresses of one served interface. New flows toward
/// backends reached through `interface` spread over `addresses`, each with the whole
/// `nat_ports` range. Every address must be an address of that interface (so the kernel
/// answers ARP/ND for it); `lb run` and reload check that.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnatConfig {
    pub interface: String,
    pub addresses: Vec<IpAddr>,
}

impl SnatConfig {
    /// Appends what is wrong with this pool alone; `seen` collects addresses across pools.
    fn validate(&self, seen: &mut HashSet<IpAddr>, errors: &mut Vec<String>) {
        let iface = &self.interface;
        if self.addresses.is_empty() {
            errors.push(format!("xdp.snat interface {iface:?} has no addresses: list them, e.g. addresses = [\"10.1.0.10\", \"10.1.0.11\"], or remove the [[xdp.snat]] table to use the interface's own address"));
        }
        let max = lb_common::MAX_SNAT_ADDRS as usize;
        for (fam, n) in [
            ("IPv4", self.addresses.iter().filter(|a| a.is_ipv4()).count()),
            ("IPv6", self.addresses.iter().filter(|a| a.is_ipv6()).count()),
        ] {
            if n > max {
                errors.push(format!("xdp.snat interface {iface:?} has {n} {fam} addresses but the program holds at most {max} per family: list at most {max}"));
            }
        }
        for a in &self.addresses {
            if let Some(why) = unusable(a) {
                errors.push(format!("xdp.snat address \"{a}\" of interface {iface:?} is {why}: use a unicast address of that interface that the backends route back to this host"));
            }
            if !seen.insert(*a) {
                errors.push(format!("xdp.snat address \"{a}\" is listed twice: each address may be in one pool once (a port on it can belong to one flow only)"));
            }
        }
    }
}

/// Why `a` cannot be a SNAT source, if it cannot.
fn unusable(a: &IpAddr) -> Option<&'static str> {
    match a {
        _ if a.is_unspecified() => Some("unspecified"),
        _ if a.is_loopback() => Some("a loopback address"),
        _ if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        // As for an interface's own address (dataplane::host): a routed backend cannot
        // answer a link-local source.
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

/// The longest flow timeout accepted (a year), far below where nanoseconds overflow.
const MAX_TIMEOUT_SECS: u64 = 365 * 86_400;

/// The default pin directory.
pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/lb";

fn default_pin_path() -> PathBuf {
    DEFAULT_PIN_PATH.into()
}

fn default_max_flows() -> u32 {
    lb_common::DEFAULT_MAX_FLOWS
}

fn default_udp_idle() -> u64 {
    lb_common::DEFAULT_UDP_IDLE_NS / 1_000_000_000
}

fn default_tcp_syn() -> u64 {
    lb_common::DEFAULT_TCP_SYN_NS / 1_000_000_000
}

fn default_tcp_idle() -> u64 {
    lb_common::DEFAULT_TCP_IDLE_NS / 1_000_000_000
}

fn default_nat_ports() -> [u16; 2] {
    [lb_common::DEFAULT_NAT_PORT_MIN, lb_common::DEFAULT_NAT_PORT_MAX]
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver: fastest; refused by drivers without XDP support.
    #[default]
    Native,
    /// In the kernel's generic path: works everywhere, slower.
    Generic,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HashMode {
    /// The client address alone: the same client always reaches the same backend.
    #[default]
    SourceIp,
    /// Addresses, ports and protocol: spreads one client's connections.
    FiveTuple,
}

/// `forwarding` of an `[[xdp.service]]`.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Forwarding {
    /// Full NAT: the balancer rewrites both directions; replies come back through it.
    #[default]
    Nat,
    /// Direct server return: packets are encapsulated to the backend, which answers the
    /// client itself (`lb decap` on the backend unwraps them).
    Dsr,
}

/// `encap` of a DSR service.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Encap {
    /// IPv4-in-IPv4 (protocol 4), IPv6-in-IPv6 (next header 41).
    #[default]
    Ipip,
    /// The same inside UDP to port 6080 (GUE variant 1), for networks that drop protocol 4.
    Gue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub vip: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub hash: HashMode,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Only with `forwarding = "dsr"`.
    pub encap: Option<Encap>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// The backend set from Kubernetes EndpointSlices instead of `backends`.
    pub backends_from: Option<BackendsFrom>,
}

impl XdpConfig {
    /// `max_unconfirmed_flows`, or its default.
    pub fn max_unconfirmed(&self) -> u32 {
        self.max_unconfirmed_flows.unwrap_or(self.max_flows / 4)
    }

    /// Appends every problem found; each message names the fix.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.interfaces.is_empty() {
            errors.push("xdp.interfaces is empty: list the interfaces where client packets and backend replies arrive, e.g. interfaces = [\"eth0\"]".into());
        }
        let max = lb_common::MAX_SERVICES as usize;
        if self.services.len() > max {
            errors.push(format!(
                "{} xdp services configured but the program holds at most {max}: merge services or raise lb_common::MAX_SERVICES",
                self.services.len()
            ));
        }
        if self.max_flows < 1024 {
            errors.push(format!(
                "xdp.max_flows = {} is too small: use at least 1024",
                self.max_flows
            ));
        }
        // A zero timeout would end every flow at its next packet; seconds beyond u64 ns wrap.
        for (key, v) in [
            ("udp_idle_timeout", self.udp_idle_timeout),
            ("tcp_syn_timeout", self.tcp_syn_timeout),
            ("tcp_idle_timeout", self.tcp_idle_timeout),
        ] {
            if v == 0 || v > MAX_TIMEOUT_SECS {
                errors.push(format!(
                    "xdp.{key} = {v} is out of range: use 1 to {MAX_TIMEOUT_SECS} seconds"
                ));
            }
        }
        if self.max_unconfirmed() < 256 {
            errors.push(format!(
                "xdp.max_unconfirmed_flows = {} is too small: use at least 256",
                self.max_unconfirmed()
            ));
        }
        let [lo, hi] = self.nat_ports;
        if lo < 1024 || hi < lo {
            errors.push(format!(
                "xdp.nat_ports = [{lo}, {hi}] is not a range of unprivileged ports: use [first, last] with 1024 <= first <= last"
            ));
        }
        self.validate_snat(errors);
        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        for s in &self.services {
            if !names.insert(&s.name) {
                errors.push(format!(
                    "duplicate service name {:?}: give each [[xdp.service]] its own name",
                    s.name
                ));
            }
            if !vips.insert((s.vip, s.protocol)) {
                errors.push(format!(
                    "service {:?} uses the same VIP {} and protocol as another service: each (vip, protocol) may appear once",
                    s.name, s.vip
                ));
            }
            if s.encap.is_some() && s.forwarding != Forwarding::Dsr {
                errors.push(format!("service {:?}: encap applies to forwarding = \"dsr\" only: remove it, or set forwarding = \"dsr\"", s.name));
            }
            if let Some(from) = &s.backends_from {
                let at = format!("service {:?}: xdp.service", s.name);
                from.validate(&at, !s.backends.is_empty(), errors);
            }
            for b in &s.backends {
                if s.forwarding == Forwarding::Dsr && b.addr().port() != s.vip.port() {
                    errors.push(format!(
                        "service {:?}: backend {} with forwarding = \"dsr\": the client's packet reaches the backend unchanged, addressed to the VIP, so the backend serves the VIP's port {}: write the backend as {}",
                        s.name,
                        b.addr(),
                        s.vip.port(),
                        std::net::SocketAddr::new(b.addr().ip(), s.vip.port())
                    ));
                }
                if b.addr().is_ipv4() != s.vip.is_ipv4() {
                    let fam = if b.addr().is_ipv4() { "IPv4" } else { "IPv6" };
                    errors.push(format!(
                        "service {:?}: {fam} backend {} behind VIP {} of the other family: full NAT keeps the family, so use backends of the VIP's family",
                        s.name,
                        b.addr(),
                        s.vip
                    ));
                }
                if b.weight() == 0 {
                    errors.push(format!("service {:?}: backend {} has weight 0: use drain to stop new flows, or a weight of 1 or more", s.name, b.addr()));
                }
            }
        }
    }

    /// The `[[xdp.snat]]` tables: each names a served interface once, with usable addresses
    /// that are not VIPs.
    fn validate_snat(&self, errors: &mut Vec<String>) {
        let mut ifaces = HashSet::new();
        let mut seen = HashSet::new();
        for p in &self.snat {
            if !self.interfaces.contains(&p.interface) {
                errors.push(format!("xdp.snat interface {:?} is not in xdp.interfaces: add it there (a pool is the SNAT source toward backends reached through a served interface)", p.interface));
            }
            if !ifaces.insert(&p.interface) {
                errors.push(format!("xdp.snat interface {:?} has two [[xdp.snat]] tables: merge their addresses into one", p.interface));
            }
            p.validate(&mut seen, errors);
        }
        for s in &self.services {
            if seen.contains(&s.vip.ip()) {
                errors.push(format!("xdp.snat address \"{}\" is also the VIP of service {:?}: a SNAT address must not be a VIP (replies to it would be taken for client packets)", s.vip.ip(), s.name));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "[xdp]\ninterfaces = [\"eth0\"]\n";

    #[test]
    fn flow_lifetimes_and_unconfirmed_table_have_defaults() {
        let xdp = Config::parse(BASE).unwrap().xdp.unwrap();
        assert_eq!((xdp.tcp_syn_timeout, xdp.tcp_idle_timeout), (10, 21_600));
        assert_eq!(xdp.max_unconfirmed(), lb_common::DEFAULT_MAX_FLOWS / 4);
        let xdp = Config::parse(&format!("{BASE}max_flows = 8192\n")).unwrap().xdp.unwrap();
        assert_eq!(xdp.max_unconfirmed(), 2048, "a quarter of max_flows");
        let set = format!(
            "{BASE}tcp_syn_timeout = 3\ntcp_idle_timeout = 600\nmax_unconfirmed_flows = 1000\n"
        );
        let xdp = Config::parse(&set).unwrap().xdp.unwrap();
        assert_eq!(
            (xdp.tcp_syn_timeout, xdp.tcp_idle_timeout, xdp.max_unconfirmed()),
            (3, 600, 1000)
        );
    }

    #[test]
    fn out_of_range_lifetimes_are_refused_by_key() {
        for (line, key) in [
            ("tcp_syn_timeout = 0", "xdp.tcp_syn_timeout"),
            ("tcp_idle_timeout = 99999999999", "xdp.tcp_idle_timeout"),
            ("udp_idle_timeout = 0", "xdp.udp_idle_timeout"),
            ("max_unconfirmed_flows = 10", "xdp.max_unconfirmed_flows"),
        ] {
            let err = Config::parse(&format!("{BASE}{line}\n")).unwrap_err().to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn snat_pools_parse_with_both_families() {
        let cfg = r#"
            [xdp]
            interfaces = ["eth0", "eth1"]
            [[xdp.snat]]
            interface = "eth1"
            addresses = ["10.1.0.10", "10.1.0.11", "fd01::10"]
        "#;
        let xdp = Config::parse(cfg).unwrap().xdp.unwrap();
        assert_eq!(xdp.snat.len(), 1);
        assert_eq!(xdp.snat[0].interface, "eth1");
        let want: Vec<std::net::IpAddr> =
            ["10.1.0.10", "10.1.0.11", "fd01::10"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(xdp.snat[0].addresses, want);
        assert!(Config::parse(BASE).unwrap().xdp.unwrap().snat.is_empty(), "no pool by default");
    }

    #[test]
    fn bad_snat_pools_are_refused_naming_the_key_and_the_fix() {
        let pool = |iface: &str, addrs: &str| {
            format!("[[xdp.snat]]\ninterface = \"{iface}\"\naddresses = [{addrs}]\n")
        };
        let many: Vec<String> = (1..=17).map(|i| format!("\"10.1.0.{i}\"")).collect();
        let vip = "[[xdp.service]]\nname = \"web\"\nvip = \"10.1.0.9:80\"\n";
        for (extra, want) in [
            (pool("eth9", "\"10.1.0.10\""), "interface \"eth9\" is not in xdp.interfaces"),
            (pool("eth0", ""), "interface \"eth0\" has no addresses"),
            (pool("eth0", "\"0.0.0.0\""), "is unspecified"),
            (pool("eth0", "\"127.0.0.2\""), "loopback"),
            (pool("eth0", "\"fe80::1\""), "link-local"),
            (pool("eth0", "\"10.1.0.10\", \"10.1.0.10\""), "listed twice"),
            (pool("eth0", "\"10.1.0.10\"") + &pool("eth0", "\"10.1.0.11\""), "two [[xdp.snat]]"),
            (pool("eth0", &many.join(", ")), "at most 16 per family"),
            (pool("eth0", "\"10.1.0.9\"") + vip, "also the VIP of service \"web\""),
        ] {
            let err = Config::parse(&format!("{BASE}{extra}")).unwrap_err().to_string();
            assert!(err.contains("xdp.snat") && err.contains(want), "{extra}: {err}");
            assert!(err.contains("line "), "located: {err}");
        }
        let typo = format!("{BASE}[[xdp.snat]]\ninterface = \"eth0\"\naddress = [\"10.1.0.10\"]\n");
        let err = Config::parse(&typo).unwrap_err().to_string();
        assert!(err.contains("address"), "unknown key named: {err}");
    }

    #[test]
    fn dsr_services_parse_and_refuse_what_cannot_work() {
        use super::{Encap, Forwarding};
        let svc = |extra: &str, backend: &str| {
            format!(
                "{BASE}[[xdp.service]]\nname = \"web\"\nvip = \"10.0.0.9:80\"\n{extra}backends = [\"{backend}\"]\n"
            )
        };
        let c =
            Config::parse(&svc("forwarding = \"dsr\"\nencap = \"gue\"\n", "10.1.0.2:80")).unwrap();
        let s = &c.xdp.unwrap().services[0];
        assert_eq!((s.forwarding, s.encap), (Forwarding::Dsr, Some(Encap::Gue)));
        let c = Config::parse(&svc("", "10.1.0.2:8080")).unwrap();
        assert_eq!(c.xdp.unwrap().services[0].forwarding, Forwarding::Nat, "full NAT by default");
        for (extra, backend, want) in [
            (
                "forwarding = \"dsr\"\n",
                "10.1.0.2:8080",
                "serves the VIP's port 80: write the backend as 10.1.0.2:80",
            ),
            ("encap = \"ipip\"\n", "10.1.0.2:80", "encap applies to forwarding = \"dsr\" only"),
            ("forwarding = \"direct\"\n", "10.1.0.2:80", "forwarding"),
        ] {
            let err = Config::parse(&svc(extra, backend)).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("line "), "{extra}: {err}");
        }
    }
}
