//! SNAT address pools (`[[xdp.snat]]`): checking each address against its interface, the
//! `LB_SNAT_POOLS` value of a pool, and writing only the pools that changed.
//!
//! The program translates replies to a pool address in XDP, before the stack, so the kernel
//! never delivers them; it needs the address all the same, for ARP/ND: a backend sends its
//! replies to the MAC that answers for the SNAT address. lb therefore requires every address
//! to be on its interface (the operator adds it, as for a VIP on a router) and refuses to
//! start or reload otherwise, naming the command that fixes it.
use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{MAX_SNAT_ADDRS, SnatPool};
use thiserror::Error;

use super::tables::{Maps, TableError};
use crate::config::SnatConfig;

/// A pool checked against the host: where it applies and its addresses, in config order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub interface: String,
    pub ifindex: u32,
    pub addrs: Vec<IpAddr>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnatError {
    #[error("xdp.snat interface {0:?} does not exist: check the name with `ip link`")]
    NoInterface(String),
    #[error(
        "xdp.snat address \"{addr}\" is not an address of {iface:?}: add it (`{fix}`), or take it out of the pool. Backends must resolve its MAC to reply, and only a local address gets ARP/ND answers"
    )]
    NotLocal { iface: String, addr: IpAddr, fix: String },
}

/// Looks each pool's interface and addresses up on the host.
pub fn resolve(config: &[SnatConfig]) -> Result<Vec<Pool>, SnatError> {
    let local: Vec<(String, IpAddr)> = nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| {
                    let sa = a.address?;
                    let ip: IpAddr = match (sa.as_sockaddr_in(), sa.as_sockaddr_in6()) {
                        (Some(v4), _) => v4.ip().into(),
                        (_, Some(v6)) => v6.ip().into(),
                        _ => return None,
                    };
                    Some((a.interface_name, ip))
                })
                .collect()
        })
        .unwrap_or_default();
    config
        .iter()
        .map(|c| {
            let ifindex = nix::net::if_::if_nametoindex(c.interface.as_str())
                .map_err(|_| SnatError::NoInterface(c.interface.clone()))?;
            for addr in &c.addresses {
                if !local.iter().any(|(i, a)| *i == c.interface && a == addr) {
                    return Err(SnatError::NotLocal {
                        iface: c.interface.clone(),
                        addr: *addr,
                        fix: add_command(&c.interface, addr),
                    });
                }
            }
            Ok(Pool { interface: c.interface.clone(), ifindex, addrs: c.addresses.clone() })
        })
        .collect()
}

/// The iproute2 command that makes `addr` local on `iface` without touching routes (a host
/// prefix; `nodad` so an IPv6 address answers at once).
fn add_command(iface: &str, addr: &IpAddr) -> String {
    match addr {
        IpAddr::V4(a) => format!("ip addr add {a}/32 dev {iface}"),
        IpAddr::V6(a) => format!("ip -6 addr add {a}/128 dev {iface} nodad"),
    }
}

/// The map value of a pool: the families apart, each in config order.
pub fn pool_value(addrs: &[IpAddr]) -> Result<SnatPool, TableError> {
    let mut pool = SnatPool::default();
    for a in addrs {
        let full = |n: u32| n >= MAX_SNAT_ADDRS;
        match a {
            IpAddr::V4(v4) if !full(pool.v4_count) => {
                pool.v4[pool.v4_count as usize] = v4.octets();
                pool.v4_count += 1;
            }
            IpAddr::V6(v6) if !full(pool.v6_count) => {
                pool.v6[pool.v6_count as usize] = v6.octets();
                pool.v6_count += 1;
            }
            _ => return Err(TableError::SnatPoolFull),
        }
    }
    Ok(pool)
}

/// The pools as the kernel holds them, by ifindex.
#[derive(Debug, Default)]
pub struct SnatPools {
    written: BTreeMap<u32, SnatPool>,
}

impl SnatPools {
    /// Adopts the pools a previous daemon left in pinned maps; the next [`SnatPools::apply`]
    /// removes those the config no longer has (an interface that went away, or was re-created
    /// under a new ifindex).
    pub fn recover(&mut self, pinned: &[(u32, SnatPool)]) {
        self.written.extend(pinned.iter().copied());
    }

    /// Makes the kernel's pools exactly `pools` and says what changed. A pool is rewritten in
    /// one map update, so a new flow sees the old addresses or the new ones. Flows already on
    /// an address that leaves the pool keep it until they end (their NAT entries translate
    /// their replies); only new flows follow the pool.
    pub fn apply(
        &mut self,
        pools: &[Pool],
        maps: &mut dyn Maps,
    ) -> Result<Vec<String>, TableError> {
        let mut changes = Vec::new();
        let mut wanted = BTreeMap::new();
        for p in pools {
            wanted.insert(p.ifindex, (p, pool_value(&p.addrs)?));
        }
        let gone: Vec<u32> =
            self.written.keys().filter(|i| !wanted.contains_key(i)).copied().collect();
        for ifindex in gone {
            maps.remove_snat_pool(ifindex)?;
            self.written.remove(&ifindex);
            changes.push(format!(
                "xdp.snat: pool of ifindex {ifindex} removed (new flows use the interface's own address)"
            ));
        }
        for (ifindex, (p, value)) in wanted {
            if self.written.get(&ifindex) == Some(&value) {
                continue;
            }
            maps.set_snat_pool(ifindex, &value)?;
            self.written.insert(ifindex, value);
            let list: Vec<String> = p.addrs.iter().map(|a| a.to_string()).collect();
            changes.push(format!("xdp.snat: {} uses {}", p.interface, list.join(", ")));
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;
    use crate::dataplane::tables::MemMaps;

    fn pool(ifindex: u32, addrs: &[&str]) -> Pool {
        Pool {
            interface: format!("if{ifindex}"),
            ifindex,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn a_pool_keeps_the_families_apart_in_config_order() {
        let v = pool_value(&pool(1, &["10.1.0.11", "fd01::10", "10.1.0.10"]).addrs).unwrap();
        assert_eq!((v.v4_count, v.v6_count), (2, 1));
        assert_eq!(v.v4[..2], [[10, 1, 0, 11], [10, 1, 0, 10]]);
        assert_eq!(v.v6[0], "fd01::10".parse::<Ipv6Addr>().unwrap().octets());
        assert!(v.v4[2..].iter().all(|a| *a == [0; 4]), "unused slots stay zero");
        let many: Vec<IpAddr> = (0..=MAX_SNAT_ADDRS).map(|i| [10, 1, 1, i as u8].into()).collect();
        assert!(matches!(pool_value(&many), Err(TableError::SnatPoolFull)));
    }

    #[test]
    fn apply_writes_changed_pools_only_and_removes_dropped_ones() {
        let mut p = SnatPools::default();
        let mut m = MemMaps::default();
        let changes = p.apply(&[pool(3, &["10.1.0.10", "10.1.0.11"])], &mut m).unwrap();
        assert_eq!(changes, ["xdp.snat: if3 uses 10.1.0.10, 10.1.0.11"]);
        assert_eq!(m.snat_pools[&3].v4_count, 2);
        assert!(p.apply(&[pool(3, &["10.1.0.10", "10.1.0.11"])], &mut m).unwrap().is_empty());
        assert_eq!(m.snat_writes, 1, "an unchanged pool is not rewritten");
        // An address added at runtime (reload).
        p.apply(&[pool(3, &["10.1.0.10", "10.1.0.11", "10.1.0.12"])], &mut m).unwrap();
        assert_eq!(m.snat_pools[&3].v4_count, 3);
        // No pool any more: the interface's own address again.
        let changes = p.apply(&[], &mut m).unwrap();
        assert!(m.snat_pools.is_empty() && changes[0].contains("removed"), "{changes:?}");
    }

    #[test]
    fn pools_pinned_by_a_previous_daemon_are_kept_or_retired() {
        let mut m = MemMaps::default();
        let kept = pool_value(&pool(3, &["10.1.0.10"]).addrs).unwrap();
        m.snat_pools.insert(3, kept);
        m.snat_pools.insert(9, kept);
        let mut p = SnatPools::default();
        p.recover(&[(3, kept), (9, kept)]);
        p.apply(&[pool(3, &["10.1.0.10"])], &mut m).unwrap();
        assert_eq!(m.snat_writes, 0, "the adopted pool is already right");
        assert_eq!(m.snat_pools.keys().copied().collect::<Vec<_>>(), [3], "ifindex 9 is gone");
    }

    #[test]
    fn an_address_not_on_its_interface_is_refused_with_the_command_that_fixes_it() {
        let cfg = |addr: &str| SnatConfig {
            interface: "lo".into(),
            addresses: vec![addr.parse().unwrap()],
        };
        // 127.0.0.1 is on lo everywhere; 192.0.2.1 (TEST-NET-1) is not.
        assert_eq!(resolve(&[cfg("127.0.0.1")]).unwrap()[0].addrs, cfg("127.0.0.1").addresses);
        let err = resolve(&[cfg("192.0.2.1")]).unwrap_err().to_string();
        assert!(err.contains("xdp.snat address \"192.0.2.1\""), "{err}");
        assert!(err.contains("`ip addr add 192.0.2.1/32 dev lo`"), "{err}");
        let missing = SnatConfig { interface: "no-such-if0".into(), addresses: vec![] };
        assert_eq!(resolve(&[missing]), Err(SnatError::NoInterface("no-such-if0".into())));
    }
}
