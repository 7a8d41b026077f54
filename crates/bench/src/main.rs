//! `qmigrate-bench`: measurements that tell whether qmigrate is fast enough, run on the machine
//! at hand and printed side by side with the alternatives (a direct socket, socat).
//!
//! `relay` measures the data path alone: bytes from a source Unix socket through the relay to a
//! destination Unix socket, against the same bytes sent straight from one socket to the other.
//! On a small machine the relay processes compete for the same cores as the two QEMUs, so the
//! relay's CPU cost per GB matters as much as its rate: every row shows both, with the relays'
//! peak memory and whether the bytes arrived intact.
//!
//! `migrate` runs whole QEMU migrations of a guest with random RAM through each variant (direct
//! `unix:` and `tcp:`, socat, the qmigrate tunnels with and without multifd) and verifies the
//! destination's RAM.
//!
//! `endurance` migrates one guest back and forth through one long-running `tunnel-server` with
//! two routes, verifying its RAM after every hop and watching the server's descriptors and
//! memory.
//!
//! `save` saves a VM to a state file and restores it (plain `file:` and mapped-ram with
//! multifd) through `qmigrate send` and `receive`, next to the disk's own sequential speed
//! measured with `dd` in the same run, and verifies the restored RAM.
//!
//! `converge` migrates a guest that dirties its RAM at a paced rate (0 to above the link's
//! `max-bandwidth`) with precopy, auto-converge, postcopy and multifd, through QEMU alone and
//! through `qmigrate migrate`, and tells which complete, in how long, with what downtime.
//!
//! `storage` copies a VM's local disk with `migrate --copy-storage` (direct path and relays)
//! next to QEMU alone mirroring into an NBD export, and compares the images afterwards.
//!
//! Exit codes: 0 every run delivered intact data, 1 a run failed or delivered wrong data,
//! 2 usage error.

mod common;
mod converge;
mod endurance;
mod migrate;
mod relay;
mod save;
mod storage;
mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmarks for qmigrate's data path, side by side with a direct socket and socat.
#[derive(Debug, Parser)]
#[command(name = "qmigrate-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Throughput, CPU and memory of socat and the qmigrate tunnel against a direct Unix socket.
    Relay(relay::Args),
    /// Whole QEMU migrations through each variant: total time, downtime, relay CPU and memory,
    /// destination RAM verified identical.
    Migrate(migrate::Args),
    /// Back-to-back migrations between two routes of one long-running tunnel-server: every
    /// hop's RAM verified, the server's open descriptors and RSS after each.
    Endurance(endurance::Args),
    /// Save to a file and restore (plain and mapped-ram): GB/s next to the disk's own speed
    /// (dd with O_DIRECT), restored RAM verified identical.
    Save(save::Args),
    /// A guest dirtying its RAM at set rates against the link: precopy, auto-converge,
    /// postcopy and multifd 4, through QEMU alone and through qmigrate.
    Converge(converge::Args),
    /// A VM's local disk (dense and sparse) copied by `migrate --copy-storage` (direct path,
    /// TCP and WebSocket relays) next to QEMU alone mirroring into NBD over unix: and tcp:,
    /// destination image verified with qemu-img compare.
    Storage(storage::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Relay(args) => relay::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Save(args) => save::run(args),
        Command::Endurance(args) => endurance::run(args),
        Command::Converge(args) => converge::run(args),
        Command::Storage(args) => storage::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("qmigrate-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
