//! qmigrate's migration engine: what both QEMUs of a migration must agree on, and the jobs
//! that drive them.
//!
//! # Layout
//! - [`plan`]: one [`MigrationPlan`], built and validated once, before any QEMU is touched;
//!   both sides' capabilities and parameters come from it.
//! - [`target`]: where a QEMU sends or receives the stream ([`QemuTarget`]), and how it is
//!   told (`channels` or `uri`); [`exec`] turns an `exec:` command into an argv.
//! - [`monitor`]: connecting to QMP with errors that say what to do; [`fit`]: fitting the
//!   plan to what an older QEMU has.
//! - [`source`] and [`destination`]: the two jobs, each on a connected QMP, reporting
//!   through [`Progress`]; they never print or exit.
//! - [`outcome`]: how a migration ended ([`Outcome`], [`Summary`]) and what a front end
//!   implements to watch it ([`Progress`]).
//! - [`statefile`] and [`save`]: saving to and restoring from files safely.
//! - [`storage`]: copying local disks during a migration (NBD exports on the destination,
//!   mirrors on the source).
//! - [`direct`]: the one rule for the direct data path (the tunnel's socket handed to QEMU).
//! - [`session`]: the control session of a one-command migration between `qmigrate migrate`
//!   and `qmigrate tunnel-server --qmp`: its typed messages, the source's side and the
//!   destination's [`session::QmpController`].
//!
//! Errors are [`Error`]s whose [`ErrorKind`] tells a front end what kind of failure it was
//! (usage, unreachable QMP, refused, failed, cancelled); the text of each says what went
//! wrong and, where the fix is on the QEMU side, what to do. Flags are the front end's.

/// `anyhow::bail!` for this crate: returns the error as whatever the function returns, this
/// crate's [`Error`] or an `anyhow::Error`.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(::anyhow::anyhow!($($arg)*).into())
    };
}

pub mod destination;
pub mod direct;
mod error;
pub mod exec;
pub mod fit;
pub mod monitor;
pub mod outcome;
pub mod plan;
pub mod save;
pub mod session;
pub mod source;
pub mod statefile;
pub mod storage;
pub mod target;
pub mod watch;

use std::time::Duration;

pub use error::{Error, ErrorKind, Result};
pub use outcome::{DiskProgress, Outcome, Progress, Snapshot, Summary};
pub use plan::{Compression, MigrationPlan, Mode, PlanError, StreamKind, UNLIMITED_BANDWIDTH};
pub use target::{Direction, QemuTarget};

/// How often a migration is polled with `query-migrate`; events wake us up in between.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);
