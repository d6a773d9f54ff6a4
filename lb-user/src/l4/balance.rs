//! Backend choice for the userspace L4 proxy, by the group's `balance`: `hash-source-ip` (the
//! default) is the same Maglev table and client-address hash as the XDP path (`maglev::table`,
//! `lb_common::hash::source_hash`), so one client reaches the same backend whichever path
//! serves it; `round-robin` and `least-conn` are the group's own ([`Group::pick`], weights
//! honoured; least-conn counts each backend's open connections or UDP sessions). The Maglev
//! table is cached per group and rebuilt when the group's backend set (the `Arc`) or the
//! availability of its backends changes. The policy is read per connection, so a reload that
//! changes it applies to the next connection.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use arc_swap::ArcSwapOption;

use crate::{
    config::Balance,
    maglev,
    upstream::{Backend, Group},
};

/// The 16 bytes the XDP program hashes: the address in network order, IPv4 in the first four
/// bytes and the rest zero. IPv4-mapped IPv6 addresses (dual-stack sockets) count as IPv4.
pub fn client_key(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(a) => {
            let mut k = [0u8; 16];
            k[..4].copy_from_slice(&a.octets());
            k
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The Maglev slot of a client, as the XDP program computes it.
pub fn client_slot(ip: IpAddr, size: u32) -> u32 {
    maglev::slot(lb_common::hash::source_hash(&client_key(ip)), size)
}

struct Cached {
    set: Arc<Vec<Arc<Backend>>>,
    available: Vec<bool>,
    /// The backends that own slots (the available ones), indexed by the table.
    members: Vec<Arc<Backend>>,
    table: Vec<u32>,
}

/// Picks backends of one group by client address.
pub struct Picker {
    group: Arc<Group>,
    size: u32,
    cache: ArcSwapOption<Cached>,
}

impl Picker {
    pub fn new(group: Arc<Group>) -> Self {
        Self::with_size(group, maglev::DEFAULT_SIZE)
    }

    /// `size` must be prime; tests use small tables.
    pub fn with_size(group: Arc<Group>, size: u32) -> Self {
        Self { group, size, cache: ArcSwapOption::empty() }
    }

    pub fn group(&self) -> &Group {
        &self.group
    }

    /// The backend for `client`, or `None` when no backend is available. Unavailable backends
    /// (unhealthy, draining) are left out of the table, as the control plane leaves them out of
    /// the XDP table, so Maglev moves only their clients.
    pub fn pick(&self, client: IpAddr) -> Option<Arc<Backend>> {
        self.pick_avoiding(client, &[])
    }

    /// The backend for `client` other than those in `avoid` (backends a connection already
    /// failed to reach): the owner of the client's slot, else of the next slots in turn, so the
    /// retries of one client always go to the same backends and spread like Maglev's own slots.
    pub fn pick_avoiding(&self, client: IpAddr, avoid: &[SocketAddr]) -> Option<Arc<Backend>> {
        let hashed =
            self.group.policy().configured.as_ref().is_none_or(|b| *b == Balance::HashSourceIp);
        if !hashed {
            // round-robin, least-conn (config validation keeps the request-bound policies to
            // L7 upstreams; were one here, its request-less fallback applies).
            return self.group.pick(None, avoid);
        }
        let cached = self.current();
        if cached.members.iter().all(|b| avoid.contains(&b.addr)) {
            return None;
        }
        let size = self.size as usize;
        let start = client_slot(client, self.size) as usize;
        // Ends within a few slots: some member is not avoided and every member owns slots.
        (0..size)
            .map(|i| cached.table[(start + i) % size])
            .filter_map(|owner| cached.members.get(owner as usize))
            .find(|b| !avoid.contains(&b.addr))
            .cloned()
    }

    /// The table for the group's backends as they are now (no allocation unless it changed).
    fn current(&self) -> Arc<Cached> {
        let set = self.group.backends();
        if let Some(c) = &*self.cache.load()
            && Arc::ptr_eq(&c.set, &set)
            && c.available.iter().zip(set.iter()).all(|(a, b)| *a == b.is_available())
        {
            return c.clone();
        }
        let available = set.iter().map(|b| b.is_available()).collect();
        let c = Arc::new(build(set, available, self.size));
        self.cache.store(Some(c.clone()));
        c
    }
}

fn build(set: Arc<Vec<Arc<Backend>>>, available: Vec<bool>, size: u32) -> Cached {
    let members: Vec<Arc<Backend>> =
        set.iter().zip(&available).filter(|(_, a)| **a).map(|(b, _)| b.clone()).collect();
    let entries: Vec<maglev::Entry> =
        members.iter().map(|b| maglev::Entry { addr: b.addr, weight: b.weight() }).collect();
    let table = maglev::table(&entries, size);
    Cached { set, available, members, table }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        sync::atomic::Ordering,
    };

    use super::*;
    use crate::config::UpstreamConfig;

    fn group(backends: &str) -> Arc<Group> {
        let c: UpstreamConfig = toml::from_str(&format!("backends = {backends}")).unwrap();
        Arc::new(Group::new("g", &c))
    }

    /// What the XDP path computes for the same backend set: `maglev::table` over the service's
    /// (addr, weight) entries, indexed by `source_hash(client) % size`.
    fn xdp_pick(entries: &[maglev::Entry], client: IpAddr) -> SocketAddr {
        let table = maglev::table(entries, maglev::DEFAULT_SIZE);
        let mut key = [0u8; 16];
        match client {
            IpAddr::V4(a) => key[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => key = a.octets(),
        }
        let slot = lb_common::hash::source_hash(&key) % maglev::DEFAULT_SIZE;
        entries[table[slot as usize] as usize].addr
    }

    #[test]
    fn agrees_with_the_xdp_computation_for_1000_clients() {
        let list = r#"["10.1.1.2:80", { addr = "10.1.2.2:80", weight = 3 }, "10.1.3.2:80", { addr = "10.1.4.2:80", weight = 2 }]"#;
        let g = group(list);
        let picker = Picker::new(g.clone());
        // The same backends in another order, as an [[xdp.service]] might list them.
        let mut entries: Vec<maglev::Entry> = g
            .backends()
            .iter()
            .map(|b| maglev::Entry { addr: b.addr, weight: b.weight() })
            .collect();
        entries.reverse();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000u32 {
            let v4 = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919));
            let got = picker.pick(v4).unwrap().addr;
            assert_eq!(got, xdp_pick(&entries, v4), "client {v4}");
            seen.insert(got);
            let v6 = IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | (i as u128 * 104_729)));
            assert_eq!(picker.pick(v6).unwrap().addr, xdp_pick(&entries, v6), "client {v6}");
        }
        assert_eq!(seen.len(), 4, "every backend gets clients");
        // A dual-stack socket reports IPv4 clients as mapped addresses; they hash as IPv4.
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(
            picker.pick(mapped).unwrap().addr,
            xdp_pick(&entries, "10.0.0.9".parse().unwrap())
        );
    }

    #[test]
    fn rebuilds_on_set_changes_and_skips_unavailable_backends() {
        let g = group(r#"["10.1.1.2:80", "10.1.2.2:80", "10.1.3.2:80"]"#);
        let p = Picker::new(g.clone());
        let clients: Vec<IpAddr> = (0..3000u32).map(|i| IpAddr::V4(Ipv4Addr::from(i))).collect();
        let before: Vec<SocketAddr> = clients.iter().map(|&c| p.pick(c).unwrap().addr).collect();
        let gone: SocketAddr = "10.1.2.2:80".parse().unwrap();
        g.backends()[1].checked_up.store(false, Ordering::Relaxed);
        let mut moved = 0;
        for (c, b) in clients.iter().zip(&before) {
            let now = p.pick(*c).unwrap().addr;
            assert_ne!(now, gone);
            moved += usize::from(*b != gone && now != *b);
        }
        // Maglev moves a few other slots too, far fewer than a modulo hash would (~1/2 here).
        assert!(moved * 50 < clients.len(), "{moved} clients of healthy backends moved");
        g.backends()[1].checked_up.store(true, Ordering::Relaxed);
        g.add("10.1.9.2:80".parse().unwrap(), 1).unwrap();
        assert!(clients.iter().any(|&c| p.pick(c).unwrap().addr.ip().to_string() == "10.1.9.2"));
        for b in g.backends().iter() {
            b.draining.store(true, Ordering::Relaxed);
        }
        assert!(p.pick(clients[0]).is_none());
    }

    #[test]
    fn retries_go_to_other_backends_in_a_fixed_order() {
        let g = group(r#"["10.1.1.2:80", "10.1.2.2:80", "10.1.3.2:80"]"#);
        let p = Picker::new(g);
        for i in 0..200u32 {
            let c = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 7919));
            let first = p.pick(c).unwrap().addr;
            let second = p.pick_avoiding(c, &[first]).unwrap().addr;
            assert_ne!(second, first);
            assert_eq!(p.pick_avoiding(c, &[first]).unwrap().addr, second, "deterministic");
            let third = p.pick_avoiding(c, &[first, second]).unwrap().addr;
            assert!(third != first && third != second);
            assert!(p.pick_avoiding(c, &[first, second, third]).is_none());
        }
    }

    #[test]
    fn follows_the_groups_policy_and_its_changes() {
        let c: UpstreamConfig = toml::from_str(
            r#"balance = "round-robin"
            backends = ["10.1.1.2:80", "10.1.2.2:80", "10.1.3.2:80"]"#,
        )
        .unwrap();
        let g = Arc::new(Group::new("g", &c));
        let p = Picker::new(g.clone());
        let client: IpAddr = "10.9.9.9".parse().unwrap();
        let mut count = std::collections::HashMap::new();
        for _ in 0..300 {
            *count.entry(p.pick(client).unwrap().addr).or_insert(0) += 1;
        }
        assert!(count.values().all(|&n| n == 100), "one client, spread evenly: {count:?}");
        // least-conn: the backend with the fewest open connections.
        let set = g.backends();
        set[0].in_flight.store(5, Ordering::Relaxed);
        set[1].in_flight.store(1, Ordering::Relaxed);
        set[2].in_flight.store(3, Ordering::Relaxed);
        let lc: UpstreamConfig = toml::from_str(r#"balance = "least-conn""#).unwrap();
        g.set_policy(crate::upstream::Policy::of(&lc));
        assert_eq!(p.pick(client).unwrap().addr, set[1].addr);
        assert_eq!(p.pick_avoiding(client, &[set[1].addr]).unwrap().addr, set[2].addr);
        // Back to the default: Maglev, the same backend for a client every time.
        let none: UpstreamConfig = toml::from_str("").unwrap();
        g.set_policy(crate::upstream::Policy::of(&none));
        let first = p.pick(client).unwrap().addr;
        assert!((0..50).all(|_| p.pick(client).unwrap().addr == first));
    }
}
