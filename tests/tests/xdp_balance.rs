//! The XDP balancer end to end: real clients, `lb run`, real HTTP backends, each in its own
//! network namespace. Every assertion is about which backend answered a real request.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    client::{connect_in, request_on},
    conf,
    load::Load,
    scenario::{Running, Scenario, TIMEOUT, WEB},
    topology::VIP6,
};

/// Three backends with the given weights behind VIP4:80 (and VIP6:80 on the same backends).
fn setup(weights: [u32; 3]) -> Running {
    let s = Scenario::topology(3).bind("[::]:80".parse().unwrap());
    let v4 = conf::weighted(s.backend_addrs().into_iter().zip(weights));
    let v6 = conf::list((1..=3).map(|i| format!("[fd01:{i}::2]:80")));
    let web6 = conf::xdp_service("web6", format!("[{VIP6}]:80"), &v6, "");
    s.xdp_raw(&conf::xdp_service("web", WEB, &v4, "")).xdp_raw(&web6).start().expect("lb run")
}

/// Which backend answers a fresh connection from `src`.
fn who(s: &Running, src: IpAddr) -> String {
    s.get_from(src, WEB).unwrap_or_else(|e| panic!("request from {src}: {e:#}"))
}

/// `n` more client addresses, and the backend each of them reaches first.
fn first_answers(s: &Running, n: usize) -> (Vec<IpAddr>, Vec<String>) {
    let clients = s.topo().add_client_addresses(n).unwrap();
    let first = clients.iter().map(|c| who(s, *c)).collect();
    (clients, first)
}

#[test]
fn spreads_clients_by_weight_and_keeps_each_on_one_backend() {
    lb_tests::privileged!();
    let s = setup([1, 1, 2]);
    let (clients, first) = first_answers(&s, 600);
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
    let stats = s.lb().json(&["stats", "web"]).unwrap();
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
    lb_tests::privileged!();
    let s = setup([1, 1, 1]);
    let (clients, before) = first_answers(&s, 150);
    // One open keep-alive connection per backend, from a client that maps to it.
    let mut open = HashMap::new();
    for b in ["backend-1", "backend-2", "backend-3"] {
        let i = before.iter().position(|x| x == b).expect("every backend has clients");
        let src = clients[i];
        let stream = connect_in(s.client(), Some(src), WEB, TIMEOUT).unwrap();
        open.insert(b, stream);
    }
    let ask = |b: &str, open: &HashMap<&str, std::net::TcpStream>| -> anyhow::Result<String> {
        let mut stream = open[b].try_clone()?;
        lb_tests::client::keepalive_get(&mut stream)
    };
    for b in ["backend-1", "backend-2", "backend-3"] {
        assert_eq!(ask(b, &open).unwrap(), b);
    }

    // Remove backend-3: its clients move, nobody else does, open connections elsewhere live.
    let b3 = s.backends[2].to_string();
    s.lb().cli(&["backend", "remove", "web", &b3]).unwrap();
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
    let b2 = s.backends[1].to_string();
    s.lb().cli(&["backend", "drain", "web", &b2]).unwrap();
    assert_eq!(ask("backend-2", &open).unwrap(), "backend-2", "drained: open connection continues");
    let list = s.lb().cli(&["backend", "list", "web"]).unwrap();
    assert!(list.contains("draining"), "{list}");
    for (c, was) in clients.iter().zip(&before) {
        if was == "backend-2" {
            assert_eq!(who(&s, *c), "backend-1", "new flow of drained backend's client {c}");
        }
    }

    // Add backend-3 back: its share of clients reaches it on their very next connection.
    let started = Instant::now();
    s.lb().cli(&["backend", "add", "web", &b3]).unwrap();
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
    lb_tests::privileged!();
    let mut s = setup([1, 1, 1]);
    let clients = s.topo().add_client_addresses(50).unwrap();
    let load = Load::builder(s.client(), vec![WEB]).sources(&clients).start();
    std::thread::sleep(Duration::from_millis(500));
    let before = load.ok();
    s.lb_mut().stop().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let while_down = load.ok() - before;
    s.lb_mut().restart().unwrap();
    let status = s.lb().json(&["status"]).unwrap();
    assert_eq!(status["adopted"], true, "{status}");
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    let (ok, failed) = (report.ok, report.failed);
    assert!(while_down > 0, "no request completed while lb run was stopped");
    assert_eq!(failed, 0, "{failed} failed of {}: {:?}", ok + failed, report.sample_failures());
    eprintln!("{ok} requests, {while_down} while the daemon was down, 0 failed");
}

#[test]
fn ipv6_end_to_end() {
    lb_tests::privileged!();
    let s = setup([1, 1, 1]);
    let vip6 = SocketAddr::new(VIP6.into(), 80);
    let first = s.get(vip6).expect("GET over IPv6");
    assert!(first.starts_with("backend-"), "{first}");
    for _ in 0..5 {
        assert_eq!(s.get(vip6).unwrap(), first, "sticky over IPv6");
    }
    // And a kept-alive exchange: several requests on one connection.
    let stream = connect_in(s.client(), None, vip6, TIMEOUT).unwrap();
    assert_eq!(request_on(stream, vip6, TIMEOUT).unwrap(), first);
}
