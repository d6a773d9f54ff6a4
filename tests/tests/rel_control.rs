//! Control-plane changes under load (issue 8): backend set churn (add, drain, remove every
//! 100 ms) with held XDP flows, and reload storms alternating valid and invalid configs.
//! Short versions here; `cargo xtask reliability` (LB_REL_FULL=1) runs a minute of churn and
//! 100 reloads.
use std::{
    collections::BTreeMap,
    net::{IpAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    client::{connect_in, keepalive_get},
    conf,
    load::Load,
    rel,
    scenario::{L7, Scenario, TIMEOUT, WEB},
};

#[test]
fn backend_churn_keeps_established_flows() {
    lb_tests::privileged!();
    let s = Scenario::topology(4);
    let addr = |i: usize| s.backend_addrs()[i].to_string();
    let service = conf::xdp_service(
        "web",
        WEB,
        &conf::list([addr(0), addr(1), addr(3)]),
        "hash = \"five-tuple\"\n",
    );
    let s = s.xdp_raw(&service).start().expect("lb run");
    let (lb, topo, admin) = (s.lb(), s.topo(), s.admin());
    let addr = |i: usize| s.backends[i].to_string();

    // Held keep-alive flows (five-tuple hash, so they and the load spread over every backend):
    // those on the two backends that never leave must answer from the same backend throughout.
    let clients: Vec<IpAddr> = topo.add_client_addresses(60).unwrap();
    let mut held: Vec<(String, TcpStream)> = clients
        .iter()
        .take(24)
        .map(|c| {
            let mut c = connect_in(&topo.client, Some(*c), WEB, TIMEOUT).unwrap();
            (keepalive_get(&mut c).expect("held flow"), c)
        })
        .collect();
    let held_on: BTreeMap<String, u64> = held.iter().fold(BTreeMap::new(), |mut m, (w, _)| {
        *m.entry(w.clone()).or_default() += 1;
        m
    });

    let retrans_before = rel::syn_retransmits(&topo.client);
    let load =
        Load::builder(&topo.client, vec![WEB]).threads(2).limit(Duration::from_secs(120)).start();
    let run_for = rel::scaled(Duration::from_secs(10), Duration::from_secs(60));
    let start = Instant::now();
    let mut ops = 0u64;
    let mut op_errors = Vec::new();
    let mut held_failures = Vec::new();
    let mut held_uses = 0u64;
    // Backends 3 and 4 go round add → drain → remove, out of step with each other (4 starts
    // in the table).
    let mut phase = [0usize, 1usize];
    let mut tick = Instant::now();
    while start.elapsed() < run_for {
        for (k, p) in phase.iter_mut().enumerate() {
            let a = addr(2 + k);
            let r = match *p {
                0 => admin.send(
                    "POST",
                    "/services/web/backends",
                    Some(serde_json::json!({ "addr": a, "weight": 1 })),
                ),
                1 => admin.request("POST", &format!("/services/web/backends/{a}/drain")),
                _ => admin.request("DELETE", &format!("/services/web/backends/{a}")),
            };
            ops += 1;
            match r {
                Ok((200, _)) => {}
                other => op_errors.push(format!("{a} phase {p}: {other:?}")),
            }
            *p = (*p + 1) % 3;
        }
        for (i, (who, s)) in held.iter_mut().enumerate() {
            if who != "backend-1" && who != "backend-2" {
                continue;
            }
            held_uses += 1;
            match keepalive_get(s) {
                Ok(w) if w == *who => {}
                other => held_failures.push(format!("held flow {i} on {who}: {other:?}")),
            }
        }
        tick += Duration::from_millis(100);
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
    let report = load.stop();
    let retrans = rel::syn_retransmits(&topo.client) - retrans_before;

    // Flows per backend against what the backends saw: each fresh request is one flow, each
    // held connection one more, for the two backends that never left. The table may count a
    // few more: a SYN the backend turns away (its TIME_WAIT still holds the SNAT port from an
    // earlier client tuple; at ~400 connections/s per backend, 60 s of TIME_WAIT covers most of
    // the 31k ports) is answered with an ACK, the client resets and retries the SYN 1 s later,
    // and the retry is a new flow. Each extra flow is such a client SYN retransmission.
    let stats = lb.json(&["backend", "list", "web"]).unwrap();
    let backends = stats["services"][0]["backends"].as_array().unwrap().clone();
    let flows_of = |a: &str| {
        backends.iter().find(|b| b["addr"] == a).and_then(|b| b["flows"].as_u64()).unwrap_or(0)
    };
    let mut mismatch = Vec::new();
    let mut per_backend = Vec::new();
    let mut extra = 0;
    for (i, name) in [(0, "backend-1"), (1, "backend-2")] {
        let expected =
            report.seen.get(name).copied().unwrap_or(0) + held_on.get(name).copied().unwrap_or(0);
        let flows = flows_of(&addr(i));
        per_backend.push(format!("{name} {flows} flows / {expected} connections"));
        extra += flows.saturating_sub(expected);
        if flows < expected {
            mismatch.push(format!("{name}: table {flows} flows, backend saw {expected}"));
        }
    }
    if extra > retrans {
        mismatch.push(format!("{extra} extra flows but only {retrans} client SYN retransmissions"));
    }
    let slots: u64 = backends.iter().map(|b| b["slots"].as_u64().unwrap_or(0)).sum();
    let held_survivors = held.iter().filter(|(w, _)| w == "backend-1" || w == "backend-2").count();
    let observed = format!(
        "{ops} admin changes in {:.1} s ({} refused); {held_survivors} held flows to surviving \
         backends used {held_uses} times, {} failed; new connections (any backend, \
         removed ones too): {} ok, {} failed; {} ({extra} extra flows, {retrans} \
         client SYN retransmissions); slots sum {slots}",
        start.elapsed().as_secs_f64(),
        op_errors.len(),
        held_failures.len(),
        report.ok,
        report.failed,
        per_backend.join(", "),
    );
    let pass =
        held_failures.is_empty() && op_errors.is_empty() && mismatch.is_empty() && slots == 65537;
    rel::record(
        "backend set churn",
        &format!(
            "add/drain/remove of 2 of 4 backends every 100 ms for {} s under load",
            run_for.as_secs()
        ),
        &observed,
        pass,
    );
    assert!(held_survivors > 0, "no held flow on a surviving backend: {held_on:?}");
    assert!(held_failures.is_empty(), "{held_failures:?}");
    assert!(op_errors.is_empty(), "{op_errors:?}");
    assert!(mismatch.is_empty(), "{mismatch:?}; {observed}");
    assert_eq!(slots, 65537, "every Maglev slot has a backend");
}

#[test]
fn reload_storm_fails_no_request() {
    lb_tests::privileged!();
    let s = Scenario::topology(3).xdp_service("").l7("public", L7, "").start().expect("lb run");
    let config = |weights: [u32; 3], valid: bool| {
        let list = conf::weighted(s.backends.iter().zip(weights));
        // Invalid in two ways that validation catches: a weight of 0 and an unknown route
        // upstream (the TOML itself parses).
        let broken =
            if valid { "" } else { "[[http.route]]\nlistener = \"public\"\nupstream = \"nope\"\n" };
        let xdp = if valid { list.clone() } else { list.replace("weight = 1", "weight = 0") };
        [
            conf::xdp(s.interfaces(), ""),
            conf::xdp_service("web", WEB, &xdp, ""),
            conf::l7("public", L7, "app", &s.backend_list(), ""),
            broken.to_string(),
        ]
        .concat()
    };
    let (lb, admin) = (s.lb(), s.admin());
    let load =
        Load::builder(s.client(), vec![WEB, L7]).threads(2).limit(Duration::from_secs(300)).start();
    load.wait_for(50);
    // 100 reloads take a few seconds: the full count in the default command too.
    let reloads = 100;
    let (mut applied, mut refused, mut wrong) = (0, 0, Vec::new());
    let start = Instant::now();
    for i in 0..reloads {
        let valid = i % 2 == 0;
        // Valid ones alternate weights (Maglev slots move; tracked flows stay).
        let weights = if i % 4 == 0 { [1, 2, 1] } else { [1, 1, 1] };
        lb.write_config(&config(weights, valid)).unwrap();
        let (status, body) = admin.request("POST", "/reload").unwrap();
        match (valid, status) {
            (true, 200) => applied += 1,
            (false, s) if s != 200 => refused += 1,
            _ => wrong.push(format!("reload {i} (valid {valid}): {status} {body}")),
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    let took = start.elapsed();
    load.wait_for(50);
    let report = load.stop();
    let observed = format!(
        "{applied} applied, {refused} refused in {:.1} s; {} requests (XDP + L7, fresh \
         connections), {} failed",
        took.as_secs_f64(),
        report.ok + report.failed,
        report.failed
    );
    let pass = wrong.is_empty() && report.failed == 0;
    rel::record(
        "reload storm",
        &format!("{reloads} reloads alternating valid (weights changed) and invalid configs"),
        &observed,
        pass,
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(report.failed, 0, "{:?}", report.sample_failures());
}
