//! The command line: `lb run` starts the daemon; the other commands are clients of its admin API.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::control::client::AdminAddr;

#[derive(Debug, Parser)]
#[command(name = "lb", version, about = "An L4 (XDP) and L7 (HTTP/TLS) load balancer")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the XDP program, attach it, start the proxies and the admin API.
    Run {
        #[arg(long, short, env = "LB_CONFIG")]
        config: PathBuf,
        /// Take over from the running lb without a gap: its listening sockets come over
        /// `[admin] upgrade_socket`, it stops accepting once this one is ready, then drains
        /// and exits. An invalid config exits with its errors and leaves it untouched.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config without binding or loading anything; exit 1 if it is invalid.
    Check {
        #[arg(long, short, env = "LB_CONFIG")]
        config: PathBuf,
    },
    /// Show what the running daemon serves and how (XDP attach mode per interface).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show counters per service and backend.
    Stats {
        /// Only this service or upstream group.
        service: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change the backends of a service or upstream group at runtime.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Re-read the daemon's config file and apply what changed (as SIGHUP does); an invalid
    /// config is refused with its errors and the running one stays.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A live view of services and backends with rates, refreshed in place (Ctrl-C quits).
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one view (rates over one interval) and exit.
        #[arg(long)]
        once: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Exit 0 if the daemon is ready (or, with `live`, answers at all), else 1: a probe for
    /// service managers and kubelet exec probes. With `--admin unix:PATH` it asks exactly
    /// one process, also while another binds the same admin address (reuse_port).
    Probe {
        #[arg(value_enum, default_value_t = ProbeKind::Ready)]
        kind: ProbeKind,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// On a backend of a `forwarding = "dsr"` service: unwrap the packets balancers
    /// encapsulated to it (IPv4-in-IPv4, IPv6-in-IPv6, GUE) in XDP, for kernels without the
    /// ipip/ip6_tunnel/fou modules.
    Decap {
        #[command(subcommand)]
        action: DecapAction,
    },
    /// Remove the pinned XDP program and maps (stops kernel forwarding).
    Detach {
        /// Read the pin directory from this config.
        #[arg(long, short, env = "LB_CONFIG")]
        config: Option<PathBuf>,
        /// The pin directory (default: the config's xdp.pin_path, else /sys/fs/bpf/lb).
        #[arg(long)]
        pin_path: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DecapAction {
    /// Attach the decapsulation program to an interface (it stays, pinned, after this exits).
    Attach {
        #[arg(long)]
        interface: String,
        /// Unwrap only packets to this VIP (repeat for more); without one, every packet to
        /// GUE port 6080 or of IP protocol 4/41 is unwrapped.
        #[arg(long = "vip")]
        vips: Vec<std::net::IpAddr>,
        /// Also make this host a DSR backend for each `--vip`: the VIP on `lo`, ARP for it
        /// neither answered nor announced (`arp_ignore = 1`, `arp_announce = 2`). Recorded
        /// and undone by `lb decap detach` of the last interface.
        #[arg(long, requires = "vips")]
        configure_host: bool,
        /// `native` (in the driver) or `generic`.
        #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
        mode: String,
        #[command(flatten)]
        pin: DecapPin,
    },
    /// Detach it from an interface (its maps go with the last one).
    Detach {
        #[arg(long)]
        interface: String,
        #[command(flatten)]
        pin: DecapPin,
    },
    /// Where it is attached, and its counters.
    Status {
        #[command(flatten)]
        pin: DecapPin,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct DecapPin {
    /// Where the program's link and maps are pinned.
    #[arg(long = "pin-path", env = "LB_PIN_PATH", default_value = crate::dataplane::decap::DEFAULT_DECAP_PIN)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProbeKind {
    /// `/ready`: listeners bound and serving, not shutting down.
    Ready,
    /// `/live`: the process answers.
    Live,
}

#[derive(Debug, Subcommand)]
pub enum BackendAction {
    /// Add a backend; it gets new flows at once.
    Add {
        service: String,
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove a backend; its flows stop.
    Remove {
        service: String,
        addr: SocketAddr,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop new flows to a backend; open ones finish.
    Drain {
        service: String,
        addr: SocketAddr,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        service: String,
        addr: SocketAddr,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a backend's weight (its share of new flows); open flows stay where they are.
    Weight {
        service: String,
        addr: SocketAddr,
        weight: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List backends (of one service, or all).
    List {
        service: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct AdminArgs {
    /// The admin API of the running daemon: HOST:PORT, or unix:PATH for one process's
    /// `[admin] socket` [default: the config's listen, else 127.0.0.1:9901].
    #[arg(long, env = "LB_ADMIN")]
    pub admin: Option<AdminAddr>,
    /// Take the admin address from this config.
    #[arg(long, short, env = "LB_CONFIG")]
    pub config: Option<PathBuf>,
    /// The admin API's bearer token [default: the config's [admin] token].
    #[arg(long, env = "LB_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl AdminArgs {
    /// The address to reach the daemon at.
    pub fn addr(&self) -> anyhow::Result<AdminAddr> {
        if let Some(a) = &self.admin {
            return Ok(a.clone());
        }
        if let Some(path) = &self.config {
            return Ok(AdminAddr::Tcp(crate::config::Config::load(path)?.admin.listen));
        }
        Ok(AdminAddr::Tcp(crate::config::DEFAULT_ADMIN.parse()?))
    }

    /// The bearer token to send, if any.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.config {
            Some(path) => Ok(crate::config::Config::load(path)?.admin.token),
            None => Ok(None),
        }
    }
}
