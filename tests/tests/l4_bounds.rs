//! Issue 13's bounds and policies of the userspace L4 proxy: per-source limits (TCP and UDP,
//! the extra refused and counted, other sources unaffected) and each `balance` policy, in
//! process on loopback (no root); the memory of 10,000 UDP sessions and the two reload cases
//! through `lb run` in a namespace (root).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use lb_tests::{
    backends::{echo_backend, udp_echo},
    client::greeted,
    conf,
    l4::{L4Harness, xdp_choice},
};
use lb_user::{config::Config, l4::ErrorKind};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A UDP client from `source` to `target`: the reply to one datagram, if one came in `wait`.
fn udp_from(source: &str, target: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind((ip(source), 0)).unwrap();
    s.connect(target).unwrap();
    s
}

fn ask(s: &UdpSocket, wait: Duration) -> Option<String> {
    s.set_read_timeout(Some(wait)).unwrap();
    s.send(b"q").unwrap();
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_limits_refuse_the_extra_count_it_and_spare_other_sources() {
    let echo = echo_backend("127.0.0.1:0".parse().unwrap(), "echo").await;
    let dns = udp_echo("127.0.0.1:0".parse().unwrap(), "u").await;
    let config = [
        conf::tcp_over("tcp", &format!("\"{echo}\""), "max_connections_per_source = 3\n"),
        conf::tcp_over(
            "udp",
            &format!("\"{dns}\""),
            "protocol = \"udp\"\nmax_sessions_per_source = 2\n",
        ),
    ]
    .concat();
    let h = L4Harness::start(&config, Default::default()).await;
    let (tcp, udp) = (h.addr("tcp"), h.addr("udp"));

    let held = tokio::task::spawn_blocking(move || {
        let held: Vec<_> = (0..3).map(|_| greeted(tcp, Some(ip("127.0.0.2"))).unwrap()).collect();
        // The fourth from the same address: closed at once, before any byte is relayed. The
        // reset can beat the connect's own completion check, so a refused connect counts too.
        match lb_tests::client::connect_from(Some(ip("127.0.0.2")), tcp, lb_tests::T) {
            Ok(mut s) => {
                let mut b = Vec::new();
                let _ = std::io::Read::read_to_end(&mut s, &mut b);
                assert!(b.is_empty(), "the 4th connection of one source was relayed: {b:?}");
            }
            Err(e) => {
                let reset = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
                assert_eq!(reset, Some(std::io::ErrorKind::ConnectionReset), "{e:#}");
            }
        }
        // Another source is not affected.
        assert_eq!(greeted(tcp, Some(ip("127.0.0.3"))).unwrap().0, "echo");
        held
    })
    .await
    .unwrap();
    h.wait_for("tcp", "one refusal counted", |s| s.errors(ErrorKind::SourceLimit) == 1).await;
    drop(held);
    // Places are given back when connections end.
    h.wait_for("tcp", "held connections closed", |s| {
        s.active.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    let again =
        tokio::task::spawn_blocking(move || greeted(tcp, Some(ip("127.0.0.2"))).map(|g| g.0));
    assert_eq!(again.await.unwrap().unwrap(), "echo");

    tokio::task::spawn_blocking(move || {
        // Sessions are per address and port: two sockets of 127.0.0.2 get sessions, a third not.
        let a = udp_from("127.0.0.2", udp);
        let b = udp_from("127.0.0.2", udp);
        let c = udp_from("127.0.0.2", udp);
        assert_eq!(ask(&a, lb_tests::T).as_deref(), Some("u:q"));
        assert_eq!(ask(&b, lb_tests::T).as_deref(), Some("u:q"));
        assert_eq!(ask(&c, Duration::from_millis(300)), None, "a third session of one source");
        assert_eq!(ask(&a, lb_tests::T).as_deref(), Some("u:q"), "the first two still served");
        let d = udp_from("127.0.0.3", udp);
        assert_eq!(ask(&d, lb_tests::T).as_deref(), Some("u:q"), "another source is not affected");
    })
    .await
    .unwrap();
    assert!(h.stats("udp").errors(ErrorKind::SourceLimit) >= 1);
    assert_eq!(h.stats("udp").udp_sessions_created.load(std::sync::atomic::Ordering::Relaxed), 3);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_l4_policy_distributes_as_documented() {
    let mut backends = Vec::new();
    for name in ["b1", "b2", "b3"] {
        backends.push(echo_backend("127.0.0.1:0".parse().unwrap(), name).await);
    }
    let list = conf::list(&backends);
    let config = [
        conf::upstream("rr", &list) + "balance = \"round-robin\"\n",
        conf::upstream("lc", &list) + "balance = \"least-conn\"\n",
        conf::upstream("hash", &list),
        conf::tcp("rr", "127.0.0.1:0", "upstream = \"rr\"\n"),
        conf::tcp("lc", "127.0.0.1:0", "upstream = \"lc\"\n"),
        conf::tcp("hash", "127.0.0.1:0", "upstream = \"hash\"\n"),
    ]
    .concat();
    let parsed = Config::parse(&config).unwrap();
    let h = L4Harness::start(&config, Default::default()).await;
    let (rr, lc, hash) = (h.addr("rr"), h.addr("lc"), h.addr("hash"));
    let names: HashMap<SocketAddr, String> =
        backends.iter().zip(["b1", "b2", "b3"]).map(|(a, n)| (*a, n.to_string())).collect();

    // round-robin: one client's 30 connections, 10 to each backend.
    let counts = tokio::task::spawn_blocking(move || {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..30 {
            *counts.entry(greeted(rr, None).unwrap().0).or_default() += 1;
        }
        counts
    })
    .await
    .unwrap();
    assert!(counts.len() == 3 && counts.values().all(|&n| n == 10), "round-robin: {counts:?}");

    // least-conn: three held connections reach three backends; when one closes, the next
    // connection goes to the backend it left.
    let (mut held, freed) = tokio::task::spawn_blocking(move || {
        let held: Vec<_> = (0..3).map(|_| greeted(lc, None).unwrap()).collect();
        let mut who: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
        who.sort();
        assert_eq!(who, ["b1", "b2", "b3"], "least-conn over idle backends");
        let freed = held[1].0.clone();
        (held, freed)
    })
    .await
    .unwrap();
    held.remove(1);
    h.wait_for("lc", "the closed connection ended", |s| {
        s.active.load(std::sync::atomic::Ordering::Relaxed) == 2
    })
    .await;
    let next = tokio::task::spawn_blocking(move || {
        (0..3).map(|_| greeted(lc, None).unwrap()).collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(next[0].0, freed, "least-conn prefers the backend with fewer open connections");
    drop((held, next));

    // hash-source-ip (the default): each client sticks to the backend the XDP path picks.
    tokio::task::spawn_blocking(move || {
        let mut seen = std::collections::HashSet::new();
        for i in 2..12u8 {
            let client = ip(&format!("127.0.0.{i}"));
            let want = &names[&xdp_choice(&parsed, "hash", client)];
            for _ in 0..4 {
                assert_eq!(&greeted(hash, Some(client)).unwrap().0, want, "client {client}");
            }
            seen.insert(want.clone());
        }
        assert!(seen.len() >= 2, "clients spread: {seen:?}");
    })
    .await
    .unwrap();
    h.stop().await;
}

/// The bound the issue sets per UDP session, and the slack for what any run grows by (the
/// allocator's arenas, the session table's doublings, the reply buffers of the worker threads).
const SESSION_BYTES: u64 = 4096;
const SLACK_KB: u64 = 8 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_udp_sessions_cost_lb_under_4_kib_each() {
    lb_tests::privileged!();
    lb_tests::procs::raise_nofile();
    let ns = lb_tests::netns::Netns::new("udpmem").unwrap();
    let u = ns.run(|| UdpSocket::bind("127.0.0.1:7053")).unwrap().unwrap();
    lb_tests::backends::udp_echo_on(u, "u");
    let config = [
        conf::upstream("dns", "\"127.0.0.1:7053\""),
        conf::tcp(
            "dns",
            "127.0.0.1:15353",
            "protocol = \"udp\"\nupstream = \"dns\"\nmax_connections = 20000\nidle_timeout = 600\n",
        ),
    ]
    .concat();
    let lb = lb_tests::lb::Lb::builder(&ns, config).start().expect("lb run");
    let target: SocketAddr = "127.0.0.1:15353".parse().unwrap();
    let ns2 = ns.share();
    // Warm up (threads, first allocations), then measure 10,000 more sessions of one 1,200-byte
    // datagram each, as the issue did.
    let (warm, got) = tokio::task::spawn_blocking(move || {
        lb_tests::load::udp_sessions(&ns2, target, 200, 1200, 25)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got, 200);
    let before = lb_tests::procs::sample(lb.pid()).rss_kb;
    let ns2 = ns.share();
    let (socks, got) = tokio::task::spawn_blocking(move || {
        lb_tests::load::udp_sessions(&ns2, target, 10_000, 1200, 25)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(got, 10_000, "every session answered");
    let after = lb_tests::procs::sample(lb.pid()).rss_kb;
    let stats: serde_json::Value =
        serde_json::from_str(&lb.admin().get("/stats").unwrap()).unwrap();
    assert_eq!(stats["l4"][0]["counters"]["udp_sessions_active"], 10_200);
    let grown = after.saturating_sub(before);
    let per_session = grown * 1024 / 10_000;
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "udp sessions: RSS {before} KiB -> {after} KiB for 10,000 sessions: {per_session} bytes each"
    );
    assert!(
        grown <= 10_000 * SESSION_BYTES / 1024 + SLACK_KB,
        "10,000 UDP sessions grew lb's RSS by {grown} KiB ({per_session} bytes a session)"
    );
    drop((warm, socks));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_keep_steering_an_l4_group_after_a_reload_changes_its_policy() {
    lb_tests::privileged!();
    let ns = lb_tests::netns::Netns::new("rpol").unwrap();
    let b1 = lb_tests::backends::HttpBackend::start(&ns, "127.0.0.1:7001".parse().unwrap(), "b1")
        .unwrap();
    let b2 = lb_tests::backends::HttpBackend::start(&ns, "127.0.0.1:7002".parse().unwrap(), "b2")
        .unwrap();
    // b2's weight changes with the policy: the group then holds a new backend object for it,
    // which only the group the checks steer knows unless the listener follows that group.
    let config = |balance: &str, w2: u32| {
        [
            conf::upstream("g", &conf::weighted([("127.0.0.1:7001", 1), ("127.0.0.1:7002", w2)])),
            format!("balance = \"{balance}\"\n"),
            conf::fast_health("g", "tcp"),
            conf::tcp("web", "127.0.0.1:18080", "upstream = \"g\"\n"),
        ]
        .concat()
    };
    let web: SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let lb = lb_tests::lb::Lb::builder(&ns, config("round-robin", 1))
        .wait_listening(&ns, web)
        .start()
        .expect("lb run");
    lb.write_config(&config("least-conn", 2)).unwrap();
    let out = lb.cli(&["reload"]).expect("reload");
    assert!(out.contains("balance round-robin → least-conn"), "{out}");
    // b2 goes away; the checks take it out of the group the listener balances over, so no
    // connection is even tried there (a connect failure would be retried on b1, unseen).
    drop(b2);
    // Many client addresses, so a source-hashing picker would also try b2 for some.
    let get = |ns: &lb_tests::netns::Netns, i: u8| {
        let source = Some(ip(&format!("127.0.0.{}", 2 + i)));
        lb_tests::client::http_get(ns, source, web, lb_tests::T).unwrap()
    };
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        let list = lb.cli(&["backend", "list", "g"]).unwrap_or_default();
        if list.lines().any(|l| l.contains("127.0.0.1:7002") && l.contains("down")) {
            break;
        }
    }
    let failures = lb.admin().metric("lb_l4_connect_failures_total{listener=\"web\"}");
    for i in 0..40 {
        assert_eq!(get(&ns, i), "b1");
    }
    assert_eq!(
        lb.admin().metric("lb_l4_connect_failures_total{listener=\"web\"}"),
        failures,
        "the listener still tried the backend the checks took out"
    );
    drop(b1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_l4_handoff_follows_a_reload_that_toggles_tls_on_its_l7_listener() {
    lb_tests::privileged!();
    let ns = lb_tests::netns::Netns::new("rtls").unwrap();
    let _app =
        lb_tests::backends::HttpBackend::start(&ns, "127.0.0.1:7080".parse().unwrap(), "app")
            .unwrap();
    let dir = lb_tests::http::temp_dir("handoff-reload");
    let first = lb_tests::http::write_cert(&dir, "first", &["*.example.com"]);
    let second = lb_tests::http::write_cert(&dir, "second", &["*.example.com"]);
    let config = |cert: Option<&lb_tests::http::TestCert>| {
        let tls = cert.map_or(String::new(), |c| {
            format!(
                "tls = [{{ cert = \"{}\", key = \"{}\" }}]\n",
                c.cert.display(),
                c.key.display()
            )
        });
        [
            conf::http_listener("public", "127.0.0.1:9443", &tls),
            conf::route("public", "app"),
            conf::upstream("app", "\"127.0.0.1:7080\""),
            conf::tcp(
                "edge",
                "127.0.0.1:8443",
                "sni = [ { host = \"*.example.com\", terminate = \"public\" } ]\n",
            ),
        ]
        .concat()
    };
    let edge: SocketAddr = "127.0.0.1:8443".parse().unwrap();
    let lb = lb_tests::lb::Lb::builder(&ns, config(Some(&first)))
        .wait_listening(&ns, edge)
        .start()
        .expect("lb run");
    let ders = [&first, &second].map(|c| rustls::pki_types::CertificateDer::from(c.der.clone()));
    let request = |ns: &lb_tests::netns::Netns| {
        let roots = lb_tests::tls::client_config(&[&ders[0], &ders[1]]);
        let get = b"GET / HTTP/1.1\r\nhost: www.example.com\r\nconnection: close\r\n\r\n";
        ns.run(move || lb_tests::tls::https_request(edge, "www.example.com", roots, get)).unwrap()
    };
    let (cert, response) = request(&ns).expect("handed off");
    assert_eq!(cert.as_ref(), Some(&ders[0]));
    assert!(response.trim_end().ends_with("app"), "{response}");

    // TLS off: the listener is rebuilt without TLS; hand-offs to it are refused and counted.
    lb.write_config(&config(None)).unwrap();
    let out = lb.cli(&["reload"]).expect("reload");
    assert!(out.contains("rebuilt (TLS changed)"), "{out}");
    let refused =
        lb.admin().metric("lb_l4_errors_total{listener=\"edge\",kind=\"handoff_failed\"}");
    assert!(request(&ns).is_err(), "a hand-off reached a listener that no longer terminates TLS");
    let mut counted = false;
    for _ in 0..100 {
        let now =
            lb.admin().metric("lb_l4_errors_total{listener=\"edge\",kind=\"handoff_failed\"}");
        if now == refused + 1 {
            counted = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(counted, "the refused hand-off was not counted");

    // TLS on again with another certificate: hand-offs reach the new listener.
    lb.write_config(&config(Some(&second))).unwrap();
    lb.cli(&["reload"]).expect("reload");
    let (cert, response) = request(&ns).expect("handed off after the reload");
    assert_eq!(cert.as_ref(), Some(&ders[1]), "the hand-off went to the listener serving now");
    assert!(response.trim_end().ends_with("app"), "{response}");
    let _ = std::fs::remove_dir_all(&dir);
}
