//! `/metrics` after known traffic: XDP flows and packets per service and backend, L7 requests
//! and responses per listener and backend, latency histograms, health and readiness.
use std::collections::HashMap;

use lb_tests::{
    conf,
    scenario::{L7, Scenario, WEB},
    topology::VIP4,
};

/// `name{labels} value` lines by their full series name.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// Sum over the series of `name` whose labels contain every `want`.
fn sum(m: &HashMap<String, f64>, name: &str, want: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.split_once('{').map_or(k.as_str(), |(n, _)| n) == name
                && want.iter().all(|w| k.contains(w))
        })
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_count_the_traffic_sent() {
    lb_tests::privileged!();
    let s = Scenario::topology(2).xdp_service("").l7("public", L7, "");
    let s = s.config(&conf::health("app", "http", 0.2)).start().expect("lb run");
    let (lb, topo) = (s.lb(), s.topo());
    const XDP_N: usize = 20;
    const L7_N: usize = 15;
    for _ in 0..XDP_N {
        s.get(WEB).expect("XDP request");
    }
    for _ in 0..L7_N {
        s.get(L7).expect("L7 request");
    }
    let text = s.admin().get("/metrics").unwrap();
    let m = parse(&text);
    let svc = format!("service=\"web\",vip=\"{VIP4}:80\"");
    assert_eq!(m[&format!("lb_xdp_service_flows_total{{{svc}}}")], XDP_N as f64, "{text}");
    assert!(m[&format!("lb_xdp_service_packets_total{{{svc}}}")] >= 3.0 * XDP_N as f64, "{text}");
    assert!(m[&format!("lb_xdp_service_bytes_total{{{svc}}}")] >= 60.0 * 3.0 * XDP_N as f64);
    assert_eq!(sum(&m, "lb_xdp_backend_flows_total", &["service=\"web\""]), XDP_N as f64, "{text}");
    assert!(sum(&m, "lb_xdp_packets_total", &[]) >= 3.0 * XDP_N as f64, "{text}");
    assert_eq!(m["lb_http_requests_total{listener=\"public\"}"], L7_N as f64, "{text}");
    assert_eq!(m["lb_http_responses_total{listener=\"public\",class=\"2xx\"}"], L7_N as f64);
    assert_eq!(m["lb_http_request_seconds_count{listener=\"public\"}"], L7_N as f64);
    assert_eq!(m["lb_http_request_seconds_bucket{listener=\"public\",le=\"+Inf\"}"], L7_N as f64);
    assert_eq!(
        sum(&m, "lb_upstream_responses_total", &["upstream=\"app\"", "class=\"2xx\""]),
        L7_N as f64
    );
    assert_eq!(sum(&m, "lb_upstream_responses_total", &["class=\"5xx\""]), 0.0);
    assert_eq!(sum(&m, "lb_upstream_response_seconds_count", &["upstream=\"app\""]), L7_N as f64);
    assert_eq!(sum(&m, "lb_upstream_in_flight", &[]), 0.0);
    assert_eq!(sum(&m, "lb_backend_up", &[]), 4.0, "two XDP and two L7 backends up: {text}");
    assert_eq!(sum(&m, "lb_health_up", &["service=\"app\""]), 2.0, "{text}");
    assert!(sum(&m, "lb_health_checks_total", &[]) >= 2.0);
    assert_eq!(m["lb_ready"], 1.0);

    // `lb top --once`: one view with a line per service and backend.
    let top = lb.cli(&["top", "--once", "--interval", "0.2"]).expect("lb top");
    assert!(top.contains("PPS") && top.contains("FLOWS/S") && top.contains("IN-FLIGHT"), "{top}");
    for b in &topo.backends {
        assert!(top.contains(&format!("{}:80", b.v4)), "{top}");
    }
    assert!(
        top.lines().any(|l| l.starts_with("web ")) && top.lines().any(|l| l.starts_with("app ")),
        "{top}"
    );
}
