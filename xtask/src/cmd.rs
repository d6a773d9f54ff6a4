//! Running commands with a progress line each and a clear failure.
use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs `args` with `env`, printing one progress line; fails if the command fails.
pub fn step(name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    println!("xtask: {name}: {}", args.join(" "));
    let status = Command::new(args[0])
        .args(&args[1..])
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

/// True when `args` runs and exits 0; its output is discarded.
pub fn ok(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The stdout of `args`, or an empty string if it cannot run.
pub fn output(args: &[&str]) -> String {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
