//! `qmigrate receive`: on the destination, make a QEMU started with `-incoming defer` listen for
//! the migration with the capabilities the source will use, or restore a saved state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use qmigrate_migration::destination::{
    check_waiting_for_incoming, follow_and_recover, follow_incoming, prepare_incoming,
    IncomingOutcome, Recovery,
};
use qmigrate_migration::statefile::{self, StateFile};
use qmigrate_migration::storage::{self, StorageCopy};
use qmigrate_migration::{monitor, MigrationPlan, Mode, QemuTarget, StreamKind};
use qmigrate_qmp::{MigrationStatus, Qmp};

use crate::args::{CompressArg, CopyStorageArgs, ModeArg, RecoverArgs};
use crate::exit::Exit;
use crate::output::JsonEvent;
use crate::signals;
use crate::units::{self, format_bytes, format_duration};

/// Arguments of `qmigrate receive`.
#[derive(Debug, clap::Args)]
#[command(after_help = crate::exit::EXIT_CODES_HELP)]
#[command(
    mut_arg("copy_storage", |a| a
        .help(
            "Copy disks from the source (`send --copy-storage`): all writable disks of this VM, \
             or those named by qdev id. Exports them (writable) from QEMU's NBD server on \
             --socket's path with the extension .nbd.sock, where `tunnel-server` sends the NBD \
             connections; follows the migration (as --wait does) and stops the NBD server before \
             the guest may start. Start the destination QEMU with -S, on images of the source \
             disks' virtual sizes"
        )
        .conflicts_with_all(["from", "postcopy"])),
    mut_arg("copy_storage_inc", |a| a
        .help(
            "As --copy-storage, for `send --copy-storage-inc`: only the top images are copied, \
             so each exported image must have a backing file (a copy of the source's backing \
             chain)"
        )
        .conflicts_with_all(["from", "postcopy"]))
)]
pub struct Args {
    /// The destination QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`), or
    /// tcp:HOST:PORT.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/qemu-server/vm-dest.qmp"
    )]
    pub qmp: String,

    /// The Unix socket QEMU listens on; the tunnel server connects to it.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/tmp/qemu_migration_dest.sock"
    )]
    pub socket: PathBuf,

    /// Receive from a QEMU URI instead of --socket, without the tunnel: tcp:HOST:PORT,
    /// unix:PATH, ...; or restore a saved VM: file:PATH[,offset=N] (checked before QEMU is
    /// asked: it must exist and start with QEMU's stream header; the capabilities it was saved
    /// with, mapped-ram and x-ignore-shared, are set to match) or exec:CMD (the stream from
    /// CMD's stdout).
    #[arg(
        long = "from",
        visible_alias = "uri",
        value_name = "URI",
        conflicts_with = "socket"
    )]
    pub from: Option<String>,

    /// Expect N multifd channels (must match the source's --multifd N). From a file: load a
    /// mapped-ram state (saved with --multifd) with N parallel channels.
    #[arg(long, value_name = "N")]
    pub multifd: Option<u32>,

    /// Expect compressed multifd channels (must match the source's --compress).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<CompressArg>,

    /// Accept postcopy (must be given when the source uses --postcopy).
    #[arg(long)]
    pub postcopy: bool,

    /// Migration mode; give cpr-reboot when the state was saved with --mode cpr-reboot.
    #[arg(long, value_name = "MODE", default_value = "normal")]
    pub mode: ModeArg,

    /// Follow the migration to its end and exit 0 only if it completed. With --postcopy,
    /// recover it when the network breaks: once the destination is postcopy-paused it listens
    /// again on the same socket (migrate-recover) for the source's resume (`send` retries it),
    /// for --recover-timeout; without --wait, `qmigrate recover --incoming` does that step.
    #[arg(long)]
    pub wait: bool,

    /// After completion, start the guest if it is paused (QEMU started with -S, or a state
    /// saved by `send --to file:`, which pauses the guest first); implies --wait.
    #[arg(long)]
    pub start: bool,

    #[command(flatten)]
    pub storage: CopyStorageArgs,

    #[command(flatten)]
    pub recover: RecoverArgs,

    /// With --copy-storage or --copy-storage-inc: give up when no disk data has arrived for
    /// DUR (from the export on) while the RAM migration has not begun: the source stopped
    /// sending (`send` died, its host or the link is down). Stops the NBD server and exits 1;
    /// the images are then incomplete. `off` waits for ever.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = units::parse_duration_or_off)]
    pub stall_timeout: Duration,

    /// Print the ready message (and with --wait the result) as JSON objects on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn endpoint(&self) -> QemuTarget {
        match &self.from {
            Some(uri) => QemuTarget::from_uri(uri),
            None => QemuTarget::Socket(self.socket.clone()),
        }
    }

    /// The plan, with the capabilities a state file records taken from its header.
    fn plan(&self, stream: StreamKind, state: Option<&StateFile>) -> anyhow::Result<MigrationPlan> {
        let mode = Mode::from(self.mode);
        let mut plan = MigrationPlan {
            stream,
            mapped_ram: stream == StreamKind::File && self.multifd.is_some(),
            ignore_shared: mode == Mode::CprReboot,
            mode,
            multifd: self.multifd,
            compression: self.compress.map(Into::into),
            postcopy: self.postcopy,
            ..MigrationPlan::default()
        };
        if let Some(state) = state {
            plan = statefile::fit_plan_to_state(plan, state).context(Exit::Usage)?;
        }
        Ok(plan)
    }
}

/// Runs `qmigrate receive`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let endpoint = args.endpoint();
    let state = match &endpoint {
        QemuTarget::File { path, offset } => Some(statefile::inspect(path, *offset)?),
        _ => None,
    };
    let mut plan = args.plan(endpoint.stream(), state.as_ref())?;
    plan.validate().context(Exit::Usage)?;
    if let (Some(state), true, Some(_)) = (&state, plan.mapped_ram, plan.multifd) {
        // The channels read pages straight into guest RAM instead of through the page cache:
        // a 1 GiB restore with 4 channels from a cold cache took 0.76-1.34 s here instead of
        // 1.67-2.07 s (BENCHMARKS.md).
        plan.direct_io = statefile::can_read_direct(&state.path);
    }
    let copy = args.storage.copy();
    let copying = copy.any();
    let follow = args.wait || args.start || copying;

    let qmp = monitor::connect_qmp(&args.qmp).await?;
    let started = Instant::now();
    // The disks first: a refusal leaves the destination as it was.
    let nbd = qmigrate_transport::nbd_socket(&args.socket);
    let exported = if copying {
        export(&qmp, &copy, &nbd).await
    } else {
        Ok(Vec::new())
    };
    let exported = match exported {
        Ok(e) => e,
        Err(err) => {
            qmp.close().await;
            return Err(err);
        }
    };
    let incoming = match prepare_incoming(&qmp, &plan, &endpoint, follow && plan.is_save()).await {
        Ok(incoming) => incoming,
        Err(err) => {
            if copying {
                storage::stop_nbd_server(&qmp).await;
            }
            qmp.close().await;
            return Err(err.into());
        }
    };
    if args.json {
        JsonEvent::Ready {
            endpoint: incoming.endpoint.clone(),
            multifd: plan.multifd,
            compress: plan.compression.map(|c| c.qemu_name().to_owned()),
            postcopy: plan.postcopy,
            mapped_ram: plan.mapped_ram,
            direct_io: plan.direct_io,
            channels: incoming.channels,
            file_size: state.as_ref().map(|s| s.size),
        }
        .emit();
    } else if plan.is_save() {
        println!(
            "ready: destination QEMU loads from {} ({})",
            incoming.endpoint,
            plan.describe()
        );
    } else {
        println!(
            "ready: destination QEMU listens on {} ({})",
            incoming.endpoint,
            plan.describe()
        );
    }

    if copying && !args.json {
        println!(
            "disks exported over NBD on unix:{}: {}",
            nbd.display(),
            exported.join(", ")
        );
    }

    // Postcopy paused by the network is recovered here only while this command follows.
    let recovering = plan.postcopy && follow && !copying && !plan.is_save();
    if plan.postcopy && !args.json {
        if recovering {
            eprintln!(
                "postcopy: following the migration; if the network breaks, the destination \
                 listens again on {} for the source's resume (for up to {})",
                incoming.endpoint,
                format_duration(args.recover.recover_timeout)
            );
        } else if !follow {
            eprintln!(
                "postcopy: if the network breaks during postcopy, nothing here makes the \
                 destination listen again: run `qmigrate recover --incoming` then, or use \
                 --wait, which does it"
            );
        }
    }

    if !follow {
        // QMP serves one client at a time: let go so the operator's tools can look.
        qmp.close().await;
        return Ok(());
    }
    let outcome = if copying {
        follow_copy(&qmp, args.start, args.stall_timeout).await
    } else if recovering {
        let recovery = Recovery {
            target: endpoint.clone(),
            timeout: args.recover.recover_timeout,
        };
        follow_recovering(&qmp, args.start, &recovery, args.json).await
    } else {
        follow_incoming(&qmp, args.start).await.map_err(Into::into)
    };
    qmp.close().await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(err) if plan.is_save() => {
            return Err(err.context(format!("restoring from {endpoint} failed")))
        }
        Err(err) => return Err(err),
    };
    let elapsed = started.elapsed();
    let status = outcome.status.to_string();
    let vm = outcome.run_state.to_string();
    if args.json {
        JsonEvent::Received {
            status: status.clone(),
            vm: vm.clone(),
            error: outcome.error.clone(),
            started: outcome.started,
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            file: state.as_ref().map(|s| s.path.display().to_string()),
            file_size: state.as_ref().map(|s| s.size),
        }
        .emit();
    } else if let Some(state) = &state {
        eprintln!(
            "restore {status} in {} from {} ({}); destination VM {vm}",
            format_duration(elapsed),
            state.path.display(),
            format_bytes(state.size)
        );
    } else if plan.is_save() {
        eprintln!(
            "restore {status} in {} from {endpoint}; destination VM {vm}",
            format_duration(elapsed)
        );
    } else {
        eprintln!("incoming migration {status}; destination VM {vm}");
    }
    match outcome.status {
        MigrationStatus::Completed => Ok(()),
        MigrationStatus::PostcopyPaused => {
            let reason = outcome.error.unwrap_or_default();
            Err(anyhow!(
                "{reason}: once the network is back, `qmigrate recover --qmp SRC --socket PATH` \
                 on the source resumes it (run `qmigrate recover --incoming` here first if it \
                 pauses again)"
            )
            .context(Exit::Failed))
        }
        _ => {
            let reason = outcome
                .error
                .unwrap_or_else(|| format!("the incoming migration ended as {status}"));
            let err = if plan.is_save() {
                // With exit-on-error off QEMU stays up, but cannot load anything else now.
                let left = if incoming.stays_on_error {
                    format!(
                        "; the destination QEMU is left as it is ({vm}): quit it, and start a \
                         new one to try again"
                    )
                } else {
                    String::new()
                };
                anyhow!(
                    "restoring from {endpoint} failed: {reason} (the state is truncated, \
                     corrupted, or from a differently configured VM){left}"
                )
            } else {
                anyhow!("{reason}")
            };
            Err(err.context(Exit::Failed))
        }
    }
}

/// `--copy-storage`: exports the selected disks of the destination VM over NBD on `nbd`
/// (checked first: it must wait for an incoming migration); their names with sizes.
async fn export(qmp: &Qmp, copy: &StorageCopy, nbd: &Path) -> anyhow::Result<Vec<String>> {
    check_waiting_for_incoming(qmp).await?;
    let disks = storage::select_disks(qmp, copy, "destination").await?;
    let wanted: Vec<_> = disks.iter().map(|d| d.disk.clone()).collect();
    let exports = storage::export_disks(qmp, &wanted, nbd).await?;
    Ok(exports
        .iter()
        .map(|e| {
            let size = wanted.iter().find(|d| d.id == e.disk).map_or(0, |d| d.size);
            format!("{} ({size} bytes)", e.name)
        })
        .collect())
}

/// Follows an incoming postcopy migration, making the destination listen again whenever the
/// network breaks ([`follow_and_recover`]); says what happens on stderr (or as JSON notes).
/// Ctrl-C or SIGTERM stop following and leave the destination as it is.
async fn follow_recovering(
    qmp: &Qmp,
    start: bool,
    recovery: &Recovery,
    json: bool,
) -> anyhow::Result<IncomingOutcome> {
    let cancel = signals::cancellation(None).context("cannot install signal handlers")?;
    let mut note = |message: &str| {
        if json {
            JsonEvent::Note {
                message: message.to_owned(),
            }
            .emit();
        } else {
            eprintln!("{message}");
        }
    };
    Ok(follow_and_recover(qmp, start, Some(recovery), &mut note, cancel).await?)
}

/// Follows an incoming migration that copies disks: the guest is not started by
/// [`follow_incoming`], since the NBD server must stop first ([`storage::finish_incoming`]).
/// Ctrl-C or SIGTERM, or no disk data for `stall` before the RAM migration ([`storage::CopyWatch`]),
/// stop the NBD server and end with the images incomplete.
async fn follow_copy(qmp: &Qmp, start: bool, stall: Duration) -> anyhow::Result<IncomingOutcome> {
    let cancel = signals::cancellation(None).context("cannot install signal handlers")?;
    let watch = storage::CopyWatch::start(qmp, stall).await;
    let incomplete = "the NBD server is stopped and the destination's disk images are \
                      incomplete; restart the destination QEMU before another attempt";
    let outcome = tokio::select! {
        outcome = follow_incoming(qmp, false) => outcome,
        reason = cancel => {
            watch.remove(qmp).await;
            storage::stop_nbd_server(qmp).await;
            return Err(anyhow!("{reason}: {incomplete}").context(Exit::Cancelled));
        }
        err = watch.stalled(qmp) => {
            watch.remove(qmp).await;
            storage::stop_nbd_server(qmp).await;
            return Err(anyhow!("{err:#}; {incomplete}").context(Exit::Failed));
        }
    };
    watch.remove(qmp).await;
    let mut outcome = match outcome {
        Ok(outcome) => outcome,
        Err(err) => {
            // A destination whose migration failed may have exited (QEMU's default).
            storage::stop_nbd_server(qmp).await;
            return Err(err.into());
        }
    };
    storage::finish_incoming(qmp, &mut outcome, start).await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use qmigrate_migration::statefile::StateHeader;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("receive").chain(args.iter().copied()))
            .map(|c| c.args)
            .expect("valid arguments")
    }

    fn state(capabilities: &[&str]) -> StateFile {
        StateFile {
            path: "/s".into(),
            size: 1,
            header: StateHeader {
                machine: Some("pc-q35-10.0".into()),
                capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            },
        }
    }

    #[test]
    fn shared_flags_parse_alike() {
        let args = parse(&["--postcopy", "--wait", "--recover-timeout", "90s"]);
        assert_eq!(
            args.recover.recover_timeout,
            std::time::Duration::from_secs(90)
        );
        assert!(parse(&["--copy-storage-inc"]).storage.copy().any());
        assert!(!parse(&[]).storage.copy().any());
        let refused = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("receive").chain(a.iter().copied())).is_err()
        };
        assert!(refused(&["--copy-storage", "--postcopy"]));
        assert!(refused(&["--copy-storage-inc", "--from", "tcp:h:1"]));
        assert!(refused(&["--copy-storage", "--copy-storage-inc"]));
    }

    #[test]
    fn capabilities_follow_the_state_file() {
        let args = parse(&["--from", "file:/s", "--multifd", "4"]);
        let plan = args
            .plan(StreamKind::File, Some(&state(&["mapped-ram"])))
            .expect("mapped-ram with multifd");
        assert!(plan.mapped_ram);
        let err = args
            .plan(StreamKind::File, Some(&state(&[])))
            .expect_err("multifd for a plain file");
        let said = crate::hints::report(&err);
        assert!(said.contains("without --multifd"), "{said}");

        let args = parse(&["--uri", "file:/s"]);
        let plan = args
            .plan(
                StreamKind::File,
                Some(&state(&["mapped-ram", "x-ignore-shared"])),
            )
            .expect("plain");
        assert!(plan.mapped_ram && plan.ignore_shared && plan.multifd.is_none());
        assert_eq!(
            plan.describe(),
            "single channel, mapped-ram, x-ignore-shared"
        );
    }
}
