//! `qmigrate recover`: resume a postcopy migration left paused, when qmigrate itself is gone
//! (it died, or `migrate` gave up after `--recover-timeout`): one command on the source,
//! against the `tunnel-server --qmp` of the destination, whose QEMU waits paused too.

use std::time::Duration;

use anyhow::Context as _;
use qmigrate_migration::session;
use qmigrate_migration::session::source::{SessionEvent, SessionOptions};
use qmigrate_migration::MigrationPlan;
use qmigrate_transport::{ClientConfig, Endpoint, Scheme};

use crate::args::DeadPeerArgs;
use crate::cmd::migrate::show;
use crate::exit::Exit;
use crate::output;
use crate::signals;
use crate::tls::{default_scheme, ClientTlsArgs};
use crate::token::TokenArgs;
use crate::units;

/// Arguments of `qmigrate recover`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
In postcopy the guest runs on the destination while its memory is still being moved: when \
the network breaks, both QEMUs pause (postcopy-paused) and neither can run the guest alone. \
`qmigrate migrate` reconnects by itself for --recover-timeout; this command does the same \
afterwards: the tunnel-server makes the destination QEMU listen again (migrate-recover), then \
the source resumes (migrate with resume) and the migration is followed to its end.

Exit codes: 0 completed on both sides, 1 failed or still paused, 2 usage (no paused \
migration), 3 QMP unreachable, 4 cancelled.")]
pub struct Args {
    /// The source QEMU's QMP socket, or tcp:HOST:PORT.
    #[arg(long, value_name = "PATH")]
    pub qmp: String,

    /// The destination's tunnel-server (the same URL and route as the migration's).
    #[arg(long, value_name = "URL")]
    pub to: String,

    /// Relay the resumed stream through qmigrate even where the direct data path would do.
    #[arg(long)]
    pub relay: bool,

    /// Leave the destination VM paused after the migration completes (no `cont`).
    #[arg(long)]
    pub no_start: bool,

    /// Limit for connecting to the tunnel server.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = units::parse_duration)]
    pub connect_timeout: Duration,

    /// Keep trying to reach the destination (with backoff) for up to DUR.
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = units::parse_duration_or_off)]
    pub recover_timeout: Duration,

    /// One JSON object per line on stdout (see `qmigrate migrate --json`).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub token: TokenArgs,

    #[command(flatten)]
    pub tls: ClientTlsArgs,

    #[command(flatten)]
    pub dead_peer: DeadPeerArgs,
}

/// Runs `qmigrate recover`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let server = Endpoint::parse(&args.to, default_scheme(Scheme::Tcp, args.tls.any()))
        .context(Exit::Usage)?;
    let tls = args.tls.load(server.scheme)?;
    let tunnel = ClientConfig {
        connect_timeout: args.connect_timeout,
        dead_peer: args.dead_peer.dead_peer(),
        token: args.token.load()?,
        tls,
        ..ClientConfig::new(server)
    };
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
