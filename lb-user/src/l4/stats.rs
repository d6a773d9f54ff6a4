//! Counters of the userspace L4 listeners: connections, bytes, UDP sessions and errors by kind,
//! kept in atomics the relay updates as bytes flow and the admin API can read at any time.
use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::{Deserialize, Serialize};

/// Why a connection or datagram was closed or dropped; each kind has its own counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Not TLS on a listener with SNI routes and no default upstream.
    NotTls,
    /// Claimed to be a TLS handshake but was malformed or too large.
    BadClientHello,
    /// No complete ClientHello within `peek_timeout`.
    PeekTimeout,
    /// The client closed before sending what the listener needs to route.
    EarlyEof,
    /// A TLS client whose SNI matches no route, on a listener without a default upstream.
    NoRoute,
    /// The upstream group has no available backend.
    NoBackend,
    /// Connecting to the backend failed or timed out.
    ConnectFailed,
    /// A trusted source sent a malformed PROXY header, or none.
    ProxyHeaderBad,
    /// A trusted source took longer than `peek_timeout` to send its PROXY header.
    ProxyHeaderTimeout,
    /// No bytes either way for `idle_timeout`.
    IdleTimeout,
    /// A socket error while relaying (resets included).
    Io,
    /// A UDP client beyond `max_connections` sessions.
    OverLimit,
    /// The L7 listener refused the connection (for example a full queue).
    HandoffFailed,
    /// A client over `max_connections_per_source` (TCP, closed at once) or
    /// `max_sessions_per_source` (UDP, the datagram dropped).
    SourceLimit,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 14] = [
        Self::NotTls,
        Self::BadClientHello,
        Self::PeekTimeout,
        Self::EarlyEof,
        Self::NoRoute,
        Self::NoBackend,
        Self::ConnectFailed,
        Self::ProxyHeaderBad,
        Self::ProxyHeaderTimeout,
        Self::IdleTimeout,
        Self::Io,
        Self::OverLimit,
        Self::HandoffFailed,
        Self::SourceLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::BadClientHello => "bad_client_hello",
            Self::PeekTimeout => "peek_timeout",
            Self::EarlyEof => "early_eof",
            Self::NoRoute => "no_route",
            Self::NoBackend => "no_backend",
            Self::ConnectFailed => "connect_failed",
            Self::ProxyHeaderBad => "proxy_header_bad",
            Self::ProxyHeaderTimeout => "proxy_header_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Io => "io",
            Self::OverLimit => "over_limit",
            Self::HandoffFailed => "handoff_failed",
            Self::SourceLimit => "source_limit",
        }
    }
}

/// One listener's counters (relaxed atomics: each is independent).
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub name: String,
    /// TCP connections accepted.
    pub accepted: AtomicU64,
    /// TCP connections being served now.
    pub active: AtomicU64,
    /// Connections relayed to a backend (TLS passthrough or plain TCP).
    pub relayed: AtomicU64,
    /// Connections handed to an L7 TLS listener.
    pub handed_off: AtomicU64,
    /// TLS connections whose SNI matched a route (the rest took the default upstream).
    pub sni_routed: AtomicU64,
    /// Backend connects that failed (refused, unreachable, timed out), each attempt counted.
    pub connect_failures: AtomicU64,
    /// Connects to another backend after one failed.
    pub connect_retries: AtomicU64,
    /// Bytes from clients to backends, and back.
    pub bytes_to_backend: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub udp_sessions_created: AtomicU64,
    pub udp_sessions_expired: AtomicU64,
    pub udp_sessions_active: AtomicU64,
    pub datagrams_to_backend: AtomicU64,
    pub datagrams_to_client: AtomicU64,
    /// How a TCP listener relays (`kernel`, `splice`, `copy`, with why not `kernel`); unset on
    /// UDP listeners.
    relay: std::sync::OnceLock<String>,
    errors: [AtomicU64; ErrorKind::ALL.len()],
}

impl ListenerStats {
    pub fn new(name: &str) -> Self {
        Self { name: name.to_string(), ..Default::default() }
    }

    /// Records how the listener relays; set once, when it is built.
    pub fn set_relay(&self, how: String) {
        let _ = self.relay.set(how);
    }

    pub fn relay(&self) -> Option<&str> {
        self.relay.get().map(String::as_str)
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> ListenerSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters = [
            ("accepted", get(&self.accepted)),
            ("active", get(&self.active)),
            ("relayed", get(&self.relayed)),
            ("handed_off", get(&self.handed_off)),
            ("sni_routed", get(&self.sni_routed)),
            ("connect_failures", get(&self.connect_failures)),
            ("connect_retries", get(&self.connect_retries)),
            ("bytes_to_backend", get(&self.bytes_to_backend)),
            ("bytes_to_client", get(&self.bytes_to_client)),
            ("udp_sessions_created", get(&self.udp_sessions_created)),
            ("udp_sessions_expired", get(&self.udp_sessions_expired)),
            ("udp_sessions_active", get(&self.udp_sessions_active)),
            ("datagrams_to_backend", get(&self.datagrams_to_backend)),
            ("datagrams_to_client", get(&self.datagrams_to_client)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let errors =
            ErrorKind::ALL.iter().map(|&k| (k.as_str().to_string(), self.errors(k))).collect();
        let relay = self.relay().map(str::to_string);
        ListenerSnapshot { name: self.name.clone(), relay, counters, errors }
    }
}

/// What the admin API serves for one listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerSnapshot {
    pub name: String,
    /// How a TCP listener relays, as [`ListenerStats::relay`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    pub counters: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
}

/// The counters of the running listeners, for the admin API (which has no handle on the L4
/// tasks): one entry per listener name, the latest registered winning.
static REGISTRY: Mutex<Vec<Arc<ListenerStats>>> = Mutex::new(Vec::new());

/// Makes `stats` the counters the admin API reports for its listener name.
pub fn register(stats: Arc<ListenerStats>) {
    let mut r = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    r.retain(|s| s.name != stats.name);
    r.push(stats);
}

/// Snapshots of the registered listeners named in `names`, in that order.
pub fn registered(names: &[&str]) -> Vec<ListenerSnapshot> {
    let r = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    names.iter().filter_map(|n| r.iter().find(|s| s.name == *n)).map(|s| s.snapshot()).collect()
}

/// Keeps `active` (or any gauge) right however a task ends.
pub struct Gauge<'a>(pub &'a AtomicU64);

impl<'a> Gauge<'a> {
    pub fn up(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
