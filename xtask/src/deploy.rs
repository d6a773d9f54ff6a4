//! The offline validation of the deployment files in `deploy/`: the Kubernetes manifests
//! against the API's schemas (kubernetes-validate from PyPI, which bundles them, in a venv the
//! bootstrap creates) and the systemd unit with `systemd-analyze verify`.
use anyhow::Context as _;

use crate::cmd::{ok, step};

/// Where the bootstrap installs the Python tools.
pub const VENV: &str = "/opt/lb-tools";
/// Pinned: the schemas it bundles are part of what the test checks.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn validator() -> String {
    format!("{VENV}/bin/kubernetes-validate")
}

/// Installs the validator unless it is there.
pub fn bootstrap() -> anyhow::Result<()> {
    if ok(&[&validator(), "--version"]) {
        return Ok(());
    }
    if !ok(&["python3", "-m", "venv", VENV]) {
        step(
            "install python3-venv",
            &["apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3-venv"],
            &[("DEBIAN_FRONTEND", "noninteractive")],
        )?;
        step("create the tools venv", &["python3", "-m", "venv", VENV], &[])?;
    }
    step(
        "install kubernetes-validate (Kubernetes schemas, offline)",
        &[&format!("{VENV}/bin/pip"), "install", "-q", KUBERNETES_VALIDATE],
        &[],
    )
    .context("cannot install kubernetes-validate from PyPI; the manifest check needs it")
}

/// Validates every manifest (strict: unknown fields fail) and the systemd unit.
pub fn validate() -> anyhow::Result<()> {
    let manifests: Vec<String> = std::fs::read_dir("deploy/kubernetes")
        .context("deploy/kubernetes")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| p.display().to_string())
        .collect();
    let validator = validator();
    let mut args = vec![validator.as_str(), "--strict"];
    args.extend(manifests.iter().map(String::as_str));
    step("validate Kubernetes manifests", &args, &[])?;
    if !ok(&["systemd-analyze", "--version"]) {
        println!("xtask: systemd-analyze not installed; skipping the unit check");
        return Ok(());
    }
    // The unit names the installed binary; verify it against the one just built.
    let lb = std::fs::canonicalize("target/debug/lb").context("target/debug/lb: build first")?;
    let unit = std::fs::read_to_string("deploy/systemd/lb.service")?
        .replace("/usr/local/bin/lb", &lb.display().to_string());
    let dir = std::env::temp_dir().join(format!("lb-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("lb.service");
    std::fs::write(&path, unit)?;
    let result = step(
        "verify the systemd unit",
        &["systemd-analyze", "verify", &path.display().to_string()],
        &[],
    );
    let _ = std::fs::remove_dir_all(&dir);
    result
}
