//! Bad input through the real XDP program: 100,000 random and mutated frames (truncated, bad
//! lengths and checksums, IPv4 options and fragments, VLAN tags, IPv6 extension headers, ICMP
//! errors quoting other flows, garbage). Each must get a documented action; nothing reaches a
//! backend unless it is a VIP flow's packet; the reason counters add up to the frames sent.
use std::{collections::HashSet, net::IpAddr};

use lb_tests::{
    conf,
    fixture::*,
    packet::{Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, checksums_valid, fields},
};

/// Two services on the fixture's interfaces: TCP `web` over two backends, UDP `dns6`.
fn config() -> String {
    let web =
        conf::xdp_service("web", "10.200.0.1:80", &conf::list(["10.1.1.2:80", "10.1.2.2:80"]), "");
    let dns6 =
        conf::xdp_service("dns6", "[fd00:200::1]:53", "\"[fd01:1::2]:53\"", "protocol = \"udp\"\n");
    conf::xdp(["c0", "b1", "b2"], "") + &web + &dns6
}

/// xorshift64*: deterministic, so a failure reproduces with the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn client(r: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        format!("fd00::{:x}", 2 + r.below(50)).parse().unwrap()
    } else {
        format!("10.0.{}.{}", r.below(3), 2 + r.below(200)).parse().unwrap()
    }
}

/// A well-formed frame of one of several kinds; `flows` remembers the client tuples opened.
fn base(r: &mut Rng) -> Vec<u8> {
    let sport = 1024 + r.below(60000) as u16;
    match r.below(9) {
        0 | 1 => Frame::tcp(client(r, false), sport, ip("10.200.0.1"), 80, TCP_SYN).bytes(),
        2 => Frame::tcp(client(r, false), sport, ip("10.200.0.1"), 80, TCP_ACK).bytes(),
        3 => Frame::udp(client(r, true), sport, ip("fd00:200::1"), 53, b"query").bytes(),
        // Replies from a backend to a SNAT port that may or may not be tracked.
        4 => Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), 1024 + r.below(31000) as u16, TCP_ACK)
            .bytes(),
        // Not for a VIP: wrong port, wrong protocol, another host.
        5 => Frame::tcp(client(r, false), sport, ip("10.200.0.1"), 81, TCP_SYN).bytes(),
        6 => Frame::udp(client(r, false), sport, ip("10.200.0.1"), 80, b"x").bytes(),
        7 => Frame::tcp(client(r, false), sport, ip("10.0.0.1"), 22, TCP_SYN).bytes(),
        _ => {
            let flags = [TCP_FIN | TCP_ACK, TCP_RST, TCP_SYN | TCP_ACK][r.below(3)];
            Frame::tcp(client(r, false), sport, ip("10.200.0.1"), 80, flags).bytes()
        }
    }
}

/// Damages a frame in one of the ways the issue lists (or leaves it whole).
fn mutate(r: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    let v4 = f[12] == 0x08 && f[13] == 0x00;
    match r.below(12) {
        // BPF_PROG_TEST_RUN (like the wire) needs at least an Ethernet header.
        0 => f.truncate(14 + r.below(f.len() - 14)),
        1 => {
            for _ in 0..1 + r.below(4) {
                let i = r.below(f.len());
                f[i] = r.next() as u8;
            }
        }
        // Bad IP length fields.
        2 if v4 => {
            let l = r.next() as u16;
            f[16..18].copy_from_slice(&l.to_be_bytes());
        }
        2 => {
            let l = r.next() as u16;
            f[18..20].copy_from_slice(&l.to_be_bytes());
        }
        // A bad L4 checksum.
        3 => {
            let i = f.len() - 1 - r.below(8.min(f.len() - 14));
            f[i] ^= 0x5a;
        }
        // IPv4 options (random IHL, header checksum left as is) or a fragment.
        4 if v4 => f[14] = 0x40 | (5 + r.below(11)) as u8,
        5 if v4 => {
            let frag = [0x2000u16, 0x0001, 0x20ff][r.below(3)];
            f[20..22].copy_from_slice(&frag.to_be_bytes());
        }
        // A VLAN tag in front of the IP header.
        6 => {
            let mut v = f[..12].to_vec();
            v.extend_from_slice(&[0x81, 0x00, 0x00, 0x64]);
            v.extend_from_slice(&f[12..]);
            f = v;
        }
        // IPv6 extension header as next header, or ICMP errors quoting a flow.
        7 if !v4 => f[20] = [0u8, 43, 44, 60][r.below(4)],
        8 => {
            // An ICMP error (v4: type 3; v6: ICMPv6 type 1) carrying another flow's headers.
            if v4 {
                f[23] = 1;
            } else {
                f[20] = 58;
            }
        }
        9 => {
            let n = 14 + r.below(80);
            f = (0..n).map(|_| r.next() as u8).collect();
        }
        _ => {}
    }
    f
}

#[test]
fn hundred_thousand_bad_frames_get_their_documented_action() {
    lb_tests::privileged!();
    let ns = namespace().expect("fixture namespace");
    ns.run(|| {
        let dp = dataplane(&config()).expect("load program");
        let vips: HashSet<(IpAddr, u16, u8)> =
            [(ip("10.200.0.1"), 80, 6), (ip("fd00:200::1"), 53, 17)].into_iter().collect();
        let backends: HashSet<IpAddr> =
            ["10.1.1.2", "10.1.2.2", "fd01:1::2"].iter().map(|a| ip(a)).collect();
        let snat: HashSet<IpAddr> =
            ["10.1.1.1", "10.1.2.1", "fd01:1::1"].iter().map(|a| ip(a)).collect();
        let mut r = Rng(0x5eed_1b0b_cafe_f00d);
        let total = 100_000;
        let mut actions = [0u64; 5];
        for n in 0..total {
            let frame = base(&mut r);
            let input = mutate(&mut r, frame);
            let (action, out) = run(&dp, &input);
            assert!(action <= XDP_REDIRECT, "frame {n}: action {action}");
            assert_ne!(action, XDP_ABORTED, "frame {n}: aborted on {input:02x?}");
            actions[action as usize] += 1;
            match action {
                // Passed frames are untouched, except a reply translated for the kernel to
                // forward while the client's neighbour resolves (source is then a VIP).
                XDP_PASS if out != input => {
                    let f = fields(&out);
                    assert!(vips.iter().any(|v| v.0 == f.src), "frame {n}: changed but passed");
                }
                XDP_TX | XDP_REDIRECT => {
                    let i = fields(&input);
                    let o = fields(&out);
                    let proto = if input[12] == 0x08 { input[23] } else { input[20] };
                    if backends.contains(&o.dst) {
                        // Forwarded to a backend: it was a VIP's packet, now from our address.
                        assert!(
                            vips.contains(&(i.dst, i.dport, proto)),
                            "frame {n}: {i:?} forwarded"
                        );
                        assert!(snat.contains(&o.src), "frame {n}: source {}", o.src);
                    } else {
                        // Or a backend's reply, turned back into VIP → client.
                        assert!(backends.contains(&i.src), "frame {n}: {i:?} sent to {o:?}");
                        assert!(vips.iter().any(|v| v.0 == o.src), "frame {n}: reply {o:?}");
                    }
                    assert_eq!(
                        checksums_valid(&out),
                        checksums_valid(&input),
                        "frame {n}: checksum validity changed"
                    );
                }
                _ => {}
            }
        }
        let s: std::collections::HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
        assert_eq!(s["rx"], total, "{s:?}");
        let outcomes: u64 = s
            .iter()
            .filter(|(k, _)| k.starts_with("pass_") || k.starts_with("drop_"))
            .map(|(_, v)| v)
            .sum::<u64>()
            + s["redirect"]
            + s["tx"];
        assert_eq!(outcomes, total, "each frame counted once: {s:?}");
        assert_eq!(s["redirect"] + s["tx"], actions[3] + actions[4]);
        assert_eq!(s["drop_redirect"], 0);
        eprintln!("actions (aborted, drop, pass, tx, redirect): {actions:?}");
    })
    .expect("fuzz body (see the panic above)");
}
