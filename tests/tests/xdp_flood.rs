//! The XDP path under hostile clients, end to end in namespaces (issue 12): a spoofed SYN flood
//! ten times `max_flows` while 50 keep-alive connections are held, and SNAT port exhaustion by
//! SYNs whose SYN-ACKs the client drops. Each writes a row for RELIABILITY.md
//! (`lb_tests::rel`); the counters quoted are the program's own (`/stats`).
use std::{
    collections::BTreeMap,
    net::TcpStream,
    time::{Duration, Instant},
};

use lb_tests::{
    client::{connect_in, hold, keepalive_get},
    flood, rel,
    scenario::{Scenario, TIMEOUT, WEB},
    topology::CLIENT4,
    wait_until,
};

/// The flow table's size in the flood test: small, so that ten times it is a short flood.
const MAX_FLOWS: u32 = 4096;
/// Packets per second of the floods: the reproduction sent 40,960 SYNs in 0.2 s.
const FLOOD_RATE: u64 = 200_000;
/// Keep-alive connections held through the flood.
const HELD: usize = 50;

/// How far each counter moved between two readings of `/stats`' reasons (only those that did).
fn moved(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d != 0)
        .collect()
}

/// One request on each held connection: failures as (index, error), where answering from
/// another backend than at first is a failure too.
fn ask_all(held: &mut [(String, TcpStream)]) -> Vec<(usize, String)> {
    let mut failures = Vec::new();
    for (i, (who, c)) in held.iter_mut().enumerate() {
        match keepalive_get(c) {
            Ok(b) if b == *who => {}
            Ok(b) => failures.push((i, format!("answered by {b}, was {who}"))),
            Err(e) => failures.push((i, format!("{e:#}"))),
        }
    }
    failures
}

/// Spoofed SYNs to [`WEB`] at [`FLOOD_RATE`], each round as many as are still missing, until
/// the program has seen `target` new flows since `before` (some are lost to the veth queue),
/// at most 8 rounds: what was sent, and the new flows seen.
fn flood_until_seen(
    s: &lb_tests::scenario::Running,
    before: &BTreeMap<String, u64>,
    target: u64,
) -> (flood::Sent, u64) {
    let (mut sent, mut seen) = (flood::Sent::default(), 0);
    for _ in 0..8 {
        let first = sent.packets as u32;
        let syns = flood::spoofed_syns(first..first + (target - seen) as u32, WEB);
        sent.add(flood::send(s.client(), &syns, FLOOD_RATE).expect("flood"));
        let now = s.lb().reasons().expect("stats");
        seen = now["flow_new"] - before.get("flow_new").copied().unwrap_or(0);
        if seen >= target {
            break;
        }
    }
    (sent, seen)
}

/// Issue 12's reproduction (0–8 of 30 held connections survived 40,960 spoofed SYNs with
/// `max_flows = 4096`), as a test: unconfirmed flows live in tables of their own, so a flood
/// evicts only its own kind and every established flow keeps working during and after it.
#[test]
fn a_syn_flood_ten_times_max_flows_leaves_held_connections_working() {
    lb_tests::privileged!();
    let unconfirmed = MAX_FLOWS / 4;
    let s = Scenario::topology(1)
        .xdp_extra(&format!("max_flows = {MAX_FLOWS}\nmax_unconfirmed_flows = {unconfirmed}\n"))
        .xdp_service("")
        .start()
        .expect("lb run");
    s.topo().route_to_client(flood::SPOOFED).unwrap();
    let mut held = hold(s.client(), WEB, HELD, TIMEOUT).unwrap();
    let before = s.lb().reasons().unwrap();

    let target = u64::from(10 * MAX_FLOWS);
    let (sent, flood_new, rounds, during) = std::thread::scope(|scope| {
        let flooding = scope.spawn(|| flood_until_seen(&s, &before, target));
        // Rounds of one request per held connection for as long as the flood runs, and one more.
        let (mut rounds, mut during) = (0, Vec::new());
        loop {
            let last = flooding.is_finished();
            during.extend(ask_all(&mut held).into_iter().map(|f| (rounds, f)));
            rounds += 1;
            if last {
                break;
            }
        }
        let (sent, seen) = flooding.join().expect("flood thread");
        (sent, seen, rounds, during)
    });
    let after_failures = ask_all(&mut held);
    let fresh = s.get(WEB);
    let after = s.lb().reasons().unwrap();
    let d = moved(&before, &after);
    let get = |k: &str| d.get(k).copied().unwrap_or(0);

    let injected = format!(
        "{} spoofed SYNs from {} in {:.2} s ({:.0}/s, {} refused by the sender's queue), sent \
         until the program had seen 10 × max_flows = {target} of them (max_flows = {MAX_FLOWS}, \
         max_unconfirmed_flows = {unconfirmed}), while {HELD} keep-alive connections were held \
         through the XDP VIP",
        sent.packets,
        flood::SPOOFED,
        sent.elapsed.as_secs_f64(),
        sent.rate(),
        sent.refused,
    );
    let observed = format!(
        "{HELD} of {HELD} held connections: {} requests in {rounds} rounds during the flood, \
         {} failed; after it {} of {HELD} failed; a new connection after it: {}; the program \
         saw {flood_new} new flows during the flood ({} in all), {} confirmed, so at least {} unconfirmed entries were evicted from \
         LB_FLOWS_NEW/LB_NAT_NEW (LRU evictions are not counted themselves); drop_not_syn {}, \
         drop_unconfirmed_lost {}, drop_map_full {}, drop_no_port {}",
        rounds * HELD,
        during.len(),
        after_failures.len(),
        if fresh.is_ok() { "ok" } else { "FAILED" },
        get("flow_new"),
        get("flow_confirmed"),
        flood_new.saturating_sub(u64::from(unconfirmed)),
        get("drop_not_syn"),
        get("drop_unconfirmed_lost"),
        get("drop_map_full"),
        get("drop_no_port"),
    );
    let pass = during.is_empty() && after_failures.is_empty() && fresh.is_ok();
    rel::record("SYN flood (XDP)", &injected, &observed, pass);
    assert!(during.is_empty(), "held connections failed during the flood: {during:?}; {d:?}");
    assert!(after_failures.is_empty(), "held connections failed after it: {after_failures:?}");
    fresh.expect("a new connection after the flood");
    // Ten times max_flows reached the program, and it made a flow of every SYN it saw.
    assert!(flood_new >= target, "{sent:?}: {d:?}");
    assert_eq!(
        (get("drop_not_syn"), get("drop_map_full"), get("drop_no_port")),
        (0, 0, 0),
        "{d:?}"
    );
}

/// The SNAT port range of the exhaustion test: 64 ports.
const NAT_PORTS: [u16; 2] = [40000, 40063];
/// `tcp_syn_timeout` of the exhaustion test, seconds.
const SYN_TIMEOUT: u64 = 2;
/// Where the exhausting client's SYNs come from (its SYN-ACKs are dropped there).
const ATTACK_PORTS: [u16; 2] = [20000, 20079];

/// Issue 12, item 1: a client that sends SYNs from many ports and drops the SYN-ACKs (no
/// spoofing) holds the 64 SNAT ports only for `tcp_syn_timeout`: a legitimate client is
/// refused while they are held, and connects once that time has passed.
#[test]
fn ports_held_by_unanswered_syns_come_back_after_tcp_syn_timeout() {
    lb_tests::privileged!();
    let [lo, hi] = NAT_PORTS;
    let s = Scenario::topology(1)
        .xdp_extra(&format!("nat_ports = [{lo}, {hi}]\ntcp_syn_timeout = {SYN_TIMEOUT}\n"))
        .xdp_service("")
        .start()
        .expect("lb run");
    let [first, last] = ATTACK_PORTS;
    flood::drop_synacks(s.client(), first, last).unwrap();
    let before = s.lb().reasons().unwrap();
    let counter = |k: &str| {
        let now = s.lb().reasons().expect("stats");
        now.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0)
    };
    let syns = flood::syns_from(CLIENT4.into(), first..last + 1, WEB);
    let attacked = Instant::now();
    flood::send(s.client(), &syns, FLOOD_RATE).unwrap();
    let ports = u64::from(hi - lo + 1);
    let refused = syns.len() as u64 - ports;
    let counted = wait_until(Duration::from_secs(1), || counter("drop_no_port") >= refused);
    let held = (counter("flow_new"), counter("drop_no_port"));

    // The legitimate client (kernel-chosen ports, whose SYN-ACKs pass) while they are held.
    let early = connect_in(s.client(), None, WEB, Duration::from_millis(500));
    let refusals = counter("drop_no_port") - held.1;
    let early_at = attacked.elapsed();

    // Past tcp_syn_timeout (the program's clock is coarse: a few ms of slack).
    let expiry = attacked + Duration::from_secs(SYN_TIMEOUT) + Duration::from_millis(100);
    std::thread::sleep(expiry.saturating_duration_since(Instant::now()));
    let retransmits = rel::syn_retransmits(s.client());
    let began = Instant::now();
    let late = s.get(WEB);
    let took = began.elapsed();
    let retransmits = rel::syn_retransmits(s.client()) - retransmits;
    let (expired, reclaimed) = (counter("flow_expired_syn"), counter("port_reclaimed"));

    let injected = format!(
        "{} SYNs from {CLIENT4} ports {first}-{last}, whose SYN-ACKs the client drops \
         (nftables), against nat_ports = [{lo}, {hi}] ({ports} ports), tcp_syn_timeout = \
         {SYN_TIMEOUT} s; then a legitimate client connects at once and after the timeout",
        syns.len()
    );
    let observed = format!(
        "{} SYNs took a port, {} refused (drop_no_port); the legitimate client {} at {:.2} s \
         ({refusals} SYN refused); after the timeout it {} in {:.2} s ({retransmits} SYN \
         retransmissions); flow_expired_syn {expired}, port_reclaimed {reclaimed}",
        held.0,
        held.1,
        if early.is_ok() { "CONNECTED" } else { "was refused" },
        early_at.as_secs_f64(),
        match &late {
            Ok(_) => "got its answer".to_string(),
            Err(e) => format!("FAILED ({e:#})"),
        },
        took.as_secs_f64(),
    );
    let pass = counted && held == (ports, refused) && early.is_err() && refusals >= 1;
    let pass = pass && late.is_ok() && expired >= 1 && reclaimed >= 1;
    rel::record("SNAT port exhaustion (XDP)", &injected, &observed, pass);
    assert_eq!(held, (ports, refused), "every port taken, the rest refused");
    assert!(early_at < Duration::from_secs(SYN_TIMEOUT), "too slow to test the held ports");
    assert!(early.is_err() && refusals >= 1, "{observed}");
    assert_eq!(late.expect("connects after tcp_syn_timeout"), "backend-1");
    assert!(expired >= 1 && reclaimed >= 1, "{observed}");
}
