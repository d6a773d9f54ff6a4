//! `lb run`: build every configured part, serve until SIGINT/SIGTERM, then stop. The XDP
//! program stays pinned and keeps forwarding after the daemon exits; `lb detach` removes it.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{signal::unix, sync::watch};

use crate::{
    config::{Config, ServiceConfig, XdpConfig},
    control::{admin, reload, state::State},
    dataplane::{
        Dataplane, DataplaneError, LoadOptions, host, snat,
        writer::{self, WriterLock},
    },
    l4::{self, L4},
    l7, upgrade, upstream,
};

/// Loads, attaches and fills the XDP program, preparing the host on the way.
pub fn start_xdp(xdp: &XdpConfig) -> Result<Dataplane, DataplaneError> {
    let adopting = Dataplane::pinned_at(&xdp.pin_path);
    let started = Dataplane::load(&LoadOptions::from_config(xdp)).and_then(|mut dp| {
        if dp.adopted {
            log::info!("adopted the pinned XDP maps under {}", xdp.pin_path.display());
        }
        fill_xdp(&mut dp, xdp)?;
        Ok(dp)
    });
    // A first start that failed leaves nothing pinned (the maps are hundreds of MiB of kernel
    // memory until `lb detach`) and the host as it was; an adopted program keeps forwarding as
    // it was.
    if started.is_err() && !adopting {
        // A record that cannot be undone stays, for the operator to read.
        match crate::dataplane::changes::undo(&xdp.pin_path) {
            Ok(_) => drop(crate::dataplane::detach(&xdp.pin_path)),
            Err(e) => {
                log::warn!("{e}");
                drop(crate::dataplane::detach_keeping_host(&xdp.pin_path));
            }
        }
    }
    started
}

/// The VIP addresses of `services`, each once.
pub fn vip_addrs(services: &[ServiceConfig]) -> BTreeSet<IpAddr> {
    services.iter().map(|s| s.vip.ip()).collect()
}

/// Whether any of `vips` is IPv4, and whether any is IPv6.
fn families(vips: &BTreeSet<IpAddr>) -> (bool, bool) {
    (vips.iter().any(IpAddr::is_ipv4), vips.iter().any(IpAddr::is_ipv6))
}

/// Prepares the host for `services` on `interfaces` (forwarding, ARP, VIPs local), keeps the
/// backends' neighbours resolved; after `apply`, so the program balances a VIP's ports
/// before the kernel answers for the address. Also what a reload runs.
pub fn sync_host(
    dp: &mut Dataplane,
    interfaces: &[String],
    services: &[ServiceConfig],
) -> Result<(), DataplaneError> {
    let vips = vip_addrs(services);
    let (v4, v6) = families(&vips);
    let host = dp.host_mut();
    host.prepare(interfaces, v4, v6)?;
    host.sync_vips(&vips)?;
    for s in services {
        for b in &s.backends {
            host.keep_neighbour(b.addr().ip());
        }
    }
    Ok(())
}

fn fill_xdp(dp: &mut Dataplane, xdp: &XdpConfig) -> Result<(), DataplaneError> {
    let (v4, v6) = families(&vip_addrs(&xdp.services));
    for name in &xdp.interfaces {
        let iface =
            host::Iface::lookup(name).ok_or_else(|| DataplaneError::NoInterface(name.clone()))?;
        // Forwarding before the program runs: `bpf_fib_lookup` needs it from the first packet.
        dp.host_mut().prepare(std::slice::from_ref(name), v4, v6)?;
        let linked = dp.attach(&iface, xdp.mode)?;
        log::info!(
            "XDP attached to {name} in {} mode (link {})",
            xdp.mode.as_str(),
            linked.as_str()
        );
    }
    dp.prune_links(&xdp.interfaces)?;
    // Also with no [[xdp.snat]]: removes pools an earlier config pinned.
    for change in dp.apply_snat(&snat::resolve(&xdp.snat)?)? {
        log::info!("{change}");
    }
    // A `backends_from` service starts from what adopted maps hold (its watcher corrects it).
    let services = crate::discovery::with_current_backends(dp, &xdp.services);
    dp.apply(&services)?;
    for s in &services {
        log::info!(
            "service {} on {} ({:?}), {} backends",
            s.name,
            s.vip,
            s.protocol,
            s.backends.len()
        );
    }
    sync_host(dp, &xdp.interfaces, &services)
}

/// A hand-off target for each L7 TLS listener, for the L4 listeners' `terminate` routes;
/// `Runtime::serve` points each at its listener (and a reload repoints them).
fn handoffs(l7: &[(Arc<l7::Server>, tokio::net::TcpListener)]) -> (l4::Targets, l4::Handoffs) {
    let targets: l4::Targets = l7
        .iter()
        .filter(|(server, _)| server.terminates_tls())
        .map(|(server, _)| (server.name.clone(), Arc::new(l4::Target::default())))
        .collect();
    let handoffs =
        targets.iter().map(|(n, t)| (n.clone(), t.clone() as Arc<dyn l4::TlsHandoff>)).collect();
    (targets, handoffs)
}

/// Raises the soft open-file limit to the hard one: every proxied connection takes two
/// descriptors, and service managers often start daemons with a soft limit of 1024.
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit with a pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur >= lim.rlim_max
    {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit with a pointer to a local struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        log::info!("open-file limit raised from {before} to {}", lim.rlim_max);
    }
}

/// The writer lock on the XDP pin directory; None when another lb holds it and this one
/// starts beside it (it takes the maps over later). An upgrade waits: the process it
/// replaces lets go as the hand-over starts.
async fn writer_lock(xdp: &XdpConfig, upgrade: bool) -> anyhow::Result<Option<WriterLock>> {
    let pin = &xdp.pin_path;
    let context = || format!("XDP pin directory {}: the writer lock", pin.display());
    if upgrade {
        let wait = tokio::time::timeout(Duration::from_secs(10), WriterLock::wait(pin)).await;
        return match wait {
            Ok(lock) => Ok(Some(lock.with_context(context)?)),
            Err(_) => anyhow::bail!(
                "XDP maps under {}: lb pid {} still writes them 10 s into the upgrade; is a third lb running beside it?",
                pin.display(),
                writer::holder(pin).unwrap_or(0)
            ),
        };
    }
    let lock = WriterLock::try_take(pin).with_context(context)?;
    if lock.is_none() {
        log::info!(
            "XDP maps under {}: lb pid {} writes them; this process serves its listeners and takes the maps over when that one stops",
            pin.display(),
            writer::holder(pin).unwrap_or(0)
        );
    }
    Ok(lock)
}

/// Waits for the writer lock on the XDP maps, then adopts them as a restart does (tracked
/// flows keep their backends) and writes this config's services.
async fn take_xdp_later(state: Arc<State>, xdp: XdpConfig, mut shutdown: watch::Receiver<bool>) {
    let lock = tokio::select! {
        lock = WriterLock::wait(&xdp.pin_path) => lock,
        _ = shutdown.changed() => return,
    };
    let lock = match lock {
        Ok(lock) => lock,
        Err(e) => return log::error!("XDP maps under {}: {e}", xdp.pin_path.display()),
    };
    log::info!("XDP maps under {}: the other lb let go; adopting them", xdp.pin_path.display());
    match tokio::task::spawn_blocking(move || start_xdp(&xdp)).await {
        Ok(Ok(dp)) => {
            state.install_dataplane(dp, lock);
            // The backends_from sets may have moved on while the other process wrote them.
            state.discovery.resync();
        }
        Ok(Err(e)) => log::error!(
            "XDP: {e}; the pinned program keeps forwarding with the maps as the other lb left them"
        ),
        Err(e) => log::error!("XDP: {e}"),
    }
}

/// Runs the daemon until SIGINT/SIGTERM (or a successor took over); `config_path` is what
/// SIGHUP and `POST /reload` read again. With `upgrade`, the listening sockets come from the
/// running process (see `upgrade`), which stops once this one is ready.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    upgrade: bool,
) -> anyhow::Result<()> {
    raise_nofile();
    let mut takeover = upgrade::begin(&config, upgrade)?;
    upgrade::overlap::enable_migration(&config)?;
    // The XDP maps have one writer: a process started beside a running one (every listener
    // `reuse_port`) takes them over once that one lets go.
    let (dataplane, later) = match &config.xdp {
        Some(xdp) => match writer_lock(xdp, takeover.is_upgrade()).await? {
            Some(lock) => (Some((start_xdp(xdp)?, lock)), None),
            None => (None, Some(xdp.clone())),
        },
        None => (None, None),
    };
    // One set of groups for the admin API, L7 and L4, so `lb backend ...` changes what they use.
    let groups = upstream::groups(&config.upstream);
    // L7: build (certificates, clients) and bind every listener before serving anything.
    let mut l7_listeners = Vec::new();
    for server in l7::build(&config, &groups)? {
        let listener = server.bind_from(&mut takeover.sockets).await?;
        log::info!("http listener {} on {}", server.name, listener.local_addr()?);
        l7_listeners.push((server, listener));
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Userspace L4 listeners. SNI routes with `terminate = "NAME"` hand the connection (its
    // ClientHello unread) to the L7 TLS listener NAME of this process.
    let (targets, handoffs) = handoffs(&l7_listeners);
    let l4 = L4::build(&config.tcp, &groups, &handoffs)?;
    let l4 = l4.bind_from(&mut takeover.sockets).await?;
    let listener = admin::bind_from(&config.admin, &mut takeover.sockets).await?;
    let local = admin::bind_local(&config.admin)?;
    let successor = upgrade::Successor::prepare(&config, &l4, &listener, &mut takeover.sockets)?;
    let (drain, upgrade_drain) = (l4.drain(), Duration::from_secs(config.tcp.upgrade_drain_secs));
    let auth = if config.admin.token.is_some() { "bearer token required" } else { "no token" };
    log::info!("admin API on http://{} ({auth})", listener.local_addr()?);
    let state = Arc::new(State::new(config, dataplane, groups, config_path));
    if let Some(xdp) = later {
        // Paused until then: no writer lock yet (State::xdp_paused).
        tokio::spawn(take_xdp_later(state.clone(), xdp, shutdown_rx.clone()));
    }
    tokio::spawn(crate::control::announce::run(state.clone(), shutdown_rx.clone()));
    let admin = admin::run(listener, local, state.clone(), shutdown_rx.clone());
    let admin_task = tokio::spawn(admin);
    let mut l4_tasks = l4.spawn(shutdown_rx);
    {
        let mut runtime = state.runtime.lock().await;
        runtime.targets = targets;
        for (server, listener) in l7_listeners {
            runtime.serve(server, listener)?;
        }
        let config = state.config.load_full();
        runtime.check(&state, &config);
        if !config.health.is_empty() {
            log::info!(
                "health checks on {}",
                config.health.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }
    // Not a condition of ready: an API that cannot be reached leaves its services as they are.
    crate::discovery::sync(&state);
    state.ready.store(true, Ordering::Relaxed);
    takeover.ready();
    let (mut handed, offering) = successor.serve(&state);

    let mut term = unix::signal(unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = unix::signal(unix::SignalKind::hangup()).context("SIGHUP handler")?;
    let mut usr2 = unix::signal(unix::SignalKind::user_defined2()).context("SIGUSR2 handler")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { log::info!("SIGINT: shutting down"); break }
            _ = term.recv() => { log::info!("SIGTERM: shutting down"); break }
            _ = usr2.recv() => upgrade::systemd::spawn_successor(state.config_path.as_deref()),
            Some(pid) = handed.recv() => {
                // The successor accepts on the same sockets: stop accepting at once (admin and
                // L4 too), let relays run for upgrade_drain_secs, L7 requests for grace_ms.
                log::info!("upgrade: pid {pid} serves now; draining and exiting");
                drain.set(upgrade_drain);
                let _ = shutdown_tx.send(true);
                break;
            }
            _ = hup.recv() => match reload::reload(&state).await {
                // SIGHUP re-reads the whole config (certificates included).
                Ok(report) => {
                    log::info!("SIGHUP: config reloaded");
                    for c in report.changes {
                        log::info!("reload: {c}");
                    }
                }
                Err(e) => log::error!("SIGHUP: {e}"),
            },
        }
    }
    // Not ready first (load balancers in front stop sending); the XDP maps go to whoever
    // takes them next; every listening socket closes at once (the copies kept for a
    // successor too: with reuse_port the kernel moves what is queued on them to the process
    // beside this one), then L7 drains within http.grace_ms, L4 within its drain time.
    state.ready.store(false, Ordering::Relaxed);
    state.release_xdp();
    drop(offering);
    let _ = shutdown_tx.send(true);
    state.runtime.lock().await.shutdown().await?;
    admin_task.await??;
    // The userspace L4 listeners stop accepting and let open connections finish (10 s at most).
    while let Some(r) = l4_tasks.join_next().await {
        r??;
    }
    if state.dataplane.get().is_some() {
        log::info!("stopped; the pinned XDP program keeps forwarding (`lb detach` removes it)");
    } else {
        log::info!("stopped");
    }
    Ok(())
}
