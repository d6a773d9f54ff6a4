//! The standard test topology: a client, the balancer and N backends, each in its own namespace.
//!
//! ```text
//!  client ns                 balancer ns                      backend ns i
//!  eth0 10.0.0.2/16  <->  eth0 10.0.0.1/16
//!       fd00::2/64            fd00::1/64
//!                         b<i> 10.1.<i>.1/24   <->   eth0 10.1.<i>.2/24
//!                              fd01:<i>::1/64             fd01:<i>::2/64
//! ```
//! The client routes everything via the balancer, so VIPs (10.200.0.0/16, fd00:200::/64) reach it
//! without further set-up. Receivers of redirected frames run the do-nothing XDP program and
//! senders have tx checksum offload off, as shared/TOOLCHAIN.md requires for veth.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netns::Netns;

pub struct Backend {
    pub ns: Netns,
    /// The backend's own addresses.
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The balancer-side interface name in the balancer namespace.
    pub lb_iface: String,
}

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    /// Keeps the do-nothing XDP programs attached, by namespace name.
    pass: Vec<(String, aya::Ebpf)>,
}

/// The first IPv4 VIP tests use; further VIPs go up from here.
pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

impl Topology {
    /// Detaches the do-nothing XDP program of `ns`'s interface, so that another program (`lb
    /// decap`) can take it; that one then serves as the program redirected frames need.
    pub fn release_pass(&mut self, ns: &Netns) {
        self.pass.retain(|(name, _)| *name != ns.name);
    }

    /// Builds the topology with `backends` backends. Everything is torn down on drop.
    pub fn new(backends: usize) -> anyhow::Result<Self> {
        let client = Netns::new("c")?;
        let lb = Netns::new("l")?;
        let mut pass = Vec::new();
        veth(&client, "eth0", &lb, "eth0")?;
        client.ip(&["addr", "add", "10.0.0.2/16", "dev", "eth0"])?;
        client.ip(&["-6", "addr", "add", "fd00::2/64", "dev", "eth0", "nodad"])?;
        lb.ip(&["addr", "add", "10.0.0.1/16", "dev", "eth0"])?;
        lb.ip(&["-6", "addr", "add", "fd00::1/64", "dev", "eth0", "nodad"])?;
        up(&client, "eth0")?;
        up(&lb, "eth0")?;
        client.ip(&["route", "add", "default", "via", "10.0.0.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd00::1"])?;
        prepare_sender_receiver(&client, "eth0", &mut pass)?;

        let mut list = Vec::new();
        for i in 1..=backends {
            let ns = Netns::new(&format!("b{i}"))?;
            let lb_iface = format!("b{i}");
            link_backend(&lb, &ns, i, &mut pass)?;
            list.push(Backend {
                ns,
                v4: Ipv4Addr::new(10, 1, i as u8, 2),
                v6: format!("fd01:{i}::2").parse()?,
                lb_iface,
            });
        }
        Ok(Self { client, lb, backends: list, pass })
    }

    /// Adds `n` more client addresses (10.0.4.1 upwards, on-link) and returns them.
    pub fn add_client_addresses(&self, n: usize) -> anyhow::Result<Vec<IpAddr>> {
        let addrs: Vec<IpAddr> = (0..n)
            .map(|k| IpAddr::V4(Ipv4Addr::new(10, 0, 4 + (k / 250) as u8, 1 + (k % 250) as u8)))
            .collect();
        let batch: String = addrs.iter().map(|a| format!("addr add {a}/16 dev eth0\n")).collect();
        let path = std::env::temp_dir().join(format!("{}-addrs", self.client.name));
        std::fs::write(&path, batch)?;
        let r = self.client.ip(&["-batch", path.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_file(&path);
        r?;
        Ok(addrs)
    }

    /// Routes `prefix` (addresses no namespace owns, e.g. a flood's spoofed sources) from the
    /// balancer to the client namespace, so answers to them leave the balancer as to any
    /// client and the client's kernel drops them there.
    pub fn route_to_client(&self, prefix: &str) -> anyhow::Result<()> {
        self.lb.ip(&["route", "add", prefix, "via", "10.0.0.2"]).map(drop)
    }

    /// Deletes the veth pair of backend `i` (0-based) and makes it again as it was: new
    /// devices with new indexes and the same names and addresses (a re-plugged NIC). The
    /// backend's sockets survive; what was attached to the old devices does not.
    pub fn recreate_backend_link(&mut self, i: usize) -> anyhow::Result<()> {
        let b = &self.backends[i];
        self.lb.ip(&["link", "del", &b.lb_iface])?;
        link_backend(&self.lb, &b.ns, i + 1, &mut self.pass)
    }

    /// The balancer's interfaces: toward the client first, then one per backend.
    pub fn lb_interfaces(&self) -> Vec<String> {
        std::iter::once("eth0".to_string())
            .chain(self.backends.iter().map(|b| b.lb_iface.clone()))
            .collect()
    }
}

/// The veth pair between the balancer and backend `i` (1-based), addressed and up.
fn link_backend(
    lb: &Netns,
    ns: &Netns,
    i: usize,
    pass: &mut Vec<(String, aya::Ebpf)>,
) -> anyhow::Result<()> {
    let lb_iface = format!("b{i}");
    veth(lb, &lb_iface, ns, "eth0")?;
    ns.ip(&["addr", "add", &format!("10.1.{i}.2/24"), "dev", "eth0"])?;
    ns.ip(&["-6", "addr", "add", &format!("fd01:{i}::2/64"), "dev", "eth0", "nodad"])?;
    lb.ip(&["addr", "add", &format!("10.1.{i}.1/24"), "dev", &lb_iface])?;
    lb.ip(&["-6", "addr", "add", &format!("fd01:{i}::1/64"), "dev", &lb_iface, "nodad"])?;
    up(ns, "eth0")?;
    up(lb, &lb_iface)?;
    // Lets the kernel-routing baseline reach the client; full NAT never needs it.
    ns.ip(&["route", "add", "default", "via", &format!("10.1.{i}.1")])?;
    ns.ip(&["-6", "route", "add", "default", "via", &format!("fd01:{i}::1")])?;
    prepare_sender_receiver(ns, "eth0", pass)
}

fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> anyhow::Result<()> {
    a.ip(&["link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name])
        .map(drop)
}

fn up(ns: &Netns, iface: &str) -> anyhow::Result<()> {
    ns.ip(&["link", "set", iface, "up"]).map(drop)
}

/// The client and the backends both send into the balancer (partial checksums must be off) and
/// receive its redirected frames (they need an XDP program for NAPI).
fn prepare_sender_receiver(
    ns: &Netns,
    iface: &str,
    keep: &mut Vec<(String, aya::Ebpf)>,
) -> anyhow::Result<()> {
    ns.exec(&["ethtool", "-K", iface, "tx", "off"])?;
    let name = iface.to_string();
    let ebpf = ns.run(move || lb_user::dataplane::attach_pass(&name))??;
    keep.push((ns.name.clone(), ebpf));
    Ok(())
}

/// Waits (at most 5 s) until `ns` has resolved neighbour entries for all of `addrs`.
pub fn wait_neighbours(ns: &Netns, addrs: &[&str]) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let table = ns.ip(&["neigh", "show"])?;
        let resolved = |a: &&str| {
            table.lines().any(|l| {
                l.starts_with(&format!("{a} ")) && l.contains("lladdr") && !l.contains("FAILED")
            })
        };
        if addrs.iter().all(resolved) {
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "neighbours not resolved: {table}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
