//! Per-packet cost of the XDP program on real traffic (kernel BPF run-time statistics while wrk
//! runs through the namespace topology), next to the do-nothing XDP program attached to the same
//! interfaces under the same load. Unlike BPF_PROG_TEST_RUN single runs, caches are warm, as
//! they are in production.
use std::time::Duration;

use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use lb_tests::{netns::Netns, topology::Topology};

use super::{
    l4::{fresh, setup},
    median, progress,
    tools::wrk,
};

/// The id of the XDP program attached to `iface` in `ns`.
fn attached_prog(ns: &Netns, iface: &str) -> anyhow::Result<u32> {
    let out = ns.ip(&["-j", "-d", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["xdp"]["prog"]["id"]
        .as_u64()
        .map(|id| id as u32)
        .ok_or_else(|| anyhow::anyhow!("no XDP program on {iface}: {out}"))
}

/// (run time ns, run count) of program `id`.
fn prog_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    for p in loaded_programs() {
        let p = p?;
        if p.id() == id {
            return Ok((p.run_time().as_nanos() as u64, p.run_count()));
        }
    }
    anyhow::bail!("program {id} is gone")
}

/// ns/packet of the program on `iface` while `load` runs.
fn measure(
    topo: &Topology,
    load: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, u64)> {
    let id = attached_prog(&topo.lb, "eth0")?;
    let (t0, n0) = prog_stats(id)?;
    load()?;
    let (t1, n1) = prog_stats(id)?;
    let packets = n1 - n0;
    Ok(((t1 - t0) as f64 / packets.max(1) as f64, packets))
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let (rounds, secs) = if quick { (1, 3) } else { (3, 5) };
    // Statistics stay on while this fd is open.
    let _stats = enable_stats(Stats::RunTime)?;
    let mut trivial = Vec::new();
    let mut keepalive = Vec::new();
    let mut close = Vec::new();
    let mut passing = Vec::new();
    let mut dsr = Vec::new();
    let mut packets = (0, 0, 0, 0);
    for round in 1..=rounds {
        progress(&format!("in situ, round {round}/{rounds}: trivial program under kernel routing"));
        let topo = fresh(1)?;
        let ifaces = topo.lb_interfaces();
        let _pass = topo.lb.run(move || {
            ifaces.iter().map(|i| lb_user::dataplane::attach_pass(i)).collect::<Result<Vec<_>, _>>()
        })??;
        let target = format!("http://{}/", topo.backends[0].v4);
        let _ = wrk(&topo.client, &target, 10, 1, false);
        let (ns, n) = measure(&topo, || wrk(&topo.client, &target, 50, secs, false).map(drop))?;
        trivial.push(ns);
        packets.0 += n;
        drop(_pass);
        drop(topo);

        progress(&format!("in situ, round {round}/{rounds}: lb XDP full NAT"));
        let mut topo = fresh(1)?;
        let (vip, lbd, undo) = setup(&mut topo, 3, 1)?;
        let url = format!("http://{vip}/");
        let _ = wrk(&topo.client, &url, 10, 1, false);
        let (ns, n) = measure(&topo, || wrk(&topo.client, &url, 50, secs, false).map(drop))?;
        keepalive.push(ns);
        packets.1 += n;
        let (ns, n) = measure(&topo, || wrk(&topo.client, &url, 50, secs, true).map(drop))?;
        close.push(ns);
        packets.2 += n;
        // The same program on traffic that is not for a VIP (routed to the backend directly):
        // what every other packet crossing the balancer pays.
        let direct = format!("http://{}/", topo.backends[0].v4);
        let (ns, _) = measure(&topo, || wrk(&topo.client, &direct, 50, secs, false).map(drop))?;
        passing.push(ns);
        if let Some(mut l) = lbd {
            l.stop()?;
        }
        undo();
        drop(topo);
        std::thread::sleep(Duration::from_millis(100));

        progress(&format!("in situ, round {round}/{rounds}: lb XDP DSR"));
        let mut topo = fresh(1)?;
        let (vip, lbd, undo) = setup(&mut topo, 4, 1)?;
        let url = format!("http://{vip}/");
        let _ = wrk(&topo.client, &url, 10, 1, false);
        let (ns, n) = measure(&topo, || wrk(&topo.client, &url, 50, secs, false).map(drop))?;
        dsr.push(ns);
        packets.3 += n;
        if let Some(mut l) = lbd {
            l.stop()?;
        }
        undo();
        std::thread::sleep(Duration::from_millis(100));
    }
    let (t, k, c) = (median(&mut trivial), median(&mut keepalive), median(&mut close));
    let (p, d) = (median(&mut passing), median(&mut dsr));
    println!(
        "| program, traffic (wrk -c50 through the balancer namespace) | ns/packet | × trivial | packets measured |\n\
         | --- | ---: | ---: | ---: |\n\
         | trivial XDP_PASS program on the balancer's interfaces, kernel routing, keep-alive | {t:.1} | 1.00 | {} |\n\
         | `lb` XDP, keep-alive (established flows, both directions) | {k:.1} | {:.2} | {} |\n\
         | `lb` XDP, Connection: close (a new flow every ~7 packets) | {c:.1} | {:.2} | {} |\n\
         | `lb` XDP, traffic not for a VIP (passed to the kernel, which routes it) | {p:.1} | {:.2} | |\n\
         | `lb` XDP DSR, keep-alive (requests wrapped in IPIP; replies pass to the kernel, which routes them) | {d:.1} | {:.2} | {} |\n\n\
         Kernel BPF statistics (`BPF_ENABLE_STATS`: run time / run count of the attached program) \
         over {rounds} round(s) of {secs} s; medians. These are warm-cache costs on real traffic, \
         the figure that matters for throughput; the single-run table above shows cold costs.\n",
        packets.0,
        k / t,
        packets.1,
        c / t,
        packets.2,
        p / t,
        d / t,
        packets.3
    );
    Ok(())
}
