//! SNAT address pools (`[[xdp.snat]]`, issue 12 item 8). Packet fixtures through
//! BPF_PROG_TEST_RUN: new flows spread over the pool's addresses, a backend takes addresses ×
//! ports concurrent flows, and replies to every pool address are translated back to their own
//! client. End to end: held TCP connections through `lb run`, before and after a reload adds
//! a pool.
use std::collections::{BTreeSet, HashMap};

use lb_tests::{
    client::{connect_in, request_on},
    conf,
    fixture::*,
    packet::{Frame, TCP_ACK, TCP_SYN, checksums_valid, fields},
    privileged,
    scenario::{Running, Scenario, TIMEOUT, WEB},
};
use lb_user::dataplane::{Dataplane, LoadOptions};

/// An `[[xdp.snat]]` table giving b1 `addrs`.
fn pool_on_b1(addrs: &[&str]) -> String {
    format!("[[xdp.snat]]\ninterface = \"b1\"\naddresses = [{}]\n", conf::list(addrs))
}

/// The fixture's interfaces with `pool` on b1, TCP `web` (10.200.0.1:80) and UDP `dns6`
/// ([fd00:200::1]:53), both on the backend behind b1.
fn config(pool: &[&str]) -> String {
    let web = conf::xdp_service("web", "10.200.0.1:80", &conf::list(["10.1.1.2:80"]), "");
    let udp = "protocol = \"udp\"\n";
    let dns6 = conf::xdp_service("dns6", "[fd00:200::1]:53", &conf::list(["[fd01:1::2]:53"]), udp);
    [conf::xdp(["c0", "b1", "b2"], ""), pool_on_b1(pool), web, dns6].concat()
}

/// Ports per SNAT address in these fixtures.
const PORTS: u16 = 4;

/// Runs `body` in a fresh fixture namespace where b1 also has the `pool` addresses (as `lb run`
/// requires), with the program loaded on SNAT ports 2000..2000+PORTS.
fn with_pool(pool: &'static [&'static str], body: impl FnOnce(&Dataplane) + Send + 'static) {
    let ns = namespace().expect("fixture namespace");
    for a in pool {
        let host = if a.contains(':') { format!("{a}/128") } else { format!("{a}/32") };
        ns.ip(&["addr", "add", &host, "dev", "b1", "nodad"]).expect("pool address");
    }
    let config = config(pool);
    ns.run(move || {
        let mut opts = LoadOptions::private();
        opts.settings.nat_port_min = 2000;
        opts.settings.nat_port_max = 2000 + PORTS - 1;
        opts.settings.cpus = 1;
        let dp = dataplane_with(&config, opts).expect("load program");
        body(&dp);
    })
    .expect("fixture body (see the panic above)");
}

fn stats(dp: &Dataplane) -> HashMap<&'static str, u64> {
    dp.stats().unwrap().into_iter().collect()
}

#[test]
fn two_snat_addresses_carry_twice_the_port_range_and_replies_reach_each_client() {
    privileged!();
    with_pool(&["10.1.1.10", "10.1.1.11"], |dp| {
        let vip = ip("10.200.0.1");
        // (client port, SNAT address, SNAT port) of every flow.
        let mut flows = Vec::new();
        for sport in 40000..40000 + 2 * PORTS {
            let syn = Frame::tcp(ip("10.0.0.2"), sport, vip, 80, TCP_SYN).bytes();
            let (a, out) = run(dp, &syn);
            assert_eq!(a, XDP_REDIRECT, "SYN from port {sport}: {:?}", stats(dp));
            assert!(checksums_valid(&out), "checksums after SNAT from a pool address");
            let f = fields(&out);
            assert_eq!((f.dst, f.dport), (ip("10.1.1.2"), 80));
            assert!((2000..2000 + PORTS).contains(&f.sport), "port {} in range", f.sport);
            flows.push((sport, f.src, f.sport));
        }
        let used: BTreeSet<_> = flows.iter().map(|f| f.1).collect();
        assert_eq!(
            used,
            [ip("10.1.1.10"), ip("10.1.1.11")].into(),
            "both addresses, never b1's own"
        );
        let pairs: BTreeSet<_> = flows.iter().map(|f| (f.1, f.2)).collect();
        assert_eq!(pairs.len(), flows.len(), "each (address, port) belongs to one flow");
        // Both ranges are full: one more flow is refused, not mis-forwarded.
        let extra = Frame::tcp(ip("10.0.0.2"), 41000, vip, 80, TCP_SYN).bytes();
        assert_eq!(run(dp, &extra).0, XDP_DROP);
        let s = stats(dp);
        assert_eq!((s["flow_new"], s["drop_no_port"]), (2 * PORTS as u64, 1), "{s:?}");
        // One address's range filled before the other's: those flows went to the next one.
        assert!(s["snat_addr_next"] >= 1, "{s:?}");

        // Every flow's SYN-ACK, to whichever pool address it came from, reaches its client
        // port; the client's ACK then follows the flow on the same address and port.
        for &(sport, snat, nat_port) in &flows {
            let synack = Frame::tcp(ip("10.1.1.2"), 80, snat, nat_port, TCP_SYN | TCP_ACK).bytes();
            let (a, out) = run(dp, &synack);
            assert_eq!(a, XDP_REDIRECT, "reply to {snat}:{nat_port}");
            let r = fields(&out);
            assert_eq!((r.src, r.sport, r.dst, r.dport), (vip, 80, ip("10.0.0.2"), sport));
            assert_eq!((r.dmac, r.smac), (CLIENT_MAC, C0_MAC));
            assert!(checksums_valid(&out), "checksums after reverse NAT");
            let ack = Frame::tcp(ip("10.0.0.2"), sport, vip, 80, TCP_ACK).bytes();
            let (a, out) = run(dp, &ack);
            assert_eq!(a, XDP_REDIRECT);
            assert_eq!((fields(&out).src, fields(&out).sport), (snat, nat_port), "port {sport}");
        }
        let s = stats(dp);
        assert_eq!((s["reply"], s["flow_confirmed"]), (2 * PORTS as u64, 2 * PORTS as u64));
        // A reply to a pool address on a port no flow holds is not ours: the kernel's.
        let stray = Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.10"), 2000 + PORTS, TCP_ACK).bytes();
        assert_eq!(run(dp, &stray).0, XDP_PASS);

        // The pool has no IPv6 address: an IPv6 flow through b1 uses b1's own, as without it.
        let q = Frame::udp(ip("fd00::2"), 5353, ip("fd00:200::1"), 53, b"q").bytes();
        let (a, out) = run(dp, &q);
        assert_eq!(a, XDP_REDIRECT);
        assert_eq!(fields(&out).src, ip("fd01:1::1"));
    });
}

#[test]
fn an_ipv6_pool_spreads_flows_and_translates_replies() {
    privileged!();
    with_pool(&["fd01:1::10", "fd01:1::11"], |dp| {
        let vip = ip("fd00:200::1");
        let mut flows = Vec::new();
        for sport in 5000..5000 + 2 * PORTS {
            let q = Frame::udp(ip("fd00::2"), sport, vip, 53, b"query").bytes();
            let (a, out) = run(dp, &q);
            assert_eq!(a, XDP_REDIRECT, "query from port {sport}: {:?}", stats(dp));
            assert!(checksums_valid(&out));
            let f = fields(&out);
            flows.push((sport, f.src, f.sport));
        }
        let used: BTreeSet<_> = flows.iter().map(|f| f.1).collect();
        assert_eq!(used, [ip("fd01:1::10"), ip("fd01:1::11")].into());
        let extra = Frame::udp(ip("fd00::3"), 5000, vip, 53, b"query").bytes();
        assert_eq!(run(dp, &extra).0, XDP_DROP, "both ranges are full");
        for &(sport, snat, nat_port) in &flows {
            let answer = Frame::udp(ip("fd01:1::2"), 53, snat, nat_port, b"answer").bytes();
            let (a, out) = run(dp, &answer);
            assert_eq!(a, XDP_REDIRECT, "reply to [{snat}]:{nat_port}");
            let r = fields(&out);
            assert_eq!((r.src, r.sport, r.dst, r.dport), (vip, 53, ip("fd00::2"), sport));
            assert!(checksums_valid(&out));
        }
    });
}

/// SNAT ports in the end-to-end test: 64, as the issue has it.
const E2E_PORTS: &str = "nat_ports = [20000, 20063]\n";

/// A global reason counter of the running `lb`.
fn reason(s: &Running, name: &str) -> u64 {
    let v = s.lb().json(&["stats"]).expect("lb stats");
    v["reasons"]
        .as_array()
        .and_then(|r| r.iter().find(|p| p[0] == name))
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no reason {name} in {v}"))
}

/// Opens connections to WEB until one is refused (at most `max`); returns the open ones.
fn hold_until_refused(s: &Running, max: usize) -> Vec<std::net::TcpStream> {
    let mut held = Vec::new();
    while held.len() < max {
        match connect_in(s.client(), None, WEB, TIMEOUT) {
            Ok(c) => held.push(c),
            Err(_) => return held,
        }
    }
    panic!("{max} connections and none refused");
}

/// Established connections the backend sees, by the balancer address they come from.
fn peers_at_backend(s: &Running) -> HashMap<String, usize> {
    let out = s.backend_ns(0).exec(&["ss", "-Htn", "state", "established", "sport", "= :80"]);
    let mut by_addr = HashMap::new();
    for line in out.expect("ss").lines() {
        let peer = line.split_whitespace().last().unwrap_or_default();
        let addr = peer.rsplit_once(':').map(|(a, _)| a).unwrap_or(peer).to_string();
        *by_addr.entry(addr).or_default() += 1;
    }
    by_addr
}

#[test]
fn two_snat_addresses_hold_twice_the_flows_to_one_backend() {
    privileged!();
    let s = Scenario::topology(1).xdp_extra(E2E_PORTS).xdp_service("").start().expect("lb run");
    // b1's own address alone: 64 ports, 64 held connections; the 65th SYN is dropped.
    let mut held = hold_until_refused(&s, 200);
    assert_eq!(held.len(), 64, "one address carries the port range");
    assert!(reason(&s, "drop_no_port") >= 1, "refused for want of a port");

    // The pool: two more addresses on b1 (lb requires them local, for ARP), added by reload
    // while the 64 connections stay open.
    for a in ["10.1.1.10/32", "10.1.1.11/32"] {
        s.balancer().ip(&["addr", "add", a, "dev", "b1"]).expect("pool address");
    }
    let pool = "[[xdp.snat]]\ninterface = \"b1\"\naddresses = [\"10.1.1.10\", \"10.1.1.11\"]\n";
    let web = conf::xdp_service("web", WEB, &conf::list(&s.backends), "");
    s.lb()
        .write_config(&[conf::xdp(s.interfaces(), E2E_PORTS), pool.into(), web].concat())
        .unwrap();
    let out = s.lb().cli(&["reload"]).expect("reload");
    assert!(out.contains("xdp.snat: b1 uses 10.1.1.10, 10.1.1.11"), "{out}");
    let refused = reason(&s, "drop_no_port");
    held.extend(hold_until_refused(&s, 400));
    assert_eq!(held.len(), 64 + 128, "two addresses carry twice the port range");
    assert!(reason(&s, "drop_no_port") > refused);
    let peers = peers_at_backend(&s);
    for a in ["10.1.1.1", "10.1.1.10", "10.1.1.11"] {
        assert_eq!(peers.get(a), Some(&64), "connections from {a} at the backend: {peers:?}");
    }
    // Every held connection still works, whichever address it came from.
    for (i, c) in held.into_iter().enumerate() {
        let body = request_on(c, WEB, TIMEOUT).unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
        assert_eq!(body, "backend-1");
    }
}
