//! The end-to-end harness: network namespaces with RAII teardown, servers and clients inside
//! them, and a handle on a running `lb`.
//!
//! Every name is unique to the run (pid and a counter), so concurrent runs never collide; every
//! namespace is deleted on drop, which also runs when a test fails or panics.
pub mod fixture;
pub mod http;
pub mod l4;
pub mod lb;
pub mod netns;
pub mod ops;
pub mod packet;
pub mod rel;
pub mod rel_http;
pub mod servers;
pub mod topology;

/// True when the tests that need root (network namespaces, BPF) can run here. When they cannot,
/// a test prints why and returns, unless `LB_REQUIRE_PRIVILEGED=1` (the README's test command)
/// turns the skip into a failure.
pub fn privileged_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        return true;
    }
    if std::env::var("LB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test} needs root (network namespaces and BPF) but runs as uid {}", unsafe {
            libc::geteuid()
        });
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
