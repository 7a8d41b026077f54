//! The source's side of a control session (`qmigrate migrate`): open the session, have the
//! destination prepared, carry the stream (directly or through an in-process tunnel client),
//! run the source job, and bring back the destination's verdict.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::{MigrationStatus, RunState};
use qmigrate_transport::{open_control, open_data, Client, ClientConfig, TunnelStream};
use tokio_util::sync::CancellationToken;

use super::{Control, MigrationSettings, Named, SourceEnd};
use crate::monitor::connect_qmp;
use crate::outcome::Progress;
use crate::source::{self, FollowOptions};
use crate::{direct, Error, ErrorKind, MigrationPlan, QemuTarget};

/// How long the destination may take to prepare (QMP, capabilities, `migrate-incoming`).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the destination may take to report its verdict after the source has ended.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

/// A one-command migration from the source host.
#[derive(Debug)]
pub struct SessionOptions {
    /// The source QEMU's QMP socket (a path, or `tcp:HOST:PORT`).
    pub qmp: String,
    /// The plan, validated by [`run`] before anything is touched.
    pub plan: MigrationPlan,
    /// With postcopy: switch after this many completed precopy passes (0: at once).
    pub postcopy_after: Option<u64>,
    /// How to reach the tunnel-server (its URL, token, TLS).
    pub tunnel: ClientConfig,
    /// Keep qmigrate in the data path even where the direct one would do.
    pub relay: bool,
    /// Leave the destination VM paused after a completed migration (no `cont`).
    pub no_start: bool,
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
    opts: SessionOptions,
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
    };

    // The source first: a wrong path or a busy QMP socket must not leave a prepared
    // destination behind.
    {
        let qmp = connect_qmp(&opts.qmp).await?;
        source::preflight_source(&qmp).await?;
        qmp.close().await;
    }

    let (mut control, session) = open_control(&opts.tunnel)
        .await
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("cannot start the migration session with {server}"))?;
    control
        .send_msg(&Control::Prepare { settings })
        .await
        .context("the tunnel server went away")?;
    let direct = match tokio::time::timeout(READY_TIMEOUT, control.recv_msg::<Control>()).await {
        Ok(Ok(Control::Ready { qemu, direct })) => {
            tracing::debug!(%qemu, direct, "destination ready");
            events(SessionEvent::Ready {
                qemu: &qemu,
                server: &server.to_string(),
                direct,
            });
            direct
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
                anyhow!(e).context(
                    "the tunnel server closed the session while preparing the destination",
                ),
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
    let mut pass_fd: Option<OwnedFd> = None;
    if direct {
        let stream = open_data(&opts.tunnel, &session, 0)
            .await
            .map_err(|e| anyhow!(e))
            .context("cannot open the data connection")?;
        pass_fd = Some(direct::into_fd(stream)?.ok_or_else(|| {
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
                session: Some(session),
                ..opts.tunnel
            },
        )
        .map_err(|e| anyhow!(e))?;
        Some(tokio::spawn(client.serve(stop.clone())))
    };

    let target = match pass_fd {
        Some(_) => direct::target(),
        None => QemuTarget::Socket(socket),
    };
    let follow = FollowOptions {
        postcopy_after: opts.postcopy_after,
        detach: false,
    };
    let mut downtime = None;
    let result = async {
        let (qmp, state) = source::connect_source(&opts.qmp, &opts.plan, pass_fd.as_ref()).await?;
        let summary =
            source::run_migration(&qmp, &opts.plan, &target, &state, &follow, progress, cancel)
                .await?;
        downtime = summary.downtime;
        progress.finish(&summary);
        qmp.close().await;
        source::outcome_result(&summary.outcome, &state)
    }
    .await;

    let outcome = match &result {
        Ok(()) => SourceEnd::Completed,
        Err(e) if e.kind() == ErrorKind::Cancelled => SourceEnd::Cancelled,
        Err(_) => SourceEnd::Failed,
    };
    let downtime_ms = downtime.and_then(|d| u64::try_from(d.as_millis()).ok());
    let verdict = destination_verdict(&mut control, outcome, downtime_ms).await;
    stop.cancel();
    if let Some(Ok(report)) = match tunnel {
        Some(t) => Some(t.await),
        None => None,
    } {
        tracing::info!("tunnel: {report}");
    }
    drop(dir);

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

/// Tells the server how the source ended and waits for the destination's verdict.
async fn destination_verdict(
    control: &mut TunnelStream,
    outcome: SourceEnd,
    downtime_ms: Option<u64>,
) -> anyhow::Result<Verdict> {
    // The server may already have sent its verdict (the destination finished first) and
    // closed: a failed send is not yet an error.
    let _ = control
        .send_msg(&Control::Finished {
            outcome,
            downtime_ms,
        })
        .await;
    match tokio::time::timeout(DONE_TIMEOUT, control.recv_msg::<Control>()).await {
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
        Ok(Err(e)) => Err(anyhow!(e).context("the tunnel server closed the session")),
        Err(_) => Err(anyhow!(
            "no verdict from the destination within {}s",
            DONE_TIMEOUT.as_secs()
        )),
    }
}
