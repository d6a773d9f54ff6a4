//! Backends from Kubernetes EndpointSlices (`backends_from`), with kube-rs in `lb run` talking
//! HTTPS to the tests' own API server (`lb_tests::kubeapi`). Every step is checked through
//! `lb backend list` (the admin API) and through traffic to real backends: scale up and down,
//! not ready, terminating (drained: the request in flight finishes, no new ones), a reload, the
//! server vanishing (stale, still serving, ready) and coming back (synced, changes apply), a
//! 410 Gone (relist, no backend dropped), an empty list against an unreachable API, and an XDP
//! service in namespaces.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    backends::{HttpBackend, Reply},
    client::{connect_in, http_get, keepalive_get},
    conf,
    kubeapi::{Endpoint, KubeApi},
    lb::Lb,
    netns::Netns,
    scenario::{Scenario, Serve, WEB},
    wait_until,
};
use serde_json::Value;

const NS: &str = "prod";
/// Every backend's port, as the slices' port `http` says.
const PORT: u16 = 18080;
const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 18180);
/// How soon a change must show: a second (the bound), for the poll itself too.
const APPLY: Duration = Duration::from_secs(1);
/// How soon a failed or recovered API must show in `/status`: the watcher's idle checks and
/// its retry back-off (at most 2 s) allow this.
const NOTICE: Duration = Duration::from_secs(8);
const T: Duration = Duration::from_secs(3);

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::new(ip(n), PORT)
}

/// An L7 listener on [`LISTEN`] to upstream `app` from Service prod/web, port `http`; with
/// `[kubernetes] kubeconfig` when given.
fn l7_config(kubeconfig: Option<&std::path::Path>) -> String {
    let from = "backends_from = { kubernetes = \"prod/web\", port = \"http\" }\n";
    let body = conf::http_listener("public", LISTEN, "") + &conf::route("public", "app");
    let k8s = kubeconfig.map(|p| format!("[kubernetes]\nkubeconfig = \"{}\"\n", p.display()));
    format!("{}{body}[upstream.app]\n{from}", k8s.unwrap_or_default())
}

/// Each backend of `service` and its state, from a `/services/NAME` body (what `lb backend
/// list NAME --json` prints).
fn parse(v: &Value) -> BTreeMap<SocketAddr, String> {
    v["services"][0]["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (b["addr"].as_str().unwrap().parse().unwrap(), b["state"].as_str().unwrap().into())
        })
        .collect()
}

fn admin_list(lb: &Lb, service: &str) -> BTreeMap<SocketAddr, String> {
    lb.admin()
        .get(&format!("/services/{service}"))
        .ok()
        .and_then(|b| serde_json::from_str(&b).ok())
        .map(|v| parse(&v))
        .unwrap_or_default()
}

fn want(list: &[(u8, &str)], port: Option<u16>) -> BTreeMap<SocketAddr, String> {
    let at = |n: u8| port.map_or(addr(n), |p| SocketAddr::new(ip(n), p));
    list.iter().map(|(n, s)| (at(*n), s.to_string())).collect()
}

/// Waits (at most [`APPLY`]) until the admin API lists exactly `expected`, then checks that
/// `lb backend list` says the same.
fn expect(lb: &Lb, service: &str, expected: &BTreeMap<SocketAddr, String>, what: &str) {
    let start = Instant::now();
    let ok = wait_until(APPLY, || admin_list(lb, service) == *expected);
    assert!(
        ok,
        "{what}: after {:?} lb lists {:?}, want {expected:?}",
        start.elapsed(),
        admin_list(lb, service)
    );
    let cli = lb.json(&["backend", "list", service]).expect("lb backend list");
    assert_eq!(parse(&cli), *expected, "{what}: lb backend list");
}

/// The one source in `/status`.
fn source(lb: &Lb) -> Value {
    let status: Value = serde_json::from_str(&lb.admin().get("/status").unwrap()).unwrap();
    status["sources"][0].clone()
}

fn source_state(lb: &Lb) -> String {
    source(lb)["state"].as_str().unwrap_or("").to_string()
}

/// Who answered `n` fresh requests to `target` from `ns`, by name.
fn served(ns: &Netns, target: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let name = http_get(ns, None, target, T).expect("request through lb");
        *out.entry(name).or_default() += 1;
    }
    out
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn who(m: &BTreeMap<String, usize>) -> Vec<String> {
    m.keys().cloned().collect()
}

/// Samples the admin list every 10 ms until stopped: every set lb served meanwhile.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<BTreeMap<SocketAddr, String>>>,
}

impl Monitor {
    fn start(lb: &Lb, service: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let admin = lb.admin();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Some(v) = admin
                    .get(&format!("/services/{service}"))
                    .ok()
                    .and_then(|b| serde_json::from_str(&b).ok())
                {
                    seen.push(parse(&v));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<BTreeMap<SocketAddr, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn l7_upstream_follows_endpointslices() {
    lb_tests::privileged!();
    let ns = Netns::new("k8s").unwrap();
    let mut api = KubeApi::start(&ns).unwrap();
    api.set_slice(NS, "web-a", "web", ("http", PORT), &[Endpoint::ready(ip(1))]);
    // Another Service's slice in the namespace: the label selector keeps it out.
    api.set_slice(NS, "db-a", "db", ("http", PORT), &[Endpoint::ready(ip(9))]);
    let _fast: Vec<HttpBackend> =
        (1..=3).map(|n| HttpBackend::start(&ns, addr(n), &format!("b{n}")).unwrap()).collect();
    let slow = HttpBackend::with(&ns, addr(4), "b4", Reply::Slow(Duration::from_secs(3))).unwrap();
    let lb = Lb::builder(&ns, l7_config(Some(&api.kubeconfig())))
        .wait_listening(&ns, LISTEN)
        .start()
        .unwrap();

    expect(&lb, "app", &want(&[(1, "up")], None), "first list");
    assert_eq!(source_state(&lb), "synced", "{}", source(&lb));
    assert_eq!(who(&served(&ns, LISTEN, 6)), names(&["b1"]));
    // An idle watch: BOOKMARKs arrive and are taken (no error, no new list or watch).
    let before = api.counts();
    assert!(wait_until(NOTICE, || api.counts().bookmarks >= before.bookmarks + 2));
    let after = api.counts();
    assert_eq!((after.lists, after.watches), (before.lists, before.watches), "{after:?}");
    assert_eq!(source_state(&lb), "synced");

    // Scale up: a slice grows, a second slice appears.
    api.set_slice(
        NS,
        "web-a",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(1)), Endpoint::ready(ip(2))],
    );
    api.set_slice(NS, "web-b", "web", ("http", PORT), &[Endpoint::ready(ip(3))]);
    expect(&lb, "app", &want(&[(1, "up"), (2, "up"), (3, "up")], None), "scale up");
    assert_eq!(who(&served(&ns, LISTEN, 12)), names(&["b1", "b2", "b3"]));

    // Not ready: removed, no traffic.
    api.set_slice(
        NS,
        "web-a",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(1)), Endpoint::not_ready(ip(2))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (3, "up")], None), "not ready");
    assert_eq!(who(&served(&ns, LISTEN, 10)), names(&["b1", "b3"]));

    // Terminating: drained. A request already at the backend finishes; new ones go elsewhere.
    api.set_slice(
        NS,
        "web-b",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(3)), Endpoint::ready(ip(4))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (3, "up"), (4, "up")], None), "slow backend up");
    let mut in_flight = Vec::new();
    for _ in 0..9 {
        let client = ns.share();
        in_flight.push(std::thread::spawn(move || {
            http_get(&client, None, LISTEN, Duration::from_secs(10))
        }));
        if wait_until(Duration::from_millis(150), || !slow.arrived.lock().unwrap().is_empty()) {
            break;
        }
    }
    assert_eq!(slow.arrived.lock().unwrap().len(), 1, "one request in flight at the slow backend");
    api.set_slice(
        NS,
        "web-b",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(3)), Endpoint::terminating(ip(4))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (3, "up"), (4, "draining")], None), "terminating");
    assert_eq!(who(&served(&ns, LISTEN, 10)), names(&["b1", "b3"]));
    let answers: Vec<String> =
        in_flight.into_iter().map(|t| t.join().unwrap().expect("in flight")).collect();
    assert!(
        answers.contains(&"b4".to_string()),
        "the drained backend finished its request: {answers:?}"
    );
    assert_eq!(slow.arrived.lock().unwrap().len(), 1, "no new request reached the drained backend");

    // Scale down: a slice goes, another shrinks and grows again.
    api.delete_slice(NS, "web-b");
    expect(&lb, "app", &want(&[(1, "up")], None), "slice deleted");
    api.set_slice(
        NS,
        "web-a",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(1)), Endpoint::ready(ip(2))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (2, "up")], None), "ready again");
    assert_eq!(who(&served(&ns, LISTEN, 8)), names(&["b1", "b2"]));

    // A reload keeps the API's set (the file lists no backends), not even emptying it for a
    // moment.
    let monitor = Monitor::start(&lb, "app");
    let (code, body) = lb.admin().send("POST", "/reload", None).unwrap();
    assert_eq!(code, 200, "{body}");
    std::thread::sleep(Duration::from_millis(200));
    let two = want(&[(1, "up"), (2, "up")], None);
    let seen = monitor.finish();
    assert!(seen.iter().all(|s| *s == two), "the set changed around the reload: {seen:?}");
    assert_eq!(admin_list(&lb, "app"), two, "after reload");

    // The API vanishes: stale, the last set serves, /ready stays 200.
    api.stop();
    assert!(wait_until(NOTICE, || source_state(&lb) == "stale"), "{}", source(&lb));
    assert!(source(&lb)["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", source(&lb));
    assert!(lb.cli(&["status"]).unwrap().contains(": stale"), "lb status names the stale source");
    assert_eq!(lb.admin().request("GET", "/ready").unwrap().0, 200);
    assert_eq!(admin_list(&lb, "app"), want(&[(1, "up"), (2, "up")], None), "kept while stale");
    assert_eq!(who(&served(&ns, LISTEN, 8)), names(&["b1", "b2"]));

    // Back, with what changed meanwhile: synced, and changes apply again.
    api.set_slice(
        NS,
        "web-a",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(1)), Endpoint::ready(ip(3))],
    );
    api.restart().unwrap();
    assert!(wait_until(NOTICE, || source_state(&lb) == "synced"), "{}", source(&lb));
    expect(&lb, "app", &want(&[(1, "up"), (3, "up")], None), "after the restart");
    assert!(lb.cli(&["status"]).unwrap().contains(": synced"));
    let three = [Endpoint::ready(ip(1)), Endpoint::ready(ip(2)), Endpoint::ready(ip(3))];
    api.set_slice(NS, "web-a", "web", ("http", PORT), &three);
    expect(
        &lb,
        "app",
        &want(&[(1, "up"), (2, "up"), (3, "up")], None),
        "a change after the restart",
    );

    // 410 Gone: a relist, and no sample of the served set misses a backend.
    let lists = api.counts().lists;
    let monitor = Monitor::start(&lb, "app");
    api.expire();
    assert!(wait_until(NOTICE, || api.counts().lists > lists), "lb listed again after the 410");
    assert!(wait_until(NOTICE, || source_state(&lb) == "synced"), "{}", source(&lb));
    std::thread::sleep(Duration::from_millis(300));
    let seen = monitor.finish();
    let all = want(&[(1, "up"), (2, "up"), (3, "up")], None);
    assert!(seen.len() > 10, "sampled the set {} times", seen.len());
    assert!(seen.iter().all(|s| *s == all), "a backend dropped during the relist: {seen:?}");
    api.set_slice(NS, "web-a", "web", ("http", PORT), &[Endpoint::ready(ip(1))]);
    expect(&lb, "app", &want(&[(1, "up")], None), "a change after the relist");
    assert_eq!(who(&served(&ns, LISTEN, 4)), names(&["b1"]));
}

#[test]
fn an_empty_list_is_synced_an_unreachable_api_is_stale() {
    lb_tests::privileged!();
    let ns = Netns::new("k8s").unwrap();
    let mut api = KubeApi::start(&ns).unwrap();
    api.stop();
    let _b1 = HttpBackend::start(&ns, addr(1), "b1").unwrap();
    // No [kubernetes] table: lb infers its client as kube-rs does, here from $KUBECONFIG.
    let kubeconfig = api.kubeconfig().display().to_string();
    let lb = Lb::builder(&ns, l7_config(None))
        .env("KUBECONFIG", &kubeconfig)
        .wait_listening(&ns, LISTEN)
        .start()
        .unwrap();
    // Never reached: stale, ready, no backend.
    let failed = || source(&lb)["error"].as_str().is_some_and(|e| e != "no list from the API yet");
    assert!(wait_until(NOTICE, failed), "the connection error is reported: {}", source(&lb));
    assert_eq!(source_state(&lb), "stale");
    assert_eq!(
        lb.admin().request("GET", "/ready").unwrap().0,
        200,
        "an unreachable API does not make lb unready"
    );
    assert!(admin_list(&lb, "app").is_empty());
    // Reached, and it lists nothing: synced with no backend.
    api.restart().unwrap();
    assert!(wait_until(NOTICE, || source_state(&lb) == "synced"), "{}", source(&lb));
    assert_eq!(source(&lb)["backends"], 0);
    assert!(admin_list(&lb, "app").is_empty());
    api.set_slice(NS, "web-a", "web", ("http", PORT), &[Endpoint::ready(ip(1))]);
    expect(&lb, "app", &want(&[(1, "up")], None), "first endpoint");
    assert_eq!(who(&served(&ns, LISTEN, 3)), names(&["b1"]));
}

/// [`expect`] for the XDP service, whose changes may wait for the API to come up first.
fn expect_slowly(lb: &Lb, expected: &BTreeMap<SocketAddr, String>, what: &str) {
    let ok = wait_until(NOTICE, || admin_list(lb, "web") == *expected);
    assert!(ok, "{what}: lb lists {:?}, want {expected:?}", admin_list(lb, "web"));
    assert_eq!(parse(&lb.json(&["backend", "list", "web"]).unwrap()), *expected, "{what}");
}

#[test]
fn xdp_service_follows_endpointslices() {
    lb_tests::privileged!();
    // The API runs in the balancer's namespace, which the scenario creates: the config names
    // the kubeconfig first, lb retries until the server writes it.
    let dir = std::env::temp_dir().join(lb_tests::netns::unique("kubeapi"));
    let from = "backends_from = { kubernetes = \"prod/web\", port = \"80\" }\n";
    let service = format!("[[xdp.service]]\nname = \"web\"\nvip = \"{WEB}\"\n{from}");
    let s = Scenario::topology(2).serve(Serve::Http).xdp_raw(&service);
    let backends = s.backend_addrs();
    let kubeconfig = dir.join("kubeconfig");
    let s = s.config(&format!("[kubernetes]\nkubeconfig = \"{}\"\n", kubeconfig.display()));
    let mut s = s.start().unwrap();
    let api = KubeApi::start_at(s.balancer(), dir).unwrap();
    let ep = |i: usize| backends[i].ip();
    let list = |l: &[(usize, &str)]| -> BTreeMap<SocketAddr, String> {
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
    assert_eq!(admin_list(s.lb(), "web"), list(&[(0, "up"), (1, "draining")]), "after reload");
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

/// `lb backend list SERVICE --json` over one process's own admin socket (two overlap).
fn list_over(ns: &Netns, socket: &std::path::Path, service: &str) -> BTreeMap<SocketAddr, String> {
    let lb = lb_tests::lb::lb_binary().unwrap().display().to_string();
    let admin = format!("unix:{}", socket.display());
    let out = ns.exec(&[&lb, "backend", "list", service, "--admin", &admin, "--json"]);
    out.ok().and_then(|o| serde_json::from_str(&o).ok()).map(|v| parse(&v)).unwrap_or_default()
}

/// A DaemonSet rolling update on one node: a second `lb run` beside the first watches the API
/// too but leaves the XDP maps to the first, which applies a change made meanwhile; once the
/// first stops, the second takes the maps over and puts the API's set back (the drain, which
/// adopted maps do not record), and applies changes from then on.
#[test]
fn overlapping_processes_hand_the_api_set_over() {
    lb_tests::privileged!();
    let dir = std::env::temp_dir().join(lb_tests::netns::unique("kubeapi"));
    let from = "backends_from = { kubernetes = \"prod/web\", port = \"http\" }\n";
    let service = format!("[[xdp.service]]\nname = \"web\"\nvip = \"{WEB}\"\n{from}");
    let s = Scenario::topology(2).serve(Serve::Http).xdp_raw(&service);
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
    let list = |l: &[(usize, &str)]| -> BTreeMap<SocketAddr, String> {
        l.iter().map(|(i, st)| (backends[*i], st.to_string())).collect()
    };
    let slice = |eps: &[Endpoint]| api.set_slice(NS, "web-a", "web", ("http", 80), eps);
    let ns = s.balancer().share();

    slice(&[Endpoint::ready(ep(0)), Endpoint::ready(ep(1))]);
    let both = list(&[(0, "up"), (1, "up")]);
    assert!(wait_until(NOTICE, || list_over(&ns, &first_socket, "web") == both), "first process");

    let mut old = s.lb_mut().start_beside().unwrap();
    let second_socket = s.lb().admin_socket().unwrap();
    let says = s.lb().own_status().unwrap();
    assert_eq!(says["xdp_writer"], format!("pid {}", old.pid()), "{says}");
    let synced = || s.lb().own_status().is_ok_and(|v| v["sources"][0]["state"] == "synced");
    assert!(wait_until(NOTICE, synced), "the second process watches too");

    // A change while both run: the writer applies it.
    slice(&[Endpoint::ready(ep(0)), Endpoint::terminating(ep(1))]);
    let drained = list(&[(0, "up"), (1, "draining")]);
    let ok = wait_until(APPLY, || list_over(&ns, &first_socket, "web") == drained);
    assert!(ok, "the writer drains: {:?}", list_over(&ns, &first_socket, "web"));

    // The first stops (the kubelet's SIGTERM); the second takes the maps and the API's set.
    old.terminate();
    let took = || s.lb().own_status().is_ok_and(|v| v["xdp_writer"] == "this process");
    assert!(wait_until(Duration::from_secs(15), took), "the second process took the maps");
    let ok = wait_until(NOTICE, || list_over(&ns, &second_socket, "web") == drained);
    assert!(ok, "the drain is put back: {:?}", list_over(&ns, &second_socket, "web"));
    let after: Vec<String> = (0..6).map(|_| s.get(WEB).unwrap()).collect();
    assert!(
        after.iter().all(|n| n == "backend-1"),
        "no new flow to the drained backend: {after:?}"
    );
    assert!(old.wait(Duration::from_secs(40)).unwrap().success(), "the first process exits");

    // Changes apply in the second process from then on.
    slice(&[Endpoint::ready(ep(0)), Endpoint::ready(ep(1))]);
    let ok = wait_until(APPLY, || list_over(&ns, &second_socket, "web") == both);
    assert!(ok, "undrained: {:?}", list_over(&ns, &second_socket, "web"));
}
