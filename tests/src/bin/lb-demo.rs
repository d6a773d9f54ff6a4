//! `cargo xtask demo`: a client, the balancer and three HTTP backends in network namespaces, with
//! `lb run` in the middle. Shows clients spread across backends by the XDP program, per-backend
//! counters, a backend removed and added live, then tears everything down.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    lb::{Lb, pin_path},
    netns::Netns,
    servers::{HttpBackend, http_get},
    topology::{Topology, VIP4},
};

fn main() {
    // The daemon's own log (host preparation, attach) is shown with RUST_LOG=info.
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: single-threaded at this point.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

/// Sends one request from each client and prints how many each backend answered.
fn round(client: &Netns, sources: &[IpAddr], label: &str) -> anyhow::Result<Vec<String>> {
    let vip = SocketAddr::new(VIP4.into(), 80);
    let mut who = Vec::new();
    let mut counts = BTreeMap::new();
    for src in sources {
        let b = http_get(client, Some(*src), vip, Duration::from_secs(2))?;
        *counts.entry(b.clone()).or_insert(0) += 1;
        who.push(b);
    }
    println!("   {label}: {counts:?}");
    Ok(who)
}

fn run() -> anyhow::Result<()> {
    println!("== building the sandbox: client, balancer, 3 backends (network namespaces)");
    let topo = Topology::new(3)?;
    let mut servers = Vec::new();
    for (i, b) in topo.backends.iter().enumerate() {
        let name = format!("backend-{}", i + 1);
        servers.push(HttpBackend::start(&b.ns, SocketAddr::new(b.v4.into(), 80), &name)?);
        println!("   {name} serves HTTP on {}:80 in namespace {}", b.v4, b.ns.name);
    }
    let admin: SocketAddr = "127.0.0.1:9901".parse()?;
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let backends: Vec<String> = topo.backends.iter().map(|b| format!("\"{}:80\"", b.v4)).collect();
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n[xdp]\ninterfaces = [{}]\nmode = \"native\"\npin_path = \"{}\"\n\
         [[xdp.service]]\nname = \"web\"\nvip = \"{VIP4}:80\"\nprotocol = \"tcp\"\nbackends = [{}]\n",
        ifaces.join(", "),
        pin_path(),
        backends.join(", ")
    );
    println!("== lb config:\n{config}");
    let mut lb = Lb::start(&topo.lb, &config, admin)?;
    println!("== lb status");
    print!("{}", lb.cli(&topo.lb, &["status"])?);

    let sources = topo.add_client_addresses(300)?;
    println!("== 300 clients (10.0.4.1 ...) each open a connection to the VIP {VIP4}:80");
    let before = round(&topo.client, &sources, "answered by")?;
    let again = round(&topo.client, &sources, "again, new connections")?;
    let sticky = before.iter().zip(&again).filter(|(a, b)| a == b).count();
    println!("   {sticky} of 300 clients reached the same backend both times");
    println!("== lb stats: per-backend counters from the XDP program");
    print!("{}", lb.cli(&topo.lb, &["stats"])?);

    let b3 = format!("{}:80", topo.backends[2].v4);
    println!("== lb backend remove web {b3}");
    print!("{}", lb.cli(&topo.lb, &["backend", "remove", "web", &b3])?);
    let after = round(&topo.client, &sources, "answered by")?;
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let from_b3 = before.iter().filter(|b| *b == "backend-3").count();
    println!("   {moved} clients moved; {from_b3} had been on backend-3");
    println!("== lb backend add web {b3}");
    print!("{}", lb.cli(&topo.lb, &["backend", "add", "web", &b3])?);
    let back = round(&topo.client, &sources, "answered by")?;
    let same = before.iter().zip(&back).filter(|(a, b)| a == b).count();
    println!("   {same} of 300 clients are back on their original backend");
    print!("{}", lb.cli(&topo.lb, &["backend", "list", "web"])?);

    lb.stop()?;
    drop(lb);
    drop(servers);
    drop(topo);
    println!("== sandbox removed (namespaces deleted, XDP program detached)");
    Ok(())
}
