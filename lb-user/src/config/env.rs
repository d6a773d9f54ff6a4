//! Environment overrides of the config file (paths and secrets that differ per host or live in
//! a secret store), and the redacted view of a config that `GET /config` serves.
use super::Config;

/// Every variable lb reads, with what it overrides. `LB_CONFIG` and `LB_ADMIN` are read by
/// the command line; the rest override the file here.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("LB_CONFIG", "the config file of `lb run`, `lb check`, `lb reload` and the other commands"),
    ("LB_ADMIN", "the admin API address the client commands talk to"),
    ("LB_ADMIN_LISTEN", "[admin] listen of `lb run`"),
    ("LB_ADMIN_TOKEN", "[admin] token (daemon) and the bearer token the client commands send"),
    ("LB_PIN_PATH", "[xdp] pin_path"),
    ("LB_UPGRADE_SOCKET", "[admin] upgrade_socket of `lb run` and `lb run --upgrade`"),
    ("LB_ADMIN_SOCKET", "[admin] socket of `lb run` (each overlapping process its own)"),
];

/// Applies the overrides `env` knows; returns the errors of unusable values.
pub(super) fn apply(config: &mut Config, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(v) = env("LB_ADMIN_LISTEN") {
        match v.parse() {
            Ok(a) => config.admin.listen = a,
            Err(_) => errors.push(format!(
                "LB_ADMIN_LISTEN={v:?} is not an ADDR:PORT: use e.g. 127.0.0.1:9901"
            )),
        }
    }
    if let Some(v) = env("LB_ADMIN_TOKEN").filter(|v| !v.is_empty()) {
        config.admin.token = Some(v);
    }
    if let Some(v) = env("LB_UPGRADE_SOCKET").filter(|v| !v.is_empty()) {
        config.admin.upgrade_socket = v.into();
    }
    if let Some(v) = env("LB_ADMIN_SOCKET").filter(|v| !v.is_empty()) {
        config.admin.socket = Some(v.into());
    }
    if let (Some(v), Some(xdp)) = (env("LB_PIN_PATH"), config.xdp.as_mut()) {
        xdp.pin_path = v.into();
    }
    errors
}

/// The text a config came from, as JSON, with secrets replaced by "(redacted)" and the
/// overrides that were applied written in.
pub fn redacted(config: &Config) -> serde_json::Value {
    let mut table: toml::Table = config.source.parse().unwrap_or_default();
    let admin = table.entry("admin").or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(admin) = admin.as_table_mut() {
        admin.insert("listen".into(), toml::Value::String(config.admin.listen.to_string()));
        if config.admin.token.is_some() {
            admin.insert("token".into(), toml::Value::String("(redacted)".into()));
        }
    }
    if let (Some(xdp), Some(t)) = (&config.xdp, table.get_mut("xdp").and_then(|x| x.as_table_mut()))
    {
        t.insert("pin_path".into(), toml::Value::String(xdp.pin_path.display().to_string()));
    }
    serde_json::to_value(&table).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_secrets_are_redacted() {
        let text = "[admin]\nlisten = \"127.0.0.1:1\"\ntoken = \"file-token-0123456789\"\n[xdp]\ninterfaces = [\"eth0\"]\n";
        let env = |k: &str| match k {
            "LB_ADMIN_LISTEN" => Some("127.0.0.1:2".to_string()),
            "LB_ADMIN_TOKEN" => Some("env-token-0123456789".to_string()),
            "LB_PIN_PATH" => Some("/sys/fs/bpf/other".to_string()),
            _ => None,
        };
        let c = Config::parse_with_env(text, &env).unwrap();
        assert_eq!(c.admin.listen.port(), 2);
        assert_eq!(c.admin.token.as_deref(), Some("env-token-0123456789"));
        assert_eq!(c.xdp.as_ref().unwrap().pin_path.to_str(), Some("/sys/fs/bpf/other"));
        let dump = redacted(&c).to_string();
        assert!(!dump.contains("token-0123456789"), "{dump}");
        assert!(dump.contains("(redacted)") && dump.contains("/sys/fs/bpf/other"), "{dump}");
        let bad = Config::parse_with_env("", &|k| (k == "LB_ADMIN_LISTEN").then(|| "x".into()));
        assert!(bad.unwrap_err().to_string().contains("LB_ADMIN_LISTEN"));
    }
}
