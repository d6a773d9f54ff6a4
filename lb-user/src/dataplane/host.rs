//! Preparing the host for the program, and what lb changes there (recorded by
//! [`super::changes`]): `bpf_fib_lookup` routes only for interfaces with forwarding on
//! (shared/TOOLCHAIN.md), so the served interfaces get it (IPv6 without switching on `all`,
//! keeping router advertisements); the VIPs become local addresses on `lo`, so what the program
//! does not balance (ICMP echo, other ports) is answered or refused by the kernel instead of
//! routed onward, without ARP answering for them on the served interfaces; the backends' next
//! hops are kept resolved as managed neighbours.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::Command,
};

use lb_common::IfaceAddrs;

use super::changes::{Changes, HostChange, HostError, ip};

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

/// The host side of the data plane: what `lb run` changed, and the changes themselves.
#[derive(Debug, Default)]
pub struct Host {
    changes: Changes,
    /// The `all.rp_filter` warning was given (once per daemon).
    warned_rp_filter: bool,
}

impl Host {
    /// Opens the record of the pins under `pin_dir` (none for an unpinned data plane).
    pub fn open(pin_dir: Option<&Path>) -> Result<Self, HostError> {
        Ok(Self { changes: Changes::open(pin_dir)?, warned_rp_filter: false })
    }

    /// Everything lb changed on this host and has not undone, oldest first.
    pub fn changes(&self) -> &[HostChange] {
        self.changes.list()
    }

    /// Records that lb mounted bpffs on /sys/fs/bpf (left mounted by `lb detach`).
    pub fn mounted_bpffs(&mut self) -> Result<(), HostError> {
        self.changes.mounted_bpffs()
    }

    /// Prepares the served `interfaces` for VIPs of the families given. Idempotent: a reload
    /// that adds a family calls it again.
    pub fn prepare(&mut self, interfaces: &[String], v4: bool, v6: bool) -> Result<(), HostError> {
        for name in interfaces {
            let conf = |leaf| ["net", "ipv4", "conf", name.as_str(), leaf];
            if v4 {
                self.changes.sysctl(&conf("forwarding"), "1")?;
                // The kernel forwards what the program hands it (`pass_no_neigh`) with the VIP
                // as source: a local address now, refused as martian without accept_local,
                // and by the reverse-path filter.
                self.changes.sysctl(&conf("rp_filter"), "0")?;
                self.changes.sysctl(&conf("accept_local"), "1")?;
                // The VIP must not start being answered by ARP where it was not (the weak host
                // model answers for any local address on any interface), nor be the sender
                // address of the host's own ARP requests: IPVS's director settings.
                if self.changes.read(&conf("arp_ignore")).as_deref() == Some("0") {
                    self.changes.sysctl(&conf("arp_ignore"), "1")?;
                }
                if self.changes.read(&conf("arp_announce")).is_some_and(|v| v != "2") {
                    self.changes.sysctl(&conf("arp_announce"), "2")?;
                }
            }
            if v6 {
                self.prepare_ipv6(name)?;
            }
        }
        if v4
            && !self.warned_rp_filter
            && let Some(all) = self.changes.read(&["net", "ipv4", "conf", "all", "rp_filter"])
            && all != "0"
        {
            self.warned_rp_filter = true;
            log::warn!(
                "host: net.ipv4.conf.all.rp_filter = {all} overrides the served interfaces' 0: replies the kernel forwards for the program may be dropped"
            );
        }
        Ok(())
    }

    /// IPv6 on a served interface: forwarding for `bpf_fib_lookup`, and for the kernel's own
    /// forwarding of what the program hands it `force_forwarding` (kernel 6.17+) instead of
    /// `all.forwarding`, which would make every interface a router.
    fn prepare_ipv6(&mut self, name: &str) -> Result<(), HostError> {
        let conf = |leaf| ["net", "ipv6", "conf", name, leaf];
        // With forwarding on, accept_ra = 1 ignores router advertisements; 2 accepts them.
        if self.changes.read(&conf("accept_ra")).as_deref() == Some("1") {
            self.changes.sysctl(&conf("accept_ra"), "2")?;
        }
        self.forwarding_on(&conf("forwarding"))?;
        if self.changes.sysctl(&conf("force_forwarding"), "1")?.is_none() {
            // An older kernel: only `all` lets the kernel forward IPv6. It turns forwarding on
            // everywhere, so every interface that accepted advertisements keeps doing so.
            for iface in ipv6_interfaces() {
                let ra = ["net", "ipv6", "conf", iface.as_str(), "accept_ra"];
                if self.changes.read(&ra).as_deref() == Some("1") {
                    self.changes.sysctl(&ra, "2")?;
                }
            }
            self.forwarding_on(&["net", "ipv6", "conf", "all", "forwarding"])?;
        }
        Ok(())
    }

    /// Writes IPv6 `forwarding = 1`. The kernel then drops the default routes learned from
    /// router advertisements on every interface whose accept_ra is not 2 (until the next
    /// advertisement), also where forwarding stays off: those interfaces are raised to 2 for
    /// the write (the same behaviour while they do not forward) and put back.
    fn forwarding_on(&mut self, key: &[&str]) -> Result<(), HostError> {
        if self.changes.read(key).as_deref() != Some("0") {
            return Ok(());
        }
        let guarded: Vec<String> = ipv6_interfaces()
            .into_iter()
            .filter(|i| {
                self.changes.read(&["net", "ipv6", "conf", i, "accept_ra"]).as_deref() == Some("1")
            })
            .collect();
        for i in &guarded {
            self.changes.write_unrecorded(&["net", "ipv6", "conf", i, "accept_ra"], "2")?;
        }
        let r = self.changes.sysctl(key, "1");
        for i in &guarded {
            self.changes.write_unrecorded(&["net", "ipv6", "conf", i, "accept_ra"], "1")?;
        }
        r.map(drop)
    }

    /// Makes exactly `vips` (and the addresses lb did not add) local: adds the new ones to
    /// `lo`, removes those lb added that are no longer configured.
    pub fn sync_vips(&mut self, vips: &BTreeSet<IpAddr>) -> Result<(), HostError> {
        for gone in self.changes.locals().into_iter().filter(|a| !vips.contains(a)) {
            self.changes.remove_local(gone)?;
        }
        for vip in vips {
            self.changes.add_local(*vip)?;
        }
        Ok(())
    }

    /// Keeps exactly the VIPs in `up` announced in routing table `table` (`[announce]`).
    pub fn sync_announced(&mut self, up: &BTreeSet<IpAddr>, table: u32) -> Result<(), HostError> {
        for gone in self.changes.announced(table).into_iter().filter(|a| !up.contains(a)) {
            self.changes.withdraw(gone, table)?;
        }
        let have = self.changes.announced(table);
        for vip in up.iter().filter(|a| !have.contains(a)) {
            self.changes.announce(*vip, table)?;
        }
        Ok(())
    }

    /// The VIPs announced in `table` now.
    pub fn announced(&self, table: u32) -> Vec<IpAddr> {
        self.changes.announced(table)
    }

    /// Keeps the next hop toward `backend` resolved, as a managed neighbour entry the kernel
    /// refreshes by itself. Best effort: a failure is logged, and the program counts
    /// `drop_no_neigh` until the entry resolves.
    pub fn keep_neighbour(&mut self, backend: IpAddr) {
        let Some((dev, via)) = route_to(backend) else {
            log::warn!(
                "host: no route to backend {backend}; its packets will be dropped (drop_no_route)"
            );
            return;
        };
        let hop = via.unwrap_or(backend).to_string();
        let show = Command::new("ip").args(["neigh", "show", &hop, "dev", &dev]).output();
        let before = show.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let before = before.unwrap_or_default();
        if before.contains("MANAGED") || before.contains("managed") {
            return;
        }
        match ip(&["neigh", "replace", &hop, "dev", &dev, "managed"]) {
            Ok(()) => {
                log::info!(
                    "host: keeping neighbour {hop} on {dev} resolved (next hop of {backend})"
                );
                let before = if before.is_empty() { "absent" } else { "present" };
                if let Err(e) = self.changes.neighbour(via.unwrap_or(backend), &dev, before) {
                    log::warn!("host: {e}");
                }
            }
            Err(e) => log::warn!("host: cannot add a managed neighbour: {e}"),
        }
    }
}

/// The interfaces with an IPv6 configuration (not `all` and `default`).
fn ipv6_interfaces() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/sys/net/ipv6/conf") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "all" && n != "default")
        .collect()
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
