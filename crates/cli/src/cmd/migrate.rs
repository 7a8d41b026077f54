//! `qmigrate migrate`: the whole migration from the source host in one command.
//!
//! The flags become one plan and the tunnel's settings; the migration engine's control session
//! ([`qmigrate_migration::session::source`]) does the rest. This file shows what it reports.

use anyhow::Context as _;
use qmigrate_migration::session;
use qmigrate_migration::session::source::{SessionEvent, SessionOptions};
use qmigrate_migration::storage::StorageCopy;
use qmigrate_transport::Scheme;

use crate::args::TunnelClientArgs;
use crate::args::{CopyStorageArgs, RecoverArgs, SourceTuning};
use crate::exit::Exit;
use crate::output::{self, JsonEvent};
use crate::signals;

/// Arguments of `qmigrate migrate`.
#[derive(Debug, clap::Args)]
#[command(
    mut_arg("postcopy", |a| a.help(
        "Enable postcopy (on both QEMUs) and switch to it after AFTER complete precopy passes \
         (default 1; 0 switches at once)"
    )),
    mut_arg("max_bandwidth", |a| a.help(
        "Bandwidth cap in bytes per second (100M, 1G, 512MiB). Default: unlimited"
    )),
    mut_arg("compress", |a| a.help("Compress multifd channels (needs --multifd; set on both QEMUs)")),
    mut_arg("copy_storage", |a| a.help(
        "Copy the local disks to the destination's (non-shared storage): all writable disks, or \
         those named by qdev id (`--copy-storage=vblk0,vblk1`); read-only drives and CD-ROMs \
         never. The destination VM must have the same devices, each with its own image of the \
         same virtual size (an empty one will do: `qemu-img create -f qcow2 IMAGE SIZE`)"
    )),
    mut_arg("copy_storage_inc", |a| a.help(
        "As --copy-storage, but only each disk's top image (`blockdev-mirror sync=top`): the \
         destination's images already sit on the same backing chain (a copy of the source's \
         base images), so only what the top images hold is copied"
    ))
)]
#[command(after_help = "\
The destination runs `qmigrate tunnel-server --qmp PATH` (or --route NAME=PATH for several \
VMs); it sets the destination QEMU up when this command asks, so the capabilities always match. \
The source QEMU sends to a private socket of this process: there is no socket to manage.

On tcp:// and ws:// nothing protects the bytes themselves: the token authenticates the \
connection, not the data, and the stream (the guest's memory) travels in the clear, so a bit \
flipped on the wire (faulty hardware, or anyone on the path) reaches the destination QEMU \
unnoticed. Across a network you do not trust, use tls:// or wss://: TLS encrypts every byte and \
refuses any that was altered.

Exit codes: 0 completed on both sides, 1 failed (here or on the destination), 2 usage, \
3 QMP unreachable, 4 cancelled (Ctrl-C, SIGTERM, --timeout; the source VM keeps running).

With --copy-storage the disks are mirrored to the destination's NBD exports first (progress per disk), kept in sync while the RAM migrates, and completed with the vCPUs stopped; a migration that does not complete leaves the destination's images incomplete.")]
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

    #[command(flatten)]
    pub tuning: SourceTuning,

    /// Relay the stream through qmigrate even where the direct data path would do: over
    /// plain TCP with one channel, both QEMUs otherwise take the authenticated tunnel
    /// connection over themselves and no byte goes through qmigrate. (TLS always relays.)
    #[arg(long)]
    pub relay: bool,

    /// Leave the destination VM paused after the migration (no `cont`).
    #[arg(long)]
    pub no_start: bool,

    #[command(flatten)]
    pub storage: CopyStorageArgs,

    #[command(flatten)]
    pub recover: RecoverArgs,

    /// One JSON object per line on stdout: progress ticks, the summary, then the destination's
    /// verdict (`"type": "destination"`).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub tunnel: TunnelClientArgs,
}

/// Runs `qmigrate migrate`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Every flag is checked before either QEMU is touched: a destination that has run
    // `migrate-incoming` takes no other migration until it is restarted.
    let plan = args.tuning.plan(args.multifd);
    plan.validate().context(Exit::Usage)?;
    let server = args.tunnel.server(&args.to, Scheme::Tcp)?;
    let tunnel = args.tunnel.client_config(server)?;
    let opts = SessionOptions {
        qmp: args.qmp,
        plan,
        follow: args.tuning.follow(),
        tunnel,
        relay: args.relay,
        no_start: args.no_start,
        recover_timeout: args.recover.recover_timeout,
        storage: StorageCopy::parse(
            args.storage.copy_storage.as_deref(),
            args.storage.copy_storage_inc.as_deref(),
        ),
    };

    let json = args.json;
    let mut events = |event: SessionEvent<'_>| show(event, json);
    let mut progress = output::for_send(json);
    // Installed before anything is touched, so that Ctrl-C from here on cancels (the source
    // VM keeps running and the destination is told) instead of killing us half-way.
    let cancel =
        signals::cancellation(args.tuning.timeout).context("cannot install signal handlers")?;
    session::source::run(opts, progress.as_mut(), &mut events, cancel).await?;
    Ok(())
}

/// What the session shows besides the migration's progress: the destination's readiness and
/// its verdict.
pub(crate) fn show(event: SessionEvent<'_>, json: bool) {
    match event {
        SessionEvent::Ready {
            qemu,
            server,
            direct,
        } => {
            if !json {
                let path = if direct {
                    "direct data path"
                } else {
                    "relayed"
                };
                eprintln!("destination ready (QEMU {qemu}) at {server}, {path}");
            }
        }
        SessionEvent::VerdictLost(e) => eprintln!(
            "destination: no verdict ({e:#}); if the source completed, the guest is on the \
             destination: check it there (QMP query-status; `cont` if it is paused)"
        ),
        SessionEvent::Verdict(verdict) => {
            if json {
                JsonEvent::Destination {
                    status: verdict.status.to_string(),
                    vm: verdict.vm.to_string(),
                    error: verdict.error.clone(),
                    started: verdict.started,
                }
                .emit();
                return;
            }
            let (status, vm) = (&verdict.status, &verdict.vm);
            match &verdict.error {
                Some(e) => eprintln!("destination: {status}: {e}"),
                None if verdict.started => eprintln!("destination: {status}, VM started ({vm})"),
                None => eprintln!("destination: {status}, VM {vm}"),
            }
        }
    }
}
