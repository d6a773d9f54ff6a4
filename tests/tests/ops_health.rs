//! Health checks end to end: a backend killed in its namespace leaves the XDP Maglev table
//! and the L7 pool within interval × fall (plus slack), no new flow or request reaches it,
//! open XDP flows to the other backends survive, and it comes back after `rise` successes.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    lb::{Lb, pin_path},
    netns::Netns,
    ops::{keepalive_get, wait_until},
    privileged_or_skip,
    servers::{HttpBackend, connect_from, http_get},
    topology::{Topology, VIP4},
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// interval 0.2 s × fall 2 = 0.4 s; the slack covers the CLI polling and a loaded machine.
const DOWN_WITHIN: Duration = Duration::from_millis(400 + 2000);

fn state_of(lb: &Lb, ns: &Netns, service: &str, addr: &str) -> String {
    let v = lb.json(ns, &["backend", "list", service]).expect("backend list");
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
    if !privileged_or_skip("xdp_backend_killed_leaves_the_table_and_returns") {
        return;
    }
    let topo = Topology::new(3).expect("topology");
    let any: SocketAddr = "0.0.0.0:80".parse().unwrap();
    let mut servers: Vec<Option<HttpBackend>> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| Some(HttpBackend::start(&b.ns, any, &format!("backend-{}", i + 1)).unwrap()))
        .collect();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let backends: Vec<String> = topo.backends.iter().map(|b| format!("\"{}:80\"", b.v4)).collect();
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
[health.web]
type = "http"
path = "/"
interval = 0.2
timeout = 0.2
fall = 2
rise = 2
"#,
        ifaces.join(", "),
        pin_path(),
        backends.join(", ")
    );
    let lb = Lb::start(&topo.lb, &config, admin).expect("lb run");
    let vip = SocketAddr::new(VIP4.into(), 80);
    let clients: Vec<IpAddr> = topo.add_client_addresses(90).unwrap();
    let who = |src: IpAddr| http_get(&topo.client, Some(src), vip, TIMEOUT);
    let before: Vec<String> = clients.iter().map(|c| who(*c).expect("request")).collect();
    assert!(before.iter().any(|b| b == "backend-3"), "backend-3 has clients: {before:?}");

    // Open keep-alive flows to backend-1 and backend-2.
    let mut open = HashMap::new();
    for name in ["backend-1", "backend-2"] {
        let src = clients[before.iter().position(|b| b == name).unwrap()];
        let mut s =
            topo.client.run(move || connect_from(Some(src), vip, TIMEOUT)).unwrap().unwrap();
        assert_eq!(keepalive_get(&mut s).unwrap(), name);
        open.insert(name, s);
    }

    // Kill backend-3: its listener closes, connections are refused.
    let b3 = format!("{}:80", topo.backends[2].v4);
    assert_eq!(state_of(&lb, &topo.lb, "web", &b3), "up");
    servers[2] = None;
    let killed = Instant::now();
    assert!(
        wait_until(DOWN_WITHIN, || state_of(&lb, &topo.lb, "web", &b3) == "down"),
        "backend-3 not down within {DOWN_WITHIN:?}"
    );
    eprintln!("backend-3 down after {:?}", killed.elapsed());
    let v = lb.json(&topo.lb, &["backend", "list", "web"]).unwrap();
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
    for (name, s) in open.iter_mut() {
        assert_eq!(keepalive_get(s).unwrap(), *name, "open flow to {name}");
    }
    let status = lb.json(&topo.lb, &["status"]).unwrap();
    assert_eq!(status["unavailable"], serde_json::json!([]), "{status}");

    // Back: after `rise` good checks it takes its clients again.
    servers[2] = Some(HttpBackend::start(&topo.backends[2].ns, any, "backend-3").unwrap());
    assert!(
        wait_until(DOWN_WITHIN, || state_of(&lb, &topo.lb, "web", &b3) == "up"),
        "backend-3 not up again"
    );
    let after: Vec<String> = clients.iter().map(|c| who(*c).expect("request")).collect();
    assert_eq!(after, before, "every client is back on its backend");
    for (name, s) in open.iter_mut() {
        assert_eq!(keepalive_get(s).unwrap(), *name, "open flow to {name}");
    }
}

#[test]
fn l7_backend_killed_gets_no_requests_and_returns() {
    if !privileged_or_skip("l7_backend_killed_gets_no_requests_and_returns") {
        return;
    }
    let ns = Netns::new("hl7").expect("namespace");
    let a = HttpBackend::start(&ns, "127.0.0.1:0".parse().unwrap(), "a").unwrap();
    let b_addr: SocketAddr = "127.0.0.1:18081".parse().unwrap();
    let b = HttpBackend::start(&ns, b_addr, "b").unwrap();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let config = format!(
        r#"
[admin]
listen = "{admin}"
[[http.listener]]
name = "web"
listen = "{listen}"
[[http.route]]
listener = "web"
upstream = "app"
[upstream.app]
backends = ["{}", "{b_addr}"]
eject_after = 0
[health.app]
type = "tcp"
interval = 0.2
timeout = 0.2
fall = 2
rise = 2
"#,
        a.addr
    );
    let lb = Lb::start(&ns, &config, admin).expect("lb run");
    let get = || http_get(&ns, None, listen, TIMEOUT);
    let first: Vec<String> = (0..4).map(|_| get().unwrap()).collect();
    assert!(first.contains(&"b".to_string()), "{first:?}");

    drop(b);
    let b_str = b_addr.to_string();
    assert!(
        wait_until(DOWN_WITHIN, || state_of(&lb, &ns, "app", &b_str) == "down"),
        "b not down in time"
    );
    // No request reaches b (its pooled connections would still answer: only health keeps
    // the proxy away from it), and none fails.
    for _ in 0..20 {
        assert_eq!(get().unwrap(), "a");
    }
    let _b = HttpBackend::start(&ns, b_addr, "b").unwrap();
    assert!(wait_until(DOWN_WITHIN, || state_of(&lb, &ns, "app", &b_str) == "up"), "b not back");
    let seen: Vec<String> = (0..4).map(|_| get().unwrap()).collect();
    assert!(seen.contains(&"b".to_string()), "{seen:?}");

    // No backend up: the group is reported and L7 answers 503.
    drop(_b);
    drop(a);
    assert!(
        wait_until(DOWN_WITHIN, || {
            lb.json(&ns, &["status"]).unwrap()["unavailable"]
                == serde_json::json!(["app: no backend up"])
        }),
        "group with no backend up not reported"
    );
    let err = get().unwrap_err().to_string();
    assert!(err.contains("503"), "{err}");
}
