//! The command line: `lb run` starts the daemon; the other commands are clients of its admin API.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

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
    /// Show per-service counters of the running daemon.
    Stats {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The admin API address of the running daemon.
    #[arg(long, env = "LB_ADMIN", default_value = crate::config::DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Print the daemon's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
