//! Tables the CLI prints from the admin API's JSON (or the JSON itself with --json).
use lb_user::control::state::{Stats, Status};

pub fn status(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let s: Status = serde_json::from_value(v.clone())?;
    println!("lb {}", s.version);
    if s.xdp.is_empty() {
        println!("XDP: not attached");
    }
    for a in &s.xdp {
        println!("XDP on {:<16} mode {:<8} link {}", a.interface, a.mode, a.link);
    }
    if s.adopted {
        println!("(adopted the pinned program and maps of a previous run)");
    }
    if !s.xdp_writer.is_empty() {
        println!("XDP maps written by: {}", s.xdp_writer);
    }
    for a in &s.announce {
        println!("VIP {:<40} {}", a.vip, a.state);
    }
    println!("pid: {}", s.pid);
    println!("ready: {}", if s.ready { "yes" } else { "no" });
    for u in &s.unavailable {
        println!("UNAVAILABLE {u}");
    }
    for src in &s.sources {
        let why = src.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        println!(
            "backends of {} from {}: {}, {} up{why}",
            src.service, src.source, src.state, src.backends
        );
    }
    for (listener, relay) in &s.relays {
        println!("tcp listener {listener}: relay {relay}");
    }
    if !s.host.is_empty() {
        println!("host changes (`lb detach` undoes them):");
        for c in &s.host {
            println!("  {c}");
        }
    }
    Ok(())
}

pub fn stats(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let s: Stats = serde_json::from_value(v.clone())?;
    println!(
        "{:<14} {:<24} {:<28} {:<9} {:>6} {:>10} {:>12} {:>8}",
        "SERVICE", "VIP", "BACKEND", "STATE", "SLOTS", "PACKETS", "BYTES", "FLOWS"
    );
    for svc in &s.services {
        println!(
            "{:<14} {:<24} {:<28} {:<9} {:>6} {:>10} {:>12} {:>8}",
            svc.name, svc.vip, "(all)", svc.protocol, "", svc.packets, svc.bytes, svc.flows
        );
        for b in &svc.backends {
            println!(
                "{:<14} {:<24} {:<28} {:<9} {:>6} {:>10} {:>12} {:>8}",
                "",
                "",
                b.addr.to_string(),
                b.state,
                b.slots,
                b.packets,
                b.bytes,
                b.flows
            );
        }
    }
    if !s.reasons.is_empty() {
        println!();
        for (name, v) in s.reasons.iter().filter(|(_, v)| *v != 0) {
            println!("{name:<22} {v:>12}");
        }
    }
    // Userspace L4 listeners: every counter that moved, then errors by kind.
    for l in &s.l4 {
        println!("\nL4 LISTENER {}", l.name);
        let errors = l.errors.iter().map(|(k, v)| (format!("error {k}"), v));
        let counters = l.counters.iter().map(|(k, v)| (k.clone(), v));
        for (name, v) in counters.chain(errors).filter(|(_, v)| **v != 0) {
            println!("{name:<22} {v:>12}");
        }
    }
    Ok(())
}

pub fn backends(v: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{v:#}");
        return Ok(());
    }
    let s: Stats = serde_json::from_value(v.clone())?;
    println!(
        "{:<14} {:<28} {:>6} {:<9} {:>6} {:>8}  HEALTH CHECK",
        "SERVICE", "BACKEND", "WEIGHT", "STATE", "SLOTS", "ACTIVE"
    );
    for svc in &s.services {
        for b in &svc.backends {
            let health = match &b.health {
                None => "-".to_string(),
                Some(h) if h.up => format!("up ({} checks)", h.checks),
                Some(h) => format!("down: {}", h.last_error.as_deref().unwrap_or("?")),
            };
            println!(
                "{:<14} {:<28} {:>6} {:<9} {:>6} {:>8}  {health}",
                svc.name,
                b.addr.to_string(),
                b.weight,
                b.state,
                b.slots,
                b.active
            );
        }
    }
    Ok(())
}
