//! The userspace L4 listeners of a config running in this process on loopback (no root), with
//! their counters; the backends they relay to are in [`crate::backends`], the TLS clients in
//! [`crate::tls`].
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use lb_user::{
    config::Config,
    l4::{Handoffs, L4, ListenerStats, balance::client_key},
    maglev, upstream,
};
use tokio::{sync::watch, task::JoinSet};

use crate::T;

/// The L4 listeners of a config, running in this process until dropped.
pub struct L4Harness {
    pub addrs: HashMap<String, SocketAddr>,
    stats: HashMap<String, Arc<ListenerStats>>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<std::io::Result<()>>,
}

impl L4Harness {
    /// Parses and validates `config` as `lb run` does and starts its `[[tcp.listener]]`s.
    pub async fn start(config: &str, handoffs: Handoffs) -> Self {
        let config = Config::parse(config).unwrap_or_else(|e| panic!("config: {e}\n{config}"));
        let groups = upstream::groups(&config.upstream);
        let l4 = L4::build(&config.tcp, &groups, &handoffs).expect("build");
        let stats = l4.stats().into_iter().map(|s| (s.name.clone(), s)).collect();
        let bound = l4.bind().await.expect("bind");
        let addrs = bound.local_addrs().into_iter().collect();
        let (shutdown, rx) = watch::channel(false);
        let tasks = bound.spawn(rx);
        Self { addrs, stats, shutdown, tasks }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    pub fn stats(&self, listener: &str) -> &ListenerStats {
        &self.stats[listener]
    }

    /// Checks that `listener` relays as `mode` says ([`relay_key`]). The kernel relay needs
    /// root: without it the listener falls back to splicing, which is accepted (and said) unless
    /// `LB_REQUIRE_PRIVILEGED=1` asks for every mode to be tested for real.
    pub fn expect_relay(&self, listener: &str, mode: &str) {
        let got = self.stats(listener).relay().unwrap_or("-").to_string();
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let required = std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
        if mode == "kernel" && got != "kernel" && !root && !required {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "NOTE {}: {listener} relays by {got}",
                crate::test_name()
            );
            return;
        }
        assert_eq!(got, mode, "listener {listener} relays by {got}");
    }

    /// Waits (bounded) until `f` holds on the listener's counters; connection tasks count
    /// after the client has seen the close.
    pub async fn wait_for(&self, listener: &str, what: &str, f: impl Fn(&ListenerStats) -> bool) {
        let s = self.stats(listener);
        for _ in 0..500 {
            if f(s) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{listener}: {what} never held: {:#?}", s.snapshot());
    }

    /// Stops the listeners and waits for them.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while let Some(r) = tokio::time::timeout(T, self.tasks.join_next()).await.expect("stops") {
            r.expect("task").expect("listener");
        }
    }
}

/// The relay modes a `[[tcp.listener]]` offers; relay tests run through each.
pub const RELAYS: [&str; 3] = ["kernel", "splice", "copy"];

/// The config line that picks `mode` (one of [`RELAYS`]) for a listener.
pub fn relay_key(mode: &str) -> String {
    format!("relay = \"{mode}\"\n")
}

/// The backend the XDP path picks for `client` among `group`'s backends, computed the way the
/// XDP side builds its table: `maglev::table` over (addr, weight), `source_hash % size`.
pub fn xdp_choice(config: &Config, group: &str, client: IpAddr) -> SocketAddr {
    let entries: Vec<maglev::Entry> = config.upstream[group]
        .backends
        .iter()
        .map(|b| maglev::Entry { addr: b.addr(), weight: b.weight() })
        .collect();
    let table = maglev::table(&entries, maglev::DEFAULT_SIZE);
    let slot = lb_common::hash::source_hash(&client_key(client)) % maglev::DEFAULT_SIZE;
    entries[table[slot as usize] as usize].addr
}
