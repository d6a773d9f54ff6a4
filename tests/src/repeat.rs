//! Clients that repeat one exchange until stopped, each on a thread of its own, recording what
//! failed: [`Repeat`], with the exchanges of the upgrade tests ([`udp`], [`tls`], [`h2`]).
//! [`crate::load`] has the HTTP/1 ones (fresh connections, keep-alive).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use rustls::pki_types::CertificateDer;

use crate::{
    client::udp_socket,
    netns::Netns,
    tls::{client_config, https_request},
};

/// One exchange: `Err` says what went wrong.
pub type Exchange = Box<dyn FnMut() -> Result<(), String> + Send>;

/// Every exchange of the helpers here is bounded by this.
const TIMEOUT: Duration = Duration::from_secs(3);

/// At most this many exchanges per client, so a stop that never comes still ends.
const MAX_EXCHANGES: usize = 200_000;

/// `clients` threads, each doing its exchange over and over until [`Repeat::stop`].
pub struct Repeat {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Vec<String>>>,
}

impl Repeat {
    /// Starts client `i` of `clients` with the exchange `make(i)`.
    pub fn start(clients: usize, make: impl Fn(usize) -> Exchange) -> Self {
        let (stop, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let threads = (0..clients)
            .map(|i| {
                let mut exchange = make(i);
                let (stop, ok) = (stop.clone(), ok.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    for _ in 0..MAX_EXCHANGES {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        match exchange() {
                            Ok(()) => drop(ok.fetch_add(1, Ordering::Relaxed)),
                            Err(e) => failures.push(e),
                        }
                    }
                    failures
                })
            })
            .collect();
        Self { stop, ok, threads }
    }

    /// Exchanges that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops every client: the successes and every failure.
    pub fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// UDP clients in `ns`, each one session (its own source port): a datagram to `target`, then
/// its echo.
pub fn udp(ns: &Netns, target: SocketAddr, sessions: usize) -> Repeat {
    Repeat::start(sessions, |i| {
        let sock = udp_socket(ns, None, target).expect("udp socket");
        sock.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut n = 0u64;
        Box::new(move || {
            n += 1;
            let msg = format!("s{i}-{n}");
            let mut buf = [0u8; 256];
            match sock.send(msg.as_bytes()).and_then(|_| sock.recv(&mut buf)) {
                Ok(len) if buf[..len].ends_with(msg.as_bytes()) => Ok(()),
                Ok(len) => Err(format!("{msg}: got {:?}", String::from_utf8_lossy(&buf[..len]))),
                Err(e) => Err(format!("{msg}: {e}")),
            }
        })
    })
}

/// HTTPS clients in `ns`, a new TLS connection (SNI `host`, trusting `root`) per GET.
pub fn tls(
    ns: &Netns,
    target: SocketAddr,
    host: &str,
    root: &CertificateDer<'static>,
    clients: usize,
) -> Repeat {
    Repeat::start(clients, |_| {
        let (ns, config, host) = (ns.share(), client_config(&[root]), host.to_string());
        Box::new(move || {
            let (config, sni) = (config.clone(), host.clone());
            let req = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
            let got = ns.run(move || https_request(target, &sni, config, req.as_bytes()));
            match got.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| format!("{e:#}"))) {
                Ok((_, resp)) if resp.starts_with("HTTP/1.1 200") => Ok(()),
                Ok((_, resp)) => Err(format!("TLS: {:?}", resp.lines().next())),
                Err(e) => Err(format!("TLS: {e}")),
            }
        })
    })
}

/// HTTP/2 clients (h2c by prior knowledge) in `ns`, each a pooled client as a browser or a
/// gRPC stub keeps: GETs multiplexed on one connection, a new one when the server sends
/// GOAWAY (requests the server did not take are retried, as clients do).
pub fn h2(ns: &Netns, target: SocketAddr, clients: usize) -> Repeat {
    use http_body_util::{BodyExt as _, Empty};
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    Repeat::start(clients, |_| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        // The connector makes its sockets on the runtime's thread, which must be in `ns`:
        // each connection is opened by a thread that entered it.
        let connector = crate::client::NetnsConnector::new(ns);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build::<_, Empty<bytes::Bytes>>(connector);
        let uri: hyper::Uri = format!("http://{target}/").parse().expect("uri");
        Box::new(move || {
            rt.block_on(async {
                let send = client.get(uri.clone());
                let resp = tokio::time::timeout(TIMEOUT, send)
                    .await
                    .map_err(|_| "h2: no answer within 3 s".to_string())?
                    .map_err(|e| format!("h2: {e:?}"))?;
                let status = resp.status();
                let body = resp.into_body().collect().await.map_err(|e| format!("h2 body: {e}"))?;
                match status.as_u16() {
                    200 => Ok(()),
                    s => Err(format!("h2: {s} {:?}", body.to_bytes())),
                }
            })
        })
    })
}
