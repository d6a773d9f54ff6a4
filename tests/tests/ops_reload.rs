//! Reload under continuous load (XDP VIP and L7 listener, a fresh connection per request): an
//! invalid config is refused with its errors and the old one keeps serving; valid changes
//! (a backend added, weights changed, a service and a route added) apply through `lb reload`
//! and SIGHUP with zero failed requests.
use std::time::Duration;

use lb_tests::{
    conf,
    lb::Lb,
    load::Load,
    scenario::{L7, Running, Scenario, WEB},
    wait_until,
};

/// The config with XDP service `web` over `xdp` backends (and `web2` if asked) and the L7
/// group `app` over `app`, each backend `(index, weight)` of the scenario.
fn config(s: &Running, xdp: &[(usize, u32)], app: &[(usize, u32)], web2: bool) -> String {
    let list = |set: &[(usize, u32)]| conf::weighted(set.iter().map(|(i, w)| (s.backends[*i], *w)));
    let web2 = if web2 {
        conf::xdp_service("web2", "10.200.0.2:80", &conf::list([s.backends[0]]), "")
    } else {
        String::new()
    };
    [
        conf::admin("127.0.0.1:9901"),
        conf::xdp(s.interfaces(), ""),
        conf::xdp_service("web", WEB, &list(xdp), ""),
        web2,
        conf::l7("public", L7, "app", &list(app), ""),
    ]
    .concat()
}

fn backends_of(lb: &Lb, service: &str) -> Vec<(String, u64)> {
    let v = lb.json(&["backend", "list", service]).unwrap();
    v["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["addr"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap()))
        .collect()
}

#[test]
fn reload_applies_valid_changes_under_load_and_refuses_invalid_ones() {
    lb_tests::privileged!();
    // Starts with backends 1 and 2 (weight 1) in both; the reloads below rewrite the config.
    let two = conf::list(&Scenario::topology(3).backend_addrs()[..2]);
    let s = Scenario::topology(3).xdp_raw(&conf::xdp_service("web", WEB, &two, ""));
    let s = s.config(&conf::l7("public", L7, "app", &two, "")).start().expect("lb run");
    let lb = s.lb();
    let (vip, l7) = (WEB, L7);
    let load = Load::start(s.client(), vec![vip, l7]);
    load.wait_for(50);

    // Invalid: refused with the error and its line; the old config keeps serving.
    lb.write_config(&config(&s, &[(0, 1)], &[(0, 0)], false)).unwrap();
    let out = lb.cli_command(&["reload"]).unwrap().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream.app: backend") && err.contains("weight 0") && err.contains("line "),
        "{err}"
    );
    assert_eq!(backends_of(lb, "web").len(), 2, "the old XDP service stays");
    load.wait_for(50);

    // A change that takes a restart is refused too.
    let moved = config(&s, &[(0, 1), (1, 1)], &[(0, 1), (1, 1)], false)
        .replace("listen = \"127.0.0.1:9901\"", "listen = \"127.0.0.1:9902\"");
    lb.write_config(&moved).unwrap();
    let err = lb.cli(&["reload"]).unwrap_err().to_string();
    assert!(err.contains("admin.listen changed"), "{err}");

    // Valid: backend-3 added to both, weights changed, a new XDP service.
    lb.write_config(&config(&s, &[(0, 1), (1, 2), (2, 1)], &[(0, 1), (1, 3), (2, 1)], true))
        .unwrap();
    let out = lb.cli(&["reload"]).expect("reload");
    assert!(out.contains("reloaded") && out.contains("upstream app: backends"), "{out}");
    let b = |i: usize| s.backends[i].to_string();
    assert_eq!(backends_of(lb, "web"), [(b(0), 1), (b(1), 2), (b(2), 1)]);
    assert_eq!(backends_of(lb, "app"), [(b(0), 1), (b(1), 3), (b(2), 1)]);
    assert_eq!(
        s.get("10.200.0.2:80".parse().unwrap()).unwrap(),
        "backend-1",
        "the added service answers"
    );
    load.wait_for(200);

    // SIGHUP: backend-1 leaves the L7 group.
    lb.write_config(&config(&s, &[(0, 1), (1, 2), (2, 1)], &[(1, 1), (2, 1)], true)).unwrap();
    lb.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || backends_of(lb, "app").len() == 2),
        "SIGHUP did not reload"
    );
    load.wait_for(100);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests during reloads: {:?}", report.failures);
    assert!(
        report.seen.get("backend-3").copied().unwrap_or(0) > 0,
        "backend-3 got traffic: {:?}",
        report.seen
    );
    // After the SIGHUP, L7 never picks backend-1.
    for _ in 0..6 {
        assert_ne!(s.get(l7).unwrap(), "backend-1");
    }
}
