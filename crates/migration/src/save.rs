//! Saving a VM to a file or a command, around the source job: QEMU writes `PATH.partial`, which
//! is renamed into place only once QEMU has completed the save, and removed otherwise.

use std::path::PathBuf;

use qmigrate_qmp::Qmp;

use crate::monitor::check_migration_socket;
use crate::outcome::{Outcome, Progress, Summary};
use crate::source::{resume_source, SourceState};
use crate::statefile::{can_write_direct, Partial};
use crate::{Error, ErrorKind, MigrationPlan, QemuTarget};

/// Where a completed save went, for the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// The state file, renamed into place.
    File {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// Whether QEMU wrote its pages with O_DIRECT (mapped-ram with direct-io).
        direct_io: bool,
    },
    /// The command that got the stream (`exec:`).
    Command(String),
}

/// What QEMU sends to, for a source sending to `target`: for `file:PATH`, `PATH.partial`
/// (dropping the returned [`Partial`] without [`finish`] removes it), written with O_DIRECT
/// where mapped-ram is on and the directory's file system takes it; the tunnel client's socket
/// is checked to exist, so that a tunnel client that is not running is reported by us and not
/// as a connect error deep in QEMU.
pub fn prepare(
    target: QemuTarget,
    plan: &mut MigrationPlan,
) -> crate::Result<(Option<Partial>, QemuTarget)> {
    match target {
        QemuTarget::File { path, offset } => {
            let partial = Partial::new(&path, offset)?;
            // With O_DIRECT the channels write straight to the disk while QEMU runs, instead of
            // filling the page cache for the commit's flush to write out afterwards.
            plan.direct_io =
                plan.mapped_ram && can_write_direct(partial.partial().parent().unwrap_or(&path));
            let qemu_side = QemuTarget::File {
                path: partial.partial().to_path_buf(),
                offset,
            };
            Ok((Some(partial), qemu_side))
        }
        QemuTarget::Socket(path) => {
            check_migration_socket(&path)?;
            Ok((None, QemuTarget::Socket(path)))
        }
        other => Ok((None, other)),
    }
}

/// After the source job: renames a completed save's state file into place, or names the
/// command a completed `exec:` save went to; `None` for anything else (an incomplete save's
/// partial file is removed as `partial` is dropped).
///
/// When the rename fails although QEMU completed the save, the summary is reported, a guest
/// that was running before is resumed, and the error is returned: the save is not usable.
pub async fn finish(
    qmp: &Qmp,
    plan: &MigrationPlan,
    summary: &Summary,
    partial: Option<Partial>,
    target: &QemuTarget,
    source: &SourceState,
    progress: &mut dyn Progress,
) -> crate::Result<Option<Saved>> {
    match (&summary.outcome, partial, target) {
        (Outcome::Completed, Some(partial), _) => {
            let path = partial.path().to_path_buf();
            match partial.commit() {
                Ok(size) => Ok(Some(Saved::File {
                    path,
                    size,
                    direct_io: plan.direct_io,
                })),
                Err(err) => {
                    progress.finish(summary);
                    if let Err(resume) = resume_source(qmp, source, progress).await {
                        tracing::warn!("{resume:#}");
                    }
                    Err(Error::new(ErrorKind::Failed, err))
                }
            }
        }
        (Outcome::Completed, None, QemuTarget::Exec(command)) => {
            Ok(Some(Saved::Command(command.clone())))
        }
        _ => Ok(None),
    }
}
