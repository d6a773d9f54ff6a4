//! Scale-out topology: clients behind a router that reaches several `lb` nodes and the
//! backends over one LAN, for DSR with BGP and ECMP (issue 15).
//!
//! ```text
//!  client ns               router ns                          node i / backend j ns
//!  eth0 10.10.0.2/24 <-> eth0 10.10.0.1/24
//!                         br0 10.20.0.1/24 (bridge) <-> n<i>  eth0 10.20.0.1<i>/24 (node)
//!                                                  <-> b<j>  eth0 10.20.0.2<j>/24 (backend)
//! ```
//! The router forwards with an L4 multipath hash, so the connections of one client address
//! spread over the nodes that announce a VIP. Nodes send wrapped packets back out of the
//! interface they came in on (XDP_TX into veth), so the router's ports run the do-nothing XDP
//! program; every sender has tx checksum offload off (shared/TOOLCHAIN.md).
use std::net::Ipv4Addr;

use crate::netns::Netns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
pub const ROUTER_LAN: &str = "10.20.0.1";

/// The namespaces of a fabric; torn down on drop.
pub struct Fabric {
    pub client: Netns,
    pub router: Netns,
    pub nodes: Vec<Netns>,
    pub backends: Vec<Netns>,
    /// The do-nothing XDP programs, kept attached.
    _pass: Vec<aya::Ebpf>,
}

/// Node `i`'s (0-based) address on the LAN.
pub fn node_addr(i: usize) -> String {
    format!("10.20.0.{}", 11 + i)
}

/// Backend `j`'s (0-based) address on the LAN.
pub fn backend_addr(j: usize) -> String {
    format!("10.20.0.{}", 21 + j)
}

impl Fabric {
    pub fn new(nodes: usize, backends: usize) -> anyhow::Result<Self> {
        let client = Netns::new("fc")?;
        let router = Netns::new("fr")?;
        let mut pass = Vec::new();
        client.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &router.name,
        ])?;
        client.ip(&["addr", "add", "10.10.0.2/24", "dev", "eth0"])?;
        router.ip(&["addr", "add", "10.10.0.1/24", "dev", "eth0"])?;
        for ns in [&client, &router] {
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        client.ip(&["route", "add", "default", "via", "10.10.0.1"])?;
        router.ip(&["link", "add", "br0", "type", "bridge"])?;
        router.ip(&["addr", "add", "10.20.0.1/24", "dev", "br0"])?;
        router.ip(&["link", "set", "br0", "up"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        let mut lan = |port: String, addr: String| -> anyhow::Result<Netns> {
            let ns = Netns::new(&port)?;
            router.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ])?;
            router.ip(&["link", "set", &port, "master", "br0"])?;
            router.ip(&["link", "set", &port, "up"])?;
            router.exec(&["ethtool", "-K", &port, "tx", "off"])?;
            let name = port.clone();
            pass.push(router.run(move || lb_user::dataplane::attach_pass(&name))??);
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
            ns.ip(&["route", "add", "default", "via", ROUTER_LAN])?;
            Ok(ns)
        };
        let nodes = (0..nodes)
            .map(|i| lan(format!("n{}", i + 1), node_addr(i)))
            .collect::<Result<Vec<_>, _>>()?;
        let backends = (0..backends)
            .map(|j| lan(format!("b{}", j + 1), backend_addr(j)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { client, router, nodes, backends, _pass: pass })
    }

    /// The router's kernel route to `addr`.
    pub fn route_to(&self, addr: &str) -> String {
        self.router.ip(&["route", "show", addr]).unwrap_or_default()
    }

    /// How many next hops the router's route to `addr` has (0: no route).
    pub fn paths_to(&self, addr: &str) -> usize {
        let route = self.route_to(addr);
        match route.matches("nexthop via").count() {
            0 if route.contains(" via ") => 1,
            n => n,
        }
    }
}
