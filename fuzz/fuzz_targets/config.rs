//! The config parser on arbitrary text: parse → env overrides → validate → line lookup of
//! every error never panics; a config that parses renders its redacted dump.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let env = |k: &str| (k == "LB_ADMIN_TOKEN").then(|| "0123456789abcdef0123".to_string());
    if let Ok(config) = lb_user::config::Config::parse_with_env(text, &env) {
        let _ = lb_user::config::redacted(&config);
    }
});
