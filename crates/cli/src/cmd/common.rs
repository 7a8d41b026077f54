//! What the tunnel commands share: the ready line scripts wait for, and the `--once` summary.

use std::io::Write as _;

use anyhow::Context as _;

use crate::exit::Exit;

/// Prints the ready line: exactly one line on stdout, flushed, since scripts wait for it.
pub(crate) fn ready(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("cannot write the ready line to stdout")
}

/// The `--once` summary and exit status.
pub(crate) fn finish(
    once: bool,
    who: &str,
    report: &qmigrate_transport::Report,
) -> anyhow::Result<()> {
    if once {
        println!("{who}: {report}");
    }
    tracing::info!("{who}: {report}");
    if report.failed > 0 {
        return Err(anyhow::anyhow!(
            "{} of {} tunnel connections failed (see the log above)",
            report.failed,
            report.connections
        ))
        .context(Exit::Failed);
    }
    Ok(())
}
