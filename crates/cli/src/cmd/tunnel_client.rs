//! `qmigrate tunnel-client`.

/// Arguments of `qmigrate tunnel-client`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `qmigrate tunnel-client`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`tunnel-client` is not built yet")
}
