//! Issue 15 end to end: two `lb` nodes announce a DSR VIP by BGP (the shipped bird2 config) to
//! a bird2 router that spreads the VIP's traffic over them by ECMP; three backends unwrap with
//! `lb decap` and answer clients directly. Connections spread over nodes and backends, each
//! backend sees the client's own address, no reply crosses a node, a node that stops takes no
//! connection with it, a service with no backend up is withdrawn and comes back, and a large
//! upload crosses a path whose MTU is smaller than its wrapped packets.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    backends::{HttpBackend, echo_backend_on},
    bird::Bird,
    client::{connect_in, http_get},
    conf,
    fabric::{CLIENT, Fabric, ROUTER_LAN, backend_addr, node_addr},
    lb::{Lb, decap::Decap, pin_path},
    load::KeepAlive,
    topology::VIP4,
    wait_until,
};

const WEB: SocketAddr = SocketAddr::new(IpAddr::V4(VIP4), 80);
/// The upload service: an echo on the backends' port 9000, on a VIP of its own (a VIP is
/// announced while any of its services has a backend up).
const BULK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)), 9000);

/// Every node's config: the same services over the same backends, so the same tables.
fn node_config(backends: usize) -> String {
    let dsr = "forwarding = \"dsr\"\nhash = \"five-tuple\"\n";
    let web: Vec<String> = (0..backends).map(|j| format!("{}:80", backend_addr(j))).collect();
    let bulk: Vec<String> = (0..backends).map(|j| format!("{}:9000", backend_addr(j))).collect();
    [
        conf::xdp(["eth0"], ""),
        conf::xdp_service("web", WEB, &conf::list(web), dsr),
        conf::xdp_service("bulk", BULK, &conf::list(bulk), dsr),
        "[announce]\ntable = 100\n".to_string(),
        conf::fast_health("web", "http"),
    ]
    .concat()
}

fn counter(lb: &Lb, name: &str) -> u64 {
    lb.reasons().map(|c| c.get(name).copied().unwrap_or(0)).unwrap_or(0)
}

#[test]
fn nodes_behind_ecmp_share_a_dsr_vip_and_survive_one_stopping() {
    lb_tests::privileged!();
    let f = Fabric::new(2, 3).expect("fabric");
    let vip = VIP4.to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _rt = rt.enter();
    let mut webs = Vec::new();
    let mut decaps = Vec::new();
    for (j, ns) in f.backends.iter().enumerate() {
        let name = format!("backend-{}", j + 1);
        webs.push(HttpBackend::start(ns, "0.0.0.0:80".parse().unwrap(), &name).unwrap());
        let bulk = ns.run(|| std::net::TcpListener::bind("0.0.0.0:9000")).unwrap().unwrap();
        echo_backend_on(bulk, &name);
        let bulk_vip = BULK.ip().to_string();
        decaps.push(Decap::attach(ns, "eth0", &[&vip, &bulk_vip]).expect("lb decap attach"));
    }
    let config = node_config(3);
    let mut nodes: Vec<Lb> = f
        .nodes
        .iter()
        .map(|ns| Lb::builder(ns, config.as_str()).pin_path(pin_path()).start().expect("lb run"))
        .collect();
    let mut birds: Vec<Option<Bird>> = f
        .nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| Some(Bird::node(ns, &node_addr(i), ROUTER_LAN).expect("bird node")))
        .collect();
    let addrs: Vec<String> = (0..2).map(node_addr).collect();
    let peers: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let router = Bird::router(&f.router, ROUTER_LAN, &peers, true).expect("bird router");
    assert!(
        wait_until(Duration::from_secs(30), || f.paths_to(&VIP4.to_string()) == 2),
        "the router has an ECMP route over both nodes: {:?}; {}",
        f.route_to(&vip),
        router.birdc(&["show", "protocols"])
    );

    // Fresh connections spread over nodes and backends; backends see the client itself.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let body = http_get(&f.client, None, WEB, Duration::from_secs(3)).expect("GET the VIP");
        answered.insert(body);
    }
    assert_eq!(answered.len(), 3, "every backend answered: {answered:?}");
    for node in &nodes {
        assert!(counter(node, "dsr_encapsulated") > 0, "both nodes carried connections");
        assert_eq!(counter(node, "reply"), 0, "no reply crossed a node");
    }
    // Besides the nodes' health checks, a backend sees only the client's own address.
    let checks: Vec<IpAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    for w in &webs {
        let mut seen = w.peers.lock().unwrap().clone();
        seen.retain(|p| !checks.contains(p));
        assert!(!seen.is_empty() && seen.iter().all(|p| *p == IpAddr::V4(CLIENT)), "{seen:?}");
    }

    // A large upload: its wrapped segments exceed the node's route MTU toward the backends,
    // the node answers "fragmentation needed" and the client's path MTU adapts.
    for (i, ns) in f.nodes.iter().enumerate() {
        let src = node_addr(i);
        ns.ip(&["route", "change", "10.20.0.0/24", "dev", "eth0", "src", &src, "mtu", "1400"])
            .expect("lower the node's route MTU");
    }
    upload(&f, 1 << 20);
    let too_big: u64 = nodes.iter().map(|n| counter(n, "icmp_too_big_sent")).sum();
    assert!(too_big > 0, "the path MTU was learned from the nodes");

    // Node 1 stops: its BGP session drops, its link goes down; its connections continue
    // through node 2, which balances them by the same table to the same backends.
    let load = KeepAlive::start(&f.client, WEB, 16);
    assert!(wait_until(Duration::from_secs(10), || load.ok() >= 300), "load runs");
    let moved_before = counter(&nodes[1], "dsr_untracked");
    birds[0] = None;
    assert!(
        wait_until(Duration::from_secs(15), || f.paths_to(&VIP4.to_string()) == 1),
        "node 1 withdrawn"
    );
    f.nodes[0].ip(&["link", "set", "eth0", "down"]).unwrap();
    let at = load.ok();
    assert!(wait_until(Duration::from_secs(10), || load.ok() >= at + 300), "load goes on");
    let report = load.stop();
    assert_eq!(report.failed, 0, "no request failed: {:?}", &report.failures[..]);
    assert!(
        counter(&nodes[1], "dsr_untracked") > moved_before,
        "node 2 took over connections node 1 had carried"
    );

    // No backend up: withdrawn within the health check's fall time; announced again.
    webs.clear();
    assert!(
        wait_until(Duration::from_secs(15), || f.paths_to(&VIP4.to_string()) == 0),
        "withdrawn"
    );
    webs.push(HttpBackend::start(&f.backends[0], "0.0.0.0:80".parse().unwrap(), "b").unwrap());
    assert!(
        wait_until(Duration::from_secs(15), || f.paths_to(&VIP4.to_string()) == 1),
        "announced again"
    );
    nodes.clear();
}

/// Sends `size` bytes to [`BULK`] on one connection and checks they all come back.
fn upload(f: &Fabric, size: usize) {
    let mut s = connect_in(&f.client, None, BULK, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        for _ in 0..size / chunk.len() {
            writer.write_all(&chunk)?;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("the echo comes back");
    sender.join().unwrap().expect("upload sent");
    let name_line = got.iter().position(|b| *b == b'\n').map_or(0, |n| n + 1);
    let echoed = got.len() - name_line - b"eof\n".len().min(got.len() - name_line);
    assert_eq!(echoed, size, "every byte echoed");
}
