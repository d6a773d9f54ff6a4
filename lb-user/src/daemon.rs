//! `lb run`: build every configured part, serve until SIGINT/SIGTERM, then tear down.
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::{signal::unix, sync::watch};

use crate::{
    config::Config,
    control::{admin, state::State},
    dataplane::Dataplane,
    l4::{self, L4},
    upstream,
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
    // Userspace L4 listeners. The groups are the daemon's one set (backend commands change
    // them); the L7 listeners register their TLS hand-offs in `handoffs` when they exist.
    let groups = upstream::groups(&config.upstream);
    let handoffs = l4::Handoffs::new();
    let l4 = L4::build(&config.tcp, &groups, &handoffs)?;
    let _l4_stats = l4.stats();
    let l4 = l4.bind().await?;
    let listener = admin::bind(config.admin.listen).await?;
    log::info!("admin API on http://{}", listener.local_addr()?);
    let state = Arc::new(State { config, dataplane });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::run(listener, state.clone(), shutdown_rx.clone()));
    let mut l4_tasks = l4.spawn(shutdown_rx);

    let mut term = unix::signal(unix::SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT: shutting down"),
        _ = term.recv() => log::info!("SIGTERM: shutting down"),
    }
    let _ = shutdown_tx.send(true);
    admin_task.await??;
    while let Some(r) = l4_tasks.join_next().await {
        r??;
    }
    drop(state);
    log::info!("stopped; XDP detached");
    Ok(())
}
