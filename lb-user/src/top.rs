//! `lb top`: services and backends with rates (packets/s, bits/s, new flows/s, requests/s) and
//! in-flight requests, computed from two `/stats` samples and redrawn in place with ANSI
//! escapes (home + clear), like top(1).
use std::{collections::HashMap, fmt::Write as _, net::SocketAddr, time::Duration};

use hyper::Method;

use crate::control::{
    client::{self, AdminAddr},
    state::{BackendStats, ServiceStats, Stats},
};

/// Samples the daemon at `admin` every `every` and redraws; with `once`, prints one view
/// (plain text, rates over one interval) and returns.
pub async fn run(
    admin: &AdminAddr,
    token: Option<&str>,
    every: Duration,
    once: bool,
) -> anyhow::Result<()> {
    let sample = || async {
        let v = client::call(admin, token, Method::GET, "/stats", None).await?;
        anyhow::Ok((std::time::Instant::now(), serde_json::from_value::<Stats>(v)?))
    };
    let mut prev = sample().await?;
    loop {
        tokio::time::sleep(every).await;
        let cur = sample().await?;
        let view = render(&prev.1, &cur.1, cur.0.duration_since(prev.0).as_secs_f64(), admin);
        if once {
            print!("{view}");
            return Ok(());
        }
        // Home, clear to the end: redraw in place without scrolling.
        print!("\x1b[H\x1b[2J{view}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        prev = cur;
    }
}

/// 1234567 → "1.2M".
fn human(v: f64) -> String {
    let (v, unit) = match v {
        v if v >= 1e9 => (v / 1e9, "G"),
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    if unit.is_empty() { format!("{v:.0}") } else { format!("{v:.1}{unit}") }
}

/// Packets, bytes, flows, requests: the counters rates are taken of.
type Counts = (u64, u64, u64, u64);

/// The view of `cur`, with rates against `prev` taken `secs` earlier.
pub fn render(prev: &Stats, cur: &Stats, secs: f64, admin: &AdminAddr) -> String {
    let secs = secs.max(1e-3);
    let before: HashMap<(&str, Option<SocketAddr>), Counts> = prev
        .services
        .iter()
        .flat_map(|s| {
            std::iter::once(((s.name.as_str(), None), (s.packets, s.bytes, s.flows, total(s))))
                .chain(s.backends.iter().map(move |b| {
                    ((s.name.as_str(), Some(b.addr)), (b.packets, b.bytes, b.flows, b.requests))
                }))
        })
        .collect();
    let rate = |key: (&str, Option<SocketAddr>), now: Counts| {
        let was = before.get(&key).copied().unwrap_or(now);
        let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        (r(now.0, was.0), r(now.1, was.1) * 8.0, r(now.2, was.2), r(now.3, was.3))
    };
    let mut out = String::new();
    let _ = writeln!(out, "lb top  {admin}  rates over {secs:.1}s\n");
    let _ = writeln!(
        out,
        "{:<14} {:<26} {:<9} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "SERVICE", "BACKEND", "STATE", "PPS", "BPS", "FLOWS/S", "REQ/S", "IN-FLIGHT"
    );
    for s in &cur.services {
        let (pps, bps, fps, rps) = rate((&s.name, None), (s.packets, s.bytes, s.flows, total(s)));
        let active: u64 = s.backends.iter().map(|b| b.active).sum();
        let label = if s.vip.is_empty() { format!("({})", s.protocol) } else { s.vip.clone() };
        let _ = writeln!(
            out,
            "{:<14} {:<26} {:<9} {:>8} {:>8} {:>8} {:>8} {:>9}",
            s.name,
            label,
            format!("{}/{} up", up(&s.backends), s.backends.len()),
            human(pps),
            human(bps),
            human(fps),
            human(rps),
            active
        );
        for b in &s.backends {
            let (pps, bps, fps, rps) =
                rate((&s.name, Some(b.addr)), (b.packets, b.bytes, b.flows, b.requests));
            let _ = writeln!(
                out,
                "{:<14} {:<26} {:<9} {:>8} {:>8} {:>8} {:>8} {:>9}",
                "",
                b.addr.to_string(),
                b.state,
                human(pps),
                human(bps),
                human(fps),
                human(rps),
                b.active
            );
        }
    }
    out
}

fn total(s: &ServiceStats) -> u64 {
    s.backends.iter().map(|b| b.requests).sum()
}

fn up(backends: &[BackendStats]) -> usize {
    backends.iter().filter(|b| b.state == "up").count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(packets: u64, flows: u64, requests: u64) -> Stats {
        let b = BackendStats {
            addr: "10.1.0.2:80".parse().unwrap(),
            weight: 1,
            state: "up".into(),
            slots: 0,
            packets,
            bytes: packets * 100,
            flows,
            active: 3,
            requests,
            health: None,
        };
        Stats {
            services: vec![ServiceStats {
                name: "web".into(),
                vip: "10.200.0.1:80".into(),
                protocol: "tcp".into(),
                packets,
                bytes: packets * 100,
                flows,
                backends: vec![b],
            }],
            reasons: vec![],
            l4: vec![],
        }
    }

    #[test]
    fn rates_from_two_samples() {
        let view = render(
            &stats(1000, 10, 0),
            &stats(3000, 30, 500),
            2.0,
            &"127.0.0.1:9901".parse().unwrap(),
        );
        let lines: Vec<&str> = view.lines().collect();
        let svc: Vec<&str> = lines[3].split_whitespace().collect();
        // 2000 packets in 2 s; 200000 bytes = 1.6 Mbit in 2 s; 20 flows; 500 requests.
        assert_eq!(svc, ["web", "10.200.0.1:80", "1/1", "up", "1.0k", "800.0k", "10", "250", "3"]);
        let backend: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(backend, ["10.1.0.2:80", "up", "1.0k", "800.0k", "10", "250", "3"]);
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1_500_000_000.0), "1.5G");
    }
}
