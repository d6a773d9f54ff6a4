//! Issue 12 item 5, as packet fixtures through BPF_PROG_TEST_RUN: a packet of a balanced flow
//! that is larger than the egress MTU is answered with "fragmentation needed" / "packet too big"
//! to its sender, in both directions and both families; ICMP errors about a balanced flow are
//! translated (outer and quoted headers, every checksum) and reach the flow's other end.
use std::{
    io::{Read as _, Write as _},
    time::Duration,
};

use lb_tests::{
    conf,
    fixture::{self, *},
    icmp::{self, Icmp},
    packet::{Frame, TCP_ACK, fields},
    scenario::Scenario,
};
use lb_user::dataplane::{Dataplane, LoadOptions};

fn config() -> String {
    fixture::config(&[WEB, WEB6, DNS6])
}
/// The MAC every fixture frame is sent from (`packet::Frame::bytes`): answers go back to it.
const SENDER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

/// Runs `body` in a fresh fixture namespace whose interface `iface` has MTU `mtu`.
fn with_mtu(iface: &'static str, mtu: u32, body: impl FnOnce(&mut Dataplane) + Send + 'static) {
    let setup = move |ns: &lb_tests::netns::Netns| {
        ns.ip(&["link", "set", iface, "mtu", &mtu.to_string()]).map(drop)
    };
    in_namespace(config(), LoadOptions::private(), setup, body);
}

/// A TCP segment with `payload` bytes of payload (IP length 40 + payload for IPv4 and 60 +
/// payload for IPv6).
fn segment(src: &str, sport: u16, dst: &str, dport: u16, payload: usize) -> Vec<u8> {
    let mut f = Frame::tcp(ip(src), sport, ip(dst), dport, TCP_ACK);
    f.payload = vec![0x5a; payload];
    f.bytes()
}

/// Opens a TCP flow from `client:40000` to `vip:80`; returns the SNAT port.
fn open(dp: &Dataplane, client: &str, vip: &str, snat: &str, backend: &str) -> u16 {
    handshake(dp, client, 40000, vip, snat, backend)
}

/// Checks that `frame` (too big for `mtu`) came back as the right "too big" answer.
fn assert_too_big(dp: &Dataplane, frame: &[u8], mtu: u32, what: &str) {
    let (a, out) = run(dp, frame);
    assert_eq!(a, XDP_TX, "{what}: answered where it came from");
    let m: Icmp = icmp::parse(&out).unwrap_or_else(|e| panic!("{what}: {e}: {out:02x?}"));
    let f = fields(frame);
    assert_eq!((m.src, m.dst), (f.dst, f.src), "{what}: from the address it was sent to");
    assert_eq!((m.dmac, m.smac), (SENDER_MAC, frame[..6].try_into().unwrap()), "{what}: MACs");
    if f.src.is_ipv4() {
        assert_eq!((m.kind, m.code), (icmp::DEST_UNREACH, icmp::FRAG_NEEDED), "{what}");
        assert_eq!(m.rest & 0xffff, mtu, "{what}: next-hop MTU");
    } else {
        assert_eq!((m.kind, m.code, m.rest), (icmp::V6_PACKET_TOO_BIG, 0, mtu), "{what}");
    }
    let n = m.quoted.len();
    assert!(n >= if f.src.is_ipv4() { 28 } else { 48 }, "{what}: quotes header + 8 bytes");
    assert_eq!(&m.quoted[..], &frame[14..14 + n], "{what}: quotes the packet as sent");
}

#[test]
fn too_big_packets_are_answered_in_both_directions() {
    lb_tests::privileged!();
    // The backend side (b1) has the smaller MTU: the client's large segments are refused.
    with_mtu("b1", 1400, |dp| {
        let port = open(dp, "10.0.0.2", "10.200.0.1", "10.1.1.1", "10.1.1.2");
        let (a, out) = run(dp, &segment("10.0.0.2", 40000, "10.200.0.1", 80, 1360));
        assert_eq!((a, out.len()), (XDP_REDIRECT, 14 + 1400), "exactly the MTU fits");
        assert_too_big(dp, &segment("10.0.0.2", 40000, "10.200.0.1", 80, 1361), 1400, "v4 up");
        // Replies toward the client (c0, MTU 1500) are not limited by b1.
        let reply = segment("10.1.1.2", 80, "10.1.1.1", port, 1460);
        assert_eq!(run(dp, &reply).0, XDP_REDIRECT, "a full-size reply passes");
        open(dp, "fd00::2", "fd00:200::1", "fd01:1::1", "fd01:1::2");
        assert_too_big(dp, &segment("fd00::2", 40000, "fd00:200::1", 80, 1341), 1400, "v6 up");
        assert_eq!(counters(dp)["icmp_too_big_sent"], 2);
    });
    // The client side (c0) has the smaller MTU: the backend's large replies are refused.
    with_mtu("c0", 1280, |dp| {
        let port = open(dp, "10.0.0.2", "10.200.0.1", "10.1.1.1", "10.1.1.2");
        let reply = segment("10.1.1.2", 80, "10.1.1.1", port, 1300);
        assert_too_big(dp, &reply, 1280, "v4 down");
        let port = open(dp, "fd00::2", "fd00:200::1", "fd01:1::1", "fd01:1::2");
        let fits = segment("fd01:1::2", 80, "fd01:1::1", port, 1220);
        assert_eq!(run(dp, &fits).0, XDP_REDIRECT, "an IPv6 packet of exactly 1280 passes");
        assert_too_big(dp, &segment("fd01:1::2", 80, "fd01:1::1", port, 1221), 1280, "v6 down");
        // A UDP answer too big for the client's link.
        let q = Frame::udp(ip("fd00::2"), 5353, ip("fd00:200::1"), 53, b"query").bytes();
        let (_, out) = run(dp, &q);
        let big = Frame::udp(ip("fd01:1::2"), 53, ip("fd01:1::1"), fields(&out).sport, &[7; 1400]);
        assert_too_big(dp, &big.bytes(), 1280, "v6 UDP down");
        let s = counters(dp);
        assert_eq!(s["icmp_too_big_sent"], 3, "{s:?}");
        assert_eq!(s["tx"], 3, "answers are sent back out (XDP_TX): {s:?}");
    });
}

/// An IP packet (no Ethernet header) cut to `n` bytes, for quoting in an ICMP error.
fn quote(frame: &[u8], n: usize) -> Vec<u8> {
    frame[14..(14 + n).min(frame.len())].to_vec()
}

#[test]
fn icmp_errors_about_a_flow_reach_its_other_end() {
    lb_tests::privileged!();
    with_mtu("b1", 1500, |dp| {
        let port = open(dp, "10.0.0.2", "10.200.0.1", "10.1.1.1", "10.1.1.2");
        // A router on the backend's side says "fragmentation needed" about a segment the
        // balancer sent (SNAT → backend): the client hears it about its own segment (→ VIP).
        let sent = segment("10.1.1.1", port, "10.1.1.2", 80, 1460);
        let err = icmp::error(
            ip("10.1.1.2"),
            ip("10.1.1.1"),
            icmp::DEST_UNREACH,
            icmp::FRAG_NEEDED,
            1300,
            &quote(&sent, 28),
        );
        let (a, out) = run(dp, &err);
        assert_eq!(a, XDP_REDIRECT, "toward the client (c0)");
        let m = icmp::parse(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
        assert_eq!((m.dmac, m.smac), (CLIENT_MAC, C0_MAC));
        assert_eq!((m.src, m.dst, m.ttl), (ip("10.200.0.1"), ip("10.0.0.2"), 63));
        assert_eq!((m.kind, m.code, m.rest), (icmp::DEST_UNREACH, icmp::FRAG_NEEDED, 1300));
        assert_eq!(
            icmp::quoted_tuple(&m.quoted),
            (ip("10.0.0.2"), 40000, ip("10.200.0.1"), 80),
            "quotes the client's segment"
        );
        // The client's side says "port unreachable" about a reply (VIP → client): the backend
        // hears it about its own reply (→ SNAT address and port).
        let reply = segment("10.200.0.1", 80, "10.0.0.2", 40000, 0);
        let err = icmp::error(
            ip("10.0.0.2"),
            ip("10.200.0.1"),
            icmp::DEST_UNREACH,
            icmp::PORT_UNREACH,
            0,
            &quote(&reply, 48),
        );
        let (a, out) = run(dp, &err);
        assert_eq!(a, XDP_REDIRECT, "toward the backend (b1)");
        let m = icmp::parse(&out).unwrap_or_else(|e| panic!("{e}: {out:02x?}"));
        assert_eq!((m.dmac, m.smac), (BACKEND1_MAC, B1_MAC));
        assert_eq!((m.src, m.dst), (ip("10.1.1.1"), ip("10.1.1.2")));
        assert_eq!(icmp::quoted_tuple(&m.quoted), (ip("10.1.1.2"), 80, ip("10.1.1.1"), port));
        // The quoted TCP checksum (quoted in full here) was updated with the addresses/ports.
        assert!(tcp_checksum_ok(&m.quoted), "quoted TCP checksum");

        // The same error from the backend's side, arriving on the client's interface, is a
        // spoof; an echo request and an error about no flow are the kernel's.
        let (a, _) = run_on(
            dp,
            "c0",
            &icmp::error(
                ip("10.1.1.2"),
                ip("10.1.1.1"),
                icmp::DEST_UNREACH,
                icmp::FRAG_NEEDED,
                1300,
                &quote(&sent, 28),
            ),
        );
        assert_eq!(a, XDP_DROP, "wrong interface");
        let echo = icmp::error(ip("10.0.0.2"), ip("10.200.0.1"), 8, 0, 1, b"ping");
        assert_eq!(run(dp, &echo), (XDP_PASS, echo.clone()), "echo request untouched");
        let stranger = segment("10.1.1.1", 9999, "10.1.1.2", 80, 0);
        let err = icmp::error(ip("10.1.1.2"), ip("10.1.1.1"), 3, 3, 0, &quote(&stranger, 28));
        assert_eq!(run(dp, &err), (XDP_PASS, err.clone()), "no such flow: untouched");
        let s = counters(dp);
        assert_eq!(
            (s["icmp_error_to_client"], s["icmp_error_to_backend"], s["drop_wrong_iface"]),
            (1, 1, 1),
            "{s:?}"
        );
        assert_eq!(s["pass_icmp"], 2, "{s:?}");
    });
}

#[test]
fn icmpv6_errors_about_a_udp_flow_are_translated_with_the_quoted_checksum() {
    lb_tests::privileged!();
    with_mtu("b1", 1500, |dp| {
        let q = Frame::udp(ip("fd00::2"), 5353, ip("fd00:200::1"), 53, b"query").bytes();
        let (a, out) = run(dp, &q);
        assert_eq!(a, XDP_REDIRECT);
        // The backend answers "port unreachable", quoting the whole query as it received it.
        let err = icmp::error(
            ip("fd01:1::2"),
            ip("fd01:1::1"),
            icmp::V6_DEST_UNREACH,
            icmp::V6_PORT_UNREACH,
            0,
            &out[14..],
        );
        let (a, back) = run(dp, &err);
        assert_eq!(a, XDP_REDIRECT, "toward the client");
        let m = icmp::parse(&back).unwrap_or_else(|e| panic!("{e}: {back:02x?}"));
        assert_eq!((m.src, m.dst, m.ttl), (ip("fd00:200::1"), ip("fd00::2"), 63));
        assert_eq!((m.kind, m.code), (icmp::V6_DEST_UNREACH, icmp::V6_PORT_UNREACH));
        // The client's query as the backend received it: every byte as the client sent it
        // (UDP checksum included) but the hop limit, which the balancer decremented.
        let mut sent = q[14..].to_vec();
        sent[7] -= 1;
        assert_eq!(m.quoted, sent, "quotes the client's query");
        assert_eq!(counters(dp)["icmp_error_to_client"], 1);
    });
}

/// Whether a quoted IPv4 TCP segment, quoted whole, has a valid checksum.
fn tcp_checksum_ok(quoted: &[u8]) -> bool {
    let (s, _, d, _) = icmp::quoted_tuple(quoted);
    let total = u16::from_be_bytes([quoted[2], quoted[3]]) as usize;
    let tcp = &quoted[20..total.min(quoted.len())];
    lb_tests::packet::l4_checksum(s, d, 6, tcp) == 0
}

/// End to end: the balancer's link toward the client has a smaller MTU (1400) than the
/// backend's (1500), and the client (MTU 1500) advertises an MSS the backend's full-size
/// segments then exceed. The program answers those with "fragmentation needed" / "packet too
/// big", the backend's kernel lowers its path MTU, and a 4 MiB download completes, over IPv4
/// and IPv6. Without the answer the oversized frames are dropped at the egress and it stalls.
#[test]
fn a_download_across_a_smaller_mtu_toward_the_client_completes() {
    lb_tests::privileged!();
    const SIZE: usize = 4 << 20;
    let v4 = conf::xdp_service("bulk", "10.200.0.1:9000", &conf::list(["10.1.1.2:9000"]), "");
    let v6 =
        conf::xdp_service("bulk6", "[fd00:200::1]:9000", &conf::list(["[fd01:1::2]:9000"]), "");
    let s = Scenario::topology(1).xdp_raw(&v4).xdp_raw(&v6).start().expect("lb run");
    s.balancer().ip(&["link", "set", "eth0", "mtu", "1400"]).expect("smaller MTU");
    let listener = s
        .backend_ns(0)
        .run(|| std::net::TcpListener::bind("[::]:9000"))
        .expect("backend namespace")
        .expect("bind :9000");
    // A bulk server: each connection gets SIZE bytes of a known pattern, then a close.
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            let Ok(mut stream) = stream else { return };
            let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
            let _ = stream.write_all(&body);
        }
    });
    for vip in ["10.200.0.1:9000", "[fd00:200::1]:9000"] {
        let vip: std::net::SocketAddr = vip.parse().unwrap();
        let got = s
            .client()
            .run(move || -> std::io::Result<Vec<u8>> {
                let mut c = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
                c.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut got = Vec::new();
                c.read_to_end(&mut got)?;
                Ok(got)
            })
            .expect("client namespace");
        let got = got.unwrap_or_else(|e| panic!("download from {vip}: {e}"));
        assert_eq!(got.len(), SIZE, "download from {vip} complete");
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "bytes intact");
    }
    let stats = s.lb().json(&["stats"]).expect("lb stats");
    let reasons = stats["reasons"].as_array().expect("reasons");
    let sent = reasons.iter().find(|r| r[0] == "icmp_too_big_sent").and_then(|r| r[1].as_u64());
    assert!(sent.unwrap_or(0) >= 2, "the backend was told, once per family at least: {stats}");
}
