//! SIGTERM: the daemon stops accepting, lets a request in flight finish within
//! `http.grace_ms`, exits 0, and the pinned XDP program keeps forwarding after it is gone.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    lb::{Lb, pin_path},
    ops::{SlowBackend, admin_request, wait_until},
    privileged_or_skip,
    servers::{HttpBackend, http_get},
    topology::{Topology, VIP4},
};

#[test]
fn sigterm_drains_l7_and_xdp_keeps_forwarding() {
    if !privileged_or_skip("sigterm_drains_l7_and_xdp_keeps_forwarding") {
        return;
    }
    let topo = Topology::new(1).expect("topology");
    let b = &topo.backends[0];
    let _fast = HttpBackend::start(&b.ns, "0.0.0.0:80".parse().unwrap(), "backend-1").unwrap();
    let slow = SlowBackend::start(
        &b.ns,
        "0.0.0.0:8081".parse().unwrap(),
        "slow",
        Duration::from_millis(1500),
    )
    .unwrap();
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
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
backends = ["{}:80"]
[http]
grace_ms = 5000
[[http.listener]]
name = "public"
listen = "10.0.0.1:8080"
[[http.route]]
listener = "public"
upstream = "app"
[upstream.app]
backends = ["{}:8081"]
"#,
        ifaces.join(", "),
        pin_path(),
        b.v4,
        b.v4
    );
    let mut lb = Lb::start(&topo.lb, &config, admin).expect("lb run");
    assert_eq!(admin_request(&topo.lb, admin, "GET", "/ready", None).unwrap().0, 200);
    let vip = SocketAddr::new(VIP4.into(), 80);
    let l7: SocketAddr = "10.0.0.1:8080".parse().unwrap();

    let client = lb_tests::netns::Netns { name: topo.client.name.clone() };
    let in_flight = std::thread::spawn(move || {
        let r = http_get(&client, None, l7, Duration::from_secs(10));
        std::mem::forget(client); // the topology owns the namespace
        r
    });
    assert!(
        wait_until(Duration::from_secs(5), || !slow.arrived.lock().unwrap().is_empty()),
        "the slow request reached its backend"
    );
    let status = lb.stop().expect("SIGTERM");
    assert!(status.success(), "lb run exited with {status}");
    assert_eq!(in_flight.join().unwrap().expect("in-flight request finished"), "slow");
    // Gone: no more L7, but the pinned program still forwards the VIP.
    assert!(http_get(&topo.client, None, l7, Duration::from_secs(2)).is_err());
    assert_eq!(http_get(&topo.client, None, vip, Duration::from_secs(3)).unwrap(), "backend-1");
}
