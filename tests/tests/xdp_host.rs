//! What `lb run` does to the host, end to end: the VIPs become local (ICMP echo answered, other
//! ports refused by the kernel, nothing routed onward, no ARP/NDP answers for them on the
//! served interfaces), a reload or `lb detach` takes them away again, IPv6 forwarding keeps
//! router advertisements working, and `lb status` lists every change.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::Duration,
};

use lb_tests::{
    client::{ping, udp_socket},
    conf, lb,
    netns::Netns,
    scenario::{Running, Scenario, WEB},
    topology::{VIP4, VIP6, wait_neighbours},
    wait_until,
};

const WAIT: Duration = Duration::from_secs(2);
const WEB6: &str = "[fd00:200::1]:80";

/// `web` (VIP4:80) and `web6` (VIP6:80) over backend 1.
fn two_families() -> Scenario {
    Scenario::topology(1)
        .bind("[::]:80".parse().unwrap())
        .xdp_service("")
        .xdp_raw(&conf::xdp_service("web6", WEB6, "\"[fd01:1::2]:80\"", ""))
}

/// `web6` (VIP6:80) over backend 1, nothing IPv4.
fn ipv6_only() -> Scenario {
    Scenario::topology(1).bind("[::]:80".parse().unwrap()).xdp_raw(&conf::xdp_service(
        "web6",
        WEB6,
        "\"[fd01:1::2]:80\"",
        "",
    ))
}

/// Packets the kernel of `ns` forwarded, IPv4 and IPv6 (`/proc/net/snmp`, `snmp6`).
fn forwarded(ns: &Netns) -> (u64, u64) {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]).unwrap();
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (keys, values) = (ip.next().unwrap(), ip.next().unwrap());
    let v4 =
        keys.split_whitespace().zip(values.split_whitespace()).find(|(k, _)| *k == "ForwDatagrams");
    let snmp6 = ns.exec(&["cat", "/proc/net/snmp6"]).unwrap();
    let v6 = snmp6.lines().find_map(|l| l.strip_prefix("Ip6OutForwDatagrams"));
    (v4.and_then(|(_, v)| v.parse().ok()).unwrap(), v6.and_then(|v| v.trim().parse().ok()).unwrap())
}

/// A TCP connect to `target` from the client: its error kind, or `None` when it connected.
fn connect_error(s: &Running, target: SocketAddr) -> Option<std::io::ErrorKind> {
    s.client()
        .run(move || TcpStream::connect_timeout(&target, WAIT).err().map(|e| e.kind()))
        .unwrap()
}

/// True when a datagram to `target` is answered with port unreachable (ECONNREFUSED on the
/// next receive of the connected socket).
fn udp_refused(s: &Running, target: SocketAddr) -> bool {
    let sock = udp_socket(s.client(), None, target).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.send(b"hello").unwrap();
    let mut buf = [0u8; 16];
    sock.recv(&mut buf).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// Whether the client, sent straight at `vip` on its link (no gateway), gets a neighbour
/// answer for it: ARP for IPv4, NDP for IPv6.
fn answered_on_link(s: &Running, vip: IpAddr) -> bool {
    let (fam, len) = if vip.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
    let route = format!("{vip}/{len}");
    s.client().ip(&[fam, "route", "add", &route, "dev", "eth0"]).unwrap();
    let _ = ping(s.client(), vip, Duration::from_millis(500));
    let table = s.client().ip(&["neigh", "show", &vip.to_string()]).unwrap();
    s.client().ip(&[fam, "route", "del", &route, "dev", "eth0"]).unwrap();
    let _ = s.client().ip(&["neigh", "del", &vip.to_string(), "dev", "eth0"]);
    table.contains("lladdr")
}

fn lo_addresses(s: &Running) -> String {
    s.balancer().ip(&["addr", "show", "dev", "lo"]).unwrap()
}

#[test]
fn vips_are_local_not_routed_onward_and_detach_removes_them() {
    lb_tests::privileged!();
    let mut s = two_families().start().expect("lb run");
    let lb = &s.topo().lb;
    wait_neighbours(lb, &["10.1.1.2", "fd01:1::2"]).unwrap();
    // Where the kernel would send VIP traffic it does not own: onward, to backend 1.
    lb.ip(&["route", "add", "10.200.0.0/16", "via", "10.1.1.2"]).unwrap();
    lb.ip(&["-6", "route", "add", "fd00:200::/64", "via", "fd01:1::2"]).unwrap();
    // Balanced ports still go to the program first.
    assert_eq!(s.get(WEB).unwrap(), "backend-1");
    assert_eq!(s.get(WEB6.parse().unwrap()).unwrap(), "backend-1");

    let before = forwarded(lb);
    for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
        assert!(ping(s.client(), vip, WAIT).unwrap(), "ICMP echo to {vip} answered");
        let other = SocketAddr::new(vip, 81);
        assert_eq!(
            connect_error(&s, other),
            Some(std::io::ErrorKind::ConnectionRefused),
            "{other}"
        );
        assert!(udp_refused(&s, SocketAddr::new(vip, 53)), "UDP to {vip}:53 refused");
    }
    assert_eq!(forwarded(lb), before, "nothing to a VIP was forwarded onward");
    assert!(!answered_on_link(&s, VIP4.into()), "no ARP answer for the VIP on eth0");
    assert!(!answered_on_link(&s, VIP6.into()), "no NDP answer for the VIP on eth0");
    assert!(answered_on_link(&s, "10.0.0.1".parse().unwrap()), "eth0's own address still is");

    // `lb status` lists the host changes, text and JSON.
    let status = s.lb().json(&["status"]).unwrap();
    let host = status["host"].as_array().expect("host changes").clone();
    let has =
        |kind: &str, target: &str| host.iter().any(|c| c["kind"] == kind && c["target"] == target);
    assert!(
        has("address", "10.200.0.1/32 dev lo") && has("address", "fd00:200::1/128 dev lo"),
        "{status}"
    );
    for key in [
        "net.ipv4.conf.eth0.forwarding",
        "net.ipv4.conf.b1.arp_ignore",
        "net.ipv6.conf.eth0.forwarding",
    ] {
        assert!(has("sysctl", key), "{key} in {status}");
    }
    assert!(has("neighbour", "10.1.1.2 dev b1"), "{status}");
    let text = s.lb().cli(&["status"]).unwrap();
    assert!(
        text.contains("host changes")
            && text.contains("address 10.200.0.1/32 dev lo: absent -> present"),
        "{text}"
    );
    assert!(text.contains("sysctl net.ipv4.conf.eth0.forwarding: 0 -> 1"), "{text}");

    // `lb detach` removes the program, then undoes the host changes; in another namespace it
    // is refused before it removes anything.
    assert!(s.lb_mut().stop().unwrap().success());
    let pin = s.lb().pin_path().unwrap().to_string();
    let elsewhere = lb::command(Some(s.client()))
        .unwrap()
        .args(["detach", "--pin-path", &pin])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(!elsewhere.status.success() && err.contains("network namespace inode"), "{err}");
    assert!(std::path::Path::new(&pin).exists(), "nothing was removed");
    assert!(lo_addresses(&s).contains("10.200.0.1/32"), "the VIP stays local until detach");
    let out = s.lb().detach().unwrap();
    assert!(out.contains("undid address 10.200.0.1/32 dev lo"), "{out}");
    let lo = lo_addresses(&s);
    assert!(!lo.contains("10.200.0.1") && !lo.contains("fd00:200::1"), "{lo}");
    let lb = &s.topo().lb;
    for key in [
        "net.ipv4.conf.eth0.forwarding",
        "net.ipv4.conf.b1.arp_ignore",
        "net.ipv6.conf.eth0.forwarding",
    ] {
        assert_eq!(lb.sysctl_value(key).unwrap(), "0", "{key} restored");
    }
    assert!(
        !ping(s.client(), VIP4.into(), Duration::from_millis(500)).unwrap(),
        "the VIP is no longer local"
    );
}

/// The count of one of the program's reasons.
fn reason(s: &Running, name: &str) -> u64 {
    let stats = s.lb().json(&["stats"]).unwrap();
    let reasons = stats["reasons"].as_array().unwrap().clone();
    reasons.iter().find(|r| r[0] == name).and_then(|r| r[1].as_u64()).unwrap()
}

#[test]
fn replies_handed_to_the_kernel_leave_although_the_vip_is_local() {
    lb_tests::privileged!();
    let s = two_families().start().expect("lb run");
    wait_neighbours(&s.topo().lb, &["10.1.1.2", "fd01:1::2"]).unwrap();
    // The client must not teach the balancer its MAC (its ARP request or neighbour
    // solicitation would): then the first reply finds no neighbour and the program hands the
    // translated frame, source VIP, to the kernel to forward and resolve (`pass_no_neigh`).
    // A local source is a martian unless the interface accepts it (accept_local).
    let mac = s.topo().lb.exec(&["cat", "/sys/class/net/eth0/address"]).unwrap();
    for gw in ["10.0.0.1", "fd00::1"] {
        let args =
            ["neigh", "replace", gw, "lladdr", mac.trim(), "dev", "eth0", "nud", "permanent"];
        s.client().ip(&args).unwrap();
    }
    let before = reason(&s, "pass_no_neigh");
    assert_eq!(s.get(WEB).unwrap(), "backend-1");
    assert_eq!(s.get(WEB6.parse().unwrap()).unwrap(), "backend-1");
    assert!(
        reason(&s, "pass_no_neigh") >= before + 2,
        "both first replies went through the kernel"
    );
}

#[test]
fn a_vip_that_leaves_the_config_stops_being_local() {
    lb_tests::privileged!();
    let second = SocketAddr::new(Ipv4Addr::new(10, 200, 0, 2).into(), 80);
    let s = Scenario::topology(1)
        .xdp_service("")
        .xdp_raw(&conf::xdp_service("web2", second, "\"10.1.1.2:80\"", ""))
        .start()
        .expect("lb run");
    let lo = lo_addresses(&s);
    assert!(lo.contains("10.200.0.1/32") && lo.contains("10.200.0.2/32"), "{lo}");
    assert!(ping(s.client(), second.ip(), WAIT).unwrap());

    let config =
        conf::xdp(s.interfaces(), "") + &conf::xdp_service("web", WEB, "\"10.1.1.2:80\"", "");
    s.lb().write_config(&config).unwrap();
    s.lb().cli(&["reload"]).expect("reload");
    let lo = lo_addresses(&s);
    assert!(lo.contains("10.200.0.1/32") && !lo.contains("10.200.0.2"), "{lo}");
    let status = s.lb().json(&["status"]).unwrap();
    let targets: Vec<&str> = status["host"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "address")
        .filter_map(|c| c["target"].as_str())
        .collect();
    assert_eq!(targets, ["10.200.0.1/32 dev lo"], "{status}");
    assert_eq!(s.get(WEB).unwrap(), "backend-1");
}

/// Sends a router advertisement (lifetime 1800 s) from the link-local address of `client`'s
/// eth0 to all nodes on it, through a raw ICMPv6 socket (the kernel adds the checksum).
fn advertise_router(client: &Netns) {
    let ll_ready = wait_until(Duration::from_secs(5), || {
        let a = client.ip(&["-6", "addr", "show", "dev", "eth0", "scope", "link"]).unwrap();
        a.contains("fe80") && !a.contains("tentative")
    });
    assert!(ll_ready, "the client's link-local address left DAD");
    let index: u32 =
        client.exec(&["cat", "/sys/class/net/eth0/ifindex"]).unwrap().trim().parse().unwrap();
    client
        .run(move || {
            use socket2::{Domain, Protocol, Socket, Type};
            let sock = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap();
            sock.set_multicast_hops_v6(255).unwrap();
            sock.set_multicast_if_v6(index).unwrap();
            // Type 134, code 0, checksum, hop limit 64, flags 0, router lifetime, reachable
            // time, retransmission timer.
            let ra = [134u8, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
            let all_nodes = std::net::SocketAddrV6::new(
                Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
                0,
                0,
                index,
            );
            sock.send_to(&ra, &all_nodes.into()).unwrap();
        })
        .unwrap();
}

#[test]
fn ipv6_forwarding_keeps_router_advertisements_working() {
    lb_tests::privileged!();
    let mut s = ipv6_only().start().expect("lb run");
    let lb = &s.topo().lb;
    // New interfaces take accept_ra = 1 (advertisements accepted unless forwarding is on).
    for iface in ["eth0", "b1"] {
        let conf = |leaf: &str| format!("net.ipv6.conf.{iface}.{leaf}");
        assert_eq!(lb.sysctl_value(&conf("forwarding")).unwrap(), "1", "{iface}");
        assert_eq!(lb.sysctl_value(&conf("force_forwarding")).unwrap(), "1", "{iface}");
        assert_eq!(lb.sysctl_value(&conf("accept_ra")).unwrap(), "2", "{iface}");
    }
    assert_eq!(lb.sysctl_value("net.ipv6.conf.all.forwarding").unwrap(), "0", "not host-wide");
    let status = s.lb().json(&["status"]).unwrap();
    let ra = status["host"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["target"] == "net.ipv6.conf.eth0.accept_ra")
        .cloned();
    assert_eq!(
        ra.as_ref().map(|c| (&c["before"], &c["after"])),
        Some((&"1".into(), &"2".into())),
        "{status}"
    );

    // A router on eth0's link is learned although eth0 forwards.
    advertise_router(s.client());
    let learned = wait_until(Duration::from_secs(5), || ra_default_on(lb, "eth0"));
    assert!(learned, "{}", lb.ip(&["-6", "route"]).unwrap());
    assert_eq!(s.get(WEB6.parse().unwrap()).unwrap(), "backend-1");

    assert!(s.lb_mut().stop().unwrap().success());
    s.lb().detach().unwrap();
    let lb = &s.topo().lb;
    assert_eq!(lb.sysctl_value("net.ipv6.conf.eth0.accept_ra").unwrap(), "1");
    assert_eq!(lb.sysctl_value("net.ipv6.conf.eth0.forwarding").unwrap(), "0");
}

/// True when `ns` has a default route learned from an advertisement on `dev`.
fn ra_default_on(ns: &Netns, dev: &str) -> bool {
    let r = ns.ip(&["-6", "route", "show", "default"]).unwrap();
    r.lines().any(|l| l.contains(&format!("dev {dev} ")) && l.contains("proto ra"))
}

#[test]
fn switching_forwarding_on_keeps_other_interfaces_routes_from_advertisements() {
    lb_tests::privileged!();
    let mut s = ipv6_only().start().expect("lb run");
    // Back to a host without lb's changes (forwarding off again), then an interface lb does
    // not serve learns its default route from a router.
    assert!(s.lb_mut().stop().unwrap().success());
    s.lb().detach().unwrap();
    let router = Netns::new("r").unwrap();
    let lb = &s.topo().lb;
    let args = ["link", "add", "r0", "type", "veth", "peer", "name", "eth0", "netns", &router.name];
    lb.ip(&args).unwrap();
    lb.ip(&["link", "set", "r0", "up"]).unwrap();
    router.ip(&["link", "set", "eth0", "up"]).unwrap();
    assert_eq!(lb.sysctl_value("net.ipv6.conf.r0.accept_ra").unwrap(), "1");
    advertise_router(&router);
    assert!(wait_until(Duration::from_secs(5), || ra_default_on(lb, "r0")), "learned via r0");

    // Writing forwarding = 1 on eth0 and b1 makes the kernel drop advertisement-learned
    // default routes wherever accept_ra is not 2, r0 included, unless lb guards it.
    s.lb_mut().restart().expect("lb run again");
    let lb = &s.topo().lb;
    assert_eq!(lb.sysctl_value("net.ipv6.conf.eth0.forwarding").unwrap(), "1");
    assert!(ra_default_on(lb, "r0"), "{}", lb.ip(&["-6", "route"]).unwrap());
    assert_eq!(lb.sysctl_value("net.ipv6.conf.r0.accept_ra").unwrap(), "1", "put back");
    assert_eq!(lb.sysctl_value("net.ipv6.conf.r0.forwarding").unwrap(), "0", "not served");
}

#[test]
fn a_corrupt_host_record_is_a_clear_error() {
    lb_tests::privileged!();
    let ns = Netns::new("e").unwrap();
    let pin = lb_tests::lb::pin_path();
    let record = lb_user::dataplane::changes::record_path(std::path::Path::new(&pin));
    std::fs::create_dir_all(record.parent().unwrap()).unwrap();
    std::fs::write(&record, "not json").unwrap();
    let config = conf::admin("127.0.0.1:9901")
        + &conf::xdp(["lo"], "")
        + &conf::xdp_service("web", WEB, "\"10.1.1.2:80\"", "");
    let file = std::env::temp_dir().join(format!("{}.toml", lb_tests::netns::unique("lb")));
    std::fs::write(&file, config).unwrap();
    // `lb run` by hand: the harness's clean-up would remove the record this test looks at.
    let mut run = lb::command(Some(&ns)).unwrap();
    let out = run.args(["run", "--config"]).arg(&file).env("LB_PIN_PATH", &pin).output().unwrap();
    let kept = record.exists();
    let _ = std::fs::remove_file(&file);
    let _ = lb_user::dataplane::detach(std::path::Path::new(&pin));
    assert!(kept, "a record lb cannot read stays for the operator");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&record.display().to_string()) && err.contains("remove it"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
