//! Reload under continuous load (XDP VIP and L7 listener, a fresh connection per request): an
//! invalid config is refused with its errors and the old one keeps serving; valid changes
//! (a backend added, weights changed, a service and a route added) apply through `lb reload`
//! and SIGHUP with zero failed requests.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    lb::{Lb, pin_path},
    ops::{Load, wait_until},
    privileged_or_skip,
    servers::{HttpBackend, http_get},
    topology::{Topology, VIP4},
};

const L7: &str = "10.0.0.1:8080";

/// The config with XDP service `web` over `xdp` backends (and `web2` if asked) and the L7
/// group `app` over `app`, each backend `(index, weight)` of the topology.
fn config(
    topo: &Topology,
    pin: &str,
    xdp: &[(usize, u32)],
    app: &[(usize, u32)],
    web2: bool,
) -> String {
    let ifaces: Vec<String> = topo.lb_interfaces().iter().map(|i| format!("{i:?}")).collect();
    let list = |set: &[(usize, u32)]| {
        set.iter()
            .map(|(i, w)| format!("{{ addr = \"{}:80\", weight = {w} }}", topo.backends[*i].v4))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let web2 = if web2 {
        format!(
            "[[xdp.service]]\nname = \"web2\"\nvip = \"10.200.0.2:80\"\nbackends = [\"{}:80\"]\n",
            topo.backends[0].v4
        )
    } else {
        String::new()
    };
    format!(
        r#"
[admin]
listen = "127.0.0.1:9901"
[xdp]
interfaces = [{}]
pin_path = "{pin}"
[[xdp.service]]
name = "web"
vip = "{VIP4}:80"
backends = [{}]
{web2}
[[http.listener]]
name = "public"
listen = "{L7}"
[[http.route]]
listener = "public"
upstream = "app"
[upstream.app]
backends = [{}]
"#,
        ifaces.join(", "),
        list(xdp),
        list(app)
    )
}

fn backends_of(lb: &Lb, topo: &Topology, service: &str) -> Vec<(String, u64)> {
    let v = lb.json(&topo.lb, &["backend", "list", service]).unwrap();
    v["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["addr"].as_str().unwrap().to_string(), b["weight"].as_u64().unwrap()))
        .collect()
}

#[test]
fn reload_applies_valid_changes_under_load_and_refuses_invalid_ones() {
    if !privileged_or_skip("reload_applies_valid_changes_under_load_and_refuses_invalid_ones") {
        return;
    }
    let topo = Topology::new(3).expect("topology");
    let _servers: Vec<HttpBackend> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            HttpBackend::start(&b.ns, "0.0.0.0:80".parse().unwrap(), &format!("backend-{}", i + 1))
                .unwrap()
        })
        .collect();
    let pin = pin_path();
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let lb = Lb::start(
        &topo.lb,
        &config(&topo, &pin, &[(0, 1), (1, 1)], &[(0, 1), (1, 1)], false),
        admin,
    )
    .expect("lb run");
    let vip = SocketAddr::new(VIP4.into(), 80);
    let l7: SocketAddr = L7.parse().unwrap();
    let load = Load::start(&topo.client, vec![vip, l7]);
    load.wait_for(50);

    // Invalid: refused with the error and its line; the old config keeps serving.
    std::fs::write(&lb.config, config(&topo, &pin, &[(0, 1)], &[(0, 0)], false)).unwrap();
    let out = topo.lb.exec_output(&[
        lb_tests::lb::lb_binary().unwrap().to_str().unwrap(),
        "reload",
        "--admin",
        "127.0.0.1:9901",
    ]);
    let out = out.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream.app: backend") && err.contains("weight 0") && err.contains("line "),
        "{err}"
    );
    assert_eq!(backends_of(&lb, &topo, "web").len(), 2, "the old XDP service stays");
    load.wait_for(50);

    // A change that takes a restart is refused too.
    let moved = config(&topo, &pin, &[(0, 1), (1, 1)], &[(0, 1), (1, 1)], false)
        .replace("listen = \"127.0.0.1:9901\"", "listen = \"127.0.0.1:9902\"");
    std::fs::write(&lb.config, moved).unwrap();
    let err = lb.cli(&topo.lb, &["reload"]).unwrap_err().to_string();
    assert!(err.contains("admin.listen changed"), "{err}");

    // Valid: backend-3 added to both, weights changed, a new XDP service.
    std::fs::write(
        &lb.config,
        config(&topo, &pin, &[(0, 1), (1, 2), (2, 1)], &[(0, 1), (1, 3), (2, 1)], true),
    )
    .unwrap();
    let out = lb.cli(&topo.lb, &["reload"]).expect("reload");
    assert!(out.contains("reloaded") && out.contains("upstream app: backends"), "{out}");
    let b = |i: usize| format!("{}:80", topo.backends[i].v4);
    assert_eq!(backends_of(&lb, &topo, "web"), [(b(0), 1), (b(1), 2), (b(2), 1)]);
    assert_eq!(backends_of(&lb, &topo, "app"), [(b(0), 1), (b(1), 3), (b(2), 1)]);
    assert_eq!(
        http_get(&topo.client, None, "10.200.0.2:80".parse().unwrap(), Duration::from_secs(3))
            .unwrap(),
        "backend-1",
        "the added service answers"
    );
    load.wait_for(200);

    // SIGHUP: backend-1 leaves the L7 group.
    std::fs::write(
        &lb.config,
        config(&topo, &pin, &[(0, 1), (1, 2), (2, 1)], &[(1, 1), (2, 1)], true),
    )
    .unwrap();
    lb_tests::netns::run(&["kill", "-HUP", &lb_pid(&lb.config)]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || backends_of(&lb, &topo, "app").len() == 2),
        "SIGHUP did not reload"
    );
    load.wait_for(100);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failed requests during reloads: {:?}", report.errors);
    assert!(
        report.seen.get("backend-3").copied().unwrap_or(0) > 0,
        "backend-3 got traffic: {:?}",
        report.seen
    );
    // After the SIGHUP, L7 never picks backend-1.
    for _ in 0..6 {
        assert_ne!(http_get(&topo.client, None, l7, Duration::from_secs(3)).unwrap(), "backend-1");
    }
}

/// The pid of the `lb run` started with `config` (its path is unique to the test).
fn lb_pid(config: &std::path::Path) -> String {
    let want = config.to_str().unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> =
                cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_lb = args.iter().any(|a| a == "run") && args.iter().any(|a| a == want);
            // `ip netns exec` execs lb, so the process is lb itself, not ip.
            (is_lb && !args[0].ends_with("ip")).then(|| pid.to_string())
        })
        .next()
        .expect("lb run pid")
}
