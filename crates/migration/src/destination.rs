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
/// connection is reported as that. A postcopy migration that pauses is followed on, for
/// whoever recovers it; [`follow_and_recover`] makes the destination listen again itself.
pub async fn follow_incoming(qmp: &Qmp, start: bool) -> crate::Result<IncomingOutcome> {
    let mut nothing = |_: &str| {};
    follow_and_recover(
        qmp,
        start,
        None,
        &mut nothing,
        std::future::pending::<String>(),
    )
    .await
}

/// How long [`follow_and_recover`] waits before it asks a paused destination that refused to
/// listen again once more.
const RELISTEN_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// How [`follow_and_recover`] recovers a postcopy migration that pauses.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Where the destination listens again (`migrate-recover`): the address it listened on,
    /// so that whatever carries the stream (the tunnel-server) connects there again.
    pub target: QemuTarget,
    /// How long the migration may stay paused, counted from when it paused (anew after each
    /// resume that got through), before the destination is left paused (still listening) and
    /// the follow ends; zero: at once, without listening again.
    pub timeout: std::time::Duration,
}

/// [`follow_incoming`], and with `recovery`, whenever the destination reaches
/// `postcopy-paused` (the network broke during postcopy): makes it listen again at
/// [`Recovery::target`] ([`listen_for_recovery`]'s `migrate-recover`) and follows on, so that
/// the source's `migrate` with `resume` completes the migration. A resume that breaks off
/// (`postcopy-recover`, then paused again) is listened for again. What happens is told to
/// `note`.
///
/// Ends with the destination `postcopy-paused` (its [`IncomingOutcome::status`]), left as it
/// is and still listening, once the migration has been paused for [`Recovery::timeout`]. When
/// `cancel` resolves (with the reason) it stops following and fails with
/// [`crate::ErrorKind::Cancelled`], touching nothing.
pub async fn follow_and_recover(
    qmp: &Qmp,
    start: bool,
    recovery: Option<&Recovery>,
    note: &mut (dyn FnMut(&str) + Send),
    cancel: impl std::future::Future<Output = String>,
) -> crate::Result<IncomingOutcome> {
    let mut events = qmp.events();
    let mut events_alive = true;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut cancel = std::pin::pin!(cancel);
    let mut last = MigrationStatus::None;
    // Whether the destination listens for a resume: set by `migrate-recover`, cleared once a
    // resume takes the listener (QEMU leaves `postcopy-paused`, maybe only for a moment: the
    // MIGRATION events catch what the polls miss).
    let mut listening = false;
    // After a refused `migrate-recover`: not before this is it tried again.
    let mut retry_at: Option<std::time::Instant> = None;
    let mut paused_since: Option<std::time::Instant> = None;
    let info = loop {
        tokio::select! {
            event = events.recv(), if events_alive => match event {
                Ok(event) => {
                    debug!(event = %event.event, data = %event.data, "QMP event");
                    let status = event.data.get("status").and_then(|s| s.as_str());
                    if event.event == "MIGRATION"
                        && status.is_some_and(|s| s != "postcopy-paused")
                    {
                        listening = false;
                    }
                }
                Err(QmpError::Disconnected) => events_alive = false,
                Err(err) => debug!("event stream: {err}"),
            },
            _ = poll.tick() => {}
            reason = &mut cancel => {
                let now = query_migrate(qmp)
                    .await
                    .map_or(last, |info| status_of(&info));
                return Err(crate::Error::new(
                    crate::ErrorKind::Cancelled,
                    anyhow!(
                        "{reason}: stopped following the incoming migration; the destination \
                         QEMU is left as it is (migration status {now})"
                    ),
                ));
            }
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
        let Some(recovery) = recovery else {
            continue;
        };
        if status != MigrationStatus::PostcopyPaused {
            listening = false;
            if status == MigrationStatus::PostcopyActive && paused_since.is_some() {
                note("the source resumed: postcopy goes on");
                paused_since = None;
            }
            continue;
        }
        let since = *paused_since.get_or_insert_with(|| {
            note(&format!(
                "postcopy paused ({}): both QEMUs wait for the network",
                info.error_desc.as_deref().unwrap_or("the connection broke")
            ));
            std::time::Instant::now()
        });
        if since.elapsed() >= recovery.timeout {
            return Ok(IncomingOutcome {
                status,
                run_state: query_status(qmp).await?.status,
                error: Some(format!(
                    "postcopy still paused after {} s: the destination QEMU is left paused{} \
                     for the source's resume",
                    recovery.timeout.as_secs(),
                    if listening {
                        format!(", listening again at {}", recovery.target)
                    } else {
                        String::new()
                    }
                )),
                started: false,
            });
        }
        if !listening && retry_at.is_none_or(|at| std::time::Instant::now() >= at) {
            match listen_for_recovery(qmp, &recovery.target).await {
                Ok(()) => {
                    note(&format!(
                        "listening again at {} (migrate-recover) for the source's resume",
                        recovery.target
                    ));
                    listening = true;
                    retry_at = None;
                }
                // The state may have changed meanwhile (the next look tells), or QEMU cannot
                // listen there yet: tried again a little later.
                Err(err) => {
                    note(&format!(
                        "cannot listen again yet ({err:#}); trying again in {} s",
                        RELISTEN_AFTER.as_secs()
                    ));
                    retry_at = Some(std::time::Instant::now() + RELISTEN_AFTER);
                }
            }
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
