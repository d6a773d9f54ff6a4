//! `lb run` after the served interfaces were deleted and re-created (a NIC re-plugged, veths
//! re-made) while it was stopped: it replaces the dead pinned links, keeps the pinned maps, and
//! a connection held across the restart keeps its backend.
use lb_tests::{
    T,
    client::{connect_in, keepalive_get},
    rel,
    scenario::{Scenario, WEB},
    topology::wait_neighbours,
};

#[test]
fn restart_after_the_interfaces_were_recreated_keeps_flows() {
    lb_tests::privileged!();
    let mut s = Scenario::topology(2).xdp_service("").start().expect("lb run");
    wait_neighbours(&s.topo().lb, &["10.1.1.2", "10.1.2.2"]).unwrap();
    let mut held = connect_in(s.client(), None, WEB, T).unwrap();
    let first = keepalive_get(&mut held).unwrap();

    assert!(s.lb_mut().stop().unwrap().success());
    // The backend-side interfaces are what lb serves besides eth0, whose veth stays (the
    // client's socket would lose its address with it).
    for i in 0..2 {
        s.topo_mut().recreate_backend_link(i).unwrap();
    }
    let restarted = s.lb_mut().restart();
    let status = restarted.is_ok().then(|| s.lb().json(&["status"]).expect("status"));
    let again = keepalive_get(&mut held);
    let fresh = s.get(WEB);
    let observed = format!(
        "restart: {}; held connection: {first} before, {again:?} after; new connection: {fresh:?}",
        match &restarted {
            Ok(()) => "started".to_string(),
            Err(e) => format!("{e:#}"),
        }
    );
    let pass = restarted.is_ok() && again.as_deref().ok() == Some(first.as_str()) && fresh.is_ok();
    rel::record(
        "xdp_restart_recreated_interfaces",
        "lb stopped, both backend-side interfaces deleted and re-created (new indexes), lb started again, one keep-alive connection held throughout",
        &observed,
        pass,
    );
    restarted.expect("lb run starts over severed pinned links");
    let status = status.unwrap();
    let links: Vec<(String, String)> = status["xdp"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["interface"].as_str().unwrap().into(), a["link"].as_str().unwrap().into()))
        .collect();
    assert_eq!(
        links,
        [
            ("eth0".into(), "updated in place".into()),
            ("b1".into(), "replaced (interface re-created)".into()),
            ("b2".into(), "replaced (interface re-created)".into()),
        ],
        "{status}"
    );
    assert_eq!(status["adopted"], true, "the pinned maps were kept: {status}");
    assert_eq!(again.unwrap(), first, "the held connection keeps its backend");
    fresh.expect("a new connection is balanced after the restart");
}
