//! Continuous load: fresh-connection GETs from threads in a namespace, round robin over targets
//! (and client source addresses), that records when each failure began and which backend
//! answered each success.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{client::http_get, netns::Netns};

/// What a [`Load`] run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// (when the request began, since the start; target; error) of every failure, in order.
    pub failures: Vec<(Duration, SocketAddr, String)>,
    /// Bodies (backend names) with counts.
    pub seen: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// Requests per second over the run.
    pub fn rate(&self) -> f64 {
        (self.ok + self.failed) as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }

    /// The first few failures, for assertion messages.
    pub fn sample_failures(&self) -> Vec<String> {
        self.failures.iter().take(8).map(|(t, a, e)| format!("{t:?} {a}: {e}")).collect()
    }
}

/// What to send; [`Load::start`] starts it.
pub struct LoadBuilder {
    ns: Netns,
    targets: Vec<SocketAddr>,
    sources: Vec<Option<IpAddr>>,
    threads: usize,
    limit: Duration,
}

impl LoadBuilder {
    /// Sending threads (default 1).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// Stops on its own after `limit` (default 60 s): a failed test never loads forever.
    pub fn limit(mut self, limit: Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Client source addresses to go round (default: the kernel's choice).
    pub fn sources(mut self, sources: &[IpAddr]) -> Self {
        self.sources = sources.iter().copied().map(Some).collect();
        self
    }

    pub fn start(self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let start = Instant::now();
        let handles = (0..self.threads)
            .map(|t| {
                let ns = self.ns.share();
                let (s, n, answered) = (stop.clone(), sent.clone(), ok.clone());
                let (targets, sources, limit) =
                    (self.targets.clone(), self.sources.clone(), self.limit);
                std::thread::spawn(move || {
                    let mut report = LoadReport::default();
                    let mut i = t;
                    while !s.load(Ordering::Relaxed) && start.elapsed() < limit {
                        let target = targets[i % targets.len()];
                        let source = sources[i % sources.len()];
                        i += 1;
                        let began = start.elapsed();
                        match http_get(&ns, source, target, Duration::from_secs(3)) {
                            Ok(body) => {
                                report.ok += 1;
                                answered.fetch_add(1, Ordering::Relaxed);
                                *report.seen.entry(body).or_default() += 1;
                            }
                            Err(e) => {
                                report.failed += 1;
                                report.failures.push((began, target, format!("{e:#}")));
                                // A refused connect returns at once: do not spin on it.
                                std::thread::sleep(Duration::from_millis(5));
                            }
                        }
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    report
                })
            })
            .collect();
        Load { stop, threads: handles, sent, ok, start }
    }
}

/// Load running in the background until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
    pub sent: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    pub start: Instant,
}

impl Load {
    /// GETs from `ns` to `targets`; see [`LoadBuilder`] for the options.
    pub fn builder(ns: &Netns, targets: Vec<SocketAddr>) -> LoadBuilder {
        LoadBuilder {
            ns: ns.share(),
            targets,
            sources: vec![None],
            threads: 1,
            limit: Duration::from_secs(60),
        }
    }

    /// One thread, at most 60 s.
    pub fn start(ns: &Netns, targets: Vec<SocketAddr>) -> Self {
        Self::builder(ns, targets).start()
    }

    /// Waits until at least `n` more requests were sent (bounded by 20 s).
    pub fn wait_for(&self, n: u64) {
        let start = self.sent.load(Ordering::Relaxed);
        crate::wait_until(Duration::from_secs(20), || {
            self.sent.load(Ordering::Relaxed) >= start + n
        });
    }

    /// Requests answered so far, without stopping.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads {
            let r = t.join().expect("load thread");
            all.ok += r.ok;
            all.failed += r.failed;
            all.failures.extend(r.failures);
            for (k, v) in r.seen {
                *all.seen.entry(k).or_default() += v;
            }
        }
        all.failures.sort_by_key(|f| f.0);
        all.elapsed = self.start.elapsed();
        all
    }
}
