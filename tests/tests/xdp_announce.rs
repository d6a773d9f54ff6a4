//! Issue 15 item 4: `[announce] table = N` keeps a route for each XDP VIP in routing table N
//! while its service has a backend up, for a BGP daemon to export: withdrawn when the last
//! backend fails its health check (within the fall time) or is removed, announced again when
//! one is back, shown by `lb status`, and gone after `lb detach`.
use std::time::Duration;

use lb_tests::{bird::Bird, conf, scenario::Scenario, topology::VIP4};

const TABLE: &str = "100";

/// The routes of table 100 in the balancer's namespace.
fn routes(s: &lb_tests::scenario::Running) -> String {
    s.balancer().ip(&["route", "show", "table", TABLE]).unwrap_or_default()
}

fn announced(s: &lb_tests::scenario::Running) -> bool {
    routes(s).contains(&format!("blackhole {VIP4}"))
}

/// What `lb status --json` says about the VIP.
fn status_of(s: &lb_tests::scenario::Running) -> String {
    let v = s.lb().json(&["status"]).expect("lb status");
    let list = v["announce"].as_array().cloned().unwrap_or_default();
    let mine = list.iter().find(|a| a["vip"] == VIP4.to_string());
    mine.and_then(|a| a["state"].as_str()).unwrap_or("absent").to_string()
}

#[test]
fn a_vip_is_announced_while_a_backend_is_up() {
    lb_tests::privileged!();
    let body = format!("[announce]\ntable = {TABLE}\n{}", conf::fast_health("web", "http"));
    let mut s = Scenario::topology(1).xdp_service("").config(&body).start().expect("lb run");
    let wait = |s: &lb_tests::scenario::Running, want: bool| {
        lb_tests::wait_until(Duration::from_secs(10), || announced(s) == want)
    };
    assert!(wait(&s, true), "announced at start: {}", routes(&s));
    assert_eq!(status_of(&s), "announced");
    s.stop_backend(0);
    assert!(wait(&s, false), "withdrawn once the health check fails: {}", routes(&s));
    assert_eq!(status_of(&s), "withdrawn");
    s.start_backend(0).expect("backend back");
    assert!(wait(&s, true), "announced again: {}", routes(&s));
    let backend = s.backend_list();
    let addr = backend.trim_matches(|c| c == '"' || c == ' ');
    s.lb().cli(&["backend", "remove", "web", addr]).expect("remove the only backend");
    assert!(wait(&s, false), "withdrawn with no backend: {}", routes(&s));
    s.lb().cli(&["backend", "add", "web", addr]).expect("add it back");
    assert!(wait(&s, true), "announced again: {}", routes(&s));
    s.lb_mut().stop().expect("lb stops");
    assert!(announced(&s), "kept after lb run stops (withdraw_on_stop = false)");
    s.lb().detach().expect("lb detach");
    assert!(!announced(&s), "lb detach withdraws it: {}", routes(&s));
}

/// The shipped `deploy/bgp/bird.conf` on the balancer exports what `[announce]` keeps in
/// table 100 to a bird2 router (the client's namespace) by BGP, and withdraws it with the
/// route.
#[test]
fn the_shipped_bird_config_announces_the_vip_to_a_router() {
    lb_tests::privileged!();
    let body = format!("[announce]\ntable = {TABLE}\n{}", conf::fast_health("web", "http"));
    let s = Scenario::topology(1).xdp_service("").config(&body).start().expect("lb run");
    let node = Bird::node(s.balancer(), "10.0.0.1", "10.0.0.2").expect("bird on the node");
    let router = Bird::router(s.client(), "10.0.0.2", &["10.0.0.1"], false).expect("bird router");
    let vip = VIP4.to_string();
    let learned = |r: &Bird| r.route(&vip).contains("BGP.next_hop: 10.0.0.1");
    let ok = lb_tests::wait_until(Duration::from_secs(30), || learned(&router));
    assert!(
        ok,
        "the router learned the VIP from the node: {}; router: {}; node: {} {}",
        router.route(&vip),
        router.birdc(&["show", "protocols", "all", "node0"]),
        node.birdc(&["show", "protocols"]),
        node.birdc(&["show", "route", "table", "lbvips", "all"])
    );
    s.stop_backend(0);
    let gone = lb_tests::wait_until(Duration::from_secs(15), || !learned(&router));
    assert!(gone, "withdrawn by BGP once no backend is up: {}", router.route(&vip));
    s.start_backend(0).expect("backend back");
    let back = lb_tests::wait_until(Duration::from_secs(15), || learned(&router));
    assert!(back, "announced again: {}", router.route(&vip));
}
