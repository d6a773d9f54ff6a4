//! SIGTERM: the daemon stops accepting, lets a request in flight finish within
//! `http.grace_ms`, exits 0, and the pinned XDP program keeps forwarding after it is gone.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    backends::{HttpBackend, Reply},
    client::http_get,
    conf,
    scenario::{L7, Scenario, WEB},
    wait_until,
};

#[test]
fn sigterm_drains_l7_and_xdp_keeps_forwarding() {
    lb_tests::privileged!();
    // XDP to the backend's port 80; L7 to a slow server on its port 8081.
    let s = Scenario::topology(1).xdp_service("");
    let slow_addr = SocketAddr::new(s.backend_addrs()[0].ip(), 8081);
    let l7 = conf::l7("public", L7, "app", &conf::list([slow_addr]), "");
    let mut s = s.config(&format!("[http]\ngrace_ms = 5000\n{l7}")).start().expect("lb run");
    let slow = HttpBackend::with(
        s.backend_ns(0),
        "0.0.0.0:8081".parse().unwrap(),
        "slow",
        Reply::Slow(Duration::from_millis(1500)),
    )
    .unwrap();
    assert_eq!(s.admin().request("GET", "/ready").unwrap().0, 200);

    let client = s.client().share();
    let in_flight =
        std::thread::spawn(move || http_get(&client, None, L7, Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(5), || !slow.arrived.lock().unwrap().is_empty()),
        "the slow request reached its backend"
    );
    let status = s.lb_mut().stop().expect("SIGTERM");
    assert!(status.success(), "lb run exited with {status}");
    assert_eq!(in_flight.join().unwrap().expect("in-flight request finished"), "slow");
    // Gone: no more L7, but the pinned program still forwards the VIP.
    assert!(http_get(s.client(), None, L7, Duration::from_secs(2)).is_err());
    assert_eq!(s.get(WEB).unwrap(), "backend-1");
}
