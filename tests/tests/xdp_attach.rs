//! `lb run` on a real veth topology: attaches in the configured mode, counts per VIP, and gives a
//! clear error for a bad environment.
use std::{net::SocketAddr, process::Command, time::Duration};

use lb_tests::{
    lb::{Lb, lb_binary},
    privileged_or_skip,
    servers::udp_socket,
    topology::{Topology, VIP4, VIP6},
};

fn config(admin: SocketAddr, interfaces: &[String], mode: &str) -> String {
    let ifaces: Vec<String> = interfaces.iter().map(|i| format!("{i:?}")).collect();
    let pin = lb_tests::lb::pin_path();
    format!(
        r#"
[admin]
listen = "{admin}"
[xdp]
interfaces = [{}]
mode = "{mode}"
pin_path = "{pin}"
[[xdp.service]]
name = "dns"
vip = "{VIP4}:53"
protocol = "udp"
backends = ["10.1.1.2:53"]
[[xdp.service]]
name = "dns6"
vip = "[{VIP6}]:53"
protocol = "udp"
backends = ["[fd01:1::2]:53"]
"#,
        ifaces.join(", ")
    )
}

#[test]
fn counts_vip_packets_on_a_veth_and_reports_the_mode() {
    if !privileged_or_skip("counts_vip_packets_on_a_veth_and_reports_the_mode") {
        return;
    }
    let topo = Topology::new(3).expect("topology");
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let mut lb = Lb::start(&topo.lb, &config(admin, &topo.lb_interfaces(), "native"), admin)
        .expect("lb run");

    let status = lb.json(&topo.lb, &["status"]).expect("status");
    let xdp = status["xdp"].as_array().expect("xdp list");
    assert_eq!(xdp.len(), 4, "{status}");
    assert!(xdp.iter().all(|a| a["mode"] == "native"), "{status}");

    // The daemon asks the kernel to resolve the backends' neighbours; until it has, their
    // packets are dropped (drop_no_neigh) and not counted for the service.
    lb_tests::topology::wait_neighbours(&topo.lb, &["10.1.1.2", "fd01:1::2"]).unwrap();
    let v4 = udp_socket(&topo.client, None, SocketAddr::new(VIP4.into(), 53)).unwrap();
    let v6 = udp_socket(&topo.client, None, SocketAddr::new(VIP6.into(), 53)).unwrap();
    for _ in 0..10 {
        v4.send(b"hello").unwrap();
    }
    for _ in 0..4 {
        v6.send(b"hello").unwrap();
    }
    // Datagrams cross the veth asynchronously; poll the counters for a bounded time.
    let mut last = serde_json::Value::Null;
    for _ in 0..100 {
        last = lb.json(&topo.lb, &["stats"]).expect("stats");
        if last["services"][0]["packets"] == 10 && last["services"][1]["packets"] == 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(last["services"][0]["name"], "dns");
    assert_eq!(last["services"][0]["packets"], 10, "{last}");
    assert_eq!(last["services"][1]["packets"], 4, "{last}");
    let table = lb.cli(&topo.lb, &["stats"]).unwrap();
    assert!(table.contains("dns6") && table.contains("PACKETS"), "{table}");
    let status = lb.stop().expect("stop");
    assert!(status.success(), "lb run exit: {status}");
    // The program stays attached (pinned) after the daemon exits ...
    let links = topo.lb.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(links.contains("xdp"), "{links}");
    // ... until `lb detach` removes it.
    let out = lb.detach(&topo.lb).expect("lb detach");
    assert!(out.contains("XDP detached"), "{out}");
    let links = topo.lb.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(!links.contains("prog/xdp"), "{links}");
}

fn lb_run_fails(ns: &lb_tests::netns::Netns, config: &str, uid: Option<u32>) -> String {
    let path = std::env::temp_dir().join(format!("{}-bad.toml", ns.name));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]);
    if let Some(uid) = uid {
        cmd.args([
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
        ]);
    }
    let out = cmd.arg(lb_binary().unwrap()).args(["run", "--config"]).arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert!(!out.status.success(), "lb run should fail");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
    stderr
}

#[test]
fn bad_environment_gets_a_clear_error() {
    if !privileged_or_skip("bad_environment_gets_a_clear_error") {
        return;
    }
    let ns = lb_tests::netns::Netns::new("e").unwrap();
    // A bridge has no driver-level XDP, so native attach is refused.
    ns.ip(&["link", "add", "br0", "type", "bridge"]).unwrap();
    ns.ip(&["link", "set", "br0", "up"]).unwrap();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();

    let e = lb_run_fails(&ns, &config(admin, &["nosuch0".into()], "native"), None);
    assert!(e.contains("interface \"nosuch0\" does not exist"), "{e}");

    let e = lb_run_fails(&ns, &config(admin, &["br0".into()], "native"), None);
    assert!(
        e.contains("native mode to br0 was refused") && e.contains("mode = \"generic\""),
        "{e}"
    );

    let e = lb_run_fails(&ns, &config(admin, &["br0".into()], "native"), Some(65534));
    assert!(e.contains("needs root"), "{e}");
}
