//! `qmigrate receive`: on the destination, make a QEMU started with `-incoming defer` listen for
//! the migration with the capabilities the source will use.

use std::path::PathBuf;

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::MigrationStatus;
use serde_json::json;

use crate::exit::Exit;
use crate::migration::{
    self, migration_status_name, run_state_name, Compression, Endpoint, MigrationPlan,
};

/// Arguments of `qmigrate receive`.
#[derive(Debug, clap::Args)]
#[command(after_help = crate::exit::EXIT_CODES_HELP)]
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

    /// Listen on a legacy QEMU URI instead of --socket (tcp:HOST:PORT, unix:PATH, exec:CMD,
    /// file:PATH, ...), without the tunnel.
    #[arg(long, value_name = "URI", conflicts_with = "socket")]
    pub uri: Option<String>,

    /// Expect N multifd channels (must match the source's --multifd N).
    #[arg(long, value_name = "N")]
    pub multifd: Option<u32>,

    /// Expect compressed multifd channels (must match the source's --compress).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<Compression>,

    /// Accept postcopy (must be given when the source uses --postcopy).
    #[arg(long)]
    pub postcopy: bool,

    /// Follow the migration to its end and exit 0 only if it completed.
    #[arg(long)]
    pub wait: bool,

    /// After completion, start the guest if it is paused (QEMU started with -S); implies
    /// --wait.
    #[arg(long)]
    pub start: bool,

    /// Print the ready message (and with --wait the result) as JSON objects on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Runs `qmigrate receive`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let plan = MigrationPlan {
        multifd: args.multifd,
        compression: args.compress,
        postcopy: args.postcopy,
        ..MigrationPlan::default()
    };
    plan.validate().context(Exit::Usage)?;
    let endpoint = match &args.uri {
        Some(uri) => Endpoint::Uri(uri.clone()),
        None => Endpoint::Socket(args.socket.clone()),
    };

    let qmp = migration::connect_qmp(&args.qmp).await?;
    let incoming = migration::prepare_incoming(&qmp, &plan, &endpoint).await?;
    if args.json {
        println!(
            "{}",
            json!({
                "type": "ready",
                "endpoint": incoming.endpoint,
                "multifd": plan.multifd,
                "compress": plan.compression.map(|c| c.qemu_name()),
                "postcopy": plan.postcopy,
                "channels": incoming.channels,
            })
        );
    } else {
        println!(
            "ready: destination QEMU listens on {} ({})",
            incoming.endpoint,
            plan.describe()
        );
    }

    if !(args.wait || args.start) {
        // QMP serves one client at a time: let go so the operator's tools can look.
        qmp.close().await;
        return Ok(());
    }
    let outcome = migration::follow_incoming(&qmp, args.start).await?;
    qmp.close().await;
    let status = migration_status_name(&outcome.status);
    let vm = run_state_name(&outcome.run_state);
    if args.json {
        println!(
            "{}",
            json!({
                "type": "summary",
                "status": status,
                "vm": vm,
                "error": outcome.error,
                "started": outcome.started,
            })
        );
    } else {
        eprintln!("incoming migration {status}; destination VM {vm}");
    }
    match outcome.status {
        MigrationStatus::Completed => Ok(()),
        _ => Err(anyhow!(
            "{}",
            outcome
                .error
                .unwrap_or_else(|| format!("the incoming migration ended as {status}"))
        )
        .context(Exit::Failed)),
    }
}
