//! The load generators and peer servers the benchmarks drive: wrk, iperf3, nginx backends.
use anyhow::{Context as _, bail};
use lb_tests::netns::Netns;

/// One wrk run's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
    /// Requests completed in the run.
    pub requests: u64,
}

/// Runs wrk from `ns` against `url` with `conns` connections for `secs` seconds.
pub fn wrk(ns: &Netns, url: &str, conns: u32, secs: u32, close: bool) -> anyhow::Result<Wrk> {
    let (c, d) = (conns.to_string(), format!("{secs}s"));
    let mut args = vec!["wrk", "-t1", "-c", &c, "-d", &d, "--latency", "--timeout", "2s"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = ns.exec_output(&args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    if std::env::var_os("LB_BENCH_DEBUG").is_some() {
        eprintln!("{text}");
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some((n, _)) = t.split_once(" requests in ") {
            w.requests = n.trim().parse().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().ok()?;
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = duration_ms(v.trim())?;
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = duration_ms(v.trim())?;
        } else if t.starts_with("Socket errors:") {
            w.errors += t
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    (w.rps > 0.0).then_some(w)
}

fn duration_ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        _ => return None,
    })
}

/// One h2load run's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2load {
    pub rps: f64,
    /// Mean time per request.
    pub mean_ms: f64,
    pub errors: u64,
    pub requests: u64,
}

/// Runs h2load from `ns` against `url` (`http://` means h2c with prior knowledge) with `conns`
/// connections of `streams` concurrent streams each, for `secs` seconds.
pub fn h2load(
    ns: &Netns,
    url: &str,
    conns: u32,
    streams: u32,
    secs: u32,
) -> anyhow::Result<H2load> {
    let (c, m, d) = (conns.to_string(), streams.to_string(), format!("{secs}s"));
    let out = ns.exec_output(&["h2load", "-t1", "-c", &c, "-m", &m, "-D", &d, url])?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text).with_context(|| {
        format!("unexpected h2load output:\n{text}{}", String::from_utf8_lossy(&out.stderr))
    })
}

fn parse_h2load(text: &str) -> Option<H2load> {
    let mut h = H2load::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("finished in ") {
            // "finished in 3.00s, 33333.33 req/s, 1.2MB/s"
            h.rps = v.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok()?;
        } else if let Some(v) = t.strip_prefix("requests: ") {
            // "N total, N started, N done, N succeeded, N failed, N errored, N timeout"
            for part in v.split(", ") {
                let (n, what) = part.split_once(' ')?;
                let n: u64 = n.parse().ok()?;
                match what {
                    "succeeded" => h.requests = n,
                    // "errored" and "timeout" are parts of "failed" (which adds non-2xx/3xx).
                    "failed" => h.errors = n,
                    _ => {}
                }
            }
        } else if let Some(v) = t.strip_prefix("time for request:") {
            // "min max mean sd +/- sd", each with its unit.
            h.mean_ms = duration_ms(v.split_whitespace().nth(2)?)?;
        }
    }
    (h.rps > 0.0).then_some(h)
}

/// Bulk TCP throughput in Gbit/s from `ns` to `host:port` (one stream) for `secs` seconds.
pub fn iperf(ns: &Netns, host: &str, port: u16, secs: u32) -> anyhow::Result<f64> {
    iperf_dir(ns, host, port, secs, false)
}

/// [`iperf`] in either direction: `download` (`-R`) has the server send, as a web backend's
/// responses do, which is the traffic DSR keeps off the balancer.
pub fn iperf_dir(
    ns: &Netns,
    host: &str,
    port: u16,
    secs: u32,
    download: bool,
) -> anyhow::Result<f64> {
    let (port, secs) = (port.to_string(), secs.to_string());
    let mut args = vec!["iperf3", "-c", host, "-p", &port, "-t", &secs, "-J"];
    if download {
        args.push("-R");
    }
    let out = ns.exec_output(&args)?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 failed: {}", v["error"]))
}

/// Starts nginx (answering 200 with `body`) and an iperf3 server inside a backend namespace.
/// Both die with the namespace.
pub fn start_backend(ns: &Netns, body: &str) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("{}-nginx", ns.name));
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 16384; }}\n\
         http {{ access_log off; keepalive_requests 1000000;\n\
           server {{ listen 80 backlog=4096; listen [::]:80 backlog=4096;\n\
             location / {{ return 200 \"{body}\\n\"; }} }} }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    ns.exec(&["nginx", "-c", path.to_str().context("path")?, "-e", &format!("{d}/error.log")])?;
    ns.exec(&["iperf3", "-s", "-D", "-p", "5201"])?;
    Ok(())
}
