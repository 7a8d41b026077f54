//! `qmigrate migrate`: the whole migration from the source host in one command.
//!
//! Opens the session's control connection to a `tunnel-server --qmp` (which prepares the
//! destination QEMU and answers ready), runs the tunnel client in-process on a private socket,
//! then does exactly what `send` does, and finally prints the destination's own verdict.

use std::time::Duration;

use anyhow::{anyhow, Context as _};
use qmigrate_transport::protocol::{Control, MigrationSettings};
use qmigrate_transport::{
    open_control, open_data, Client, ClientConfig, Endpoint, Scheme, TunnelStream,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::cmd::send;
use crate::exit::Exit;
use crate::migration::{self, Compression, MigrationPlan, Mode};
use crate::tls::{default_scheme, ClientTlsArgs};
use crate::token::TokenArgs;
use crate::units;

/// How long the destination may take to prepare (QMP, capabilities, `migrate-incoming`).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the destination may take to report its verdict after the source has ended.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

/// Arguments of `qmigrate migrate`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The destination runs `qmigrate tunnel-server --qmp PATH` (or --route NAME=PATH for several \
VMs); it sets the destination QEMU up when this command asks, so the capabilities always match. \
The source QEMU sends to a private socket of this process: there is no socket to manage.

Exit codes: 0 completed on both sides, 1 failed (here or on the destination), 2 usage, \
3 QMP unreachable, 4 cancelled (Ctrl-C, SIGTERM, --timeout; the source VM keeps running).")]
pub struct Args {
    /// The source QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`), or tcp:HOST:PORT.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/qemu-server/vm-source.qmp"
    )]
    pub qmp: String,

    /// The destination tunnel-server: ws://HOST:PORT/[ROUTE], tcp://HOST:PORT/[ROUTE], their
    /// TLS forms wss:// and tls://, or HOST:PORT (TCP, or TLS with a TLS flag). The path names
    /// the route when the server has several VMs.
    #[arg(long, value_name = "URL")]
    pub to: String,

    /// Use N parallel multifd channels (set on both QEMUs).
    #[arg(long, value_name = "N")]
    pub multifd: Option<u32>,

    /// Enable postcopy (on both QEMUs) and switch to it after AFTER complete precopy passes
    /// (default 1; 0 switches at once).
    #[arg(
        long,
        value_name = "AFTER",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1"
    )]
    pub postcopy: Option<u64>,

    /// Bandwidth cap in bytes per second (100M, 1G, 512MiB). Default: unlimited.
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
    pub max_bandwidth: Option<u64>,

    /// Longest pause of the guest at the switch-over, in milliseconds (QEMU's default: 300).
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,

    /// Compress multifd channels (needs --multifd; set on both QEMUs).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<Compression>,

    /// Throttle the guest's CPUs when the migration does not converge.
    #[arg(long)]
    pub auto_converge: bool,

    /// Cancel the migration if it has not ended after DUR (30s, 10m, 1h); exits with 4.
    #[arg(long, value_name = "DUR", value_parser = units::parse_duration)]
    pub timeout: Option<Duration>,

    /// Relay the stream through qmigrate even where the direct data path would do: over
    /// plain TCP with one channel, both QEMUs otherwise take the authenticated tunnel
    /// connection over themselves and no byte goes through qmigrate. (TLS always relays.)
    #[arg(long)]
    pub relay: bool,

    /// Leave the destination VM paused after the migration (no `cont`).
    #[arg(long)]
    pub no_start: bool,

    /// Limit for connecting to the tunnel server.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = units::parse_duration)]
    pub connect_timeout: Duration,

    /// One JSON object per line on stdout: progress ticks, the summary, then the destination's
    /// verdict (`"type": "destination"`).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub token: TokenArgs,

    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// Runs `qmigrate migrate`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Every flag is checked before either QEMU is touched: a destination that has run
    // `migrate-incoming` takes no other migration until it is restarted.
    let plan = MigrationPlan {
        multifd: args.multifd,
        compression: args.compress,
        postcopy: args.postcopy.is_some(),
        auto_converge: args.auto_converge,
        max_bandwidth: args.max_bandwidth,
        downtime_limit: args.downtime_limit,
        ..MigrationPlan::default()
    };
    plan.validate().context(Exit::Usage)?;
    let server = Endpoint::parse(&args.to, default_scheme(Scheme::Tcp, args.tls.any()))
        .context(Exit::Usage)?;
    let tls = args.tls.load(server.scheme)?;
    let settings = MigrationSettings {
        multifd: args.multifd,
        compression: args.compress.map(|c| c.qemu_name().to_owned()),
        postcopy: args.postcopy.is_some(),
        no_start: args.no_start,
        // The direct data path hands the socket itself to QEMU: plain TCP only. QEMU cannot
        // speak our TLS, so tls:// and wss:// always relay.
        direct: server.scheme == Scheme::Tcp && args.multifd.is_none() && !args.relay,
    };

    // The source first: a wrong path or a busy QMP socket must not leave a prepared
    // destination behind.
    {
        let qmp = migration::connect_qmp(&args.qmp).await?;
        migration::preflight_source(&qmp).await?;
        qmp.close().await;
    }

    let config = ClientConfig {
        connect_timeout: args.connect_timeout,
        token: args.token.load()?,
        tls,
        ..ClientConfig::new(server.clone())
    };
    let (mut control, session) = open_control(&config)
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
            if !args.json {
                let path = if direct {
                    "direct data path"
                } else {
                    "relayed"
                };
                eprintln!("destination ready (QEMU {qemu}) at {server}, {path}");
            }
            direct
        }
        Ok(Ok(Control::Failed { message })) => {
            return Err(anyhow!("the destination refused: {message}")).context(Exit::Failed)
        }
        Ok(Ok(other)) => {
            return Err(anyhow!(
                "unexpected answer from the tunnel server: {other:?}"
            ))
            .context(Exit::Failed)
        }
        Ok(Err(e)) => {
            return Err(anyhow!(e))
                .context("the tunnel server closed the session while preparing the destination")
                .context(Exit::Failed)
        }
        Err(_) => {
            return Err(anyhow!(
                "the destination was not ready after {}s",
                READY_TIMEOUT.as_secs()
            ))
            .context(Exit::Failed)
        }
    };

    // The direct data path: one tunnel connection, handed to the source QEMU as it is.
    let mut pass_fd = None;
    if direct {
        let stream = open_data(&config, &session, 0)
            .await
            .map_err(|e| anyhow!(e))
            .context("cannot open the data connection")?;
        let TunnelStream::Tcp(tcp) = stream else {
            return Err(anyhow!("the direct data path needs plain TCP")).context(Exit::Failed);
        };
        let tcp = tcp
            .into_std()
            .context("taking the tunnel connection over")?;
        tcp.set_nonblocking(false)?;
        pass_fd = Some(std::os::fd::OwnedFd::from(tcp));
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
                ..config
            },
        )?;
        Some(tokio::spawn(client.serve(stop.clone())))
    };

    let result = send::run(send::Args {
        qmp: args.qmp,
        socket,
        to: pass_fd.is_some().then(|| format!("fd:{}", send::DIRECT_FD)),
        multifd: args.multifd,
        mode: Mode::Normal,
        quit: false,
        postcopy: args.postcopy,
        max_bandwidth: args.max_bandwidth,
        downtime_limit: args.downtime_limit,
        compress: args.compress,
        auto_converge: args.auto_converge,
        timeout: args.timeout,
        detach: false,
        json: args.json,
        pass_fd,
    })
    .await;

    let outcome = match &result {
        Ok(()) => "completed",
        Err(e) if e.downcast_ref::<Exit>() == Some(&Exit::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    let verdict = destination_verdict(&mut control, outcome).await;
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
            eprintln!("destination: {e:#}");
            return result.and(Err(e.context(Exit::Failed)));
        }
    };
    print_verdict(&verdict, args.json);
    result?;
    match verdict {
        Control::Done { status, .. } if status == "completed" => Ok(()),
        Control::Done { status, error, .. } => Err(anyhow!(
            "the source completed but the destination reports {status}{}",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ))
        .context(Exit::Failed),
        other => Err(anyhow!("unexpected verdict {other:?}")).context(Exit::Failed),
    }
}

/// Tells the server how the source ended and waits for the destination's verdict.
async fn destination_verdict(control: &mut TunnelStream, outcome: &str) -> anyhow::Result<Control> {
    let finished = Control::Finished {
        outcome: outcome.to_owned(),
    };
    // The server may already have sent its verdict (the destination finished first) and
    // closed: a failed send is not yet an error.
    let _ = control.send_msg(&finished).await;
    match tokio::time::timeout(DONE_TIMEOUT, control.recv_msg::<Control>()).await {
        Ok(Ok(done @ Control::Done { .. })) => Ok(done),
        Ok(Ok(Control::Failed { message })) => Err(anyhow!("{message}")),
        Ok(Ok(other)) => Err(anyhow!("unexpected message {other:?}")),
        Ok(Err(e)) => Err(anyhow!(e).context("the tunnel server closed the session")),
        Err(_) => Err(anyhow!(
            "no verdict from the destination within {}s",
            DONE_TIMEOUT.as_secs()
        )),
    }
}

fn print_verdict(verdict: &Control, json_out: bool) {
    let Control::Done {
        status,
        vm,
        error,
        started,
    } = verdict
    else {
        return;
    };
    if json_out {
        println!(
            "{}",
            json!({"type": "destination", "status": status, "vm": vm, "error": error, "started": started})
        );
        return;
    }
    match error {
        Some(e) => eprintln!("destination: {status}: {e}"),
        None if *started => eprintln!("destination: {status}, VM started ({vm})"),
        None => eprintln!("destination: {status}, VM {vm}"),
    }
}
