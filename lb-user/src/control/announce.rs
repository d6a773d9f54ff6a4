//! `[announce]`: a route for each XDP VIP in routing table `announce.table` while one of its
//! services has a backend up (health checks, drains and removals all count), withdrawn when
//! none has, for a BGP daemon on the node to export (bird2's kernel protocol, FRR's `ip
//! import-table`); lb itself speaks no BGP. Only the process that writes the XDP maps
//! announces (`State::xdp_paused`). The routes are host changes: `lb detach` withdraws them.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::state::State;
use crate::{config::Config, dataplane::Dataplane};

/// How often the routes are brought in line with the backends: a VIP whose last backend went
/// down is withdrawn within the health check's fall time plus this.
const EVERY: Duration = Duration::from_millis(200);

/// What `lb status` shows per announced-or-not VIP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Announcement {
    pub vip: IpAddr,
    /// `announced` or `withdrawn`.
    pub state: String,
}

/// Keeps the routes in line until `shutdown`; then withdraws them if `withdraw_on_stop`.
pub async fn run(state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => sync(&state),
            _ = shutdown.changed() => break,
        }
    }
    let config = state.config.load();
    let Some(a) = config.announce.as_ref().filter(|a| a.withdraw_on_stop) else { return };
    if let Some(mut dp) = state.dataplane()
        && let Err(e) = dp.host_mut().sync_announced(&BTreeSet::new(), a.table)
    {
        log::warn!("announce: {e}");
    }
}

/// One pass: announce the VIPs with a backend up, withdraw the others.
pub fn sync(state: &State) {
    let config = state.config.load();
    let Some(a) = &config.announce else { return };
    if state.xdp_paused() {
        return;
    }
    let Some(mut dp) = state.dataplane() else { return };
    let up = up_vips(&dp, &config);
    if let Err(e) = dp.host_mut().sync_announced(&up, a.table) {
        log::warn!("announce: {e}");
    }
}

/// Each configured VIP, announced or not, for `lb status`.
pub fn status(dp: &Dataplane, config: &Config) -> Vec<Announcement> {
    let Some(a) = &config.announce else { return Vec::new() };
    let announced = dp.host().announced(a.table);
    let vips: BTreeSet<IpAddr> =
        config.xdp.iter().flat_map(|x| &x.services).map(|s| s.vip.ip()).collect();
    vips.into_iter()
        .map(|vip| {
            let state = if announced.contains(&vip) { "announced" } else { "withdrawn" };
            Announcement { vip, state: state.into() }
        })
        .collect()
}

/// The VIPs of which some service has a backend that takes new flows.
fn up_vips(dp: &Dataplane, config: &Config) -> BTreeSet<IpAddr> {
    let serving = |name: &str| {
        dp.tables().backends(name).is_ok_and(|l| l.iter().any(|b| b.healthy && !b.draining))
    };
    config
        .xdp
        .iter()
        .flat_map(|x| &x.services)
        .filter(|s| serving(&s.name))
        .map(|s| s.vip.ip())
        .collect()
}
