//! Backends from a Kubernetes Service's EndpointSlices (`discovery.k8s.io/v1`), watched with
//! kube-rs: every list replaces the known set, every watch event updates it, each change goes
//! to [`super::apply`] at once.
use std::{collections::BTreeMap, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use thiserror::Error;

use super::{
    Source,
    reconcile::{Want, merge},
};
use crate::control::state::State;

/// The first wait after the API failed; doubled up to [`MAX_BACKOFF`]. Short: a watch that
/// broke is retried soon, and every retry starts with a fresh list.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The server-side length of one watch call, in seconds.
const WATCH_SECS: u32 = 60;

#[derive(Debug, Error)]
pub enum KubeError {
    #[error(
        "cannot use the kubeconfig {path}: {source}; fix the file or point [kubernetes] kubeconfig at another"
    )]
    Kubeconfig { path: String, source: kube::config::KubeconfigError },
    #[error(
        "no in-cluster credentials and no kubeconfig: {0}; run in a pod with a service account, or set [kubernetes] kubeconfig = \"PATH\""
    )]
    Infer(#[from] kube::config::InferConfigError),
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for `kubeconfig` (its current context), or from the pod's service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let bad = |source| KubeError::Kubeconfig { path: path.display().to_string(), source };
            let file = Kubeconfig::read_from(path).map_err(bad)?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(bad)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The backends one EndpointSlice lists for `port` (its name, or its number): each address of
/// each endpoint, ready (or unknown) → up, serving and terminating → drained, else none.
/// `family` keeps only IPv4 (`Some(true)`) or IPv6 (`Some(false)`) addresses.
pub fn endpoints(
    slice: &EndpointSlice,
    port: &str,
    family: Option<bool>,
) -> Vec<(SocketAddr, Want)> {
    let number: Option<i32> = port.parse().ok();
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port) || (number.is_some() && p.port == number))
        .and_then(|p| u16::try_from(p.port?).ok())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in &slice.endpoints {
        let c = e.conditions.clone().unwrap_or_default();
        let want = if c.ready.unwrap_or(true) {
            Want::Up
        } else if c.serving == Some(true) && c.terminating == Some(true) {
            Want::Drained
        } else {
            continue;
        };
        // FQDN slices name hosts, not addresses: they do not parse and are skipped.
        for ip in e.addresses.iter().filter_map(|a| a.parse::<std::net::IpAddr>().ok()) {
            if family.is_none_or(|v4| v4 == ip.is_ipv4()) {
                out.push((SocketAddr::new(ip, port), want));
            }
        }
    }
    out
}

/// Watches `source` until aborted. The set is applied only from a complete list (and the
/// events after it): an API that cannot be reached leaves the last set serving and marks the
/// source stale, an empty list empties it.
pub async fn run(state: Arc<State>, source: Source) {
    let Some((ns, svc)) = source.from.service() else { return };
    let selector = format!("kubernetes.io/service-name={svc}");
    let mut resync = state.discovery.resyncs();
    // Slice name → its backends; `None` until the first complete list.
    let mut known: Option<BTreeMap<String, Vec<(SocketAddr, Want)>>> = None;
    let mut backoff = MIN_BACKOFF;
    loop {
        let client = match client(source.kubeconfig.as_deref()).await {
            Ok(c) => c,
            Err(e) => {
                state.discovery.stale(&source.service, &e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let api: Api<EndpointSlice> = Api::namespaced(client, ns);
        // Each watch call ends after WATCH_SECS, and one that stays silent longer fails over to
        // a new call: an API cut off without a reset (a partition) shows as stale within
        // about a minute and a half, not the default five.
        let config = watcher::Config::default().labels(&selector).timeout(WATCH_SECS);
        let mut events = watcher::watcher(api, config).boxed();
        let mut listing: Option<BTreeMap<String, Vec<(SocketAddr, Want)>>> = None;
        loop {
            let event = tokio::select! {
                e = events.next() => e,
                _ = resync.changed() => {
                    // A reload rewrote the service: put the API's set back.
                    if let Some(k) = &known {
                        super::apply(&state, &source, &merge(k.values().map(Vec::as_slice))).await;
                    }
                    continue;
                }
            };
            let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
            let list = |s: &EndpointSlice| endpoints(s, &source.from.port, source.family);
            match event {
                Some(Ok(Event::Init)) => listing = Some(BTreeMap::new()),
                Some(Ok(Event::InitApply(s))) => {
                    listing.get_or_insert_default().insert(name(&s), list(&s));
                }
                Some(Ok(Event::InitDone)) => {
                    known = Some(listing.take().unwrap_or_default());
                    backoff = MIN_BACKOFF;
                }
                Some(Ok(Event::Apply(s))) => {
                    known.get_or_insert_default().insert(name(&s), list(&s));
                }
                Some(Ok(Event::Delete(s))) => {
                    known.get_or_insert_default().remove(&name(&s));
                }
                Some(Err(e)) => {
                    // Unreachable, refused, or 410 Gone: start over with a fresh list (the
                    // watcher would resume, but only a list proves the set is current again).
                    state.discovery.stale(&source.service, &e.to_string());
                    break;
                }
                None => break,
            }
            if listing.is_none()
                && let Some(k) = &known
            {
                let n = super::apply(&state, &source, &merge(k.values().map(Vec::as_slice))).await;
                state.discovery.synced(&source.service, n);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn conditions_map_to_up_drained_or_nothing() {
        let s = slice(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": { "name": "web-abc", "labels": { "kubernetes.io/service-name": "web" } },
            "addressType": "IPv4",
            "ports": [{ "name": "metrics", "port": 9100 }, { "name": "http", "port": 8080, "protocol": "TCP" }],
            "endpoints": [
                { "addresses": ["10.0.0.1"], "conditions": { "ready": true } },
                { "addresses": ["10.0.0.2", "10.0.0.3"] },
                { "addresses": ["10.0.0.4"], "conditions": { "ready": false, "serving": true, "terminating": true } },
                { "addresses": ["10.0.0.5"], "conditions": { "ready": false, "serving": false, "terminating": true } },
                { "addresses": ["10.0.0.6"], "conditions": { "ready": false } }
            ]
        }));
        let got = endpoints(&s, "http", None);
        let a = |n: u8| SocketAddr::from(([10, 0, 0, n], 8080));
        assert_eq!(
            got,
            [(a(1), Want::Up), (a(2), Want::Up), (a(3), Want::Up), (a(4), Want::Drained)]
        );
        assert_eq!(endpoints(&s, "8080", None), got, "a number matches the port number");
        assert!(endpoints(&s, "https", None).is_empty(), "no such port");
        assert!(endpoints(&s, "http", Some(false)).is_empty(), "IPv6 only");
    }
}
