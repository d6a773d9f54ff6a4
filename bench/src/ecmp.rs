//! DSR on a routed LAN ([`lb_tests::fabric`]): a client behind a router, lb nodes and nginx
//! backends on the router's LAN, where a backend's replies reach the router without crossing a
//! node, as DSR is deployed. First the data path (one node, one backend): the router straight
//! to the backend (the floor), one node doing full NAT, one node doing DSR. Then scale-out: one
//! node announcing the VIP by BGP against two behind the router's ECMP, backends running `lb
//! decap`. Side by side, rounds alternating.
use std::time::Duration;

use lb_tests::{
    bird::Bird,
    conf,
    fabric::{Fabric, ROUTER_LAN, backend_addr, node_addr},
    lb::{Lb, decap::Decap, pin_path},
    topology::VIP4,
    wait_until,
};

use super::{
    median, progress,
    tools::{iperf, iperf_dir, start_backend, wrk},
};

const BACKENDS: usize = 3;

/// Keep-alive and Connection: close req/s with `announcing` of two nodes announcing the VIP.
fn measure(announcing: usize, secs: u32) -> anyhow::Result<(f64, f64)> {
    let f = Fabric::new(2, BACKENDS)?;
    let vip = VIP4.to_string();
    let mut decaps = Vec::new();
    for (j, ns) in f.backends.iter().enumerate() {
        start_backend(ns, &format!("backend-{}", j + 1))?;
        decaps.push(Decap::attach(ns, "eth0", &[&vip])?);
    }
    let web: Vec<String> = (0..BACKENDS).map(|j| format!("{}:80", backend_addr(j))).collect();
    let config = [
        conf::xdp(["eth0"], ""),
        conf::xdp_service(
            "web",
            format!("{vip}:80"),
            &conf::list(web),
            "forwarding = \"dsr\"\nhash = \"five-tuple\"\n",
        ),
        "[announce]\ntable = 100\n".to_string(),
    ]
    .concat();
    let nodes: Vec<Lb> = f
        .nodes
        .iter()
        .map(|ns| Lb::builder(ns, config.as_str()).pin_path(pin_path()).start())
        .collect::<anyhow::Result<_>>()?;
    let birds: Vec<Bird> = (0..announcing)
        .map(|i| Bird::node(&f.nodes[i], &node_addr(i), ROUTER_LAN))
        .collect::<anyhow::Result<_>>()?;
    let addrs: Vec<String> = (0..announcing).map(node_addr).collect();
    let peers: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let _router = Bird::router(&f.router, ROUTER_LAN, &peers, true)?;
    let ready = || f.paths_to(&vip) == announcing;
    anyhow::ensure!(wait_until(Duration::from_secs(30), ready), "route: {}", f.route_to(&vip));
    let url = format!("http://{vip}/");
    let _ = wrk(&f.client, &url, 10, 1, false);
    let ka = wrk(&f.client, &url, 50, secs, false)?.rps;
    let close = wrk(&f.client, &url, 50, secs, true)?.rps;
    drop((birds, nodes, decaps));
    Ok((ka, close))
}

/// How the router's packets for the VIP reach the one backend of [`path`].
#[derive(Clone, Copy)]
enum Path {
    /// A route to the backend, which has the VIP on `lo`: no balancer at all.
    Routing,
    /// Through one lb node, full NAT (replies come back through it).
    Nat,
    /// Through one lb node, DSR with IPIP (the backend runs `lb decap` and answers directly).
    Dsr,
}

const PATHS: [(Path, &str); 3] = [
    (Path::Routing, "router → backend (kernel routing, no balancer)"),
    (Path::Nat, "router → lb node, full NAT → backend (replies back through the node)"),
    (Path::Dsr, "router → lb node, DSR (IPIP) → backend running `lb decap` (replies direct)"),
];

/// Keep-alive req/s, Connection: close req/s, upload and download Gbit/s along `path`.
fn path(path: Path, secs: u32) -> anyhow::Result<[f64; 4]> {
    let f = Fabric::new(1, 1)?;
    let vip = VIP4.to_string();
    let backend = &f.backends[0];
    start_backend(backend, "backend-1")?;
    let mut held = (None, None);
    let next_hop = match path {
        Path::Routing => {
            backend.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
            backend_addr(0)
        }
        Path::Nat | Path::Dsr => {
            let dsr = matches!(path, Path::Dsr);
            if dsr {
                held.0 = Some(Decap::attach(backend, "eth0", &[&vip])?);
            }
            let keys = if dsr { "forwarding = \"dsr\"\n" } else { "" };
            let b = backend_addr(0);
            let config = [
                conf::xdp(["eth0"], ""),
                conf::xdp_service(
                    "web",
                    format!("{vip}:80"),
                    &conf::list([format!("{b}:80")]),
                    keys,
                ),
                conf::xdp_service(
                    "bulk",
                    format!("{vip}:5201"),
                    &conf::list([format!("{b}:5201")]),
                    keys,
                ),
            ]
            .concat();
            held.1 = Some(Lb::builder(&f.nodes[0], config).pin_path(pin_path()).start()?);
            node_addr(0)
        }
    };
    f.router.ip(&["route", "add", &format!("{vip}/32"), "via", &next_hop])?;
    let url = format!("http://{vip}/");
    let _ = wrk(&f.client, &url, 10, 1, false);
    let ka = wrk(&f.client, &url, 50, secs, false)?.rps;
    let close = wrk(&f.client, &url, 50, secs, true)?.rps;
    let up = iperf(&f.client, &vip, 5201, secs)?;
    let down = iperf_dir(&f.client, &vip, 5201, secs, true)?;
    // LB_BENCH_DEBUG: lb's counters (too-big answers, wrapped packets) and the client's
    // retransmissions, as the l4 section prints them.
    if let (Some(lb), Some(_)) = (&held.1, std::env::var_os("LB_BENCH_DEBUG")) {
        eprintln!("{}", lb.cli(&["stats"])?);
        eprintln!(
            "client: {}",
            f.client.exec(&["nstat", "-az", "TcpRetransSegs", "TcpExtTCPLostRetransmit"])?
        );
    }
    drop(held);
    Ok([ka, close, up, down])
}

/// The data-path table: [`PATHS`] side by side, with ratios to NAT and to routing.
fn paths(rounds: usize, secs: u32) -> anyhow::Result<String> {
    let mut samples: Vec<[Vec<f64>; 4]> = PATHS.iter().map(|_| Default::default()).collect();
    for round in 1..=rounds {
        for (k, (p, name)) in PATHS.iter().enumerate() {
            // LB_BENCH_ONLY=K: only path K (0 routing, 1 NAT, 2 DSR), e.g. under perf.
            if std::env::var("LB_BENCH_ONLY").is_ok_and(|o| o.parse() != Ok(k)) {
                samples[k].iter_mut().for_each(|v| v.push(f64::NAN));
                continue;
            }
            progress(&format!("fabric round {round}/{rounds}: {name}"));
            for (v, x) in samples[k].iter_mut().zip(path(*p, secs)?) {
                v.push(x);
            }
        }
    }
    let med: Vec<[f64; 4]> =
        samples.iter_mut().map(|s| [0, 1, 2, 3].map(|c| median(&mut s[c]))).collect();
    let mut md = String::from(
        "| path on the LAN (one node, one backend) | keep-alive req/s | new connections/s (Connection: close) | bulk upload Gbit/s (iperf3) | bulk download Gbit/s (iperf3 -R) |\n| --- | ---: | ---: | ---: | ---: |\n",
    );
    for (k, (_, name)) in PATHS.iter().enumerate() {
        let m = med[k];
        md += &format!("| {name} | {:.0} | {:.0} | {:.2} | {:.2} |\n", m[0], m[1], m[2], m[3]);
    }
    for (over, label) in [(1, "DSR ÷ full NAT"), (0, "DSR ÷ kernel routing")] {
        let r = [0, 1, 2, 3].map(|c| med[2][c] / med[over][c]);
        md += &format!("| {label} | {:.2} | {:.2} | {:.2} | {:.2} |\n", r[0], r[1], r[2], r[3]);
    }
    Ok(md)
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    print!("{}", paths(rounds, secs)?);
    println!(
        "\nwrk -t1 -c50 and iperf3 (one stream; upload: the client sends, download `-R`: the \
         backend sends) from the client behind the router; {rounds} round(s) of {secs} s, \
         medians. The router's route for the VIP is static here (BGP is not what this measures). \
         Under DSR the backend's answers go to the router directly; under full NAT they cross \
         the node's XDP program again.\n"
    );
    if std::env::var_os("LB_BENCH_ONLY").is_some() {
        return Ok(());
    }
    let mut rows = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    for round in 1..=rounds {
        for (k, announcing) in [1usize, 2].into_iter().enumerate() {
            progress(&format!("ECMP round {round}/{rounds}: {announcing} node(s) announcing"));
            let (ka, close) = measure(announcing, secs)?;
            rows[k].0.push(ka);
            rows[k].1.push(close);
        }
    }
    let [one, two] = rows.map(|(mut ka, mut close)| (median(&mut ka), median(&mut close)));
    println!(
        "| lb nodes behind the router (DSR, IPIP, 3 nginx backends with `lb decap`) | keep-alive req/s | new connections/s |\n\
         | --- | ---: | ---: |\n\
         | one node announces the VIP | {:.0} | {:.0} |\n\
         | two nodes announce it (ECMP, L4 hash) | {:.0} | {:.0} |\n\
         | two ÷ one | {:.2} | {:.2} |\n\n\
         wrk -t1 -c50 from one client address behind a bird2 router (`merge paths on`, \
         `fib_multipath_hash_policy = 1`); {rounds} round(s) of {secs} s, medians. Every node, \
         backend and the router share the same 2 cores here, so a second node adds no CPU: the \
         row shows that spreading costs nothing, not the scale-out a second machine brings.\n",
        one.0,
        one.1,
        two.0,
        two.1,
        two.0 / one.0,
        two.1 / one.1
    );
    Ok(())
}
