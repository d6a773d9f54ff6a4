//! DSR scale-out end to end: clients behind a bird2 router that spreads a VIP over the lb
//! nodes announcing it by ECMP ([`lb_tests::fabric`]), nginx backends running `lb decap`.
//! One node announcing against two, side by side, rounds alternating.
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
    tools::{start_backend, wrk},
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

pub fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
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
