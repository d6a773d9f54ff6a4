//! Issue 15 item 1 as packet fixtures: a `forwarding = "dsr"` service sends the client's packet
//! untouched inside an outer header toward the backend (IPv4-in-IPv4, IPv6-in-IPv6, or GUE:
//! IP in UDP to port 6080), from the balancer's address on the egress interface; a segment of
//! a flow this node does not track is balanced by the ring, not dropped (another node may have
//! started it); a tracked flow keeps its backend when the backend set changes; a packet that
//! would not fit the route's MTU once wrapped gets "fragmentation needed" with room for the
//! outer header.
use lb_tests::{
    fixture::{self, *},
    icmp::{self, Icmp},
    packet::{Frame, TCP_ACK, TCP_SYN, outer},
};
use lb_user::dataplane::{Dataplane, LoadOptions};

const VIP: &str = "10.200.0.1";
const VIP6: &str = "fd00:200::1";

fn dsr(extra: &str) -> String {
    let web = format!(
        "[[xdp.service]]\nname = \"web\"\nvip = \"{VIP}:80\"\nforwarding = \"dsr\"\n{extra}backends = [\"10.1.1.2:80\"]\n"
    );
    let web6 = format!(
        "[[xdp.service]]\nname = \"web6\"\nvip = \"[{VIP6}]:80\"\nforwarding = \"dsr\"\n{extra}backends = [\"[fd01:1::2]:80\"]\n"
    );
    fixture::config(&[&web, &web6])
}

/// Runs `body` on a fresh fixture namespace with the program loaded from `config`.
fn with_dsr(config: String, body: impl FnOnce(&mut Dataplane) + Send + 'static) {
    in_namespace(config, LoadOptions::private(), |_| Ok(()), body);
}

fn syn(client: &str, sport: u16, vip: &str) -> Vec<u8> {
    Frame::tcp(ip(client), sport, ip(vip), 80, TCP_SYN).bytes()
}

/// Asserts that `frame` left toward backend `backend` (MAC `mac`) from `node`, wrapped by
/// `proto` (4, 41, or 17 for GUE) around exactly `sent` from its IP header on.
fn assert_wrapped(out: &[u8], sent: &[u8], node: &str, backend: &str, proto: u8, what: &str) {
    let o = outer(out).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!((o.src, o.dst, o.proto), (ip(node), ip(backend), proto), "{what}");
    assert!(o.header_ok, "{what}: outer header checksum and DF");
    assert_eq!(o.dmac, BACKEND1_MAC, "{what}: to the backend's MAC");
    assert_eq!(o.inner, sent[14..], "{what}: the client's packet, untouched");
    if proto == 17 {
        let (sport, dport, _) = o.udp.expect("UDP header");
        assert_eq!(dport, lb_common::GUE_PORT, "{what}: GUE port");
        assert!(sport >= 49152, "{what}: source port {sport} from the ephemeral range");
    }
}

#[test]
fn dsr_wraps_the_clients_packet_toward_its_backend() {
    lb_tests::privileged!();
    with_dsr(dsr(""), |dp| {
        let sent = syn("10.0.0.2", 40000, VIP);
        let (a, out) = run(dp, &sent);
        assert_eq!(a, XDP_REDIRECT, "to the backend's interface");
        assert_wrapped(&out, &sent, "10.1.1.1", "10.1.1.2", 4, "IPv4 SYN");
        // The handshake's ACK confirms the flow (no SYN-ACK passes a DSR balancer).
        let ack = Frame::tcp(ip("10.0.0.2"), 40000, ip(VIP), 80, TCP_ACK).bytes();
        let (a, out) = run(dp, &ack);
        assert_eq!(a, XDP_REDIRECT);
        assert_wrapped(&out, &ack, "10.1.1.1", "10.1.1.2", 4, "IPv4 ACK");
        let sent6 = syn("fd00::2", 40000, VIP6);
        let (a, out) = run(dp, &sent6);
        assert_eq!(a, XDP_REDIRECT);
        assert_wrapped(&out, &sent6, "fd01:1::1", "fd01:1::2", 41, "IPv6 SYN");
        let s = counters(dp);
        assert_eq!((s["dsr_encapsulated"], s["flow_confirmed"]), (3, 1), "{s:?}");
        assert_eq!(s["reply"], 0);
    });
}

#[test]
fn gue_wraps_in_udp_with_a_per_flow_source_port() {
    lb_tests::privileged!();
    with_dsr(dsr("encap = \"gue\"\n"), |dp| {
        let mut ports = std::collections::BTreeSet::new();
        for sport in 40000..40008 {
            let sent = syn("10.0.0.2", sport, VIP);
            let (a, out) = run(dp, &sent);
            assert_eq!(a, XDP_REDIRECT);
            assert_wrapped(&out, &sent, "10.1.1.1", "10.1.1.2", 17, "GUE v4");
            ports.insert(outer(&out).unwrap().udp.unwrap().0);
        }
        assert!(ports.len() > 1, "flows spread over source ports: {ports:?}");
        let sent6 = syn("fd00::2", 40000, VIP6);
        let (a, out) = run(dp, &sent6);
        assert_eq!(a, XDP_REDIRECT);
        assert_wrapped(&out, &sent6, "fd01:1::1", "fd01:1::2", 17, "GUE v6");
    });
}

#[test]
fn a_segment_of_an_untracked_flow_follows_the_ring_and_is_not_tracked() {
    lb_tests::privileged!();
    with_dsr(dsr(""), |dp| {
        // Mid-connection: another node started this flow before ECMP moved it here.
        let mut seg = Frame::tcp(ip("10.0.0.3"), 41000, ip(VIP), 80, TCP_ACK);
        seg.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let sent = seg.bytes();
        let (a, out) = run(dp, &sent);
        assert_eq!(a, XDP_REDIRECT, "balanced, not dropped as under full NAT");
        assert_wrapped(&out, &sent, "10.1.1.1", "10.1.1.2", 4, "untracked segment");
        let s = counters(dp);
        assert_eq!((s["dsr_untracked"], s["drop_not_syn"]), (1, 0), "{s:?}");
        assert_eq!(dp.flows_per_backend().unwrap().values().sum::<u64>(), 0, "nothing tracked");
    });
}

#[test]
fn a_tracked_flow_keeps_its_backend_when_backends_change() {
    lb_tests::privileged!();
    with_dsr(dsr(""), |dp| {
        let first = syn("10.0.0.2", 40000, VIP);
        assert_eq!(run(dp, &first).0, XDP_REDIRECT);
        let ack = Frame::tcp(ip("10.0.0.2"), 40000, ip(VIP), 80, TCP_ACK).bytes();
        assert_eq!(run(dp, &ack).0, XDP_REDIRECT);
        // A second backend behind b2 takes over most of the ring.
        dp.add_backend("web", "10.1.2.2:80".parse().unwrap(), 100).expect("add backend");
        for _ in 0..3 {
            let (a, out) = run(dp, &ack);
            assert_eq!(a, XDP_REDIRECT);
            assert_eq!(outer(&out).unwrap().dst, ip("10.1.1.2"), "still its first backend");
        }
    });
}

#[test]
fn a_packet_too_big_once_wrapped_is_answered_with_room_for_the_header() {
    lb_tests::privileged!();
    let setup =
        |ns: &lb_tests::netns::Netns| ns.ip(&["link", "set", "b1", "mtu", "1400"]).map(drop);
    in_namespace(dsr(""), LoadOptions::private(), setup, |dp| {
        assert_eq!(run(dp, &syn("10.0.0.2", 40000, VIP)).0, XDP_REDIRECT);
        // 1390 bytes of IP fit 1400 alone, not with 20 more in front.
        let mut big = Frame::tcp(ip("10.0.0.2"), 40000, ip(VIP), 80, TCP_ACK);
        big.payload = vec![0x5a; 1350];
        let sent = big.bytes();
        let (a, out) = run(dp, &sent);
        assert_eq!(a, XDP_TX, "answered where it came from");
        let m: Icmp = icmp::parse(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
        assert_eq!((m.kind, m.code), (icmp::DEST_UNREACH, icmp::FRAG_NEEDED));
        assert_eq!(m.rest & 0xffff, 1380, "the route's MTU minus the outer header");
        // One that fits wrapped goes through.
        big.payload = vec![0x5a; 1330];
        assert_eq!(run(dp, &big.bytes()).0, XDP_REDIRECT);
        assert_eq!(counters(dp)["icmp_too_big_sent"], 1);
    });
}

/// End to end in namespaces: the balancer wraps each packet to a DSR VIP toward a backend;
/// `lb decap` on the backend unwraps it; the backend (the VIP on `lo`) answers the client
/// itself, and the balancer's NAT reply path translates nothing.
#[test]
fn requests_to_a_dsr_vip_are_answered_by_backends_that_run_lb_decap() {
    lb_tests::privileged!();
    end_to_end("");
    end_to_end("encap = \"gue\"\n");
}

fn end_to_end(encap: &str) {
    use lb_tests::{
        conf,
        lb::decap::Decap,
        scenario::{Scenario, WEB},
        topology::{VIP4, VIP6},
    };
    let keys = format!("forwarding = \"dsr\"\nhash = \"five-tuple\"\n{encap}");
    let web6 = std::net::SocketAddr::new(VIP6.into(), 80);
    let v6 = conf::list(["[fd01:1::2]:80", "[fd01:2::2]:80"]);
    let mut s = Scenario::topology(2)
        // Dual-stack backends: the IPv6 VIP's packets arrive unwrapped as IPv6.
        .bind("[::]:80".parse().unwrap())
        .xdp_service(&keys)
        .xdp_raw(&conf::xdp_service("web6", web6, &v6, &keys))
        .start()
        .expect("lb run");
    for i in 0..2 {
        let ns = s.backend_ns(i).share();
        s.topo_mut().release_pass(&ns);
    }
    let (vip, vip6) = (VIP4.to_string(), VIP6.to_string());
    let mut decaps = Vec::new();
    for i in 0..2 {
        let ns = s.backend_ns(i);
        // The backend's side of DSR (the VIPs local, not answered by ARP) by --configure-host.
        decaps.push(Decap::attach(ns, "eth0", &[&vip, &vip6]).expect("lb decap attach"));
        assert_eq!(ns.sysctl_value("net.ipv4.conf.all.arp_ignore").unwrap(), "1");
        let lo = ns.ip(&["addr", "show", "dev", "lo"]).unwrap();
        assert!(lo.contains(&format!("{vip}/32")) && lo.contains(&vip6), "{lo}");
    }
    for target in [WEB, web6] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            seen.insert(s.get(target).unwrap_or_else(|e| panic!("{encap} GET {target}: {e:#}")));
        }
        assert_eq!(seen.len(), 2, "{encap} {target}: both backends answered: {seen:?}");
    }
    let counters = s.lb().reasons().expect("lb stats");
    assert!(counters["dsr_encapsulated"] >= 40, "{counters:?}");
    assert_eq!(counters["reply"], 0, "no reply was translated by the balancer: {counters:?}");
    let unwrapped: u64 = decaps.iter().map(|d| d.counter("decapsulated")).sum();
    assert!(unwrapped >= counters["dsr_encapsulated"], "every wrapped packet was unwrapped");
    assert!(decaps[0].status().unwrap().contains("decap attached to eth0"));
    // The last detach undoes what --configure-host did.
    let ns = s.backend_ns(0).share();
    drop(decaps);
    assert!(!ns.ip(&["addr", "show", "dev", "lo"]).unwrap().contains(&vip6), "VIPs removed");
}
