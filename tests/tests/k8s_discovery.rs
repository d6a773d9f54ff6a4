//! Backends from Kubernetes EndpointSlices (`backends_from`) for an L7 upstream on loopback,
//! with kube-rs in `lb run` talking HTTPS to the tests' own API server (`lb_tests::kubeapi`).
//! Every step is checked through `lb backend list` (the admin API) and through traffic to real
//! backends: scale up and down, not ready, terminating (drained: the request in flight
//! finishes, no new ones), bookmarks, a reload, the server vanishing (stale, still serving,
//! ready) and coming back (synced, changes apply), a 410 Gone (relist, no backend dropped), and
//! an empty list against an unreachable API. The XDP cases are in `k8s_discovery_xdp.rs`.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    backends::{HttpBackend, Reply},
    client::http_get,
    conf,
    kubeapi::{
        Endpoint, KubeApi,
        observe::{Listed, Sampler, expect_listed, listed, source, source_state},
    },
    lb::Lb,
    netns::Netns,
    wait_until,
};

const NS: &str = "prod";
/// Every backend's port, as the slices' port `http` says.
const PORT: u16 = 18080;
const LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 18180);
/// How soon a change must show: a second (the bound), for the poll itself too.
const APPLY: Duration = Duration::from_secs(1);
/// How soon a failed or recovered API must show in `/status`: its retry back-off (at most
/// 2 s) allows this.
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

/// Backends 127.0.0.N:PORT in these states.
fn want(list: &[(u8, &str)]) -> Listed {
    list.iter().map(|(n, s)| (addr(*n), s.to_string())).collect()
}

/// The change shows within [`APPLY`], through the admin API and `lb backend list`.
fn expect(lb: &Lb, service: &str, expected: &Listed, what: &str) {
    expect_listed(lb, service, expected, APPLY, what);
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

    expect(&lb, "app", &want(&[(1, "up")]), "first list");
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
    expect(&lb, "app", &want(&[(1, "up"), (2, "up"), (3, "up")]), "scale up");
    assert_eq!(who(&served(&ns, LISTEN, 12)), names(&["b1", "b2", "b3"]));

    // Not ready: removed, no traffic.
    api.set_slice(
        NS,
        "web-a",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(1)), Endpoint::not_ready(ip(2))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (3, "up")]), "not ready");
    assert_eq!(who(&served(&ns, LISTEN, 10)), names(&["b1", "b3"]));

    // Terminating: drained. A request already at the backend finishes; new ones go elsewhere.
    api.set_slice(
        NS,
        "web-b",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(3)), Endpoint::ready(ip(4))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (3, "up"), (4, "up")]), "slow backend up");
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
    expect(&lb, "app", &want(&[(1, "up"), (3, "up"), (4, "draining")]), "terminating");
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
    expect(&lb, "app", &want(&[(1, "up")]), "slice deleted");
    api.set_slice(
        NS,
        "web-a",
        "web",
        ("http", PORT),
        &[Endpoint::ready(ip(1)), Endpoint::ready(ip(2))],
    );
    expect(&lb, "app", &want(&[(1, "up"), (2, "up")]), "ready again");
    assert_eq!(who(&served(&ns, LISTEN, 8)), names(&["b1", "b2"]));

    // A reload keeps the API's set (the file lists no backends), not even emptying it for a
    // moment.
    let sampler = Sampler::start(&lb, "app");
    let (code, body) = lb.admin().send("POST", "/reload", None).unwrap();
    assert_eq!(code, 200, "{body}");
    std::thread::sleep(Duration::from_millis(200));
    let two = want(&[(1, "up"), (2, "up")]);
    let seen = sampler.finish();
    assert!(seen.iter().all(|s| *s == two), "the set changed around the reload: {seen:?}");
    assert_eq!(listed(&lb, "app"), two, "after reload");

    // The API vanishes: stale, the last set serves, /ready stays 200.
    api.stop();
    assert!(wait_until(NOTICE, || source_state(&lb) == "stale"), "{}", source(&lb));
    assert!(source(&lb)["error"].as_str().is_some_and(|e| !e.is_empty()), "{}", source(&lb));
    assert!(lb.cli(&["status"]).unwrap().contains(": stale"), "lb status names the stale source");
    assert_eq!(lb.admin().metric("lb_backends_from_synced{service=\"app\"}"), 0);
    assert_eq!(lb.admin().request("GET", "/ready").unwrap().0, 200);
    assert_eq!(listed(&lb, "app"), want(&[(1, "up"), (2, "up")]), "kept while stale");
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
    expect(&lb, "app", &want(&[(1, "up"), (3, "up")]), "after the restart");
    assert!(lb.cli(&["status"]).unwrap().contains(": synced"));
    assert_eq!(lb.admin().metric("lb_backends_from_synced{service=\"app\"}"), 1);
    let three = [Endpoint::ready(ip(1)), Endpoint::ready(ip(2)), Endpoint::ready(ip(3))];
    api.set_slice(NS, "web-a", "web", ("http", PORT), &three);
    expect(&lb, "app", &want(&[(1, "up"), (2, "up"), (3, "up")]), "a change after the restart");

    // 410 Gone: a relist, and no sample of the served set misses a backend.
    let lists = api.counts().lists;
    let sampler = Sampler::start(&lb, "app");
    api.expire();
    assert!(wait_until(NOTICE, || api.counts().lists > lists), "lb listed again after the 410");
    assert!(wait_until(NOTICE, || source_state(&lb) == "synced"), "{}", source(&lb));
    std::thread::sleep(Duration::from_millis(300));
    let seen = sampler.finish();
    let all = want(&[(1, "up"), (2, "up"), (3, "up")]);
    assert!(seen.len() > 10, "sampled the set {} times", seen.len());
    assert!(seen.iter().all(|s| *s == all), "a backend dropped during the relist: {seen:?}");
    api.set_slice(NS, "web-a", "web", ("http", PORT), &[Endpoint::ready(ip(1))]);
    expect(&lb, "app", &want(&[(1, "up")]), "a change after the relist");
    assert_eq!(who(&served(&ns, LISTEN, 4)), names(&["b1"]));

    // A restart with nothing changed: stale, then synced, and no sample misses the backend.
    let lists = api.counts().lists;
    let sampler = Sampler::start(&lb, "app");
    api.stop();
    assert!(wait_until(NOTICE, || source_state(&lb) == "stale"), "{}", source(&lb));
    api.restart().unwrap();
    assert!(wait_until(NOTICE, || api.counts().lists > lists), "lb listed again");
    assert!(wait_until(NOTICE, || source_state(&lb) == "synced"), "{}", source(&lb));
    std::thread::sleep(Duration::from_millis(300));
    let seen = sampler.finish();
    let one = want(&[(1, "up")]);
    assert!(seen.iter().all(|s| *s == one), "a backend dropped across the restart: {seen:?}");
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
    assert!(listed(&lb, "app").is_empty());
    // Reached, and it lists nothing: synced with no backend.
    api.restart().unwrap();
    assert!(wait_until(NOTICE, || source_state(&lb) == "synced"), "{}", source(&lb));
    assert_eq!(source(&lb)["backends"], 0);
    assert!(listed(&lb, "app").is_empty());
    api.set_slice(NS, "web-a", "web", ("http", PORT), &[Endpoint::ready(ip(1))]);
    expect(&lb, "app", &want(&[(1, "up")]), "first endpoint");
    assert_eq!(who(&served(&ns, LISTEN, 3)), names(&["b1"]));
}
