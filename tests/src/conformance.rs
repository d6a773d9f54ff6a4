//! Public conformance tools driven against the L7 proxy: h2spec (HTTP/2, RFC 9113 and RFC 7541)
//! and real gRPC implementations (grpcio's server and client, grpclib's client) from the
//! scripts in `tests/grpc/`. The bootstrap installs them under `/opt/lb-tools`; every process
//! started here is killed on drop and every run is bounded in time.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Where `cargo xtask bootstrap` installs the tools (its venv and h2spec).
const TOOLS: &str = "/opt/lb-tools/bin";

/// `tests/grpc/`: the .proto and the Python server and clients.
pub const GRPC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/grpc");

/// The installed tool `name`; panics with what to run when it is missing, because a skipped
/// conformance test would read as a passed one.
pub fn tool(name: &str) -> PathBuf {
    let p = Path::new(TOOLS).join(name);
    assert!(p.exists(), "{} is missing: run `cargo xtask bootstrap` (as root) first", p.display());
    p
}

/// A child process killed (and reaped) on drop, also when the test panics.
pub struct Process(Child);

impl Process {
    pub fn spawn(cmd: &mut Command) -> Self {
        Self(cmd.spawn().unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")))
    }

    /// Waits at most `limit` for the process to exit on its own, then kills it; returns its
    /// stdout and whether it exited in time. Its stdout must be piped.
    pub fn finish(mut self, limit: Duration) -> (String, bool) {
        // Read on a thread while waiting: a child whose output filled the pipe would
        // otherwise never exit.
        let reader = self.0.stdout.take().map(|mut s| {
            std::thread::spawn(move || {
                let mut out = String::new();
                use std::io::Read as _;
                let _ = s.read_to_string(&mut out);
                out
            })
        });
        let deadline = Instant::now() + limit;
        let mut in_time = false;
        while Instant::now() < deadline {
            if self.0.try_wait().ok().flatten().is_some() {
                in_time = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        let out = reader.map(|r| r.join().unwrap_or_default()).unwrap_or_default();
        (out, in_time)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One h2spec test case and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// h2spec's section and the case's position in it, e.g. `http2/5.1/3` (what `h2spec
    /// http2/5.1/3` runs alone).
    pub id: String,
    pub title: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// With h2spec's explanation (expected vs actual).
    Failed(String),
    Skipped,
}

/// Runs every h2spec case against `127.0.0.1:port` (over TLS, not verifying the certificate,
/// when `tls`), `timeout_s` per case and the whole run bounded; returns the cases from its JUnit
/// report, written under `dir`. Blocking: call it from `spawn_blocking`.
pub fn h2spec(port: u16, tls: bool, timeout_s: u32, dir: &Path) -> Vec<Case> {
    let report = dir.join(format!("h2spec-{}.xml", if tls { "tls" } else { "h2c" }));
    let mut cmd = Command::new(tool("h2spec"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-o", &timeout_s.to_string(), "-j"])
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if tls {
        cmd.args(["-t", "-k"]);
    }
    // 146 cases; most end at once, the ones waiting for a reaction take up to `timeout_s`.
    let (stdout, in_time) =
        Process::spawn(&mut cmd).finish(Duration::from_secs(60 + 146 * u64::from(timeout_s)));
    assert!(in_time, "h2spec did not finish in time; its output:\n{stdout}");
    let xml = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no JUnit report from h2spec ({e}); its output:\n{stdout}"));
    let cases = parse_junit(&xml);
    assert!(cases.len() > 100, "h2spec ran only {} cases; its output:\n{stdout}", cases.len());
    cases
}

/// The cases of h2spec's JUnit report. Its writer is fixed and simple (one `<testsuite>` per
/// section, one `<testcase>` per case with a `<failure>` or `<skipped>` child), so this reads
/// the elements by their tags rather than pulling in an XML crate.
pub fn parse_junit(xml: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    for suite in xml.split("<testsuite ").skip(1) {
        let package = attr(suite, "package").unwrap_or_default();
        for (i, case) in suite.split("<testcase ").skip(1).enumerate() {
            let body = case.split("</testcase>").next().unwrap_or(case);
            let outcome = if let Some(f) = body.split("<failure").nth(1) {
                let text = f.split_once('>').map_or("", |(_, t)| t);
                Outcome::Failed(unescape(text.split("</failure>").next().unwrap_or(text)))
            } else if let Some(e) = body.split("<error").nth(1) {
                // h2spec files a failed expectation as an <error> too: the expected frames,
                // one a line, then the actual one.
                let text = e.split_once('>').map_or("", |(_, t)| t);
                Outcome::Failed(unescape(text.split("</error>").next().unwrap_or(text)))
            } else if body.contains("<skipped") {
                Outcome::Skipped
            } else {
                Outcome::Passed
            };
            cases.push(Case {
                id: format!("{package}/{}", i + 1),
                title: unescape(&attr(case, "classname").unwrap_or_default()),
                outcome,
            });
        }
    }
    cases
}

fn attr(element: &str, name: &str) -> Option<String> {
    let head = element.split('>').next()?;
    let start = head.find(&format!("{name}=\""))? + name.len() + 2;
    let len = head[start..].find('"')?;
    Some(head[start..start + len].to_string())
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&#xA;", "\n")
        .replace("&#x9;", "\t")
        .replace("&amp;", "&")
        .trim()
        .to_string()
}

fn python() -> PathBuf {
    tool("python")
}

/// Generates the Python stubs of `tests/grpc/echo.proto` (protobuf messages, grpcio's and
/// grpclib's service code) into `dir` with grpcio-tools' protoc.
pub fn grpc_stubs(dir: &Path) {
    let out = format!("{}", dir.display());
    // protoc finds grpclib's plugin (protoc-gen-grpclib_python) on PATH, in the venv.
    let path = format!("{TOOLS}:{}", std::env::var("PATH").unwrap_or_default());
    let status = Command::new(python())
        .args(["-m", "grpc_tools.protoc", "-I", GRPC_DIR])
        .arg(format!("--python_out={out}"))
        .arg(format!("--grpc_python_out={out}"))
        .arg(format!("--grpclib_python_out={out}"))
        .arg("echo.proto")
        .env("PATH", path)
        .status()
        .expect("run grpc_tools.protoc");
    assert!(status.success(), "grpc_tools.protoc failed on tests/grpc/echo.proto");
}

/// The grpcio server of `tests/grpc/server.py`, speaking h2c on 127.0.0.1.
pub struct GrpcServer {
    pub addr: SocketAddr,
    _process: Process,
}

impl GrpcServer {
    /// Starts it with the stubs in `stubs`; returns once it listens (bounded).
    pub fn start(stubs: &Path) -> Self {
        let mut p = Process::spawn(
            Command::new(python())
                .arg(Path::new(GRPC_DIR).join("server.py"))
                .arg(stubs)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
        );
        let stdout = p.0.stdout.take().expect("piped stdout");
        // The first line is "PORT n"; read it on a thread so that a server that never
        // prints cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("the gRPC server started");
        let port: u16 = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the gRPC server printed {line:?}, not its port"));
        Self { addr: SocketAddr::from(([127, 0, 0, 1], port)), _process: p }
    }
}

/// Which gRPC client implementation `tests/grpc/client.py` uses.
#[derive(Debug, Clone, Copy)]
pub enum GrpcClient {
    /// The C core (grpcio).
    Grpcio,
    /// Pure Python on the `h2` library (grpclib).
    Grpclib,
}

/// Runs every case of `tests/grpc/client.py` with `client` against `target` (TLS trusting
/// `tls.0`, a PEM file, for server name `tls.1`, when given); returns its JSON: case → what the
/// client observed. Blocking and bounded: call it from `spawn_blocking`.
pub fn grpc_calls(
    stubs: &Path,
    client: GrpcClient,
    target: SocketAddr,
    tls: Option<(&Path, &str)>,
) -> serde_json::Value {
    let mut cmd = Command::new(python());
    cmd.arg(Path::new(GRPC_DIR).join("client.py"))
        .arg(stubs)
        .arg(match client {
            GrpcClient::Grpcio => "grpcio",
            GrpcClient::Grpclib => "grpclib",
        })
        .arg(target.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some((ca, name)) = tls {
        cmd.arg(ca).arg(name);
    }
    // Eight calls of at most 10 s each (their own timeout), in practice a few seconds together.
    let (stdout, in_time) = Process::spawn(&mut cmd).finish(Duration::from_secs(90));
    assert!(in_time, "the {client:?} client did not finish in time; it printed:\n{stdout}");
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("the {client:?} client printed no JSON ({e}):\n{stdout}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_cases_with_their_outcomes() {
        let xml = r#"<testsuites>
  <testsuite name="3.5. HTTP/2 Connection Preface" package="http2/3.5" id="http2/3.5" tests="2">
    <testcase package="http2/3.5" classname="Sends client connection preface" time="0.001"></testcase>
    <testcase package="http2/3.5" classname="Sends invalid &quot;preface&quot;" time="0.002"><failure>Expected: GOAWAY&#xA;Actual: DATA</failure></testcase>
  </testsuite>
  <testsuite name="6.5" package="http2/6.5" id="http2/6.5" tests="1">
    <testcase package="http2/6.5" classname="x" time="0"><skipped>not applicable</skipped></testcase>
  </testsuite>
</testsuites>"#;
        let cases = parse_junit(xml);
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[0].id, "http2/3.5/1");
        assert_eq!(cases[0].outcome, Outcome::Passed);
        assert_eq!(cases[1].title, "Sends invalid \"preface\"");
        assert_eq!(cases[1].outcome, Outcome::Failed("Expected: GOAWAY\nActual: DATA".into()));
        assert_eq!(cases[2].id, "http2/6.5/1");
        assert_eq!(cases[2].outcome, Outcome::Skipped);
    }
}
