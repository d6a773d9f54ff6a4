//! `lb run` after the served interfaces were deleted and re-created (a NIC re-plugged, veths
//! re-made) while it was stopped: it replaces the dead pinned links, keeps the pinned maps, and
//! connections held across the restart keep their backends.
use std::{net::TcpStream, time::Instant};

use lb_tests::{
    T,
    client::{connect_in, keepalive_get},
    conf, rel,
    scenario::{Scenario, WEB},
    topology::wait_neighbours,
};

#[test]
fn restart_after_the_interfaces_were_recreated_keeps_flows() {
    lb_tests::privileged!();
    // Five-tuple hashing spreads one client's connections over both backends, so each held
    // connection's backend is its own tracked state, not a property of the client address.
    let s = Scenario::topology(2).xdp_service("hash = \"five-tuple\"\n");
    let mut s = s.start().expect("lb run");
    wait_neighbours(&s.topo().lb, &["10.1.1.2", "10.1.2.2"]).unwrap();
    let n = rel::scaled(8, 64);
    let mut held: Vec<(TcpStream, String)> = (0..n)
        .map(|_| {
            let mut c = connect_in(s.client(), None, WEB, T).unwrap();
            let backend = keepalive_get(&mut c).unwrap();
            (c, backend)
        })
        .collect();

    assert!(s.lb_mut().stop().unwrap().success());
    // The backend-side interfaces are re-created; eth0's veth stays (the client's sockets
    // would lose their address with it).
    for i in 0..2 {
        s.topo_mut().recreate_backend_link(i).unwrap();
    }
    let started = Instant::now();
    let restarted = s.lb_mut().restart();
    let start_ms = started.elapsed().as_millis();
    let status = restarted.is_ok().then(|| s.lb().json(&["status"]).expect("status"));
    let kept = held
        .iter_mut()
        .map(|(c, before)| keepalive_get(c).is_ok_and(|after| after == *before))
        .filter(|&same| same)
        .count();
    let fresh = s.get(WEB);
    let on_each = ["backend-1", "backend-2"].map(|b| held.iter().filter(|(_, h)| h == b).count());
    let observed = format!(
        "lb run {} ({start_ms} ms to ready); {kept} of {n} held keep-alive connections (on backend-1/2: {}/{}) answered by the same backend after; a new connection: {}",
        match &restarted {
            Ok(()) => "started".to_string(),
            Err(e) => format!("failed: {e:#}"),
        },
        on_each[0],
        on_each[1],
        if fresh.is_ok() { "balanced" } else { "failed" },
    );
    let pass = restarted.is_ok() && kept == n && fresh.is_ok();
    rel::record(
        "xdp restart after the served interfaces were re-created",
        "lb stopped, both backend-side interfaces deleted and re-created (new indexes), lb started again on the pinned maps",
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
            ("b1".into(), "replaced".into()),
            ("b2".into(), "replaced".into()),
        ],
        "{status}"
    );
    assert_eq!(status["adopted"], true, "the pinned maps were kept: {status}");
    assert!(on_each.iter().all(|&k| k > 0), "held connections on both backends: {on_each:?}");
    assert_eq!(kept, n, "every held connection keeps its backend");
    fresh.expect("a new connection is balanced after the restart");
}

#[test]
fn restart_without_a_deleted_interface_drops_its_link() {
    lb_tests::privileged!();
    let mut s = Scenario::topology(2).xdp_service("").start().expect("lb run");
    assert!(s.lb_mut().stop().unwrap().success());
    // b2 is gone for good, and the config no longer names it.
    s.topo().lb.ip(&["link", "del", "b2"]).unwrap();
    let config =
        conf::xdp(["eth0", "b1"], "") + &conf::xdp_service("web", WEB, "\"10.1.1.2:80\"", "");
    s.lb().write_config(&config).unwrap();
    s.lb_mut().restart().expect("lb run starts without the deleted interface");
    let pin = std::path::PathBuf::from(s.lb().pin_path().unwrap());
    assert!(pin.join("link-b1").exists() && !pin.join("link-b2").exists());
    let status = s.lb().json(&["status"]).unwrap();
    let names: Vec<&str> =
        status["xdp"].as_array().unwrap().iter().filter_map(|a| a["interface"].as_str()).collect();
    assert_eq!(names, ["eth0", "b1"], "{status}");
    assert_eq!(s.get(WEB).unwrap(), "backend-1");
}
