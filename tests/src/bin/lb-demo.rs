//! `cargo xtask demo`: a client, the balancer and three HTTP backends in network namespaces, with
//! `lb run` in the middle; shows traffic reaching the balancer, then tears everything down.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    lb::Lb,
    servers::{HttpBackend, connect_from},
    topology::{Topology, VIP4},
};

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    println!("== building the sandbox: client, balancer, 3 backends (network namespaces)");
    let topo = Topology::new(3)?;
    let mut servers = Vec::new();
    for (i, b) in topo.backends.iter().enumerate() {
        servers.push(HttpBackend::start(
            &b.ns,
            SocketAddr::new(b.v4.into(), 80),
            &format!("backend-{}", i + 1),
        )?);
        println!("   backend-{} serves HTTP on {}:80 in namespace {}", i + 1, b.v4, b.ns.name);
    }
    let admin: SocketAddr = "127.0.0.1:9901".parse()?;
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let backends: Vec<String> = topo.backends.iter().map(|b| format!("\"{}:80\"", b.v4)).collect();
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n[xdp]\ninterfaces = [{}]\nmode = \"native\"\n\
         [[xdp.service]]\nname = \"web\"\nvip = \"{VIP4}:80\"\nprotocol = \"tcp\"\nbackends = [{}]\n",
        ifaces.join(", "),
        backends.join(", ")
    );
    println!("== lb config:\n{config}");
    let mut lb = Lb::start(&topo.lb, &config, admin)?;
    println!("== lb status");
    print!("{}", lb.cli(&topo.lb, &["status"])?);

    let sources = topo.add_client_addresses(20)?;
    println!("== 20 clients (10.0.4.1-20) open connections to the VIP {VIP4}:80");
    let mut answered = 0;
    for src in &sources {
        let src: IpAddr = *src;
        let target = SocketAddr::new(VIP4.into(), 80);
        let r =
            topo.client.run(move || connect_from(Some(src), target, Duration::from_millis(150)))?;
        if r.is_ok() {
            answered += 1;
        }
    }
    println!("   {answered} of 20 connections completed");
    println!("== lb stats: the XDP program counted the packets per VIP");
    print!("{}", lb.cli(&topo.lb, &["stats"])?);
    lb.stop()?;
    drop(servers);
    drop(topo);
    println!("== sandbox removed");
    Ok(())
}
