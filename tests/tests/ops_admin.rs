//! The admin API of a real `lb run` without a token (L7 only, in its own namespace): every
//! resource, GET on a mutating path refused, and a public admin address refused without a
//! token. With a token: `ops_admin_token.rs`.
use lb_tests::{conf, lb::Lb, netns::Netns, scenario::Scenario};

#[test]
fn admin_api_without_a_token() {
    lb_tests::privileged!();
    // One health-checked L7 listener: every admin resource has something in it.
    let s = Scenario::loopback(1).names(&["a"]).l7("web", "127.0.0.1:8080".parse().unwrap(), "");
    let s = s.config(&conf::health("app", "http", 0.5)).start().expect("lb run");
    let admin = s.admin();
    for path in
        ["/status", "/stats", "/services/app", "/health", "/metrics", "/config", "/live", "/ready"]
    {
        let (status, body) = admin.request("GET", path).unwrap();
        assert_eq!(status, 200, "GET {path}: {body}");
    }
    let (status, body) =
        admin.request("POST", "/services/app/backends/127.0.0.2:80/drain").unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(admin.request("GET", "/reload").unwrap().0, 405);
    assert_eq!(admin.request("PUT", "/stats").unwrap().0, 405);
}

#[test]
fn a_public_admin_address_without_a_token_is_refused() {
    lb_tests::privileged!();
    let ns = Netns::new("adr").expect("namespace");
    let public = conf::admin("0.0.0.0:9901");
    let out = Lb::builder(&ns, public.as_str()).run_to_exit().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2: admin.listen") && err.contains("allow_insecure"), "{err}");
    // allow_insecure = true starts it (and it stops on SIGTERM).
    let lb = Lb::builder(&ns, public + "allow_insecure = true\n").start().expect("lb run");
    assert_eq!(lb.admin().request("GET", "/status").unwrap().0, 200);
}

/// What a web page on the host can send: a cross-origin `fetch(..., {mode: "no-cors"})`, a
/// rebinding page's request (its own name as `Host`), a form POST. All refused, nothing
/// changes; the CLI over the unix socket `[admin] socket` (mode 0600) still works.
#[test]
fn web_pages_cannot_drive_the_admin_api_and_the_unix_socket_can() {
    lb_tests::privileged!();
    let sock = std::env::temp_dir().join(format!("lb-admin-{}.sock", std::process::id()));
    let s = Scenario::loopback(1).names(&["a"]).l7("web", "127.0.0.1:8080".parse().unwrap(), "");
    let s = s.config(&format!(
        "[admin]\nlisten = \"127.0.0.1:9901\"\nsocket = {:?}\n",
        sock.display().to_string()
    ));
    let s = s.start().expect("lb run");
    let admin = s.admin();
    let target = s.backend_addrs()[0];
    let drain = format!("/services/app/backends/{target}/drain");
    let body = format!("{{\"addr\": \"{target}\"}}");
    let len = body.len();
    let refused = [
        // fetch("http://127.0.0.1:9901/...", {method: "POST", mode: "no-cors", body}) as
        // Chromium sends it.
        (
            403,
            format!(
                "POST {drain} HTTP/1.1\r\nhost: 127.0.0.1:9901\r\norigin: http://evil.example\r\nsec-fetch-site: cross-site\r\nsec-fetch-mode: no-cors\r\ncontent-type: text/plain;charset=UTF-8\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n{body}"
            ),
        ),
        // DNS rebinding: the page's own origin, so no Origin header, but its name as Host.
        (
            403,
            format!(
                "POST {drain} HTTP/1.1\r\nhost: rebind.evil.example:9901\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n{body}"
            ),
        ),
        // A form body (no preflight needed), without Origin as an old client might.
        (
            415,
            format!(
                "POST {drain} HTTP/1.1\r\nhost: 127.0.0.1:9901\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n{body}"
            ),
        ),
        // A cross-site GET (an <img> or no-cors fetch) reads nothing either.
        (
            403,
            "GET /config HTTP/1.1\r\nhost: 127.0.0.1:9901\r\nsec-fetch-site: cross-site\r\nconnection: close\r\n\r\n".to_string(),
        ),
    ];
    for (want, request) in refused {
        let (status, answer) = admin.raw(&request).unwrap();
        assert_eq!(status, want, "{request}\n→ {answer}");
        assert!(answer.contains("\"error\""), "{answer}");
    }
    let state = |s: &lb_tests::scenario::Running| {
        let v = s.lb().json(&["backend", "list", "app"]).unwrap();
        v["services"][0]["backends"][0]["state"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(state(&s), "up", "no refused request changed anything");

    // The unix socket: mode 0600, and the CLI drives it.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&sock).expect("socket exists").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let unix = format!("unix:{}", sock.display());
    let mut cmd = lb_tests::lb::command(Some(s.balancer())).unwrap();
    let out = cmd.args(["backend", "drain", "app", &target.to_string(), "--admin", &unix]);
    let out = out.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(state(&s), "draining", "the drain came through the unix socket");
}
