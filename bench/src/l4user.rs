//! Userspace L4 side by side: `lb`'s `[[tcp.listener]]` (a plain relay, and TLS passthrough
//! routed by SNI) against HAProxy 2.6 in TCP mode (plain, and routed by `req.ssl_sni`) and nginx
//! `stream` (plain, and `ssl_preread` with a `map`). Every contender listens in the balancer
//! namespace on VIP4, runs two threads (or workers) and forwards to the same three backends;
//! contenders alternate within a round, each on a fresh topology.
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{
    lb::Lb,
    netns::Netns,
    topology::{Topology, VIP4},
};

use super::{
    l4::fresh,
    median, progress,
    tools::{Wrk, iperf, wrk},
};

/// The name the TLS contenders route, as the client sends it in SNI.
const HOST: &str = "bench.example";
/// The body the TLS bulk measurement fetches, in bytes.
const BIG: usize = 1 << 20;
/// Closed loops of the connect-to-first-byte probe.
const PROBE_LOOPS: usize = 8;
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Haproxy,
    Nginx,
    Lb,
}

struct Contender {
    name: &'static str,
    peer: Peer,
    /// TLS passthrough routed by SNI (port 443) rather than a plain relay (ports 80 and 5201).
    sni: bool,
    /// lb's `relay` (empty for the peers).
    relay: &'static str,
}

const fn peer(name: &'static str, peer: Peer, sni: bool) -> Contender {
    Contender { name, peer, sni, relay: "" }
}

const fn lb(name: &'static str, sni: bool, relay: &'static str) -> Contender {
    Contender { name, peer: Peer::Lb, sni, relay }
}

const CONTENDERS: [Contender; 8] = [
    peer("HAProxy 2.6 mode tcp", Peer::Haproxy, false),
    peer("nginx 1.22 stream", Peer::Nginx, false),
    lb("lb `[[tcp.listener]]` relay = kernel", false, "kernel"),
    lb("lb `[[tcp.listener]]` relay = splice", false, "splice"),
    peer("HAProxy 2.6 `req.ssl_sni` → use_backend", Peer::Haproxy, true),
    peer("nginx 1.22 stream `ssl_preread` + map", Peer::Nginx, true),
    lb("lb `[[tcp.listener]]` sni passthrough, relay = kernel", true, "kernel"),
    lb("lb `[[tcp.listener]]` sni passthrough, relay = splice", true, "splice"),
];

/// How HAProxy and nginx spread the web and TLS ports. By default as `lb`'s L4 proxy does, by
/// client address (HAProxy `balance source`, nginx `hash $remote_addr`): `lb` has no
/// per-connection policy, so with one benchmark client every contender then loads one backend
/// and the ratios compare the proxies, not how many backends share the 2 cores (which moved the
/// TLS connections/s ratio by 3× in trial runs). `LB_BENCH_PEER_BALANCE=roundrobin` spreads the
/// peers' connections instead.
fn peers_hash_source() -> bool {
    !std::env::var("LB_BENCH_PEER_BALANCE").is_ok_and(|v| v == "roundrobin")
}

#[derive(Default)]
struct Samples {
    close: Vec<f64>,
    keepalive: Vec<f64>,
    close_p99: Vec<f64>,
    first_p99: Vec<f64>,
    gbps: Vec<f64>,
    errors: u64,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new(STREAM_MODULE).exists(),
        "{STREAM_MODULE} missing: install libnginx-mod-stream (cargo xtask bench does)"
    );
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    let tls = TlsFiles::new()?;
    let mut results: BTreeMap<usize, Samples> = BTreeMap::new();
    for round in 1..=rounds {
        for (i, c) in CONTENDERS.iter().enumerate() {
            if let Ok(only) = std::env::var("LB_BENCH_ONLY")
                && only.parse() != Ok(i)
            {
                continue;
            }
            progress(&format!("l4user round {round}/{rounds}: {}", c.name));
            let s = results.entry(i).or_default();
            measure(c, &tls, secs, s).with_context(|| c.name)?;
        }
    }
    let balance = if peers_hash_source() {
        "every contender keeps the one client on one backend (HAProxy `balance source`, nginx \
         `hash $remote_addr`, lb's Maglev table over the client address, the only policy of its \
         L4 proxy), so each proxy feeds the same single backend; \
         `LB_BENCH_PEER_BALANCE=roundrobin` spreads the peers over all three instead"
    } else {
        "HAProxy and nginx round-robin the web and TLS ports over the three backends \
         (`LB_BENCH_PEER_BALANCE=roundrobin`), while lb picks by client address (its only L4 \
         policy), so lb sends the one benchmark client to one backend"
    };
    println!(
        "Plain TCP relay: client → proxy on {VIP4}:80 and :5201 → three nginx/iperf3 backends.\n\n{}\n\
         TLS passthrough routed by SNI: the client sends SNI `{HOST}` to {VIP4}:443; the proxy \
         reads the ClientHello, picks the route and relays the handshake to three nginx backends \
         that terminate TLS (self-signed ECDSA P-256 certificate from rcgen; TLS 1.3 with wrk's \
         OpenSSL). Bulk here is wrk keep-alive over TLS fetching a 1 MiB body with 8 \
         connections.\n\n{}\n\
         {rounds} round(s) of {secs} s per measurement, contenders alternating within a round, each \
         on a fresh topology. Every proxy has two threads on the 2 cores that the client, the \
         backends and the proxy share (HAProxy `nbthread 2` with `option splice-auto`; nginx \
         `worker_processes 2` with `reuseport`; lb's tokio runtime with 2 workers, splice(2) on). \
         wrk -t1 -c50 from one client address: connections/s with `Connection: close` (each \
         request a new TCP connection, or a full TLS handshake), keep-alive req/s, and wrk's p99 \
         of the close run (request written to response read, after connect and handshake). \
         Connect-to-first-byte is timed separately by {PROBE_LOOPS} closed loops for {secs} s: \
         from connect(2) to the first byte of the answer (the HTTP status line, or the backend's \
         ServerHello). Bulk for the plain relay is iperf3, one stream for {secs} s. Balancing: \
         {balance}; the bulk port keeps the client on one backend everywhere (iperf3's two \
         connections must meet). Target (issue 5): lb ≥ 1.2× HAProxy on connections/s and \
         throughput.\n",
        table(&results, false, "bulk Gbit/s (iperf3, 1 stream)"),
        table(&results, true, "bulk Gbit/s (TLS, 1 MiB bodies)"),
    );
    Ok(())
}

/// One contender on a fresh topology: set up, warm up, measure, tear down.
fn measure(c: &Contender, tls: &TlsFiles, secs: u32, s: &mut Samples) -> anyhow::Result<()> {
    let topo = &fresh(3)?;
    for (i, b) in topo.backends.iter().enumerate() {
        start_tls_backend(&b.ns, tls, &format!("backend-{}", i + 1))?;
    }
    topo.lb.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
    let _hosts = Hosts::new(&topo.client)?;
    let lbd = start(topo, c)?;
    let client = &topo.client;
    let (url, port, hello) = if c.sni {
        (format!("https://{HOST}/"), 443, tls.hello.clone())
    } else {
        (
            format!("http://{VIP4}/"),
            80,
            Arc::new(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n").into_bytes()),
        )
    };
    // Warm up (neighbour entries, first connections, the proxies' workers), then measure.
    let _ = wrk(client, &url, 10, 1, false);
    let ka: Wrk = wrk(client, &url, 50, secs, false)?;
    let close: Wrk = wrk(client, &url, 50, secs, true)?;
    let probe = first_byte(client, SocketAddr::from((VIP4, port)), hello, secs)?;
    let gbps = if c.sni {
        let big = wrk_big(client, secs)?;
        s.errors += big.errors;
        big.rps * BIG as f64 * 8.0 / 1e9
    } else {
        iperf(client, &VIP4.to_string(), 5201, secs)?
    };
    s.close.push(close.rps);
    s.keepalive.push(ka.rps);
    s.close_p99.push(close.p99_ms);
    s.first_p99.push(probe.p99_ms);
    s.gbps.push(gbps);
    s.errors += ka.errors + close.errors + probe.errors;
    if let Some(mut l) = lbd {
        if std::env::var_os("LB_BENCH_DEBUG").is_some() {
            eprintln!("{}", l.cli(&["stats"])?);
        }
        l.stop()?;
    }
    Ok(())
}

fn wrk_big(client: &Netns, secs: u32) -> anyhow::Result<Wrk> {
    wrk(client, &format!("https://{HOST}/big"), 8, secs, false)
}

/// Starts contender `c` in the balancer namespace (VIP4 already on lo). HAProxy and nginx run as
/// daemons that die with the namespace; `lb` is returned to be stopped.
fn start(topo: &Topology, c: &Contender) -> anyhow::Result<Option<Lb>> {
    let ns = &topo.lb;
    let backends: Vec<String> = topo.backends.iter().map(|b| b.v4.to_string()).collect();
    let dir = std::env::temp_dir().join(format!("{}-l4user", ns.name));
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let conf = dir.join("proxy.conf");
    let conf_str = conf.to_str().context("non-UTF-8 path")?;
    let source = peers_hash_source();
    match c.peer {
        Peer::Haproxy => {
            let servers = |port: u16| -> String {
                backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("  server b{i} {b}:{port}\n"))
                    .collect()
            };
            let balance = if source { "source" } else { "roundrobin" };
            let body = if c.sni {
                format!(
                    "frontend tls\n  bind {VIP4}:443\n  tcp-request inspect-delay 5s\n  \
                     tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  \
                     use_backend tls if {{ req.ssl_sni -i {HOST} }}\n\
                     backend tls\n  balance {balance}\n{}",
                    servers(443)
                )
            } else {
                format!(
                    "frontend web\n  bind {VIP4}:80\n  default_backend web\n\
                     backend web\n  balance {balance}\n{}\
                     frontend bulk\n  bind {VIP4}:5201\n  default_backend bulk\n\
                     backend bulk\n  balance source\n{}",
                    servers(80),
                    servers(5201)
                )
            };
            std::fs::write(
                &conf,
                format!(
                    "global\n  nbthread 2\n  maxconn 4000\n  pidfile {d}/haproxy.pid\n  daemon\n\
                     defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  \
                     timeout client 60s\n  timeout server 60s\n{body}"
                ),
            )?;
            ns.exec(&["haproxy", "-f", conf_str])?;
            Ok(None)
        }
        Peer::Nginx => {
            let upstream = |name: &str, port: u16, hash: bool| -> String {
                let servers: String =
                    backends.iter().map(|b| format!(" server {b}:{port};")).collect();
                let hash = if hash { " hash $remote_addr;" } else { "" };
                format!("  upstream {name} {{{hash}{servers} }}\n")
            };
            let body = if c.sni {
                format!(
                    "  map $ssl_preread_server_name $route {{ {HOST} tls; default refuse; }}\n{}\
                     \x20 upstream refuse {{ server 127.0.0.1:9; }}\n\
                     \x20 server {{ listen {VIP4}:443 reuseport backlog=4096; ssl_preread on; \
                     proxy_pass $route; }}\n",
                    upstream("tls", 443, source)
                )
            } else {
                format!(
                    "{}{}  server {{ listen {VIP4}:80 reuseport backlog=4096; proxy_pass web; }}\n  \
                     server {{ listen {VIP4}:5201 reuseport; proxy_pass bulk; }}\n",
                    upstream("web", 80, source),
                    upstream("bulk", 5201, true)
                )
            };
            std::fs::write(
                &conf,
                format!(
                    "load_module {STREAM_MODULE};\nworker_processes 2;\npid {d}/nginx.pid;\n\
                     error_log {d}/error.log crit;\nevents {{ worker_connections 8192; }}\n\
                     stream {{\n{body}}}\n"
                ),
            )?;
            ns.exec(&["nginx", "-c", conf_str, "-e", &format!("{d}/error.log")])?;
            Ok(None)
        }
        Peer::Lb => {
            let admin: SocketAddr = "127.0.0.1:9901".parse()?;
            let group = |name: &str, port: u16| -> String {
                let list: Vec<String> =
                    backends.iter().map(|b| format!("\"{b}:{port}\"")).collect();
                format!("[upstream.{name}]\nbackends = [{}]\n", list.join(", "))
            };
            let body = if c.sni {
                format!(
                    "{}[[tcp.listener]]\nname = \"tls\"\nlisten = \"{VIP4}:443\"\nrelay = \"{relay}\"\n\
                     sni = [{{ host = \"{HOST}\", upstream = \"tls\", passthrough = true }}]\n",
                    group("tls", 443),
                    relay = c.relay
                )
            } else {
                format!(
                    "{}{}[[tcp.listener]]\nname = \"web\"\nlisten = \"{VIP4}:80\"\nupstream = \"web\"\n\
                     relay = \"{relay}\"\n[[tcp.listener]]\nname = \"bulk\"\nlisten = \"{VIP4}:5201\"\n\
                     upstream = \"bulk\"\nrelay = \"{relay}\"\n",
                    group("web", 80),
                    group("bulk", 5201),
                    relay = c.relay
                )
            };
            let lb = Lb::start(ns, &format!("[admin]\nlisten = \"{admin}\"\n{body}"), admin)?;
            // The kernel relay falls back (not root, no CAP_BPF): say which one ran.
            let status = lb.json(&["status"])?;
            eprintln!("lb relays: {}", status["relays"]);
            Ok(Some(lb))
        }
    }
}

/// The backends' certificate and key (PEM files), and a ClientHello for `HOST` for the probe.
struct TlsFiles {
    dir: PathBuf,
    hello: Arc<Vec<u8>>,
}

impl TlsFiles {
    fn new() -> anyhow::Result<Self> {
        let c = rcgen::generate_simple_self_signed(vec![HOST.to_string()])?;
        let dir = std::env::temp_dir().join(format!("lb-bench-l4user-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cert.pem"), c.cert.pem())?;
        std::fs::write(dir.join("key.pem"), c.key_pair.serialize_pem())?;
        std::fs::write(dir.join("big"), vec![b'x'; BIG])?;
        let config = lb_tests::tls::client_config(&[c.cert.der()]);
        let name = rustls::pki_types::ServerName::try_from(HOST)?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let mut hello = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut hello)?;
        }
        Ok(Self { dir, hello: Arc::new(hello) })
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A second nginx in a backend namespace: TLS on :443 answering `name` on `/` and a 1 MiB body
/// on `/big`. Dies with the namespace.
fn start_tls_backend(ns: &Netns, tls: &TlsFiles, name: &str) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("{}-nginx-tls", ns.name));
    std::fs::create_dir_all(&dir)?;
    let (d, t) = (dir.display(), tls.dir.display());
    let conf = format!(
        "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\n\
         events {{ worker_connections 16384; }}\n\
         http {{ access_log off; keepalive_requests 1000000; default_type application/octet-stream;\n\
           server {{ listen 443 ssl backlog=4096;\n\
             ssl_certificate {t}/cert.pem; ssl_certificate_key {t}/key.pem;\n\
             location = /big {{ root {t}; }}\n\
             location / {{ return 200 \"{name}\\n\"; }} }} }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    ns.exec(&["nginx", "-c", path.to_str().context("path")?, "-e", &format!("{d}/error.log")])?;
    Ok(())
}

/// `/etc/netns/NAME/hosts` resolving `HOST` to VIP4, which `ip netns exec` bind-mounts over
/// /etc/hosts, so wrk sends SNI `HOST` (it takes it from the URL). Removed on drop.
struct Hosts(PathBuf);

impl Hosts {
    fn new(ns: &Netns) -> anyhow::Result<Self> {
        let dir = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{VIP4} {HOST}\n"))?;
        Ok(Self(dir))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Probe {
    p99_ms: f64,
    errors: u64,
}

/// Connect-to-first-byte from `ns`: `PROBE_LOOPS` closed loops for `secs` seconds, each
/// connecting to `addr`, writing `hello` and timing until the first byte comes back. The client
/// then closes with the answer unread, which resets the connection (no TIME_WAIT piles up).
fn first_byte(
    ns: &Netns,
    addr: SocketAddr,
    hello: Arc<Vec<u8>>,
    secs: u32,
) -> anyhow::Result<Probe> {
    let deadline = Instant::now() + Duration::from_secs(secs.into());
    let timeout = Duration::from_secs(2);
    let one = move |hello: &[u8]| -> std::io::Result<Duration> {
        let t0 = Instant::now();
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(hello)?;
        let mut b = [0u8; 1];
        match s.read(&mut b)? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(t0.elapsed()),
        }
    };
    // Threads spawned from a thread inside the namespace stay in it.
    let (mut times, errors) = ns.run(move || {
        let loops: Vec<_> = (0..PROBE_LOOPS)
            .map(|_| {
                let hello = hello.clone();
                std::thread::spawn(move || {
                    let (mut t, mut e) = (Vec::new(), 0u64);
                    while Instant::now() < deadline {
                        match one(&hello) {
                            Ok(d) => t.push(d.as_secs_f64() * 1e3),
                            Err(_) => e += 1,
                        }
                    }
                    (t, e)
                })
            })
            .collect();
        loops.into_iter().filter_map(|h| h.join().ok()).fold(
            (Vec::new(), 0),
            |(mut t, e), (lt, le)| {
                t.extend(lt);
                (t, e + le)
            },
        )
    })?;
    anyhow::ensure!(!times.is_empty(), "no connection reached its first byte ({errors} errors)");
    times.sort_by(|a, b| a.total_cmp(b));
    let p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    Ok(Probe { p99_ms: p99, errors })
}

/// The Markdown table of the plain (`sni` false) or SNI contenders, with `lb ÷ peer` ratios.
fn table(results: &BTreeMap<usize, Samples>, sni: bool, bulk: &str) -> String {
    let med = |v: &Vec<f64>| median(&mut v.clone());
    let rows: Vec<(usize, &Samples)> =
        results.iter().filter(|(i, _)| CONTENDERS[**i].sni == sni).map(|(i, s)| (*i, s)).collect();
    let mut md = format!(
        "| proxy | new connections/s (Connection: close) | keep-alive req/s | p99 ms (wrk, close) | p99 connect-to-first-byte ms | {bulk} | errors |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    );
    for (i, s) in &rows {
        md += &format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            CONTENDERS[*i].name,
            med(&s.close),
            med(&s.keepalive),
            med(&s.close_p99),
            med(&s.first_p99),
            med(&s.gbps),
            s.errors
        );
    }
    md += "\n| lb ÷ peer (medians) | connections/s | keep-alive req/s | bulk | p99 connect-to-first-byte (below 1: lb faster) |\n\
           | --- | ---: | ---: | ---: | ---: |\n";
    for (l, lb) in rows.iter().filter(|(i, _)| CONTENDERS[*i].peer == Peer::Lb) {
        for (i, p) in rows.iter().filter(|(i, _)| CONTENDERS[*i].peer != Peer::Lb) {
            md += &format!(
                "| relay = {} ÷ {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                CONTENDERS[*l].relay,
                CONTENDERS[*i].name,
                med(&lb.close) / med(&p.close),
                med(&lb.keepalive) / med(&p.keepalive),
                med(&lb.gbps) / med(&p.gbps),
                med(&lb.first_p99) / med(&p.first_p99)
            );
        }
    }
    md
}
