//! Per-packet cost of the XDP program under BPF_PROG_TEST_RUN, next to the do-nothing program
//! measured in the same run: established flow (repeat 1,000,000 of one ACK), new flow (distinct
//! SYNs, one run each, median), and both against the number of tracked flows and backends.
use aya::{
    EbpfLoader,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use lb_tests::{
    fixture,
    packet::{Frame, TCP_ACK, TCP_SYN, fields},
};
use lb_user::{
    config::Config,
    dataplane::{Dataplane, LoadOptions, PASS_OBJECT, host::Iface},
};

use super::{
    median,
    plot::{self, Layout, Series, Spec},
    progress,
};

const VIP: &str = "10.200.0.1";

fn config(backends: usize, keys: &str) -> String {
    // Backends in 10.9.0.0/16, routed through the fixture's first backend neighbour.
    let list: Vec<String> =
        (0..backends).map(|i| format!("\"10.9.{}.{}:80\"", i / 250, 1 + i % 250)).collect();
    let list = list.join(", ");
    // One service: backend ids are per service and 4095 in all, so the 4095-backend point
    // leaves no room for a second one.
    format!(
        "[xdp]\ninterfaces = [\"c0\"]\n[[xdp.service]]\nname = \"web\"\nvip = \"{VIP}:80\"\n{keys}backends = [{list}]\n"
    )
}

fn load(backends: usize, max_flows: u32) -> anyhow::Result<Dataplane> {
    load_with(backends, max_flows, "")
}

/// [`load`] with more service keys (`forwarding = "dsr"`).
fn load_with(backends: usize, max_flows: u32, keys: &str) -> anyhow::Result<Dataplane> {
    let c = Config::parse(&config(backends, keys))?;
    let mut opts = LoadOptions::private();
    opts.max_flows = max_flows;
    let mut dp = Dataplane::load(&opts)?;
    for name in ["c0", "b1", "b2"] {
        dp.register(&Iface::lookup(name).ok_or_else(|| anyhow::anyhow!("no {name}"))?)?;
    }
    dp.apply(&c.xdp.expect("xdp").services)?;
    Ok(dp)
}

/// The SYN of flow number `k`.
fn syn(k: u32) -> anyhow::Result<Vec<u8>> {
    // 1,000 flows per client address: one address's flows all go to one backend (source-ip
    // hashing), whose SNAT port space they share.
    let a = k / 1_000;
    let src = std::net::Ipv4Addr::new(10, 2 + (a >> 16) as u8, (a >> 8) as u8, a as u8).into();
    Ok(Frame::tcp(src, 1024 + (k % 1_000) as u16, VIP.parse()?, 80, TCP_SYN).bytes())
}

/// ns per run of `prog` on `frame`, repeated `repeat` times in the kernel.
fn per_packet(prog: &Xdp, frame: &[u8], repeat: u32) -> anyhow::Result<f64> {
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

/// Opens `n` flows (distinct client address/port) and returns the median ns of their SYNs.
fn open_flows(dp: &Dataplane, n: u32) -> anyhow::Result<f64> {
    let prog = dp.balancer()?;
    let mut samples = Vec::with_capacity(n as usize);
    for k in 0..n {
        samples.push(per_packet(prog, &syn(k)?, 1)?);
    }
    Ok(median(&mut samples))
}

/// Median single-run ns of ACKs on `n` established flows (opened first), cycling `samples`
/// times. Each flow completes its handshake first (SYN, the backend's SYN-ACK on `b1`, the
/// client's ACK), so it is confirmed and found by the first lookup, as established traffic is.
/// BPF_PROG_TEST_RUN with repeat > 1 reruns the program on the frame it already rewrote, so a
/// NAT'd flow cannot be timed that way; single runs include ~30 ns of timer cost, which the
/// trivial program's single runs show.
fn established(dp: &Dataplane, n: u32, samples: u32) -> anyhow::Result<f64> {
    let prog = dp.balancer()?;
    let acks: Vec<Vec<u8>> = (0..n)
        .map(|k| {
            let syn = syn(1_000_000 + k)?;
            let (_, out) = fixture::run_on(dp, "c0", &syn);
            let f = fields(&out);
            let synack = Frame::tcp(f.dst, f.dport, f.src, f.sport, TCP_SYN | TCP_ACK).bytes();
            fixture::run_on(dp, "b1", &synack);
            // Same frame with ACK instead of SYN (flags byte of the TCP header).
            let mut ack = syn;
            ack[14 + 20 + 13] = TCP_ACK;
            fixture::run_on(dp, "c0", &ack);
            Ok(ack)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut v: Vec<f64> = (0..samples)
        .map(|i| per_packet(prog, &acks[(i % n) as usize], 1))
        .collect::<Result<_, _>>()?;
    Ok(median(&mut v))
}

/// [`established`] for a DSR service: each flow is confirmed by the client's ACK (no
/// SYN-ACK passes a DSR balancer), and every packet is wrapped toward its backend.
fn established_dsr(dp: &Dataplane, n: u32, samples: u32) -> anyhow::Result<f64> {
    let prog = dp.balancer()?;
    let acks: Vec<Vec<u8>> = (0..n)
        .map(|k| {
            let syn = syn(1_000_000 + k)?;
            fixture::run_on(dp, "c0", &syn);
            let mut ack = syn;
            ack[14 + 20 + 13] = TCP_ACK;
            fixture::run_on(dp, "c0", &ack);
            Ok(ack)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut v: Vec<f64> = (0..samples)
        .map(|i| per_packet(prog, &acks[(i % n) as usize], 1))
        .collect::<Result<_, _>>()?;
    Ok(median(&mut v))
}

/// Median over `rounds` of the per-packet ns of a frame that is not for a VIP (what all other
/// traffic pays), repeated in the kernel.
fn not_vip(dp: &Dataplane, rounds: usize, repeat: u32) -> anyhow::Result<f64> {
    let prog = dp.balancer()?;
    let f = Frame::tcp("10.0.0.2".parse()?, 50000, "10.0.0.1".parse()?, 22, TCP_ACK).bytes();
    let mut v: Vec<f64> =
        (0..rounds).map(|_| per_packet(prog, &f, repeat)).collect::<Result<_, _>>()?;
    Ok(median(&mut v))
}

fn trivial(rounds: usize, repeat: u32) -> anyhow::Result<(f64, f64)> {
    let mut ebpf = EbpfLoader::new().load(PASS_OBJECT)?;
    let prog: &mut Xdp = ebpf.program_mut(lb_common::programs::PASS).expect("pass").try_into()?;
    prog.load()?;
    let ack = Frame::tcp("10.0.0.2".parse()?, 50000, VIP.parse()?, 80, TCP_ACK).bytes();
    let mut rep: Vec<f64> =
        (0..rounds).map(|_| per_packet(prog, &ack, repeat)).collect::<Result<_, _>>()?;
    let mut single: Vec<f64> =
        (0..20_000).map(|_| per_packet(prog, &ack, 1)).collect::<Result<_, _>>()?;
    Ok((median(&mut rep), median(&mut single)))
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let ns = fixture::namespace()?;
    ns.ip(&["route", "add", "10.9.0.0/16", "via", "10.1.1.2"])?;
    let (rounds, repeat) = if quick { (3, 200_000) } else { (7, 1_000_000) };
    let samples = if quick { 20_000 } else { 100_000 };
    let report = ns.run(move || -> anyhow::Result<String> {
        let mut md = String::new();
        progress("trivial program");
        let (trivial_rep, trivial_single) = trivial(rounds, repeat)?;
        progress("established and new flows, 3 backends");
        let dp = load(3, lb_common::DEFAULT_MAX_FLOWS)?;
        let pass = not_vip(&dp, rounds, repeat)?;
        let est = established(&dp, 1_000, samples)?;
        let new = open_flows(&dp, samples / 4)?;
        drop(dp);
        progress("DSR: established and new flows, 3 backends");
        let dp = load_with(3, lb_common::DEFAULT_MAX_FLOWS, "forwarding = \"dsr\"\n")?;
        let dsr_est = established_dsr(&dp, 1_000, samples)?;
        let dsr_new = open_flows(&dp, samples / 4)?;
        drop(dp);
        md += &format!(
            "| case | ns/packet | × trivial |\n| --- | ---: | ---: |\n\
             | trivial XDP_PASS program, repeat {repeat} | {trivial_rep:.1} | 1.00 |\n\
             | `lb`, frame not for a VIP (passed), repeat {repeat} | {pass:.1} | {:.2} |\n\
             | trivial program, single runs (median of 20,000) | {trivial_single:.1} | 1.00 |\n\
             | `lb` established flow (TCP ACK over 1,000 flows, cached next hop), single runs | {est:.1} | {:.2} |\n\
             | `lb` new flow (TCP SYN: Maglev, FIB, SNAT port, 2 inserts), single runs | {new:.1} | {:.2} |\n\
             | `lb` DSR established flow (TCP ACK over 1,000 flows, wrapped in IPIP), single runs | {dsr_est:.1} | {:.2} |\n\
             | `lb` DSR new flow (TCP SYN: Maglev, FIB, 1 insert, wrapped), single runs | {dsr_new:.1} | {:.2} |\n\n",
            pass / trivial_rep,
            est / trivial_single,
            new / trivial_single,
            dsr_est / trivial_single,
            dsr_new / trivial_single
        );
        // Each backend has its own SNAT port space (`nat_ports`, 31,744 ports): 64 backends
        // hold 2M flows, so the largest point measures tracking, not port exhaustion.
        md += "Per-packet cost against tracked flows (64 backends, so SNAT ports never run out; single runs, median):\n\n| tracked flows | established ns | new flow ns |\n| ---: | ---: | ---: |\n";
        let flow_points: &[u32] = if quick {
            &[1_000, 10_000, 100_000]
        } else {
            &[1_000, 10_000, 100_000, 300_000, 1_000_000]
        };
        let (mut est_flows, mut new_flows) = (Vec::new(), Vec::new());
        for &n in flow_points {
            progress(&format!("{n} tracked flows"));
            let dp = load(64, (n * 2).max(lb_common::DEFAULT_MAX_FLOWS))?;
            open_flows(&dp, n)?;
            let est = established(&dp, 1_000, samples)?;
            let new = open_flows_from(&dp, n, 5_000)?;
            md += &format!("| {n} | {est:.1} | {new:.1} |\n");
            est_flows.push((n as f64, est));
            new_flows.push((n as f64, new));
        }
        md += "\n";
        md += &curve(&FLOWS, est_flows, new_flows, trivial_single)?;
        md += "\nPer-packet cost against backends in the service (single runs, median):\n\n| backends | established ns | new flow ns |\n| ---: | ---: | ---: |\n";
        let backend_points: &[usize] =
            if quick { &[3, 64, 4095] } else { &[3, 16, 64, 256, 1024, 4095] };
        let (mut est_backends, mut new_backends) = (Vec::new(), Vec::new());
        for &b in backend_points {
            progress(&format!("{b} backends"));
            let dp = load(b, lb_common::DEFAULT_MAX_FLOWS)?;
            let est = established(&dp, 1_000, samples)?;
            let new = open_flows(&dp, 5_000)?;
            md += &format!("| {b} | {est:.1} | {new:.1} |\n");
            est_backends.push((b as f64, est));
            new_backends.push((b as f64, new));
        }
        md += "\n";
        md += &curve(&BACKENDS, est_backends, new_backends, trivial_single)?;
        Ok(md)
    })??;
    println!("{report}");
    Ok(())
}

/// Median ns of `n` more new flows, numbered after the first `skip`.
fn open_flows_from(dp: &Dataplane, skip: u32, n: u32) -> anyhow::Result<f64> {
    let prog = dp.balancer()?;
    let mut samples = Vec::with_capacity(n as usize);
    for k in skip..skip + n {
        samples.push(per_packet(prog, &syn(k)?, 1)?);
    }
    Ok(median(&mut samples))
}

/// The per-packet cost against tracked flows, as drawn.
pub const FLOWS: Spec = curve_spec(
    "xdp-flows",
    "XDP ns per packet against tracked flows",
    "tracked flows (log)",
    "tracked flows",
);
/// The per-packet cost against backends in the service, as drawn.
pub const BACKENDS: Spec = curve_spec(
    "xdp-backends",
    "XDP ns per packet against backends in the service",
    "backends in the service (log)",
    "backends in the service",
);

const fn curve_spec(
    name: &'static str,
    title: &'static str,
    x_label: &'static str,
    x_column: &'static str,
) -> Spec {
    Spec {
        name,
        alt: title,
        title,
        y_label: "ns per packet (single runs, median)",
        layout: Layout::Lines { x_label, x_column },
    }
}

/// A plot of established and new-flow cost against `x`, with the trivial program as the floor.
fn curve(
    spec: &Spec,
    est: Vec<(f64, f64)>,
    new: Vec<(f64, f64)>,
    trivial: f64,
) -> anyhow::Result<String> {
    let floor = est.iter().map(|p| (p.0, trivial)).collect();
    let series = [
        Series { name: "new flow (SYN)".into(), points: new },
        Series { name: "established (ACK)".into(), points: est },
        Series { name: "trivial program".into(), points: floor },
    ];
    plot::save(spec, &series)
}

/// `lb-bench xdp-profile [SECS] [new]`: established-flow ACKs (or new-flow SYNs) in a loop for
/// SECS seconds (default 10)
/// under one process, for `perf record -e cpu-clock -p PID` to break the cost down by kernel
/// symbol (the program, its helpers, the map code). Prints the median ns at the end.
pub fn profile(secs: u64, new_flows: bool) -> anyhow::Result<()> {
    let ns = fixture::namespace()?;
    ns.ip(&["route", "add", "10.9.0.0/16", "via", "10.1.1.2"])?;
    let median_ns = ns.run(move || -> anyhow::Result<f64> {
        let dp = load(64, 4 * lb_common::DEFAULT_MAX_FLOWS)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut medians = Vec::new();
        let mut next = 0;
        while std::time::Instant::now() < deadline {
            medians.push(if new_flows {
                next += 5_000;
                open_flows_from(&dp, next, 5_000)?
            } else {
                established(&dp, 1_000, 20_000)?
            });
        }
        Ok(median(&mut medians))
    })??;
    let what = if new_flows { "new flow" } else { "established flow" };
    println!("{what}: {median_ns:.1} ns per packet (median of single runs)");
    Ok(())
}
