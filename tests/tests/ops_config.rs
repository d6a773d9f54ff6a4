//! `lb check` and `lb run` on invalid configs: every semantic error names its line and a fix,
//! exit 1; a non-loopback admin API without a token is refused. Needs no root: nothing is
//! bound or loaded before validation.
use std::process::Output;

use lb_tests::lb::command;

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("lb-ops-config-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

fn lb(args: &[&str], config: &std::path::Path) -> Output {
    command(None).unwrap().args(args).arg("--config").arg(config).output().expect("run lb")
}

const BAD: &str = r#"[admin]
listen = "0.0.0.0:9901"

[xdp]
interfaces = []

[[xdp.service]]
name = "web"
vip = "10.200.0.1:80"
backends = ["10.1.0.2:80", { addr = "10.1.0.3:80", weight = 0 }]

[[http.listener]]
name = "public"
listen = "127.0.0.1:8080"

[[http.route]]
listener = "public"
upstream = "nope"

[health.web]
type = "http"
path = "healthz"
"#;

#[test]
fn check_names_the_line_and_fix_of_each_error() {
    let path = write("bad", BAD);
    let out = lb(&["check"], &path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for (line, text) in [
        (2, "not a loopback address and no token is set"),
        (5, "xdp.interfaces is empty: list the interfaces"),
        (10, "backend 10.1.0.3:80 has weight 0: use drain"),
        (18, "http.route: no [upstream.nope]"),
        (22, "health.web.path \"healthz\" must start with /, e.g. path = \"/healthz\""),
    ] {
        assert!(
            err.lines().any(|l| l.contains(&format!("line {line}: ")) && l.contains(text)),
            "no `line {line}: ...{text}` in:\n{err}"
        );
    }
    // `lb run` refuses the same config the same way, before touching anything.
    let run = lb(&["run"], &path);
    assert_eq!(run.status.code(), Some(1));
    let run_err = String::from_utf8_lossy(&run.stderr);
    assert!(run_err.contains("line 5: xdp.interfaces is empty"), "{run_err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn syntax_and_unknown_keys_name_their_line() {
    let path =
        write("syntax", "[admin]\nlisten = \"127.0.0.1:9901\"\n\n[upstream.api]\nbackend = []\n");
    let out = lb(&["check"], &path);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 5") && err.contains("unknown field `backend`"), "{err}");
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_valid_config_checks_ok_and_a_token_allows_a_public_admin() {
    let path = write(
        "ok",
        "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken = \"0123456789abcdef0123\"\n[upstream.api]\nbackends = [\"10.1.0.2:80\"]\n[health.api]\ntype = \"tcp\"\ninterval = 1\n",
    );
    let out = lb(&["check"], &path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
    // The same without a token, but with the token from the environment.
    let path2 = write("envtoken", "[admin]\nlisten = \"0.0.0.0:9901\"\n");
    let mut check = command(None).unwrap();
    check.args(["check", "--config"]).arg(&path2).env("LB_ADMIN_TOKEN", "0123456789abcdef0123");
    let out = check.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = lb(&["check"], &path2);
    assert_eq!(out.status.code(), Some(1), "no token: refused");
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(path2);
}

#[test]
fn the_shipped_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let plain = std::fs::read_to_string(root.join("deploy/lb.toml")).unwrap();
    lb_user::config::Config::parse(&plain).expect("deploy/lb.toml");
    // The ConfigMap's `lb.toml: |` block, unindented.
    let map = std::fs::read_to_string(root.join("deploy/kubernetes/configmap.yaml")).unwrap();
    let block: String = map
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("lb.toml: |"))
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    assert!(block.contains("[[xdp.service]]"), "{block}");
    let config = lb_user::config::Config::parse(&block).expect("the ConfigMap's lb.toml");
    assert!(config.health.contains_key("web"));
    // The DaemonSet's rolling update starts the new pod beside the old one: every listener
    // can be shared, and the probes use the pod's own admin socket.
    assert!(lb_user::upgrade::overlap::lacking(&config).is_empty(), "{block}");
    let ds = std::fs::read_to_string(root.join("deploy/kubernetes/daemonset.yaml")).unwrap();
    let socket = config.admin.socket.expect("[admin] socket").display().to_string();
    assert!(ds.contains(&format!("unix:{socket}")) && ds.contains("maxSurge: 1"), "{ds}");
}
