//! L7 HTTP proxies side by side over the same three nginx backends and the same client:
//! `lb`'s L7 proxy, nginx (proxy_pass, upstream keepalive), HAProxy (HTTP mode, http-reuse) and
//! Pingora (when built). Each round runs every contender once, alternating, each on a fresh
//! topology; the report gives medians and `lb ÷ peer` ratios.
//!
//! `l7`: keep-alive and Connection: close req/s with latency (wrk), h2c req/s (h2load), TLS
//! full handshakes/s, CPU seconds per 100k requests of the balancer alone, and memory with 10k
//! idle keep-alive connections. `l7-scale`: keep-alive req/s against concurrent connections.
use std::{collections::BTreeMap, net::SocketAddr};

use lb_tests::topology::Topology;

use super::{
    clients, median,
    peers::{self, ADDR, Certs, H2C, Kind, PLAIN, TLS},
    plot::{self, Layout, Series, Spec},
    procs::Mem,
    progress,
    tools::{h2load, start_backend, wrk},
};

/// The `l7` throughput bars, as drawn: one group per load, one bar per proxy.
pub const THROUGHPUT: Spec = Spec {
    name: "l7-throughput",
    alt: "L7 throughput by load",
    title: "L7 proxies: requests (or handshakes) per second",
    y_label: "per second",
    layout: Layout::Bars {
        row_header: "proxy",
        groups: &[
            ("keep-alive", "keep-alive req/s"),
            ("Connection: close", "close req/s"),
            ("h2c", "h2c req/s"),
            ("h2 over TLS", "h2 TLS req/s"),
            ("TLS handshakes", "TLS handshakes/s"),
        ],
    },
};
/// `l7-scale` req/s against concurrent connections, as drawn.
pub const SCALE_RPS: Spec = Spec {
    name: "l7-scale-rps",
    alt: "L7 keep-alive req/s against concurrent connections",
    title: "L7 keep-alive requests/s vs concurrent connections",
    y_label: "requests/s",
    layout: Layout::Lines { x_label: "concurrent connections (log)", x_column: "connections" },
};
/// `l7-scale` p99 latency against concurrent connections, as drawn.
pub const SCALE_P99: Spec = Spec {
    name: "l7-scale-p99",
    alt: "L7 keep-alive p99 against concurrent connections",
    title: "L7 keep-alive p99 latency vs concurrent connections",
    y_label: "p99 ms",
    layout: Layout::Lines { x_label: "concurrent connections (log)", x_column: "connections" },
};

const IDLE: usize = 10_000;
const CONNS: u32 = 50;

#[derive(Default)]
struct Samples {
    ka: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    close: Vec<f64>,
    close_p99: Vec<f64>,
    h2: Vec<f64>,
    h2_mean: Vec<f64>,
    h2tls: Vec<f64>,
    tls: Vec<f64>,
    cpu_ka: Vec<f64>,
    cpu_close: Vec<f64>,
    rss_base: Vec<f64>,
    rss_idle: Vec<f64>,
    per_conn: Vec<f64>,
    hwm: Vec<f64>,
    idle_open: Vec<f64>,
    errors: u64,
}

/// Three backends with nginx, and a client that may open many connections: every port, and
/// TIME_WAIT reuse (the client opens connections by the hundred thousand).
fn fresh() -> anyhow::Result<Topology> {
    let topo = Topology::new(3)?;
    for (i, b) in topo.backends.iter().enumerate() {
        start_backend(&b.ns, &format!("backend-{}", i + 1))?;
    }
    topo.client.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    topo.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(topo)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    let certs = Certs::new()?;
    let kinds = Kind::all();
    let mut results: BTreeMap<Kind, Samples> = BTreeMap::new();
    let plain = format!("http://{ADDR}:{PLAIN}/");
    let tls_addr: SocketAddr = format!("{ADDR}:{TLS}").parse()?;
    for round in 1..=rounds {
        for &kind in &kinds {
            let step = |what: &str| {
                progress(&format!("l7 round {round}/{rounds}: {}: {what}", kind.name()))
            };
            step("start");
            let topo = fresh()?;
            let peer = peers::start(&topo, kind, &certs)?;
            let tree = peer.tree;
            let s = results.entry(kind).or_default();
            let _ = wrk(&topo.client, &plain, 10, 1, false);

            step(&format!("{IDLE} idle keep-alive connections"));
            let base: Mem = tree.mem();
            let idle =
                clients::idle_connections(&topo.client, format!("{ADDR}:{PLAIN}").parse()?, IDLE)?;
            std::thread::sleep(std::time::Duration::from_secs(1));
            let held: Mem = tree.mem();
            s.idle_open.push(idle.0.len() as f64);
            drop(idle);
            s.rss_base.push(mib(base.rss_kib));
            s.rss_idle.push(mib(held.rss_kib));
            s.per_conn.push((held.rss_kib as f64 - base.rss_kib as f64) / IDLE as f64);
            std::thread::sleep(std::time::Duration::from_millis(500));

            step("wrk keep-alive");
            let cpu = tree.cpu_secs();
            let ka = wrk(&topo.client, &plain, CONNS, secs, false)?;
            s.cpu_ka.push((tree.cpu_secs() - cpu) / ka.requests.max(1) as f64 * 1e5);
            s.ka.push(ka.rps);
            s.p50.push(ka.p50_ms);
            s.p99.push(ka.p99_ms);

            step("wrk Connection: close");
            let cpu = tree.cpu_secs();
            let close = wrk(&topo.client, &plain, CONNS, secs, true)?;
            s.cpu_close.push((tree.cpu_secs() - cpu) / close.requests.max(1) as f64 * 1e5);
            s.close.push(close.rps);
            s.close_p99.push(close.p99_ms);

            step("h2load h2c");
            let h2 = h2load(&topo.client, &format!("http://{ADDR}:{H2C}/"), CONNS, 10, secs)?;
            s.h2.push(h2.rps);
            s.h2_mean.push(h2.mean_ms);

            step("h2load h2 over TLS");
            let h2tls = h2load(&topo.client, &format!("https://{ADDR}:{TLS}/"), CONNS, 10, secs)?;
            s.h2tls.push(h2tls.rps);

            step("TLS handshakes");
            let (tls, tls_failed) =
                clients::tls_connections(&topo.client, tls_addr, &certs.der, CONNS as usize, secs)?;
            s.tls.push(tls);
            s.hwm.push(mib(tree.mem().hwm_kib));
            s.errors += ka.errors + close.errors + h2.errors + h2tls.errors + tls_failed;
            drop(peer);
        }
    }
    println!("{}", report(&results, rounds, secs)?);
    Ok(())
}

fn med(v: &[f64]) -> f64 {
    median(&mut v.to_vec())
}

fn report(r: &BTreeMap<Kind, Samples>, rounds: usize, secs: u32) -> anyhow::Result<String> {
    let mut md = String::from(
        "| proxy (2 worker threads each) | keep-alive req/s | p50 ms | p99 ms | Connection: close req/s | close p99 ms | h2c req/s (h2load) | h2c mean ms | h2 over TLS req/s | TLS handshakes/s | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (k, s) in r {
        md += &format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {} |\n",
            k.name(),
            med(&s.ka),
            med(&s.p50),
            med(&s.p99),
            med(&s.close),
            med(&s.close_p99),
            med(&s.h2),
            med(&s.h2_mean),
            med(&s.h2tls),
            med(&s.tls),
            s.errors
        );
    }
    md += "\n| proxy | CPU s / 100k req (keep-alive) | CPU s / 100k req (close) | RSS before MiB | RSS with 10k idle MiB | KiB per idle conn | idle conns held | peak RSS (VmHWM) MiB |\n\
           | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for (k, s) in r {
        md += &format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |\n",
            k.name(),
            med(&s.cpu_ka),
            med(&s.cpu_close),
            med(&s.rss_base),
            med(&s.rss_idle),
            med(&s.per_conn),
            med(&s.idle_open),
            med(&s.hwm)
        );
    }
    let Some(lb) = r.get(&Kind::Lb) else { return Ok(md) };
    md += "\n| `lb` ÷ peer (medians) | keep-alive req/s | p99 | close req/s | h2c req/s | h2 TLS req/s | TLS handshakes/s | CPU / 100k (keep-alive) | RSS with 10k idle |\n\
           | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    for (k, p) in r.iter().filter(|(k, _)| **k != Kind::Lb) {
        let q = |f: fn(&Samples) -> &Vec<f64>| med(f(lb)) / med(f(p));
        md += &format!(
            "| ÷ {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            k.name(),
            q(|s| &s.ka),
            q(|s| &s.p99),
            q(|s| &s.close),
            q(|s| &s.h2),
            q(|s| &s.h2tls),
            q(|s| &s.tls),
            q(|s| &s.cpu_ka),
            q(|s| &s.rss_idle)
        );
    }
    md += &targets(r, lb);
    let series: Vec<Series> = r
        .iter()
        .map(|(k, s)| Series {
            name: k.name().into(),
            points: [&s.ka, &s.close, &s.h2, &s.h2tls, &s.tls]
                .iter()
                .enumerate()
                .map(|(i, v)| (i as f64, med(v)))
                .collect(),
        })
        .collect();
    md += "\n";
    md += &plot::save(&THROUGHPUT, &series)?;
    md += &format!(
        "\n{rounds} round(s) of {secs} s per measurement, contenders alternating within a round, each on a \
         freshly built topology: client namespace → balancer namespace ({ADDR}) → 3 nginx backends \
         (1 worker each; 2 cores shared by client, balancer and backends). wrk -t1 -c{CONNS} \
         (`--latency`); h2load -t1 -c{CONNS} -m10 over h2c with prior knowledge and over TLS (ALPN \
         h2, one handshake per connection); TLS handshakes: {CONNS} \
         concurrent rustls clients (2 threads) each doing a full TLS 1.3 handshake (ECDSA P-256 \
         self-signed certificate, no resumption), one GET with `Connection: close`, then the next. \
         Each balancer gets 2 worker threads (`lb`: `TOKIO_WORKER_THREADS=2`, nginx \
         `worker_processes 2`, HAProxy `nbthread 2`, Pingora `threads: 2`), listen backlog 1024 \
         (lb's, tokio's default; Pingora keeps its own), upstream keep-alive (lb pool_max_idle \
         64, nginx `keepalive 64`, HAProxy `http-reuse always`, Pingora's pool). CPU: user + \
         system seconds of the balancer's processes (/proc/PID/stat) over the wrk run, per 100k \
         requests. Memory: VmRSS of the balancer's processes after warm-up, then with {IDLE} \
         idle keep-alive connections (one request done on each); peak = VmHWM at the end. The \
         open-file limit is 20,000 for every process here.\n"
    );
    Ok(md)
}

/// The targets (issue 11), stated against this run's medians.
fn targets(r: &BTreeMap<Kind, Samples>, lb: &Samples) -> String {
    let yes = |ok: bool| if ok { "met" } else { "not met" };
    let mut md = String::from("\nTargets (issue 11):\n\n");
    let peers: Vec<(&Kind, &Samples)> =
        [Kind::Nginx, Kind::Haproxy].iter().filter_map(|k| r.get(k).map(|s| (k, s))).collect();
    let best = |f: fn(&Samples) -> f64, higher: bool| {
        peers.iter().copied().max_by(|a, b| {
            let o = f(a.1).total_cmp(&f(b.1));
            if higher { o } else { o.reverse() }
        })
    };
    if let Some((k, s)) = best(|s| med(&s.ka), true) {
        let ratio = med(&lb.ka) / med(&s.ka);
        let p99_ok = med(&lb.p99) <= med(&s.p99);
        md += &format!(
            "- keep-alive req/s ≥ 1.1 × the better of nginx and HAProxy ({}) at equal or lower p99: \
             {ratio:.2}×, p99 {:.2} ms vs {:.2} ms — {}\n",
            k.name(),
            med(&lb.p99),
            med(&s.p99),
            yes(ratio >= 1.1 && p99_ok)
        );
    }
    if let Some((k, s)) = best(|s| med(&s.cpu_ka), false) {
        let ratio = med(&lb.cpu_ka) / med(&s.cpu_ka);
        md += &format!(
            "- CPU s per 100k keep-alive requests ≤ 0.75 × the better of nginx and HAProxy ({}): \
             {ratio:.2}× — {}\n",
            k.name(),
            yes(ratio <= 0.75)
        );
    }
    if let Some((k, s)) = best(|s| med(&s.close), true) {
        let ratio = med(&lb.close) / med(&s.close);
        md += &format!(
            "- Connection: close req/s ≥ 1.0 × the better ({}): {ratio:.2}× — {}\n",
            k.name(),
            yes(ratio >= 1.0)
        );
    }
    if let Some(n) = r.get(&Kind::Nginx) {
        let rss = med(&lb.rss_idle) / med(&n.rss_idle);
        md += &format!(
            "- RSS with {IDLE} idle keep-alive connections ≤ 0.8 × nginx's: {rss:.2}× — {}\n",
            yes(rss <= 0.8)
        );
    }
    if let Some(b) = r.get(&Kind::LbBefore) {
        let h2 = med(&lb.h2) / med(&b.h2);
        let h2tls = med(&lb.h2tls) / med(&b.h2tls);
        md += &format!(
            "- h2c and h2-over-TLS req/s no lower than before this change: {h2:.2}× and \
             {h2tls:.2}× the baseline build — {}\n",
            yes(h2 >= 1.0 && h2tls >= 1.0)
        );
    }
    md
}

/// `l7-scale`: keep-alive req/s and p99 against the number of concurrent connections.
pub fn scale(quick: bool) -> anyhow::Result<()> {
    let (rounds, secs): (usize, u32) = if quick { (1, 2) } else { (3, 5) };
    let points: &[u32] =
        if quick { &[10, 1_000, 10_000] } else { &[10, 100, 300, 1_000, 3_000, 10_000] };
    let certs = Certs::new()?;
    let kinds = Kind::all();
    let plain = format!("http://{ADDR}:{PLAIN}/");
    // (kind, connections) → (req/s, p99 ms) samples, and errors per kind.
    let mut rps: BTreeMap<(Kind, u32), Vec<f64>> = BTreeMap::new();
    let mut p99: BTreeMap<(Kind, u32), Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<(Kind, u32), u64> = BTreeMap::new();
    for round in 1..=rounds {
        for &kind in &kinds {
            let topo = fresh()?;
            let _peer = peers::start(&topo, kind, &certs)?;
            let _ = wrk(&topo.client, &plain, 10, 1, false);
            for &c in points {
                progress(&format!(
                    "l7-scale round {round}/{rounds}: {}: {c} connections",
                    kind.name()
                ));
                // Opening thousands of connections takes part of the run: longer runs there.
                let d = if c >= 1_000 { secs * 2 } else { secs };
                let w = wrk(&topo.client, &plain, c, d, false)?;
                rps.entry((kind, c)).or_default().push(w.rps);
                p99.entry((kind, c)).or_default().push(w.p99_ms);
                *errors.entry((kind, c)).or_default() += w.errors;
            }
        }
    }
    let mut md = String::from("| connections |");
    for k in &kinds {
        md += &format!(" {} req/s | p99 ms | errors |", k.name());
    }
    md += "\n| ---: |";
    md += &" ---: | ---: | ---: |".repeat(kinds.len());
    md.push('\n');
    for &c in points {
        md += &format!("| {c} |");
        for &k in &kinds {
            md += &format!(
                " {:.0} | {:.1} | {} |",
                med(&rps[&(k, c)]),
                med(&p99[&(k, c)]),
                errors[&(k, c)]
            );
        }
        md.push('\n');
    }
    let curve = |m: &BTreeMap<(Kind, u32), Vec<f64>>| -> Vec<Series> {
        kinds
            .iter()
            .map(|&k| Series {
                name: k.name().into(),
                points: points.iter().map(|&c| (c as f64, med(&m[&(k, c)]))).collect(),
            })
            .collect()
    };
    let (r, p) = (curve(&rps), curve(&p99));
    md += "\n";
    md += &plot::save(&SCALE_RPS, &r)?;
    md += &plot::save(&SCALE_P99, &p)?;
    md += &format!(
        "\nwrk -t1 -cN keep-alive for {secs} s per point ({} s from 1,000 connections: wrk opens \
         them within the run), {rounds} round(s), contenders alternating, \
         each on a fresh topology with the `l7` section's configuration (3 nginx backends, 2 \
         worker threads per balancer). Errors are wrk's socket errors and non-2xx responses; a request slower than 2 s counts as a timeout \
         error (at 10,000 connections the errors checked were all such timeouts). \
         At 10,000 connections a proxy may need up to 10,000 backend connections too, against \
         an open-file limit of 20,000 per process.\n",
        secs * 2
    );
    Ok(md).map(|md: String| println!("{md}"))
}
