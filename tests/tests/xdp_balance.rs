//! The XDP balancer end to end: real clients, `lb run`, real HTTP backends, each in its own
//! network namespace. Every assertion is about which backend answered a real request.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    lb::{Lb, pin_path},
    privileged_or_skip,
    servers::{HttpBackend, connect_from, http_get, request_on},
    topology::{Topology, VIP4, VIP6},
};

const TIMEOUT: Duration = Duration::from_secs(3);

struct Setup {
    topo: Topology,
    lb: Lb,
    _servers: Vec<HttpBackend>,
}

/// Three backends with the given weights behind VIP4:80 (and VIP6:80 on the same backends).
fn setup(weights: [u32; 3]) -> Setup {
    let topo = Topology::new(3).expect("topology");
    let servers = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            HttpBackend::start(&b.ns, "[::]:80".parse().unwrap(), &format!("backend-{}", i + 1))
                .expect("backend")
        })
        .collect();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let v4: Vec<String> = topo
        .backends
        .iter()
        .zip(weights)
        .map(|(b, w)| format!("{{ addr = \"{}:80\", weight = {w} }}", b.v4))
        .collect();
    let v6: Vec<String> = topo.backends.iter().map(|b| format!("\"[{}]:80\"", b.v6)).collect();
    let config = format!(
        r#"
[admin]
listen = "{admin}"
[xdp]
interfaces = [{}]
pin_path = "{}"
[[xdp.service]]
name = "web"
vip = "{VIP4}:80"
backends = [{}]
[[xdp.service]]
name = "web6"
vip = "[{VIP6}]:80"
backends = [{}]
"#,
        ifaces.join(", "),
        pin_path(),
        v4.join(", "),
        v6.join(", ")
    );
    let lb = Lb::start(&topo.lb, &config, admin).expect("lb run");
    Setup { topo, lb, _servers: servers }
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP4.into(), 80)
}

/// Which backend answers a fresh connection from `src`.
fn who(s: &Setup, src: IpAddr) -> String {
    http_get(&s.topo.client, Some(src), vip(), TIMEOUT)
        .unwrap_or_else(|e| panic!("request from {src}: {e:#}"))
}

#[test]
fn spreads_clients_by_weight_and_keeps_each_on_one_backend() {
    if !privileged_or_skip("spreads_clients_by_weight_and_keeps_each_on_one_backend") {
        return;
    }
    let s = setup([1, 1, 2]);
    let clients = s.topo.add_client_addresses(600).unwrap();
    let first: Vec<String> = clients.iter().map(|c| who(&s, *c)).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for b in &first {
        *counts.entry(b.as_str()).or_default() += 1;
    }
    for (name, weight) in [("backend-1", 1.0), ("backend-2", 1.0), ("backend-3", 2.0)] {
        let expected = 600.0 * weight / 4.0;
        let got = counts.get(name).copied().unwrap_or(0) as f64;
        assert!(
            (got - expected).abs() <= 0.25 * expected,
            "{name}: {got} clients, expected {expected} ± 25% ({counts:?})"
        );
    }
    // Every client address reaches the same backend again, on new connections.
    for (c, b) in clients.iter().zip(&first) {
        assert_eq!(&who(&s, *c), b, "client {c} moved");
    }
    // The daemon's per-backend flow counters saw every connection.
    let stats = s.lb.json(&s.topo.lb, &["stats", "web"]).unwrap();
    let flows: u64 = stats["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["flows"].as_u64().unwrap())
        .sum();
    assert_eq!(flows, 1200, "{stats}");
}

#[test]
fn backend_changes_move_only_the_affected_clients() {
    if !privileged_or_skip("backend_changes_move_only_the_affected_clients") {
        return;
    }
    let s = setup([1, 1, 1]);
    let clients = s.topo.add_client_addresses(150).unwrap();
    let before: Vec<String> = clients.iter().map(|c| who(&s, *c)).collect();
    // One open keep-alive connection per backend, from a client that maps to it.
    let mut open = HashMap::new();
    for b in ["backend-1", "backend-2", "backend-3"] {
        let i = before.iter().position(|x| x == b).expect("every backend has clients");
        let src = clients[i];
        let stream =
            s.topo.client.run(move || connect_from(Some(src), vip(), TIMEOUT)).unwrap().unwrap();
        open.insert(b, stream);
    }
    let ask = |b: &str, open: &HashMap<&str, std::net::TcpStream>| -> anyhow::Result<String> {
        let mut stream = open[b].try_clone()?;
        lb_tests::ops::keepalive_get(&mut stream)
    };
    for b in ["backend-1", "backend-2", "backend-3"] {
        assert_eq!(ask(b, &open).unwrap(), b);
    }

    // Remove backend-3: its clients move, nobody else does, open connections elsewhere live.
    let b3 = format!("{}:80", s.topo.backends[2].v4);
    s.lb.cli(&s.topo.lb, &["backend", "remove", "web", &b3]).unwrap();
    for b in ["backend-1", "backend-2"] {
        assert_eq!(ask(b, &open).unwrap(), b, "open connection to {b} survives the removal");
    }
    for (c, was) in clients.iter().zip(&before) {
        let now = who(&s, *c);
        if was == "backend-3" {
            assert_ne!(now, "backend-3", "client {c} still reaches the removed backend");
        } else {
            assert_eq!(&now, was, "client {c} moved though its backend stayed");
        }
    }

    // Drain backend-2: its open connection finishes normally; its clients' new ones go elsewhere.
    let b2 = format!("{}:80", s.topo.backends[1].v4);
    s.lb.cli(&s.topo.lb, &["backend", "drain", "web", &b2]).unwrap();
    assert_eq!(ask("backend-2", &open).unwrap(), "backend-2", "drained: open connection continues");
    let list = s.lb.cli(&s.topo.lb, &["backend", "list", "web"]).unwrap();
    assert!(list.contains("draining"), "{list}");
    for (c, was) in clients.iter().zip(&before) {
        if was == "backend-2" {
            assert_eq!(who(&s, *c), "backend-1", "new flow of drained backend's client {c}");
        }
    }

    // Add backend-3 back: its share of clients reaches it on their very next connection.
    let started = Instant::now();
    s.lb.cli(&s.topo.lb, &["backend", "add", "web", &b3]).unwrap();
    let returned = started.elapsed();
    let mut reached = 0;
    for c in clients.iter().take(60) {
        if who(&s, *c) == "backend-3" {
            reached += 1;
        }
    }
    assert!(reached > 0, "no new client reached the added backend");
    eprintln!("backend add returned after {returned:?}; {reached} of 60 clients then reached it");
}

#[test]
fn restarting_lb_run_under_load_fails_no_request() {
    if !privileged_or_skip("restarting_lb_run_under_load_fails_no_request") {
        return;
    }
    let mut s = setup([1, 1, 1]);
    let clients = s.topo.add_client_addresses(50).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client_ns = lb_tests::netns::Netns { name: s.topo.client.name.clone() };
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let src = clients[i % clients.len()];
                i += 1;
                match http_get(&client_ns, Some(src), vip(), TIMEOUT) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("request from {src} failed: {e:#}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            // The namespace belongs to the topology; do not delete it from here.
            std::mem::forget(client_ns);
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = ok.load(Ordering::Relaxed);
    s.lb.stop().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let while_down = ok.load(Ordering::Relaxed) - before;
    s.lb.restart(&s.topo.lb).unwrap();
    let status = s.lb.json(&s.topo.lb, &["status"]).unwrap();
    assert_eq!(status["adopted"], true, "{status}");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(while_down > 0, "no request completed while lb run was stopped");
    assert_eq!(failed, 0, "{failed} failed of {}", ok + failed);
    eprintln!("{ok} requests, {while_down} while the daemon was down, 0 failed");
}

#[test]
fn ipv6_end_to_end() {
    if !privileged_or_skip("ipv6_end_to_end") {
        return;
    }
    let s = setup([1, 1, 1]);
    let vip6 = SocketAddr::new(VIP6.into(), 80);
    let first = http_get(&s.topo.client, None, vip6, TIMEOUT).expect("GET over IPv6");
    assert!(first.starts_with("backend-"), "{first}");
    for _ in 0..5 {
        assert_eq!(
            http_get(&s.topo.client, None, vip6, TIMEOUT).unwrap(),
            first,
            "sticky over IPv6"
        );
    }
    // And a kept-alive exchange: several requests on one connection.
    let stream = s.topo.client.run(move || connect_from(None, vip6, TIMEOUT)).unwrap().unwrap();
    assert_eq!(request_on(stream, vip6, TIMEOUT).unwrap(), first);
}
