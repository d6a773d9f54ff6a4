//! Balancing policies: which backend of a group gets the next request.
use std::{
    hash::{DefaultHasher, Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
};

use hyper::{HeaderMap, header};

use super::{Backend, Group};
use crate::config::Balance;

impl Group {
    /// Chooses an available backend not in `skip` (backends already tried for this request).
    /// `key` is the hash input of the `hash-*` policies (see [`hash_key`]); without one they
    /// fall back to round robin. `None` when no backend is available.
    pub fn pick(&self, key: Option<&[u8]>, skip: &[SocketAddr]) -> Option<Arc<Backend>> {
        // A borrowed snapshot: no reference count bump on the set shared by every thread.
        let set = self.backends.load();
        let policy = self.policy();
        let balance = &policy.http;
        let ok = |b: &&Arc<Backend>| b.is_available() && !skip.contains(&b.addr);
        let keyed = matches!(
            (balance, key),
            (Balance::HashSourceIp | Balance::HashHeader(_) | Balance::HashCookie(_), Some(_))
        );
        if !keyed && !matches!(balance, Balance::LeastConn | Balance::P2cEwma) {
            // Round robin, the default: walked in place, without a candidate list per request.
            let total: u64 = set.iter().filter(ok).map(|b| u64::from(b.weight())).sum();
            if total == 0 {
                // Every candidate weighs 0 (or there is none): the first, as the walk below.
                return set.iter().find(ok).cloned();
            }
            let mut n = self.next.fetch_add(1, Ordering::Relaxed) % total;
            for b in set.iter().filter(ok) {
                let w = u64::from(b.weight());
                if n < w {
                    return Some(b.clone());
                }
                n -= w;
            }
            return set.iter().find(ok).cloned();
        }
        let candidates: Vec<&Arc<Backend>> = set.iter().filter(ok).collect();
        if candidates.is_empty() {
            return None;
        }
        let tick = self.next.fetch_add(1, Ordering::Relaxed);
        let chosen = match (balance, key) {
            (Balance::LeastConn, _) => least_conn(&candidates, tick),
            (Balance::P2cEwma, _) => p2c_ewma(&candidates, tick),
            (Balance::HashSourceIp | Balance::HashHeader(_) | Balance::HashCookie(_), Some(k)) => {
                rendezvous(&candidates, k)
            }
            _ => weighted_round_robin(&candidates, tick),
        };
        Some(chosen.clone())
    }
}

/// The hash input of a request for the group's policy: client address, a header's value or a
/// cookie's value; `None` for other policies or when the request lacks it.
pub fn hash_key(balance: &Balance, client: IpAddr, headers: &HeaderMap) -> Option<Vec<u8>> {
    match balance {
        Balance::HashSourceIp => Some(match client {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }),
        Balance::HashHeader(name) => headers.get(name.as_str()).map(|v| v.as_bytes().to_vec()),
        Balance::HashCookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_bytes().to_vec()),
        _ => None,
    }
}

/// Walks the weights: with weights a=1, b=2 the order is a, b, b, a, b, b, ...
fn weighted_round_robin<'a>(c: &[&'a Arc<Backend>], tick: u64) -> &'a Arc<Backend> {
    let total: u64 = c.iter().map(|b| u64::from(b.weight())).sum();
    let mut n = tick % total.max(1);
    for b in c {
        let w = u64::from(b.weight());
        if n < w {
            return b;
        }
        n -= w;
    }
    c[0]
}

/// Fewest in flight per unit of weight; ties go round robin.
fn least_conn<'a>(c: &[&'a Arc<Backend>], tick: u64) -> &'a Arc<Backend> {
    let start = (tick % c.len() as u64) as usize;
    let load =
        |b: &Backend| (b.in_flight.load(Ordering::Relaxed) + 1, u64::from(b.weight().max(1)));
    let mut best = c[start];
    for i in 1..c.len() {
        let b = c[(start + i) % c.len()];
        let (bl, bw) = load(b);
        let (kl, kw) = load(best);
        // bl/bw < kl/kw without division.
        if u128::from(bl) * u128::from(kw) < u128::from(kl) * u128::from(bw) {
            best = b;
        }
    }
    best
}

/// Two random candidates, the one with the lower latency × load / weight wins.
fn p2c_ewma<'a>(c: &[&'a Arc<Backend>], tick: u64) -> &'a Arc<Backend> {
    if c.len() == 1 {
        return c[0];
    }
    let r = splitmix64(tick ^ random_seed());
    let i = (r % c.len() as u64) as usize;
    let j = (i + 1 + ((r >> 32) % (c.len() as u64 - 1)) as usize) % c.len();
    let cost = |b: &Backend| {
        let ewma = b.latency.get_ns() as f64 + 1.0;
        ewma * (b.in_flight.load(Ordering::Relaxed) + 1) as f64 / f64::from(b.weight().max(1))
    };
    if cost(c[j]) < cost(c[i]) { c[j] } else { c[i] }
}

/// Weighted rendezvous (highest random weight) hashing: a key keeps its backend while that
/// backend stays, and only the keys of a removed backend move.
fn rendezvous<'a>(c: &[&'a Arc<Backend>], key: &[u8]) -> &'a Arc<Backend> {
    let score = |b: &Backend| {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        b.addr.hash(&mut h);
        // A uniform value in (0, 1), then weight / -ln(u): the weighted HRW score.
        let u = ((h.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        f64::from(b.weight().max(1)) / -u.ln()
    };
    let mut best = c[0];
    let mut best_score = score(best);
    for b in &c[1..] {
        let s = score(b);
        if s > best_score {
            best = b;
            best_score = s;
        }
    }
    best
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn random_seed() -> u64 {
    use std::{hash::BuildHasher, sync::OnceLock};
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0u8))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, time::Duration};

    use super::*;
    use crate::config::UpstreamConfig;

    fn group(balance: &str, backends: &str) -> Group {
        let c: UpstreamConfig =
            toml::from_str(&format!("balance = {balance:?}\nbackends = {backends}")).unwrap();
        Group::new("g", &c)
    }

    fn port(b: &Backend) -> u16 {
        b.addr.port()
    }

    #[test]
    fn round_robin_follows_weights_and_skips_unavailable() {
        let g = group("round-robin", r#"["127.0.0.1:1", { addr = "127.0.0.1:2", weight = 2 }]"#);
        let order: Vec<u16> = (0..6).map(|_| port(&g.pick(None, &[]).unwrap())).collect();
        assert_eq!(order, [1, 2, 2, 1, 2, 2]);
        g.backends()[1].draining.store(true, Ordering::Relaxed);
        assert!((0..4).all(|_| port(&g.pick(None, &[]).unwrap()) == 1));
        let one: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(g.pick(None, &[one]).is_none(), "the only one left was tried");
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let g = group("least-conn", r#"["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]"#);
        let set = g.backends();
        set[0].in_flight.store(3, Ordering::Relaxed);
        set[1].in_flight.store(1, Ordering::Relaxed);
        set[2].in_flight.store(2, Ordering::Relaxed);
        assert!((0..5).all(|_| port(&g.pick(None, &[]).unwrap()) == 2));
        // Guards count: holding two on backend 2 makes backend 3 (2 in flight) the choice.
        let _a = set[1].start();
        let _b = set[1].start();
        assert_eq!(port(&g.pick(None, &[]).unwrap()), 3);
    }

    #[test]
    fn p2c_ewma_avoids_the_slow_backend() {
        let g = group("p2c-ewma", r#"["127.0.0.1:1", "127.0.0.1:2"]"#);
        g.backends()[0].latency.observe(Duration::from_millis(200));
        g.backends()[1].latency.observe(Duration::from_millis(2));
        // With two backends both are always compared, so the fast one always wins.
        assert!((0..50).all(|_| port(&g.pick(None, &[]).unwrap()) == 2));
        let g =
            group("p2c-ewma", r#"["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]"#);
        g.backends()[0].latency.observe(Duration::from_millis(500));
        let mut seen = HashMap::new();
        for _ in 0..400 {
            *seen.entry(port(&g.pick(None, &[]).unwrap())).or_insert(0) += 1;
        }
        // The slow one wins only when drawn against itself, which p2c never does.
        assert_eq!(seen.get(&1), None, "{seen:?}");
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn hashing_is_sticky_and_moves_only_the_removed_backends_keys() {
        let g = group(
            "hash-header:x-user",
            r#"["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]"#,
        );
        let keys: Vec<String> = (0..200).map(|i| format!("user{i}")).collect();
        let before: Vec<u16> =
            keys.iter().map(|k| port(&g.pick(Some(k.as_bytes()), &[]).unwrap())).collect();
        let again: Vec<u16> =
            keys.iter().map(|k| port(&g.pick(Some(k.as_bytes()), &[]).unwrap())).collect();
        assert_eq!(before, again);
        assert!((1..=4).all(|p| before.contains(&p)), "every backend gets keys");
        g.remove("127.0.0.1:3".parse().unwrap()).unwrap();
        for (k, b) in keys.iter().zip(&before) {
            let now = port(&g.pick(Some(k.as_bytes()), &[]).unwrap());
            if *b != 3 {
                assert_eq!(now, *b, "key {k} moved although its backend stayed");
            }
        }
    }

    #[test]
    fn hash_keys_come_from_the_policy() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.append(header::COOKIE, "a=1; session=xyz".parse().unwrap());
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(hash_key(&Balance::HashSourceIp, ip, &h), Some(vec![10, 0, 0, 7]));
        assert_eq!(
            hash_key(&Balance::HashHeader("x-user".into()), ip, &h),
            Some(b"alice".to_vec())
        );
        assert_eq!(hash_key(&Balance::HashCookie("session".into()), ip, &h), Some(b"xyz".to_vec()));
        assert_eq!(hash_key(&Balance::HashCookie("none".into()), ip, &h), None);
        assert_eq!(hash_key(&Balance::RoundRobin, ip, &h), None);
    }

    #[tokio::test]
    async fn consecutive_failures_eject_for_a_while() {
        let g = group("round-robin", r#"["127.0.0.1:1", "127.0.0.1:2"]"#);
        let b = g.backends()[0].clone();
        assert!(!b.record_failure(3, Duration::from_millis(100), true));
        b.record_success();
        assert!(!b.record_failure(3, Duration::from_millis(100), true));
        assert!(!b.record_failure(3, Duration::from_millis(100), true));
        assert!(b.record_failure(3, Duration::from_millis(100), true), "third in a row ejects");
        assert!((0..4).all(|_| port(&g.pick(None, &[]).unwrap()) == 2));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(b.is_available(), "back after the ejection time");
    }

    #[tokio::test]
    async fn passive_ejection_leaves_half_of_the_group() {
        let eject = |g: &Group, i: usize| {
            let b = g.backends()[i].clone();
            b.record_failure(1, Duration::from_secs(60), g.may_eject())
        };
        let one = group("round-robin", r#"["127.0.0.1:1"]"#);
        assert!(!eject(&one, 0), "the only backend stays");
        let three = group("round-robin", r#"["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]"#);
        assert!(eject(&three, 0));
        assert!(!eject(&three, 1), "a second of three would leave less than half");
        assert!(three.backends()[1].is_available());
        let four =
            group("round-robin", r#"["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"]"#);
        assert!(eject(&four, 0) && eject(&four, 1));
        assert!(!eject(&four, 2));
        assert_eq!(four.pick(None, &[]).map(|b| port(&b) >= 3), Some(true));
    }
}
