//! h2spec, the public HTTP/2 conformance suite (RFC 9113 and HPACK, RFC 7541), against the L7
//! proxy's two kinds of listener: TLS (ALPN h2), where every case must pass, and plain (h2c with
//! prior knowledge beside HTTP/1.1), where every case that applies to a listener that also speaks
//! HTTP/1.1 must pass. Both forward over HTTP/2 to an h2c backend, so frames h2spec sends that
//! reach the request path are carried end to end. No root needed: loopback only.
use lb_tests::{
    conformance::{Case, Outcome, h2spec},
    http::{Backend, Proxy, h2c_and_tls, temp_dir, write_cert},
};

/// Seconds h2spec waits for each expected reaction (its `-o`): a case that gets no answer fails
/// after this instead of hanging the run.
const CASE_TIMEOUT_S: u32 = 3;

/// Cases that do not apply to a plain listener, with why. Such a listener serves HTTP/1.1 and
/// h2c prior knowledge on one port (issue 11: "a plain listener keeps h1 + h2c prior
/// knowledge"), so bytes that are not the HTTP/2 preface are an HTTP/1.1 request by definition.
const NOT_APPLICABLE_H2C: &[(&str, &str)] = &[(
    "http2/3.5/2",
    "an invalid connection preface on a port that also serves HTTP/1.1 is an HTTP/1.1 request: \
     the right answer is HTTP/1.1 400, not an HTTP/2 GOAWAY (on TLS, where ALPN chose h2, it \
     must be a GOAWAY, and that listener is held to it)",
)];

/// Runs h2spec against listener `name` and returns its cases.
async fn run(name: &str, tls: bool) -> Vec<Case> {
    let dir = temp_dir(&format!("h2spec-{name}"));
    let cert = write_cert(&dir, "lb", &["h2spec.test", "127.0.0.1"]);
    let backend = Backend::start("h2spec-backend").await;
    let proxy = Proxy::start(&h2c_and_tls(backend.addr, &cert)).await;
    let port = proxy.addrs[name].port();
    let report_dir = dir.clone();
    let cases =
        tokio::task::spawn_blocking(move || h2spec(port, tls, CASE_TIMEOUT_S, &report_dir)).await;
    // Cleaned up before the outcome is judged, so a failing run leaves nothing behind.
    proxy.stop().await;
    drop(backend);
    std::fs::remove_dir_all(&dir).ok();
    cases.expect("h2spec ran")
}

/// Every case that did not pass, as readable lines, leaving out `exempt` ids.
fn failures(cases: &[Case], exempt: &[&str]) -> Vec<String> {
    cases
        .iter()
        .filter(|c| !exempt.contains(&c.id.as_str()))
        .filter_map(|c| match &c.outcome {
            Outcome::Passed => None,
            Outcome::Skipped => Some(format!("{} {}: skipped", c.id, c.title)),
            Outcome::Failed(why) => {
                Some(format!("{} {}: {}", c.id, c.title, why.replace('\n', " | ")))
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_tls_listener_passes_every_case() {
    let cases = run("tls", true).await;
    let failed = failures(&cases, &[]);
    assert!(
        failed.is_empty(),
        "{} of {} h2spec cases failed on TLS:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2spec_h2c_listener_passes_every_applicable_case() {
    let cases = run("h2c", false).await;
    // An exemption must name a case h2spec still has, or the list silently rots.
    for (id, _) in NOT_APPLICABLE_H2C {
        assert!(cases.iter().any(|c| c.id == *id), "h2spec has no case {id} any more");
    }
    let exempt: Vec<&str> = NOT_APPLICABLE_H2C.iter().map(|(id, _)| *id).collect();
    let failed = failures(&cases, &exempt);
    assert!(
        failed.is_empty(),
        "{} of {} applicable h2spec cases failed on h2c:\n{}",
        failed.len(),
        cases.len() - exempt.len(),
        failed.join("\n")
    );
}
