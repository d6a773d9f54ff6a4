//! What the admin API reports and changes: the running daemon's shared state.
use std::sync::Mutex;

use serde::Serialize;

use crate::{config::Config, dataplane::Dataplane};

/// Shared by the admin handlers; the data plane sits behind a mutex because map syscalls are
/// rare (admin requests), never on a packet path.
pub struct State {
    pub config: Config,
    pub dataplane: Option<Mutex<Dataplane>>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub xdp: Vec<Attachment>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Attachment {
    pub interface: String,
    pub mode: String,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct Stats {
    pub services: Vec<ServiceStats>,
    pub reasons: Vec<(String, u64)>,
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct ServiceStats {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub packets: u64,
    pub bytes: u64,
}

impl State {
    pub fn status(&self) -> Status {
        let xdp = match &self.dataplane {
            Some(dp) => dp
                .lock()
                .expect("dataplane lock")
                .attached()
                .iter()
                .map(|(i, m)| Attachment { interface: i.clone(), mode: m.as_str().into() })
                .collect(),
            None => Vec::new(),
        };
        Status { version: env!("CARGO_PKG_VERSION").into(), xdp }
    }

    pub fn stats(&self) -> Result<Stats, crate::dataplane::DataplaneError> {
        let Some(dp) = &self.dataplane else {
            return Ok(Stats { services: Vec::new(), reasons: Vec::new() });
        };
        let dp = dp.lock().expect("dataplane lock");
        let services = self.config.xdp.as_ref().map(|x| x.services.as_slice()).unwrap_or(&[]);
        let counters = dp.service_counters(services.len())?;
        let services = services
            .iter()
            .zip(counters)
            .map(|(s, c)| ServiceStats {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                protocol: format!("{:?}", s.protocol).to_lowercase(),
                packets: c.packets,
                bytes: c.bytes,
            })
            .collect();
        let reasons = dp.stats()?.into_iter().map(|(n, v)| (n.to_string(), v)).collect();
        Ok(Stats { services, reasons })
    }
}
