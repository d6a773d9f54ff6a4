//! Packet fixtures for `lb decap` (issue 15 item 2), run through BPF_PROG_TEST_RUN: IPIP,
//! IPv6-in-IPv6 and GUE (over IPv4 and IPv6) to a VIP come out as the inner packet, byte for
//! byte, behind the same MACs; with a VIP filter an inner packet to another address is dropped;
//! an inner packet that is not IP or is cut short is dropped; everything else passes untouched.
use aya::programs::{TestRun as _, TestRunOptions};
use lb_tests::{
    fixture::{XDP_DROP, XDP_PASS, ip},
    packet::{Frame, TCP_ACK, wrap},
};
use lb_user::dataplane::decap;

const VIP: &str = "10.200.0.1";
const VIP6: &str = "fd00:200::1";

/// An action and the frame the program left.
type Out = (u32, Vec<u8>);
/// The program's counters by name.
type Counters = Vec<(&'static str, u64)>;

/// Runs each frame through a decap program loaded with `vips`: what came out, the counters.
fn run(vips: &[&str], frames: &[Vec<u8>]) -> (Vec<Out>, Counters) {
    let vips: Vec<std::net::IpAddr> = vips.iter().map(|v| ip(v)).collect();
    let mut ebpf = decap::load(None, &vips).expect("load lb-decap");
    let prog = decap::program(&mut ebpf).unwrap();
    let out = frames
        .iter()
        .map(|f| {
            let mut out = vec![0u8; f.len() + 64];
            let r = prog
                .test_run(TestRunOptions {
                    data_in: Some(f),
                    data_out: Some(&mut out),
                    repeat: 1,
                    ..Default::default()
                })
                .expect("test_run");
            out.truncate(r.data_size_out as usize);
            (r.return_value, out)
        })
        .collect();
    (out, decap::counters_of(&ebpf).unwrap())
}

fn request(client: &str, vip: &str) -> Vec<u8> {
    let mut f = Frame::tcp(ip(client), 40000, ip(vip), 80, TCP_ACK);
    f.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    f.bytes()
}

fn count(counters: &[(&str, u64)], name: &str) -> u64 {
    counters.iter().find(|(n, _)| *n == name).map_or(0, |c| c.1)
}

#[test]
fn wrapped_packets_to_a_vip_come_out_as_the_clients_packet() {
    lb_tests::privileged!();
    let v4 = request("10.0.0.2", VIP);
    let v6 = request("fd00::2", VIP6);
    let (node, backend) = (ip("10.1.1.1"), ip("10.1.1.2"));
    let (node6, backend6) = (ip("fd01:1::1"), ip("fd01:1::2"));
    let frames = [
        wrap(&v4, node, backend, None),
        wrap(&v6, node6, backend6, None),
        wrap(&v4, node, backend, Some(50123)),
        wrap(&v6, node6, backend6, Some(50123)),
    ];
    let (out, counters) = run(&[VIP, VIP6], &frames);
    for (i, ((action, bytes), sent)) in out.iter().zip([&v4, &v6, &v4, &v6]).enumerate() {
        assert_eq!(*action, XDP_PASS, "frame {i}");
        assert_eq!(bytes, sent, "frame {i}: the client's frame, MACs, ethertype and all");
    }
    assert_eq!(count(&counters, "decapsulated"), 4, "{counters:?}");
}

#[test]
fn only_vips_are_unwrapped_and_bad_inner_packets_are_dropped() {
    lb_tests::privileged!();
    let (node, backend) = (ip("10.1.1.1"), ip("10.1.1.2"));
    let elsewhere = wrap(&request("10.0.0.2", "10.9.9.9"), node, backend, None);
    let mut not_ip = wrap(&request("10.0.0.2", VIP), node, backend, None);
    not_ip[34] = 0x55; // the inner header's version nibble
    let mut short = wrap(&request("10.0.0.2", VIP), node, backend, None);
    short.truncate(34 + 12); // an outer header and 12 bytes of an inner one
    short[16..18].copy_from_slice(&32u16.to_be_bytes());
    let plain = request("10.0.0.2", VIP);
    let other_udp = Frame::udp(ip("10.0.0.2"), 5000, backend, 53, b"dns").bytes();
    let frames = [elsewhere, not_ip, short, plain.clone(), other_udp.clone()];
    let (out, counters) = run(&[VIP], &frames);
    let actions: Vec<u32> = out.iter().map(|o| o.0).collect();
    assert_eq!(actions, [XDP_DROP, XDP_DROP, XDP_DROP, XDP_PASS, XDP_PASS]);
    assert_eq!(out[3].1, plain, "a plain packet passes untouched");
    assert_eq!(out[4].1, other_udp, "UDP to another port passes untouched");
    assert_eq!(count(&counters, "drop_not_vip"), 1, "{counters:?}");
    assert_eq!(count(&counters, "drop_bad_inner"), 2, "{counters:?}");
    assert_eq!(count(&counters, "pass"), 2, "{counters:?}");

    // Without a filter every wrapped packet is unwrapped, whatever its inner destination.
    let anywhere = request("10.0.0.2", "10.9.9.9");
    let (out, _) = run(&[], &[wrap(&anywhere, node, backend, None)]);
    assert_eq!(out[0], (XDP_PASS, anywhere));
}
