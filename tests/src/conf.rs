//! The TOML pieces of an `lb` config that the end-to-end tests compose, so each test states
//! only what it is about (a weight, a hash, a timeout) and the tables are written once.
use std::fmt::Display;

/// Items as the body of a TOML list of strings: `"a", "b"`.
pub fn list<S: Display>(items: impl IntoIterator<Item = S>) -> String {
    items.into_iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ")
}

/// (address, weight) pairs as the body of a TOML backend list of inline tables.
pub fn weighted<S: Display>(items: impl IntoIterator<Item = (S, u32)>) -> String {
    items
        .into_iter()
        .map(|(a, w)| format!("{{ addr = \"{a}\", weight = {w} }}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `[admin]` listening on `listen`.
pub fn admin(listen: impl Display) -> String {
    format!("[admin]\nlisten = \"{listen}\"\n")
}

/// `[xdp]` on `interfaces`, with `extra` keys (mode, ...).
pub fn xdp<S: Display>(interfaces: impl IntoIterator<Item = S>, extra: &str) -> String {
    format!("[xdp]\ninterfaces = [{}]\n{extra}", list(interfaces))
}

/// One `[[xdp.service]]` at `vip` over `backends` (a list body), with `extra` keys.
pub fn xdp_service(name: &str, vip: impl Display, backends: &str, extra: &str) -> String {
    format!("[[xdp.service]]\nname = \"{name}\"\nvip = \"{vip}\"\n{extra}backends = [{backends}]\n")
}

/// An `[[http.listener]]` on `listen` with `keys` (TLS certificates, ...).
pub fn http_listener(name: &str, listen: impl Display, keys: &str) -> String {
    format!("[[http.listener]]\nname = \"{name}\"\nlisten = \"{listen}\"\n{keys}")
}

/// An `[[http.route]]` of `listener` to `upstream` for every host and path.
pub fn route(listener: &str, upstream: &str) -> String {
    format!("[[http.route]]\nlistener = \"{listener}\"\nupstream = \"{upstream}\"\n")
}

/// An `[[http.listener]]` on `listen` whose one route goes to `[upstream.UPSTREAM]` over
/// `backends` (a list body), with `extra` keys for the upstream.
pub fn l7(
    listener: &str,
    listen: impl Display,
    upstream: &str,
    backends: &str,
    extra: &str,
) -> String {
    [
        http_listener(listener, listen, ""),
        route(listener, upstream),
        self::upstream(upstream, backends),
        extra.to_string(),
    ]
    .concat()
}

/// `[health.NAME]` of `kind` (an HTTP check GETs the default path, `/`) every `secs`
/// seconds, each probe given as long.
pub fn health(name: &str, kind: &str, secs: f64) -> String {
    format!("[health.{name}]\ntype = \"{kind}\"\ninterval = {secs}\ntimeout = {secs}\n")
}

/// [`health`] that finds a dead backend fast: every 0.2 s, down after 2 failures, up after 2
/// successes.
pub fn fast_health(name: &str, kind: &str) -> String {
    health(name, kind, 0.2) + "fall = 2\nrise = 2\n"
}

/// `[upstream.NAME]` over `backends` (a list body).
pub fn upstream(name: &str, backends: &str) -> String {
    format!("[upstream.{name}]\nbackends = [{backends}]\n")
}

/// A `[[tcp.listener]]` on `listen` with `keys` (upstream, SNI routes, timeouts, ...).
pub fn tcp(name: &str, listen: impl Display, keys: &str) -> String {
    format!("[[tcp.listener]]\nname = \"{name}\"\nlisten = \"{listen}\"\n{keys}")
}

/// Upstream `name` over `backends` (a list body) and a listener of the same name on a free
/// loopback port relaying to it, with `keys` for the listener.
pub fn tcp_over(name: &str, backends: &str, keys: &str) -> String {
    upstream(name, backends) + &tcp(name, "127.0.0.1:0", &format!("upstream = \"{name}\"\n{keys}"))
}
