//! The destination side of `qmigrate migrate`: a `tunnel-server` given `--qmp` or `--route`
//! plays `receive` itself when a migration session opens.
//!
//! The source names the route in the URL path and sends, on the session's control connection,
//! the settings both QEMUs must agree on. The server sets them on the destination QEMU, makes
//! it listen on a private socket for this session only, and answers ready; the session's data
//! connections then go there. At the end it follows the destination to its own verdict, starts
//! the VM (`cont`) unless asked not to, and reports back, so the source prints the truth of both
//! sides.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use qmigrate_qmp::{MigrationStatus, QueryVersion};
use qmigrate_transport::protocol::Hello;
use qmigrate_transport::{Controller, SessionMap, TunnelStream};
use tracing::{info, warn};

use super::link::Link;
use super::{Control, MigrationSettings, Named, SourceEnd};
use crate::destination::{check_waiting_for_incoming, follow_incoming, prepare_incoming};
use crate::monitor::{connect_qmp, query_migrate, status_of};
use crate::{direct, MigrationPlan, QemuTarget};

/// How long the source may take to send its settings after the control connection opened.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the destination waits for the source's end after its own, before it answers.
const SOURCE_END_GRACE: Duration = Duration::from_secs(3);

/// How long the destination may take to reach its verdict once the source has ended without
/// completing (a destination QEMU waits for data that never comes otherwise).
const AFTER_SOURCE_FAILED: Duration = Duration::from_secs(15);

/// Prepares destination QEMUs for control connections, one migration per route at a time.
#[derive(Debug, Clone)]
pub struct QmpController(Arc<Inner>);

/// Receives a [`QmpController`]'s [`DestinationEvent`]s (a front end's metrics, its shutdown
/// log). Called on the session's task: keep it quick.
pub trait DestinationObserver: Send + Sync + std::fmt::Debug + 'static {
    /// One event.
    fn event(&self, event: &DestinationEvent);
}

/// A migration on one of the controller's routes began or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DestinationEvent {
    /// A migration to a known, free route began (the source's settings arrived).
    Started {
        /// The route (`None`: the URL path `/`).
        route: Option<String>,
    },
    /// That migration ended (each `Started` has one, unless the server was stopped first).
    Ended {
        /// The route.
        route: Option<String>,
        /// How.
        end: MigrationEnd,
        /// From `Started` to the destination's verdict.
        duration: Duration,
        /// The guest's downtime as the source's QEMU measured it (completed migrations from
        /// sources that report it).
        downtime: Option<Duration>,
    },
}

/// How a migration ended, as the destination sums it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MigrationEnd {
    /// The destination QEMU completed it.
    Completed,
    /// The source cancelled it (a signal, `--timeout`).
    Cancelled,
    /// Anything else: either side failed, or the destination could not be prepared.
    Failed,
}

impl MigrationEnd {
    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            MigrationEnd::Completed => "completed",
            MigrationEnd::Cancelled => "cancelled",
            MigrationEnd::Failed => "failed",
        }
    }
}

/// What one session learned of its end, filled in as it goes.
#[derive(Debug, Default)]
struct Ending {
    source: Option<SourceEnd>,
    downtime: Option<Duration>,
    completed: bool,
}

impl Ending {
    fn end(&self) -> MigrationEnd {
        if self.source == Some(SourceEnd::Cancelled) {
            MigrationEnd::Cancelled
        } else if self.completed {
            MigrationEnd::Completed
        } else {
            MigrationEnd::Failed
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// Route name (`None`: the URL path `/`) to QMP socket.
    routes: BTreeMap<Option<String>, String>,
    /// Private directory (0700) for the per-session migration sockets.
    dir: tempfile::TempDir,
    /// Routes with a migration under way.
    busy: Mutex<HashSet<Option<String>>>,
    /// Told when migrations start and end.
    observer: Option<Arc<dyn DestinationObserver>>,
    /// A source silent this long on its control connection is taken for hung (version 3).
    dead_peer: Duration,
}

impl QmpController {
    /// `routes` maps route names (`None` for the path `/`) to QMP sockets.
    pub fn new(routes: BTreeMap<Option<String>, String>) -> crate::Result<Self> {
        Self::observed(routes, None)
    }

    /// [`QmpController::new`] that tells `observer` when migrations start and end.
    pub fn observed(
        routes: BTreeMap<Option<String>, String>,
        observer: Option<Arc<dyn DestinationObserver>>,
    ) -> crate::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("qmigrate-server-")
            .tempdir()
            .context("cannot create a private directory for the migration sockets")?;
        Ok(QmpController(Arc::new(Inner {
            routes,
            dir,
            busy: Mutex::new(HashSet::new()),
            observer,
            dead_peer: qmigrate_transport::DEFAULT_DEAD_PEER_TIMEOUT,
        })))
    }

    /// The same controller, taking a source whose control connection is silent for `timeout`
    /// (zero: never) for hung, from protocol version 3 (heartbeats). Call it before serving.
    pub fn with_dead_peer(mut self, timeout: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.dead_peer = timeout;
        }
        self
    }

    /// The routes as the operator wrote them, for the log.
    pub fn describe(&self) -> String {
        self.0
            .routes
            .iter()
            .map(|(route, qmp)| match route {
                Some(name) => format!("/{name} -> {qmp}"),
                None => format!("/ -> {qmp}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Controller for QmpController {
    fn serve(
        &self,
        hello: Hello,
        stream: TunnelStream,
        sessions: SessionMap,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let inner = self.0.clone();
        Box::pin(async move { serve(inner, hello, stream, sessions).await })
    }
}

/// Frees the route when the session ends, however it ends.
struct Busy<'a>(&'a Inner, Option<String>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.0.busy.lock() {
            busy.remove(&self.1);
        }
    }
}

async fn serve(inner: Arc<Inner>, hello: Hello, stream: TunnelStream, sessions: SessionMap) {
    // The version the server's handshake chose for this hello.
    let version = qmigrate_transport::protocol::negotiate(hello.min_version, hello.max_version)
        .unwrap_or(qmigrate_transport::protocol::PROTOCOL_MIN);
    let mut stream = Link::new(
        stream,
        version,
        inner.dead_peer,
        "the source (qmigrate migrate)",
    );
    let (settings, recover) = match tokio::time::timeout(PREPARE_TIMEOUT, stream.recv()).await {
        Ok(Ok(Control::Prepare { settings })) => (settings, false),
        Ok(Ok(Control::Recover { settings })) => (settings, true),
        Ok(Ok(other)) => {
            warn!("control connection: expected prepare, got {other:?}");
            return;
        }
        Ok(Err(e)) => {
            warn!("control connection: {e:#}");
            return;
        }
        Err(_) => {
            warn!("control connection: no settings within {PREPARE_TIMEOUT:?}");
            return;
        }
    };
    let route = hello.route.clone();
    let Some(qmp_path) = inner.routes.get(&route).cloned() else {
        let known: Vec<String> = inner
            .routes
            .keys()
            .map(|r| format!("/{}", r.as_deref().unwrap_or("")))
            .collect();
        let message = format!(
            "unknown route {:?}: this server serves {} (name one in the URL path, e.g. ws://HOST:PORT/NAME)",
            route.as_deref().unwrap_or("/"),
            known.join(", ")
        );
        fail(&mut stream, message).await;
        return;
    };
    let fresh = inner
        .busy
        .lock()
        .map(|mut busy| busy.insert(route.clone()))
        .unwrap_or(false);
    if !fresh {
        let message = format!(
            "a migration to {qmp_path} (route {:?}) is already under way",
            route.as_deref().unwrap_or("/")
        );
        fail(&mut stream, message).await;
        return;
    }
    let _busy = Busy(&inner, route.clone());

    // The session id names a file: accept only what our clients send (hex).
    if hello.session.is_empty()
        || hello.session.len() > 64
        || !hello.session.bytes().all(|b| b.is_ascii_hexdigit())
    {
        fail(&mut stream, "malformed session id".into()).await;
        return;
    }
    let socket = inner.dir.path().join(format!("{}.sock", hello.session));
    if recover {
        info!(qmp = %qmp_path, socket = %socket.display(), ?settings, "recovering a paused postcopy migration");
    } else {
        info!(qmp = %qmp_path, socket = %socket.display(), ?settings, "preparing the destination");
    }
    let observe = |event: DestinationEvent| {
        if let Some(observer) = &inner.observer {
            observer.event(&event);
        }
    };
    let began = Instant::now();
    observe(DestinationEvent::Started {
        route: route.clone(),
    });
    let mut ending = Ending::default();
    match run_session(
        &qmp_path,
        &settings,
        recover,
        &socket,
        &hello.session,
        &mut stream,
        &sessions,
        &mut ending,
    )
    .await
    {
        Ok(()) => {}
        Err(err) => {
            warn!("migration session failed on the destination: {err:#}");
            fail(&mut stream, format!("{err:#}")).await;
        }
    }
    observe(DestinationEvent::Ended {
        route,
        end: ending.end(),
        duration: began.elapsed(),
        downtime: ending.downtime,
    });
    sessions.remove(&hello.session);
    sessions.remove_nbd(&hello.session);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(nbd_socket(&socket));
}

/// The private socket of a session's NBD server, beside its migration socket.
fn nbd_socket(socket: &std::path::Path) -> std::path::PathBuf {
    socket.with_extension("nbd.sock")
}

/// `migrate-recover`: the paused destination listens again at `target` for the resume.
async fn listen_again(qmp: &qmigrate_qmp::Qmp, target: &QemuTarget) -> anyhow::Result<()> {
    crate::destination::listen_for_recovery(qmp, target).await?;
    info!(endpoint = %target, "destination listens again for the recovery");
    Ok(())
}

async fn fail(stream: &mut Link, message: String) {
    warn!("refused the migration: {message}");
    let _ = stream.send(&Control::Failed { message }).await;
}

/// The destination's plan from the source's settings, validated as the source validated its
/// own (an older or newer source may send what this build refuses).
fn plan_for(settings: &MigrationSettings) -> anyhow::Result<MigrationPlan> {
    let compression = match &settings.compression {
        Some(Named::Known(c)) => Some(*c),
        Some(Named::Other(name)) => bail!("unknown multifd compression {name:?}"),
        None => None,
    };
    let plan = MigrationPlan {
        multifd: settings.multifd,
        compression,
        postcopy: settings.postcopy,
        ..MigrationPlan::default()
    };
    plan.validate()?;
    Ok(plan)
}

/// Prepares (or, with `recover`, makes a paused postcopy migration listen again), answers
/// ready, follows the destination to its verdict and reports it. An error before `Ready` is
/// sent back as `Failed`.
#[allow(clippy::too_many_arguments)] // the one caller passes its session's parts on
async fn run_session(
    qmp_path: &str,
    settings: &MigrationSettings,
    recover: bool,
    socket: &std::path::Path,
    session: &str,
    stream: &mut Link,
    sessions: &SessionMap,
    ending: &mut Ending,
) -> anyhow::Result<()> {
    plan_for(settings)?;
    let qmp = connect_qmp(qmp_path)
        .await
        .with_context(|| format!("destination QMP {qmp_path}"))?;
    if recover {
        let status = status_of(&query_migrate(&qmp).await?);
        if status != MigrationStatus::PostcopyPaused {
            bail!(
                "there is no paused postcopy migration to recover on the destination QEMU \
                 (its migration status is {status})"
            );
        }
    }
    let version = qmp
        .execute(&QueryVersion)
        .await
        .map(|v| v.qemu.to_string())
        .unwrap_or_default();
    // Disks to copy: checked against this VM's, then exported over NBD before anything else
    // changes, so that a refusal leaves the destination as it was.
    let exports = if settings.disks.is_empty() || recover {
        Vec::new()
    } else {
        check_waiting_for_incoming(&qmp).await?;
        let nbd = nbd_socket(socket);
        let exports = crate::storage::export_disks(&qmp, &settings.disks, &nbd).await?;
        sessions.insert_nbd(session, nbd);
        exports
    };
    let result = prepare_and_follow(
        &qmp, settings, recover, socket, session, stream, sessions, ending, version, exports,
    )
    .await;
    if !settings.disks.is_empty() && result.is_err() {
        crate::storage::stop_nbd_server(&qmp).await;
    }
    qmp.close().await;
    result
}

/// [`run_session`] once the disks (if any) are exported: makes the destination listen,
/// answers ready, follows it and reports.
#[allow(clippy::too_many_arguments)] // run_session's own parts, passed on
async fn prepare_and_follow(
    qmp: &qmigrate_qmp::Qmp,
    settings: &MigrationSettings,
    recover: bool,
    socket: &std::path::Path,
    session: &str,
    stream: &mut Link,
    sessions: &SessionMap,
    ending: &mut Ending,
    version: String,
    exports: Vec<crate::session::Export>,
) -> anyhow::Result<()> {
    let plan = plan_for(settings)?;
    let copying = !exports.is_empty();
    // The direct data path: one plain-TCP connection that both QEMUs take over.
    let direct = settings.direct && direct::allowed_on(stream.stream(), settings.multifd);
    if direct {
        // Checked now: the socket arrives only after `ready`.
        if !recover {
            check_waiting_for_incoming(qmp).await?;
        }
        let mut handed = sessions.hand_over(session);
        stream
            .send(&Control::Ready {
                qemu: version,
                direct: true,
                exports,
            })
            .await
            .context("the source went away before the migration started")?;
        stream.arm();
        let tcp = tokio::select! {
            tcp = handed.recv() => tcp.context("the data connection never came")?,
            msg = stream.recv() => bail!("the source ended before it connected: {msg:?}"),
            _ = tokio::time::sleep(PREPARE_TIMEOUT) => bail!("the source did not connect within {PREPARE_TIMEOUT:?}"),
        };
        sessions.remove(session);
        let fd = direct::into_fd(TunnelStream::Tcp(tcp))?
            .context("the direct data path needs plain TCP")?;
        direct::hand_to_qemu(qmp, &fd, "destination").await?;
        if recover {
            listen_again(qmp, &direct::target()).await?;
        } else {
            let incoming = prepare_incoming(qmp, &plan, &direct::target(), true).await?;
            info!(endpoint = %incoming.endpoint, "destination ready, direct data path");
        }
        // QEMU holds its own descriptor now; ours only closes.
        drop(fd);
    } else {
        let target = QemuTarget::Socket(socket.to_owned());
        if recover {
            listen_again(qmp, &target).await?;
        } else {
            let incoming = prepare_incoming(qmp, &plan, &target, true).await?;
            info!(endpoint = %incoming.endpoint, "destination ready");
        }
        sessions.insert(session, socket.to_owned());
        stream
            .send(&Control::Ready {
                qemu: version,
                direct: false,
                exports,
            })
            .await
            .context("the source went away before the migration started")?;
        stream.arm();
    }

    // Follow the destination; meanwhile listen for the source's end. When the source ended
    // without completing, the destination gets a little while to notice, then we report.
    let mut never_came = false;
    let (outcome, source_ended) = {
        // With disks, the NBD server must be gone before the guest starts (its exports hold
        // the images): `cont` is sent below.
        let mut follow = pin!(follow_incoming(qmp, !settings.no_start && !copying));
        let mut deadline: Option<tokio::time::Instant> = None;
        let mut source_ended = false;
        loop {
            let wait = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let watching = source_ended && stream.silent().is_none();
            tokio::select! {
                outcome = &mut follow => break (Some(outcome), source_ended),
                // After the source's end it waits for the verdict: heartbeats on until then.
                msg = async {
                    if source_ended {
                        Err(anyhow::anyhow!(stream.watch().await))
                    } else {
                        stream.recv().await
                    }
                }, if !source_ended || watching => {
                    if source_ended {
                        if let Err(silent) = msg {
                            warn!("{silent:#}");
                        }
                        continue;
                    }
                    source_ended = true;
                    if let Ok(Control::Finished { outcome, downtime_ms }) = &msg {
                        ending.source = Some(*outcome);
                        ending.downtime = downtime_ms.map(Duration::from_millis);
                    }
                    match msg {
                        Ok(Control::Finished { outcome: SourceEnd::Completed, .. }) => {}
                        Ok(Control::Finished { outcome: SourceEnd::PostcopyPaused, .. }) => {
                            info!("the source gave up reconnecting: the destination stays postcopy-paused for a recovery");
                            deadline = Some(tokio::time::Instant::now());
                        }
                        Ok(Control::Finished { outcome, .. }) => {
                            info!("the source reports the migration {}", outcome.name());
                            // Stopped during the disk copy: no RAM will ever come.
                            never_came = copying
                                && query_migrate(qmp).await.is_ok_and(|i| {
                                    matches!(status_of(&i), MigrationStatus::Setup | MigrationStatus::None)
                                });
                            deadline = Some(tokio::time::Instant::now() + if never_came { Duration::ZERO } else { AFTER_SOURCE_FAILED });
                        }
                        Ok(other) => bail!("unexpected control message {other:?}"),
                        Err(e) => {
                            warn!("the source's control connection ended: {e:#}");
                            deadline = Some(tokio::time::Instant::now() + AFTER_SOURCE_FAILED);
                        }
                    }
                }
                _ = wait => break (None, source_ended),
            }
        }
    };
    // The destination usually finishes first; the source's end (and its downtime, for the
    // metrics) follows within a poll of its QEMU.
    if !source_ended {
        if let Ok(Ok(Control::Finished {
            outcome,
            downtime_ms,
        })) = tokio::time::timeout(SOURCE_END_GRACE, stream.recv()).await
        {
            ending.source = Some(outcome);
            ending.downtime = downtime_ms.map(Duration::from_millis);
        }
    }
    let mut outcome = outcome;
    if copying {
        // The source has removed its NBD nodes by now (it reports its end after that).
        match &mut outcome {
            Some(Ok(o)) => {
                if let Err(err) = crate::storage::finish_incoming(qmp, o, !settings.no_start).await
                {
                    warn!("{err:#}");
                    o.error = Some(format!("{err:#}"));
                }
            }
            _ => crate::storage::stop_nbd_server(qmp).await,
        }
    }
    ending.completed = matches!(&outcome, Some(Ok(o)) if o.status == MigrationStatus::Completed);
    let done = match outcome {
        Some(Ok(o)) => Control::Done {
            status: Named::Known(o.status),
            vm: Named::Known(o.run_state),
            error: o.error,
            started: o.started,
        },
        Some(Err(err)) => Control::Done {
            status: Named::Known(MigrationStatus::Failed),
            vm: Named::Other("unknown".into()),
            error: Some(format!("{err:#}")),
            started: false,
        },
        None if never_came => Control::Done {
            status: Named::Known(MigrationStatus::Failed),
            vm: Named::Other("unknown".into()),
            error: Some(
                "the source ended the migration during the disk copy, before any RAM came: the \
                 destination's disk images are incomplete"
                    .into(),
            ),
            started: false,
        },
        None => Control::Done {
            status: Named::Known(MigrationStatus::Failed),
            vm: Named::Other("unknown".into()),
            error: Some(format!(
                "the source ended the migration and the destination QEMU had not finished \
                 {}s later",
                AFTER_SOURCE_FAILED.as_secs()
            )),
            started: false,
        },
    };
    if let Ok(info) = query_migrate(qmp).await {
        if status_of(&info) == MigrationStatus::PostcopyPaused {
            // The guest's memory is split between the hosts: never reset or kill this QEMU.
            warn!(
                "the destination QEMU is postcopy-paused: left as it is, waiting for the source \
                 to recover the migration"
            );
        }
    }
    info!(?done, "migration session over");
    let _ = stream.send(&done).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Compression;

    #[test]
    fn settings_become_a_plan() {
        let plan = plan_for(&MigrationSettings {
            multifd: Some(4),
            compression: Some(Named::from("zstd".to_owned())),
            postcopy: false,
            no_start: false,
            direct: false,
            disks: Vec::new(),
        })
        .expect("valid");
        assert_eq!(plan.multifd, Some(4));
        assert_eq!(plan.compression, Some(Compression::Zstd));
        assert!(plan_for(&MigrationSettings {
            compression: Some(Named::from("lz4".to_owned())),
            ..MigrationSettings::default()
        })
        .is_err());
    }
}
