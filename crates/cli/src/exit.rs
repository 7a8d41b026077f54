//! Exit codes, and how an error carries one to `main`.
//!
//! A subcommand attaches an [`Exit`] as context to the error it returns; its `Display` is the
//! headline of the report (`cannot reach QEMU's QMP socket: ...`) and its discriminant is the
//! process exit code. Errors without one exit with [`FAILED`].

use qmigrate_migration::ErrorKind;

/// The migration (or the tunnel) failed.
pub const FAILED: u8 = 1;

/// Text for `--help`: what each exit code means.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (migration completed / tunnel closed cleanly)
  1  failed (migration failed, tunnel connection failed, bad state)
  2  usage error (bad flags or arguments)
  3  QMP unreachable (no socket, not a socket, refused, or busy with another client)
  4  cancelled (Ctrl-C, SIGTERM or --timeout); the source VM was left running";

/// An exit code with the headline that explains it; attach it with `anyhow::Context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The migration or tunnel failed.
    Failed,
    /// The flags or arguments do not make sense together.
    Usage,
    /// QEMU's QMP socket could not be reached.
    QmpUnreachable,
    /// The operator (or `--timeout`) cancelled the migration.
    Cancelled,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Failed => FAILED,
            Exit::Usage => 2,
            Exit::QmpUnreachable => 3,
            Exit::Cancelled => 4,
        }
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Exit::Failed => "migration failed",
            Exit::Usage => "invalid usage",
            Exit::QmpUnreachable => "cannot reach QEMU's QMP socket",
            Exit::Cancelled => "migration cancelled",
        })
    }
}

impl From<ErrorKind> for Exit {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Usage => Exit::Usage,
            ErrorKind::QmpUnreachable => Exit::QmpUnreachable,
            ErrorKind::Cancelled => Exit::Cancelled,
            _ => Exit::Failed,
        }
    }
}

/// The exit code for an error: the outermost [`Exit`] attached as context, else the kind the
/// migration engine gave it, else [`FAILED`].
///
/// anyhow's `downcast_ref` looks through nested context layers, which `chain()` does not; an
/// engine error is found in the chain.
pub fn code_of(err: &anyhow::Error) -> u8 {
    if let Some(exit) = err.downcast_ref::<Exit>() {
        return exit.code();
    }
    if let Some(kind) = err.downcast_ref::<ErrorKind>() {
        return Exit::from(*kind).code();
    }
    err.chain()
        .find_map(|cause| cause.downcast_ref::<qmigrate_migration::Error>())
        .map_or(FAILED, |e| Exit::from(e.kind()).code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_kinds_become_exit_codes() {
        let usage = qmigrate_migration::Error::new(ErrorKind::Usage, anyhow::anyhow!("bad"));
        assert_eq!(code_of(&anyhow::Error::from(usage)), 2);
        let unreachable = anyhow::anyhow!("gone").context(ErrorKind::QmpUnreachable);
        assert_eq!(code_of(&unreachable.context("outer")), 3);
        let refused = qmigrate_migration::Error::new(ErrorKind::Refused, anyhow::anyhow!("no"));
        assert_eq!(
            code_of(&anyhow::Error::from(refused).context("at the edge")),
            1
        );
        assert_eq!(code_of(&anyhow::anyhow!("plain")), FAILED);
        let cancelled = anyhow::anyhow!("x").context(Exit::Cancelled);
        assert_eq!(code_of(&cancelled), 4);
    }
}
