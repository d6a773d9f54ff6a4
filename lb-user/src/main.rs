//! The `lb` binary: parse the command line, dispatch, print errors as one readable line.
use std::process::ExitCode;

use clap::Parser as _;
use hyper::Method;
use lb_user::{
    cli::{Cli, Command},
    config::Config,
    control::{client, state},
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config)?;
            lb_user::daemon::run(config).await?;
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => println!("{}: ok", config.display()),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        Command::Status { admin } => {
            let v = client::call(admin.admin, Method::GET, "/status", None).await?;
            if admin.json {
                println!("{v:#}");
            } else {
                let s: state::Status = serde_json::from_value(v)?;
                println!("lb {}", s.version);
                if s.xdp.is_empty() {
                    println!("XDP: not attached");
                }
                for a in s.xdp {
                    println!("XDP on {:<16} mode {}", a.interface, a.mode);
                }
            }
        }
        Command::Stats { admin } => {
            let v = client::call(admin.admin, Method::GET, "/stats", None).await?;
            if admin.json {
                println!("{v:#}");
            } else {
                let s: state::Stats = serde_json::from_value(v)?;
                println!(
                    "{:<16} {:<24} {:<5} {:>12} {:>14}",
                    "SERVICE", "VIP", "PROTO", "PACKETS", "BYTES"
                );
                for svc in s.services {
                    println!(
                        "{:<16} {:<24} {:<5} {:>12} {:>14}",
                        svc.name, svc.vip, svc.protocol, svc.packets, svc.bytes
                    );
                }
                println!();
                for (name, v) in s.reasons {
                    println!("{name:<20} {v:>12}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
