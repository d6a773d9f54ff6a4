//! The admin API of a real `lb run` with a token (L7 only, in its own namespace): every
//! resource refused without it or with a wrong one, probes open, GET on a mutating path
//! refused, the config dump redacted, the CLI passing the token.
use std::time::Duration;

use lb_tests::{client::http_get, conf, scenario::Scenario};

const TOKEN: &str = "test-token-0123456789abcdef";

#[test]
fn admin_api_with_a_token() {
    lb_tests::privileged!();
    // A public admin address is allowed because a token is set; the harness reaches it on
    // loopback and sends the token (`lb status` while waiting for the start, too).
    let admin = conf::admin("0.0.0.0:9901") + &format!("token = \"{TOKEN}\"\n");
    let web = "127.0.0.1:8080".parse().unwrap();
    let s = Scenario::loopback(1).names(&["a"]).config(&admin).token(TOKEN).l7("web", web, "");
    let s = s.config(&conf::health("app", "http", 0.5)).start().expect("lb run");
    let ns = s.balancer();
    let backend = s.backends[0];
    let req = |method: &str, path: &str, token: Option<&str>| {
        s.admin().token(token).request(method, path).expect("admin request")
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
    assert_eq!(dump["config"]["upstream"]["app"]["backends"][0], backend.to_string());
    // The health check has run: the backend is up and checked.
    assert!(
        lb_tests::wait_until(Duration::from_secs(5), || {
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
    let cli = |args: &[&str]| {
        // Without the daemon's environment: the token must come from --token.
        let mut cmd = lb_tests::lb::command(Some(ns)).unwrap();
        cmd.args(args).args(["--admin", "127.0.0.1:9901"]).output().unwrap()
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
        http_get(ns, None, "127.0.0.1:8080".parse().unwrap(), Duration::from_secs(3)).unwrap(),
        "a"
    );
}
