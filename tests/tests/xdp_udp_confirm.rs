//! Issue 12 item 2 for UDP, as packet fixtures: a UDP flow starts unconfirmed, like a TCP one
//! before its handshake completes, and is confirmed when its client sends again after the
//! backend's first answer (a spoofed source never sees that answer). A flood of answered UDP
//! datagrams from spoofed sources ten times `max_flows` then evicts only unconfirmed flows:
//! confirmed UDP and TCP flows keep their backend, SNAT port and replies.
use lb_tests::{
    fixture::{self, *},
    packet::{Frame, TCP_ACK, fields},
};
use lb_user::dataplane::{Dataplane, LoadOptions};

fn config() -> String {
    fixture::config(&[WEB, DNS])
}
const VIP: &str = "10.200.0.1";

fn query(client: &str, sport: u16) -> Vec<u8> {
    Frame::udp(ip(client), sport, ip(VIP), 53, b"query").bytes()
}

/// The backend's answer to SNAT port `port`: where it goes (action, client, client port).
fn answer(dp: &Dataplane, port: u16) -> (u32, std::net::IpAddr, u16) {
    let (a, out) =
        run(dp, &Frame::udp(ip("10.1.1.2"), 53, ip("10.1.1.1"), port, b"answer").bytes());
    let f = fields(&out);
    (a, f.dst, f.dport)
}

#[test]
fn a_udp_flow_is_confirmed_when_its_client_speaks_after_an_answer() {
    lb_tests::privileged!();
    in_namespace(
        config(),
        LoadOptions::private(),
        |_| Ok(()),
        |dp| {
            let (a, out) = run(dp, &query("10.0.0.2", 5000));
            assert_eq!(a, XDP_REDIRECT);
            let port = fields(&out).sport;
            // More datagrams before any answer: still one unconfirmed flow, same port.
            let (a, out) = run(dp, &query("10.0.0.2", 5000));
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port));
            assert_eq!(counters(dp)["flow_confirmed"], 0);
            assert_eq!(answer(dp, port), (XDP_REDIRECT, ip("10.0.0.2"), 5000));
            assert_eq!(counters(dp)["flow_confirmed"], 0, "an answer alone confirms nothing");
            let (a, out) = run(dp, &query("10.0.0.2", 5000));
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "same flow after promotion");
            let s = counters(dp);
            assert_eq!((s["flow_confirmed"], s["flow_new"]), (1, 1), "{s:?}");
            assert_eq!(dp.flows_per_backend().unwrap().values().sum::<u64>(), 1, "in LB_FLOWS now");
            assert_eq!(
                answer(dp, port),
                (XDP_REDIRECT, ip("10.0.0.2"), 5000),
                "answers still reach it"
            );
        },
    );
}

#[test]
fn a_udp_flood_ten_times_max_flows_leaves_confirmed_flows_working() {
    lb_tests::privileged!();
    let mut opts = LoadOptions::private();
    opts.max_flows = 1024;
    opts.max_unconfirmed_flows = 256;
    opts.settings.cpus = 1;
    in_namespace(
        config(),
        opts,
        |_| Ok(()),
        |dp| {
            // 20 confirmed UDP flows and 20 established TCP flows, held through the flood.
            let udp: Vec<(u16, u16)> = (0..20)
                .map(|i| {
                    let sport = 6000 + i;
                    let (_, out) = run(dp, &query("10.0.0.2", sport));
                    let port = fields(&out).sport;
                    answer(dp, port);
                    run(dp, &query("10.0.0.2", sport));
                    (sport, port)
                })
                .collect();
            let tcp: Vec<(u16, u16)> = (0..20)
                .map(|i| {
                    (50000 + i, handshake(dp, "10.0.0.2", 50000 + i, VIP, "10.1.1.1", "10.1.1.2"))
                })
                .collect();
            assert_eq!(counters(dp)["flow_confirmed"], 40);
            // The flood: each spoofed source's datagram is answered by the backend (the answer goes
            // to the spoofed address, which never speaks again).
            for i in 0..10 * 1024u32 {
                let src = format!("10.{}.{}.{}", 50 + i / 65536, (i / 256) % 256, i % 256);
                let (a, out) = run(
                    dp,
                    &Frame::udp(ip(&src), 1024 + (i % 60000) as u16, ip(VIP), 53, b"q").bytes(),
                );
                assert_eq!(a, XDP_REDIRECT, "flood datagram {i}");
                answer(dp, fields(&out).sport);
            }
            for &(sport, port) in &udp {
                let (a, out) = run(dp, &query("10.0.0.2", sport));
                assert_eq!(
                    (a, fields(&out).sport),
                    (XDP_REDIRECT, port),
                    "UDP client side of {sport}"
                );
                assert_eq!(
                    answer(dp, port),
                    (XDP_REDIRECT, ip("10.0.0.2"), sport),
                    "UDP answer {sport}"
                );
            }
            for &(sport, port) in &tcp {
                let ack = Frame::tcp(ip("10.0.0.2"), sport, ip(VIP), 80, TCP_ACK).bytes();
                let (a, out) = run(dp, &ack);
                assert_eq!(
                    (a, fields(&out).sport),
                    (XDP_REDIRECT, port),
                    "TCP client side of {sport}"
                );
                let data = Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), port, TCP_ACK).bytes();
                let (a, out) = run(dp, &data);
                assert_eq!((a, fields(&out).dport), (XDP_REDIRECT, sport), "TCP reply {sport}");
            }
            let s = counters(dp);
            assert_eq!((s["drop_not_syn"], s["flow_confirmed"]), (0, 40), "{s:?}");
            assert_eq!(
                dp.flows_per_backend().unwrap().values().sum::<u64>(),
                40,
                "LB_FLOWS: confirmed only"
            );
        },
    );
}
