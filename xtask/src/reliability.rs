//! `cargo xtask reliability` and `cargo xtask soak`: the full-length reliability suite (issue 8)
//! and the soak, each writing rows that become RELIABILITY.md; plus the short fuzz runs that
//! `cargo xtask test` includes.
//!
//! The tests (`tests/tests/rel_*.rs`, and `xdp_flood.rs` for issue 12) append one JSON line per
//! scenario to the file named by `LB_REL_REPORT`; `LB_REL_FULL=1` selects the long versions. Rows for scenarios other tests
//! already cover (packets, admin auth) and for fuzzing are added here.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::cmd::{ok, step};

/// The reliability test binaries, in the order they run: issue 8's suite, then issue 12's
/// floods and SNAT port exhaustion through the XDP path (`xdp_flood`).
const REL_TESTS: &[&str] = &[
    "rel_faults",
    "rel_control",
    "rel_http",
    "rel_l7_run",
    "rel_tls",
    "rel_load",
    "rel_upgrade",
    "xdp_flood",
    "xdp_recovery",
];
/// The cargo-fuzz targets in fuzz/.
/// Every cargo-fuzz target: parsers of untrusted bytes (TLS ClientHello, PROXY header, HTTP
/// routing and framing, the config).
const FUZZ_TARGETS: &[&str] = &["client_hello", "proxy_header", "http_route", "config"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").into()
}

fn report_path(name: &str) -> PathBuf {
    root().join("target").join(name)
}

/// The full suite: long versions of every scenario, testssl.sh, longer fuzz runs, and the
/// soak when `soak_secs` is given. Writes RELIABILITY.md even when something failed.
pub fn run(fuzz_secs: u64, soak_secs: Option<u64>) -> anyhow::Result<()> {
    testssl()?;
    cargo_fuzz()?;
    step(
        "build",
        &["cargo", "build", "--workspace", "--exclude", "lb-ebpf", "--all-targets"],
        &[],
    )?;
    let report = report_path("reliability.jsonl");
    let _ = std::fs::remove_file(&report);
    let report_s = report.to_str().context("non-UTF-8 path")?.to_string();
    let mut failed = Vec::new();
    let env = [
        ("LB_REL_FULL", "1"),
        ("LB_REL_REPORT", report_s.as_str()),
        ("LB_REQUIRE_PRIVILEGED", "1"),
        ("RUST_LOG", "error"),
    ];
    for test in REL_TESTS {
        let args = ["cargo", "test", "-p", "lb-tests", "--test", test, "--", "--test-threads", "1"];
        if step(&format!("reliability: {test}"), &args, &env).is_err() {
            failed.push(test.to_string());
        }
    }
    // Scenarios other suites own: their pass/fail becomes a row.
    for (test, scenario, injected) in [
        (
            "xdp_bad_input",
            "packets (XDP)",
            "100,000 random and mutated frames (truncated, bad lengths and checksums, options, fragments, VLAN, IPv6 extension headers, ICMP errors) through BPF_PROG_TEST_RUN: xdp_bad_input.rs",
        ),
        (
            "ops_admin",
            "admin API auth (no token)",
            "non-loopback admin.listen without a token refused: ops_admin.rs",
        ),
        (
            "ops_admin_token",
            "admin API auth (token)",
            "requests with a missing or wrong bearer token rejected: ops_admin_token.rs",
        ),
    ] {
        let args = ["cargo", "test", "-p", "lb-tests", "--test", test];
        let passed = step(&format!("reliability: {test}"), &args, &env[2..]).is_ok();
        let observed = if passed { "test passed" } else { "test FAILED" };
        append(&report, scenario, "full", injected, observed, passed)?;
        if !passed {
            failed.push(test.to_string());
        }
    }
    for target in FUZZ_TARGETS {
        if fuzz(target, fuzz_secs, &report, "full").is_err() {
            failed.push(format!("fuzz {target}"));
        }
    }
    if let Some(secs) = soak_secs
        && soak(secs).is_err()
    {
        failed.push("soak".into());
    }
    write_markdown(false)?;
    if !failed.is_empty() {
        bail!("reliability: failed: {}", failed.join(", "));
    }
    println!("xtask: reliability: all scenarios passed; RELIABILITY.md written");
    Ok(())
}

/// The soak alone (`cargo xtask soak`): writes target/soak.jsonl and regenerates RELIABILITY.md.
pub fn soak(secs: u64) -> anyhow::Result<()> {
    step(
        "build",
        &["cargo", "build", "--workspace", "--exclude", "lb-ebpf", "--all-targets"],
        &[],
    )?;
    let report = report_path("soak.jsonl");
    let _ = std::fs::remove_file(&report);
    let secs_s = secs.to_string();
    let result = step(
        &format!("soak ({secs} s)"),
        &["cargo", "test", "-p", "lb-tests", "--test", "rel_load", "soak", "--", "--nocapture"],
        &[
            ("LB_REL_SOAK_SECS", secs_s.as_str()),
            ("LB_REL_REPORT", report.to_str().context("non-UTF-8 path")?),
            ("LB_REQUIRE_PRIVILEGED", "1"),
            ("RUST_LOG", "error"),
        ],
    );
    write_markdown(true)?;
    result
}

/// The short fuzz runs of `cargo xtask test`: every target for `secs` seconds.
pub fn fuzz_short(secs: u64) -> anyhow::Result<()> {
    cargo_fuzz()?;
    let report = report_path("fuzz-short.jsonl");
    let _ = std::fs::remove_file(&report);
    for target in FUZZ_TARGETS {
        fuzz(target, secs, &report, "short")?;
    }
    Ok(())
}

/// Runs one fuzz target for `secs` seconds and appends its row.
fn fuzz(target: &str, secs: u64, report: &Path, mode: &str) -> anyhow::Result<()> {
    println!("xtask: fuzz {target} for {secs} s");
    let start = Instant::now();
    // New inputs go to the (ignored) corpus dir; checked-in seeds, where a target has them,
    // are read as a second corpus.
    let dir = root().join("fuzz");
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let seeds = dir.join("seeds").join(target);
    let mut corpora = vec![corpus];
    if seeds.is_dir() {
        corpora.push(seeds);
    }
    let out = Command::new("cargo")
        .args(["+nightly", "fuzz", "run", "-O", target])
        .args(&corpora)
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .args(["-print_final_stats=1", "-max_len=4096"])
        .current_dir(root().join("fuzz"))
        .output()
        .context("cannot run cargo fuzz")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let runs = stderr
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "?".into());
    let observed = if out.status.success() {
        format!("{runs} inputs in {:.0} s, no crash", start.elapsed().as_secs_f64())
    } else {
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        format!("FAILED after {runs} inputs (see fuzz/artifacts/{target})")
    };
    append(
        report,
        &format!("fuzz: {target}"),
        mode,
        &format!("cargo fuzz run {target} -max_total_time={secs}"),
        &observed,
        out.status.success(),
    )?;
    if !out.status.success() {
        bail!("fuzz target {target} failed");
    }
    Ok(())
}

fn append(
    report: &Path,
    scenario: &str,
    mode: &str,
    injected: &str,
    observed: &str,
    pass: bool,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let line = serde_json::json!({
        "scenario": scenario, "mode": mode, "injected": injected, "observed": observed, "pass": pass,
    });
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(report)?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// The rows of the committed RELIABILITY.md's table, as the JSON rows they were written from
/// (without their mode, which the table does not show).
fn committed_rows() -> Vec<serde_json::Value> {
    table_rows(&std::fs::read_to_string(root().join("RELIABILITY.md")).unwrap_or_default())
}

/// The rows of the scenario table in `text`, as [`table_line`] wrote them.
fn table_rows(text: &str) -> Vec<serde_json::Value> {
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("| ") && l.ends_with(" |")) {
        // Cells are split at " | " that is not an escaped `\|` inside a cell.
        let inner = &line[2..line.len() - 2];
        let mut cells = Vec::new();
        let mut cell = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.peek() == Some(&'|') => cell.push(chars.next().unwrap_or('|')),
                '|' if cell.ends_with(' ') && chars.peek() == Some(&' ') => {
                    chars.next();
                    cells.push(cell.trim_end().to_string());
                    cell = String::new();
                }
                c => cell.push(c),
            }
        }
        cells.push(cell);
        if let [scenario, injected, observed, result] = &cells[..]
            && !["scenario", "---"].contains(&scenario.as_str())
        {
            rows.push(serde_json::json!({
                "scenario": scenario, "injected": injected, "observed": observed,
                "pass": result == "pass",
            }));
        }
    }
    rows
}

/// RELIABILITY.md from the rows of the last full run and the last soak. With `keep_committed`
/// (`--report-only`, the soak alone), the committed file's rows are the base and a scenario
/// with a new row replaces its old one in place: a run of some scenarios updates only theirs.
pub fn write_markdown(keep_committed: bool) -> anyhow::Result<()> {
    let mut rows = if keep_committed { committed_rows() } else { Vec::new() };
    for name in ["reliability.jsonl", "soak.jsonl"] {
        let text = std::fs::read_to_string(report_path(name)).unwrap_or_default();
        for row in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            // A scenario run again replaces its row, in place.
            match rows.iter_mut().find(|r| r["scenario"] == row["scenario"]) {
                Some(old) => *old = row,
                None => rows.push(row),
            }
        }
    }
    // A fresh checkout has no rows of a run (they live under target/; committed rows carry no
    // mode): keep the committed report.
    anyhow::ensure!(
        rows.iter().any(|r| r.get("mode").is_some()),
        "no reliability rows under {}: run `cargo xtask reliability` first; RELIABILITY.md is \
         left as it was",
        report_path("").display()
    );
    let mut md = String::from(
        "# Reliability\n\nWritten by `cargo xtask reliability` (the full-length scenarios; \
         `cargo xtask test` runs the short versions of the same tests) and `cargo xtask soak`. \
         Each row is one scenario of issue 8 (or of issue 12: floods and port exhaustion \
         through XDP): what was injected and what was observed, with \
         the numbers of that run. Figures come from a shared 2-core machine.\n\n\
         | scenario | injected | observed | result |\n| --- | --- | --- | --- |\n",
    );
    for r in &rows {
        md.push_str(&table_line(r));
    }
    md.push_str(
        "\n## Commands\n\n\
         - `cargo xtask test`: the short versions (10 s of churn, 2 SIGKILLs, 15 s per fuzz \
         target) with everything else.\n\
         - `cargo xtask reliability [--fuzz-secs N] [--soak-secs N]`: the full versions (a \
         minute of churn, 10 SIGKILLs), testssl.sh, N seconds per fuzz target (default 120), \
         and the soak if asked; rewrites this file.\n\
         - `cargo xtask soak [--secs N]` (default 600): RSS and open files of `lb run` under \
         steady load; replaces its row in this file, the others stay.\n\
         - One scenario: `LB_REL_FULL=1 cargo test -p lb-tests --test rel_faults -- \
         --nocapture` (prints a `REL` line per scenario); with \
         `LB_REL_REPORT=$PWD/target/reliability.jsonl` its rows are kept, and `cargo xtask \
         reliability --report-only` puts them in this file in place of their old ones, the \
         other rows left as they were.\n",
    );
    std::fs::write(root().join("RELIABILITY.md"), md)?;
    println!("xtask: wrote RELIABILITY.md ({} rows)", rows.len());
    Ok(())
}

/// One row of the scenario table, `|` in cells escaped.
fn table_line(r: &serde_json::Value) -> String {
    let cell = |v: &serde_json::Value| v.as_str().unwrap_or_default().replace('|', "\\|");
    format!(
        "| {} | {} | {} | {} |\n",
        cell(&r["scenario"]),
        cell(&r["injected"]),
        cell(&r["observed"]),
        if r["pass"].as_bool() == Some(true) { "pass" } else { "**FAIL**" }
    )
}

/// testssl.sh from Debian, for the full run only.
fn testssl() -> anyhow::Result<()> {
    if ok(&["which", "testssl"]) || ok(&["which", "testssl.sh"]) {
        return Ok(());
    }
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    step("apt-get update", &["apt-get", "update", "-qq"], &env)?;
    step(
        "install testssl.sh",
        &["apt-get", "install", "-y", "-qq", "--no-install-recommends", "testssl.sh"],
        &env,
    )
}

/// cargo-fuzz (needs the nightly toolchain, which the bootstrap installs).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    if ok(&["cargo", "fuzz", "--version"]) {
        return Ok(());
    }
    step("install cargo-fuzz", &["cargo", "install", "cargo-fuzz", "--locked"], &[])
        .context("cargo-fuzz did not install; the fuzz targets cannot run")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_read_back_what_table_line_wrote() {
        let rows = [
            serde_json::json!({"scenario": "a | b", "injected": "x||y", "observed": "1 | 2 |",
                "pass": true}),
            serde_json::json!({"scenario": "c", "injected": "", "observed": "| z", "pass": false}),
        ];
        let text = format!(
            "# R\n\n| scenario | injected | observed | result |\n| --- | --- | --- | --- |\n{}\n\
             ## Commands\n- `x | y`\n",
            rows.iter().map(table_line).collect::<String>()
        );
        assert_eq!(table_rows(&text), rows);
    }
}
