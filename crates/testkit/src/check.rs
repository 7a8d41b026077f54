//! QMP checks of a VM for assertions: a connection, its run state, its migration status.

use std::path::Path;
use std::time::Duration;

use qmigrate_qmp::{ConnectOptions, MigrationStatus, Qmp, QueryMigrate, QueryStatus, RunState};

/// Opens a QMP connection for checks (only when no `qmigrate` process holds the socket).
pub async fn qmp(path: &Path) -> Qmp {
    try_qmp(path).await.unwrap_or_else(|err| panic!("{err}"))
}

/// Like [`qmp`], with the failure returned for a message that says more.
pub async fn try_qmp(path: &Path) -> Result<Qmp, String> {
    let mut last = None;
    // The socket serves one client at a time; a `qmigrate` that just exited may still be
    // closing its connection.
    for _ in 0..50 {
        match Qmp::connect_unix(path, &ConnectOptions::default()).await {
            Ok(qmp) => return Ok(qmp),
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "cannot connect to QMP {}: {last:?}",
        path.display()
    ))
}

/// The VM's run state and whether it runs.
pub async fn vm_state(qmp: &Qmp) -> (RunState, bool) {
    let status = qmp.execute(&QueryStatus).await.expect("query-status");
    (status.status, status.running)
}

/// The migration status as `query-migrate` reports it (`None` when no migration ran).
pub async fn migration_status(qmp: &Qmp) -> (MigrationStatus, Option<String>) {
    let info = qmp.execute(&QueryMigrate).await.expect("query-migrate");
    (
        info.status.unwrap_or(MigrationStatus::None),
        info.error_desc,
    )
}

/// Waits (at most `limit`) for the migration to end and returns its final status, or the
/// status it is stuck in.
pub async fn wait_for_migration(qmp: &Qmp, limit: Duration) -> MigrationStatus {
    let until = tokio::time::Instant::now() + limit;
    loop {
        let (status, _) = migration_status(qmp).await;
        if status.is_terminal() || tokio::time::Instant::now() >= until {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
