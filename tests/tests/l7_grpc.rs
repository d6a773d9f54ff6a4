//! gRPC through the L7 proxy with real implementations on both ends: grpcio's server (the C
//! core) as the backend over h2c, and two independent clients, grpcio and grpclib (pure Python
//! on h2), over h2c prior knowledge and over TLS with ALPN h2. Every call shape (unary, server-,
//! client- and bidi-streaming), an error status with details and trailing metadata, and
//! `grpc-timeout` (the server sees the deadline; DEADLINE_EXCEEDED reaches the client). The
//! scripts and the .proto are in `tests/grpc/`; the stubs are generated per run. Loopback only.
use std::{net::SocketAddr, path::PathBuf};

use lb_tests::{
    conformance::{GrpcClient, GrpcServer, grpc_calls, grpc_stubs},
    http::{Proxy, h2c_and_tls, temp_dir, write_cert},
};
use serde_json::{Value, json};

/// The name the test certificate carries and the clients ask for.
const NAME: &str = "grpc.test";

/// A run's temp directory (stubs, certificate), removed on drop, also when the test fails.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// The backend, and the proxy with an h2c and a TLS listener in front of it.
struct Setup {
    dir: Dir,
    ca: PathBuf,
    proxy: Proxy,
    server: GrpcServer,
}

impl Setup {
    async fn start(test: &str) -> Self {
        let dir = Dir(temp_dir(test));
        let stubs = dir.0.clone();
        let server = tokio::task::spawn_blocking(move || {
            grpc_stubs(&stubs);
            GrpcServer::start(&stubs)
        })
        .await
        .expect("gRPC server");
        let cert = write_cert(&dir.0, "lb", &[NAME]);
        let proxy = Proxy::start(&h2c_and_tls(server.addr, &cert)).await;
        Self { ca: cert.cert, dir, proxy, server }
    }

    /// Runs every case with `client` against `target`, over TLS when `tls`.
    async fn calls(&self, client: GrpcClient, target: SocketAddr, tls: bool) -> Value {
        let (stubs, ca) = (self.dir.0.clone(), self.ca.clone());
        tokio::task::spawn_blocking(move || {
            grpc_calls(&stubs, client, target, tls.then_some((ca.as_path(), NAME)))
        })
        .await
        .expect("client ran")
    }

    /// Runs the clients through listener `listener`, stops everything, then judges.
    async fn through_lb(self, client: GrpcClient, listener: &str) {
        let tls = listener == "tls";
        let seen = self.calls(client, self.proxy.addrs[listener], tls).await;
        let Setup { dir, proxy, server, .. } = self;
        proxy.stop().await;
        drop((server, dir));
        check(&seen, matches!(client, GrpcClient::Grpclib) && tls);
    }
}

/// Compares what a client saw with what the server sent, case by case, and fails listing every
/// difference at once (one broken case must not hide the others).
fn check(seen: &Value, alpn_reported: bool) {
    let mut problems = Vec::new();
    let mut expect = |case: &str, field: &str, want: Value| {
        let got = &seen[case][field];
        if *got != want {
            let error = &seen[case]["error"];
            problems.push(format!("{case}.{field}: want {want}, got {got} (error: {error})"));
        }
    };
    expect("unary", "text", json!("olleh"));
    expect("unary", "n", json!(5));
    expect("unary", "code", json!("OK"));
    // Request metadata reached the server, initial and trailing metadata came back.
    expect("unary", "initial", json!("i-r1"));
    expect("unary", "trailing", json!("t-r1"));
    if alpn_reported {
        expect("unary", "alpn", json!("h2"));
    }
    expect("server_stream", "texts", json!(["s-0", "s-1", "s-2", "s-3", "s-4"]));
    expect("client_stream", "text", json!("a+b+c+d"));
    expect("client_stream", "n", json!(4));
    // Lock-step: each reply arrived before the next request was sent.
    expect("bidi", "texts", json!(["X", "Y", "Z"]));
    expect("bidi", "rest", json!(0));
    expect("bidi", "code", json!("OK"));
    expect("fail", "code", json!("INVALID_ARGUMENT"));
    // grpc-message is percent-encoded on the wire; the snowman must survive the proxy.
    expect("fail", "message", json!("bad text: oops \u{2603}"));
    expect(
        "fail",
        "details",
        json!({
            "code": 3,
            "message": "bad text: oops",
            "types": ["type.lb.test/lbtest.Msg"],
            "texts": ["oops"],
            "ns": [7],
        }),
    );
    expect("fail", "trailer", json!("why-oops"));
    expect("fail", "bin", json!("0001feff"));
    expect("deadline_expire", "code", json!("DEADLINE_EXCEEDED"));
    // The server's own status, not the client's timer: the proxy carried the deadline there
    // and the status back.
    expect("deadline_expire", "message", json!("server saw its deadline"));
    expect("deadline_sleep", "code", json!("DEADLINE_EXCEEDED"));
    // grpc-timeout reached the server: it saw the client's 5 s deadline, less the trip.
    let remaining = seen["deadline_remaining"]["n"].as_i64();
    if !remaining.is_some_and(|ms| (2_000..=5_100).contains(&ms)) {
        problems.push(format!(
            "deadline_remaining: the server saw {remaining:?} ms of a 5000 ms grpc-timeout (-1: none) ({})",
            seen["deadline_remaining"]
        ));
    }
    // Both deadline cases end by their deadline (3 s and 0.5 s), not later.
    for (case, limit) in [("deadline_expire", 3.1), ("deadline_sleep", 1.6)] {
        let elapsed = seen[case]["elapsed"].as_f64();
        if !elapsed.is_some_and(|s| s < limit) {
            problems.push(format!("{case}: ended after {elapsed:?} s ({})", seen[case]));
        }
    }
    assert!(problems.is_empty(), "{}\nall the client saw: {seen:#}", problems.join("\n"));
}

/// The same calls without lb: proves the scripts and the expectations, so that a failure
/// through lb is lb's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_without_lb() {
    let s = Setup::start("grpc-baseline").await;
    let direct = s.server.addr;
    let grpcio = s.calls(GrpcClient::Grpcio, direct, false).await;
    let grpclib = s.calls(GrpcClient::Grpclib, direct, false).await;
    s.proxy.stop().await;
    check(&grpcio, false);
    check(&grpclib, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_over_h2c() {
    Setup::start("grpcio-h2c").await.through_lb(GrpcClient::Grpcio, "h2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpclib_over_h2c() {
    Setup::start("grpclib-h2c").await.through_lb(GrpcClient::Grpclib, "h2c").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_over_tls_alpn_h2() {
    Setup::start("grpcio-tls").await.through_lb(GrpcClient::Grpcio, "tls").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpclib_over_tls_alpn_h2() {
    Setup::start("grpclib-tls").await.through_lb(GrpcClient::Grpclib, "tls").await;
}
