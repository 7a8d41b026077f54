//! The source's side of a control session (`qmigrate migrate`): open the session, have the
//! destination prepared, carry the stream (directly or through an in-process tunnel client),
//! run the source job, and bring back the destination's verdict.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::{MigrationStatus, RunState};
use qmigrate_transport::{open_control, open_data, open_nbd, Client, ClientConfig};
use tokio_util::sync::CancellationToken;

use super::link::Link;
use super::{Control, Export, MigrationSettings, Named, SourceEnd};
use crate::monitor::connect_qmp;
use crate::outcome::{Outcome, Progress};
use crate::source::Latch;
use crate::source::{self, FollowOptions};
use crate::storage::{self, SourceDisk};
use crate::{direct, Error, ErrorKind, MigrationPlan, QemuTarget};

/// How long the destination may take to prepare (QMP, capabilities, `migrate-incoming`).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the destination may take to report its verdict after the source has ended.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the destination's verdict may take after a migration that did not complete.
const ABORTED_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the tunnel's connections may take to close once the migration has ended.
const TUNNEL_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The first wait between attempts to recover a paused postcopy migration; it doubles up to
/// [`RECOVER_BACKOFF_MAX`].
const RECOVER_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const RECOVER_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long a paused postcopy migration is recovered for unless told otherwise.
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(600);

/// A one-command migration from the source host.
#[derive(Debug)]
pub struct SessionOptions {
    /// The source QEMU's QMP socket (a path, or `tcp:HOST:PORT`).
    pub qmp: String,
    /// The plan, validated by [`run`] before anything is touched.
    pub plan: MigrationPlan,
    /// How the source job follows the migration (postcopy switch, convergence and stall
    /// policy); `detach` is ignored: a session follows its migration to the end.
    pub follow: FollowOptions,
    /// How to reach the tunnel-server (its URL, token, TLS).
    pub tunnel: ClientConfig,
    /// Keep qmigrate in the data path even where the direct one would do.
    pub relay: bool,
    /// Leave the destination VM paused after a completed migration (no `cont`).
    pub no_start: bool,
    /// How long to keep reconnecting when postcopy is paused by a broken connection (zero:
    /// not at all; both QEMUs are then left paused for `qmigrate recover`).
    pub recover_timeout: Duration,
    /// The disks to copy (`--copy-storage`, `--copy-storage-inc`); none for shared storage.
    pub storage: storage::StorageCopy,
}

/// What the source side of a session shows the operator besides the migration's progress.
#[derive(Debug)]
pub enum SessionEvent<'a> {
    /// The destination QEMU listens.
    Ready {
        /// The destination QEMU's version.
        qemu: &'a str,
        /// The tunnel-server's URL.
        server: &'a str,
        /// Whether the direct data path was agreed.
        direct: bool,
    },
    /// The destination's verdict, after the source's end.
    Verdict(&'a Verdict),
    /// No verdict came from the destination (shown even when the source failed too).
    VerdictLost(&'a anyhow::Error),
}

/// How the migration ended on the destination ([`Control::Done`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The destination's final migration status.
    pub status: Named<MigrationStatus>,
    /// The destination VM's run state afterwards.
    pub vm: Named<RunState>,
    /// QEMU's reason when it failed.
    pub error: Option<String>,
    /// Whether the server started the VM (`cont`).
    pub started: bool,
}

/// Runs a whole migration from the source: validates the plan, checks the source QEMU, asks
/// the tunnel-server to prepare the destination, carries the stream, follows the source job
/// to its end (cancelled when `cancel` resolves, with its reason) and reports the
/// destination's verdict through `events`.
///
/// Ok only when both sides completed. The source VM keeps running whenever the migration
/// does not complete.
pub async fn run(
    mut opts: SessionOptions,
    progress: &mut (dyn Progress + Send),
    events: &mut (dyn FnMut(SessionEvent<'_>) + Send),
    cancel: impl Future<Output = String>,
) -> crate::Result<()> {
    opts.plan.validate()?;
    let server = opts.tunnel.server.clone();
    let settings = MigrationSettings {
        multifd: opts.plan.multifd,
        compression: opts.plan.compression.map(Named::Known),
        postcopy: opts.plan.postcopy,
        no_start: opts.no_start,
        direct: direct::allowed(server.scheme, opts.plan.multifd, opts.relay),
        disks: Vec::new(),
    };
    let mut settings = settings;

    // The source first: a wrong path or a busy QMP socket must not leave a prepared
    // destination behind.
    let disks = {
        let qmp = connect_qmp(&opts.qmp).await?;
        source::preflight_source(&qmp).await?;
        let disks = storage::source_disks(&qmp, &opts.storage).await;
        qmp.close().await;
        disks?
    };
    if !disks.is_empty() && opts.plan.postcopy {
        // The destination's guest would start (at postcopy) while its NBD server still holds
        // the images.
        return Err(Error::new(
            ErrorKind::Usage,
            anyhow!("copying disks does not work with postcopy yet: migrate them in precopy"),
        ));
    }
    if !disks.is_empty() {
        settings.disks = disks.iter().map(|d| d.disk.clone()).collect();
        opts.plan.pause_before_switchover = true;
    }

    let route = open_route(
        &opts,
        Control::Prepare {
            settings: settings.clone(),
        },
        events,
    )
    .await?;
    drive(
        &opts,
        &settings,
        &disks,
        Begin::Migrate,
        Some(route),
        progress,
        events,
        cancel,
    )
    .await
}

/// Resumes a postcopy migration left paused on the source (`qmigrate recover`): checks that
/// the source QEMU is `postcopy-paused`, asks the tunnel-server to make the route's destination
/// listen again ([`Control::Recover`]), resumes the source, and follows the migration to its
/// end as [`run`] does, reconnecting for [`SessionOptions::recover_timeout`] while the
/// network is still down.
pub async fn recover(
    opts: SessionOptions,
    progress: &mut (dyn Progress + Send),
    events: &mut (dyn FnMut(SessionEvent<'_>) + Send),
    cancel: impl Future<Output = String>,
) -> crate::Result<()> {
    let server = opts.tunnel.server.clone();
    let settings = MigrationSettings {
        multifd: None,
        compression: None,
        postcopy: true,
        no_start: opts.no_start,
        direct: direct::allowed(server.scheme, None, opts.relay),
        disks: Vec::new(),
    };
    {
        let qmp = connect_qmp(&opts.qmp).await?;
        let paused = source::check_paused(&qmp).await;
        qmp.close().await;
        paused?;
    }
    drive(
        &opts,
        &settings,
        &[],
        Begin::Resume,
        None,
        progress,
        events,
        cancel,
    )
    .await
}

/// Follows the source job (over `route`, or over a route of its own for a resume) to its end,
/// recovering it while postcopy is paused, and brings back the destination's verdict.
#[allow(clippy::too_many_arguments)] // run and recover pass their own on
async fn drive(
    opts: &SessionOptions,
    settings: &MigrationSettings,
    disks: &[SourceDisk],
    begin: Begin,
    mut route: Option<Route>,
    progress: &mut (dyn Progress + Send),
    events: &mut (dyn FnMut(SessionEvent<'_>) + Send),
    cancel: impl Future<Output = String>,
) -> crate::Result<()> {
    let mut cancel = Latch::new(cancel);
    let mut downtime = None;
    let result = follow_source(
        opts,
        settings,
        disks,
        begin,
        &mut route,
        progress,
        events,
        &mut cancel,
        &mut downtime,
    )
    .await;
    finish(result, route, downtime, events).await
}

/// How [`follow_source`] begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Begin {
    /// A new migration over the route already open.
    Migrate,
    /// The recovery of a migration paused before this process started.
    Resume,
}

/// Runs the source job (or resumes it) over `route`, and recovers it over new routes while
/// postcopy is paused. The route in use at the end is left in `route`, the source's downtime
/// in `downtime`.
#[allow(clippy::too_many_arguments)] // run and recover pass their own on
async fn follow_source<F: Future<Output = String>>(
    opts: &SessionOptions,
    settings: &MigrationSettings,
    disks: &[SourceDisk],
    begin: Begin,
    route: &mut Option<Route>,
    progress: &mut (dyn Progress + Send),
    events: &mut (dyn FnMut(SessionEvent<'_>) + Send),
    cancel: &mut Latch<F>,
    downtime: &mut Option<Duration>,
) -> crate::Result<()> {
    let follow = FollowOptions {
        detach: false,
        ..opts.follow.clone()
    };
    let pass_fd = route.as_ref().and_then(|r| r.direct_fd.as_ref());
    let (qmp, state) = match begin {
        Begin::Migrate => source::connect_source(&opts.qmp, &opts.plan, pass_fd).await?,
        Begin::Resume => {
            let qmp = connect_qmp(&opts.qmp).await?;
            let state = source::SourceState {
                was_running: false,
                qemu: crate::monitor::qemu_version(&qmp),
            };
            (qmp, state)
        }
    };
    let mut summary = match (begin, route.as_mut()) {
        (Begin::Migrate, Some(r)) if !disks.is_empty() => {
            let Route {
                control,
                target,
                exports,
                nbd,
                ..
            } = r;
            let nbd = nbd.as_ref().ok_or_else(|| {
                Error::new(
                    ErrorKind::Failed,
                    anyhow!("no NBD relay was set up for the disks"),
                )
            })?;
            let failed = nbd.failed.clone();
            let nbd_error = move || failed.lock().ok().and_then(|e| e.clone());
            let nbd_route = storage::NbdRoute {
                exports,
                socket: &nbd.socket,
                nbd_error: &nbd_error,
            };
            let mut watch = Latch::new(watched(cancel, control));
            let result = storage::run_with_disks(
                &qmp, &opts.plan, target, &state, &follow, disks, nbd_route, progress, &mut watch,
            )
            .await;
            drop(watch);
            match result {
                Ok(summary) => silence_is_a_failure(summary, control),
                Err(err) => {
                    qmp.close().await;
                    return Err(silence_fails(err, control));
                }
            }
        }
        (Begin::Migrate, Some(r)) => {
            let Route {
                control, target, ..
            } = r;
            let result = source::run_migration(
                &qmp,
                &opts.plan,
                target,
                &state,
                &follow,
                progress,
                watched(cancel, control),
            )
            .await;
            silence_is_a_failure(result?, control)
        }
        _ => crate::outcome::Summary::from_info(
            &qmigrate_qmp::MigrationInfo::default(),
            Outcome::PostcopyPaused("paused before this recovery".into()),
            true,
        ),
    };

    // Postcopy paused: the guest's memory is split between the hosts, so giving up would lose
    // it. Reconnect (new control and data connections) until the destination listens again,
    // then resume; with backoff, for as long as the operator allows.
    let deadline = Instant::now() + opts.recover_timeout;
    let mut backoff = RECOVER_BACKOFF_FIRST;
    let server = opts.tunnel.server.to_string();
    while let Outcome::PostcopyPaused(reason) = &summary.outcome {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        progress.note(&format!(
            "postcopy paused ({reason}): reconnecting to {server} (for up to {} s more)",
            left.as_secs()
        ));
        if let Some(old) = route.take() {
            old.close().await;
        }
        let attempt = tokio::select! {
            r = open_route(opts, Control::Recover { settings: settings.clone() }, events) => r,
            reason = cancel.wait() => {
                progress.note(&format!("{reason}: the recovery stops; both QEMUs stay paused"));
                break;
            }
        };
        match attempt {
            Ok(new) => {
                if let Some(fd) = &new.direct_fd {
                    direct::hand_to_qemu(&qmp, fd, "source").await?;
                }
                progress.note("the destination listens again: resuming the migration");
                let target = new.target.clone();
                let control = &mut route.insert(new).control;
                // Postcopy cannot be cancelled: a silent server is only noted there, and
                // the heartbeats keep the destination from taking this side for dead.
                summary = source::resume_migration(
                    &qmp,
                    &opts.plan,
                    &target,
                    &state,
                    &follow,
                    progress,
                    watched(cancel, control),
                )
                .await?;
                backoff = RECOVER_BACKOFF_FIRST;
            }
            Err(err) => {
                let wait = backoff.min(deadline.saturating_duration_since(Instant::now()));
                progress.note(&format!(
                    "cannot recover yet: {err:#}; trying again in {} s",
                    wait.as_secs()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    reason = cancel.wait() => {
                        progress.note(&format!("{reason}: the recovery stops; both QEMUs stay paused"));
                        break;
                    }
                }
                backoff = (backoff * 2).min(RECOVER_BACKOFF_MAX);
            }
        }
    }
    *downtime = summary.downtime;
    progress.finish(&summary);
    qmp.close().await;
    source::outcome_result(&summary.outcome, &state)
}

/// `cancel`, or the control connection's silence ([`Link::watch`]): the migration is
/// cancelled either way, and the heartbeats flow meanwhile.
async fn watched<F: Future<Output = String>>(cancel: &mut Latch<F>, control: &mut Link) -> String {
    tokio::select! {
        reason = cancel.wait() => reason,
        reason = control.watch() => reason,
    }
}

/// A migration cancelled because the tunnel-server fell silent failed: it is not the
/// operator's cancel (exit 1, not 4).
fn silence_is_a_failure(mut summary: crate::Summary, control: &Link) -> crate::Summary {
    if control.silent().is_some() {
        if let Outcome::Cancelled(reason) = &summary.outcome {
            summary.outcome = Outcome::Failed(format!(
                "{reason}; the migration was cancelled, the source VM stays on this host"
            ));
        }
    }
    summary
}

/// An error of a disk copy cancelled because the tunnel-server fell silent: a failure, as
/// in [`silence_is_a_failure`].
fn silence_fails(err: Error, control: &Link) -> Error {
    match control.silent() {
        Some(_) if err.kind() == ErrorKind::Cancelled => {
            Error::new(ErrorKind::Failed, err.into_anyhow())
        }
        _ => err,
    }
}

/// Reports the source's end to the destination, waits for its verdict over the route in use,
/// closes the route, and makes the command's result of both sides' ends.
async fn finish(
    result: crate::Result<()>,
    route: Option<Route>,
    downtime: Option<Duration>,
    events: &mut (dyn FnMut(SessionEvent<'_>) + Send),
) -> crate::Result<()> {
    let outcome = match &result {
        Ok(()) => SourceEnd::Completed,
        Err(e) if e.downcast_ref::<source::PostcopyPaused>().is_some() => SourceEnd::PostcopyPaused,
        Err(e) if e.kind() == ErrorKind::Cancelled => SourceEnd::Cancelled,
        Err(_) => SourceEnd::Failed,
    };
    let Some(mut route) = route else {
        // Never reached the server (a recovery that found the network down throughout).
        return result;
    };
    let downtime_ms = downtime.and_then(|d| u64::try_from(d.as_millis()).ok());
    let verdict = destination_verdict(&mut route.control, outcome, downtime_ms).await;
    route.close().await;

    let verdict = match verdict {
        Ok(v) => v,
        Err(e) => {
            events(SessionEvent::VerdictLost(&e));
            return result.and(Err(Error::new(ErrorKind::Failed, e)));
        }
    };
    events(SessionEvent::Verdict(&verdict));
    result?;
    if verdict.status.is(&MigrationStatus::Completed) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Failed,
        anyhow!(
            "the source completed but the destination reports {}{}",
            verdict.status,
            verdict
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ),
    ))
}

/// One session's way to the destination: its control connection and how the data goes (the
/// direct data path's socket, or an in-process tunnel client on a private socket).
struct Route {
    control: Link,
    direct_fd: Option<OwnedFd>,
    target: QemuTarget,
    tunnel: Option<tokio::task::JoinHandle<qmigrate_transport::Report>>,
    stop: CancellationToken,
    /// The destination's NBD exports of the disks to copy, and the relay to them.
    exports: Vec<Export>,
    nbd: Option<NbdRelay>,
    _dir: tempfile::TempDir,
}

/// The source's way to the destination's NBD server: a listener on a private socket whose
/// connections (one per NBD client node, and per reconnect) become `nbd` tunnel connections.
struct NbdRelay {
    socket: std::path::PathBuf,
    /// Why the last tunnel connection could not be opened, if one could not.
    failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl NbdRelay {
    /// Listens on `socket` until `stop`.
    fn start(
        socket: std::path::PathBuf,
        tunnel: ClientConfig,
        session: String,
        stop: CancellationToken,
    ) -> crate::Result<NbdRelay> {
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let told = failed.clone();
        tokio::spawn(async move {
            loop {
                let unix = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((unix, _)) => unix,
                        Err(e) => {
                            tracing::warn!("NBD relay: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let (tunnel, session, told, stop) =
                    (tunnel.clone(), session.clone(), told.clone(), stop.clone());
                tokio::spawn(async move {
                    let (stream, version) = match open_nbd(&tunnel, &session).await {
                        Ok(opened) => opened,
                        Err(e) => {
                            let why = match &e {
                                qmigrate_transport::Error::Rejected { .. } => format!(
                                    "{e} (a tunnel-server older than this qmigrate does not carry NBD \
                                     connections: upgrade it)"
                                ),
                                _ => e.to_string(),
                            };
                            tracing::warn!("NBD tunnel connection: {why}");
                            if let Ok(mut f) = told.lock() {
                                *f = Some(why);
                            }
                            return;
                        }
                    };
                    tokio::select! {
                        (stats, result) = qmigrate_transport::relay(unix, stream, version) => {
                            tracing::debug!(?stats, ?result, "NBD tunnel connection closed");
                        }
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(NbdRelay { socket, failed })
    }
}

impl Route {
    /// Stops the tunnel client, bounded: connections stuck writing to a silent server do not
    /// end by themselves.
    async fn close(self) {
        self.stop.cancel();
        if let Some(mut task) = self.tunnel {
            match tokio::time::timeout(TUNNEL_STOP_TIMEOUT, &mut task).await {
                Ok(Ok(report)) => tracing::info!("tunnel: {report}"),
                Ok(Err(e)) => tracing::warn!("tunnel task: {e}"),
                Err(_) => {
                    task.abort();
                    tracing::warn!(
                        "the tunnel's connections did not close within {}s; dropped",
                        TUNNEL_STOP_TIMEOUT.as_secs()
                    );
                }
            }
        }
    }
}

/// Opens a session with the tunnel-server: the control connection, `first` (prepare or
/// recover), the destination's answer, then the data path.
async fn open_route(
    opts: &SessionOptions,
    first: Control,
    events: &mut (dyn FnMut(SessionEvent<'_>) + Send),
) -> crate::Result<Route> {
    let server = opts.tunnel.server.clone();
    let (control, session, version) = open_control(&opts.tunnel)
        .await
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("cannot start the migration session with {server}"))?;
    let mut control = Link::new(
        control,
        version,
        opts.tunnel.dead_peer.timeout,
        "the tunnel-server",
    );
    control
        .send(&first)
        .await
        .context("the tunnel server went away")?;
    let asked_disks = match &first {
        Control::Prepare { settings } => settings.disks.len(),
        _ => 0,
    };
    let (direct, exports) = match tokio::time::timeout(READY_TIMEOUT, control.recv()).await {
        Ok(Ok(Control::Ready {
            qemu,
            direct,
            exports,
        })) => {
            tracing::debug!(%qemu, direct, ?exports, "destination ready");
            if asked_disks > 0 && exports.is_empty() {
                return Err(Error::new(
                    ErrorKind::Refused,
                    anyhow!(
                        "the tunnel-server at {server} does not copy disks (it is older than                          this qmigrate): upgrade it, or migrate without copying storage"
                    ),
                ));
            }
            events(SessionEvent::Ready {
                qemu: &qemu,
                server: &server.to_string(),
                direct,
            });
            control.arm();
            (direct, exports)
        }
        Ok(Ok(Control::Failed { message })) => {
            return Err(Error::new(
                ErrorKind::Refused,
                anyhow!("the destination refused: {message}"),
            ))
        }
        Ok(Ok(other)) => {
            return Err(Error::new(
                ErrorKind::Failed,
                anyhow!("unexpected answer from the tunnel server: {other:?}"),
            ))
        }
        Ok(Err(e)) => {
            return Err(Error::new(
                ErrorKind::Failed,
                e.context("the tunnel server closed the session while preparing the destination"),
            ))
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Failed,
                anyhow!(
                    "the destination was not ready after {}s",
                    READY_TIMEOUT.as_secs()
                ),
            ))
        }
    };

    // The direct data path: one tunnel connection, handed to the source QEMU as it is.
    let mut direct_fd: Option<OwnedFd> = None;
    if direct {
        let stream = open_data(&opts.tunnel, &session, 0)
            .await
            .map_err(|e| anyhow!(e))
            .context("cannot open the data connection")?;
        direct_fd = Some(direct::into_fd(stream)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Failed,
                anyhow!("the direct data path needs plain TCP"),
            )
        })?);
    }

    // Otherwise the tunnel client, in-process, on a socket only this process and QEMU know.
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-migrate-")
        .tempdir()
        .context("cannot create a private directory for the migration socket")?;
    let socket = dir.path().join("source.sock");
    let stop = CancellationToken::new();
    let tunnel = if direct {
        None
    } else {
        let client = Client::bind(
            &socket,
            ClientConfig {
                session: Some(session.clone()),
                ..opts.tunnel.clone()
            },
        )
        .map_err(|e| anyhow!(e))?;
        Some(tokio::spawn(client.serve(stop.clone())))
    };
    let nbd = if exports.is_empty() {
        None
    } else {
        Some(NbdRelay::start(
            dir.path().join("nbd.sock"),
            opts.tunnel.clone(),
            session,
            stop.clone(),
        )?)
    };
    let target = match direct_fd {
        Some(_) => direct::target(),
        None => QemuTarget::Socket(socket),
    };
    Ok(Route {
        control,
        direct_fd,
        target,
        tunnel,
        stop,
        exports,
        nbd,
        _dir: dir,
    })
}

/// Tells the server how the source ended and waits for the destination's verdict.
async fn destination_verdict(
    control: &mut Link,
    outcome: SourceEnd,
    downtime_ms: Option<u64>,
) -> anyhow::Result<Verdict> {
    if let Some(silent) = control.silent() {
        // Nothing will come: waiting for it would only hold the operator's answer.
        return Err(anyhow!("{silent}"));
    }
    // The server may already have sent its verdict (the destination finished first) and
    // closed: a failed send is not yet an error.
    // A destination that loads a completed migration may take a while to finish; one whose
    // migration did not complete has nothing to finish, and a server that went silent (the
    // reason, often, that it did not) must not hold the source's report for long.
    let limit = match outcome {
        SourceEnd::Completed => DONE_TIMEOUT,
        _ => ABORTED_TIMEOUT,
    };
    let finished = Control::Finished {
        outcome,
        downtime_ms,
    };
    let _ = tokio::time::timeout(limit, control.send(&finished)).await;
    match tokio::time::timeout(limit, control.recv()).await {
        Ok(Ok(Control::Done {
            status,
            vm,
            error,
            started,
        })) => Ok(Verdict {
            status,
            vm,
            error,
            started,
        }),
        Ok(Ok(Control::Failed { message })) => Err(anyhow!("{message}")),
        Ok(Ok(other)) => Err(anyhow!("unexpected message {other:?}")),
        Ok(Err(e)) if control.silent().is_some() => Err(e),
        Ok(Err(e)) => Err(e.context("the tunnel server closed the session")),
        Err(_) => Err(anyhow!(
            "no verdict from the destination within {}s",
            limit.as_secs()
        )),
    }
}
