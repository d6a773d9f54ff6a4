//! The end-to-end harness, one module per concept:
//! - [`netns`], [`topology`]: namespaces with RAII teardown, and the client/balancer/backends
//!   topology;
//! - [`lb`]: the `lb` process ([`lb::Lb`], built with [`lb::LbBuilder`]) and one-shot commands;
//! - [`scenario`]: "topology + backends + config + `lb run`" in one call, with [`conf`] for the
//!   TOML pieces;
//! - [`backends`]: every kind of backend; [`client`], [`load`], [`repeat`], [`admin`], [`tls`]:
//!   the clients;
//! - [`l4`], [`http`]: the L4 and L7 proxies in-process (no root); [`fixture`], [`packet`]: XDP
//!   frames through `BPF_PROG_TEST_RUN`, [`icmp`] the ICMP errors among them; [`flood`]: the
//!   same frames sent from a namespace;
//! - [`kubeapi`]: a Kubernetes API server for EndpointSlices over HTTPS (list, watch, 410, restart);
//! - [`rel`], [`procs`], [`h2`]: reliability reports, process samples, hand-built h2 frames;
//! - [`conformance`]: h2spec and real gRPC implementations (Python) run against the L7 proxy;
//! - [`container`]: lb in podman containers (base image, ConfigMap pieces, a node namespace).
//!
//! Every name is unique to the run (pid and a counter), so concurrent runs never collide; every
//! namespace is deleted on drop, which also runs when a test fails or panics.
use std::time::{Duration, Instant};

pub mod admin;
pub mod backends;
pub mod bird;
pub mod client;
pub mod conf;
pub mod conformance;
pub mod container;
pub mod fabric;
pub mod fixture;
pub mod flood;
pub mod h2;
pub mod http;
pub mod icmp;
pub mod kubeapi;
pub mod l4;
pub mod lb;
pub mod load;
pub mod netns;
pub mod packet;
pub mod procs;
pub mod rel;
pub mod repeat;
pub mod scenario;
pub mod tls;
pub mod topology;

/// The old home of the namespace HTTP backend and client, still imported by
/// `tests/l7_lb_run.rs` (owned by the L7 work): new code uses [`backends`] and [`client`].
pub mod servers {
    pub use crate::{backends::HttpBackend, client::http_get};
}

/// Every wait of the L4 and TLS helpers is bounded by this.
pub const T: Duration = Duration::from_secs(10);

/// Returns from the test (skipped) unless it can run with root; see [`privileged_or_skip`].
/// The first line of every test that needs namespaces or BPF: `lb_tests::privileged!();`.
#[macro_export]
macro_rules! privileged {
    () => {
        if !$crate::privileged_or_skip(&$crate::test_name()) {
            return;
        }
    };
}

/// The running test's name: libtest names each test's thread after it.
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("a test").to_string()
}

/// True when the tests that need root (network namespaces, BPF) can run here. When they cannot,
/// a test prints why and returns, unless `LB_REQUIRE_PRIVILEGED=1` (the README's test command)
/// turns the skip into a failure.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return true;
    }
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test} needs root (network namespaces and BPF) but runs as uid {uid}");
    }
    // Written to the stderr handle directly: libtest captures `eprintln!`, and a skip must be
    // seen even when the test passes.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root for network namespaces and BPF (run `cargo xtask test` as root)"
    );
    false
}

/// Polls `f` every 20 ms until it returns true; false once `limit` has passed.
pub fn wait_until(limit: Duration, f: impl FnMut() -> bool) -> bool {
    poll_until(limit, Duration::from_millis(20), f)
}

/// [`wait_until`] polling every `every`, for checks that spawn a process (`podman exec`).
pub fn poll_until(limit: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(every);
    }
    f()
}
