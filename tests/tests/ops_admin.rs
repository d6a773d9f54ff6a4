//! The admin API of a real `lb run` without a token (L7 only, in its own namespace): every
//! resource, GET on a mutating path refused, and a public admin address refused without a
//! token. With a token: `ops_admin_token.rs`.
use std::net::SocketAddr;

use lb_tests::{
    lb::Lb, netns::Netns, ops::admin_request, privileged_or_skip, servers::HttpBackend,
};

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
fn admin_api_without_a_token() {
    if !privileged_or_skip("admin_api_without_a_token") {
        return;
    }
    let ns = Netns::new("adn").expect("namespace");
    let backend = HttpBackend::start(&ns, "127.0.0.1:0".parse().unwrap(), "a").expect("backend");
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let lb = Lb::start(&ns, &config(admin, None, backend.addr), admin).expect("lb run");
    for path in
        ["/status", "/stats", "/services/app", "/health", "/metrics", "/config", "/live", "/ready"]
    {
        let (status, body) = admin_request(&ns, admin, "GET", path, None).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    let (status, body) =
        admin_request(&ns, admin, "POST", "/services/app/backends/127.0.0.2:80/drain", None)
            .unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(admin_request(&ns, admin, "GET", "/reload", None).unwrap().0, 405);
    assert_eq!(admin_request(&ns, admin, "PUT", "/stats", None).unwrap().0, 405);
    drop(lb);
}

#[test]
fn a_public_admin_address_without_a_token_is_refused() {
    if !privileged_or_skip("a_public_admin_address_without_a_token_is_refused") {
        return;
    }
    let ns = Netns::new("adr").expect("namespace");
    let path = std::env::temp_dir().join(format!("{}-lb.toml", ns.name));
    std::fs::write(&path, "[admin]\nlisten = \"0.0.0.0:9901\"\n").unwrap();
    let lb = lb_tests::lb::lb_binary().unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(lb)
        .args(["run", "--config"])
        .arg(&path)
        .env_remove("LB_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: admin.listen") && err.contains("allow_insecure"), "{err}");
    // allow_insecure = true starts it (and it stops on SIGTERM).
    let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
    let lb = Lb::start(&ns, "[admin]\nlisten = \"0.0.0.0:9901\"\nallow_insecure = true\n", admin)
        .expect("lb run");
    assert_eq!(admin_request(&ns, admin, "GET", "/status", None).unwrap().0, 200);
    drop(lb);
    let _ = std::fs::remove_file(path);
}
