//! Plain TCP relay and UDP sessions through the in-process L4 listeners on loopback: half-close,
//! idle timeout and resets by each relay (kernel, splice, copy), Maglev agreement with the XDP computation, connect retries on
//! another backend, UDP session stickiness and expiry. No root needed: clients use source addresses across 127.0.0.0/8.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::Ordering,
};

use lb_tests::{
    T,
    backends::{echo_backend, udp_echo},
    client::echo_roundtrip,
    conf,
    l4::{L4Harness, RELAYS, relay_key, xdp_choice},
};
use lb_user::{
    config::Config,
    l4::{ErrorKind, Handoffs},
};

fn lo(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_a_megabyte_with_half_close_by_each_relay() {
    let echo = echo_backend("127.0.0.1:0".parse().unwrap(), "echo").await;
    let mut config = conf::upstream("echo", &conf::list([echo]));
    for mode in RELAYS {
        // Small buffers: the copy path then takes many rounds.
        let keys = format!("upstream = \"echo\"\nbuffer_size = 4096\n{}", relay_key(mode));
        config += &conf::tcp(mode, "127.0.0.1:0", &keys);
    }
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    for name in RELAYS {
        lb.expect_relay(name, name);
        let (addr, p) = (lb.addr(name), payload.clone());
        let (greeting, rest) = tokio::task::spawn_blocking(move || echo_roundtrip(addr, None, &p))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(greeting, "echo");
        // The backend answered after the client's FIN: the half-closed side stayed open.
        assert_eq!(rest.len(), payload.len() + 4, "{name}");
        assert!(rest[..payload.len()] == payload[..], "{name}: bytes differ");
        assert_eq!(&rest[payload.len()..], b"eof\n");
        // Exact byte counts, the kernel relay's included (read from its counters at close).
        lb.wait_for(name, "byte counts", |s| {
            s.bytes_to_backend.load(Ordering::Relaxed) == 1_000_000
                && s.bytes_to_client.load(Ordering::Relaxed) == 1_000_000 + 4 + 5
                && s.active.load(Ordering::Relaxed) == 0
        })
        .await;
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_counted_by_each_relay() {
    let echo = echo_backend("127.0.0.1:0".parse().unwrap(), "echo").await;
    let mut config = conf::upstream("echo", &conf::list([echo]));
    for mode in RELAYS {
        let keys = format!("upstream = \"echo\"\nidle_timeout = 0.3\n{}", relay_key(mode));
        config += &conf::tcp(mode, "127.0.0.1:0", &keys);
    }
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    for mode in RELAYS {
        lb.expect_relay(mode, mode);
        let addr = lb.addr(mode);
        let (read, took) = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut greeting = [0u8; 5];
            s.read_exact(&mut greeting).unwrap();
            // Activity keeps it open past the idle timeout...
            let start = std::time::Instant::now();
            for _ in 0..4 {
                s.write_all(b"x").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(150));
            }
            // ...and silence closes it.
            let mut all = greeting.to_vec();
            let _ = s.read_to_end(&mut all);
            (all, start.elapsed())
        })
        .await
        .unwrap();
        // The greeting and the echoed bytes, then the close.
        assert_eq!(read, b"echo\nxxxx", "{mode}");
        assert!(took >= std::time::Duration::from_millis(750), "{mode}: closed after {took:?}");
        lb.wait_for(mode, "idle_timeout", |s| s.errors(ErrorKind::IdleTimeout) == 1).await;
        assert_eq!(lb.stats(mode).bytes_to_backend.load(Ordering::Relaxed), 4, "{mode}");
    }
    lb.stop().await;
}

/// Bytes both ways at once while the connection is being set up (the client writes and
/// half-closes at connect, the backend greets at accept), 200 times per relay: the kernel
/// relay's join must neither lose nor reorder them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_during_set_up_arrive_whole_by_each_relay() {
    let echo = echo_backend("127.0.0.1:0".parse().unwrap(), "echo").await;
    let mut config = conf::upstream("echo", &conf::list([echo]));
    for mode in RELAYS {
        config +=
            &conf::tcp(mode, "127.0.0.1:0", &format!("upstream = \"echo\"\n{}", relay_key(mode)));
    }
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    for mode in RELAYS {
        lb.expect_relay(mode, mode);
        let addr = lb.addr(mode);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            for i in 0..200 {
                let mut s = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
                s.set_read_timeout(Some(T)).unwrap();
                let msg = format!("early {i}");
                s.write_all(msg.as_bytes()).unwrap();
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let mut all = Vec::new();
                s.read_to_end(&mut all).unwrap();
                assert_eq!(
                    String::from_utf8_lossy(&all),
                    format!("echo\n{msg}eof\n"),
                    "{mode}: #{i}"
                );
            }
        })
        .await
        .unwrap();
    }
    lb.stop().await;
}

/// A backend that reads nothing for 2 s: the client can push only a bounded amount meanwhile
/// (the kernel relay pauses the client once the backend is relay::BACKLOG behind), and then
/// every byte arrives once, in order, by each relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_reading_holds_the_client_back_by_each_relay() {
    let stalling = lb_tests::backends::stalling_backend(std::time::Duration::from_secs(2));
    let mut config = conf::upstream("s", &conf::list([stalling]));
    for mode in RELAYS {
        config +=
            &conf::tcp(mode, "127.0.0.1:0", &format!("upstream = \"s\"\n{}", relay_key(mode)));
    }
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    for mode in RELAYS {
        lb.expect_relay(mode, mode);
        let addr = lb.addr(mode);
        let (sent, answer) = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
            s.set_write_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
            let chunk: Vec<u8> = (0..(251 * 256) as u32).map(|i| (i % 251) as u8).collect();
            let (mut sent, start) = (0u64, std::time::Instant::now());
            // Push until the writes stall (or 1.5 s): a whole number of chunks keeps the
            // pattern aligned, so a partly written chunk is finished before stopping.
            while start.elapsed() < std::time::Duration::from_millis(1500) {
                match s.write(&chunk) {
                    Ok(n) => {
                        s.set_write_timeout(None).unwrap();
                        s.write_all(&chunk[n..]).unwrap();
                        s.set_write_timeout(Some(std::time::Duration::from_millis(300))).unwrap();
                        sent += chunk.len() as u64;
                    }
                    Err(_) => break,
                }
            }
            s.set_write_timeout(None).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            (sent, answer)
        })
        .await
        .unwrap();
        eprintln!("{mode}: {sent} bytes pushed into a backend that stalls");
        assert!(sent < 64 << 20, "{mode}: the client pushed {sent} bytes into a stalled backend");
        assert_eq!(answer, format!("ok {sent}\n"), "{mode}");
    }
    lb.stop().await;
}

/// A backend that answers, then resets its connection (SO_LINGER 0): the reset reaches the
/// client as a reset, or at least as a close, and is counted as an error, by each relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_closes_the_client_by_each_relay() {
    let resetting = lb_tests::backends::resetting_backend().await;
    let mut config = conf::upstream("r", &conf::list([resetting]));
    for mode in RELAYS {
        config +=
            &conf::tcp(mode, "127.0.0.1:0", &format!("upstream = \"r\"\n{}", relay_key(mode)));
    }
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    for mode in RELAYS {
        lb.expect_relay(mode, mode);
        let addr = lb.addr(mode);
        let (got, err) = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.write_all(b"reset me").unwrap();
            let mut all = Vec::new();
            let r = s.read_to_end(&mut all);
            (all, r.err().map(|e| e.kind()))
        })
        .await
        .unwrap();
        assert_eq!(got, b"bye\n", "{mode}: the answer before the reset arrives");
        assert_ne!(err, Some(std::io::ErrorKind::WouldBlock), "{mode}: closed, not timed out");
        lb.wait_for(mode, "the reset counted", |s| {
            s.errors(ErrorKind::Io) == 1 && s.active.load(Ordering::Relaxed) == 0
        })
        .await;
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picks_the_backend_the_xdp_path_would_for_each_client_address() {
    let mut backends = Vec::new();
    for i in 0..4 {
        backends.push(echo_backend("127.0.0.1:0".parse().unwrap(), &format!("b{i}")).await);
    }
    let weights = backends.iter().zip([1, 2, 1, 1]);
    let config = conf::tcp_over("web", &conf::weighted(weights), "");
    let parsed = Config::parse(&config).unwrap();
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    let addr = lb.addr("web");
    let name_of = |a: SocketAddr| format!("b{}", backends.iter().position(|b| *b == a).unwrap());
    let mut used = std::collections::HashSet::new();
    for n in 2..=121u8 {
        let client = lo(n);
        let (greeting, _) =
            tokio::task::spawn_blocking(move || echo_roundtrip(addr, Some(client), b"x"))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(greeting, name_of(xdp_choice(&parsed, "web", client)), "client {client}");
        used.insert(greeting);
    }
    assert_eq!(used.len(), 4, "120 clients reach all 4 backends");
    lb.stop().await;
}

/// An address nothing listens on: connecting to it is refused.
fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_backend_connect_is_retried_on_another_backend() {
    let live = echo_backend("127.0.0.1:0".parse().unwrap(), "live").await;
    let (dead1, dead2) = (refused_addr(), refused_addr());
    let config = conf::tcp_over("mixed", &conf::list([dead1, live, dead2]), "")
        + &conf::tcp_over("dead", &conf::list([dead1, dead2]), "");
    let parsed = Config::parse(&config).unwrap();
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    let addr = lb.addr("mixed");
    // Clients whose own backend (as Maglev and the XDP path pick it) is dead still get through.
    let mut firsts_dead = 0;
    for n in 2..=41u8 {
        let client = lo(n);
        firsts_dead += usize::from(xdp_choice(&parsed, "mixed", client) != live);
        let (greeting, rest) =
            tokio::task::spawn_blocking(move || echo_roundtrip(addr, Some(client), b"hi"))
                .await
                .unwrap()
                .unwrap();
        assert_eq!(greeting, "live", "client {client}");
        assert_eq!(rest, b"hieof\n");
    }
    assert!(firsts_dead > 0, "some of 40 clients map to a dead backend first");
    let st = lb.stats("mixed");
    let (failures, retries) =
        (st.connect_failures.load(Ordering::Relaxed), st.connect_retries.load(Ordering::Relaxed));
    // Each failed connect was followed by one to another backend; at most both dead ones failed.
    assert_eq!(failures, retries);
    assert!(retries as usize >= firsts_dead && retries as usize <= 2 * firsts_dead, "{retries}");
    assert_eq!(st.errors(ErrorKind::ConnectFailed), 0);

    // No backend answers: the connection is closed after trying each once.
    let dead = lb.addr("dead");
    let r = tokio::task::spawn_blocking(move || echo_roundtrip(dead, None, b"x")).await.unwrap();
    assert!(r.is_err(), "closed without a greeting: {r:?}");
    lb.wait_for("dead", "one connect_failed", |s| s.errors(ErrorKind::ConnectFailed) == 1).await;
    let st = lb.stats("dead");
    assert_eq!(st.connect_failures.load(Ordering::Relaxed), 2);
    assert_eq!(st.connect_retries.load(Ordering::Relaxed), 1);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_sessions_are_per_client_sticky_and_expire() {
    let mut backends = Vec::new();
    for i in 0..3 {
        backends.push(udp_echo("127.0.0.1:0".parse().unwrap(), &format!("u{i}")).await);
    }
    let config =
        conf::tcp_over("dns", &conf::list(&backends), "protocol = \"udp\"\nidle_timeout = 0.4\n");
    let parsed = Config::parse(&config).unwrap();
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    let addr = lb.addr("dns");
    let mut clients = Vec::new();
    for n in 2..=9u8 {
        let s = tokio::net::UdpSocket::bind(SocketAddr::new(lo(n), 0)).await.unwrap();
        s.connect(addr).await.unwrap();
        clients.push((lo(n), s));
    }
    let mut buf = vec![0u8; 2048];
    for round in 0..3 {
        for (ip, s) in &clients {
            let msg = format!("q{round} from {ip}");
            s.send(msg.as_bytes()).await.unwrap();
            let n = tokio::time::timeout(T, s.recv(&mut buf)).await.expect("a reply").unwrap();
            let reply = String::from_utf8_lossy(&buf[..n]).to_string();
            let want = xdp_choice(&parsed, "dns", *ip);
            let i = backends.iter().position(|b| *b == want).unwrap();
            assert_eq!(reply, format!("u{i}:{msg}"), "client {ip}, round {round}");
        }
    }
    let st = lb.stats("dns");
    assert_eq!(st.udp_sessions_created.load(Ordering::Relaxed), 8, "one session per client");
    assert_eq!(st.udp_sessions_active.load(Ordering::Relaxed), 8);
    assert_eq!(st.datagrams_to_backend.load(Ordering::Relaxed), 24);
    lb.wait_for("dns", "replies counted", |s| s.datagrams_to_client.load(Ordering::Relaxed) == 24)
        .await;
    // Silence: every session expires after idle_timeout.
    lb.wait_for("dns", "all expired", |s| {
        s.udp_sessions_expired.load(Ordering::Relaxed) == 8
            && s.udp_sessions_active.load(Ordering::Relaxed) == 0
    })
    .await;
    // A client that comes back gets a new session and still the same backend.
    let (ip, s) = &clients[0];
    s.send(b"again").await.unwrap();
    let n = tokio::time::timeout(T, s.recv(&mut buf)).await.expect("a reply").unwrap();
    let want = backends.iter().position(|b| *b == xdp_choice(&parsed, "dns", *ip)).unwrap();
    assert_eq!(&buf[..n], format!("u{want}:again").as_bytes());
    assert_eq!(st.udp_sessions_created.load(Ordering::Relaxed), 9);
    lb.stop().await;
}
