//! End to end through the namespace topology, side by side in one run: plain kernel routing
//! (no balancing), nftables DNAT with numgen (kube-proxy style), HAProxy in TCP mode, and `lb`'s
//! XDP full NAT. Contenders alternate round by round; the report gives medians and ratios.
use std::{collections::BTreeMap, net::SocketAddr};

use lb_tests::{
    lb::{Lb, decap::Decap, pin_path},
    topology::{Topology, VIP4},
};

use super::{
    median, progress,
    tools::{Wrk, iperf, iperf_dir, start_backend, wrk},
};

const CONTENDERS: [&str; 5] = [
    "kernel routing (no NAT, no balancing)",
    "nftables DNAT numgen",
    "HAProxy 2.6 TCP mode (2 threads)",
    "lb XDP full NAT",
    "lb XDP DSR (IPIP, lb decap on the backends)",
];
/// The `lb` rows the ratio tables divide by.
const LB_ROWS: [usize; 2] = [3, 4];

/// A contender in place: the address to load, the daemon if it is `lb`, and how to undo it.
pub(super) type Contender = (String, Option<Lb>, Box<dyn FnOnce()>);

/// One contender's setup in the balancer namespace, balancing over the first `n` backends.
/// DSR (contender 4) also attaches `lb decap` on the backends, which takes the place of the
/// topology's do-nothing program there (see [`Topology::release_pass`]).
pub(super) fn setup(topo: &mut Topology, which: usize, n: usize) -> anyhow::Result<Contender> {
    if which == 4 {
        for b in 0..n {
            let ns = topo.backends[b].ns.share();
            topo.release_pass(&ns);
        }
    }
    let topo = &*topo;
    let lb = &topo.lb;
    let backends: Vec<String> = topo.backends.iter().take(n).map(|b| b.v4.to_string()).collect();
    match which {
        0 => Ok((backends[0].clone(), None, Box::new(|| {}))),
        _ if backends.is_empty() => anyhow::bail!("no backends"),
        1 => {
            let map: Vec<String> =
                backends.iter().enumerate().map(|(i, b)| format!("{i} : {b}")).collect();
            // iperf3's control and data connections must meet the same server: the bulk port
            // hashes the client address (as lb does), the web port round-robins.
            let (n, map) = (backends.len(), map.join(", "));
            let rules = format!(
                "table ip lbbench {{\n  chain pre {{\n    type nat hook prerouting priority -100;\n    \
                 ip daddr {VIP4} tcp dport 80 dnat to numgen inc mod {n} map {{ {map} }}\n    \
                 ip daddr {VIP4} tcp dport 5201 dnat to jhash ip saddr mod {n} map {{ {map} }}\n  }}\n}}\n"
            );
            let path = std::env::temp_dir().join(format!("{}-nft", lb.name));
            std::fs::write(&path, rules)?;
            lb.exec(&["nft", "-f", path.to_str().unwrap_or_default()])?;
            let name = lb.name.clone();
            Ok((
                VIP4.to_string(),
                None,
                Box::new(move || {
                    let _ = std::process::Command::new("ip")
                        .args(["netns", "exec", &name, "nft", "delete", "table", "ip", "lbbench"])
                        .status();
                }),
            ))
        }
        2 => {
            lb.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            let dir = std::env::temp_dir().join(format!("{}-haproxy", lb.name));
            std::fs::create_dir_all(&dir)?;
            let servers = |port: u16| -> String {
                backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("  server b{i} {b}:{port}\n"))
                    .collect()
            };
            let cfg = format!(
                "global\n  nbthread 2\n  maxconn 8000\n  pidfile {d}/haproxy.pid\n  daemon\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend web\n  bind {VIP4}:80\n  default_backend web\n\
                 backend web\n  balance roundrobin\n{}\
                 frontend bulk\n  bind {VIP4}:5201\n  default_backend bulk\n\
                 backend bulk\n  balance source\n{}",
                servers(80),
                servers(5201),
                d = dir.display()
            );
            let path = dir.join("haproxy.cfg");
            std::fs::write(&path, cfg)?;
            lb.exec(&["haproxy", "-f", path.to_str().unwrap_or_default()])?;
            let (name, pid) = (lb.name.clone(), dir.join("haproxy.pid"));
            Ok((
                VIP4.to_string(),
                None,
                Box::new(move || {
                    if let Ok(p) = std::fs::read_to_string(&pid) {
                        let _ = std::process::Command::new("kill").arg(p.trim()).status();
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let _ = std::process::Command::new("ip")
                        .args(["-n", &name, "addr", "del", &format!("{VIP4}/32"), "dev", "lo"])
                        .status();
                }),
            ))
        }
        _ => {
            let dsr = if which == 4 { "forwarding = \"dsr\"\n" } else { "" };
            let admin: SocketAddr = "127.0.0.1:9901".parse()?;
            let ifaces: Vec<String> =
                topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
            let list = |port: u16| -> String {
                backends.iter().map(|b| format!("\"{b}:{port}\"")).collect::<Vec<_>>().join(", ")
            };
            let config = format!(
                "[admin]\nlisten = \"{admin}\"\n[xdp]\ninterfaces = [{}]\npin_path = \"{}\"\n\
                 [[xdp.service]]\nname = \"web\"\nvip = \"{VIP4}:80\"\nhash = \"five-tuple\"\n{dsr}backends = [{}]\n\
                 [[xdp.service]]\nname = \"bulk\"\nvip = \"{VIP4}:5201\"\n{dsr}backends = [{}]\n",
                ifaces.join(", "),
                pin_path(),
                list(80),
                list(5201)
            );
            let lbd = Lb::start(lb, &config, admin)?;
            let addrs: Vec<&str> = backends.iter().map(String::as_str).collect();
            lb_tests::topology::wait_neighbours(lb, &addrs)?;
            let vip = VIP4.to_string();
            let decaps = if which == 4 {
                let on = |b: &lb_tests::topology::Backend| Decap::attach(&b.ns, "eth0", &[&vip]);
                topo.backends.iter().take(n).map(on).collect::<anyhow::Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            Ok((vip, Some(lbd), Box::new(move || drop(decaps))))
        }
    }
}

#[derive(Default)]
struct Samples {
    keepalive: Vec<f64>,
    close: Vec<f64>,
    p99: Vec<f64>,
    gbps: Vec<f64>,
    /// iperf3 -R: the backend sends (responses), the client receives.
    down: Vec<f64>,
    errors: u64,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    let one = table(1, &[0, 1, 2, 3, 4], rounds, secs)?;
    let three = table(3, &[1, 2, 3, 4], rounds, secs)?;
    println!(
        "One backend: every contender forwards to the same single nginx, so the table compares \
         the cost of each data path (the routing row is the floor: no NAT, no balancing).\n\n{one}\n\
         Three backends: the balancers spread over three nginx backends (on the same 2 cores, so \
         the backends compete with everything else).\n\n{three}\n\
         {rounds} round(s) of {secs} s per measurement, contenders alternating within a round, each \
         on a freshly built topology (so no contender inherits another's TIME_WAIT or conntrack \
         state on the backends); wrk \
         -t1 -c50 from one client address; nginx backends (1 worker each); HAProxy with 2 threads. \
         The web VIP balances per connection (lb: `hash = \"five-tuple\"`, nftables: numgen, \
         HAProxy: roundrobin); the bulk port keeps a client on one backend (lb: source-ip, \
         nftables: jhash, HAProxy: source) because iperf3's two connections must meet. Bulk is \
         an upload (the client sends: every data packet crosses the balancer, wrapped under DSR); \
         bulk download is `iperf3 -R` (the backend sends, as with web responses: under full NAT \
         the data crosses lb's XDP program, under DSR it leaves the backend for the client's \
         address directly; in this topology that route still runs through the balancer \
         namespace's kernel, as kernel routing does).\n"
    );
    Ok(())
}

/// A client, the balancer namespace and `n` backends running nginx and iperf3.
pub(super) fn fresh(n: usize) -> anyhow::Result<Topology> {
    let topo = Topology::new(n)?;
    topo.lb.sysctl("net.ipv4.ip_forward", "1")?;
    for (i, b) in topo.backends.iter().enumerate() {
        start_backend(&b.ns, &format!("backend-{}", i + 1))?;
    }
    Ok(topo)
}

/// Runs `contenders` over `n` backends for `rounds` rounds; returns a Markdown table.
fn table(n: usize, contenders: &[usize], rounds: usize, secs: u32) -> anyhow::Result<String> {
    let mut results: BTreeMap<usize, Samples> = BTreeMap::new();
    for round in 1..=rounds {
        for &i in contenders {
            if let Ok(only) = std::env::var("LB_BENCH_ONLY")
                && only.parse() != Ok(i)
            {
                continue;
            }
            progress(&format!("{n} backend(s), round {round}/{rounds}: {}", CONTENDERS[i]));
            let topo = &mut fresh(n)?;
            let (target, lbd, undo) = setup(topo, i, n)?;
            let topo = &*topo;
            let url = format!("http://{target}/");
            // Warm up (ARP, neighbour entries, first connections), then measure.
            let _ = wrk(&topo.client, &url, 10, 1, false);
            let ka: Wrk = wrk(&topo.client, &url, 50, secs, false)?;
            let close: Wrk = wrk(&topo.client, &url, 50, secs, true)?;
            let gbps = iperf(&topo.client, &target, 5201, secs)?;
            let down = iperf_dir(&topo.client, &target, 5201, secs, true)?;
            let s = results.entry(i).or_default();
            s.keepalive.push(ka.rps);
            s.close.push(close.rps);
            s.p99.push(ka.p99_ms);
            s.gbps.push(gbps);
            s.down.push(down);
            s.errors += ka.errors + close.errors;
            if let Some(mut l) = lbd {
                if std::env::var_os("LB_BENCH_DEBUG").is_some() {
                    eprintln!("{}", l.cli(&["stats"])?);
                    // TCP counters of every host: SYN retransmits, TIME_WAIT, PAWS rejects.
                    for ns in topo.backends.iter().map(|b| &b.ns).chain([&topo.client]) {
                        eprintln!(
                            "{}: {}",
                            ns.name,
                            ns.exec(&["nstat", "-az", "Tcp*"]).unwrap_or_default()
                        );
                    }
                }
                l.stop()?;
                drop(l);
            }
            undo();
        }
    }
    let med = |v: &Vec<f64>| median(&mut v.clone());
    let mut md = String::from(
        "| path (client → balancer → backends) | keep-alive req/s | new connections/s (Connection: close) | keep-alive p99 ms | bulk Gbit/s (iperf3, 1 stream) | bulk download Gbit/s (iperf3 -R) | errors |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for (i, s) in &results {
        md += &format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} |\n",
            CONTENDERS[*i],
            med(&s.keepalive),
            med(&s.close),
            med(&s.p99),
            med(&s.gbps),
            med(&s.down),
            s.errors
        );
    }
    for row in LB_ROWS {
        let Some(lb) = results.get(&row) else { continue };
        md += &format!(
            "\n| {} ÷ peer (medians) | keep-alive req/s | new connections/s | bulk | bulk download |\n| --- | ---: | ---: | ---: | ---: |\n",
            CONTENDERS[row]
        );
        for (i, p) in results.iter().filter(|(i, _)| **i != row) {
            md += &format!(
                "| ÷ {} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                CONTENDERS[*i],
                med(&lb.keepalive) / med(&p.keepalive),
                med(&lb.close) / med(&p.close),
                med(&lb.gbps) / med(&p.gbps),
                med(&lb.down) / med(&p.down)
            );
        }
    }
    Ok(md)
}
