//! `qmigrate recover`: resume a postcopy migration left paused, when qmigrate itself is gone
//! (it died, `migrate` gave up after `--recover-timeout`, or `send` ended paused): one command
//! on the source against the `tunnel-server --qmp` of the destination (`--to`), or, step by
//! step through a tunnel-client and tunnel-server, one on each side (`--socket`).

use std::time::Duration;

use anyhow::Context as _;
use qmigrate_migration::session;
use qmigrate_migration::session::source::{SessionEvent, SessionOptions};
use qmigrate_migration::source;
use qmigrate_migration::{destination, monitor, MigrationPlan, QemuTarget};
use qmigrate_transport::Scheme;

use crate::args::TunnelClientArgs;
use crate::cmd::migrate::show;
use crate::exit::Exit;
use crate::output;
use crate::signals;
use crate::units;

/// Arguments of `qmigrate recover`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
In postcopy the guest runs on the destination while its memory is still being moved: when \
the network breaks, both QEMUs pause (postcopy-paused) and neither can run the guest alone. \
`qmigrate migrate` reconnects by itself for --recover-timeout; this command does the same \
afterwards: the tunnel-server makes the destination QEMU listen again (migrate-recover), then \
the source resumes (migrate with resume) and the migration is followed to its end.

Step by step (after `send`, through tunnel-client and tunnel-server): on the destination
`qmigrate recover --incoming --qmp DST --socket PATH` (the tunnel-server's --socket) makes it
listen again; then on the source `qmigrate recover --qmp SRC --socket PATH` (the
tunnel-client's --socket) resumes and follows it.

Exit codes: 0 completed on both sides, 1 failed or still paused, 2 usage (no paused \
migration), 3 QMP unreachable, 4 cancelled.")]
pub struct Args {
    /// The source QEMU's QMP socket, or tcp:HOST:PORT.
    #[arg(long, value_name = "PATH")]
    pub qmp: String,

    /// The destination's tunnel-server --qmp (the same URL and route as the migration's).
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "socket",
        conflicts_with = "socket"
    )]
    pub to: Option<String>,

    /// Step by step: the migration socket (the tunnel-client's on the source; with
    /// --incoming, the one the tunnel-server connects to on the destination).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,

    /// With --socket: this is the destination; make its paused QEMU listen again on the
    /// socket (migrate-recover) and return. Run it before the source's `recover`.
    #[arg(long, requires = "socket")]
    pub incoming: bool,

    /// Relay the resumed stream through qmigrate even where the direct data path would do.
    #[arg(long)]
    pub relay: bool,

    /// Leave the destination VM paused after the migration completes (no `cont`).
    #[arg(long)]
    pub no_start: bool,

    /// Keep trying to reach the destination (with backoff) for up to DUR.
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = units::parse_duration_or_off)]
    pub recover_timeout: Duration,

    /// One JSON object per line on stdout (see `qmigrate migrate --json`).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub tunnel: TunnelClientArgs,
}

/// Runs `qmigrate recover`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let Some(to) = &args.to else {
        return step_by_step(args).await;
    };
    let server = args.tunnel.server(to, Scheme::Tcp)?;
    let tunnel = args.tunnel.client_config(server)?;
    let opts = SessionOptions {
        qmp: args.qmp,
        plan: MigrationPlan {
            postcopy: true,
            ..MigrationPlan::default()
        },
        follow: Default::default(),
        tunnel,
        relay: args.relay,
        no_start: args.no_start,
        recover_timeout: args.recover_timeout.max(Duration::from_secs(1)),
        storage: Default::default(),
    };
    let json = args.json;
    let mut events = |event: SessionEvent<'_>| show(event, json);
    let mut progress = output::for_send(json);
    let cancel = signals::cancellation(None).context("cannot install signal handlers")?;
    session::source::recover(opts, progress.as_mut(), &mut events, cancel).await?;
    Ok(())
}

/// One side of a step-by-step recovery, over the tunnel-client's or tunnel-server's socket.
async fn step_by_step(args: Args) -> anyhow::Result<()> {
    let Some(socket) = args.socket else {
        return Err(anyhow::anyhow!("--to URL or --socket PATH is needed")).context(Exit::Usage);
    };
    let target = QemuTarget::Socket(socket);
    let qmp = monitor::connect_qmp(&args.qmp).await?;
    if args.incoming {
        destination::listen_for_recovery(&qmp, &target).await?;
        qmp.close().await;
        eprintln!(
            "the destination listens again at {target}: now run `qmigrate recover --qmp SRC \
             --socket PATH` on the source"
        );
        return Ok(());
    }
    monitor::check_migration_socket(target_path(&target))?;
    let mut progress = output::for_send(args.json);
    let cancel = signals::cancellation(None).context("cannot install signal handlers")?;
    let (summary, state) = source::resume_paused(
        &qmp,
        &target,
        args.recover_timeout,
        progress.as_mut(),
        cancel,
    )
    .await?;
    progress.finish(&summary);
    qmp.close().await;
    source::outcome_result(&summary.outcome, &state)?;
    Ok(())
}

fn target_path(target: &QemuTarget) -> &std::path::Path {
    match target {
        QemuTarget::Socket(path) => path,
        _ => std::path::Path::new(""),
    }
}
