//! Builds the XDP program (lb-ebpf) for the BPF target so `cargo build` needs no extra step; the
//! object lands in OUT_DIR and `dataplane::object` embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("lb-user has no parent directory"))?
        .join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    if which("bpf-linker").is_none() {
        return Err(anyhow!(
            "bpf-linker is not installed, so the XDP program cannot be built; run `cargo xtask bootstrap` (as root) first"
        ));
    }
    let package = aya_build::Package { name: "lb-ebpf", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}
