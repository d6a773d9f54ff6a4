//! The steps that turn the backend set lb serves into the one an API reports: a pure function,
//! so every transition (scale up and down, not ready, terminating and back) is tested without
//! an API server.
use std::{collections::BTreeMap, net::SocketAddr};

/// What the API says about one backend address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Want {
    /// Serving and terminating: open connections finish, no new ones (a drained backend).
    Drained,
    /// Ready: gets new connections.
    Up,
}

/// One change, applied through the same path as `lb backend add|remove|drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Add,
    Remove,
    Drain,
    /// A terminating endpoint that is ready again.
    Undrain,
}

/// The steps from `have` (each backend served now, and whether it is draining) to `want`.
/// Adds come first and removals last, so the set never shrinks below what both agree on
/// while the steps are applied one at a time. A backend that is only ever seen terminating is
/// not added: it has no connections to finish.
pub fn diff(
    have: &[(SocketAddr, bool)],
    want: &BTreeMap<SocketAddr, Want>,
) -> Vec<(SocketAddr, Step)> {
    let held = |addr: &SocketAddr| have.iter().find(|(a, _)| a == addr).map(|(_, d)| *d);
    let mut adds = Vec::new();
    let mut others = Vec::new();
    for (addr, w) in want {
        match (held(addr), w) {
            (None, Want::Up) => adds.push((*addr, Step::Add)),
            (None, Want::Drained) | (Some(false), Want::Up) | (Some(true), Want::Drained) => {}
            (Some(true), Want::Up) => others.push((*addr, Step::Undrain)),
            (Some(false), Want::Drained) => others.push((*addr, Step::Drain)),
        }
    }
    let removes =
        have.iter().filter(|(a, _)| !want.contains_key(a)).map(|(a, _)| (*a, Step::Remove));
    adds.into_iter().chain(others).chain(removes).collect()
}

/// Merges the endpoints of several EndpointSlices: an address listed twice (slices overlap
/// while the controller moves endpoints between them) counts as its best state.
pub fn merge<'a>(
    slices: impl IntoIterator<Item = &'a [(SocketAddr, Want)]>,
) -> BTreeMap<SocketAddr, Want> {
    let mut out = BTreeMap::new();
    for (addr, w) in slices.into_iter().flatten() {
        let e = out.entry(*addr).or_insert(*w);
        *e = (*e).max(*w);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 80))
    }

    fn want(list: &[(u8, Want)]) -> BTreeMap<SocketAddr, Want> {
        list.iter().map(|(n, w)| (a(*n), *w)).collect()
    }

    #[test]
    fn an_empty_set_fills_up_and_an_equal_set_changes_nothing() {
        let w = want(&[(1, Want::Up), (2, Want::Up)]);
        assert_eq!(diff(&[], &w), [(a(1), Step::Add), (a(2), Step::Add)]);
        assert_eq!(diff(&[(a(1), false), (a(2), false)], &w), []);
    }

    #[test]
    fn scale_up_adds_before_scale_down_removes() {
        let have = [(a(1), false), (a(2), false)];
        let steps = diff(&have, &want(&[(2, Want::Up), (3, Want::Up)]));
        assert_eq!(steps, [(a(3), Step::Add), (a(1), Step::Remove)]);
    }

    #[test]
    fn terminating_drains_and_ready_again_undrains() {
        let have = [(a(1), false), (a(2), false)];
        let steps = diff(&have, &want(&[(1, Want::Up), (2, Want::Drained)]));
        assert_eq!(steps, [(a(2), Step::Drain)]);
        let have = [(a(1), false), (a(2), true)];
        assert_eq!(diff(&have, &want(&[(1, Want::Up), (2, Want::Drained)])), []);
        assert_eq!(diff(&have, &want(&[(1, Want::Up), (2, Want::Up)])), [(a(2), Step::Undrain)]);
    }

    #[test]
    fn gone_or_not_ready_is_removed_and_new_terminating_is_not_added() {
        let have = [(a(1), false), (a(2), true)];
        let steps = diff(&have, &want(&[(3, Want::Drained)]));
        assert_eq!(steps, [(a(1), Step::Remove), (a(2), Step::Remove)]);
        assert_eq!(diff(&[], &want(&[(3, Want::Drained)])), []);
    }

    #[test]
    fn an_empty_list_removes_everything() {
        let have = [(a(1), false)];
        assert_eq!(diff(&have, &BTreeMap::new()), [(a(1), Step::Remove)]);
    }

    #[test]
    fn overlapping_slices_keep_the_best_state() {
        let s1 = [(a(1), Want::Drained), (a(2), Want::Up)];
        let s2 = [(a(1), Want::Up)];
        let merged = merge([&s1[..], &s2[..]]);
        assert_eq!(merged, want(&[(1, Want::Up), (2, Want::Up)]));
        let merged = merge([&s2[..], &s1[..]]);
        assert_eq!(merged[&a(1)], Want::Up);
    }
}
