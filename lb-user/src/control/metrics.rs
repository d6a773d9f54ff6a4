//! `GET /metrics`: the Prometheus text format (version 0.0.4) of every counter the daemon
//! has: XDP per-CPU counters summed per service, backend and reason; upstream backends'
//! in-flight requests, responses by class and latency; L7 listeners' requests; health.
use std::{fmt::Write as _, sync::atomic::Ordering};

use super::state::State;
use crate::upstream::stats::{BUCKETS, Snapshot};

/// The content type Prometheus expects.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label values escaped as the format requires.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", esc(v))).collect();
        if l.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {value}", l.join(","));
        }
    }
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], s: &Snapshot) {
        for (le, n) in BUCKETS.iter().zip(s.buckets) {
            let le = le.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, n);
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &l, s.count);
        self.sample(&format!("{name}_sum"), labels, s.sum_seconds);
        self.sample(&format!("{name}_count"), labels, s.count);
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Renders every metric.
pub fn render(state: &State) -> String {
    let mut o = Out(String::new());
    o.head("lb_ready", "gauge", "1 once the config is applied, XDP attached and listeners bound");
    o.sample("lb_ready", &[], u8::from(state.ready.load(Ordering::Relaxed)));

    let stats = state.stats(None).ok();
    let services = stats.as_ref().map(|s| s.services.as_slice()).unwrap_or_default();
    let xdp: Vec<_> = services.iter().filter(|s| s.protocol != "proxy").collect();
    if !xdp.is_empty() {
        for (name, field, help) in [
            ("lb_xdp_service_packets_total", 0, "Packets to the service's VIP"),
            ("lb_xdp_service_bytes_total", 1, "Bytes to the service's VIP"),
            ("lb_xdp_service_flows_total", 2, "New flows to the service"),
        ] {
            o.head(name, "counter", help);
            for s in &xdp {
                let v = [s.packets, s.bytes, s.flows][field];
                o.sample(name, &[("service", &s.name), ("vip", &s.vip)], v);
            }
        }
        for (name, field, help) in [
            ("lb_xdp_backend_packets_total", 0, "Packets forwarded to the backend"),
            ("lb_xdp_backend_bytes_total", 1, "Bytes forwarded to the backend"),
            ("lb_xdp_backend_flows_total", 2, "New flows sent to the backend"),
            ("lb_xdp_backend_slots", 3, "Maglev slots the backend owns (0 when down or draining)"),
        ] {
            o.head(name, if field == 3 { "gauge" } else { "counter" }, help);
            for s in &xdp {
                for b in &s.backends {
                    let v = [b.packets, b.bytes, b.flows, u64::from(b.slots)][field];
                    o.sample(name, &[("service", &s.name), ("backend", &b.addr.to_string())], v);
                }
            }
        }
    }
    if let Some(st) = &stats
        && !st.reasons.is_empty()
    {
        o.head("lb_xdp_packets_total", "counter", "Packets seen by the XDP program, by outcome");
        for (reason, v) in &st.reasons {
            o.sample("lb_xdp_packets_total", &[("reason", reason)], v);
        }
    }

    o.head(
        "lb_backend_up",
        "gauge",
        "1 when the backend takes new flows or requests (up), else 0 (down, ejected, draining)",
    );
    for s in services {
        for b in &s.backends {
            let kind = if s.protocol == "proxy" { "upstream" } else { "xdp" };
            let labels =
                [("service", s.name.as_str()), ("kind", kind), ("backend", &b.addr.to_string())];
            o.sample("lb_backend_up", &labels, u8::from(b.state == "up"));
        }
    }
    o.head("lb_backend_weight", "gauge", "Configured weight of the backend");
    for s in services {
        for b in &s.backends {
            o.sample(
                "lb_backend_weight",
                &[("service", &s.name), ("backend", &b.addr.to_string())],
                b.weight,
            );
        }
    }

    let groups = state.groups.load();
    o.head("lb_upstream_in_flight", "gauge", "Requests in flight to the backend");
    for (g, group) in groups.iter() {
        for b in group.backends().iter() {
            let a = b.addr.to_string();
            o.sample(
                "lb_upstream_in_flight",
                &[("upstream", g), ("backend", &a)],
                b.in_flight.load(Ordering::Relaxed),
            );
        }
    }
    o.head("lb_upstream_responses_total", "counter", "Responses from the backend, by status class");
    for (g, group) in groups.iter() {
        for b in group.backends().iter() {
            let (a, s) = (b.addr.to_string(), b.requests.snapshot());
            for (c, v) in CLASSES.iter().zip(s.classes) {
                o.sample(
                    "lb_upstream_responses_total",
                    &[("upstream", g), ("backend", &a), ("class", c)],
                    v,
                );
            }
        }
    }
    o.head(
        "lb_upstream_failures_total",
        "counter",
        "Requests the backend did not answer (connect error, reset, timeout)",
    );
    for (g, group) in groups.iter() {
        for b in group.backends().iter() {
            let (a, s) = (b.addr.to_string(), b.requests.snapshot());
            o.sample("lb_upstream_failures_total", &[("upstream", g), ("backend", &a)], s.failures);
        }
    }
    o.head(
        "lb_upstream_response_seconds",
        "histogram",
        "Time from sending the request to the backend's response headers",
    );
    for (g, group) in groups.iter() {
        for b in group.backends().iter() {
            let (a, s) = (b.addr.to_string(), b.requests.snapshot());
            o.histogram("lb_upstream_response_seconds", &[("upstream", g), ("backend", &a)], &s);
        }
    }

    let listeners = crate::upstream::stats::listeners();
    let running: Vec<String> =
        state.config.load().http.listener.iter().map(|l| l.name.clone()).collect();
    let listeners: Vec<_> = listeners.into_iter().filter(|(n, _)| running.contains(n)).collect();
    o.head("lb_http_requests_total", "counter", "Requests answered by the L7 listener");
    for (n, s) in &listeners {
        o.sample("lb_http_requests_total", &[("listener", n)], s.count);
    }
    o.head("lb_http_responses_total", "counter", "Responses of the L7 listener, by status class");
    for (n, s) in &listeners {
        for (c, v) in CLASSES.iter().zip(s.classes) {
            o.sample("lb_http_responses_total", &[("listener", n), ("class", c)], v);
        }
    }
    o.head(
        "lb_http_request_seconds",
        "histogram",
        "Time from a request's arrival to its response headers",
    );
    for (n, s) in &listeners {
        o.histogram("lb_http_request_seconds", &[("listener", n)], s);
    }

    l4(&mut o, state);

    let health = state.health.all();
    o.head("lb_health_up", "gauge", "What the health checks decided: 1 up, 0 down");
    for (n, a, h) in &health {
        o.sample("lb_health_up", &[("service", n), ("backend", &a.to_string())], u8::from(h.up));
    }
    o.head("lb_health_checks_total", "counter", "Health checks run");
    for (n, a, h) in &health {
        o.sample(
            "lb_health_checks_total",
            &[("service", n), ("backend", &a.to_string())],
            h.checks,
        );
    }
    o.head("lb_health_changes_total", "counter", "Times the health state changed");
    for (n, a, h) in &health {
        o.sample(
            "lb_health_changes_total",
            &[("service", n), ("backend", &a.to_string())],
            h.changes,
        );
    }
    let sources = state.discovery.statuses();
    o.head(
        "lb_backends_from_synced",
        "gauge",
        "backends_from: 1 while the set is the API's latest, 0 while stale (the last set serves)",
    );
    for src in &sources {
        let synced = u8::from(src.state == crate::discovery::SourceState::Synced);
        o.sample("lb_backends_from_synced", &[("service", &src.service)], synced);
    }
    o.0
}

/// The userspace L4 listeners (`[[tcp.listener]]`): each metric is one snapshot counter, some
/// split by a label (direction).
fn l4(o: &mut Out, state: &State) {
    let config = state.config.load();
    let names: Vec<&str> = config.tcp.listeners.iter().map(|l| l.name.as_str()).collect();
    let listeners = crate::l4::stats::registered(&names);
    if listeners.is_empty() {
        return;
    }
    type Series = (&'static str, Option<(&'static str, &'static str)>);
    let metrics: [(&str, &str, &str, &[Series]); 10] = [
        ("lb_l4_connections_total", "counter", "TCP connections accepted", &[("accepted", None)]),
        ("lb_l4_active_connections", "gauge", "TCP connections being served", &[("active", None)]),
        (
            "lb_l4_relayed_total",
            "counter",
            "TCP connections relayed to a backend",
            &[("relayed", None)],
        ),
        (
            "lb_l4_handed_off_total",
            "counter",
            "TLS connections handed to an L7 listener",
            &[("handed_off", None)],
        ),
        (
            "lb_l4_sni_routed_total",
            "counter",
            "TLS connections whose SNI matched a route",
            &[("sni_routed", None)],
        ),
        (
            "lb_l4_connect_failures_total",
            "counter",
            "Backend connects that failed (each attempt)",
            &[("connect_failures", None)],
        ),
        (
            "lb_l4_connect_retries_total",
            "counter",
            "Connects to another backend after a failed one",
            &[("connect_retries", None)],
        ),
        (
            "lb_l4_bytes_total",
            "counter",
            "Bytes relayed, by direction",
            &[
                ("bytes_to_backend", Some(("direction", "to_backend"))),
                ("bytes_to_client", Some(("direction", "to_client"))),
            ],
        ),
        (
            "lb_l4_udp_sessions_total",
            "counter",
            "UDP sessions, by event",
            &[
                ("udp_sessions_created", Some(("event", "created"))),
                ("udp_sessions_expired", Some(("event", "expired"))),
            ],
        ),
        (
            "lb_l4_datagrams_total",
            "counter",
            "UDP datagrams relayed, by direction",
            &[
                ("datagrams_to_backend", Some(("direction", "to_backend"))),
                ("datagrams_to_client", Some(("direction", "to_client"))),
            ],
        ),
    ];
    for (name, kind, help, series) in metrics {
        o.head(name, kind, help);
        for l in &listeners {
            for (key, label) in series {
                let v = l.counters.get(*key).copied().unwrap_or_default();
                let mut labels = vec![("listener", l.name.as_str())];
                labels.extend(label);
                o.sample(name, &labels, v);
            }
        }
    }
    o.head("lb_l4_udp_active_sessions", "gauge", "UDP sessions open");
    for l in &listeners {
        let v = l.counters.get("udp_sessions_active").copied().unwrap_or_default();
        o.sample("lb_l4_udp_active_sessions", &[("listener", &l.name)], v);
    }
    o.head(
        "lb_l4_errors_total",
        "counter",
        "Connections or datagrams closed or dropped, by reason",
    );
    for l in &listeners {
        for (kind, v) in &l.errors {
            o.sample("lb_l4_errors_total", &[("listener", &l.name), ("kind", kind)], v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn renders_groups_listeners_and_health() {
        let config = Config::parse(
            "[[http.listener]]\nname = \"metrics-test\"\nlisten = \"127.0.0.1:0\"\n[[http.route]]\nlistener = \"metrics-test\"\nupstream = \"api\"\n[upstream.api]\nbackends = [\"10.0.0.1:80\"]\n",
        )
        .unwrap();
        let groups = crate::upstream::groups(&config.upstream);
        let b = groups["api"].backends()[0].clone();
        b.requests.record(200, std::time::Duration::from_millis(2));
        b.requests.record(502, std::time::Duration::from_millis(20));
        crate::upstream::stats::listener("metrics-test")
            .record(200, std::time::Duration::from_millis(3));
        let state = State::new(config, None, groups, None);
        let text = render(&state);
        assert!(text.contains("lb_ready 0\n"), "{text}");
        assert!(text.contains("lb_upstream_responses_total{upstream=\"api\",backend=\"10.0.0.1:80\",class=\"2xx\"} 1\n"), "{text}");
        assert!(text.contains("lb_upstream_responses_total{upstream=\"api\",backend=\"10.0.0.1:80\",class=\"5xx\"} 1\n"), "{text}");
        assert!(text.contains("lb_upstream_response_seconds_bucket{upstream=\"api\",backend=\"10.0.0.1:80\",le=\"0.005\"} 1\n"), "{text}");
        assert!(
            text.contains(
                "lb_upstream_response_seconds_count{upstream=\"api\",backend=\"10.0.0.1:80\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("lb_http_requests_total{listener=\"metrics-test\"} 1\n"), "{text}");
        assert!(
            text.contains(
                "lb_backend_up{service=\"api\",kind=\"upstream\",backend=\"10.0.0.1:80\"} 1\n"
            ),
            "{text}"
        );
        // Every sample line is NAME{labels} VALUE or NAME VALUE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn renders_l4_listener_counters() {
        let config = Config::parse(
            "[[tcp.listener]]\nname = \"metrics-l4\"\nlisten = \"127.0.0.1:0\"\nupstream = \"db\"\n[upstream.db]\nbackends = [\"10.0.0.1:5432\"]\n",
        )
        .unwrap();
        let groups = crate::upstream::groups(&config.upstream);
        let l4 = crate::l4::L4::build(&config.tcp, &groups, &Default::default()).unwrap();
        let s = l4.stats()[0].clone();
        s.accepted.fetch_add(3, Ordering::Relaxed);
        s.bytes_to_client.fetch_add(1234, Ordering::Relaxed);
        s.connect_retries.fetch_add(1, Ordering::Relaxed);
        s.error(crate::l4::ErrorKind::ConnectFailed);
        let state = State::new(config, None, groups, None);
        let text = render(&state);
        for want in [
            "lb_l4_connections_total{listener=\"metrics-l4\"} 3\n",
            "lb_l4_bytes_total{listener=\"metrics-l4\",direction=\"to_client\"} 1234\n",
            "lb_l4_connect_retries_total{listener=\"metrics-l4\"} 1\n",
            "lb_l4_errors_total{listener=\"metrics-l4\",kind=\"connect_failed\"} 1\n",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        // And in the JSON of /stats.
        let stats = state.stats(None).unwrap();
        assert_eq!(stats.l4.len(), 1);
        assert_eq!(stats.l4[0].counters["accepted"], 3);
        assert_eq!(stats.l4[0].errors["connect_failed"], 1);
    }
}
