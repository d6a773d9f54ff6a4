//! Packet fixtures through BPF_PROG_TEST_RUN: the real program in the real kernel, no interface.
use std::net::IpAddr;

use aya::programs::{TestRun as _, TestRunOptions};
use lb_tests::{
    packet::{Frame, TCP_SYN, checksums_valid},
    privileged_or_skip,
};
use lb_user::{config::Config, dataplane::Dataplane};

const XDP_PASS: u32 = 2;

fn dataplane(config: &str) -> Dataplane {
    let config = Config::parse(config).expect("valid config");
    let mut dp = Dataplane::load().expect("load XDP program");
    dp.set_services(&config.xdp.expect("xdp section").services).expect("fill maps");
    dp
}

fn run(dp: &Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp
        .balancer()
        .expect("balancer program")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("test_run");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

const CONFIG: &str = r#"
[xdp]
interfaces = ["unused"]
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

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn counts_packets_per_vip_and_passes_everything_else() {
    if !privileged_or_skip("counts_packets_per_vip_and_passes_everything_else") {
        return;
    }
    let dp = dataplane(CONFIG);
    let web = Frame::tcp(ip("10.0.0.2"), 40000, ip("10.200.0.1"), 80, TCP_SYN).bytes();
    let dns = Frame::udp(ip("fd00::2"), 5353, ip("fd00:200::1"), 53, b"query").bytes();
    let other_port = Frame::tcp(ip("10.0.0.2"), 40000, ip("10.200.0.1"), 81, TCP_SYN).bytes();
    let other_proto = Frame::udp(ip("10.0.0.2"), 40000, ip("10.200.0.1"), 80, b"x").bytes();
    assert!(checksums_valid(&web) && checksums_valid(&dns));

    for _ in 0..3 {
        assert_eq!(run(&dp, &web).0, XDP_PASS);
    }
    assert_eq!(run(&dp, &dns).0, XDP_PASS);
    assert_eq!(run(&dp, &other_port).0, XDP_PASS);
    assert_eq!(run(&dp, &other_proto).0, XDP_PASS);
    // ARP passes untouched.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let (action, out) = run(&dp, &arp);
    assert_eq!((action, out), (XDP_PASS, arp.clone()));
    // Truncated: Ethernet + half an IPv4 header.
    let (action, _) = run(&dp, &web[..24]);
    assert_eq!(action, XDP_PASS);

    let c = dp.service_counters(2).unwrap();
    assert_eq!(c[0].packets, 3);
    assert_eq!(c[0].bytes, 3 * web.len() as u64);
    assert_eq!(c[1].packets, 1);
    assert_eq!(c[1].bytes, dns.len() as u64);
    let stats: std::collections::HashMap<_, _> = dp.stats().unwrap().into_iter().collect();
    assert_eq!(stats["rx"], 8);
    assert_eq!(stats["vip_hit"], 4);
    assert_eq!(stats["pass_not_vip"], 2);
    assert_eq!(stats["pass_not_ip"], 1);
    assert_eq!(stats["pass_truncated"], 1);
}
