//! `qmigrate send`: on the source, start the migration and follow it to a truthful end.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

use crate::exit::Exit;
use crate::migration::{self, Compression, Endpoint, FollowOptions, MigrationPlan, Outcome};
use crate::progress;
use crate::signals::Interrupts;
use crate::units::{self, format_duration};

/// Arguments of `qmigrate send`.
#[derive(Debug, clap::Args)]
#[command(after_help = crate::exit::EXIT_CODES_HELP)]
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

    /// Migrate to a legacy QEMU URI instead of --socket (tcp:HOST:PORT, unix:PATH, exec:CMD,
    /// file:PATH, ...), without the tunnel.
    #[arg(long, value_name = "URI", conflicts_with = "socket")]
    pub uri: Option<String>,

    /// Use N parallel multifd channels (the destination needs the same --multifd N).
    #[arg(long, value_name = "N")]
    pub multifd: Option<u32>,

    /// Enable postcopy and switch to it after AFTER complete precopy passes (default 1; 0
    /// switches at once). The destination needs --postcopy too.
    #[arg(
        long,
        value_name = "AFTER",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1"
    )]
    pub postcopy: Option<u64>,

    /// Bandwidth cap in bytes per second (100M, 1G, 512MiB; binary units). Default: unlimited
    /// (QEMU's own default of 128 MiB/s would throttle every migration).
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
    pub max_bandwidth: Option<u64>,

    /// Longest pause of the guest at the switch-over, in milliseconds (QEMU's default: 300).
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,

    /// Compress multifd channels (needs --multifd; the destination needs the same --compress).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<Compression>,

    /// Throttle the guest's CPUs when the migration does not converge.
    #[arg(long)]
    pub auto_converge: bool,

    /// Cancel the migration if it has not ended after DUR (30s, 10m, 1h); exits with 4.
    #[arg(long, value_name = "DUR", value_parser = units::parse_duration)]
    pub timeout: Option<Duration>,

    /// Start the migration and exit 0 once QEMU reports it under way, without following it
    /// (capabilities are then not restored).
    #[arg(long, conflicts_with_all = ["timeout", "postcopy"])]
    pub detach: bool,

    /// One JSON object per line on stdout: progress ticks, then a summary.
    #[arg(long)]
    pub json: bool,
}

impl Args {
    fn plan(&self) -> MigrationPlan {
        MigrationPlan {
            multifd: self.multifd,
            compression: self.compress,
            postcopy: self.postcopy.is_some(),
            auto_converge: self.auto_converge,
            max_bandwidth: self.max_bandwidth,
            downtime_limit: self.downtime_limit,
        }
    }

    fn endpoint(&self) -> Endpoint {
        match &self.uri {
            Some(uri) => Endpoint::Uri(uri.clone()),
            None => Endpoint::Socket(self.socket.clone()),
        }
    }
}

/// Runs `qmigrate send`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let plan = args.plan();
    plan.validate().context(Exit::Usage)?;
    let endpoint = args.endpoint();
    if let Endpoint::Socket(path) = &endpoint {
        migration::check_migration_socket(path)?;
    }

    let qmp = migration::connect_qmp(&args.qmp).await?;
    let source = migration::preflight_source(&qmp).await?;
    tracing::debug!(qemu = %source.qemu, running = source.was_running, plan = %plan.describe(), "source checked");

    // Installed before `migrate` so that Ctrl-C from here on cancels instead of killing us.
    let mut interrupts = Interrupts::install().context("cannot install signal handlers")?;
    let timeout = args.timeout;
    let cancel = async move {
        match timeout {
            Some(limit) => tokio::select! {
                signal = interrupts.recv() => format!("interrupted by {signal}"),
                _ = tokio::time::sleep(limit) => format!("--timeout {} expired", format_duration(limit)),
            },
            None => format!("interrupted by {}", interrupts.recv().await),
        }
    };
    let opts = FollowOptions {
        postcopy_after: args.postcopy,
        detach: args.detach,
    };
    let mut progress = progress::for_send(args.json);
    let summary = migration::run_migration(
        &qmp,
        &plan,
        &endpoint,
        &source,
        &opts,
        progress.as_mut(),
        cancel,
    )
    .await?;
    progress.finish(&summary);
    qmp.close().await;

    match summary.outcome {
        Outcome::Completed | Outcome::Detached(_) => Ok(()),
        Outcome::Failed(reason) => Err(anyhow!("{reason}").context(Exit::Failed)),
        Outcome::Cancelled(reason) => {
            let vm = if source.was_running {
                "the source VM is running"
            } else {
                "the source VM stays paused as it was"
            };
            Err(anyhow!("{reason}; {vm}").context(Exit::Cancelled))
        }
        Outcome::PostcopyPaused(reason) => Err(anyhow!(
            "postcopy paused: {reason}; the guest's memory is split between both hosts, so \
             neither can run it alone: fix the connection and recover with QMP migrate \
             (resume: true) / migrate-recover"
        )
        .context(Exit::Failed)),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

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
        assert_eq!(parse(&[]).expect("no flags").postcopy, None);
        assert_eq!(parse(&["--postcopy"]).expect("bare").postcopy, Some(1));
        assert_eq!(parse(&["--postcopy=0"]).expect("=0").postcopy, Some(0));
        // `--postcopy 3` would be ambiguous with a following positional; only `=` is accepted.
        assert!(parse(&["--postcopy", "3"]).is_err());
    }

    #[test]
    fn units_and_conflicts() {
        let args = parse(&["--max-bandwidth", "512MiB", "--timeout", "10m"]).expect("valid");
        assert_eq!(args.max_bandwidth, Some(512 << 20));
        assert_eq!(args.timeout, Some(std::time::Duration::from_secs(600)));
        assert!(parse(&["--uri", "tcp:h:1", "--socket", "/x"]).is_err());
        assert!(parse(&["--detach", "--timeout", "1s"]).is_err());
        assert!(parse(&["--compress", "lz4"]).is_err());
    }
}
