//! `qmigrate send`.

/// Arguments of `qmigrate send`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `qmigrate send`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`send` is not built yet")
}
