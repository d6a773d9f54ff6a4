//! `lb backend drain | undrain | weight` on an XDP service and on an upstream group of one
//! running daemon, checked through `lb backend list` and through traffic; then a reload, after
//! which the file is the truth again (runtime drains end, weights go back).
use std::collections::BTreeMap;

use lb_tests::scenario::{L7, Running, Scenario, WEB};

/// Who answered `n` requests to `target`, each on a new connection.
fn answers(s: &Running, target: std::net::SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        *seen.entry(s.get(target).expect("request through lb")).or_default() += 1;
    }
    seen
}

/// (state, weight) of `addr` in `lb backend list SERVICE --json`.
fn listed(s: &Running, service: &str, addr: &str) -> (String, u64) {
    let v = s.lb().json(&["backend", "list", service]).expect("lb backend list");
    let list = v["services"][0]["backends"].as_array().expect("backends").clone();
    let b = list.iter().find(|b| b["addr"] == addr).unwrap_or_else(|| panic!("{addr}: {v}"));
    (b["state"].as_str().unwrap_or_default().to_string(), b["weight"].as_u64().unwrap_or(0))
}

#[test]
fn drain_undrain_weight_and_a_reload_that_restores_the_file() {
    lb_tests::privileged!();
    // Five-tuple hashing: one client's connections spread, as the checks below need.
    let s = Scenario::topology(2).xdp_service("hash = \"five-tuple\"\n").l7("public", L7, "");
    let s = s.start().expect("lb run");
    let [b1, b2] = [0, 1].map(|i| s.backend_addrs()[i].to_string());
    let both = |seen: &BTreeMap<String, usize>| seen.len() == 2;

    for (service, target) in [("web", WEB), ("app", L7)] {
        assert!(both(&answers(&s, target, 20)), "{service}: both backends serve at first");
        s.lb().cli(&["backend", "drain", service, &b1]).expect("drain");
        assert_eq!(listed(&s, service, &b1).0, "draining");
        let seen = answers(&s, target, 12);
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["backend-2"], "{service} drained: {seen:?}");

        let out = s.lb().cli(&["backend", "undrain", service, &b1]).expect("undrain");
        assert!(out.contains("takes new flows again"), "{out}");
        assert_eq!(listed(&s, service, &b1).0, "up");
        assert!(both(&answers(&s, target, 20)), "{service}: undrained, both serve again");

        s.lb().cli(&["backend", "weight", service, &b1, "5"]).expect("weight");
        assert_eq!(listed(&s, service, &b1).1, 5);
        let seen = answers(&s, target, 60);
        // 5 : 1 — round robin (L7) gives exactly 50 of 60; Maglev (XDP) about that.
        assert!(seen.get("backend-1").copied().unwrap_or(0) >= 40, "{service} weight 5: {seen:?}");
    }

    // Errors name the problem.
    let err = s.lb().cli(&["backend", "weight", "web", &b1, "0"]).unwrap_err().to_string();
    assert!(err.contains("weight must be at least 1") || err.contains("weight 0"), "{err}");
    let err = s.lb().cli(&["backend", "undrain", "app", "10.9.9.9:80"]).unwrap_err().to_string();
    assert!(err.contains("not in the group"), "{err}");

    // Both services now have b1 at weight 5 and b2 drained; a reload puts the file back.
    for service in ["web", "app"] {
        s.lb().cli(&["backend", "drain", service, &b2]).expect("drain");
    }
    let out = s.lb().cli(&["reload"]).expect("lb reload");
    for line in
        [format!("xdp service web: {b2} undrained"), format!("upstream app: {b2} undrained")]
    {
        assert!(out.contains(&line), "the reload says what it undid ({line}): {out}");
    }
    for (service, target) in [("web", WEB), ("app", L7)] {
        for b in [&b1, &b2] {
            assert_eq!(listed(&s, service, b), ("up".to_string(), 1), "{service} {b} after reload");
        }
        let seen = answers(&s, target, 20);
        assert!(both(&seen), "{service} after reload: {seen:?}");
    }
}
