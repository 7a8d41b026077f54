//! Shared test fixtures: real QEMU VMs (`qemu`), the `qmigrate` binary as processes (`proc`),
//! the tunnel (`tunnel`), and QMP checks of the result.

#![allow(dead_code)] // each test binary uses a different part

pub mod proc;
pub mod qemu;
pub mod tunnel;

use std::path::Path;
use std::time::Duration;

use qmigrate_qmp::{
    ConnectOptions, MigrationStatus, Pmemsave, Qmp, QueryMigrate, QueryStatus, RunState,
};

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

/// SHA-256 of the guest's first `mem_mib` MiB of physical memory, dumped with `pmemsave` to
/// `dump`.
pub async fn ram_sha256(qmp: &Qmp, mem_mib: u64, dump: &Path) -> String {
    qmp.execute_with_timeout(
        &Pmemsave {
            val: 0,
            size: mem_mib << 20,
            filename: dump.display().to_string(),
        },
        Duration::from_secs(60),
    )
    .await
    .expect("pmemsave");
    let digest = qemu::sha256_file(dump);
    // The dumps are as large as the guest; do not keep them around.
    let _ = std::fs::remove_file(dump);
    digest
}
