//! Ctrl-C and SIGTERM as a future, so a long-running command can turn them into an orderly
//! cancellation instead of dying with QEMU half-way through a migration.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Listens for SIGINT and SIGTERM from the moment it is created.
///
/// Creating it replaces the default "terminate" action for both signals for the rest of the
/// process's life (tokio never restores it): a second Ctrl-C while we clean up is swallowed
/// rather than killing us between `migrate_cancel` and `cont`.
#[derive(Debug)]
pub struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    /// Installs the handlers; fails only if the runtime cannot register a signal handler.
    pub fn install() -> io::Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Resolves with the signal's name when the next SIGINT or SIGTERM arrives.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Installs the signal handlers now and returns the future that cancels a migration: it
/// resolves with the reason on the first SIGINT or SIGTERM, or when `timeout` expires.
pub fn cancellation(timeout: Option<Duration>) -> io::Result<impl Future<Output = String>> {
    let mut interrupts = Interrupts::install()?;
    Ok(async move {
        match timeout {
            Some(limit) => tokio::select! {
                signal = interrupts.recv() => format!("interrupted by {signal}"),
                _ = tokio::time::sleep(limit) => {
                    format!("--timeout {} expired", crate::units::format_duration(limit))
                }
            },
            None => format!("interrupted by {}", interrupts.recv().await),
        }
    })
}
