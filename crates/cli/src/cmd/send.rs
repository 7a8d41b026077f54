//! `qmigrate send`: on the source, start the migration (or the save to a file) and follow it to
//! a truthful end.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use qmigrate_migration::save::{self, Saved};
use qmigrate_migration::source::{self, FollowOptions, Latch};
use qmigrate_migration::storage::{self, NbdRoute};
use qmigrate_migration::{MigrationPlan, Mode, Outcome, Progress, QemuTarget, StreamKind, Summary};
use qmigrate_qmp::{Error as QmpError, Quit};

use crate::args::{CopyStorageArgs, ModeArg, RecoverArgs, SourceTuning};
use crate::exit::Exit;
use crate::output::{self, JsonEvent, SourceSummary};
use crate::signals;
use crate::units::format_bytes;

/// Arguments of `qmigrate send`.
#[derive(Debug, clap::Args)]
#[command(after_help = crate::exit::EXIT_CODES_HELP)]
#[command(
    mut_arg("copy_storage", |a| a
        .help(
            "Copy the local disks to the destination's (non-shared storage): all writable disks, \
             or those named by qdev id (`--copy-storage=vblk0,vblk1`). The destination runs \
             `receive --copy-storage` (its disks exported over NBD) and this host `tunnel-client \
             --copy-storage`, whose NBD socket (--socket's path with the extension .nbd.sock) \
             carries the copy. Each destination image must have its disk's virtual size \
             (checked before anything is copied)"
        )
        .conflicts_with_all(["to", "detach", "postcopy"])),
    mut_arg("copy_storage_inc", |a| a
        .help(
            "As --copy-storage, but only each disk's top image (`sync=top`): the destination's \
             images (`receive --copy-storage-inc`) already sit on the same backing chain"
        )
        .conflicts_with_all(["to", "detach", "postcopy"]))
)]
pub struct Args {
    /// The source QEMU's QMP socket (`-qmp unix:PATH,server=on,wait=off`), or tcp:HOST:PORT.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/run/qemu-server/vm-source.qmp"
    )]
    pub qmp: String,

    /// The tunnel client's Unix socket that QEMU sends the migration stream to.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/tmp/qemu_migration_source.sock"
    )]
    pub socket: PathBuf,

    /// Send to a QEMU URI instead of --socket, without the tunnel: tcp:HOST:PORT, unix:PATH,
    /// ...; or save the VM: file:PATH[,offset=N] (QEMU writes PATH.partial, renamed to PATH
    /// once complete, removed otherwise) or exec:CMD (the stream on CMD's stdin; a simple
    /// command runs without a shell, one with redirections or pipes with /bin/sh -c). A save
    /// pauses the guest first and leaves it paused (postmigrate) when it completes; a save that
    /// fails or is cancelled resumes it.
    #[arg(
        long = "to",
        visible_alias = "uri",
        value_name = "URI",
        conflicts_with = "socket"
    )]
    pub to: Option<String>,

    /// Use N parallel multifd channels (the destination needs the same --multifd N). To a
    /// file: with mapped-ram (QEMU 9.0+), each channel writing its pages at their own offsets;
    /// not with exec: (a pipe).
    #[arg(long, value_name = "N")]
    pub multifd: Option<u32>,

    /// Migration mode. cpr-reboot (QEMU 8.2+, with file:) saves for a restart of QEMU on this
    /// host; with RAM on a shared memory backend (share=on) it stays out of the state file
    /// (x-ignore-shared is set). See the README for the preconditions.
    #[arg(long, value_name = "MODE", default_value = "normal")]
    pub mode: ModeArg,

    /// After a completed migration or save (state file renamed into place), end the source
    /// QEMU (QMP quit).
    #[arg(long, conflicts_with = "detach")]
    pub quit: bool,

    #[command(flatten)]
    pub tuning: SourceTuning,

    /// Start the migration and exit 0 once QEMU reports it under way, without following it
    /// (capabilities are then not restored).
    #[arg(long, conflicts_with_all = ["timeout", "postcopy"])]
    pub detach: bool,

    #[command(flatten)]
    pub storage: CopyStorageArgs,

    #[command(flatten)]
    pub recover: RecoverArgs,

    /// One JSON object per line on stdout: progress ticks, then a summary.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn plan(&self, stream: StreamKind) -> MigrationPlan {
        let mode = Mode::from(self.mode);
        MigrationPlan {
            stream,
            mapped_ram: stream == StreamKind::File && self.multifd.is_some(),
            // Decided in `run`, once the state file's directory has been probed.
            direct_io: false,
            ignore_shared: mode == Mode::CprReboot,
            mode,
            ..self.tuning.plan(self.multifd)
        }
    }

    fn endpoint(&self) -> QemuTarget {
        match &self.to {
            Some(uri) => QemuTarget::from_uri(uri),
            None => QemuTarget::Socket(self.socket.clone()),
        }
    }
}

/// Runs `qmigrate send`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let endpoint = args.endpoint();
    let mut plan = args.plan(endpoint.stream());
    plan.validate().context(Exit::Usage)?;
    if args.detach && plan.stream == StreamKind::File {
        return Err(anyhow!(
            "--detach cannot be used with file:: qmigrate follows the save to rename \
             PATH.partial to PATH once QEMU completes it"
        )
        .context(Exit::Usage));
    }
    // QEMU writes the state to PATH.partial; dropping `partial` without a commit removes it.
    let (partial, endpoint) = save::prepare(endpoint, &mut plan)?;

    let (qmp, source) = source::connect_source(&args.qmp, &plan, None).await?;
    let copy = args.storage.copy();
    let disks = storage::source_disks(&qmp, &copy).await;
    let disks = match disks {
        Ok(disks) => disks,
        Err(err) => {
            qmp.close().await;
            return Err(err.into());
        }
    };
    let nbd = qmigrate_transport::nbd_socket(&args.socket);
    if !disks.is_empty() && !nbd.exists() {
        qmp.close().await;
        return Err(anyhow!(
            "the NBD socket {} does not exist: start `qmigrate tunnel-client --copy-storage \
             --socket {}` first (and `qmigrate receive --copy-storage` on the destination)",
            nbd.display(),
            args.socket.display()
        ));
    }

    // Installed before `migrate` so that Ctrl-C from here on cancels instead of killing us.
    let mut cancel = Latch::new(
        signals::cancellation(args.tuning.timeout).context("cannot install signal handlers")?,
    );
    let opts = FollowOptions {
        detach: args.detach,
        ..args.tuning.follow()
    };
    let mut progress = output::for_send(args.json);
    let summary = if disks.is_empty() {
        let summary = source::run_migration(
            &qmp,
            &plan,
            &endpoint,
            &source,
            &opts,
            progress.as_mut(),
            cancel.wait(),
        )
        .await?;
        let recover = Recover {
            plan: &plan,
            endpoint: &endpoint,
            source: &source,
            opts: &opts,
            timeout: args.recover.recover_timeout,
        };
        recover
            .paused(&qmp, summary, progress.as_mut(), &mut cancel)
            .await?
    } else {
        let exports = storage::exports_of(&disks);
        let route = NbdRoute {
            exports: &exports,
            socket: &nbd,
            nbd_error: &|| None,
        };
        storage::run_with_disks(
            &qmp,
            &plan,
            &endpoint,
            &source,
            &opts,
            &disks,
            route,
            progress.as_mut(),
            &mut cancel,
        )
        .await?
    };

    let saved = match save::finish(
        &qmp,
        &plan,
        &summary,
        partial,
        &endpoint,
        &source,
        progress.as_mut(),
    )
    .await
    {
        Ok(saved) => saved,
        Err(err) => {
            qmp.close().await;
            return Err(err.into());
        }
    };
    report(progress.as_mut(), args.json, &summary, saved.as_ref());
    if args.quit && summary.outcome == Outcome::Completed {
        quit(&qmp).await?;
        tracing::info!("source QEMU quit (--quit)");
    }
    qmp.close().await;

    source::outcome_result(&summary.outcome, &source)?;
    Ok(())
}

/// What the recovery of a postcopy migration that paused resumes.
struct Recover<'a> {
    plan: &'a MigrationPlan,
    endpoint: &'a QemuTarget,
    source: &'a source::SourceState,
    opts: &'a FollowOptions,
    timeout: std::time::Duration,
}

impl Recover<'_> {
    /// When `summary` is a postcopy migration left paused (the network broke): resumes it to
    /// the same endpoint (the tunnel-client's socket) with backoff, until the destination
    /// listens again and the migration ends, or `--recover-timeout` is over or `cancel`
    /// resolved (both QEMUs then stay paused). Any other summary is returned as it is.
    async fn paused<F: std::future::Future<Output = String>>(
        &self,
        qmp: &qmigrate_qmp::Qmp,
        summary: Summary,
        progress: &mut dyn Progress,
        cancel: &mut Latch<F>,
    ) -> anyhow::Result<Summary> {
        let Outcome::PostcopyPaused(reason) = &summary.outcome else {
            return Ok(summary);
        };
        if self.timeout.is_zero() || self.plan.is_save() {
            return Ok(summary);
        }
        if !source::can_retry_resume(qmp) {
            progress.note(&format!(
                "postcopy paused ({reason}): QEMU {} cannot retry a resume that fails (it would \
                 hang in postcopy-recover), so it is not resumed before the network is known to \
                 be back",
                self.source.qemu
            ));
            return Ok(summary);
        }
        progress.note(&format!(
            "postcopy paused ({reason}): resuming through {} once the destination listens again \
             (`receive --wait` there makes it listen by itself; without it, run `qmigrate \
             recover --incoming` there), for up to {}",
            self.endpoint,
            crate::units::format_duration(self.timeout)
        ));
        let summary = source::keep_resuming(
            qmp,
            self.plan,
            self.endpoint,
            self.source,
            self.opts,
            summary,
            self.timeout,
            progress,
            cancel,
        )
        .await?;
        Ok(summary)
    }
}

/// Prints the summary, with the state file and its size (or the command) after a save.
fn report(progress: &mut dyn Progress, json: bool, summary: &Summary, saved: Option<&Saved>) {
    match (saved, json) {
        (None, _) => progress.finish(summary),
        (Some(saved), true) => {
            // JSON lines: the same summary object, with the save's facts in it.
            let mut event = SourceSummary::new(summary);
            match saved {
                Saved::File {
                    path,
                    size,
                    direct_io,
                } => {
                    event.file = Some(path.display().to_string());
                    event.file_size = Some(*size);
                    event.direct_io = Some(*direct_io);
                }
                Saved::Command(command) => event.command = Some(command.clone()),
            }
            JsonEvent::Summary(event).emit();
        }
        (Some(saved), false) => {
            progress.finish(summary);
            match saved {
                Saved::File {
                    path,
                    size,
                    direct_io,
                } => eprintln!(
                    "  state file   {} ({}{})",
                    path.display(),
                    format_bytes(*size),
                    if *direct_io {
                        ", pages written with O_DIRECT"
                    } else {
                        ""
                    }
                ),
                Saved::Command(command) => eprintln!("  written to   exec:{command}"),
            }
        }
    }
}

/// Ends the source QEMU; its reply may be lost as it exits, which is success too.
async fn quit(qmp: &qmigrate_qmp::Qmp) -> anyhow::Result<()> {
    match qmp.execute(&Quit).await {
        Ok(_) | Err(QmpError::Disconnected) => Ok(()),
        Err(err) => bail!("--quit: QEMU refused to quit: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use qmigrate_migration::{PlanError, QemuTarget};

    use super::Args;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("send").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn postcopy_after_defaults_to_one_pass() {
        assert_eq!(parse(&[]).expect("no flags").tuning.postcopy, None);
        assert_eq!(
            parse(&["--postcopy"]).expect("bare").tuning.postcopy,
            Some(1)
        );
        assert_eq!(
            parse(&["--postcopy=0"]).expect("=0").tuning.postcopy,
            Some(0)
        );
        // `--postcopy 3` would be ambiguous with a following positional; only `=` is accepted.
        assert!(parse(&["--postcopy", "3"]).is_err());
    }

    #[test]
    fn units_and_conflicts() {
        let args = parse(&["--max-bandwidth", "512MiB", "--timeout", "10m"]).expect("valid");
        assert_eq!(args.tuning.max_bandwidth, Some(512 << 20));
        assert_eq!(
            args.tuning.timeout,
            Some(std::time::Duration::from_secs(600))
        );
        assert!(parse(&["--uri", "tcp:h:1", "--socket", "/x"]).is_err());
        assert!(parse(&["--to", "tcp:h:1", "--socket", "/x"]).is_err());
        assert!(parse(&["--quit", "--detach"]).is_err());
        assert!(parse(&["--detach", "--timeout", "1s"]).is_err());
        assert!(parse(&["--compress", "lz4"]).is_err());
    }

    #[test]
    fn recover_timeout_defaults_to_ten_minutes() {
        use std::time::Duration;
        let args = parse(&["--postcopy"]).expect("bare");
        assert_eq!(args.recover.recover_timeout, Duration::from_secs(600));
        let args = parse(&["--postcopy", "--recover-timeout", "off"]).expect("off");
        assert_eq!(args.recover.recover_timeout, Duration::ZERO);
        let args = parse(&["--copy-storage=vblk0"]).expect("copy");
        assert!(args.storage.copy().any());
        assert!(parse(&["--copy-storage", "--postcopy"]).is_err());
        assert!(parse(&["--copy-storage-inc", "--detach"]).is_err());
    }

    #[test]
    fn to_and_uri_are_one_option() {
        let to = parse(&["--to", "file:/tmp/state.bin"]).expect("--to");
        let uri = parse(&["--uri", "file:/tmp/state.bin"]).expect("--uri");
        assert_eq!(to.to, uri.to);
        assert_eq!(
            to.endpoint(),
            QemuTarget::File {
                path: "/tmp/state.bin".into(),
                offset: 0
            }
        );
    }

    #[test]
    fn save_plans() {
        let args = parse(&["--to", "file:/tmp/s", "--multifd", "4"]).expect("valid");
        let plan = args.plan(args.endpoint().stream());
        assert!(plan.mapped_ram);
        assert_eq!(plan.validate(), Ok(()));
        assert_eq!(plan.describe(), "multifd 4, mapped-ram");

        let args = parse(&["--to", "exec:gzip -c > /tmp/s", "--multifd", "4"]).expect("parses");
        let plan = args.plan(args.endpoint().stream());
        assert_eq!(plan.validate(), Err(PlanError::MultifdWithPipe));

        let args = parse(&["--to", "file:/tmp/s", "--postcopy"]).expect("parses");
        let plan = args.plan(args.endpoint().stream());
        assert_eq!(plan.validate(), Err(PlanError::PostcopyToFile));

        let args = parse(&["--to", "tcp:h:1", "--mode", "cpr-reboot"]).expect("parses");
        let plan = args.plan(args.endpoint().stream());
        assert_eq!(plan.validate(), Err(PlanError::CprRebootLive));

        let args = parse(&["--to", "file:/tmp/s", "--mode", "cpr-reboot"]).expect("parses");
        let plan = args.plan(args.endpoint().stream());
        assert!(plan.ignore_shared);
        assert_eq!(plan.validate(), Ok(()));
    }
}
