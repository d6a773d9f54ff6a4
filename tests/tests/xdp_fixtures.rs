//! Packet fixtures through BPF_PROG_TEST_RUN: the real program in the real kernel, in a
//! namespace with fixed routes, MACs and neighbours; output bytes are checked field by field
//! and checksums by an independent full computation.
use std::collections::HashMap;

use lb_tests::{
    fixture::*,
    packet::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, checksums_valid, fields},
};
use lb_user::dataplane::Dataplane;

const CONFIG: &str = r#"
[xdp]
interfaces = ["c0", "b1", "b2"]
[[xdp.service]]
name = "web"
vip = "10.200.0.1:80"
backends = ["10.1.1.2:80"]
[[xdp.service]]
name = "dns6"
vip = "[fd00:200::1]:53"
protocol = "udp"
backends = ["[fd01:1::2]:53"]
"#;

/// Runs `body` inside a fresh fixture namespace with the program loaded.
fn with_fixture(config: &'static str, body: impl FnOnce(&mut Dataplane) + Send + 'static) {
    lb_tests::privileged!();
    let ns = namespace().expect("fixture namespace");
    ns.run(move || {
        let mut dp = dataplane(config).expect("load program");
        body(&mut dp);
    })
    .expect("fixture body (see the panic above)");
}

fn stats(dp: &Dataplane) -> HashMap<&'static str, u64> {
    dp.stats().unwrap().into_iter().collect()
}

#[test]
fn tcp_v4_full_nat_both_ways() {
    with_fixture(CONFIG, |dp| {
        let syn = Frame::tcp(ip("10.0.0.2"), 40000, ip("10.200.0.1"), 80, TCP_SYN).bytes();
        let (action, out) = run(dp, &syn);
        assert_eq!(action, XDP_REDIRECT, "to b1 through the devmap");
        let f = fields(&out);
        assert_eq!((f.dmac, f.smac), (BACKEND1_MAC, B1_MAC));
        assert_eq!((f.src, f.dst, f.dport, f.ttl), (ip("10.1.1.1"), ip("10.1.1.2"), 80, 63));
        assert!((1024..=32767).contains(&f.sport), "SNAT port {} in range", f.sport);
        assert!(checksums_valid(&out), "checksums after SNAT/DNAT");
        assert_eq!(out.len(), syn.len());
        let nat_port = f.sport;

        // The backend's SYN-ACK comes back to the SNAT address and port.
        let synack =
            Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), nat_port, TCP_SYN | TCP_ACK).bytes();
        let (action, out) = run(dp, &synack);
        assert_eq!(action, XDP_REDIRECT, "to c0");
        let r = fields(&out);
        assert_eq!((r.dmac, r.smac), (CLIENT_MAC, C0_MAC));
        assert_eq!((r.src, r.sport, r.dst, r.dport), (ip("10.200.0.1"), 80, ip("10.0.0.2"), 40000));
        assert!(checksums_valid(&out), "checksums after reverse NAT");

        // The client's ACK follows the tracked flow: same backend, same SNAT port.
        let ack = Frame::tcp(ip("10.0.0.2"), 40000, ip("10.200.0.1"), 80, TCP_ACK).bytes();
        let (action, out) = run(dp, &ack);
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(fields(&out).sport, nat_port);
        let s = stats(dp);
        assert_eq!((s["flow_new"], s["flow_hit"], s["reply"]), (1, 1, 1), "{s:?}");
        assert_eq!(s["redirect"], 3);
    });
}

#[test]
fn udp_v6_full_nat_both_ways() {
    with_fixture(CONFIG, |dp| {
        let q = Frame::udp(ip("fd00::2"), 5353, ip("fd00:200::1"), 53, b"query").bytes();
        let (action, out) = run(dp, &q);
        assert_eq!(action, XDP_REDIRECT);
        let f = fields(&out);
        assert_eq!((f.dmac, f.smac), (BACKEND1_MAC, B1_MAC));
        assert_eq!((f.src, f.dst, f.dport, f.ttl), (ip("fd01:1::1"), ip("fd01:1::2"), 53, 63));
        assert!(checksums_valid(&out), "UDP/IPv6 checksum after NAT");
        assert_eq!(&out[out.len() - 5..], b"query", "payload untouched");
        let answer = Frame::udp(ip("fd01:1::2"), 53, ip("fd01:1::1"), f.sport, b"answer").bytes();
        let (action, out) = run(dp, &answer);
        assert_eq!(action, XDP_REDIRECT);
        let r = fields(&out);
        assert_eq!((r.src, r.sport, r.dst, r.dport), (ip("fd00:200::1"), 53, ip("fd00::2"), 5353));
        assert_eq!(r.dmac, CLIENT_MAC);
        assert!(checksums_valid(&out));
    });
}

#[test]
fn only_new_flows_consult_the_ring() {
    with_fixture(CONFIG, |dp| {
        // A TCP packet that is not a SYN and matches no flow cannot be resumed.
        let ack = Frame::tcp(ip("10.0.0.2"), 41000, ip("10.200.0.1"), 80, TCP_ACK).bytes();
        assert_eq!(run(dp, &ack).0, XDP_DROP);
        assert_eq!(stats(dp)["drop_not_syn"], 1);

        // Open flows from 40 clients, then add a backend: some clients' slots move to it.
        let clients: Vec<String> = (1..=40).map(|i| format!("10.0.7.{i}")).collect();
        let mut first = HashMap::new();
        for c in &clients {
            let (a, out) =
                run(dp, &Frame::tcp(ip(c), 40000, ip("10.200.0.1"), 80, TCP_SYN).bytes());
            assert_eq!(a, XDP_REDIRECT);
            first.insert(c.clone(), fields(&out));
        }
        dp.add_backend("web", "10.1.2.2:80".parse().unwrap(), 1).unwrap();
        let mut moved = 0;
        for c in &clients {
            // The established flow keeps its backend and SNAT port.
            let (_, out) =
                run(dp, &Frame::tcp(ip(c), 40000, ip("10.200.0.1"), 80, TCP_ACK).bytes());
            assert_eq!(fields(&out), first[c], "{c}: established flow moved");
            // A new connection from the same client follows the new ring.
            let (_, out) =
                run(dp, &Frame::tcp(ip(c), 40001, ip("10.200.0.1"), 80, TCP_SYN).bytes());
            if fields(&out).dst == ip("10.1.2.2") {
                moved += 1;
                assert_eq!(fields(&out).smac, B2_MAC);
            }
        }
        assert!((10..=30).contains(&moved), "about half the clients' new flows move: {moved}");
    });
}

#[test]
fn tcp_close_and_port_reuse() {
    with_fixture(CONFIG, |dp| {
        let c = ip("10.0.0.2");
        let vip = ip("10.200.0.1");
        let (_, out) = run(dp, &Frame::tcp(c, 42000, vip, 80, TCP_SYN).bytes());
        let port1 = fields(&out).sport;
        // FIN from the client, then a SYN reusing the same tuple: a new flow. It gets the same
        // SNAT port (a client tuple always prefers the same one), so the backend sees the same
        // 4-tuple the client reused, which its TIME_WAIT accepts by timestamp.
        run(dp, &Frame::tcp(c, 42000, vip, 80, TCP_FIN | TCP_ACK).bytes());
        let (a, out) = run(dp, &Frame::tcp(c, 42000, vip, 80, TCP_SYN).bytes());
        assert_eq!(a, XDP_REDIRECT);
        assert_eq!(fields(&out).sport, port1, "a reused tuple maps to its SNAT port again");
        assert_eq!(stats(dp)["flow_new"], 2);
        // RST from the backend ends it too; the next SYN is again a new flow.
        run(dp, &Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), port1, TCP_RST).bytes());
        let (_, out) = run(dp, &Frame::tcp(c, 42000, vip, 80, TCP_SYN).bytes());
        assert_eq!(fields(&out).sport, port1);
        assert_eq!(stats(dp)["flow_new"], 3);
        // Another client port maps elsewhere.
        let (_, out) = run(dp, &Frame::tcp(c, 42001, vip, 80, TCP_SYN).bytes());
        assert_ne!(fields(&out).sport, port1);
    });
}

#[test]
fn drained_backend_keeps_flows_removed_backend_loses_them() {
    with_fixture(CONFIG, |dp| {
        let vip = ip("10.200.0.1");
        run(dp, &Frame::tcp(ip("10.0.0.2"), 43000, vip, 80, TCP_SYN).bytes());
        dp.set_draining("web", "10.1.1.2:80".parse().unwrap(), true).unwrap();
        let ack = Frame::tcp(ip("10.0.0.2"), 43000, vip, 80, TCP_ACK).bytes();
        assert_eq!(run(dp, &ack).0, XDP_REDIRECT, "drained: the open flow continues");
        let syn = Frame::tcp(ip("10.0.0.3"), 43000, vip, 80, TCP_SYN).bytes();
        assert_eq!(run(dp, &syn).0, XDP_DROP, "drained and alone: no backend for new flows");
        assert_eq!(stats(dp)["drop_no_backend"], 1);
        dp.remove_backend("web", "10.1.1.2:80".parse().unwrap()).unwrap();
        assert_eq!(run(dp, &ack).0, XDP_DROP, "removed: its flows stop");
        assert_eq!(stats(dp)["drop_backend_gone"], 1);
    });
}

#[test]
fn stated_policies_for_other_packets() {
    with_fixture(CONFIG, |dp| {
        let vip = ip("10.200.0.1");
        let pass_untouched = |dp: &Dataplane, frame: &[u8], what: &str| {
            let (a, out) = run(dp, frame);
            assert_eq!((a, out.as_slice()), (XDP_PASS, frame), "{what}");
        };
        // Not a VIP: another port, another protocol, another address.
        pass_untouched(dp, &Frame::tcp(ip("10.0.0.2"), 1, vip, 81, TCP_SYN).bytes(), "port");
        pass_untouched(dp, &Frame::udp(ip("10.0.0.2"), 1, vip, 80, b"x").bytes(), "proto");
        pass_untouched(
            dp,
            &Frame::tcp(ip("10.0.0.2"), 1, ip("10.0.0.1"), 22, TCP_SYN).bytes(),
            "host",
        );
        // ARP.
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        pass_untouched(dp, &arp, "ARP");
        // IPv4 fragments (first with MF, and a later one) go to the kernel's reassembly.
        let mut frag = Frame::tcp(ip("10.0.0.2"), 44000, vip, 80, TCP_SYN);
        frag.frag = 0x2000;
        pass_untouched(dp, &frag.bytes(), "first fragment");
        frag.frag = 0x0010;
        pass_untouched(dp, &frag.bytes(), "later fragment");
        // Truncated: half an IPv4 header; a TCP header cut short.
        let syn = Frame::tcp(ip("10.0.0.2"), 44000, vip, 80, TCP_SYN).bytes();
        pass_untouched(dp, &syn[..24], "truncated IP");
        pass_untouched(dp, &syn[..40], "truncated TCP");
        // TTL 1: the kernel sends time exceeded.
        let mut ttl = Frame::tcp(ip("10.0.0.2"), 44000, vip, 80, TCP_SYN);
        ttl.ttl = 1;
        pass_untouched(dp, &ttl.bytes(), "TTL 1");
        // ICMP (an error quoting a flow, here a port unreachable) goes to the kernel untranslated.
        let mut icmp = syn.clone();
        icmp[23] = 1;
        pass_untouched(dp, &icmp, "ICMP");
        // IPv4 options are forwarded with the options intact.
        let mut opt = Frame::tcp(ip("10.0.0.2"), 44001, vip, 80, TCP_SYN);
        opt.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let (a, out) = run(dp, &opt.bytes());
        assert_eq!(a, XDP_REDIRECT, "options");
        assert_eq!(&out[34..38], &[1, 1, 1, 0]);
        assert_eq!(fields(&out).dst, ip("10.1.1.2"));
        assert!(checksums_valid(&out), "checksums with options");
        let s = stats(dp);
        for (k, v) in [
            ("pass_not_vip", 3),
            ("pass_not_ip", 1),
            ("pass_fragment", 2),
            ("pass_truncated", 2),
            ("pass_ttl_exceeded", 1),
            ("pass_icmp", 1),
        ] {
            assert_eq!(s[k], v, "{k}: {s:?}");
        }
        let accounted: u64 = s
            .iter()
            .filter(|(k, _)| k.starts_with("pass_") || k.starts_with("drop_"))
            .map(|(_, v)| v)
            .sum::<u64>()
            + s["redirect"]
            + s["tx"];
        assert_eq!(accounted, s["rx"], "every packet has exactly one outcome: {s:?}");
    });
}

#[test]
fn per_backend_counters_match_a_golden_table() {
    const TWO: &str = r#"
[xdp]
interfaces = ["c0", "b1", "b2"]
[[xdp.service]]
name = "web"
vip = "10.200.0.1:80"
backends = ["10.1.1.2:80", "10.1.2.2:80"]
"#;
    with_fixture(TWO, |dp| {
        // 20 clients, 2 packets each (SYN, ACK), 54-byte frames.
        for i in 1..=20 {
            let c = ip(&format!("10.0.9.{i}"));
            run(dp, &Frame::tcp(c, 45000, ip("10.200.0.1"), 80, TCP_SYN).bytes());
            run(dp, &Frame::tcp(c, 45000, ip("10.200.0.1"), 80, TCP_ACK).bytes());
        }
        let got: Vec<(String, u64, u64, u64)> = dp
            .backends("web")
            .unwrap()
            .into_iter()
            .map(|(v, c)| (v.addr.to_string(), c.packets, c.bytes, c.flows))
            .collect();
        // Golden: which backend each client hashes to is pinned by lb_common::hash and Maglev.
        let golden = GOLDEN.to_vec();
        assert_eq!(
            got,
            golden.iter().map(|(a, p, b, f)| (a.to_string(), *p, *b, *f)).collect::<Vec<_>>()
        );
        assert_eq!(dp.service_counter(0).unwrap().packets, 40);
        // The kernel's choices are exactly userspace's Maglev over the same hash.
        let entries: Vec<lb_user::maglev::Entry> = ["10.1.1.2:80", "10.1.2.2:80"]
            .iter()
            .map(|a| lb_user::maglev::Entry { addr: a.parse().unwrap(), weight: 1 })
            .collect();
        let table = lb_user::maglev::table(&entries, lb_common::RING_SIZE);
        let mut flows = [0u64; 2];
        for i in 1..=20u8 {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[10, 0, 9, i]);
            let slot = lb_common::hash::source_hash(&a) % lb_common::RING_SIZE;
            flows[table[slot as usize] as usize] += 1;
        }
        assert_eq!(flows, [GOLDEN[0].3, GOLDEN[1].3]);
    });
}

/// 9 and 11 of the 20 clients, 2 frames of 54 bytes per client.
const GOLDEN: [(&str, u64, u64, u64); 2] =
    [("10.1.1.2:80", 18, 972, 9), ("10.1.2.2:80", 22, 1188, 11)];

#[test]
fn snat_ports_run_out_and_are_reclaimed_from_finished_flows() {
    lb_tests::privileged!();
    let ns = namespace().expect("fixture namespace");
    ns.run(|| {
        let mut opts = lb_user::dataplane::LoadOptions::private();
        // Two SNAT ports, one CPU slice, and no grace time after a close.
        opts.settings.nat_port_min = 2000;
        opts.settings.nat_port_max = 2001;
        opts.settings.cpus = 1;
        opts.settings.tcp_closed_ns = 0;
        let dp = dataplane_with(CONFIG, opts).expect("load program");
        let vip = ip("10.200.0.1");
        let mut ports = Vec::new();
        for c in ["10.0.0.2", "10.0.0.3"] {
            let (a, out) = run(&dp, &Frame::tcp(ip(c), 46000, vip, 80, TCP_SYN).bytes());
            assert_eq!(a, XDP_REDIRECT);
            ports.push(fields(&out).sport);
        }
        ports.sort();
        assert_eq!(ports, [2000, 2001]);
        // Both ports are held by live flows: a third client is refused, not mis-forwarded.
        let third = Frame::tcp(ip("10.0.0.4"), 46000, vip, 80, TCP_SYN).bytes();
        assert_eq!(run(&dp, &third).0, XDP_DROP);
        assert_eq!(stats(&dp)["drop_no_port"], 1);
        // The first client's connection is reset; its port goes to the third client.
        run(&dp, &Frame::tcp(ip("10.0.0.2"), 46000, vip, 80, TCP_RST | TCP_ACK).bytes());
        let (a, out) = run(&dp, &third);
        assert_eq!(a, XDP_REDIRECT);
        assert!(ports.contains(&fields(&out).sport));
        assert_eq!(stats(&dp)["port_reclaimed"], 1);
        // The second client's flow is untouched.
        let ack = Frame::tcp(ip("10.0.0.3"), 46000, vip, 80, TCP_ACK).bytes();
        assert_eq!(run(&dp, &ack).0, XDP_REDIRECT);
    })
    .expect("fixture body (see the panic above)");
}

/// The port filter in front of the flow and VIP lookups follows the services: a port stays
/// served while any VIP uses it, and a port no VIP uses any more passes untouched.
#[test]
fn vip_port_filter_follows_service_changes() {
    with_fixture(CONFIG, |dp| {
        let vip = ip("10.200.0.1");
        let two_vips_on_80 = lb_user::config::Config::parse(
            "[xdp]\ninterfaces = [\"c0\"]\n\
             [[xdp.service]]\nname = \"web\"\nvip = \"10.200.0.1:80\"\nbackends = [\"10.1.1.2:80\"]\n\
             [[xdp.service]]\nname = \"web2\"\nvip = \"10.200.0.2:80\"\nbackends = [\"10.1.2.2:80\"]\n",
        )
        .unwrap();
        dp.apply(&two_vips_on_80.xdp.unwrap().services).unwrap();
        let syn = |dst, port, sport| Frame::tcp(ip("10.0.0.2"), sport, dst, port, TCP_SYN).bytes();
        assert_eq!(run(dp, &syn(vip, 80, 41000)).0, XDP_REDIRECT);
        assert_eq!(run(dp, &syn(ip("10.200.0.2"), 80, 41001)).0, XDP_REDIRECT);
        // A VIP port on another address (a backend's, reached directly) is not a VIP.
        let direct = syn(ip("10.1.1.2"), 80, 41006);
        assert_eq!(run(dp, &direct), (XDP_PASS, direct.clone()), "backend address");

        // web moves to 8080; web2 still holds port 80.
        let moved = lb_user::config::Config::parse(
            "[xdp]\ninterfaces = [\"c0\"]\n\
             [[xdp.service]]\nname = \"web\"\nvip = \"10.200.0.1:8080\"\nbackends = [\"10.1.1.2:80\"]\n\
             [[xdp.service]]\nname = \"web2\"\nvip = \"10.200.0.2:80\"\nbackends = [\"10.1.2.2:80\"]\n",
        )
        .unwrap();
        dp.apply(&moved.xdp.unwrap().services).unwrap();
        let old = syn(vip, 80, 41002);
        assert_eq!(run(dp, &old), (XDP_PASS, old.clone()), "old VIP port");
        assert_eq!(run(dp, &syn(vip, 8080, 41003)).0, XDP_REDIRECT, "new VIP port");
        assert_eq!(run(dp, &syn(ip("10.200.0.2"), 80, 41004)).0, XDP_REDIRECT, "other VIP");

        // No VIP on port 80 any more.
        let only_8080 = lb_user::config::Config::parse(
            "[xdp]\ninterfaces = [\"c0\"]\n\
             [[xdp.service]]\nname = \"web\"\nvip = \"10.200.0.1:8080\"\nbackends = [\"10.1.1.2:80\"]\n",
        )
        .unwrap();
        dp.apply(&only_8080.xdp.unwrap().services).unwrap();
        let gone = syn(ip("10.200.0.2"), 80, 41005);
        assert_eq!(run(dp, &gone), (XDP_PASS, gone.clone()), "removed VIP");
        assert_eq!(stats(dp)["pass_not_vip"], 3, "{:?}", stats(dp));
    });
}

/// Runs `body` in a fresh fixture namespace with the program loaded under `opts`.
fn with_options(
    config: &'static str,
    opts: lb_user::dataplane::LoadOptions,
    body: impl FnOnce(&mut Dataplane) + Send + 'static,
) {
    lb_tests::privileged!();
    let ns = namespace().expect("fixture namespace");
    ns.run(move || {
        let mut dp = dataplane_with(config, opts).expect("load program");
        body(&mut dp);
    })
    .expect("fixture body (see the panic above)");
}

/// Load options with SNAT ports `[lo, hi]`, one CPU slice, and every timeout at `secs`.
fn short_timeouts(lo: u16, hi: u16, secs: f64) -> lb_user::dataplane::LoadOptions {
    let mut opts = lb_user::dataplane::LoadOptions::private();
    let ns = (secs * 1e9) as u64;
    opts.settings.nat_port_min = lo;
    opts.settings.nat_port_max = hi;
    opts.settings.cpus = 1;
    opts.settings.tcp_syn_ns = ns;
    opts.settings.tcp_idle_ns = ns;
    opts.settings.udp_idle_ns = ns;
    opts
}

/// Sleeps past a timeout of `secs` (the program's coarse clock lags a few ms).
fn sleep_past(secs: f64) {
    std::thread::sleep(std::time::Duration::from_secs_f64(secs + 0.15));
}

/// The TCP handshake through the balancer: SYN, the backend's SYN-ACK, the client's ACK.
/// Returns the SNAT port.
fn handshake(dp: &Dataplane, client: &str, sport: u16) -> u16 {
    let vip = ip("10.200.0.1");
    let (a, out) = run(dp, &Frame::tcp(ip(client), sport, vip, 80, TCP_SYN).bytes());
    assert_eq!(a, XDP_REDIRECT, "{client}:{sport} SYN");
    let port = fields(&out).sport;
    let synack = Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), port, TCP_SYN | TCP_ACK).bytes();
    assert_eq!(run(dp, &synack).0, XDP_REDIRECT, "SYN-ACK to {client}:{sport}");
    let ack = Frame::tcp(ip(client), sport, vip, 80, TCP_ACK).bytes();
    assert_eq!(run(dp, &ack).0, XDP_REDIRECT, "{client}:{sport} ACK");
    port
}

/// Issue 12, item 1: a SYN whose SYN-ACK the client never acknowledges holds its SNAT port
/// for `tcp_syn_timeout` only; a confirmed flow outlives that. A SYN-ACK alone confirms nothing.
#[test]
fn unconfirmed_tcp_flow_expires_and_frees_its_port() {
    let mut opts = short_timeouts(2000, 2001, 1.0);
    opts.settings.tcp_idle_ns = 30_000_000_000;
    with_options(CONFIG, opts, |dp| {
        let vip = ip("10.200.0.1");
        let confirmed = handshake(dp, "10.0.0.2", 47000);
        let (a, out) = run(dp, &Frame::tcp(ip("10.0.0.3"), 47000, vip, 80, TCP_SYN).bytes());
        assert_eq!(a, XDP_REDIRECT);
        let unconfirmed = fields(&out).sport;
        assert_ne!(unconfirmed, confirmed);
        // The backend answers, the client (a spoofed source, or one that drops SYN-ACKs) never
        // acknowledges; repeating the SYN does not extend its time either.
        let synack =
            Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), unconfirmed, TCP_SYN | TCP_ACK).bytes();
        assert_eq!(run(dp, &synack).0, XDP_REDIRECT);
        let newcomer = Frame::tcp(ip("10.0.0.4"), 47000, vip, 80, TCP_SYN).bytes();
        assert_eq!(run(dp, &newcomer).0, XDP_DROP, "both ports held by live flows");
        assert_eq!(stats(dp)["drop_no_port"], 1);
        std::thread::sleep(std::time::Duration::from_millis(600));
        let resyn = Frame::tcp(ip("10.0.0.3"), 47000, vip, 80, TCP_SYN).bytes();
        assert_eq!(run(dp, &resyn).0, XDP_REDIRECT, "a repeated SYN follows its flow");
        sleep_past(0.4);
        // Past tcp_syn_timeout: the unconfirmed flow's port goes to the newcomer at once.
        let (a, out) = run(dp, &newcomer);
        assert_eq!(a, XDP_REDIRECT, "{:?}", stats(dp));
        assert_eq!(fields(&out).sport, unconfirmed);
        let s = stats(dp);
        assert_eq!((s["flow_expired_syn"], s["port_reclaimed"]), (1, 1), "{s:?}");
        // The confirmed flow, as old, is untouched.
        let (a, out) = run(dp, &Frame::tcp(ip("10.0.0.2"), 47000, vip, 80, TCP_ACK).bytes());
        assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, confirmed));
        // The expired client's late ACK is not resumed.
        let late = Frame::tcp(ip("10.0.0.3"), 47000, vip, 80, TCP_ACK).bytes();
        assert_eq!(run(dp, &late).0, XDP_DROP);
        assert_eq!(stats(dp)["drop_not_syn"], 1);
    });
}

/// Issue 12, item 1: an established flow with no packet either way for `tcp_idle_timeout`
/// ends and frees its port; one where only the backend talks stays.
#[test]
fn established_tcp_flow_expires_when_idle_both_ways() {
    let opts = short_timeouts(2000, 2001, 1.0);
    with_options(CONFIG, opts, |dp| {
        let vip = ip("10.200.0.1");
        let silent = handshake(dp, "10.0.0.2", 48000);
        let pushed = handshake(dp, "10.0.0.3", 48000);
        // Only the backend sends on the second flow (a download the client does not ACK
        // through here, or server pushes): replies alone keep it alive.
        let data = Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), pushed, TCP_ACK).bytes();
        for _ in 0..4 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert_eq!(run(dp, &data).0, XDP_REDIRECT);
        }
        sleep_past(0.0);
        let (a, out) = run(dp, &Frame::tcp(ip("10.0.0.3"), 48000, vip, 80, TCP_ACK).bytes());
        assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, pushed), "{:?}", stats(dp));
        // The silent one is over: a new client takes its port.
        let (a, out) = run(dp, &Frame::tcp(ip("10.0.0.4"), 48000, vip, 80, TCP_SYN).bytes());
        assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, silent), "{:?}", stats(dp));
        let s = stats(dp);
        assert_eq!((s["flow_expired_idle"], s["port_reclaimed"]), (1, 1), "{s:?}");
        let late = Frame::tcp(ip("10.0.0.2"), 48000, vip, 80, TCP_ACK).bytes();
        assert_eq!(run(dp, &late).0, XDP_DROP, "the idle flow is not resumed");
    });
}

/// Issue 12, item 2 (port search): with 64 SNAT ports all held by live flows, each port freed
/// by a close is found by the very next SYN, wherever it lies in the range (the cursor used to
/// step by 16 and skip most of them).
#[test]
fn port_search_tries_every_port_of_the_range() {
    let mut opts = short_timeouts(3000, 3063, 30.0);
    opts.settings.tcp_closed_ns = 0;
    with_options(CONFIG, opts, |dp| {
        let vip = ip("10.200.0.1");
        let mut holders = HashMap::new();
        for i in 0..64u16 {
            let c = format!("10.0.1.{}", i + 1);
            let (a, out) = run(dp, &Frame::tcp(ip(&c), 49000, vip, 80, TCP_SYN).bytes());
            assert_eq!(a, XDP_REDIRECT, "SYN {i} gets one of the 64 ports: {:?}", stats(dp));
            assert!(holders.insert(fields(&out).sport, c).is_none(), "a port given twice");
        }
        for (next, port) in [3000u16, 3017, 3030, 3031, 3063].into_iter().enumerate() {
            let refused = format!("10.0.2.{}", next + 100);
            let syn = Frame::tcp(ip(&refused), 49000, vip, 80, TCP_SYN).bytes();
            assert_eq!(run(dp, &syn).0, XDP_DROP, "all 64 held");
            let holder = &holders[&port];
            run(dp, &Frame::tcp(ip(holder), 49000, vip, 80, TCP_RST | TCP_ACK).bytes());
            let c = format!("10.0.2.{next}");
            let (a, out) = run(dp, &Frame::tcp(ip(&c), 49000, vip, 80, TCP_SYN).bytes());
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "{:?}", stats(dp));
        }
        let s = stats(dp);
        assert_eq!((s["drop_no_port"], s["port_reclaimed"]), (5, 5), "{s:?}");
    });
}

/// Issue 12, item 3: UDP flow A idles out, flow B reclaims A's SNAT port, then A sends again:
/// A must not take the port back (nor delete B's entry), and B's replies still reach B.
#[test]
fn a_nat_entry_belongs_to_one_flow() {
    let opts = short_timeouts(4000, 4000, 1.0);
    with_options(CONFIG, opts, |dp| {
        let vip = ip("fd00:200::1");
        let a = Frame::udp(ip("fd00::2"), 5000, vip, 53, b"from A").bytes();
        let b = Frame::udp(ip("fd00::3"), 5001, vip, 53, b"from B").bytes();
        let (act, out) = run(dp, &a);
        assert_eq!((act, fields(&out).sport), (XDP_REDIRECT, 4000));
        sleep_past(1.0);
        let (act, out) = run(dp, &b);
        assert_eq!((act, fields(&out).sport), (XDP_REDIRECT, 4000), "B reclaims A's port");
        // A again: its flow is over and the only port is B's, live.
        assert_eq!(run(dp, &a).0, XDP_DROP, "A may not take B's port");
        let s = stats(dp);
        assert_eq!((s["drop_no_port"], s["port_reclaimed"]), (1, 1), "{s:?}");
        let answer = Frame::udp(ip("fd01:1::2"), 53, ip("fd01:1::1"), 4000, b"for B").bytes();
        let (act, out) = run(dp, &answer);
        assert_eq!(act, XDP_REDIRECT, "{:?}", stats(dp));
        let r = fields(&out);
        assert_eq!((r.src, r.sport, r.dst, r.dport), (vip, 53, ip("fd00::3"), 5001));
        assert!(checksums_valid(&out));
        // B goes on; after B idles out too, A gets the port and then A's replies reach A.
        assert_eq!(run(dp, &b).0, XDP_REDIRECT);
        sleep_past(1.0);
        assert_eq!(run(dp, &a).0, XDP_REDIRECT);
        let (_, out) = run(dp, &answer);
        assert_eq!(fields(&out).dst, ip("fd00::2"));
    });
}

/// Issue 12, item 2: a SYN flood ten times `max_flows` from spoofed sources (they never
/// acknowledge a SYN-ACK) fills only the unconfirmed tables; every established flow keeps its
/// backend, SNAT port and reverse translation, and a real client still connects afterwards.
#[test]
fn a_syn_flood_ten_times_max_flows_leaves_established_flows_working() {
    let mut opts = lb_user::dataplane::LoadOptions::private();
    opts.max_flows = 1024;
    opts.max_unconfirmed_flows = 256;
    opts.settings.cpus = 1;
    with_options(CONFIG, opts, |dp| {
        let vip = ip("10.200.0.1");
        let held: Vec<(u16, u16)> =
            (0..30).map(|i| (50000 + i, handshake(dp, "10.0.0.2", 50000 + i))).collect();
        assert_eq!(stats(dp)["flow_confirmed"], 30);
        let mut forwarded = 0;
        for i in 0..10 * 1024u32 {
            let src = ip(&format!("10.{}.{}.{}", 50 + i / 65536, (i / 256) % 256, i % 256));
            let syn = Frame::tcp(src, 1024 + (i % 60000) as u16, vip, 80, TCP_SYN).bytes();
            if run(dp, &syn).0 == XDP_REDIRECT {
                forwarded += 1;
            }
        }
        assert_eq!(forwarded, 10 * 1024, "the flood's SYNs are forwarded too: {:?}", stats(dp));
        for &(sport, port) in &held {
            let ack = Frame::tcp(ip("10.0.0.2"), sport, vip, 80, TCP_ACK).bytes();
            let (a, out) = run(dp, &ack);
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "client side of {sport}");
            let data = Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), port, TCP_ACK).bytes();
            let (a, out) = run(dp, &data);
            let r = fields(&out);
            assert_eq!((a, r.dst, r.dport), (XDP_REDIRECT, ip("10.0.0.2"), sport), "reply {sport}");
        }
        handshake(dp, "10.0.0.3", 50000);
        let s = stats(dp);
        assert_eq!((s["drop_not_syn"], s["flow_confirmed"]), (0, 31), "{s:?}");
        assert_eq!(
            dp.flows_per_backend().unwrap().values().sum::<u64>(),
            31,
            "FLOWS holds the established flows only"
        );
    });
}

/// Issue 12, item 4: a client RST far from the sequence numbers the flow has used is forwarded
/// (the backend decides) but does not end the flow here; an in-window one does.
#[test]
fn blind_client_rst_does_not_end_the_flow() {
    const V6: &str = r#"
[xdp]
interfaces = ["c0", "b1", "b2"]
[[xdp.service]]
name = "web"
vip = "10.200.0.1:80"
backends = ["10.1.1.2:80"]
[[xdp.service]]
name = "web6"
vip = "[fd00:200::1]:80"
backends = ["[fd01:1::2]:80"]
"#;
    let mut opts = lb_user::dataplane::LoadOptions::private();
    opts.settings.tcp_closed_ns = 0;
    with_options(V6, opts, |dp| {
        for (client, vip) in [("10.0.0.2", "10.200.0.1"), ("fd00::2", "fd00:200::1")] {
            let (c, v) = (ip(client), ip(vip));
            let (a, out) = run(dp, &Frame::tcp(c, 52000, v, 80, TCP_SYN).bytes());
            assert_eq!(a, XDP_REDIRECT);
            let port = fields(&out).sport;
            // Data moves the client's sequence number on: 1001 + 100 bytes.
            let mut data = Frame::tcp(c, 52000, v, 80, TCP_ACK);
            data.seq = 1001;
            data.payload = vec![7; 100];
            assert_eq!(run(dp, &data.bytes()).0, XDP_REDIRECT);
            for blind in [1101u32.wrapping_add(1 << 20), 1101u32.wrapping_sub(70_000)] {
                let mut rst = Frame::tcp(c, 52000, v, 80, TCP_RST);
                rst.seq = blind;
                let (a, out) = run(dp, &rst.bytes());
                assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "{client}: forwarded");
            }
            // Still live (with no grace time after a close, an accepted RST would end it now).
            let mut ack = Frame::tcp(c, 52000, v, 80, TCP_ACK);
            ack.seq = 1101;
            let (a, out) = run(dp, &ack.bytes());
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "{client}: {:?}", stats(dp));
            let mut rst = Frame::tcp(c, 52000, v, 80, TCP_RST);
            rst.seq = 1101;
            assert_eq!(run(dp, &rst.bytes()).0, XDP_REDIRECT);
            assert_eq!(run(dp, &ack.bytes()).0, XDP_DROP, "{client}: the real RST ends it");
        }
        let s = stats(dp);
        assert_eq!((s["rst_out_of_window"], s["drop_not_syn"]), (4, 2), "{s:?}");
    });
}

/// Issue 12, item 4: a reply is translated only when it arrives on the interface through
/// which its backend is reached; the same bytes from elsewhere are a spoof and are dropped.
#[test]
fn replies_count_only_from_the_backends_interface() {
    with_fixture(CONFIG, |dp| {
        let (_, out) =
            run(dp, &Frame::tcp(ip("10.0.0.2"), 53000, ip("10.200.0.1"), 80, TCP_SYN).bytes());
        let port = fields(&out).sport;
        let synack =
            Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), port, TCP_SYN | TCP_ACK).bytes();
        let (_, out) =
            run(dp, &Frame::udp(ip("fd00::2"), 5353, ip("fd00:200::1"), 53, b"q").bytes());
        let port6 = fields(&out).sport;
        let answer = Frame::udp(ip("fd01:1::2"), 53, ip("fd01:1::1"), port6, b"a").bytes();
        for spoofed_on in ["c0", "b2"] {
            assert_eq!(run_on(dp, spoofed_on, &synack).0, XDP_DROP, "v4 reply on {spoofed_on}");
            assert_eq!(run_on(dp, spoofed_on, &answer).0, XDP_DROP, "v6 reply on {spoofed_on}");
        }
        assert_eq!(stats(dp)["drop_wrong_iface"], 4);
        let (a, out) = run_on(dp, "b1", &synack);
        assert_eq!((a, fields(&out).dst), (XDP_REDIRECT, ip("10.0.0.2")));
        let (a, out) = run_on(dp, "b1", &answer);
        assert_eq!((a, fields(&out).dst), (XDP_REDIRECT, ip("fd00::2")));
        assert_eq!(stats(dp)["reply"], 2);
    });
}

/// Pins left by a version with other map layouts (this change grew `Settings`, `FlowState`
/// and `NatState`) are refused with the fix named, not adopted into a verifier error.
#[test]
fn pins_of_another_layout_are_refused_with_the_fix() {
    lb_tests::privileged!();
    let ns = namespace().expect("fixture namespace");
    ns.run(|| {
        // A private bpffs in the root mount namespace, removed whatever happens below.
        let dir = std::path::PathBuf::from(format!("/run/lb-fixture-pins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount bpffs");
        let pins = dir.join("lb");
        let result = std::panic::catch_unwind(|| {
            let mut opts = lb_user::dataplane::LoadOptions::private();
            opts.pin_dir = Some(pins.clone());
            opts.max_flows = 1024;
            opts.max_unconfirmed_flows = 256;
            drop(Dataplane::load(&opts).expect("first load pins the maps"));
            assert!(Dataplane::load(&opts).is_ok(), "same layouts: adopted");
            // Stand in an old layout: a 4-byte-value map under the settings' name.
            std::fs::remove_file(pins.join("LB_SETTINGS")).unwrap();
            std::fs::rename(pins.join("LB_VIP_PORTS"), pins.join("LB_SETTINGS")).unwrap();
            let err = Dataplane::load(&opts).err().expect("refused").to_string();
            assert!(err.contains("LB_SETTINGS") && err.contains("lb detach"), "{err}");
        });
        let _ = lb_user::dataplane::detach(&pins);
        let _ = std::process::Command::new("umount").arg(&dir).status();
        let _ = std::fs::remove_dir(&dir);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    })
    .expect("fixture body (see the panic above)");
}
