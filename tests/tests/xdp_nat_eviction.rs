//! Issue 12 item 3, the LRU half: when a live flow's NAT entry is evicted (the tables are LRUs),
//! the flow notices at its next next-hop refresh (after a second of activity, or on its first
//! packet after a pause). If its port is still free the entry is put back and the flow goes
//! on, replies included; if another flow took the port meanwhile, the old flow ends, so its
//! packets never join the other flow's connection at the backend and the new flow's replies
//! keep reaching the new flow.
use std::{net::IpAddr, time::Duration};

use lb_common::{FAMILY_V4, NatKey, PROTO_TCP};
use lb_tests::{
    fixture::{self, *},
    packet::{Frame, TCP_ACK, fields},
};
use lb_user::dataplane::{Dataplane, LoadOptions};

fn config() -> String {
    fixture::config(&[WEB])
}
const VIP: &str = "10.200.0.1";

/// One SNAT port (so a second flow to the backend can only take the first one's), long
/// timeouts (nothing expires during the test).
fn one_port() -> LoadOptions {
    let mut opts = LoadOptions::private();
    opts.settings.nat_port_min = 4000;
    opts.settings.nat_port_max = 4000;
    opts.settings.cpus = 1;
    opts
}

/// The NAT key of the flow holding SNAT port `port` toward the backend.
fn nat_key(port: u16) -> NatKey {
    let v4 = |s: &str| -> [u8; 16] {
        let IpAddr::V4(a) = ip(s) else { unreachable!() };
        let mut out = [0; 16];
        out[..4].copy_from_slice(&a.octets());
        out
    };
    NatKey {
        backend: v4("10.1.1.2"),
        snat: v4("10.1.1.1"),
        backend_port: 80u16.to_be(),
        nat_port: port.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
        _pad: 0,
    }
}

/// Waits past the program's one-second next-hop cache, so the next packet refreshes it.
fn past_hop_cache() {
    std::thread::sleep(Duration::from_millis(1_150));
}

fn ack(client: &str, sport: u16) -> Vec<u8> {
    Frame::tcp(ip(client), sport, ip(VIP), 80, TCP_ACK).bytes()
}

/// Where the backend's packet to SNAT port `port` is delivered: (client, client port).
fn reply_to(dp: &Dataplane, port: u16) -> (u32, IpAddr, u16) {
    let (a, out) = run(dp, &Frame::tcp(ip("10.1.1.2"), 80, ip("10.1.1.1"), port, TCP_ACK).bytes());
    let f = fields(&out);
    (a, f.dst, f.dport)
}

#[test]
fn an_evicted_nat_entry_is_restored_while_its_port_is_free() {
    lb_tests::privileged!();
    in_namespace(
        config(),
        one_port(),
        |_| Ok(()),
        |dp| {
            let port = handshake(dp, "10.0.0.2", 50000, VIP, "10.1.1.1", "10.1.1.2");
            assert!(dp.evict_nat(&nat_key(port)).unwrap(), "the flow had a NAT entry");
            past_hop_cache();
            let (a, out) = run(dp, &ack("10.0.0.2", 50000));
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "the flow goes on");
            assert_eq!(reply_to(dp, port), (XDP_REDIRECT, ip("10.0.0.2"), 50000), "replies too");
            let s = counters(dp);
            assert_eq!((s["nat_restored"], s["drop_nat_lost"]), (1, 0), "{s:?}");
        },
    );
}

#[test]
fn a_flow_whose_port_was_taken_after_an_eviction_ends_and_leaves_the_new_owner_alone() {
    lb_tests::privileged!();
    in_namespace(
        config(),
        one_port(),
        |_| Ok(()),
        |dp| {
            let port = handshake(dp, "10.0.0.2", 50000, VIP, "10.1.1.1", "10.1.1.2");
            assert!(dp.evict_nat(&nat_key(port)).unwrap());
            // B takes the only port, now free.
            let taken = handshake(dp, "10.0.0.3", 50001, VIP, "10.1.1.1", "10.1.1.2");
            assert_eq!(taken, port);
            past_hop_cache();
            // A's next packet finds the port another flow's: A ends here, B is untouched.
            assert_eq!(
                run(dp, &ack("10.0.0.2", 50000)).0,
                XDP_DROP,
                "A may not join B's connection"
            );
            assert_eq!(
                reply_to(dp, port),
                (XDP_REDIRECT, ip("10.0.0.3"), 50001),
                "B's replies reach B"
            );
            let (a, out) = run(dp, &ack("10.0.0.3", 50001));
            assert_eq!((a, fields(&out).sport), (XDP_REDIRECT, port), "B goes on");
            // A's flow is gone: its next non-SYN packet is not forwarded either.
            assert_eq!(run(dp, &ack("10.0.0.2", 50000)).0, XDP_DROP);
            let s = counters(dp);
            assert_eq!(
                (s["drop_nat_lost"], s["drop_not_syn"], s["nat_restored"]),
                (1, 1, 0),
                "{s:?}"
            );
        },
    );
}
