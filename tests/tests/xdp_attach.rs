//! `lb run` on a real veth topology: attaches in the configured mode, counts per VIP, and gives a
//! clear error for a bad environment.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    client::udp_socket,
    conf,
    lb::{Lb, pin_path},
    netns::Netns,
    scenario::{Scenario, Serve},
    topology::{VIP4, VIP6},
};

/// The UDP services `dns` (VIP4:53) and `dns6` (VIP6:53) on backend 1.
fn services() -> String {
    let dns =
        conf::xdp_service("dns", format!("{VIP4}:53"), "\"10.1.1.2:53\"", "protocol = \"udp\"\n");
    let dns6 = format!("[{VIP6}]:53");
    dns + &conf::xdp_service("dns6", dns6, "\"[fd01:1::2]:53\"", "protocol = \"udp\"\n")
}

#[test]
fn counts_vip_packets_on_a_veth_and_reports_the_mode() {
    lb_tests::privileged!();
    let s = Scenario::topology(3).serve(Serve::Nothing).xdp_extra("mode = \"native\"\n");
    let mut s = s.xdp_raw(&services()).start().expect("lb run");
    let topo = s.topo();
    let status = s.lb().json(&["status"]).expect("status");
    let xdp = status["xdp"].as_array().expect("xdp list");
    assert_eq!(xdp.len(), 4, "{status}");
    assert!(xdp.iter().all(|a| a["mode"] == "native"), "{status}");

    // The daemon asks the kernel to resolve the backends' neighbours; until it has, their
    // packets are dropped (drop_no_neigh) and not counted for the service.
    lb_tests::topology::wait_neighbours(&topo.lb, &["10.1.1.2", "fd01:1::2"]).unwrap();
    let v4 = udp_socket(&topo.client, None, SocketAddr::new(VIP4.into(), 53)).unwrap();
    let v6 = udp_socket(&topo.client, None, SocketAddr::new(VIP6.into(), 53)).unwrap();
    // Nothing listens on the backends: each datagram earns an ICMP port unreachable, which the
    // program hands on to the client, whose connected socket then fails its next send once
    // (ECONNREFUSED, nothing sent). Counted sends are retried so exactly n leave.
    let send = |sock: &std::net::UdpSocket, n: usize| {
        for _ in 0..n {
            let sent = (0..3).any(|_| sock.send(b"hello").is_ok());
            assert!(sent, "send failed three times");
        }
    };
    send(&v4, 10);
    send(&v6, 4);
    // Datagrams cross the veth asynchronously; poll the counters for a bounded time.
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        last = s.lb().json(&["stats"]).expect("stats");
        if last["services"][0]["packets"] == 10 && last["services"][1]["packets"] == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(last["services"][0]["name"], "dns");
    assert_eq!(last["services"][0]["packets"], 10, "{last}");
    assert_eq!(last["services"][1]["packets"], 4, "{last}");
    let table = s.lb().cli(&["stats"]).unwrap();
    assert!(table.contains("dns6") && table.contains("PACKETS"), "{table}");
    let status = s.lb_mut().stop().expect("stop");
    let topo = s.topo();
    assert!(status.success(), "lb run exit: {status}");
    // The program stays attached (pinned) after the daemon exits ...
    let links = topo.lb.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(links.contains("xdp"), "{links}");
    // ... until `lb detach` removes it.
    let out = s.lb().detach().expect("lb detach");
    assert!(out.contains("XDP detached"), "{out}");
    let links = topo.lb.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(!links.contains("prog/xdp"), "{links}");
}

/// `lb run` on `interfaces` in `ns` (as `uid` if given): its error, which must be clean.
fn lb_run_fails(ns: &Netns, interfaces: &[&str], uid: Option<u32>) -> String {
    let config = conf::xdp(interfaces, "mode = \"native\"\n") + &services();
    let lb = Lb::builder(ns, config).pin_path(pin_path());
    let lb = match uid {
        Some(u) => lb.uid(u),
        None => lb,
    };
    let out = lb.run_to_exit().unwrap();
    assert!(!out.status.success(), "lb run should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    stderr
}

#[test]
fn bad_environment_gets_a_clear_error() {
    lb_tests::privileged!();
    let ns = Netns::new("e").unwrap();
    // A bridge has no driver-level XDP, so native attach is refused.
    ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    ns.ip(&["link", "set", "br0", "up"]).unwrap();

    let e = lb_run_fails(&ns, &["nosuch0"], None);
    assert!(e.contains("interface \"nosuch0\" does not exist"), "{e}");

    let e = lb_run_fails(&ns, &["br0"], None);
    assert!(
        e.contains("native mode to br0 was refused") && e.contains("mode = \"generic\""),
        "{e}"
    );

    let e = lb_run_fails(&ns, &["br0"], Some(65534));
    assert!(e.contains("needs root"), "{e}");
}
