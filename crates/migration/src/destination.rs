//! The destination's job: prepare a QEMU started with `-incoming defer` for the plan, and
//! follow the incoming migration to its end.

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::probe;
use qmigrate_qmp::{
    Error as QmpError, MigrateIncoming, MigrateSetParameters, MigrationStatus, MigrationTarget,
    Qmp, QueryMigrate, QueryMigrateCapabilities, QueryMigrateParameters, RunState,
};
use tracing::{debug, info};

use crate::fit::{fit_capabilities, fit_parameters, set_capabilities};
use crate::monitor::{qemu_version, query_migrate, query_status, status_of};
use crate::{Direction, MigrationPlan, QemuTarget, POLL_INTERVAL};

/// Fails, saying how to fix it, unless the destination QEMU waits for an incoming migration
/// that nothing has started yet (`-incoming defer`, no `migrate-incoming` so far).
pub async fn check_waiting_for_incoming(qmp: &Qmp) -> crate::Result<()> {
    let status = query_status(qmp).await?;
    if status.status != RunState::InMigrate {
        bail!(
            "destination QEMU is not waiting for an incoming migration (its state is {}): \
             start it with -incoming defer and the same machine options as the source",
            status.status
        );
    }
    let migration = status_of(&query_migrate(qmp).await?);
    match migration {
        MigrationStatus::None => {}
        MigrationStatus::Setup => bail!(
            "destination QEMU already listens for a migration (an earlier `receive`, or started \
             with -incoming URI): restart it with -incoming defer so that qmigrate sets the \
             socket and capabilities"
        ),
        other => bail!(
            "an incoming migration already ran on the destination QEMU (status {}): restart it \
             with -incoming defer",
            other
        ),
    }
    Ok(())
}

/// What [`prepare_incoming`] set up.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Where QEMU listens, as the operator would write it.
    pub endpoint: String,
    /// Whether the typed `channels` argument was used (else the legacy `uri`).
    pub channels: bool,
    /// Whether QEMU stays up when the incoming migration fails (`exit-on-error: false`), so
    /// that [`follow_incoming`] can read its reason; else it exits, QEMU's default.
    pub stays_on_error: bool,
}

/// Prepares a destination QEMU started with `-incoming defer`: checks its state, sets the
/// capabilities and parameters that must match the source, and makes it listen on `endpoint`
/// (for a `file:` or `exec:` restore: start loading).
///
/// With `stay_on_error`, asks QEMU (9.1+; older ones ignore the wish) not to exit when the
/// incoming migration fails, so its reason can be reported: meant for a caller that follows
/// the migration to its end.
///
/// Returns once QEMU listens. Fails (before changing anything) when QEMU is not waiting for an
/// incoming migration, saying how to start it instead.
pub async fn prepare_incoming(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &QemuTarget,
    stay_on_error: bool,
) -> crate::Result<Incoming> {
    check_waiting_for_incoming(qmp).await?;

    let qemu = qemu_version(qmp);
    let known = qmp
        .execute(&QueryMigrateCapabilities)
        .await
        .context("query-migrate-capabilities failed")?;
    set_capabilities(
        qmp,
        fit_capabilities(plan.destination_capabilities(), &known, &qemu)?,
    )
    .await?;
    let current = qmp
        .execute(&QueryMigrateParameters)
        .await
        .context("query-migrate-parameters failed")?;
    let params = fit_parameters(plan.destination_parameters(), &current, &qemu)?;
    if params != MigrateSetParameters::default() {
        qmp.execute(&params)
            .await
            .context("QEMU refused the migration parameters")?;
    }

    let support = probe::migration_support(qmp)
        .await
        .context("cannot ask QEMU which migration arguments it supports")?;
    let target = endpoint.target_for(qmp, &support, Direction::Incoming)?;
    let channels = matches!(target, MigrationTarget::Channels(_));
    let stays_on_error = stay_on_error && support.incoming_exit_on_error;
    let mut incoming = MigrateIncoming::new(target);
    if stays_on_error {
        incoming = incoming.exit_on_error(false);
    }
    qmp.execute(&incoming)
        .await
        .with_context(|| format!("migrate-incoming on {endpoint} failed"))?;
    let now = status_of(&query_migrate(qmp).await?);
    debug!(
        status = %now,
        "after migrate-incoming"
    );
    Ok(Incoming {
        endpoint: endpoint.to_string(),
        channels,
        stays_on_error,
    })
}

/// How an incoming migration ended, as seen on the destination.
#[derive(Debug, Clone)]
pub struct IncomingOutcome {
    /// The final migration status (`completed` or `failed`).
    pub status: MigrationStatus,
    /// The VM's state afterwards.
    pub run_state: RunState,
    /// QEMU's `error-desc` when it failed.
    pub error: Option<String>,
    /// Whether `cont` was sent.
    pub started: bool,
}

/// On a destination whose postcopy migration is paused: listens again at `target`
/// (`migrate-recover`) for the source's resume. Errors unless the destination is
/// `postcopy-paused`.
pub async fn listen_for_recovery(qmp: &Qmp, target: &crate::QemuTarget) -> crate::Result<()> {
    let status = status_of(&query_migrate(qmp).await?);
    if status != MigrationStatus::PostcopyPaused {
        return Err(crate::Error::new(
            crate::ErrorKind::Usage,
            anyhow!(
                "there is no paused postcopy migration on the destination QEMU (its migration \
                 status is {status}): nothing to recover"
            ),
        ));
    }
    qmp.execute(&qmigrate_qmp::MigrateRecover {
        uri: target.to_string(),
    })
    .await
    .with_context(|| format!("the destination QEMU refused to listen again at {target}"))?;
    Ok(())
}

/// Follows an incoming migration prepared by [`prepare_incoming`] to its end; with `start`,
/// sends `cont` afterwards when the destination VM is paused (QEMU started with `-S`).
///
/// A destination QEMU exits when an incoming migration fails (its default), so a lost QMP
/// connection is reported as that.
pub async fn follow_incoming(qmp: &Qmp, start: bool) -> crate::Result<IncomingOutcome> {
    let mut events = qmp.events();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut last = MigrationStatus::None;
    let info = loop {
        tokio::select! {
            event = events.recv() => if let Ok(event) = event {
                debug!(event = %event.event, data = %event.data, "QMP event");
            },
            _ = poll.tick() => {}
        }
        let info = match qmp.execute(&QueryMigrate).await {
            Ok(info) => info,
            Err(QmpError::Disconnected) => bail!(
                "destination QEMU closed its QMP socket during the migration (it exits when an \
                 incoming migration fails; see its log)"
            ),
            Err(err) => return Err(anyhow!(err).context("query-migrate failed").into()),
        };
        let status = status_of(&info);
        if status != last {
            info!(
                status = %status,
                "incoming migration"
            );
            last = status;
        }
        if matches!(
            status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        ) {
            break info;
        }
    };
    let status = status_of(&info);
    let mut run_state = query_status(qmp).await?;
    let mut started = false;
    if status == MigrationStatus::Completed && start && !run_state.running {
        qmp.execute(&qmigrate_qmp::Cont)
            .await
            .context("cont on the destination failed")?;
        started = true;
        run_state = query_status(qmp).await?;
    }
    Ok(IncomingOutcome {
        status,
        run_state: run_state.status,
        error: info.error_desc,
        started,
    })
}
