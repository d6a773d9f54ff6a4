//! `lb run`: build every configured part, serve until SIGINT/SIGTERM, then tear down.
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::{signal::unix, sync::watch};

use crate::{
    config::Config,
    control::{admin, state::State},
    dataplane::Dataplane,
    l7, upstream,
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    let dataplane = match &config.xdp {
        Some(xdp) => {
            let mut dp = Dataplane::load()?;
            for iface in &xdp.interfaces {
                dp.attach(iface, xdp.mode)?;
                log::info!("XDP attached to {iface} in {} mode", xdp.mode.as_str());
            }
            dp.set_services(&xdp.services)?;
            for s in &xdp.services {
                log::info!("service {} on {} ({:?})", s.name, s.vip, s.protocol);
            }
            Some(Mutex::new(dp))
        }
        None => None,
    };
    // L7: build (certificates, clients) and bind every listener before serving anything.
    let groups = upstream::groups(&config.upstream);
    let mut l7_listeners = Vec::new();
    for server in l7::build(&config, &groups)? {
        let listener = server.bind().await?;
        log::info!("http listener {} on {}", server.name, listener.local_addr()?);
        l7_listeners.push((server, listener));
    }
    let listener = admin::bind(config.admin.listen).await?;
    log::info!("admin API on http://{}", listener.local_addr()?);
    let state = Arc::new(State { config, dataplane });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::run(listener, state.clone(), shutdown_rx.clone()));
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
    for task in l7_tasks {
        task.await??; // each drains its connections within http.grace_ms
    }
    drop(state);
    log::info!("stopped; XDP detached");
    Ok(())
}
