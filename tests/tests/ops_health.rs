//! Health checks end to end: a backend killed in its namespace leaves the XDP Maglev table
//! and the L7 pool within interval × fall (plus slack), no new flow or request reaches it,
//! open XDP flows to the other backends survive, and it comes back after `rise` successes.
use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_tests::{
    client::{connect_in, keepalive_get},
    conf,
    lb::Lb,
    scenario::{Scenario, TIMEOUT, WEB},
    wait_until,
};
/// interval 0.2 s × fall 2 = 0.4 s; the slack covers the CLI polling and a loaded machine.
const DOWN_WITHIN: Duration = Duration::from_millis(400 + 2000);

fn state_of(lb: &Lb, service: &str, addr: &str) -> String {
    let v = lb.json(&["backend", "list", service]).expect("backend list");
    v["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr)
        .map(|b| b["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

#[test]
fn xdp_backend_killed_leaves_the_table_and_returns() {
    lb_tests::privileged!();
    let health = conf::fast_health("web", "http");
    let s = Scenario::topology(3).xdp_service("").config(&health).start().expect("lb run");
    let (vip, lb, topo) = (WEB, s.lb(), s.topo());
    let clients: Vec<IpAddr> = topo.add_client_addresses(90).unwrap();
    let who = |src: IpAddr| s.get_from(src, vip);
    let before: Vec<String> = clients.iter().map(|c| who(*c).expect("request")).collect();
    assert!(before.iter().any(|b| b == "backend-3"), "backend-3 has clients: {before:?}");

    // Open keep-alive flows to backend-1 and backend-2.
    let mut open = HashMap::new();
    for name in ["backend-1", "backend-2"] {
        let src = clients[before.iter().position(|b| b == name).unwrap()];
        let mut c = connect_in(&topo.client, Some(src), vip, TIMEOUT).unwrap();
        assert_eq!(keepalive_get(&mut c).unwrap(), name);
        open.insert(name, c);
    }

    // Kill backend-3: its listener closes, connections are refused.
    let b3 = format!("{}:80", topo.backends[2].v4);
    assert_eq!(state_of(lb, "web", &b3), "up");
    s.stop_backend(2);
    let killed = Instant::now();
    assert!(
        wait_until(DOWN_WITHIN, || state_of(lb, "web", &b3) == "down"),
        "backend-3 not down within {DOWN_WITHIN:?}"
    );
    eprintln!("backend-3 down after {:?}", killed.elapsed());
    let v = lb.json(&["backend", "list", "web"]).unwrap();
    let b = v["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == b3.as_str())
        .unwrap()
        .clone();
    assert_eq!(b["slots"], 0, "no Maglev slot left: {b}");
    assert!(b["health"]["last_error"].as_str().unwrap().contains("connect"), "{b}");

    // Every client gets an answer from a live backend: no new flow goes to backend-3.
    for (c, was) in clients.iter().zip(&before) {
        let now = who(*c).unwrap_or_else(|e| panic!("client {c} (was on {was}): {e:#}"));
        assert_ne!(now, "backend-3");
        if was != "backend-3" {
            assert_eq!(&now, was, "client {c} of a live backend moved");
        }
    }
    // Flows open to the others survive.
    for (name, c) in open.iter_mut() {
        assert_eq!(keepalive_get(c).unwrap(), *name, "open flow to {name}");
    }
    let status = lb.json(&["status"]).unwrap();
    assert_eq!(status["unavailable"], serde_json::json!([]), "{status}");

    // Back: after `rise` good checks it takes its clients again.
    s.start_backend(2).unwrap();
    assert!(wait_until(DOWN_WITHIN, || state_of(lb, "web", &b3) == "up"), "backend-3 not up again");
    let after: Vec<String> = clients.iter().map(|c| who(*c).expect("request")).collect();
    assert_eq!(after, before, "every client is back on its backend");
    for (name, c) in open.iter_mut() {
        assert_eq!(keepalive_get(c).unwrap(), *name, "open flow to {name}");
    }
}

#[test]
fn l7_backend_killed_gets_no_requests_and_returns() {
    lb_tests::privileged!();
    let listen = "127.0.0.1:8080".parse().unwrap();
    let s = Scenario::loopback(2).names(&["a", "b"]).l7("web", listen, "eject_after = 0\n");
    let s = s.config(&conf::fast_health("app", "tcp")).start().expect("lb run");
    let lb = s.lb();
    let b_addr = s.backends[1];
    let get = || s.get(listen);
    let first: Vec<String> = (0..4).map(|_| get().unwrap()).collect();
    assert!(first.contains(&"b".to_string()), "{first:?}");

    s.stop_backend(1);
    let b_str = b_addr.to_string();
    assert!(
        wait_until(DOWN_WITHIN, || state_of(lb, "app", &b_str) == "down"),
        "b not down in time"
    );
    // No request reaches b (its pooled connections would still answer: only health keeps
    // the proxy away from it), and none fails.
    for _ in 0..20 {
        assert_eq!(get().unwrap(), "a");
    }
    s.start_backend(1).unwrap();
    assert!(wait_until(DOWN_WITHIN, || state_of(lb, "app", &b_str) == "up"), "b not back");
    let seen: Vec<String> = (0..4).map(|_| get().unwrap()).collect();
    assert!(seen.contains(&"b".to_string()), "{seen:?}");

    // No backend up: the group is reported and L7 answers 503.
    s.stop_backend(1);
    s.stop_backend(0);
    assert!(
        wait_until(DOWN_WITHIN, || {
            lb.json(&["status"]).unwrap()["unavailable"]
                == serde_json::json!(["app: no backend up"])
        }),
        "group with no backend up not reported"
    );
    let err = get().unwrap_err().to_string();
    assert!(err.contains("503"), "{err}");
}
