//! Backends from Kubernetes EndpointSlices for an XDP service in namespaces (issue 16), against
//! the tests' own API server (`lb_tests::kubeapi`) run in the balancer's namespace: scale up,
//! terminating (a held flow keeps its drained backend, no new flows), a reload and a restart
//! on adopted maps that keep the API's set and the held flow, and two overlapping processes
//! (a DaemonSet update) handing the set over. Each step through `lb backend list` and traffic.
use std::time::Duration;

use lb_tests::{
    client::{connect_in, keepalive_get},
    conf,
    kubeapi::{
        Endpoint, KubeApi,
        observe::{Listed, expect_listed, listed, listed_over, source, source_state},
    },
    lb::Lb,
    scenario::{Scenario, Serve, WEB},
    wait_until,
};

const NS: &str = "prod";
/// How soon a change must show once the watch runs.
const APPLY: Duration = Duration::from_secs(1);
/// How soon the first list must show (lb retries the kubeconfig, which the API server writes
/// after lb started, every 2 s at most), or a set after a restart or a hand-over.
const NOTICE: Duration = Duration::from_secs(8);
const T: Duration = Duration::from_secs(3);

/// The `[[xdp.service]]` `web` on [`WEB`] from Service prod/web, port `port`.
fn service(port: &str) -> String {
    let from = format!("backends_from = {{ kubernetes = \"prod/web\", port = \"{port}\" }}\n");
    format!("[[xdp.service]]\nname = \"web\"\nvip = \"{WEB}\"\n{from}")
}

/// The change shows within [`APPLY`], through the admin API and `lb backend list`.
fn expect(lb: &Lb, service: &str, expected: &Listed, what: &str) {
    expect_listed(lb, service, expected, APPLY, what);
}

/// [`expect`] within [`NOTICE`].
fn expect_slowly(lb: &Lb, expected: &Listed, what: &str) {
    expect_listed(lb, "web", expected, NOTICE, what);
}

#[test]
fn xdp_service_follows_endpointslices() {
    lb_tests::privileged!();
    // The API runs in the balancer's namespace, which the scenario creates: the config names
    // the kubeconfig first, lb retries until the server writes it.
    let dir = std::env::temp_dir().join(lb_tests::netns::unique("kubeapi"));
    let s = Scenario::topology(2).serve(Serve::Http).xdp_raw(&service("80"));
    let backends = s.backend_addrs();
    let kubeconfig = dir.join("kubeconfig");
    let s = s.config(&format!("[kubernetes]\nkubeconfig = \"{}\"\n", kubeconfig.display()));
    let mut s = s.start().unwrap();
    let api = KubeApi::start_at(s.balancer(), dir).unwrap();
    let ep = |i: usize| backends[i].ip();
    let list = |l: &[(usize, &str)]| -> Listed {
        l.iter().map(|(i, st)| (backends[*i], st.to_string())).collect()
    };
    let slice = |eps: &[Endpoint]| api.set_slice(NS, "web-a", "web", ("http", 80), eps);

    slice(&[Endpoint::ready(ep(0))]);
    expect_slowly(s.lb(), &list(&[(0, "up")]), "first list");
    assert!(wait_until(NOTICE, || source_state(s.lb()) == "synced"), "{}", source(s.lb()));
    assert!((0..4).all(|_| s.get(WEB).unwrap() == "backend-1"));

    slice(&[Endpoint::ready(ep(0)), Endpoint::ready(ep(1))]);
    expect(s.lb(), "web", &list(&[(0, "up"), (1, "up")]), "scale up");
    let clients = s.topo().add_client_addresses(16).unwrap();
    let answers = |s: &lb_tests::scenario::Running| -> Vec<String> {
        clients.iter().map(|c| s.get_from(*c, WEB).unwrap()).collect()
    };
    let first = answers(&s);
    assert!(first.iter().any(|n| n == "backend-2"), "the new backend gets flows: {first:?}");

    // Terminating: a connection to backend-2 held open across its drain keeps it.
    let c2 = clients[first.iter().position(|n| n == "backend-2").unwrap()];
    let mut held = connect_in(s.client(), Some(c2), WEB, T).unwrap();
    assert_eq!(keepalive_get(&mut held).unwrap(), "backend-2");
    slice(&[Endpoint::ready(ep(0)), Endpoint::terminating(ep(1))]);
    expect(s.lb(), "web", &list(&[(0, "up"), (1, "draining")]), "terminating");
    assert_eq!(
        keepalive_get(&mut held).unwrap(),
        "backend-2",
        "a tracked flow keeps its drained backend"
    );
    let after = answers(&s);
    assert!(
        after.iter().all(|n| n == "backend-1"),
        "no new flow to the drained backend: {after:?}"
    );

    // A reload keeps the API's set, the drain included, and the held flow.
    let (code, body) = s.admin().send("POST", "/reload", None).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(listed(s.lb(), "web"), list(&[(0, "up"), (1, "draining")]), "after reload");
    assert_eq!(keepalive_get(&mut held).unwrap(), "backend-2", "the held flow survives a reload");

    // A restart adopts the pinned maps and starts from their backends: the held flow lives on,
    // and the first list drains backend-2 again.
    let stopped = s.lb_mut().stop().unwrap();
    assert!(stopped.success(), "lb run exited with {stopped}");
    s.lb_mut().restart().unwrap();
    assert_eq!(keepalive_get(&mut held).unwrap(), "backend-2", "the held flow survives a restart");
    expect_slowly(s.lb(), &list(&[(0, "up"), (1, "draining")]), "after the restart");

    api.delete_slice(NS, "web-a");
    expect(s.lb(), "web", &list(&[]), "deleted");
    assert!(s.get(WEB).is_err(), "no backend: nothing answers");
}

/// A DaemonSet rolling update on one node: a second `lb run` beside the first watches the API
/// too but leaves the XDP maps to the first, which applies a change made meanwhile; once the
/// first stops, the second takes the maps over and puts the API's set back (the drain, which
/// adopted maps do not record), and applies changes from then on.
#[test]
fn overlapping_processes_hand_the_api_set_over() {
    lb_tests::privileged!();
    let dir = std::env::temp_dir().join(lb_tests::netns::unique("kubeapi"));
    let s = Scenario::topology(2).serve(Serve::Http).xdp_raw(&service("http"));
    let backends = s.backend_addrs();
    let admin = conf::admin("127.0.0.1:9901") + "reuse_port = true\n";
    let k8s = format!("[kubernetes]\nkubeconfig = \"{}\"\n", dir.join("kubeconfig").display());
    let first_socket =
        std::env::temp_dir().join(format!("{}.sock", lb_tests::netns::unique("adm")));
    let socket = first_socket.display().to_string();
    let mut s =
        s.config(&(admin + &k8s)).start_with(|b| b.env("LB_ADMIN_SOCKET", &socket)).unwrap();
    let api = KubeApi::start_at(s.balancer(), dir).unwrap();
    let ep = |i: usize| backends[i].ip();
    let list = |l: &[(usize, &str)]| -> Listed {
        l.iter().map(|(i, st)| (backends[*i], st.to_string())).collect()
    };
    let slice = |eps: &[Endpoint]| api.set_slice(NS, "web-a", "web", ("http", 80), eps);
    let ns = s.balancer().share();

    slice(&[Endpoint::ready(ep(0)), Endpoint::ready(ep(1))]);
    let both = list(&[(0, "up"), (1, "up")]);
    assert!(wait_until(NOTICE, || listed_over(&ns, &first_socket, "web") == both), "first process");

    let mut old = s.lb_mut().start_beside().unwrap();
    let second_socket = s.lb().admin_socket().unwrap();
    let says = s.lb().own_status().unwrap();
    assert_eq!(says["xdp_writer"], format!("pid {}", old.pid()), "{says}");
    let synced = || s.lb().own_status().is_ok_and(|v| v["sources"][0]["state"] == "synced");
    assert!(wait_until(NOTICE, synced), "the second process watches too");

    // A change while both run: the writer applies it.
    slice(&[Endpoint::ready(ep(0)), Endpoint::terminating(ep(1))]);
    let drained = list(&[(0, "up"), (1, "draining")]);
    let ok = wait_until(APPLY, || listed_over(&ns, &first_socket, "web") == drained);
    assert!(ok, "the writer drains: {:?}", listed_over(&ns, &first_socket, "web"));

    // The first stops (the kubelet's SIGTERM); the second takes the maps and the API's set.
    old.terminate();
    let took = || s.lb().own_status().is_ok_and(|v| v["xdp_writer"] == "this process");
    assert!(wait_until(Duration::from_secs(15), took), "the second process took the maps");
    let ok = wait_until(NOTICE, || listed_over(&ns, &second_socket, "web") == drained);
    assert!(ok, "the drain is put back: {:?}", listed_over(&ns, &second_socket, "web"));
    let after: Vec<String> = (0..6).map(|_| s.get(WEB).unwrap()).collect();
    assert!(
        after.iter().all(|n| n == "backend-1"),
        "no new flow to the drained backend: {after:?}"
    );
    assert!(old.wait(Duration::from_secs(40)).unwrap().success(), "the first process exits");

    // Changes apply in the second process from then on.
    slice(&[Endpoint::ready(ep(0)), Endpoint::ready(ep(1))]);
    let ok = wait_until(APPLY, || listed_over(&ns, &second_socket, "web") == both);
    assert!(ok, "undrained: {:?}", listed_over(&ns, &second_socket, "web"));
}
