//! The L7 contenders, each started in the balancer namespace over the same nginx backends with
//! the same listeners: HTTP/1.1 on `PLAIN`, h2c (prior knowledge) on `H2C`, TLS (ALPN h2 and
//! http/1.1, one self-signed certificate) on `TLS`, two worker threads, upstream keep-alive.
use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb_tests::{lb::Lb, netns::Netns, topology::Topology};

use super::procs::{self, Tree};

/// Worker threads every contender gets: `lb`'s tokio runtime (TOKIO_WORKER_THREADS, set by
/// lb-bench), nginx `worker_processes`, HAProxy `nbthread`, Pingora `threads`.
pub const THREADS: usize = 2;
/// The balancer namespace's client-side address, which the client reaches directly.
pub const ADDR: &str = "10.0.0.1";
pub const PLAIN: u16 = 8080;
pub const H2C: u16 = 8081;
pub const TLS: u16 = 8443;
/// The name in the certificate (the clients send it as SNI).
pub const SERVER_NAME: &str = "lb.bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Lb,
    /// `lb` built from the code before the change being measured (`LB_BASELINE_BIN`).
    LbBefore,
    Nginx,
    Haproxy,
    Pingora,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lb => "lb L7",
            Kind::LbBefore => baseline_name(),
            Kind::Nginx => "nginx 1.22 proxy_pass",
            Kind::Haproxy => "HAProxy 2.6 HTTP mode",
            Kind::Pingora => "Pingora 0.9 (rustls)",
        }
    }

    /// The contenders this machine can run (Pingora only when its binary was built), or those
    /// of them named in `LB_BENCH_PEERS` (e.g. `lb,nginx`; for iterating on one).
    pub fn all() -> Vec<Kind> {
        let mut v = vec![Kind::Lb, Kind::Nginx, Kind::Haproxy];
        if baseline_bin().is_some() {
            v.insert(1, Kind::LbBefore);
        }
        if pingora_bin().is_some() {
            v.push(Kind::Pingora);
        }
        if let Ok(only) = std::env::var("LB_BENCH_PEERS") {
            let only: Vec<String> = only.split(',').map(|s| s.trim().to_lowercase()).collect();
            v.retain(|k| only.iter().any(|o| format!("{k:?}").to_lowercase() == *o));
        }
        v
    }
}

/// The baseline's row label: `LB_BASELINE_NAME` (what it was built from), else a default.
fn baseline_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::var("LB_BASELINE_NAME").unwrap_or_else(|_| "lb L7 before (baseline build)".into())
    })
}

/// An `lb` binary built from older code, measured beside the current one: `LB_BASELINE_BIN`.
pub fn baseline_bin() -> Option<PathBuf> {
    std::env::var_os("LB_BASELINE_BIN").map(PathBuf::from).filter(|p| p.is_file())
}

/// The bench-only Pingora proxy (`bench/pingora-lb`, built by `cargo xtask bench` into
/// target/pingora): `LB_PINGORA_BIN`, else next to this binary's target directory.
pub fn pingora_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LB_PINGORA_BIN") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let exe = std::env::current_exe().ok()?;
    let target = exe.parent()?.parent()?;
    Some(target.join("pingora/release/pingora-lb")).filter(|p| p.is_file())
}

/// The self-signed certificate every contender serves.
pub struct Certs {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key, for HAProxy's `crt`.
    pub combined: PathBuf,
    pub der: Vec<u8>,
}

impl Certs {
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(lb_tests::netns::unique("certs"));
        let c = lb_tests::http::write_cert(&dir, "bench", &[SERVER_NAME]);
        let combined = dir.join("combined.pem");
        let pem = std::fs::read_to_string(&c.cert)? + &std::fs::read_to_string(&c.key)?;
        std::fs::write(&combined, pem)?;
        Ok(Self { dir, cert: c.cert, key: c.key, combined, der: c.der })
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running contender; stops with its namespace, and its files go on drop.
pub struct Peer {
    pub kind: Kind,
    /// The balancer process (and its workers).
    pub tree: Tree,
    _lb: Option<Lb>,
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for Peer {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        // nginx and HAProxy daemonized: their master is the tree root.
        if matches!(self.kind, Kind::Nginx | Kind::Haproxy) {
            // SAFETY: kill(2) on a pid this run started.
            unsafe { libc::kill(self.tree.0 as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `kind` in the topology's balancer namespace, balancing round robin over all its
/// backends (port 80), and waits until its listeners accept.
pub fn start(topo: &Topology, kind: Kind, certs: &Certs) -> anyhow::Result<Peer> {
    let ns = &topo.lb;
    let backends: Vec<String> = topo.backends.iter().map(|b| format!("{}:80", b.v4)).collect();
    let dir = std::env::temp_dir().join(format!("{}-{kind:?}", ns.name).to_lowercase());
    std::fs::create_dir_all(&dir)?;
    let d = dir.display();
    let (tree, lb, child) = match kind {
        Kind::Lb | Kind::LbBefore => {
            let admin: SocketAddr = "127.0.0.1:9901".parse()?;
            let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
            // Idle keep-alive connections end after header_timeout_ms in lb (hyper's header
            // timer), so both are raised for the 10k idle connections, as for the peers.
            let config = format!(
                "[admin]\nlisten = \"{admin}\"\n\
                 [http]\nmax_connections = 19000\nheader_timeout_ms = 120000\nidle_timeout_ms = 120000\n\
                 [[http.listener]]\nname = \"plain\"\nlisten = \"{ADDR}:{PLAIN}\"\n\
                 [[http.listener]]\nname = \"h2c\"\nlisten = \"{ADDR}:{H2C}\"\n\
                 [[http.listener]]\nname = \"tls\"\nlisten = \"{ADDR}:{TLS}\"\n\
                 tls = [{{ cert = \"{}\", key = \"{}\" }}]\n\
                 [[http.route]]\nlistener = \"plain\"\nupstream = \"app\"\n\
                 [[http.route]]\nlistener = \"h2c\"\nupstream = \"app\"\n\
                 [[http.route]]\nlistener = \"tls\"\nupstream = \"app\"\n\
                 [upstream.app]\nbalance = \"round-robin\"\npool_max_idle = 64\nbackends = [{}]\n",
                certs.cert.display(),
                certs.key.display(),
                list.join(", ")
            );
            let mut builder = Lb::builder(ns, config).admin(admin);
            if kind == Kind::LbBefore {
                builder = builder.binary(baseline_bin().context("LB_BASELINE_BIN")?);
            }
            let lb = builder.start()?;
            let pid = procs::find(lb.config.to_str().context("config path")?)?;
            (Tree(pid), Some(lb), None)
        }
        Kind::Nginx => {
            let servers: String = backends.iter().map(|b| format!("    server {b};\n")).collect();
            let conf = format!(
                "worker_processes {THREADS};\nworker_rlimit_nofile 20000;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\nevents {{ worker_connections 20000; }}\n\
                 http {{\n  access_log off;\n  keepalive_timeout 120s;\n  keepalive_requests 1000000;\n\
                   upstream app {{\n{servers}    keepalive 64;\n  }}\n\
                   server {{\n    listen {ADDR}:{PLAIN} backlog=1024;\n    listen {ADDR}:{H2C} http2 backlog=1024;\n\
                     listen {ADDR}:{TLS} ssl http2 backlog=1024;\n\
                     ssl_certificate {};\n    ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n\
                     location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n\
                       proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n",
                certs.cert.display(),
                certs.key.display()
            );
            let path = dir.join("nginx.conf");
            std::fs::write(&path, conf)?;
            let p = path.to_str().context("path")?;
            ns.exec(&["nginx", "-c", p, "-e", &format!("{d}/error.log")])?;
            (Tree(procs::from_pidfile(&dir.join("nginx.pid"))?), None, None)
        }
        Kind::Haproxy => {
            let servers: String =
                backends.iter().enumerate().map(|(i, b)| format!("  server b{i} {b}\n")).collect();
            // maxconn above 10k idle + load: HAProxy reserves 2 files per connection, more than
            // the 20,000 open files allowed here; `no strict-limits` lets it run with a warning.
            let cfg = format!(
                "global\n  nbthread {THREADS}\n  maxconn 19000\n  no strict-limits\n  pidfile {d}/haproxy.pid\n  daemon\n\
                 defaults\n  mode http\n  maxconn 19000\n  timeout connect 5s\n  timeout client 120s\n\
                 timeout server 60s\n  timeout http-request 120s\n  timeout http-keep-alive 120s\n\
                 frontend web\n  bind {ADDR}:{PLAIN} backlog 1024\n  bind {ADDR}:{H2C} proto h2 backlog 1024\n\
                 bind {ADDR}:{TLS} ssl crt {} alpn h2,http/1.1 backlog 1024\n  default_backend app\n\
                 backend app\n  balance roundrobin\n  http-reuse always\n{servers}",
                certs.combined.display()
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg)?;
            ns.exec(&["haproxy", "-f", path.to_str().context("path")?])?;
            (Tree(procs::from_pidfile(&dir.join("haproxy.pid"))?), None, None)
        }
        Kind::Pingora => {
            let bin = pingora_bin().context("pingora-lb not built")?;
            let log = std::fs::File::create(dir.join("pingora.log"))?;
            let child = Command::new("ip")
                .args(["netns", "exec", &ns.name])
                .arg(&bin)
                .args(["--threads", &THREADS.to_string(), "--h2c"])
                .args([
                    "--listen",
                    &format!("{ADDR}:{PLAIN}"),
                    "--listen",
                    &format!("{ADDR}:{H2C}"),
                ])
                .args(["--tls", &format!("{ADDR}:{TLS}")])
                .arg("--cert")
                .arg(&certs.cert)
                .arg("--key")
                .arg(&certs.key)
                .args(&backends)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawn pingora-lb")?;
            // `ip netns exec` execs the command: the child's pid is Pingora's.
            (Tree(child.id()), None, Some(child))
        }
    };
    let peer = Peer { kind, tree, _lb: lb, child, dir };
    for port in [PLAIN, H2C, TLS] {
        wait_listening(ns, port)?;
    }
    Ok(peer)
}

/// Waits (at most 10 s) until `ADDR:port` accepts a connection inside `ns`.
fn wait_listening(ns: &Netns, port: u16) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{ADDR}:{port}").parse()?;
    ns.run(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nothing listens on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    })?
}
