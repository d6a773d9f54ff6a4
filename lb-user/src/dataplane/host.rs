//! Preparing the host so `bpf_fib_lookup` can route for the program (shared/TOOLCHAIN.md): IP
//! forwarding on the served interfaces, no strict reverse-path filter there (replies leave with
//! the VIP as source), and the backends' next hops kept resolved as managed neighbours. Every
//! change is logged.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    process::Command,
};

use lb_common::IfaceAddrs;

/// An interface the program serves.
#[derive(Debug, Clone)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Iface {
    /// Looks the interface up: index and its first IPv4 and global IPv6 address.
    pub fn lookup(name: &str) -> Option<Self> {
        let index = nix::net::if_::if_nametoindex(name).ok()?;
        let mut iface = Self { name: name.to_string(), index, v4: None, v6: None };
        for a in nix::ifaddrs::getifaddrs().ok()? {
            if a.interface_name != name {
                continue;
            }
            let Some(addr) = a.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                iface.v4.get_or_insert(v4.ip());
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                let ip = v6.ip();
                // Link-local addresses cannot be a SNAT source toward a routed backend.
                if ip.segments()[0] & 0xffc0 != 0xfe80 {
                    iface.v6.get_or_insert(ip);
                }
            }
        }
        Some(iface)
    }

    pub fn addrs(&self) -> IfaceAddrs {
        IfaceAddrs {
            v4: self.v4.map(|a| a.octets()).unwrap_or_default(),
            v6: self.v6.map(|a| a.octets()).unwrap_or_default(),
            _pad: [0; 4],
        }
    }
}

fn set_sysctl(path: &str, value: &str) {
    match std::fs::read_to_string(path) {
        Ok(cur) if cur.trim() == value => {}
        Ok(cur) => match std::fs::write(path, value) {
            Ok(()) => log::info!("host: set {path} = {value} (was {})", cur.trim()),
            Err(e) => log::warn!("host: cannot set {path} = {value}: {e}; XDP forwarding may fail"),
        },
        Err(e) => log::warn!("host: cannot read {path}: {e}"),
    }
}

/// Enables forwarding and turns off the strict reverse-path filter on a served interface.
pub fn prepare_interface(name: &str, ipv6: bool) {
    set_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "1");
    set_sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0");
    if ipv6 {
        set_sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/forwarding"), "1");
    }
}

/// Enables IPv6 forwarding host-wide: the kernel forwards IPv6 only when `all` is on, which
/// the first reply to a client whose neighbour is not resolved yet needs.
pub fn enable_ipv6_forwarding() {
    set_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1");
}

/// Keeps the next hop toward `backend` resolved, as a managed neighbour entry the kernel
/// refreshes by itself. Best effort: a failure is logged, and the program counts
/// `drop_no_neigh` until the entry resolves.
pub fn keep_neighbour(backend: IpAddr) {
    let Some((dev, via)) = route_to(backend) else {
        log::warn!(
            "host: no route to backend {backend}; its packets will be dropped (drop_no_route)"
        );
        return;
    };
    let hop = via.unwrap_or(backend);
    let out = Command::new("ip")
        .args(["neigh", "replace", &hop.to_string(), "dev", &dev, "managed"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            log::info!("host: keeping neighbour {hop} on {dev} resolved (next hop of {backend})")
        }
        Ok(o) => log::warn!(
            "host: cannot add managed neighbour {hop} on {dev}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => log::warn!("host: cannot run `ip` (iproute2) to manage neighbours: {e}"),
    }
}

/// The device and gateway `ip route get` picks for `dst`.
fn route_to(dst: IpAddr) -> Option<(String, Option<IpAddr>)> {
    let out = Command::new("ip").args(["route", "get", &dst.to_string()]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |k: &str| words.iter().position(|w| *w == k).and_then(|i| words.get(i + 1));
    let dev = after("dev")?.to_string();
    let via = after("via").and_then(|v| v.parse().ok());
    Some((dev, via))
}
