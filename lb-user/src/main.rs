//! The `lb` binary: parse the command line, dispatch, print errors as one readable line.
mod output;

use std::process::ExitCode;

use clap::Parser as _;
use hyper::Method;
use lb_user::{
    cli::{AdminArgs, BackendAction, Cli, Command, DecapAction, ProbeKind},
    config::{Config, DEFAULT_PIN_PATH},
    control::client,
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

async fn call(
    admin: &AdminArgs,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    client::call(&admin.addr()?, admin.token()?.as_deref(), method, path, body).await
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config: path, upgrade } => {
            // Refused the same way `lb check` reports it: every error with its line.
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            };
            lb_user::daemon::run(config, Some(path), upgrade).await?;
        }
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => println!("{}: ok", config.display()),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        Command::Reload { admin } => {
            let v = call(&admin, Method::POST, "/reload", None).await?;
            if admin.json {
                println!("{v:#}");
            } else {
                println!("reloaded");
                for c in v["changes"].as_array().into_iter().flatten() {
                    println!("  {}", c.as_str().unwrap_or_default());
                }
            }
        }
        Command::Top { interval, once, admin } => {
            let token = admin.token()?;
            let every = std::time::Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
            lb_user::top::run(&admin.addr()?, token.as_deref(), every, once).await?;
        }
        Command::Status { admin } => {
            let v = call(&admin, Method::GET, "/status", None).await?;
            output::status(&v, admin.json)?;
        }
        Command::Stats { service, admin } => {
            let path = service.map_or("/stats".to_string(), |s| format!("/services/{s}"));
            let v = call(&admin, Method::GET, &path, None).await?;
            output::stats(&v, admin.json)?;
        }
        Command::Backend { action } => backend(action).await?,
        Command::Decap { action } => decap(action)?,
        Command::Probe { kind, admin } => {
            let path = match kind {
                ProbeKind::Ready => "/ready",
                ProbeKind::Live => "/live",
            };
            if let Err(e) = call(&admin, Method::GET, path, None).await {
                eprintln!("lb probe: {e:#}");
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Detach { config, pin_path } => {
            let dir = match (pin_path, config) {
                (Some(p), _) => p,
                (None, Some(c)) => {
                    Config::load(&c)?.xdp.map(|x| x.pin_path).unwrap_or(DEFAULT_PIN_PATH.into())
                }
                (None, None) => DEFAULT_PIN_PATH.into(),
            };
            // The pins first (the program stops), then the host changes it needed; a record
            // made in another network namespace stops both before anything is removed.
            lb_user::dataplane::changes::check_namespace(&dir)?;
            let removed = lb_user::dataplane::detach_keeping_host(&dir)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", dir.display());
            } else {
                println!(
                    "removed {} pinned objects under {}; XDP detached",
                    removed.len(),
                    dir.display()
                );
            }
            for u in lb_user::dataplane::changes::undo(&dir)? {
                println!("undid {u}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn backend(action: BackendAction) -> anyhow::Result<()> {
    match action {
        BackendAction::Add { service, addr, weight, admin } => {
            let body = serde_json::json!({ "addr": addr, "weight": weight });
            call(&admin, Method::POST, &format!("/services/{service}/backends"), Some(body))
                .await?;
            println!("added {addr} (weight {weight}) to {service}");
        }
        BackendAction::Remove { service, addr, admin } => {
            call(&admin, Method::DELETE, &format!("/services/{service}/backends/{addr}"), None)
                .await?;
            println!("removed {addr} from {service}");
        }
        BackendAction::Drain { service, addr, admin } => {
            call(&admin, Method::POST, &format!("/services/{service}/backends/{addr}/drain"), None)
                .await?;
            println!("draining {addr} in {service}: no new flows, open ones finish");
        }
        BackendAction::Undrain { service, addr, admin } => {
            let path = format!("/services/{service}/backends/{addr}/undrain");
            call(&admin, Method::POST, &path, None).await?;
            println!("undrained {addr} in {service}: it takes new flows again");
        }
        BackendAction::Weight { service, addr, weight, admin } => {
            let body = serde_json::json!({ "weight": weight });
            let path = format!("/services/{service}/backends/{addr}/weight");
            call(&admin, Method::PUT, &path, Some(body)).await?;
            println!("{addr} in {service} now has weight {weight}");
        }
        BackendAction::List { service, admin } => {
            let path = service.map_or("/stats".to_string(), |s| format!("/services/{s}"));
            let v = call(&admin, Method::GET, &path, None).await?;
            output::backends(&v, admin.json)?;
        }
    }
    Ok(())
}

/// `lb decap attach|detach|status`: local, no daemon involved.
fn decap(action: DecapAction) -> anyhow::Result<()> {
    use lb_user::{config::XdpMode, dataplane::decap};
    match action {
        DecapAction::Attach { interface, vips, configure_host, mode, pin } => {
            let mode = if mode == "generic" { XdpMode::Generic } else { XdpMode::Native };
            let opts = decap::DecapOptions { pin: pin.path, interface, vips, mode };
            let linked = decap::attach(&opts)?;
            if configure_host {
                for change in decap::configure_host(&opts.pin, &opts.vips)? {
                    println!("host: {change}");
                }
            }
            let only = if opts.vips.is_empty() {
                "every encapsulated packet".to_string()
            } else {
                let v: Vec<String> = opts.vips.iter().map(|a| a.to_string()).collect();
                format!("packets to {}", v.join(", "))
            };
            println!(
                "decap on {} ({} mode, link {}): unwraps {only}",
                opts.interface,
                opts.mode.as_str(),
                linked.as_str()
            );
        }
        DecapAction::Detach { interface, pin } => {
            let removed = decap::detach(&pin.path, &interface)?;
            if removed.is_empty() {
                println!("decap was not attached to {interface} under {}", pin.path.display());
            } else {
                println!("removed {}", removed.join(", "));
            }
        }
        DecapAction::Status { pin } => {
            let links = decap::links(&pin.path);
            if links.is_empty() {
                println!("decap: not attached (pin path {})", pin.path.display());
                return Ok(());
            }
            println!("decap attached to {}", links.join(", "));
            for (name, v) in decap::counters(&pin.path)? {
                println!("  {name:<16} {v}");
            }
        }
    }
    Ok(())
}
