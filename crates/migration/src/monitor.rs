//! Connecting to a QEMU's monitor (QMP) with errors that say what to do, and the queries
//! both jobs make.

use std::path::Path;

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::{
    ConnectOptions, MigrationInfo, MigrationStatus, Qmp, QmpTarget, QueryMigrate, QueryStatus,
    StatusInfo,
};
use tracing::debug;

use crate::{Error, ErrorKind};

/// Connects to QEMU's QMP socket (a path, or `tcp:HOST:PORT`), with an operator-readable error
/// marked [`ErrorKind::QmpUnreachable`] when there is no QEMU to talk to.
pub async fn connect_qmp(qmp: &str) -> crate::Result<Qmp> {
    let Ok(target) = qmp.parse::<QmpTarget>();
    if let QmpTarget::Unix(path) = &target {
        check_qmp_path(path).context(ErrorKind::QmpUnreachable)?;
    }
    match Qmp::connect(&target, &ConnectOptions::default()).await {
        Ok(qmp) => {
            let v = &qmp.greeting().version.qemu;
            debug!(qemu = %format!("{}.{}.{}", v.major, v.minor, v.micro), "connected to QMP");
            Ok(qmp)
        }
        Err(err) if err.is_unreachable() => Err(Error::new(ErrorKind::QmpUnreachable, err)),
        Err(err) => Err(anyhow!(err)
            .context(format!("QMP handshake on {qmp} failed"))
            .into()),
    }
}

/// Turns the common mistakes (typo in the path, QEMU not started, wrong file) into one line
/// that says what to do, instead of a bare `ENOENT`.
fn check_qmp_path(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "{shown} does not exist (is QEMU running with -qmp unix:{shown},server=on,wait=off?)"
        ),
        Err(err) => bail!("{shown}: {err}"),
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(meta) => {
            let kind = if meta.is_dir() {
                "a directory"
            } else if meta.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            bail!(
                "{shown} is {kind}, not a socket (pass the PATH of QEMU's -qmp unix:PATH,server=on,wait=off)"
            )
        }
    }
}

/// The Unix socket a migration was to be handed to does not exist: whatever should listen
/// there (a tunnel client) is not running.
#[derive(Debug, thiserror::Error)]
#[error("migration socket {} does not exist: start what listens there (the tunnel client) first", .0.display())]
pub struct MissingSocket(pub std::path::PathBuf);

/// Checks that a Unix socket we are about to hand to QEMU exists, so that a tunnel client
/// that is not running is reported by us ([`MissingSocket`]) and not as a connect error deep
/// in QEMU.
pub fn check_migration_socket(path: &Path) -> crate::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            Err(anyhow::Error::new(MissingSocket(path.to_path_buf())).into())
        }
        Err(err) => bail!("migration socket {shown}: {err}"),
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => bail!("migration socket {shown} is not a socket"),
    }
}

/// The QEMU version from the greeting, for messages.
pub(crate) fn qemu_version(qmp: &Qmp) -> String {
    qmp.greeting().version.qemu.to_string()
}

pub(crate) async fn query_status(qmp: &Qmp) -> anyhow::Result<StatusInfo> {
    qmp.execute(&QueryStatus)
        .await
        .context("query-status failed")
}

pub(crate) async fn query_migrate(qmp: &Qmp) -> anyhow::Result<MigrationInfo> {
    qmp.execute(&QueryMigrate)
        .await
        .context("query-migrate failed")
}

pub(crate) fn status_of(info: &MigrationInfo) -> MigrationStatus {
    info.status.unwrap_or(MigrationStatus::None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_path_errors_say_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("x.qmp");
        let err = check_qmp_path(&missing).expect_err("missing");
        assert!(err
            .to_string()
            .contains("does not exist (is QEMU running with -qmp unix:"));
        let file = dir.path().join("file");
        std::fs::write(&file, b"").expect("write");
        let err = check_qmp_path(&file).expect_err("file");
        assert!(
            err.to_string().contains("is a regular file, not a socket"),
            "{err}"
        );
    }
}
