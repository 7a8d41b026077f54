//! How a migration ended and what it looked like on the way: the data a front end shows.
//!
//! The jobs only produce [`Snapshot`]s, notes and a [`Summary`]; what the operator sees is
//! the front end's [`Progress`].

use std::time::Duration;

use qmigrate_qmp::{MigrationInfo, MigrationStatus};

use crate::watch::Convergence;

/// Guest page size used to turn QEMU's dirty-pages rate into bytes; QEMU reports pages of the
/// target page size, 4 KiB on x86.
const PAGE_SIZE: u64 = 4096;

/// How a migration ended on the source.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// QEMU reported `completed`: the guest runs on the destination.
    Completed,
    /// QEMU reported `failed`, with its `error-desc`.
    Failed(String),
    /// We cancelled it (signal, timeout, caller); the reason.
    Cancelled(String),
    /// The connection broke during postcopy: QEMU waits for a recovery (`migrate` with
    /// `resume`), the guest's state is split between the hosts and neither side can run alone.
    PostcopyPaused(String),
    /// `detach`: the migration was started and left running, in this status.
    Detached(MigrationStatus),
}

/// One look at a running migration, taken from `query-migrate`, with what
/// [`crate::watch::Watch`] measured between looks.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// QEMU's status.
    pub status: MigrationStatus,
    /// Time since `migrate` was sent.
    pub elapsed: Duration,
    /// RAM bytes sent so far.
    pub transferred: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Bytes still to send in this pass.
    pub remaining: u64,
    /// QEMU's own throughput figure in bytes per second (of its last bandwidth period: it
    /// keeps the last value when the link dies).
    pub throughput: f64,
    /// The rate RAM actually moved at over the last few seconds, in bytes per second
    /// (measured between looks).
    pub rate: f64,
    /// How long nothing has moved, from a second on (while the migration should be moving).
    pub stalled_for: Option<Duration>,
    /// Whether precopy still gets anywhere.
    pub convergence: Convergence,
    /// auto-converge's CPU throttle, in percent, once QEMU throttles.
    pub throttle: Option<u64>,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Precopy pass (QEMU's dirty-sync count).
    pub pass: u64,
    /// The disks being copied (`--copy-storage`), empty otherwise. Before the RAM migrates
    /// (the disk phase) the rest of the snapshot is that of a migration not yet started.
    pub disks: Vec<DiskProgress>,
}

/// One disk's copy (`--copy-storage`), from its mirror job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskProgress {
    /// The disk's qdev id.
    pub disk: String,
    /// Its guest-visible size.
    pub size: u64,
    /// Bytes copied so far (QEMU's job `offset`; discarded and unallocated ranges are not
    /// copied, so a sparse disk copies less than its size).
    pub copied: u64,
    /// Bytes the job has to copy so far (its `len`: grows when the guest writes).
    pub to_copy: u64,
    /// The first full copy is done: the mirror keeps the destination in sync.
    pub ready: bool,
}

impl Snapshot {
    /// Builds a snapshot from a `query-migrate` reply; missing statistics count as zero
    /// (QEMU omits them during setup).
    pub fn new(info: &MigrationInfo, elapsed: Duration) -> Self {
        let ram = info.ram.as_ref();
        Self {
            status: info.status.unwrap_or(MigrationStatus::None),
            elapsed,
            transferred: ram.and_then(|r| r.transferred).unwrap_or(0),
            total: ram.and_then(|r| r.total).unwrap_or(0),
            remaining: ram.and_then(|r| r.remaining).unwrap_or(0),
            // QEMU's "mbps" is megabits per second.
            throughput: ram.and_then(|r| r.mbps).unwrap_or(0.0) * 1e6 / 8.0,
            dirty_pages_rate: ram.and_then(|r| r.dirty_pages_rate).unwrap_or(0),
            pass: ram.and_then(|r| r.dirty_sync_count).unwrap_or(0),
            rate: 0.0,
            stalled_for: None,
            convergence: Convergence::Unknown,
            throttle: info.cpu_throttle_percentage.filter(|t| *t > 0),
            disks: Vec::new(),
        }
    }

    /// A rough time to go: what is left of this pass at the measured rate. None while nothing
    /// moves, or while precopy does not converge (the pass's end is not the migration's).
    pub fn eta(&self) -> Option<Duration> {
        (self.rate > 0.0
            && self.remaining > 0
            && self.stalled_for.is_none()
            && self.convergence != Convergence::NotConverging)
            .then(|| Duration::from_secs_f64(self.remaining as f64 / self.rate))
    }

    /// The dirty-page rate in bytes per second.
    pub fn dirty_rate(&self) -> f64 {
        (self.dirty_pages_rate * PAGE_SIZE) as f64
    }
}

impl Default for Snapshot {
    /// A migration that has not started.
    fn default() -> Self {
        Snapshot::new(&MigrationInfo::default(), Duration::ZERO)
    }
}

/// The end of a migration, from the last `query-migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// How it ended.
    pub outcome: Outcome,
    /// QEMU's final status.
    pub status: MigrationStatus,
    /// QEMU's `total-time`.
    pub total_time: Option<Duration>,
    /// QEMU's `downtime` (completed migrations only).
    pub downtime: Option<Duration>,
    /// QEMU's `setup-time`.
    pub setup_time: Option<Duration>,
    /// RAM bytes sent.
    pub transferred: u64,
    /// Guest RAM size.
    pub total: u64,
    /// Precopy passes (QEMU's dirty-sync count).
    pub passes: u64,
    /// Whether we switched to postcopy.
    pub postcopy: bool,
    /// The disks copied (`--copy-storage`): bytes copied per disk.
    pub disks: Vec<DiskProgress>,
}

impl Summary {
    /// Builds the summary from the final `query-migrate` reply.
    pub fn from_info(info: &MigrationInfo, outcome: Outcome, postcopy: bool) -> Self {
        let ms = |v: Option<u64>| v.map(Duration::from_millis);
        let ram = info.ram.as_ref();
        Self {
            outcome,
            status: info.status.unwrap_or(MigrationStatus::None),
            total_time: ms(info.total_time),
            downtime: ms(info.downtime),
            setup_time: ms(info.setup_time),
            transferred: ram.and_then(|r| r.transferred).unwrap_or(0),
            total: ram.and_then(|r| r.total).unwrap_or(0),
            passes: ram.and_then(|r| r.dirty_sync_count).unwrap_or(0),
            postcopy,
            disks: Vec::new(),
        }
    }

    /// Average throughput over the whole migration, in bytes per second.
    pub fn throughput(&self) -> Option<f64> {
        let secs = self.total_time?.as_secs_f64();
        (secs > 0.0).then(|| self.transferred as f64 / secs)
    }
}

/// Where a running migration is reported.
pub trait Progress {
    /// A fresh `query-migrate` result, about twice a second.
    fn tick(&mut self, snapshot: &Snapshot);
    /// Something the operator should know now (switching to postcopy, cancelling).
    fn note(&mut self, message: &str);
    /// The migration ended (or was left running with `--detach`).
    fn finish(&mut self, summary: &Summary);
}
