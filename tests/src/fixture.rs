//! A namespace for packet fixtures: `BPF_PROG_TEST_RUN` runs the program in the caller's
//! network namespace, so `bpf_fib_lookup` sees this namespace's routes and neighbours. Fixed
//! MACs and permanent neighbour entries make every output byte predictable.
use std::net::IpAddr;

use anyhow::Context as _;
use aya::programs::{TestRun as _, TestRunOptions};
use lb_user::{
    config::Config,
    dataplane::{Dataplane, LoadOptions, host::Iface, snat},
};

use crate::netns::Netns;

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// The balancer's MAC on its client-side interface `c0` (10.0.0.1/16, fd00::1/64).
pub const C0_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0];
/// The balancer's MACs on `b1` (10.1.1.1/24, fd01:1::1/64) and `b2` (10.1.2.1/24).
pub const B1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
pub const B2_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
/// Neighbours: the client (10.0.0.2, fd00::2; also .3, .4 and fd00::3) and backends 10.1.1.2/fd01:1::2 and 10.1.2.2.
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xc, 2];
pub const BACKEND1_MAC: [u8; 6] = [2, 0, 0, 0, 0xb, 1];
pub const BACKEND2_MAC: [u8; 6] = [2, 0, 0, 0, 0xb, 2];

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Builds the fixture namespace.
pub fn namespace() -> anyhow::Result<Netns> {
    let ns = Netns::new("f")?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    for (dev, m, v4, v6) in [
        ("c0", C0_MAC, "10.0.0.1/16", "fd00::1/64"),
        ("b1", B1_MAC, "10.1.1.1/24", "fd01:1::1/64"),
        ("b2", B2_MAC, "10.1.2.1/24", "fd01:2::1/64"),
    ] {
        let peer = format!("{dev}p");
        ns.ip(&[
            "link",
            "add",
            "name",
            dev,
            "address",
            &mac(m),
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        ns.ip(&["addr", "add", v4, "dev", dev])?;
        ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"])?;
        ns.ip(&["link", "set", dev, "up"])?;
        ns.ip(&["link", "set", &peer, "up"])?;
    }
    for (addr, m, dev) in [
        ("10.0.0.2", CLIENT_MAC, "c0"),
        ("fd00::2", CLIENT_MAC, "c0"),
        // More clients behind the same router MAC, for fixtures with several flows.
        ("10.0.0.3", CLIENT_MAC, "c0"),
        ("10.0.0.4", CLIENT_MAC, "c0"),
        ("fd00::3", CLIENT_MAC, "c0"),
        ("10.1.1.2", BACKEND1_MAC, "b1"),
        ("fd01:1::2", BACKEND1_MAC, "b1"),
        ("10.1.2.2", BACKEND2_MAC, "b2"),
    ] {
        ns.ip(&["neigh", "replace", addr, "lladdr", &mac(m), "dev", dev, "nud", "permanent"])?;
    }
    Ok(ns)
}

/// Loads the program (private, unpinned) with `config`'s services and registers the fixture
/// interfaces. Call inside the fixture namespace.
pub fn dataplane(config: &str) -> anyhow::Result<Dataplane> {
    dataplane_with(config, LoadOptions::private())
}

/// Like [`dataplane`], with explicit load options (settings, table sizes). `[[xdp.snat]]`
/// pools are applied as `lb run` applies them (their addresses must be on their interface).
pub fn dataplane_with(config: &str, opts: LoadOptions) -> anyhow::Result<Dataplane> {
    let config = Config::parse(config)?;
    let mut dp = Dataplane::load(&opts)?;
    for name in ["c0", "b1", "b2"] {
        dp.register(&Iface::lookup(name).with_context(|| format!("no {name}"))?)?;
    }
    let xdp = config.xdp.context("no [xdp]")?;
    dp.apply_snat(&snat::resolve(&xdp.snat)?)?;
    dp.apply(&xdp.services)?;
    Ok(dp)
}

/// Runs one frame through the program: (action, output frame). The frame arrives where its
/// source lives: on `b1`/`b2` from the backend subnets, on `c0` from anywhere else.
pub fn run(dp: &Dataplane, frame: &[u8]) -> (u32, Vec<u8>) {
    run_on(dp, ingress_of(frame), frame)
}

/// The fixture interface a frame from its source address arrives on.
fn ingress_of(frame: &[u8]) -> &'static str {
    let Some(&[hi, lo]) = frame.get(12..14) else {
        return "c0";
    };
    let src: IpAddr = match u16::from_be_bytes([hi, lo]) {
        0x0800 if frame.len() >= 30 => <[u8; 4]>::try_from(&frame[26..30]).unwrap().into(),
        0x86dd if frame.len() >= 38 => <[u8; 16]>::try_from(&frame[22..38]).unwrap().into(),
        _ => return "c0",
    };
    let s = src.to_string();
    if s.starts_with("10.1.1.") || s.starts_with("fd01:1::") {
        "b1"
    } else if s.starts_with("10.1.2.") || s.starts_with("fd01:2::") {
        "b2"
    } else {
        "c0"
    }
}

/// Runs one frame through the program as if it arrived on `iface` (BPF_PROG_TEST_RUN with an
/// `xdp_md` naming the ingress interface).
pub fn run_on(dp: &Dataplane, iface: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let index = Iface::lookup(iface).expect("fixture interface").index;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; the kernel wants data_end = the frame's length and no metadata.
    let md: Vec<u8> =
        [0, frame.len() as u32, 0, index, 0, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    let r = dp
        .balancer()
        .expect("balancer program")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&md),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

/// The services fixture configs combine: VIPs 10.200.0.1 and fd00:200::1, the backends behind
/// `b1` (10.1.1.2, fd01:1::2).
pub const WEB: &str =
    "[[xdp.service]]\nname = \"web\"\nvip = \"10.200.0.1:80\"\nbackends = [\"10.1.1.2:80\"]\n";
pub const WEB6: &str = "[[xdp.service]]\nname = \"web6\"\nvip = \"[fd00:200::1]:80\"\nbackends = [\"[fd01:1::2]:80\"]\n";
pub const DNS: &str = "[[xdp.service]]\nname = \"dns\"\nvip = \"10.200.0.1:53\"\nprotocol = \"udp\"\nbackends = [\"10.1.1.2:53\"]\n";
pub const DNS6: &str = "[[xdp.service]]\nname = \"dns6\"\nvip = \"[fd00:200::1]:53\"\nprotocol = \"udp\"\nbackends = [\"[fd01:1::2]:53\"]\n";

/// A config serving the fixture's three interfaces with `services` ([`WEB`], [`DNS6`], ...).
pub fn config(services: &[&str]) -> String {
    format!("[xdp]\ninterfaces = [\"c0\", \"b1\", \"b2\"]\n{}", services.concat())
}

/// Runs `body` in a fresh fixture namespace, after `setup` (MTUs, routes) and with the program
/// loaded from `config` under `opts`; the namespace goes when it returns or panics.
pub fn in_namespace(
    config: String,
    opts: LoadOptions,
    setup: impl FnOnce(&Netns) -> anyhow::Result<()>,
    body: impl FnOnce(&mut Dataplane) + Send + 'static,
) {
    let ns = namespace().expect("fixture namespace");
    setup(&ns).expect("fixture set-up");
    ns.run(move || {
        let mut dp = dataplane_with(&config, opts).expect("load program");
        body(&mut dp);
    })
    .expect("fixture body (see the panic above)");
}

/// The program's reason counters by name.
pub fn counters(dp: &Dataplane) -> std::collections::HashMap<&'static str, u64> {
    dp.stats().expect("reason counters").into_iter().collect()
}

/// A TCP handshake through the program (the client's SYN, the backend's SYN-ACK, the client's
/// ACK) from `client:sport` to `vip:80`, whose backend `backend:80` sees the balancer as
/// `snat`. Returns the SNAT port.
pub fn handshake(
    dp: &Dataplane,
    client: &str,
    sport: u16,
    vip: &str,
    snat: &str,
    backend: &str,
) -> u16 {
    use crate::packet::{Frame, TCP_ACK, TCP_SYN, fields};
    let (a, out) = run(dp, &Frame::tcp(ip(client), sport, ip(vip), 80, TCP_SYN).bytes());
    assert_eq!(a, XDP_REDIRECT, "{client}:{sport} SYN");
    let port = fields(&out).sport;
    let synack = Frame::tcp(ip(backend), 80, ip(snat), port, TCP_SYN | TCP_ACK).bytes();
    assert_eq!(run(dp, &synack).0, XDP_REDIRECT, "SYN-ACK to {client}:{sport}");
    let ack = Frame::tcp(ip(client), sport, ip(vip), 80, TCP_ACK).bytes();
    assert_eq!(run(dp, &ack).0, XDP_REDIRECT, "{client}:{sport} ACK");
    port
}
