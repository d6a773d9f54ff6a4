//! The real `lb run` binary serving HTTP from its config file, in a fresh network namespace
//! (needs root; fixed ports are safe there because the namespace is the test's own).
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    lb::Lb,
    netns::Netns,
    servers::{HttpBackend, http_get},
};

#[test]
fn lb_run_balances_http_from_its_config() {
    lb_tests::privileged!();
    let ns = Netns::new("l7").expect("namespace");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let a = HttpBackend::start(&ns, any, "a").expect("backend a");
    let b = HttpBackend::start(&ns, any, "b").expect("backend b");
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let listen: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let config = format!(
        r#"
[admin]
listen = "{admin}"
[http]
grace_ms = 2000
[[http.listener]]
name = "web"
listen = "{listen}"
[[http.route]]
listener = "web"
upstream = "app"
[upstream.app]
balance = "round-robin"
backends = ["{}", "{}"]
"#,
        a.addr, b.addr
    );
    let mut lb = Lb::start(&ns, &config, admin).expect("lb run");
    let bodies: Vec<String> = (0..4)
        .map(|_| http_get(&ns, None, listen, Duration::from_secs(5)).expect("GET through lb"))
        .collect();
    assert_eq!(bodies, ["a", "b", "a", "b"]);
    let status = lb.stop().expect("stop");
    assert!(status.success(), "lb run exited with {status}");
}
