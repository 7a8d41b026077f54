//! Showing a migration as it runs and when it ends: a live bar on a terminal, plain periodic
//! lines in logs, JSON lines for scripts.
//!
//! The migration code only produces [`Snapshot`]s, notes and a [`Summary`]; what the operator
//! sees is decided here, so another front end can plug in its own [`Progress`].

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qmigrate_qmp::{MigrationInfo, MigrationStatus};
use serde_json::json;

use crate::migration::{migration_status_name, Outcome};
use crate::units::{format_bytes, format_duration, format_rate};

/// Guest page size used to turn QEMU's dirty-pages rate into bytes; QEMU reports pages of the
/// target page size, 4 KiB on x86.
const PAGE_SIZE: u64 = 4096;

/// One look at a running migration, taken from `query-migrate`.
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
    /// Current throughput in bytes per second.
    pub throughput: f64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Precopy pass (QEMU's dirty-sync count).
    pub pass: u64,
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
        }
    }

    /// A rough time to go: what is left of this pass at the current throughput.
    pub fn eta(&self) -> Option<Duration> {
        (self.throughput > 0.0 && self.remaining > 0)
            .then(|| Duration::from_secs_f64(self.remaining as f64 / self.throughput))
    }

    /// The dirty-page rate in bytes per second.
    pub fn dirty_rate(&self) -> f64 {
        (self.dirty_pages_rate * PAGE_SIZE) as f64
    }

    /// The fields after the status, for human output.
    fn human(&self) -> String {
        let mut line = format!(
            "{} / {}, {}, {} left, dirtying {}, pass {}",
            format_bytes(self.transferred),
            format_bytes(self.total),
            format_rate(self.throughput),
            format_bytes(self.remaining),
            format_rate(self.dirty_rate()),
            self.pass,
        );
        if let Some(eta) = self.eta() {
            line.push_str(&format!(", ETA {}", format_duration(eta)));
        }
        line
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "type": "progress",
            "status": migration_status_name(&self.status),
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "transferred": self.transferred,
            "total": self.total,
            "remaining": self.remaining,
            "throughput_bps": self.throughput.round() as u64,
            "dirty_pages_rate": self.dirty_pages_rate,
            "pass": self.pass,
            "eta_ms": self.eta().map(|d| d.as_millis() as u64),
        })
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
        }
    }

    /// Average throughput over the whole migration, in bytes per second.
    pub fn throughput(&self) -> Option<f64> {
        let secs = self.total_time?.as_secs_f64();
        (secs > 0.0).then(|| self.transferred as f64 / secs)
    }

    /// The summary as operators read it, one line per fact.
    pub fn human(&self) -> String {
        if let Outcome::Detached(status) = &self.outcome {
            return format!(
                "migration {}; not following it (--detach): watch it with QMP query-migrate",
                migration_status_name(status)
            );
        }
        let opt = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), format_duration);
        let mut text = format!("migration {}", migration_status_name(&self.status));
        match &self.outcome {
            Outcome::Failed(reason) => text.push_str(&format!(": {reason}")),
            Outcome::Cancelled(reason) => text.push_str(&format!(" ({reason})")),
            Outcome::PostcopyPaused(reason) => text.push_str(&format!(": {reason}")),
            Outcome::Completed | Outcome::Detached(_) => {}
        }
        text.push_str(&format!(
            "\n  total time   {}\n  downtime     {}\n  setup time   {}\n  transferred  {} of {} RAM\n  throughput   {}\n  passes       {}{}",
            opt(self.total_time),
            opt(self.downtime),
            opt(self.setup_time),
            format_bytes(self.transferred),
            format_bytes(self.total),
            self.throughput().map_or_else(|| "-".to_owned(), format_rate),
            self.passes,
            if self.postcopy { " (then postcopy)" } else { "" },
        ));
        text
    }

    /// The summary as one JSON object (`"type": "summary"`).
    pub fn json(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let error = match &self.outcome {
            Outcome::Failed(reason)
            | Outcome::Cancelled(reason)
            | Outcome::PostcopyPaused(reason) => Some(reason.as_str()),
            Outcome::Completed | Outcome::Detached(_) => None,
        };
        json!({
            "type": "summary",
            "status": migration_status_name(&self.status),
            "outcome": match self.outcome {
                Outcome::Completed => "completed",
                Outcome::Failed(_) => "failed",
                Outcome::Cancelled(_) => "cancelled",
                Outcome::PostcopyPaused(_) => "postcopy-paused",
                Outcome::Detached(_) => "detached",
            },
            "error": error,
            "total_time_ms": ms(self.total_time),
            "downtime_ms": ms(self.downtime),
            "setup_time_ms": ms(self.setup_time),
            "transferred": self.transferred,
            "total": self.total,
            "throughput_bps": self.throughput().map(|t| t.round() as u64),
            "passes": self.passes,
            "postcopy": self.postcopy,
        })
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

/// Picks the reporter for `send`: JSON lines on stdout with `--json`, a live bar when stderr is
/// a terminal, plain lines otherwise.
pub fn for_send(json: bool) -> Box<dyn Progress + Send> {
    if json {
        Box::new(JsonLines)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bar::new())
    } else {
        Box::new(Lines::default())
    }
}

/// A live progress bar on stderr.
#[derive(Debug)]
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A bar on stderr that redraws itself (so the spinner moves between ticks).
    pub fn new() -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        // The template is a constant: failing to parse it is a bug caught by any test run.
        let style = ProgressStyle::with_template("{spinner} {prefix} [{bar:20}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(200));
        Self { bar }
    }
}

impl Progress for Bar {
    fn tick(&mut self, s: &Snapshot) {
        if s.total > 0 {
            self.bar.set_length(s.total);
        }
        // In later passes `transferred` exceeds the RAM size; the bar shows the pass's progress.
        self.bar
            .set_position(s.total.saturating_sub(s.remaining).min(s.total));
        self.bar.set_prefix(migration_status_name(&s.status));
        let mut msg = format!(
            "{}/{} {} left {} dirty {} pass {}",
            format_bytes(s.transferred),
            format_bytes(s.total),
            format_rate(s.throughput),
            format_bytes(s.remaining),
            format_rate(s.dirty_rate()),
            s.pass
        );
        if let Some(eta) = s.eta() {
            msg.push_str(&format!(" ETA {}", format_duration(eta)));
        }
        self.bar.set_message(msg);
    }

    fn note(&mut self, message: &str) {
        self.bar.println(message);
    }

    fn finish(&mut self, summary: &Summary) {
        self.bar.finish_and_clear();
        eprintln!("{}", summary.human());
    }
}

/// Plain lines on stderr every few seconds and on every status change, for logs and pipes.
#[derive(Debug, Default)]
pub struct Lines {
    last: Option<(Instant, MigrationStatus)>,
}

/// How often [`Lines`] prints while nothing changes.
const LINE_INTERVAL: Duration = Duration::from_secs(2);

impl Progress for Lines {
    fn tick(&mut self, s: &Snapshot) {
        let due = match &self.last {
            None => true,
            Some((at, status)) => *status != s.status || at.elapsed() >= LINE_INTERVAL,
        };
        if due {
            eprintln!(
                "[{:>6}] {}: {}",
                format_duration(s.elapsed),
                migration_status_name(&s.status),
                s.human()
            );
            self.last = Some((Instant::now(), s.status));
        }
    }

    fn note(&mut self, message: &str) {
        eprintln!("{message}");
    }

    fn finish(&mut self, summary: &Summary) {
        eprintln!("{}", summary.human());
    }
}

/// One JSON object per line on stdout: `{"type":"progress",...}` per tick, `{"type":"note"}`
/// for notes and `{"type":"summary",...}` at the end.
#[derive(Debug, Default)]
pub struct JsonLines;

impl JsonLines {
    fn emit(value: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        // A closed stdout (the script went away) must not abort the migration's cleanup.
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}

impl Progress for JsonLines {
    fn tick(&mut self, s: &Snapshot) {
        Self::emit(&s.json());
    }

    fn note(&mut self, message: &str) {
        Self::emit(&json!({ "type": "note", "message": message }));
    }

    fn finish(&mut self, summary: &Summary) {
        Self::emit(&summary.json());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `query-migrate` reply as QEMU 10 sends it for a completed migration.
    fn completed() -> MigrationInfo {
        serde_json::from_value(json!({
            "status": "completed",
            "setup-time": 1,
            "downtime": 13,
            "total-time": 2000,
            "ram": {
                "transferred": 268_435_456u64, "remaining": 0, "total": 134_217_728u64,
                "duplicate": 0, "normal": 32768, "normal-bytes": 134_217_728u64,
                "dirty-sync-count": 3, "mbps": 1073.7, "dirty-pages-rate": 0,
                "page-size": 4096, "multifd-bytes": 0, "pages-per-second": 0,
                "precopy-bytes": 0, "downtime-bytes": 0, "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0, "postcopy-requests": 0, "skipped": 0
            }
        }))
        .expect("a valid query-migrate reply")
    }

    #[test]
    fn summary_from_completed_migration() {
        let summary = Summary::from_info(&completed(), Outcome::Completed, false);
        assert_eq!(summary.total_time, Some(Duration::from_secs(2)));
        assert_eq!(summary.downtime, Some(Duration::from_millis(13)));
        assert_eq!(summary.passes, 3);
        assert_eq!(summary.throughput(), Some(134_217_728.0));
        let v = summary.json();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["outcome"], "completed");
        assert_eq!(v["error"], serde_json::Value::Null);
        assert_eq!(v["throughput_bps"], 134_217_728u64);
        let text = summary.human();
        assert!(text.starts_with("migration completed\n"), "{text}");
        assert!(text.contains("downtime     13ms"), "{text}");
        assert!(text.contains("throughput   128 MiB/s"), "{text}");
    }

    #[test]
    fn failed_summary_carries_the_reason() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "failed",
            "error-desc": "Unable to write to socket: Broken pipe"
        }))
        .expect("a valid query-migrate reply");
        let summary = Summary::from_info(&info, Outcome::Failed("Unable to write".into()), false);
        assert_eq!(summary.json()["error"], "Unable to write");
        assert_eq!(summary.throughput(), None);
        assert!(summary
            .human()
            .starts_with("migration failed: Unable to write"));
    }

    #[test]
    fn snapshot_rates_and_eta() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "active",
            "ram": {
                "transferred": 1u64 << 20, "remaining": 80_000_000u64, "total": 134_217_728u64,
                "duplicate": 0, "normal": 256, "normal-bytes": 1u64 << 20,
                "dirty-sync-count": 1, "mbps": 80.0, "dirty-pages-rate": 10,
                "page-size": 4096, "multifd-bytes": 0, "pages-per-second": 0,
                "precopy-bytes": 0, "downtime-bytes": 0, "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0, "postcopy-requests": 0, "skipped": 0
            }
        }))
        .expect("a valid query-migrate reply");
        let s = Snapshot::new(&info, Duration::from_secs(1));
        assert_eq!(s.throughput, 10_000_000.0);
        assert_eq!(s.eta(), Some(Duration::from_secs(8)));
        assert_eq!(s.dirty_rate(), 40960.0);
        let v = s.json();
        assert_eq!(v["status"], "active");
        assert_eq!(v["eta_ms"], 8000);
        assert_eq!(v["pass"], 1);
    }
}
