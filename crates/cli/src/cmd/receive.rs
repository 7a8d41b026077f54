//! `qmigrate receive`.

/// Arguments of `qmigrate receive`.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// Runs `qmigrate receive`.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`receive` is not built yet")
}
