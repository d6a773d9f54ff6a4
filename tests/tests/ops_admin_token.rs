//! The admin API of a real `lb run` with a token (L7 only, in its own namespace): every
//! resource refused without it or with a wrong one, probes open, GET on a mutating path
//! refused, the config dump redacted, the CLI passing the token. Alone in its binary: it sets
//! LB_ADMIN_TOKEN for the harness's `lb status` readiness poll.
use std::{net::SocketAddr, time::Duration};

use lb_tests::{
    lb::Lb,
    netns::Netns,
    ops::admin_request,
    privileged_or_skip,
    servers::{HttpBackend, http_get},
};

const TOKEN: &str = "test-token-0123456789abcdef";

fn config(admin: SocketAddr, token: Option<&str>, backend: SocketAddr) -> String {
    let token = token.map(|t| format!("token = \"{t}\"\n")).unwrap_or_default();
    format!(
        r#"
[admin]
listen = "{admin}"
{token}
[[http.listener]]
name = "web"
listen = "127.0.0.1:8080"
[[http.route]]
listener = "web"
upstream = "app"
[upstream.app]
backends = ["{backend}"]
[health.app]
type = "http"
path = "/"
interval = 0.5
timeout = 0.5
"#
    )
}

#[test]
fn admin_api_with_a_token() {
    if !privileged_or_skip("admin_api_with_a_token") {
        return;
    }
    let ns = Netns::new("adm").expect("namespace");
    let backend = HttpBackend::start(&ns, "127.0.0.1:0".parse().unwrap(), "a").expect("backend");
    // A public admin address is allowed because a token is set.
    let admin: SocketAddr = "0.0.0.0:9901".parse().unwrap();
    let reach: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let path = std::env::temp_dir().join(format!("{}-lb.toml", ns.name));
    std::fs::write(&path, config(admin, Some(TOKEN), backend.addr)).unwrap();
    // Lb::start waits on `lb status`, which must send the token: LB_ADMIN_TOKEN reaches it.
    // SAFETY: the only test of this binary; set before any other thread reads the env.
    unsafe { std::env::set_var("LB_ADMIN_TOKEN", TOKEN) };
    let lb = Lb::start(&ns, &config(admin, Some(TOKEN), backend.addr), reach).expect("lb run");
    // SAFETY: as above.
    unsafe { std::env::remove_var("LB_ADMIN_TOKEN") };
    let req = |method: &str, path: &str, token: Option<&str>| {
        admin_request(&ns, reach, method, path, token).expect("admin request")
    };

    // Probes need no token; everything else does.
    assert_eq!(req("GET", "/live", None).0, 200);
    assert_eq!(req("GET", "/ready", None), (200, "{\n  \"ready\": true\n}".into()));
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/stats"),
        ("GET", "/services"),
        ("GET", "/services/app"),
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/config"),
        ("POST", "/reload"),
        ("POST", "/services/app/backends/127.0.0.1:1/drain"),
        ("DELETE", "/services/app/backends/127.0.0.1:1"),
    ] {
        let (status, body) = req(method, path, None);
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        assert_eq!(req(method, path, Some("wrong-token-0123456789")).0, 401, "{method} {path}");
    }

    // With the token: every read answers.
    for path in ["/status", "/stats", "/services", "/services/app", "/health", "/metrics"] {
        let (status, body) = req("GET", path, Some(TOKEN));
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    let (_, status) = req("GET", "/status", Some(TOKEN));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    let (_, dump) = req("GET", "/config", Some(TOKEN));
    assert!(!dump.contains(TOKEN), "the token is redacted: {dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["config"]["admin"]["token"], "(redacted)", "{dump}");
    assert_eq!(dump["config"]["upstream"]["app"]["backends"][0], backend.addr.to_string());
    // The health check has run: the backend is up and checked.
    assert!(
        lb_tests::ops::wait_until(Duration::from_secs(5), || {
            let (_, h) = req("GET", "/health", Some(TOKEN));
            h.contains("\"up\": true")
        }),
        "health state visible"
    );

    // Mutations: only by POST/DELETE.
    assert_eq!(req("GET", "/reload", Some(TOKEN)).0, 405);
    assert_eq!(req("GET", "/services/app/backends", Some(TOKEN)).0, 405);
    assert_eq!(req("GET", "/services/app/backends/127.0.0.1:1/drain", Some(TOKEN)).0, 405);
    assert_eq!(req("POST", "/status", Some(TOKEN)).0, 405);
    assert_eq!(req("POST", "/reload", Some(TOKEN)).0, 200);
    assert_eq!(req("GET", "/nothing", Some(TOKEN)).0, 404);

    // The CLI sends the token from --token, or refuses clearly without it.
    let lb_bin = lb_tests::lb::lb_binary().unwrap();
    let lb_bin = lb_bin.to_str().unwrap();
    let cli = |args: &[&str]| {
        let mut full = vec![lb_bin];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--admin", "127.0.0.1:9901"]);
        ns.exec_output(&full).unwrap()
    };
    let out = cli(&["backend", "add", "app", "127.0.0.1:1", "--token", TOKEN]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["backend", "list", "app", "--token", TOKEN]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(list.contains("127.0.0.1:1") && list.contains("HEALTH"), "{list}");
    let out = cli(&["backend", "remove", "app", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bearer token"), "{out:?}");
    let out = cli(&["backend", "remove", "app", "127.0.0.1:1", "--token", TOKEN]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        http_get(&ns, None, "127.0.0.1:8080".parse().unwrap(), Duration::from_secs(3)).unwrap(),
        "a"
    );
    drop(lb);
    let _ = std::fs::remove_file(path);
}
