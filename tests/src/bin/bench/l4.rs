//! End-to-end L4 comparison (filled in next).
pub fn run(_quick: bool) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
