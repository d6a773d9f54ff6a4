//! The admin API of a real `lb run` without a token (L7 only, in its own namespace): every
//! resource, GET on a mutating path refused, and a public admin address refused without a
//! token. With a token: `ops_admin_token.rs`.
use lb_tests::{conf, lb::Lb, netns::Netns, scenario::Scenario};

#[test]
fn admin_api_without_a_token() {
    lb_tests::privileged!();
    // One health-checked L7 listener: every admin resource has something in it.
    let s = Scenario::loopback(1).names(&["a"]).l7("web", "127.0.0.1:8080".parse().unwrap(), "");
    let s = s.config(&conf::health("app", "http", 0.5)).start().expect("lb run");
    let admin = s.admin();
    for path in
        ["/status", "/stats", "/services/app", "/health", "/metrics", "/config", "/live", "/ready"]
    {
        let (status, body) = admin.request("GET", path).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    let (status, body) =
        admin.request("POST", "/services/app/backends/127.0.0.2:80/drain").unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(admin.request("GET", "/reload").unwrap().0, 405);
    assert_eq!(admin.request("PUT", "/stats").unwrap().0, 405);
}

#[test]
fn a_public_admin_address_without_a_token_is_refused() {
    lb_tests::privileged!();
    let ns = Netns::new("adr").expect("namespace");
    let public = conf::admin("0.0.0.0:9901");
    let out = Lb::builder(&ns, public.as_str()).run_to_exit().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: admin.listen") && err.contains("allow_insecure"), "{err}");
    // allow_insecure = true starts it (and it stops on SIGTERM).
    let lb = Lb::builder(&ns, public + "allow_insecure = true\n").start().expect("lb run");
    assert_eq!(lb.admin().request("GET", "/status").unwrap().0, 200);
}
