//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights: a lookup table of prime
//! size where each backend owns slots in proportion to its weight, and a change to the backend
//! set moves few slots. Computed here, written flat into the XDP map (Katran's ch_rings), and
//! used as is by the userspace L4 proxy.
//!
//! The table depends only on the set of (address, weight), never on the order backends were
//! added: backends are sorted before filling, and each one's permutation comes from a hash of
//! its address.
use std::net::SocketAddr;

/// The default table size: prime, and large enough that 4096 backends still get ~16 slots each.
pub const DEFAULT_SIZE: u32 = lb_common::RING_SIZE;

/// Marks a slot with no backend (only when the backend set is empty).
pub const EMPTY: u32 = u32::MAX;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// Builds the table: slot → index into `backends`, or [`EMPTY`]. `size` must be prime for every
/// skip to visit every slot; zero-weight backends get no slots.
pub fn table(backends: &[Entry], size: u32) -> Vec<u32> {
    let m = size as u64;
    let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].weight > 0).collect();
    order.sort_by_key(|&i| backends[i].addr);
    order.dedup_by_key(|i| backends[*i].addr);
    let mut slots = vec![EMPTY; size as usize];
    if order.is_empty() {
        return slots;
    }
    // Each backend walks its own permutation: offset, offset+skip, offset+2*skip, ... mod m.
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let key = key_bytes(backends[i].addr);
            (hash64(&key, 0x5bd1_e995) % m, hash64(&key, 0x1b87_3593) % (m - 1) + 1)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut filled = 0u64;
    'rounds: loop {
        for (k, &i) in order.iter().enumerate() {
            for _ in 0..backends[i].weight {
                let (offset, skip) = perms[k];
                let mut slot = (offset + next[k] * skip) % m;
                while slots[slot as usize] != EMPTY {
                    next[k] += 1;
                    slot = (offset + next[k] * skip) % m;
                }
                slots[slot as usize] = i as u32;
                next[k] += 1;
                filled += 1;
                if filled == m {
                    break 'rounds;
                }
            }
        }
    }
    slots
}

fn key_bytes(addr: SocketAddr) -> Vec<u8> {
    let mut key = match addr.ip() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    key.extend_from_slice(&addr.port().to_be_bytes());
    key
}

/// FNV-1a with a seed, then splitmix64's finaliser for spread.
fn hash64(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The slot a flow hash falls in.
pub fn slot(hash: u32, size: u32) -> u32 {
    hash % size
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: usize) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                addr: SocketAddr::new(
                    std::net::Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1).into(),
                    80,
                ),
                weight: 1,
            })
            .collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<u64> {
        let mut c = vec![0u64; n];
        for &s in t {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn equal_weights_give_floor_or_ceil_of_m_over_n() {
        for n in [1usize, 2, 3, 7, 10, 100, 1000] {
            let t = table(&backends(n), DEFAULT_SIZE);
            let (lo, hi) =
                (DEFAULT_SIZE as u64 / n as u64, (DEFAULT_SIZE as u64).div_ceil(n as u64));
            for c in counts(&t, n) {
                assert!(c == lo || c == hi, "n={n}: {c} not in [{lo}, {hi}]");
            }
        }
    }

    #[test]
    fn order_does_not_matter() {
        let b = backends(50);
        let mut r = b.clone();
        r.reverse();
        r.swap(3, 17);
        let t1: Vec<SocketAddr> =
            table(&b, DEFAULT_SIZE).iter().map(|&i| b[i as usize].addr).collect();
        let t2: Vec<SocketAddr> =
            table(&r, DEFAULT_SIZE).iter().map(|&i| r[i as usize].addr).collect();
        assert_eq!(t1, t2);
    }

    #[test]
    fn removing_one_of_1000_moves_under_one_percent_of_the_others() {
        let b = backends(1000);
        let before = table(&b, DEFAULT_SIZE);
        let removed = 421usize;
        let mut rest = b.clone();
        rest.remove(removed);
        let after = table(&rest, DEFAULT_SIZE);
        let mut others = 0u64;
        let mut moved = 0u64;
        for (s, &owner) in before.iter().enumerate() {
            if owner as usize == removed {
                continue;
            }
            others += 1;
            if rest[after[s] as usize].addr != b[owner as usize].addr {
                moved += 1;
            }
        }
        assert!(moved * 100 < others, "moved {moved} of {others} slots of surviving backends");
    }

    #[test]
    fn weights_shift_shares_proportionally() {
        let mut b = backends(3);
        b[1].weight = 2;
        b[2].weight = 5;
        let c = counts(&table(&b, DEFAULT_SIZE), 3);
        let unit = DEFAULT_SIZE as f64 / 8.0;
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let share = c[i] as f64 / (unit * w);
            assert!((0.97..1.03).contains(&share), "backend {i}: {} slots, {share:.3}", c[i]);
        }
    }

    #[test]
    fn empty_and_zero_weight_sets_have_no_owner() {
        assert!(table(&[], 13).iter().all(|&s| s == EMPTY));
        let mut b = backends(2);
        b[0].weight = 0;
        assert!(table(&b, 13).iter().all(|&s| s == 1));
    }

    #[test]
    fn golden_table_pins_the_permutation() {
        let t = table(&backends(3), 13);
        // If this changes, an upgrade moves clients between backends.
        assert_eq!(t, [1, 1, 1, 0, 2, 0, 2, 2, 2, 0, 0, 1, 0]);
    }
}
