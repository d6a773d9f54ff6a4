//! PROXY protocol through the in-process L4 listeners: v1 and v2 headers sent to backends (which
//! parse them with their own code and must see the client's address), headers accepted only
//! from trusted sources, and the read timeout. No root needed.
use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
};

use lb_tests::{
    T,
    backends::{ProxySeen, proxy_backend},
    client::read_silently,
    conf,
    l4::{L4Harness, RELAYS, relay_key},
};
use lb_user::l4::{ErrorKind, Handoffs, proxy_protocol};

/// Connects, sends `bytes`, half-closes, returns (client's own address, what came back).
async fn send(addr: SocketAddr, bytes: Vec<u8>) -> (SocketAddr, Vec<u8>) {
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, T).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let me = s.local_addr().unwrap();
        // lb may already have refused (and reset) the connection: that is an answer too.
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        (me, back)
    })
    .await
    .unwrap()
}

async fn next(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<anyhow::Result<ProxySeen>>,
) -> ProxySeen {
    tokio::time::timeout(T, rx.recv()).await.expect("backend saw a connection").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_headers_carry_the_client_address_to_backends_by_each_relay() {
    let (backend, mut seen) = proxy_backend().await;
    let keys = |version: &str, mode: &str| {
        format!("upstream = \"b\"\nproxy_protocol = \"{version}\"\n{}", relay_key(mode))
    };
    let mut config = conf::upstream("b", &conf::list([backend]));
    for mode in RELAYS {
        config += &conf::tcp(&format!("v1-{mode}"), "127.0.0.1:0", &keys("v1", mode));
        config += &conf::tcp(&format!("v2-{mode}"), "127.0.0.1:0", &keys("v2", mode));
        config += &conf::tcp(&format!("v2-on-v6-{mode}"), "[::1]:0", &keys("v2", mode));
    }
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    for mode in RELAYS {
        for (name, version) in [("v1", 1), ("v2", 2), ("v2-on-v6", 2)] {
            let name = format!("{name}-{mode}");
            lb.expect_relay(&name, mode);
            let (me, back) = send(lb.addr(&name), b"hello backend".to_vec()).await;
            assert_eq!(back, b"ok\n");
            let s = next(&mut seen).await;
            assert_eq!(s.version, version, "{name}");
            assert_eq!(s.src, me, "{name}: the backend sees the client's address and port");
            assert_eq!(s.dst, lb.addr(&name), "{name}: and the address it connected to");
            assert_eq!(s.payload, b"hello backend");
        }
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_accepted_only_from_trusted_sources_within_the_timeout() {
    let (backend, mut seen) = proxy_backend().await;
    let trusting = "upstream = \"b\"\nproxy_protocol = \"v2\"\naccept_proxy_from = [\"127.0.0.0/8\"]\npeek_timeout = 0.5\n";
    let wary = "upstream = \"b\"\nproxy_protocol = \"v1\"\naccept_proxy_from = [\"10.0.0.0/8\", \"::1\"]\n";
    let config = [
        conf::upstream("b", &conf::list([backend])),
        conf::tcp("trusting", "127.0.0.1:0", trusting),
        conf::tcp("wary", "127.0.0.1:0", wary),
    ]
    .concat();
    let lb = L4Harness::start(&config, Handoffs::new()).await;
    let trusting = lb.addr("trusting");
    let claimed: SocketAddr = "203.0.113.7:5555".parse().unwrap();
    let vip: SocketAddr = "198.51.100.1:443".parse().unwrap();

    // A trusted v1 header, then a trusted v2 header: the claimed client reaches the backend,
    // re-encoded as v2, and the payload follows untouched.
    let v1 = [b"PROXY TCP4 203.0.113.7 198.51.100.1 5555 443\r\n".as_slice(), b"payload"].concat();
    let v2 = [proxy_protocol::encode_v2(claimed, vip), b"payload".to_vec()].concat();
    for header in [v1.clone(), v2] {
        let (_, back) = send(trusting, header).await;
        assert_eq!(back, b"ok\n");
        let s = next(&mut seen).await;
        assert_eq!((s.version, s.src, s.dst), (2, claimed, vip));
        assert_eq!(s.payload, b"payload");
    }
    // A header and a megabyte in one go: the bytes after the header, which lb reads in the
    // same segments as the header, reach the backend once each, in order.
    let bulk: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (_, back) = send(trusting, [v1.clone(), bulk.clone()].concat()).await;
    assert_eq!(back, b"ok\n");
    let s = next(&mut seen).await;
    let want = [b"payload".as_slice(), &bulk].concat();
    assert!(s.payload == want, "payload of {} bytes differs", s.payload.len());
    // A trusted v2 LOCAL header: the connection's own addresses are kept.
    let (me, _) = send(trusting, [proxy_protocol::encode_v2_local(), b"x".to_vec()].concat()).await;
    assert_eq!(next(&mut seen).await.src, me);

    // An untrusted peer's header is not believed: it reaches the backend as payload.
    let (me, back) = send(lb.addr("wary"), v1.clone()).await;
    assert_eq!(back, b"ok\n");
    let s = next(&mut seen).await;
    assert_eq!((s.version, s.src), (1, me));
    assert_eq!(s.payload, v1);

    // A trusted peer without a header, with a broken one, or silent: closed and counted.
    let (_, back) = send(trusting, b"GET / HTTP/1.1\r\n\r\n".to_vec()).await;
    assert!(back.is_empty());
    let (_, back) = send(trusting, b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n".to_vec()).await;
    assert!(back.is_empty());
    lb.wait_for("trusting", "2 bad headers", |s| s.errors(ErrorKind::ProxyHeaderBad) == 2).await;
    let silent =
        tokio::task::spawn_blocking(move || read_silently(trusting)).await.unwrap().unwrap();
    assert!(silent.is_empty());
    lb.wait_for("trusting", "timeout", |s| s.errors(ErrorKind::ProxyHeaderTimeout) == 1).await;
    assert!(seen.try_recv().is_err(), "nothing reached the backend from the refused ones");
    lb.stop().await;
}
