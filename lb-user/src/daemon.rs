//! `lb run`: build every configured part, serve until SIGINT/SIGTERM, then stop. The XDP
//! program stays pinned and keeps forwarding after the daemon exits; `lb detach` removes it.
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::{signal::unix, sync::watch};

use crate::{
    config::{Config, XdpConfig},
    control::{admin, state::State},
    dataplane::{Dataplane, DataplaneError, LoadOptions, host},
    l4::{self, L4},
    l7, upstream,
};

/// Loads, attaches and fills the XDP program, preparing the host on the way.
pub fn start_xdp(xdp: &XdpConfig) -> Result<Dataplane, DataplaneError> {
    let mut dp = Dataplane::load(&LoadOptions::from_config(xdp))?;
    if dp.adopted {
        log::info!("adopted the pinned XDP maps under {}", xdp.pin_path.display());
    }
    let ipv6 = xdp.services.iter().any(|s| s.vip.is_ipv6());
    for name in &xdp.interfaces {
        let iface =
            host::Iface::lookup(name).ok_or_else(|| DataplaneError::NoInterface(name.clone()))?;
        host::prepare_interface(name, ipv6);
        dp.attach(&iface, xdp.mode)?;
        log::info!("XDP attached to {name} in {} mode", xdp.mode.as_str());
    }
    if ipv6 {
        host::enable_ipv6_forwarding();
    }
    dp.apply(&xdp.services)?;
    for s in &xdp.services {
        log::info!(
            "service {} on {} ({:?}), {} backends",
            s.name,
            s.vip,
            s.protocol,
            s.backends.len()
        );
        for b in &s.backends {
            host::keep_neighbour(b.addr().ip());
        }
    }
    Ok(dp)
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let dataplane = match &config.xdp {
        Some(xdp) => Some(Mutex::new(start_xdp(xdp)?)),
        None => None,
    };
    // One set of groups for the admin API, L7 and L4, so `lb backend ...` changes what they use.
    let groups = upstream::groups(&config.upstream);
    // L7: build (certificates, clients) and bind every listener before serving anything.
    let mut l7_listeners = Vec::new();
    for server in l7::build(&config, &groups)? {
        let listener = server.bind().await?;
        log::info!("http listener {} on {}", server.name, listener.local_addr()?);
        l7_listeners.push((server, listener));
    }
    // Userspace L4 listeners. `terminate = "NAME"` SNI routes need the L7 TLS listener NAME
    // registered in `handoffs` (not wired yet: such configs fail here with a clear error).
    let handoffs = l4::Handoffs::new();
    let l4 = L4::build(&config.tcp, &groups, &handoffs)?;
    let _l4_stats = l4.stats(); // for the admin API (issue 6)
    let l4 = l4.bind().await?;
    let listener = admin::bind(config.admin.listen).await?;
    log::info!("admin API on http://{}", listener.local_addr()?);
    let state = Arc::new(State { config, dataplane, groups });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::run(listener, state.clone(), shutdown_rx.clone()));
    let mut l4_tasks = l4.spawn(shutdown_rx.clone());
    let l7_servers: Vec<_> = l7_listeners.iter().map(|(s, _)| s.clone()).collect();
    let l7_tasks: Vec<_> = l7_listeners
        .into_iter()
        .map(|(server, listener)| tokio::spawn(server.run(listener, shutdown_rx.clone())))
        .collect();

    let mut term = unix::signal(unix::SignalKind::terminate()).context("SIGTERM handler")?;
    let mut hup = unix::signal(unix::SignalKind::hangup()).context("SIGHUP handler")?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { log::info!("SIGINT: shutting down"); break }
            _ = term.recv() => { log::info!("SIGTERM: shutting down"); break }
            _ = hup.recv() => {
                // SIGHUP re-reads the L7 certificates; a bad file keeps the old ones.
                for s in &l7_servers {
                    match s.reload_tls() {
                        Ok(()) => log::info!("SIGHUP: certificates of {} reloaded", s.name),
                        Err(e) => log::error!("SIGHUP: {}: {e}; keeping the old certificates", s.name),
                    }
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
    admin_task.await??;
    while let Some(r) = l4_tasks.join_next().await {
        r??;
    }
    for task in l7_tasks {
        task.await??; // each drains its connections within http.grace_ms
    }
    if state.dataplane.is_some() {
        log::info!("stopped; the pinned XDP program keeps forwarding (`lb detach` removes it)");
    } else {
        log::info!("stopped");
    }
    Ok(())
}
