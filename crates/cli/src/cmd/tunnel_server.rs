//! `qmigrate tunnel-server`.

/// Arguments of `qmigrate tunnel-server`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `qmigrate tunnel-server`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`tunnel-server` is not built yet")
}
