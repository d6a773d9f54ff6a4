//! `/metrics` after known traffic: XDP flows and packets per service and backend, L7 requests
//! and responses per listener and backend, latency histograms, health and readiness.
use std::{collections::HashMap, net::SocketAddr, time::Duration};

use lb_tests::{
    lb::{Lb, pin_path},
    ops::admin_request,
    privileged_or_skip,
    servers::{HttpBackend, http_get},
    topology::{Topology, VIP4},
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
    if !privileged_or_skip("metrics_count_the_traffic_sent") {
        return;
    }
    let topo = Topology::new(2).expect("topology");
    let _servers: Vec<HttpBackend> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            HttpBackend::start(&b.ns, "0.0.0.0:80".parse().unwrap(), &format!("backend-{}", i + 1))
                .unwrap()
        })
        .collect();
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let b: Vec<String> = topo.backends.iter().map(|b| format!("\"{}:80\"", b.v4)).collect();
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
backends = [{}]
[[http.listener]]
name = "public"
listen = "10.0.0.1:8080"
[[http.route]]
listener = "public"
upstream = "app"
[upstream.app]
backends = [{}]
[health.app]
type = "http"
interval = 0.2
timeout = 0.2
"#,
        ifaces.join(", "),
        pin_path(),
        b.join(", "),
        b.join(", ")
    );
    let lb = Lb::start(&topo.lb, &config, admin).expect("lb run");
    let vip = SocketAddr::new(VIP4.into(), 80);
    let l7: SocketAddr = "10.0.0.1:8080".parse().unwrap();
    const XDP_N: usize = 20;
    const L7_N: usize = 15;
    for _ in 0..XDP_N {
        http_get(&topo.client, None, vip, Duration::from_secs(3)).expect("XDP request");
    }
    for _ in 0..L7_N {
        http_get(&topo.client, None, l7, Duration::from_secs(3)).expect("L7 request");
    }
    let (status, text) = admin_request(&topo.lb, admin, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
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
    let top = lb.cli(&topo.lb, &["top", "--once", "--interval", "0.2"]).expect("lb top");
    assert!(top.contains("PPS") && top.contains("FLOWS/S") && top.contains("IN-FLIGHT"), "{top}");
    for b in &topo.backends {
        assert!(top.contains(&format!("{}:80", b.v4)), "{top}");
    }
    assert!(
        top.lines().any(|l| l.starts_with("web ")) && top.lines().any(|l| l.starts_with("app ")),
        "{top}"
    );
    drop(lb);
}
