//! `mode = "generic"` end to end (issue 12): the program attached in the kernel's generic
//! (skb) path balances real connections as the native attach does, and says so in its
//! counters and in `lb status`.
use std::collections::BTreeMap;

use lb_tests::{
    scenario::{Scenario, WEB},
    topology::wait_neighbours,
};

/// Fresh connections sent through the generic attach, one per client address.
const CLIENTS: usize = 12;

#[test]
fn generic_mode_balances_connections() {
    lb_tests::privileged!();
    let s = Scenario::topology(2)
        .xdp_extra("mode = \"generic\"\n")
        .xdp_service("")
        .start()
        .expect("lb run");
    let status = s.lb().json(&["status"]).unwrap();
    let attached = status["xdp"].as_array().expect("xdp list");
    assert_eq!(attached.len(), 3, "{status}");
    assert!(attached.iter().all(|a| a["mode"] == "generic"), "{status}");
    // The kernel agrees: every served interface has a generic-mode program, none a native one.
    for iface in s.interfaces() {
        let link = s.balancer().ip(&["-d", "link", "show", &iface]).unwrap();
        assert!(link.contains("xdpgeneric") && !link.contains("xdpdrv"), "{iface}: {link}");
    }

    // Until the daemon has the backends' neighbours resolved, SYNs are dropped (and resent).
    wait_neighbours(&s.topo().lb, &["10.1.1.2", "10.1.2.2"]).unwrap();
    let before = s.lb().reasons().unwrap();
    let clients = s.topo().add_client_addresses(CLIENTS).unwrap();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for c in &clients {
        let who = s.get_from(*c, WEB).unwrap_or_else(|e| panic!("request from {c}: {e:#}"));
        *answers.entry(who).or_default() += 1;
    }
    let after = s.lb().reasons().unwrap();
    let moved = |k: &str| after[k] - before.get(k).copied().unwrap_or(0);
    assert_eq!(answers.values().sum::<usize>(), CLIENTS);
    assert!(answers.keys().all(|b| b.starts_with("backend-")), "{answers:?}");
    // The program, not the kernel's forwarding, carried them: a tracked flow per connection,
    // replies translated, and the service's own counter.
    let n = CLIENTS as u64;
    assert_eq!(moved("flow_new"), n, "{after:?}");
    assert!(moved("reply") >= 2 * n && moved("flow_hit") >= 2 * n, "{after:?}");
    let stats = s.lb().json(&["stats", "web"]).unwrap();
    assert_eq!(stats["services"][0]["flows"], n, "{stats}");
}
