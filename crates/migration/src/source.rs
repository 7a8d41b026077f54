//! The source's job: check the VM, set the plan's capabilities and parameters, run `migrate`,
//! follow it to a truthful end, and leave the source as it was when it does not complete.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::probe;
use qmigrate_qmp::{
    Error as QmpError, Migrate, MigrateCancel, MigrateContinue, MigrateSetParameters,
    MigrateStartPostcopy, MigrationCapabilityStatus, MigrationParameters, MigrationStatus,
    MigrationTarget, Qmp, QueryMigrate, QueryMigrateCapabilities, QueryMigrateParameters, RunState,
    Stop,
};
use tracing::{debug, warn};

use crate::fit::{fit_capabilities, fit_parameters, set_capabilities};
use crate::monitor::connect_qmp;
use crate::monitor::{qemu_version, query_migrate, query_status, status_of};
use crate::outcome::{Outcome, Progress, Snapshot, Summary};
use crate::plan::cap;
use crate::watch::{Action, Watch, WatchPolicy};
use crate::{direct, Direction, Error, ErrorKind, MigrationPlan, Mode, QemuTarget, POLL_INTERVAL};

/// How long a cancelled migration may take to reach `cancelled` before we stop waiting.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// How long QEMU may take to restart the source VM itself after a failed or cancelled
/// migration, before we send `cont`.
const RESUME_GRACE: Duration = Duration::from_secs(3);

/// What the source VM was doing before the migration, recorded by [`preflight_source`].
#[derive(Debug, Clone)]
pub struct SourceState {
    /// Whether the guest was running (rather than paused): only then may we `cont` it after a
    /// migration that did not complete.
    pub was_running: bool,
    /// The QEMU version, for messages.
    pub qemu: String,
}

/// Checks that the source VM can be migrated now: running or paused, no migration underway.
pub async fn preflight_source(qmp: &Qmp) -> crate::Result<SourceState> {
    let v = &qmp.greeting().version.qemu;
    let qemu = format!("{}.{}.{}", v.major, v.minor, v.micro);
    let status = query_status(qmp).await?;
    match status.status {
        RunState::Running | RunState::Paused => {}
        RunState::Postmigrate => bail!(
            "the source VM has already been migrated away or saved (state postmigrate); its \
             guest now runs on the destination, or waits in the saved state to be restored"
        ),
        RunState::InMigrate => bail!(
            "this QEMU is waiting for an incoming migration (state inmigrate): it is a \
             destination, use `qmigrate receive` on it"
        ),
        ref other => bail!(
            "the source VM must be running or paused to migrate, but its state is {}",
            other
        ),
    }
    let migration = status_of(&query_migrate(qmp).await?);
    if is_underway(&migration) {
        bail!(
            "a migration is already underway on the source QEMU (status {})",
            migration
        );
    }
    Ok(SourceState {
        was_running: status.running,
        qemu,
    })
}

/// Connects to the source QEMU's QMP and checks that it can be migrated now
/// ([`preflight_source`]); on the direct data path, hands it the tunnel connection `fd`
/// ([`direct::DIRECT_FD`]), which this monitor connection then holds.
pub async fn connect_source(
    qmp: &str,
    plan: &MigrationPlan,
    pass_fd: Option<&OwnedFd>,
) -> crate::Result<(Qmp, SourceState)> {
    let qmp = connect_qmp(qmp).await?;
    let source = preflight_source(&qmp).await?;
    debug!(qemu = %source.qemu, running = source.was_running, plan = %plan.describe(), "source checked");
    if let Some(fd) = pass_fd {
        direct::hand_to_qemu(&qmp, fd, "source").await?;
    }
    Ok((qmp, source))
}

/// How the source's outcome ends the command: Ok for a completed (or detached) migration, an
/// error of the matching [`ErrorKind`] otherwise, saying what became of the source VM.
pub fn outcome_result(outcome: &Outcome, source: &SourceState) -> crate::Result<()> {
    match outcome {
        Outcome::Completed | Outcome::Detached(_) => Ok(()),
        Outcome::Failed(reason) => Err(Error::new(ErrorKind::Failed, anyhow!("{reason}"))),
        Outcome::Cancelled(reason) => Err(Error::new(
            ErrorKind::Cancelled,
            anyhow!("{reason}; {}", left_as(source)),
        )),
        Outcome::PostcopyPaused(reason) => Err(Error::new(
            ErrorKind::Failed,
            PostcopyPaused(reason.clone()),
        )),
    }
}

/// A postcopy migration left paused: the front end says how to recover it.
#[derive(Debug, thiserror::Error)]
#[error(
    "postcopy paused: {0}; the guest's memory is split between both hosts, so neither can run \
     it alone: both QEMUs are left paused (not killed) for a recovery (QMP migrate-recover on \
     the destination, then migrate with resume: true on the source)"
)]
pub struct PostcopyPaused(pub String);

/// What became of the source VM after a migration that did not complete.
fn left_as(source: &SourceState) -> &'static str {
    if source.was_running {
        "the source VM is running"
    } else {
        "the source VM stays paused as it was"
    }
}

fn is_underway(status: &MigrationStatus) -> bool {
    !matches!(
        status,
        MigrationStatus::None
            | MigrationStatus::Completed
            | MigrationStatus::Failed
            | MigrationStatus::Cancelled
    )
}

/// How [`run_migration`] should follow the migration.
#[derive(Debug, Clone, Default)]
pub struct FollowOptions {
    /// With postcopy: switch after this many completed precopy passes (0: at once).
    pub postcopy_after: Option<u64>,
    /// Return as soon as QEMU reports `setup`/`active`, without following.
    pub detach: bool,
    /// What to do about a migration that does not converge or does not move; its `postcopy`
    /// and `auto_converge` are taken from the plan.
    pub watch: WatchPolicy,
    /// The disk mirrors of `--copy-storage` (the plan then has `pause_before_switchover`):
    /// completed at `pre-switchover` before the migration goes on, and their progress
    /// reported with each look at the migration.
    pub storage: Option<std::sync::Arc<crate::storage::Mirrors>>,
}

/// Runs a migration on the source whose state [`preflight_source`] checked: sets the plan's
/// capabilities and parameters, starts `migrate`, follows it by events and `query-migrate`
/// (reporting to `progress`) and returns how it ended.
///
/// When `cancel` resolves (with the reason, e.g. `interrupted by SIGINT`) the migration is
/// cancelled. Whenever it does not complete, the source VM is left running if it was running
/// before (QEMU restarts it itself; we `cont` only if it did not). The capabilities changed here
/// are restored afterwards, except with `detach` (the migration still needs them).
///
/// A save ([`MigrationPlan::is_save`]) pauses a running guest before `migrate` (except in
/// cpr-reboot mode, where QEMU does) and leaves it paused (`postmigrate`) once completed; a
/// save that does not complete resumes it. Writing the state file safely is the caller's job
/// (see [`crate::statefile::Partial`]).
pub async fn run_migration(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &QemuTarget,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    cancel: impl Future<Output = String>,
) -> crate::Result<Summary> {
    let qemu = qemu_version(qmp);
    let before = qmp
        .execute(&QueryMigrateCapabilities)
        .await
        .context("query-migrate-capabilities failed")?;
    let wanted = fit_capabilities(plan.source_capabilities(), &before, &qemu)?;
    let restore: Vec<MigrationCapabilityStatus> = wanted
        .iter()
        .filter_map(|want| {
            let was = before
                .iter()
                .find(|c| c.capability == want.capability)
                .is_some_and(|c| c.state);
            (was != want.state).then(|| cap(want.capability, was))
        })
        .collect();
    let before_params = qmp
        .execute(&QueryMigrateParameters)
        .await
        .context("query-migrate-parameters failed")?;
    let params = fit_parameters(plan.source_parameters(), &before_params, &qemu)?;
    let restore_params = parameters_to_restore(&params, &before_params);
    let target = qemu_target(qmp, endpoint).await?;
    set_capabilities(qmp, wanted).await?;
    let set_params = qmp
        .execute(&params)
        .await
        .context("QEMU refused the migration parameters");
    if let Err(err) = set_params {
        restore_settings(qmp, restore, restore_params).await;
        return Err(err.into());
    }

    // A state saved while the guest runs is only consistent at QEMU's final pass, and every
    // page the guest dirties meanwhile is written again; paused, each page is written once. In
    // cpr-reboot mode QEMU pauses the guest at once itself, and records that it was running,
    // so that the restored guest resumes.
    let pause = plan.is_save() && plan.mode != Mode::CprReboot && source.was_running;
    if pause {
        if let Err(err) = qmp.execute(&Stop).await {
            restore_settings(qmp, restore, restore_params).await;
            return Err(anyhow!(err)
                .context("cannot pause the guest for the save (stop failed)")
                .into());
        }
        progress.note("guest paused for the save");
    }
    // QEMU restarts a guest that was running when a migration fails by itself; one we paused
    // is ours to restart, at once.
    let resume_grace = if pause { Duration::ZERO } else { RESUME_GRACE };
    let result = migrate_and_follow(
        qmp,
        plan,
        endpoint,
        Start::Migrate(target),
        source,
        opts,
        progress,
        resume_grace,
        cancel,
    )
    .await;
    if pause && result.is_err() {
        if let Err(err) = ensure_source_running(qmp, source, progress, resume_grace).await {
            warn!("after the failed save: {err:#}");
        }
    }

    if matches!(
        result,
        Ok(Summary {
            outcome: Outcome::Detached(_) | Outcome::PostcopyPaused(_),
            ..
        })
    ) {
        // QEMU refuses capability changes while a migration is underway, and this one is.
        return result.map_err(Error::from);
    }
    restore_settings(qmp, restore, restore_params).await;
    result.map_err(Error::from)
}

/// For each parameter that `set` changes, its value in `before`: what to set back afterwards so
/// that the source's settings are as we found them (as libvirt does).
pub(crate) fn parameters_to_restore(
    set: &MigrateSetParameters,
    before: &MigrationParameters,
) -> MigrateSetParameters {
    MigrateSetParameters {
        max_bandwidth: set.max_bandwidth.and(before.max_bandwidth),
        downtime_limit: set.downtime_limit.and(before.downtime_limit),
        multifd_channels: set.multifd_channels.and(before.multifd_channels),
        multifd_compression: set.multifd_compression.and(before.multifd_compression),
        max_postcopy_bandwidth: set
            .max_postcopy_bandwidth
            .and(before.max_postcopy_bandwidth),
        mode: set.mode.and(before.mode),
        direct_io: set.direct_io.and(before.direct_io),
        ..MigrateSetParameters::default()
    }
}

/// Sets back the capabilities and parameters we changed; a failure is only worth a warning,
/// the migration's outcome is what the caller reports.
async fn restore_settings(
    qmp: &Qmp,
    capabilities: Vec<MigrationCapabilityStatus>,
    params: MigrateSetParameters,
) {
    wait_for_cleanup(qmp).await;
    if let Err(err) = set_capabilities(qmp, capabilities).await {
        warn!("could not restore the source's migration capabilities: {err:#}");
    }
    if params != MigrateSetParameters::default() {
        if let Err(err) = qmp.execute(&params).await {
            warn!("could not restore the source's migration parameters: {err}");
        }
    }
}

/// Waits (at most 5 s) until QEMU has torn the finished migration down.
///
/// QEMU reports `completed` before its cleanup has run, and that cleanup reads the
/// capabilities: with `multifd` switched off under it, QEMU 10 skips closing the multifd
/// channels and then aborts on a yank assertion, killing the source VM (seen here about one
/// multifd migration in three). The migration's yank instance is the last thing the cleanup
/// removes, so its absence from `query-yank` tells it is over.
async fn wait_for_cleanup(qmp: &Qmp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match qmp.execute(&qmigrate_qmp::QueryYank).await {
            Ok(instances) if instances.iter().all(|i| i.kind != "migration") => return,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(_) => {
                warn!("QEMU has not finished cleaning up the migration after 5 s");
                return;
            }
            Err(err) => {
                debug!(%err, "query-yank failed; restoring the settings without waiting");
                return;
            }
        }
    }
}

/// Resumes a postcopy migration that [`run_migration`] left `postcopy-paused` (its
/// [`Outcome::PostcopyPaused`]), once the destination listens again (`migrate-recover`): sends
/// `migrate` with `resume` to `endpoint` and follows the migration as [`run_migration`] does.
/// A resume that cannot connect ends `postcopy-paused` again, and may be retried.
///
/// The capabilities the migration set stay set (the source's settings are not restored after
/// a recovered migration).
pub async fn resume_migration(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &QemuTarget,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    cancel: impl Future<Output = String>,
) -> crate::Result<Summary> {
    let target = qemu_target(qmp, endpoint).await?;
    let summary = migrate_and_follow(
        qmp,
        plan,
        endpoint,
        Start::Resume(target),
        source,
        opts,
        progress,
        RESUME_GRACE,
        cancel,
    )
    .await?;
    Ok(summary)
}

/// Checks that this source QEMU has a postcopy migration paused to resume (a usage error
/// otherwise: there is nothing to recover).
pub async fn check_paused(qmp: &Qmp) -> crate::Result<()> {
    let status = status_of(&query_migrate(qmp).await?);
    if status != MigrationStatus::PostcopyPaused {
        return Err(Error::new(
            ErrorKind::Usage,
            anyhow!(
                "there is no paused postcopy migration on the source QEMU (its migration status \
                 is {status}): nothing to recover"
            ),
        ));
    }
    Ok(())
}

/// The migration target QEMU understands for `endpoint` (its `channels` or the legacy `uri`).
async fn qemu_target(qmp: &Qmp, endpoint: &QemuTarget) -> crate::Result<MigrationTarget> {
    let support = probe::migration_support(qmp)
        .await
        .context("cannot ask QEMU which migration arguments it supports")?;
    endpoint.target_for(qmp, &support, Direction::Outgoing)
}

/// Resumes, from a new process, the postcopy migration this source QEMU was left paused in
/// (`qmigrate recover`): checks that it is `postcopy-paused`, then [`resume_migration`] to
/// `endpoint` with default follow options, again with backoff while the resume ends paused
/// (the network not back yet), for up to `retry_for` ([`keep_resuming`]). Returns the summary
/// and the source's state for [`outcome_result`].
pub async fn resume_paused(
    qmp: &Qmp,
    endpoint: &QemuTarget,
    retry_for: Duration,
    progress: &mut dyn Progress,
    cancel: impl Future<Output = String>,
) -> crate::Result<(Summary, SourceState)> {
    check_paused(qmp).await?;
    let state = SourceState {
        was_running: false,
        qemu: qemu_version(qmp),
    };
    let plan = MigrationPlan {
        postcopy: true,
        ..MigrationPlan::default()
    };
    let paused = Summary::from_info(
        &qmigrate_qmp::MigrationInfo::default(),
        Outcome::PostcopyPaused("paused before this recovery".into()),
        true,
    );
    let mut cancel = Latch::new(cancel);
    let summary = keep_resuming(
        qmp,
        &plan,
        endpoint,
        &state,
        &FollowOptions::default(),
        paused,
        retry_for,
        progress,
        &mut cancel,
    )
    .await?;
    Ok((summary, state))
}

/// Whether this source QEMU may be asked to resume before anyone knows the destination
/// listens: from 9.1 a resume that cannot get through ends `postcopy-paused` again (through
/// `postcopy-recover-setup`) and can be retried. Older ones (7.2 here) stay in
/// `postcopy-recover` for good when the connection fails during the resume handshake, out of
/// reach of every QMP command, so they must only be resumed once the network is back.
pub fn can_retry_resume(qmp: &Qmp) -> bool {
    let v = &qmp.greeting().version.qemu;
    (v.major, v.minor) >= (9, 1)
}

/// First wait between two resumes that ended paused; doubled after each, up to
/// [`RESUME_BACKOFF_MAX`].
const RESUME_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const RESUME_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// While `summary` is a postcopy migration left paused ([`Outcome::PostcopyPaused`]): resumes
/// it to `endpoint` ([`resume_migration`]), at once and then with backoff (1 s doubling to
/// 30 s) while the resume ends paused again (the network is not back, or the destination does
/// not listen yet), for up to `retry_for` from the first attempt. Returns the last summary:
/// completed, failed, or still paused once `retry_for` is over or `cancel` resolved (both
/// QEMUs are then left paused; postcopy is never cancelled).
///
/// The source VM is never restarted here, whatever `source` says: after the switch to
/// postcopy the guest runs on the destination.
#[allow(clippy::too_many_arguments)] // a resume needs what the migration had
pub async fn keep_resuming<F: Future<Output = String>>(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &QemuTarget,
    source: &SourceState,
    opts: &FollowOptions,
    mut summary: Summary,
    retry_for: Duration,
    progress: &mut dyn Progress,
    cancel: &mut Latch<F>,
) -> crate::Result<Summary> {
    let source = SourceState {
        was_running: false,
        ..source.clone()
    };
    let deadline = Instant::now() + retry_for;
    let mut backoff = RESUME_BACKOFF_FIRST;
    while let Outcome::PostcopyPaused(_) = &summary.outcome {
        summary =
            resume_migration(qmp, plan, endpoint, &source, opts, progress, cancel.wait()).await?;
        let Outcome::PostcopyPaused(reason) = &summary.outcome else {
            break;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let wait = backoff.min(left);
        progress.note(&format!(
            "the resume did not get through ({reason}); trying again in {} s",
            wait.as_secs().max(1)
        ));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            reason = cancel.wait() => {
                progress.note(&format!("{reason}: the recovery stops; both QEMUs stay paused"));
                break;
            }
        }
        backoff = (backoff * 2).min(RESUME_BACKOFF_MAX);
    }
    Ok(summary)
}

/// A cancellation future that can be awaited again after it resolved (it then gives the same
/// reason at once): the source job is followed more than once when postcopy is recovered, and
/// a migration with disks awaits it in the disk phase and again in the RAM phase.
pub struct Latch<F> {
    fut: std::pin::Pin<Box<F>>,
    reason: Option<String>,
}

impl<F> std::fmt::Debug for Latch<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latch")
            .field("reason", &self.reason)
            .finish()
    }
}

impl<F: Future<Output = String>> Latch<F> {
    /// Wraps `fut`.
    pub fn new(fut: F) -> Self {
        Latch {
            fut: Box::pin(fut),
            reason: None,
        }
    }

    /// `fut`'s reason, once it resolved (at once if it already did).
    pub async fn wait(&mut self) -> String {
        if let Some(reason) = &self.reason {
            return reason.clone();
        }
        let reason = self.fut.as_mut().await;
        self.reason = Some(reason.clone());
        reason
    }
}

/// How [`migrate_and_follow`] starts.
enum Start {
    /// A new migration.
    Migrate(MigrationTarget),
    /// The resume of a paused postcopy migration.
    Resume(MigrationTarget),
}

/// How long a resume's handshake (`postcopy-recover-setup`, `postcopy-recover`) may take. It
/// is a few messages each way plus the destination's received-pages bitmap (32 MiB for 1 TiB
/// of guest RAM), so seconds even on a slow link; but a connection that failed under it
/// leaves QEMU before 9.1 there for good, and nothing would end the wait.
const RECOVER_HANDSHAKE_LIMIT: Duration = Duration::from_secs(300);

/// How long a resumed migration may still report `postcopy-paused` before that counts as the
/// resume having failed (QEMU before 9.1 leaves the state only once its thread runs).
const RESUME_START: Duration = Duration::from_secs(3);

#[allow(clippy::too_many_arguments)] // the callers pass their own arguments on
async fn migrate_and_follow(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &QemuTarget,
    start: Start,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    resume_grace: Duration,
    cancel: impl Future<Output = String>,
) -> anyhow::Result<Summary> {
    let mut events = qmp.events();
    let started = Instant::now();
    let resuming = matches!(start, Start::Resume(_));
    match start {
        Start::Migrate(target) => qmp
            .execute(&Migrate::new(target))
            .await
            .with_context(|| format!("QEMU refused to start the migration to {endpoint}"))?,
        Start::Resume(target) => qmp
            .execute(&Migrate::new(target).resume(true))
            .await
            .with_context(|| format!("QEMU refused to resume the migration to {endpoint}"))?,
    };
    debug!(%endpoint, plan = %plan.describe(), resuming, "migration started");
    // Until QEMU has left `postcopy-paused` after a resume, that state is the old one.
    let mut left_pause = !resuming;

    let mut cancel = pin!(cancel);
    let mut cancelling = Cancelling::No;
    let mut watch = Watch::new(WatchPolicy {
        postcopy: plan.postcopy,
        auto_converge: plan.auto_converge,
        ..opts.watch.clone()
    });
    let mut postcopy_requested = resuming;
    let mut last_status = MigrationStatus::None;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut events_alive = true;
    // QEMU drops the RAM statistics once a migration is cancelled or failed; the summary uses
    // the last ones it reported.
    let mut last_ram = None;
    let mut switched_over = false;
    // Since when QEMU sits in a resume's handshake (`postcopy-recover(-setup)`).
    let mut recovering_since: Option<Instant> = None;

    let mut info = loop {
        tokio::select! {
            reason = &mut cancel, if cancelling == Cancelling::No => {
                cancelling = cancel_migration(qmp, &last_status, reason, false, progress).await;
            }
            event = events.recv(), if events_alive => match event {
                Ok(event) => debug!(event = %event.event, data = %event.data, "QMP event"),
                Err(QmpError::Disconnected) => events_alive = false,
                Err(err) => debug!("event stream: {err}"),
            },
            _ = poll.tick() => {}
        }
        let info = match qmp.execute(&QueryMigrate).await {
            Ok(info) => info,
            Err(QmpError::Disconnected) => {
                bail!("the source QEMU closed its QMP socket during the migration (did it exit?)")
            }
            Err(err) => return Err(anyhow!(err).context("query-migrate failed")),
        };
        let status = status_of(&info);
        if status != last_status {
            debug!(status = %status, "migration status");
            last_status = status;
        }
        if status == MigrationStatus::PreSwitchover && !switched_over {
            // The vCPUs are stopped and the source's images still active: finish the disk
            // copies now, so that the destination's images are this moment's.
            switched_over = true;
            let disks = match &opts.storage {
                Some(mirrors) if cancelling == Cancelling::No => mirrors.complete(qmp).await,
                _ => Ok(()),
            };
            match disks {
                Ok(()) => {
                    qmp.execute(&MigrateContinue {
                        state: "pre-switchover".into(),
                    })
                    .await
                    .context("migrate-continue failed")?;
                }
                Err(err) => {
                    cancelling =
                        cancel_migration(qmp, &status, format!("{err:#}"), true, progress).await;
                }
            }
        }
        let mut snapshot = Snapshot::new(&info, started.elapsed());
        if let Some(mirrors) = &opts.storage {
            snapshot.disks = mirrors.progress(qmp).await;
        }
        let action = watch.observe(&mut snapshot);
        progress.tick(&snapshot);
        match action {
            Action::Continue => {}
            Action::Note(message) => progress.note(&message),
            Action::StartPostcopy(message) => {
                if !postcopy_requested && cancelling == Cancelling::No {
                    progress.note(&message);
                    qmp.execute(&MigrateStartPostcopy)
                        .await
                        .context("migrate-start-postcopy failed")?;
                    postcopy_requested = true;
                }
            }
            Action::Cancel(reason) => {
                if cancelling == Cancelling::No {
                    cancelling = cancel_migration(qmp, &status, reason, true, progress).await;
                }
            }
        }
        if info.ram.is_some() {
            last_ram.clone_from(&info.ram);
        }

        if opts.detach && !status.is_terminal() {
            return Ok(Summary::from_info(&info, Outcome::Detached(status), false));
        }
        if let (Some(after), false, MigrationStatus::Active, Cancelling::No) = (
            opts.postcopy_after,
            postcopy_requested,
            &status,
            &cancelling,
        ) {
            let passes = info
                .ram
                .as_ref()
                .and_then(|ram| ram.dirty_sync_count)
                .unwrap_or(0);
            // QEMU counts the bitmap sync that starts pass N+1 as "pass N+1", so N passes are
            // complete once the count exceeds N (libvirt switches at the same point).
            if plan.postcopy && passes > after {
                progress.note(&format!(
                    "switching to postcopy after {} precopy pass(es)",
                    passes.saturating_sub(1)
                ));
                qmp.execute(&MigrateStartPostcopy)
                    .await
                    .context("migrate-start-postcopy failed")?;
                postcopy_requested = true;
            }
        }
        if status != MigrationStatus::PostcopyPaused {
            left_pause = true;
        }
        if matches!(
            status,
            MigrationStatus::PostcopyRecover | MigrationStatus::PostcopyRecoverSetup
        ) {
            let since = *recovering_since.get_or_insert_with(Instant::now);
            if since.elapsed() > RECOVER_HANDSHAKE_LIMIT {
                let v = &qmp.greeting().version.qemu;
                bail!(
                    "the source QEMU has been in {status} for {} s: the resume's handshake with \
                     the destination did not finish (its connection failed or the destination \
                     does not answer). QEMU {}.{} cannot leave that state by itself (9.1 and \
                     later go back to postcopy-paused); both QEMUs stay paused",
                    RECOVER_HANDSHAKE_LIMIT.as_secs(),
                    v.major,
                    v.minor
                );
            }
        } else {
            recovering_since = None;
        }
        if status == MigrationStatus::PostcopyPaused
            && (left_pause || started.elapsed() > RESUME_START)
        {
            let reason = info
                .error_desc
                .clone()
                .unwrap_or_else(|| "the connection broke during postcopy".to_owned());
            return Ok(Summary::from_info(
                &info,
                Outcome::PostcopyPaused(reason),
                postcopy_requested,
            ));
        }
        if status.is_terminal() {
            break info;
        }
        if let Cancelling::Requested { deadline, .. } = &cancelling {
            if Instant::now() > *deadline {
                bail!(
                    "QEMU did not cancel the migration within {}s (status {})",
                    CANCEL_GRACE.as_secs(),
                    status
                );
            }
        }
    };

    if info.ram.is_none() {
        info.ram = last_ram;
    }
    if info.total_time.is_none() {
        info.total_time = u64::try_from(started.elapsed().as_millis()).ok();
    }
    let status = status_of(&info);
    let error = info
        .error_desc
        .clone()
        .unwrap_or_else(|| format!("QEMU reports {}", status));
    let outcome = match (status, cancelling) {
        (MigrationStatus::Completed, _) => Outcome::Completed,
        // The policy gave up on it: a failure to migrate, not an operator's cancel.
        (
            MigrationStatus::Cancelled,
            Cancelling::Requested {
                reason,
                failure: true,
                ..
            },
        ) => Outcome::Failed(format!("{reason}; cancelled, {}", left_as(source))),
        (
            _,
            Cancelling::Requested {
                reason,
                failure: true,
                ..
            },
        ) => Outcome::Failed(format!(
            "{reason}; cancelled (QEMU ended it as {status}: {error}), {}",
            left_as(source)
        )),
        (MigrationStatus::Cancelled, Cancelling::Requested { reason, .. }) => {
            Outcome::Cancelled(reason)
        }
        (MigrationStatus::Cancelled, _) => {
            Outcome::Cancelled("cancelled by another QMP client".to_owned())
        }
        // Cancelling tears the connection down; with the return path QEMU sometimes sees that
        // error first and ends the migration as failed. It still ended because we asked.
        (_, Cancelling::Requested { reason, .. }) => {
            Outcome::Cancelled(format!("{reason} (QEMU ended it as failed: {error})"))
        }
        _ => Outcome::Failed(error),
    };
    if outcome != Outcome::Completed {
        ensure_source_running(qmp, source, progress, resume_grace).await?;
    }
    Ok(Summary::from_info(&info, outcome, postcopy_requested))
}

/// Where a cancellation request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cancelling {
    /// Nobody asked.
    No,
    /// `migrate_cancel` was sent for this reason; QEMU should reach `cancelled` by `deadline`.
    /// A `failure` is the policy's (the migration could not end), not a request.
    Requested {
        reason: String,
        deadline: Instant,
        failure: bool,
    },
    /// It was asked for during postcopy, where there is nothing left to cancel to.
    Refused,
}

/// Sends `migrate_cancel`, except in postcopy: the guest already runs on the destination there
/// and the source has no complete state to fall back to.
async fn cancel_migration(
    qmp: &Qmp,
    status: &MigrationStatus,
    reason: String,
    failure: bool,
    progress: &mut dyn Progress,
) -> Cancelling {
    if *status == MigrationStatus::PostcopyActive {
        progress.note(&format!(
            "{reason}: postcopy cannot be cancelled (the guest already runs on the destination); \
             waiting for it to complete"
        ));
        return Cancelling::Refused;
    }
    if matches!(
        status,
        MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecoverSetup
            | MigrationStatus::PostcopyRecover
    ) {
        // A resume under way: cancelling would throw away the guest's memory still here.
        progress.note(&format!(
            "{reason}: postcopy cannot be cancelled; the resume under way is followed until it \
             completes or pauses again"
        ));
        return Cancelling::Refused;
    }
    progress.note(&format!("{reason}: cancelling the migration"));
    if let Err(err) = qmp.execute(&MigrateCancel).await {
        // Most likely the migration ended in the meantime; the loop sees how.
        warn!("migrate_cancel failed: {err}");
    }
    Cancelling::Requested {
        reason,
        deadline: Instant::now() + CANCEL_GRACE,
        failure,
    }
}

/// After a migration that did not complete: makes sure a source VM that was running before
/// runs again. QEMU restarts it by itself once its migration thread has cleaned up, so we give
/// it `grace` ([`RESUME_GRACE`], or nothing for a guest we paused) and only then `cont`.
async fn ensure_source_running(
    qmp: &Qmp,
    source: &SourceState,
    progress: &mut dyn Progress,
    grace: Duration,
) -> anyhow::Result<()> {
    if !source.was_running {
        return Ok(());
    }
    let deadline = Instant::now() + grace;
    loop {
        let status = query_status(qmp).await?;
        if status.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if grace.is_zero() {
                progress.note("resuming the guest, paused for the save");
            } else {
                progress.note(&format!(
                    "the source VM is {} after the migration stopped; resuming it",
                    status.status
                ));
            }
            qmp.execute(&qmigrate_qmp::Cont)
                .await
                .context("could not resume the source VM (cont failed)")?;
            let status = query_status(qmp).await?;
            if !status.running {
                bail!("the source VM is still {} after cont", status.status);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resumes a source guest that was running before a save whose state file turned out unusable
/// although QEMU completed it (the guest is then in `postmigrate`).
pub async fn resume_source(
    qmp: &Qmp,
    source: &SourceState,
    progress: &mut dyn Progress,
) -> crate::Result<()> {
    Ok(ensure_source_running(qmp, source, progress, Duration::ZERO).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmigrate_qmp::MultiFdCompression;

    #[test]
    fn only_changed_parameters_are_restored() {
        let plan = MigrationPlan {
            multifd: Some(4),
            ..Default::default()
        };
        let before = MigrationParameters {
            max_bandwidth: Some(134_217_728),
            downtime_limit: Some(300),
            multifd_channels: Some(2),
            multifd_compression: Some(MultiFdCompression::None),
            max_postcopy_bandwidth: Some(0),
            ..Default::default()
        };
        let restore = parameters_to_restore(&plan.source_parameters(), &before);
        assert_eq!(restore.max_bandwidth, Some(134_217_728));
        assert_eq!(restore.multifd_channels, Some(2));
        assert_eq!(restore.multifd_compression, Some(MultiFdCompression::None));
        assert_eq!(restore.downtime_limit, None);
        assert_eq!(restore.max_postcopy_bandwidth, None);
    }
}
