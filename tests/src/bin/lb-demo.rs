//! `cargo xtask demo`: a client, the balancer and three HTTP backends in network namespaces, with
//! `lb run` in the middle. Shows clients spread across backends by the XDP program, per-backend
//! counters, a backend removed and added live, then tears everything down.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    backends::HttpBackend,
    client::http_get,
    lb::{Lb, pin_path},
    netns::Netns,
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
    let certs = std::env::temp_dir().join(format!("{}-demo-certs", topo.lb.name));
    let cert = lb_tests::http::write_cert(&certs, "demo", &["demo.lb.test"]);
    let config = format!(
        "[admin]\nlisten = \"{admin}\"\n\n[xdp]\ninterfaces = [{}]\nmode = \"native\"\npin_path = \"{}\"\n\
         [[xdp.service]]\nname = \"web\"\nvip = \"{VIP4}:80\"\nprotocol = \"tcp\"\nbackends = [{}]\n\n\
         [[http.listener]]\nname = \"plain\"\nlisten = \"10.0.0.1:8080\"\n\
         [[http.listener]]\nname = \"secure\"\nlisten = \"10.0.0.1:8443\"\n\
         tls = [{{ cert = \"{}\", key = \"{}\" }}]\n\
         [[http.route]]\nlistener = \"plain\"\nupstream = \"app\"\n\
         [[http.route]]\nlistener = \"secure\"\nupstream = \"app\"\n\
         [upstream.app]\nbalance = \"round-robin\"\nbackends = [{}]\n",
        ifaces.join(", "),
        pin_path(),
        backends.join(", "),
        cert.cert.display(),
        cert.key.display(),
        backends.join(", ")
    );
    println!("== lb config:\n{config}");
    let mut lb = Lb::start(&topo.lb, &config, admin)?;
    println!("== lb status");
    print!("{}", lb.cli(&["status"])?);

    let sources = topo.add_client_addresses(300)?;
    println!("== 300 clients (10.0.4.1 ...) each open a connection to the VIP {VIP4}:80");
    let before = round(&topo.client, &sources, "answered by")?;
    let again = round(&topo.client, &sources, "again, new connections")?;
    let sticky = before.iter().zip(&again).filter(|(a, b)| a == b).count();
    println!("   {sticky} of 300 clients reached the same backend both times");
    println!("== lb stats: per-backend counters from the XDP program");
    print!("{}", lb.cli(&["stats"])?);

    let b3 = format!("{}:80", topo.backends[2].v4);
    println!("== lb backend remove web {b3}");
    print!("{}", lb.cli(&["backend", "remove", "web", &b3])?);
    let after = round(&topo.client, &sources, "answered by")?;
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let from_b3 = before.iter().filter(|b| *b == "backend-3").count();
    println!("   {moved} clients moved; {from_b3} had been on backend-3");
    println!("== lb backend add web {b3}");
    print!("{}", lb.cli(&["backend", "add", "web", &b3])?);
    let back = round(&topo.client, &sources, "answered by")?;
    let same = before.iter().zip(&back).filter(|(a, b)| a == b).count();
    println!("   {same} of 300 clients are back on their original backend");
    print!("{}", lb.cli(&["backend", "list", "web"])?);

    println!("== L7: the same daemon proxies HTTP on 10.0.0.1:8080 and HTTPS on 10.0.0.1:8443");
    let plain: SocketAddr = "10.0.0.1:8080".parse()?;
    let answers: Vec<String> = (0..6)
        .map(|_| http_get(&topo.client, None, plain, Duration::from_secs(2)))
        .collect::<Result<_, _>>()?;
    println!("   6 HTTP requests, round robin: {}", answers.join(", "));
    let secure: SocketAddr = "10.0.0.1:8443".parse()?;
    let roots = lb_tests::http::tls_client(&[&cert.der], &[b"http/1.1"]);
    let answers: Vec<String> = (0..6)
        .map(|_| {
            let roots = roots.clone();
            topo.client.run(move || https_get(secure, "demo.lb.test", roots))?
        })
        .collect::<Result<_, _>>()?;
    println!("   6 HTTPS requests (TLS terminated by lb for demo.lb.test): {}", answers.join(", "));
    print!("{}", lb.cli(&["backend", "list", "app"])?);

    lb.stop()?;
    drop(lb);
    let _ = std::fs::remove_dir_all(&certs);
    drop(servers);
    drop(topo);
    println!("== sandbox removed (namespaces deleted, XDP program detached)");
    Ok(())
}

/// One HTTPS GET over a fresh connection; returns the body.
fn https_get(
    addr: SocketAddr,
    host: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let conn = rustls::ClientConnection::new(config, name)?;
    let tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(tls, "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n")?;
    let mut response = String::new();
    let _ = tls.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "unexpected response: {head}");
    Ok(body.trim().to_string())
}
