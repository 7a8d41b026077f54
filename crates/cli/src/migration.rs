//! What both ends of a migration must agree on, and the two jobs built on it: preparing the
//! destination ([`prepare_incoming`]) and running the migration on the source
//! ([`run_migration`]).
//!
//! Kept apart from the subcommands so that other front ends (a tunnel server told over its
//! control channel to receive, a one-shot `migrate` command) can do the same jobs with the same
//! checks: these functions take a connected [`Qmp`] and report through [`Progress`], they never
//! print or exit.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use qmigrate_qmp::{
    probe, ConnectOptions, Error as QmpError, Migrate, MigrateCancel, MigrateIncoming,
    MigrateSetCapabilities, MigrateSetParameters, MigrateStartPostcopy, MigrationAddress,
    MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters,
    MigrationStatus, MigrationTarget, MultiFdCompression, Qmp, QmpTarget, QueryMigrate,
    QueryMigrateCapabilities, QueryMigrateParameters, QueryStatus, RunState, SocketAddress,
    StatusInfo,
};
use tracing::{debug, info, warn};

use crate::exit::Exit;
use crate::progress::{Progress, Snapshot, Summary};

/// Effectively no limit: QEMU's own default (128 MiB/s) throttles every migration on a fast
/// link, and 1 TiB/s is well inside what every QEMU accepts for `max-bandwidth`.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// How long a cancelled migration may take to reach `cancelled` before we stop waiting.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// How long QEMU may take to restart the source VM itself after a failed or cancelled
/// migration, before we send `cont`.
const RESUME_GRACE: Duration = Duration::from_secs(3);

/// How often the migration is polled with `query-migrate`; events wake us up in between.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Compression of multifd channels; both ends must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// No compression (QEMU's default).
    None,
    /// Slow, small.
    Zlib,
    /// Faster than zlib; the better choice when the link is the bottleneck.
    Zstd,
}

impl Compression {
    /// The `multifd-compression` value.
    pub fn qapi(self) -> MultiFdCompression {
        match self {
            Compression::None => MultiFdCompression::None,
            Compression::Zlib => MultiFdCompression::Zlib,
            Compression::Zstd => MultiFdCompression::Zstd,
        }
    }

    /// QEMU's name for it in `multifd-compression`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The capabilities and parameters of one migration, as chosen on the command line.
///
/// The part that must match on both sides (multifd and its channel count, compression,
/// postcopy) is set by both [`prepare_incoming`] and [`run_migration`]; the rest only matters to
/// the source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationPlan {
    /// Number of multifd channels, or `None` for the single-stream migration.
    pub multifd: Option<u32>,
    /// Compression of the multifd channels (needs `multifd`).
    pub compression: Option<Compression>,
    /// Enable postcopy (`postcopy-ram`).
    pub postcopy: bool,
    /// Source only: throttle the guest's CPUs when the migration does not converge.
    pub auto_converge: bool,
    /// Source only: `max-bandwidth` in bytes per second; `None` means [`UNLIMITED_BANDWIDTH`].
    pub max_bandwidth: Option<u64>,
    /// Source only: `downtime-limit` in milliseconds; `None` keeps QEMU's (300 ms).
    pub downtime_limit: Option<u64>,
}

/// A combination of flags that cannot work; reported as a usage error before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--multifd 0` or more than QEMU's 255 channels.
    #[error("--multifd must be between 1 and 255, not {0}")]
    MultifdChannels(u32),
    /// Compression only exists for multifd channels.
    #[error("--compress needs --multifd N: QEMU compresses multifd channels only")]
    CompressionWithoutMultifd,
    /// QEMU rejects a downtime limit above 2000 s.
    #[error("--downtime-limit must be between 0 and 2000000 ms, not {0}")]
    DowntimeLimit(u64),
}

impl MigrationPlan {
    /// Checks that the flags make sense together, before QEMU is touched.
    pub fn validate(&self) -> Result<(), PlanError> {
        if let Some(n) = self.multifd {
            if !(1..=255).contains(&n) {
                return Err(PlanError::MultifdChannels(n));
            }
        }
        if self.compression.is_some_and(|c| c != Compression::None) && self.multifd.is_none() {
            return Err(PlanError::CompressionWithoutMultifd);
        }
        if let Some(ms) = self.downtime_limit {
            if ms > 2_000_000 {
                return Err(PlanError::DowntimeLimit(ms));
            }
        }
        Ok(())
    }

    /// The capabilities that both QEMUs must agree on, set to exactly what this plan wants
    /// (so that a leftover from an earlier run cannot make the two sides disagree).
    fn shared_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        vec![
            cap(MigrationCapability::Events, true),
            cap(MigrationCapability::Multifd, self.multifd.is_some()),
            cap(MigrationCapability::PostcopyRam, self.postcopy),
            // The return path lets the destination tell the source how loading ended: with it
            // the source reports `completed` only after the destination has loaded everything
            // (not when the last byte left for the tunnel), and postcopy needs it for page
            // requests.
            cap(MigrationCapability::ReturnPath, true),
        ]
    }

    /// Capabilities for the destination QEMU.
    pub fn destination_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        self.shared_capabilities()
    }

    /// Capabilities for the source QEMU.
    pub fn source_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        let mut caps = self.shared_capabilities();
        caps.push(cap(MigrationCapability::AutoConverge, self.auto_converge));
        caps
    }

    /// Parameters for the destination QEMU: only what must match the source.
    pub fn destination_parameters(&self) -> MigrateSetParameters {
        let mut params = MigrateSetParameters::default();
        if let Some(n) = self.multifd {
            params.multifd_channels = Some(u64::from(n));
            params.multifd_compression = Some(self.compression.unwrap_or(Compression::None).qapi());
        }
        params
    }

    /// Parameters for the source QEMU.
    pub fn source_parameters(&self) -> MigrateSetParameters {
        let mut params = self.destination_parameters();
        params.max_bandwidth = Some(self.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH));
        params.downtime_limit = self.downtime_limit;
        if self.postcopy {
            // 0 is "unlimited" here (unlike max-bandwidth): once the guest runs on the
            // destination, every missing page stalls it.
            params.max_postcopy_bandwidth = Some(0);
        }
        params
    }

    /// A short description for messages: `multifd 4 (zstd), postcopy on`.
    pub fn describe(&self) -> String {
        let multifd = match (self.multifd, self.compression) {
            (None, _) => "single channel".to_owned(),
            (Some(n), None | Some(Compression::None)) => format!("multifd {n}"),
            (Some(n), Some(c)) => format!("multifd {n} ({})", c.qemu_name()),
        };
        let postcopy = if self.postcopy { "on" } else { "off" };
        format!("{multifd}, postcopy {postcopy}")
    }
}

fn cap(capability: MigrationCapability, state: bool) -> MigrationCapabilityStatus {
    MigrationCapabilityStatus { capability, state }
}

/// Where the migration stream goes: the tunnel's Unix socket, or any legacy QEMU URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket: QEMU listens on it (destination) or connects to it (source).
    Socket(PathBuf),
    /// A legacy migration URI (`tcp:HOST:PORT`, `unix:PATH`, `exec:CMD`, `file:PATH`, ...).
    Uri(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Socket(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Uri(uri) => f.write_str(uri),
        }
    }
}

impl Endpoint {
    /// The typed address, or `None` for a URI our parser does not know (which QEMU may still).
    fn address(&self) -> Option<MigrationAddress> {
        match self {
            Endpoint::Socket(path) => Some(MigrationAddress::Socket(SocketAddress::Unix {
                path: path.display().to_string(),
            })),
            Endpoint::Uri(uri) => match MigrationAddress::parse_uri(uri) {
                Ok(address) => Some(address),
                Err(err) => {
                    debug!(%uri, %err, "passing the URI to QEMU as is");
                    None
                }
            },
        }
    }

    /// The argument for `migrate`/`migrate-incoming`: the typed `channels` when this QEMU has
    /// them (8.2+), the `uri` string otherwise.
    pub async fn target(&self, qmp: &Qmp) -> anyhow::Result<MigrationTarget> {
        let use_channels = probe::supports_channels(qmp)
            .await
            .context("cannot ask QEMU whether it supports migration channels")?;
        debug!(use_channels, "migration argument style");
        Ok(match self.address() {
            Some(address) => MigrationTarget::from_address(address, use_channels),
            None => MigrationTarget::Uri(self.to_string()),
        })
    }
}

/// Connects to QEMU's QMP socket (a path, or `tcp:HOST:PORT`), with an operator-readable error
/// marked [`Exit::QmpUnreachable`] when there is no QEMU to talk to.
pub async fn connect_qmp(qmp: &str) -> anyhow::Result<Qmp> {
    let Ok(target) = qmp.parse::<QmpTarget>();
    if let QmpTarget::Unix(path) = &target {
        check_qmp_path(path).context(Exit::QmpUnreachable)?;
    }
    match Qmp::connect(&target, &ConnectOptions::default()).await {
        Ok(qmp) => {
            let v = &qmp.greeting().version.qemu;
            debug!(qemu = %format!("{}.{}.{}", v.major, v.minor, v.micro), "connected to QMP");
            Ok(qmp)
        }
        Err(err) if err.is_unreachable() => Err(anyhow!(err).context(Exit::QmpUnreachable)),
        Err(err) => Err(anyhow!(err).context(format!("QMP handshake on {qmp} failed"))),
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

/// Checks that a Unix socket we are about to hand to QEMU exists, so that a tunnel client
/// that is not running is reported by us and not as a connect error deep in QEMU.
pub fn check_migration_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "migration socket {shown} does not exist: start `qmigrate tunnel-client --socket {shown}` first"
        ),
        Err(err) => bail!("migration socket {shown}: {err}"),
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => bail!("migration socket {shown} is not a socket"),
    }
}

/// Sets capabilities, with a hint when this QEMU lacks one we need.
async fn set_capabilities(qmp: &Qmp, wanted: Vec<MigrationCapabilityStatus>) -> anyhow::Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = wanted
        .iter()
        .map(|c| format!("{:?}={}", c.capability, c.state))
        .collect();
    qmp.execute(&MigrateSetCapabilities {
        capabilities: wanted,
    })
    .await
    .with_context(|| format!("QEMU refused the capabilities {}", names.join(", ")))?;
    Ok(())
}

async fn query_status(qmp: &Qmp) -> anyhow::Result<StatusInfo> {
    qmp.execute(&QueryStatus)
        .await
        .context("query-status failed")
}

async fn query_migrate(qmp: &Qmp) -> anyhow::Result<MigrationInfo> {
    qmp.execute(&QueryMigrate)
        .await
        .context("query-migrate failed")
}

fn status_of(info: &MigrationInfo) -> MigrationStatus {
    info.status.unwrap_or(MigrationStatus::None)
}

/// What [`prepare_incoming`] set up.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Where QEMU listens, as the operator would write it.
    pub endpoint: String,
    /// Whether the typed `channels` argument was used (else the legacy `uri`).
    pub channels: bool,
}

/// Prepares a destination QEMU started with `-incoming defer`: checks its state, sets the
/// capabilities and parameters that must match the source, and makes it listen on `endpoint`.
///
/// Returns once QEMU listens. Fails (before changing anything) when QEMU is not waiting for an
/// incoming migration, saying how to start it instead.
pub async fn prepare_incoming(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &Endpoint,
) -> anyhow::Result<Incoming> {
    let status = query_status(qmp).await?;
    if status.status != RunState::InMigrate {
        bail!(
            "destination QEMU is not waiting for an incoming migration (its state is {}): \
             start it with -incoming defer and the same machine options as the source",
            run_state_name(&status.status)
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
            migration_status_name(&other)
        ),
    }

    set_capabilities(qmp, plan.destination_capabilities()).await?;
    let params = plan.destination_parameters();
    if params != MigrateSetParameters::default() {
        qmp.execute(&params)
            .await
            .context("QEMU refused the migration parameters")?;
    }

    let target = endpoint.target(qmp).await?;
    let channels = matches!(target, MigrationTarget::Channels(_));
    qmp.execute(&MigrateIncoming::new(target))
        .await
        .with_context(|| format!("migrate-incoming on {endpoint} failed"))?;
    let now = status_of(&query_migrate(qmp).await?);
    debug!(
        status = migration_status_name(&now),
        "after migrate-incoming"
    );
    Ok(Incoming {
        endpoint: endpoint.to_string(),
        channels,
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

/// Follows an incoming migration prepared by [`prepare_incoming`] to its end; with `start`,
/// sends `cont` afterwards when the destination VM is paused (QEMU started with `-S`).
///
/// A destination QEMU exits when an incoming migration fails (its default), so a lost QMP
/// connection is reported as that.
pub async fn follow_incoming(qmp: &Qmp, start: bool) -> anyhow::Result<IncomingOutcome> {
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
            Err(err) => return Err(anyhow!(err).context("query-migrate failed")),
        };
        let status = status_of(&info);
        if status != last {
            info!(
                status = migration_status_name(&status),
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
pub async fn preflight_source(qmp: &Qmp) -> anyhow::Result<SourceState> {
    let v = &qmp.greeting().version.qemu;
    let qemu = format!("{}.{}.{}", v.major, v.minor, v.micro);
    let status = query_status(qmp).await?;
    match status.status {
        RunState::Running | RunState::Paused => {}
        RunState::Postmigrate => bail!(
            "the source VM has already been migrated away (state postmigrate); its guest now \
             runs on the destination"
        ),
        RunState::InMigrate => bail!(
            "this QEMU is waiting for an incoming migration (state inmigrate): it is a \
             destination, use `qmigrate receive` on it"
        ),
        ref other => bail!(
            "the source VM must be running or paused to migrate, but its state is {}",
            run_state_name(other)
        ),
    }
    let migration = status_of(&query_migrate(qmp).await?);
    if is_underway(&migration) {
        bail!(
            "a migration is already underway on the source QEMU (status {})",
            migration_status_name(&migration)
        );
    }
    Ok(SourceState {
        was_running: status.running,
        qemu,
    })
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
}

/// How a migration ended on the source.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// QEMU reported `completed`: the guest runs on the destination.
    Completed,
    /// QEMU reported `failed`, with its `error-desc`.
    Failed(String),
    /// We cancelled it (signal, timeout, caller); the reason.
    Cancelled(String),
    /// The connection broke during postcopy: QEMU waits for a recovery (`migrate` with
    /// `resume`), the guest's state is split between the hosts and neither side can run alone.
    PostcopyPaused(String),
    /// `detach`: the migration was started and left running, in this status.
    Detached(MigrationStatus),
}

/// Runs a migration on the source whose state [`preflight_source`] checked: sets the plan's
/// capabilities and parameters, starts `migrate`, follows it by events and `query-migrate`
/// (reporting to `progress`) and returns how it ended.
///
/// When `cancel` resolves (with the reason, e.g. `interrupted by SIGINT`) the migration is
/// cancelled. Whenever it does not complete, the source VM is left running if it was running
/// before (QEMU restarts it itself; we `cont` only if it did not). The capabilities changed here
/// are restored afterwards, except with `detach` (the migration still needs them).
pub async fn run_migration(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &Endpoint,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    cancel: impl Future<Output = String>,
) -> anyhow::Result<Summary> {
    let before = qmp
        .execute(&QueryMigrateCapabilities)
        .await
        .context("query-migrate-capabilities failed")?;
    let wanted = plan.source_capabilities();
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
    let params = plan.source_parameters();
    let before_params = qmp
        .execute(&QueryMigrateParameters)
        .await
        .context("query-migrate-parameters failed")?;
    let restore_params = parameters_to_restore(&params, &before_params);
    set_capabilities(qmp, wanted).await?;
    let set_params = qmp
        .execute(&params)
        .await
        .context("QEMU refused the migration parameters");
    if let Err(err) = set_params {
        restore_settings(qmp, restore, restore_params).await;
        return Err(err);
    }

    let result = migrate_and_follow(qmp, plan, endpoint, source, opts, progress, cancel).await;

    if matches!(
        result,
        Ok(Summary {
            outcome: Outcome::Detached(_) | Outcome::PostcopyPaused(_),
            ..
        })
    ) {
        // QEMU refuses capability changes while a migration is underway, and this one is.
        return result;
    }
    restore_settings(qmp, restore, restore_params).await;
    result
}

/// For each parameter that `set` changes, its value in `before`: what to set back afterwards so
/// that the source's settings are as we found them (as libvirt does).
fn parameters_to_restore(
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
    if let Err(err) = set_capabilities(qmp, capabilities).await {
        warn!("could not restore the source's migration capabilities: {err:#}");
    }
    if params != MigrateSetParameters::default() {
        if let Err(err) = qmp.execute(&params).await {
            warn!("could not restore the source's migration parameters: {err}");
        }
    }
}

async fn migrate_and_follow(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &Endpoint,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    cancel: impl Future<Output = String>,
) -> anyhow::Result<Summary> {
    let target = endpoint.target(qmp).await?;

    let mut events = qmp.events();
    let started = Instant::now();
    qmp.execute(&Migrate::new(target))
        .await
        .with_context(|| format!("QEMU refused to start the migration to {endpoint}"))?;
    debug!(%endpoint, plan = %plan.describe(), "migration started");

    let mut cancel = pin!(cancel);
    let mut cancelling = Cancelling::No;
    let mut postcopy_requested = false;
    let mut last_status = MigrationStatus::None;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut events_alive = true;
    // QEMU drops the RAM statistics once a migration is cancelled or failed; the summary uses
    // the last ones it reported.
    let mut last_ram = None;

    let mut info = loop {
        tokio::select! {
            reason = &mut cancel, if cancelling == Cancelling::No => {
                cancelling = cancel_migration(qmp, &last_status, reason, progress).await;
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
            debug!(status = migration_status_name(&status), "migration status");
            last_status = status;
        }
        progress.tick(&Snapshot::new(&info, started.elapsed()));
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
        if status == MigrationStatus::PostcopyPaused {
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
                    migration_status_name(&status)
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
        .unwrap_or_else(|| format!("QEMU reports {}", migration_status_name(&status)));
    let outcome = match (status, cancelling) {
        (MigrationStatus::Completed, _) => Outcome::Completed,
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
        ensure_source_running(qmp, source, progress).await?;
    }
    Ok(Summary::from_info(&info, outcome, postcopy_requested))
}

/// Where a cancellation request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cancelling {
    /// Nobody asked.
    No,
    /// `migrate_cancel` was sent for this reason; QEMU should reach `cancelled` by `deadline`.
    Requested { reason: String, deadline: Instant },
    /// It was asked for during postcopy, where there is nothing left to cancel to.
    Refused,
}

/// Sends `migrate_cancel`, except in postcopy: the guest already runs on the destination there
/// and the source has no complete state to fall back to.
async fn cancel_migration(
    qmp: &Qmp,
    status: &MigrationStatus,
    reason: String,
    progress: &mut dyn Progress,
) -> Cancelling {
    if *status == MigrationStatus::PostcopyActive {
        progress.note(&format!(
            "{reason}: postcopy cannot be cancelled (the guest already runs on the destination); \
             waiting for it to complete"
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
    }
}

/// After a migration that did not complete: makes sure a source VM that was running before
/// runs again. QEMU restarts it by itself once its migration thread has cleaned up, so we give
/// it [`RESUME_GRACE`] and only then `cont`.
async fn ensure_source_running(
    qmp: &Qmp,
    source: &SourceState,
    progress: &mut dyn Progress,
) -> anyhow::Result<()> {
    if !source.was_running {
        return Ok(());
    }
    let deadline = Instant::now() + RESUME_GRACE;
    loop {
        let status = query_status(qmp).await?;
        if status.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            progress.note(&format!(
                "the source VM is {} after the migration stopped; resuming it",
                run_state_name(&status.status)
            ));
            qmp.execute(&qmigrate_qmp::Cont)
                .await
                .context("could not resume the source VM (cont failed)")?;
            let status = query_status(qmp).await?;
            if !status.running {
                bail!(
                    "the source VM is still {} after cont",
                    run_state_name(&status.status)
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// QEMU's own lowercase name for a run state (`inmigrate`), for messages.
pub fn run_state_name(state: &RunState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{state:?}").to_lowercase())
}

/// QEMU's own name for a migration status (`postcopy-active`), for messages.
pub fn migration_status_name(status: &MigrationStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{status:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_validation() {
        assert_eq!(MigrationPlan::default().validate(), Ok(()));
        let plan = MigrationPlan {
            multifd: Some(0),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Err(PlanError::MultifdChannels(0)));
        let plan = MigrationPlan {
            compression: Some(Compression::Zstd),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Err(PlanError::CompressionWithoutMultifd));
        let plan = MigrationPlan {
            compression: Some(Compression::None),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Ok(()));
    }

    #[test]
    fn capabilities_match_on_both_sides() {
        let plan = MigrationPlan {
            multifd: Some(4),
            postcopy: true,
            auto_converge: true,
            ..Default::default()
        };
        let dest = plan.destination_capabilities();
        let src = plan.source_capabilities();
        for c in &dest {
            assert!(src.contains(c), "{c:?} differs");
        }
        assert!(dest.contains(&cap(MigrationCapability::Multifd, true)));
        assert!(dest.contains(&cap(MigrationCapability::PostcopyRam, true)));
        assert!(dest.contains(&cap(MigrationCapability::ReturnPath, true)));
        assert!(src.contains(&cap(MigrationCapability::AutoConverge, true)));

        let single = MigrationPlan::default().destination_capabilities();
        assert!(single.contains(&cap(MigrationCapability::Multifd, false)));
        assert!(single.contains(&cap(MigrationCapability::ReturnPath, true)));
    }

    #[test]
    fn parameters() {
        let plan = MigrationPlan {
            multifd: Some(4),
            compression: Some(Compression::Zstd),
            ..Default::default()
        };
        let src = plan.source_parameters();
        assert_eq!(src.max_bandwidth, Some(UNLIMITED_BANDWIDTH));
        assert_eq!(src.multifd_channels, Some(4));
        assert_eq!(src.downtime_limit, None);
        let dest = plan.destination_parameters();
        assert_eq!(dest.max_bandwidth, None);
        assert_eq!(dest.multifd_channels, Some(4));
        assert_eq!(dest.multifd_compression, src.multifd_compression);
        assert_eq!(
            MigrationPlan::default().destination_parameters(),
            MigrateSetParameters::default()
        );
        assert_eq!(plan.describe(), "multifd 4 (zstd), postcopy off");
    }

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
