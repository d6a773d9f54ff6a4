//! Faults under continuous load, end to end in namespaces (issue 8): `lb run` SIGKILLed and
//! started again; a backend process killed, its link set down, a backend that never answers,
//! one that resets mid-response. Each run writes a row for RELIABILITY.md (`lb_tests::rel`).
use std::{
    net::TcpStream,
    time::{Duration, Instant},
};

use lb_tests::{
    backends::Reply,
    client::{connect_in, hold, keepalive_get},
    conf,
    load::{Load, LoadReport},
    netns::Netns,
    rel,
    scenario::{L7, Running, Scenario, Serve, TIMEOUT, WEB},
};

/// Health checks: interval 0.2 s, timeout 0.2 s, fall 2: down within 0.4–0.6 s.
const HEALTH_BOUND: Duration = Duration::from_millis(600);
/// What the bound gets on a loaded 2-core machine (checker rounds, CLI polling).
const SLACK: Duration = Duration::from_millis(1500);

/// Three backend processes behind XDP service `web` (five-tuple hash, so one client address
/// spreads over every backend) and L7 group `app`, both health-checked when `health` is set.
fn start(health: bool) -> Running {
    let s = Scenario::topology(3).serve(Serve::Process).xdp_service("hash = \"five-tuple\"\n");
    let s = s.l7("public", L7, "connect_timeout_ms = 300\nresponse_timeout_ms = 1000\n");
    let checks = if health {
        conf::fast_health("web", "http") + &conf::fast_health("app", "http")
    } else {
        String::new()
    };
    s.config(&checks).start().expect("lb run")
}

/// Load from the client namespace: `threads` threads to `target` for at most `limit`.
fn load(s: &Running, target: std::net::SocketAddr, threads: usize, limit: Duration) -> Load {
    Load::builder(s.client(), vec![target]).threads(threads).limit(limit).start()
}

/// Keep-alive connections through the VIP, each with the backend that answered.
fn hold_flows(ns: &Netns, n: usize) -> Vec<(String, TcpStream)> {
    hold(ns, WEB, n, TIMEOUT).expect("held flows")
}

#[test]
fn sigkill_and_restart_keeps_xdp_forwarding() {
    lb_tests::privileged!();
    let mut s = start(false);
    let l7 = L7;
    let kills = rel::scaled(2, 10);

    let xdp = load(&s, WEB, 2, Duration::from_secs(300));
    let l7_load = load(&s, l7, 1, Duration::from_secs(300));
    xdp.wait_for(50);
    let mut held_l7_lost = 0;
    let mut held_l7 = 0;
    let mut windows = Vec::new();
    for _ in 0..kills {
        // Keep-alive L7 connections open on the process about to die.
        let mut open: Vec<TcpStream> = (0..10)
            .map(|_| {
                let mut c = connect_in(s.client(), None, l7, TIMEOUT).unwrap();
                keepalive_get(&mut c).expect("L7 keep-alive request");
                c
            })
            .collect();
        held_l7 += open.len();
        let killed = xdp.start.elapsed();
        s.lb_mut().kill().expect("SIGKILL lb run");
        let down = Instant::now();
        std::thread::sleep(Duration::from_millis(200));
        s.lb_mut().restart().expect("restart after SIGKILL");
        let ready = xdp.start.elapsed();
        windows.push((killed, ready, down.elapsed()));
        let status = s.lb().json(&["status"]).unwrap();
        assert_eq!(status["adopted"], true, "the new daemon adopts the pinned maps: {status}");
        for c in &mut open {
            if keepalive_get(c).is_err() {
                held_l7_lost += 1;
            }
        }
        xdp.wait_for(100);
        l7_load.wait_for(20);
    }
    let x = xdp.stop();
    let l = l7_load.stop();
    // L7 failures must all have begun while the daemon was away (or within 0.5 s of it
    // answering again: a connection accepted in the backlog of the dead socket).
    let outside: Vec<_> = l
        .failures
        .iter()
        .filter(|(t, ..)| {
            !windows.iter().any(|(k, r, _)| *t + Duration::from_millis(50) >= *k && *t <= *r)
        })
        .collect();
    let gap: Duration = windows.iter().map(|w| w.2).sum::<Duration>() / kills as u32;
    let observed = format!(
        "XDP: {} requests, {} failed; L7: {} requests, {} failed, all begun while lb was away \
         (mean gap kill→ready {gap:.2?}); {held_l7_lost} of {held_l7} L7 keep-alive connections \
         open on the killed process lost",
        x.ok + x.failed,
        x.failed,
        l.ok + l.failed,
        l.failed
    );
    let pass = x.failed == 0 && outside.is_empty() && l.ok > 0;
    rel::record(
        "lb run SIGKILL + restart",
        &format!("{kills}× SIGKILL of `lb run`, restart 0.2 s later, under new-connection load"),
        &observed,
        pass,
    );
    assert_eq!(x.failed, 0, "XDP requests failed: {:?}", x.sample_failures());
    assert!(outside.is_empty(), "L7 failures outside the down windows: {outside:?}");
    assert_eq!(held_l7_lost, held_l7, "a connection on a killed process cannot survive");
}

/// What is done to backend-3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injected {
    Killed,
    LinkDown,
    Silent,
    Reset,
}

fn backend_fault(what: Injected, label: &str) {
    let s = start(true);
    let lb = s.lb();
    let b3 = s.backends[2].to_string();
    let state = |service: &str| -> String {
        let v = lb.json(&["backend", "list", service]).expect("backend list");
        v["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["addr"] == b3.as_str())
            .map(|b| b["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert!(
        lb_tests::wait_until(Duration::from_secs(5), || state("web") == "up"
            && state("app") == "up"),
        "backends up before the fault"
    );
    let mut held: Vec<(String, TcpStream)> =
        hold_flows(s.client(), 9).into_iter().filter(|(w, _)| w != "backend-3").collect();
    assert!(!held.is_empty(), "a held flow to a healthy backend");

    let xdp = load(&s, WEB, 2, Duration::from_secs(60));
    let l7_load = load(&s, L7, 1, Duration::from_secs(60));
    xdp.wait_for(60);
    l7_load.wait_for(30);

    let injected_at = xdp.start.elapsed();
    match what {
        Injected::Killed => s.stop_backend(2),
        Injected::LinkDown => {
            s.backend_ns(2).ip(&["link", "set", "eth0", "down"]).unwrap();
        }
        Injected::Silent => s.replace_backend(2, Reply::Silent).unwrap(),
        Injected::Reset => s.replace_backend(2, Reply::ResetMidResponse).unwrap(),
    }
    let t0 = Instant::now();
    let (mut web_down, mut app_down) = (None, None);
    let mut held_failed = 0;
    while t0.elapsed() < HEALTH_BOUND + SLACK && (web_down.is_none() || app_down.is_none()) {
        if web_down.is_none() && state("web") == "down" {
            web_down = Some(t0.elapsed());
        }
        if app_down.is_none() && state("app") == "down" {
            app_down = Some(t0.elapsed());
        }
        for (who, s) in &mut held {
            match keepalive_get(s) {
                Ok(w) if w == *who => {}
                _ => held_failed += 1,
            }
        }
    }
    // Load keeps going after the ejection.
    xdp.wait_for(100);
    l7_load.wait_for(50);
    for (who, s) in &mut held {
        match keepalive_get(s) {
            Ok(w) if w == *who => {}
            _ => held_failed += 1,
        }
    }
    let x = xdp.stop();
    let l = l7_load.stop();
    let ms =
        |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{} ms", d.as_millis()));
    // A request that began after the ejection (plus one checker round of slack) must not fail.
    let after = |d: Option<Duration>, r: &LoadReport| {
        let cut = injected_at + d.unwrap_or(Duration::MAX / 4) + Duration::from_millis(200);
        r.failures.iter().filter(|(t, ..)| *t > cut).count()
    };
    let (x_after, l_after) = (after(web_down, &x), after(app_down, &l));
    // Requests retried on another backend: a refused or reset connection never reaches the
    // client for GET; a silent backend or a dead link costs a response timeout (504), or an
    // XDP connect timeout, until the ejection.
    let l7_retried = matches!(what, Injected::Killed | Injected::Reset);
    let observed = format!(
        "down after XDP {} / L7 {} (bound {} ms, asserted with {} ms of polling slack); XDP {} requests, {} failed before ejection, \
         {x_after} after; L7 {} requests, {} failed{}, {l_after} after ejection; {} held flows \
         to healthy backends: {held_failed} failures",
        ms(web_down),
        ms(app_down),
        HEALTH_BOUND.as_millis(),
        SLACK.as_millis(),
        x.ok + x.failed,
        x.failed - x_after as u64,
        l.ok + l.failed,
        l.failed,
        if l7_retried { " (GET retried elsewhere)" } else { "" },
        held.len()
    );
    let within = |d: Option<Duration>| d.is_some_and(|d| d <= HEALTH_BOUND + SLACK);
    let pass = within(web_down)
        && within(app_down)
        && x_after == 0
        && l_after == 0
        && held_failed == 0
        && (!l7_retried || l.failed == 0);
    rel::record(
        &format!("backend fault: {label}"),
        &format!("{label} (backend-3 of 3) under XDP + L7 load; health http 0.2 s × fall 2"),
        &observed,
        pass,
    );
    assert!(within(web_down) && within(app_down), "{observed}");
    assert_eq!(held_failed, 0, "flows to healthy backends broke: {observed}");
    assert_eq!(x_after, 0, "XDP failures after the ejection: {:?}", x.sample_failures());
    assert_eq!(l_after, 0, "L7 failures after the ejection: {:?}", l.sample_failures());
    if l7_retried {
        assert_eq!(l.failed, 0, "idempotent GETs not retried: {:?}", l.sample_failures());
    }
}

/// One test per injected fault, each a row of its own in RELIABILITY.md.
macro_rules! fault_tests {
    ($($name:ident: $what:ident, $label:literal;)*) => {$(
        #[test]
        fn $name() {
            lb_tests::privileged!();
            backend_fault(Injected::$what, $label);
        }
    )*};
}

fault_tests! {
    backend_process_killed: Killed, "backend process SIGKILLed";
    backend_link_down: LinkDown, "backend namespace link set down";
    backend_accepts_but_never_answers: Silent, "backend accepts, never answers";
    backend_resets_mid_response: Reset, "backend resets mid-response";
}
