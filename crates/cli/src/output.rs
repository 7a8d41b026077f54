//! Showing a migration as it runs and when it ends: a live bar on a terminal, plain periodic
//! lines in logs, JSON lines for scripts (one [`JsonEvent`] per line, docs/JSON.md).
//!
//! The engine only produces [`Snapshot`]s, notes and a [`Summary`]; what the operator sees is
//! decided here.

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qmigrate_migration::watch::Convergence;
use qmigrate_migration::{DiskProgress, Outcome, Progress, Snapshot, Summary};
use qmigrate_qmp::MigrationStatus;
use serde::Serialize;

use crate::units::{format_bytes, format_duration, format_rate};

/// One line of `--json` output. Every line is one object whose `type` names the event; the
/// keys of each object are printed in alphabetical order. See docs/JSON.md for an example of
/// each.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum JsonEvent {
    /// A running migration, about twice a second (`send`, `migrate`).
    Progress {
        /// QEMU's migration status.
        status: String,
        /// Milliseconds since `migrate` was sent.
        elapsed_ms: u64,
        /// RAM bytes sent so far.
        transferred: u64,
        /// Guest RAM size in bytes.
        total: u64,
        /// Bytes still to send in this pass.
        remaining: u64,
        /// The rate RAM moved at over the last few seconds, in bytes per second (measured
        /// between ticks, so it falls to 0 when nothing moves).
        throughput_bps: u64,
        /// Pages the guest dirties per second.
        dirty_pages_rate: u64,
        /// The guest's dirty rate in bytes per second, to set against `throughput_bps`.
        dirty_rate_bps: u64,
        /// Precopy pass (QEMU's dirty-sync count).
        pass: u64,
        /// A rough time to go for this pass, in milliseconds (null while stalled or not
        /// converging).
        eta_ms: Option<u64>,
        /// Whether precopy still converges: null until a few passes tell.
        converging: Option<bool>,
        /// How long nothing has moved, in milliseconds (null while data moves).
        stalled_ms: Option<u64>,
        /// auto-converge's CPU throttle in percent (null while QEMU does not throttle).
        throttle_percent: Option<u64>,
        /// `--copy-storage`: the disks' copy (absent otherwise). Before the RAM migrates the
        /// migration's own fields are those of one not started (`status` `none`).
        #[serde(skip_serializing_if = "Option::is_none")]
        storage: Option<JsonStorage>,
    },
    /// Something the operator should know now (switching to postcopy, cancelling).
    Note {
        /// The message.
        message: String,
    },
    /// How the migration ended on the source (`send`, `migrate`).
    Summary(SourceSummary),
    /// `receive`: the destination QEMU listens (or loads the state file).
    Ready {
        /// Where QEMU listens, as the operator would write it.
        endpoint: String,
        /// multifd channels.
        multifd: Option<u32>,
        /// multifd compression.
        compress: Option<String>,
        /// Postcopy accepted.
        postcopy: bool,
        /// mapped-ram (a state file saved with multifd).
        mapped_ram: bool,
        /// The state file is read with O_DIRECT.
        direct_io: bool,
        /// QEMU was told with the typed `channels` (else the legacy `uri`).
        channels: bool,
        /// The state file's size, for a restore.
        file_size: Option<u64>,
    },
    /// `receive --wait`: how the incoming migration ended.
    #[serde(rename = "summary")]
    Received {
        /// The final migration status.
        status: String,
        /// The VM's run state afterwards.
        vm: String,
        /// QEMU's reason when it failed.
        error: Option<String>,
        /// Whether `cont` was sent.
        started: bool,
        /// Milliseconds from `migrate-incoming` to the end.
        elapsed_ms: u64,
        /// The state file, for a restore.
        file: Option<String>,
        /// The state file's size, for a restore.
        file_size: Option<u64>,
    },
    /// `migrate`: the destination's verdict, after the summary.
    Destination {
        /// The destination's final migration status.
        status: String,
        /// The destination VM's run state afterwards.
        vm: String,
        /// QEMU's reason when it failed.
        error: Option<String>,
        /// Whether the tunnel-server started the VM (`cont`).
        started: bool,
    },
}

/// The disks' copy (`--copy-storage`) in `progress` and `summary`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonStorage {
    /// Bytes copied, all disks.
    pub copied: u64,
    /// The disks' size, all disks.
    pub size: u64,
    /// Each disk.
    pub disks: Vec<JsonDisk>,
}

/// One disk of [`JsonStorage`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JsonDisk {
    /// The disk's qdev id.
    pub disk: String,
    /// Its size.
    pub size: u64,
    /// Bytes copied (unallocated ranges are not copied).
    pub copied: u64,
    /// Bytes its mirror has to copy so far (grows when the guest writes).
    pub to_copy: u64,
    /// The first full copy is done and the mirror keeps the destination in sync.
    pub ready: bool,
}

impl JsonStorage {
    /// The JSON of the disks' progress; `None` without disks.
    pub fn of(disks: &[DiskProgress]) -> Option<Self> {
        (!disks.is_empty()).then(|| JsonStorage {
            copied: disks.iter().map(|d| d.copied).sum(),
            size: disks.iter().map(|d| d.size).sum(),
            disks: disks
                .iter()
                .map(|d| JsonDisk {
                    disk: d.disk.clone(),
                    size: d.size,
                    copied: d.copied,
                    to_copy: d.to_copy,
                    ready: d.ready,
                })
                .collect(),
        })
    }
}

/// The disks' progress for people: `disks 12 MiB / 16 MiB (vblk0 ready)`.
fn disks_text(disks: &[DiskProgress]) -> String {
    let copied: u64 = disks.iter().map(|d| d.copied).sum();
    let size: u64 = disks.iter().map(|d| d.size).sum();
    let each: Vec<String> = disks
        .iter()
        .map(|d| {
            format!(
                "{} {}/{}{}",
                d.disk,
                format_bytes(d.copied),
                format_bytes(d.to_copy.max(d.copied)),
                if d.ready { " ready" } else { "" }
            )
        })
        .collect();
    format!(
        "disks {} copied of {} ({})",
        format_bytes(copied),
        format_bytes(size),
        each.join(", ")
    )
}

/// The `summary` event of the source side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceSummary {
    /// QEMU's final migration status.
    pub status: String,
    /// `completed`, `failed`, `cancelled`, `postcopy-paused` or `detached`.
    pub outcome: &'static str,
    /// Why it did not complete.
    pub error: Option<String>,
    /// QEMU's `total-time`.
    pub total_time_ms: Option<u64>,
    /// QEMU's `downtime`.
    pub downtime_ms: Option<u64>,
    /// QEMU's `setup-time`.
    pub setup_time_ms: Option<u64>,
    /// RAM bytes sent.
    pub transferred: u64,
    /// Guest RAM size in bytes.
    pub total: u64,
    /// Average throughput in bytes per second.
    pub throughput_bps: Option<u64>,
    /// Precopy passes.
    pub passes: u64,
    /// Whether the migration switched to postcopy.
    pub postcopy: bool,
    /// A save to `file:`: the state file, renamed into place.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A save to `file:`: the state file's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_size: Option<u64>,
    /// A save to `file:`: whether QEMU wrote its pages with O_DIRECT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
    /// A save to `exec:`: the command that got the stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// `--copy-storage`: the bytes copied per disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<JsonStorage>,
}

impl JsonEvent {
    /// The event for a progress tick.
    pub fn progress(s: &Snapshot) -> Self {
        JsonEvent::Progress {
            status: s.status.to_string(),
            elapsed_ms: s.elapsed.as_millis() as u64,
            transferred: s.transferred,
            total: s.total,
            remaining: s.remaining,
            throughput_bps: s.rate.round() as u64,
            dirty_pages_rate: s.dirty_pages_rate,
            dirty_rate_bps: s.dirty_rate().round() as u64,
            pass: s.pass,
            eta_ms: s.eta().map(|d| d.as_millis() as u64),
            converging: match s.convergence {
                Convergence::Unknown => None,
                Convergence::Converging => Some(true),
                Convergence::NotConverging => Some(false),
            },
            stalled_ms: s.stalled_for.map(|d| d.as_millis() as u64),
            throttle_percent: s.throttle,
            storage: JsonStorage::of(&s.disks),
        }
    }

    /// Prints the event as one line on stdout. The keys come out sorted (through
    /// `serde_json::Value`), as they always have.
    pub fn emit(&self) {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut out = std::io::stdout().lock();
        // A closed stdout (the script went away) must not abort the migration's cleanup.
        let _ = writeln!(out, "{value}");
        let _ = out.flush();
    }
}

impl SourceSummary {
    /// The summary event of a source migration, without the facts of a save.
    pub fn new(summary: &Summary) -> Self {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        let error = match &summary.outcome {
            Outcome::Failed(reason)
            | Outcome::Cancelled(reason)
            | Outcome::PostcopyPaused(reason) => Some(reason.clone()),
            Outcome::Completed | Outcome::Detached(_) => None,
        };
        SourceSummary {
            status: summary.status.to_string(),
            outcome: match summary.outcome {
                Outcome::Completed => "completed",
                Outcome::Failed(_) => "failed",
                Outcome::Cancelled(_) => "cancelled",
                Outcome::PostcopyPaused(_) => "postcopy-paused",
                Outcome::Detached(_) => "detached",
            },
            error,
            total_time_ms: ms(summary.total_time),
            downtime_ms: ms(summary.downtime),
            setup_time_ms: ms(summary.setup_time),
            transferred: summary.transferred,
            total: summary.total,
            throughput_bps: summary.throughput().map(|t| t.round() as u64),
            passes: summary.passes,
            postcopy: summary.postcopy,
            file: None,
            file_size: None,
            direct_io: None,
            command: None,
            storage: JsonStorage::of(&summary.disks),
        }
    }
}

/// The fields of a snapshot after the status, for human output: what moved, at what rate
/// against the guest's dirty rate, and what is wrong if something is.
fn snapshot_line(s: &Snapshot) -> String {
    if s.status == MigrationStatus::None && !s.disks.is_empty() {
        return disks_text(&s.disks);
    }
    let mut line = format!(
        "{} / {}, {}, {} left, dirtying {}, pass {}",
        format_bytes(s.transferred),
        format_bytes(s.total),
        format_rate(s.rate),
        format_bytes(s.remaining),
        format_rate(s.dirty_rate()),
        s.pass,
    );
    if let Some(trouble) = trouble(s) {
        line.push_str(&format!(", {trouble}"));
    } else if let Some(eta) = s.eta() {
        line.push_str(&format!(", ETA {}", format_duration(eta)));
    }
    if !s.disks.is_empty() {
        line.push_str(&format!("; {}", disks_text(&s.disks)));
    }
    line
}

/// What is wrong with a running migration, in a few words: nothing moves, or precopy does not
/// converge (and whether auto-converge is throttling).
fn trouble(s: &Snapshot) -> Option<String> {
    if let Some(stalled) = s.stalled_for {
        return Some(format!("stalled for {} s", stalled.as_secs()));
    }
    if s.convergence == Convergence::NotConverging {
        return Some(match s.throttle {
            Some(t) => format!("not converging (guest throttled to {t}%)"),
            None => "not converging".to_owned(),
        });
    }
    None
}

/// The summary as operators read it, one line per fact.
pub fn summary_text(summary: &Summary) -> String {
    if let Outcome::Detached(status) = &summary.outcome {
        return format!(
            "migration {status}; not following it (--detach): watch it with QMP query-migrate"
        );
    }
    let opt = |d: Option<Duration>| d.map_or_else(|| "-".to_owned(), format_duration);
    let mut text = format!("migration {}", summary.status);
    match &summary.outcome {
        Outcome::Failed(reason) => text.push_str(&format!(": {reason}")),
        Outcome::Cancelled(reason) => text.push_str(&format!(" ({reason})")),
        Outcome::PostcopyPaused(reason) => text.push_str(&format!(": {reason}")),
        Outcome::Completed | Outcome::Detached(_) => {}
    }
    text.push_str(&format!(
        "\n  total time   {}\n  downtime     {}\n  setup time   {}\n  transferred  {} of {} RAM\n  throughput   {}\n  passes       {}{}",
        opt(summary.total_time),
        opt(summary.downtime),
        opt(summary.setup_time),
        format_bytes(summary.transferred),
        format_bytes(summary.total),
        summary.throughput().map_or_else(|| "-".to_owned(), format_rate),
        summary.passes,
        if summary.postcopy { " (then postcopy)" } else { "" },
    ));
    for d in &summary.disks {
        text.push_str(&format!(
            "\n  disk {:<7} {} copied ({} disk)",
            d.disk,
            format_bytes(d.copied),
            format_bytes(d.size)
        ));
    }
    text
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
        self.bar.set_prefix(s.status.to_string());
        let mut msg = format!(
            "{}/{} {} left {} dirty {} pass {}",
            format_bytes(s.transferred),
            format_bytes(s.total),
            format_rate(s.rate),
            format_bytes(s.remaining),
            format_rate(s.dirty_rate()),
            s.pass
        );
        if let Some(trouble) = trouble(s) {
            msg.push_str(&format!(" {trouble}"));
        } else if let Some(eta) = s.eta() {
            msg.push_str(&format!(" ETA {}", format_duration(eta)));
        }
        if s.status == MigrationStatus::None && !s.disks.is_empty() {
            // The disk phase: the bar shows the disks' copy.
            let size = s.disks.iter().map(|d| d.to_copy.max(d.copied)).sum::<u64>();
            self.bar.set_length(size.max(1));
            self.bar
                .set_position(s.disks.iter().map(|d| d.copied).sum::<u64>());
            self.bar.set_prefix("disks");
            msg = disks_text(&s.disks);
        } else if !s.disks.is_empty() {
            msg.push_str(&format!("; {}", disks_text(&s.disks)));
        }
        self.bar.set_message(msg);
    }

    fn note(&mut self, message: &str) {
        self.bar.println(message);
    }

    fn finish(&mut self, summary: &Summary) {
        self.bar.finish_and_clear();
        eprintln!("{}", summary_text(summary));
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
                s.status,
                snapshot_line(s)
            );
            self.last = Some((Instant::now(), s.status));
        }
    }

    fn note(&mut self, message: &str) {
        eprintln!("{message}");
    }

    fn finish(&mut self, summary: &Summary) {
        eprintln!("{}", summary_text(summary));
    }
}

/// One JSON object per line on stdout: `{"type":"progress",...}` per tick, `{"type":"note"}`
/// for notes and `{"type":"summary",...}` at the end.
#[derive(Debug, Default)]
pub struct JsonLines;

impl Progress for JsonLines {
    fn tick(&mut self, s: &Snapshot) {
        JsonEvent::progress(s).emit();
    }

    fn note(&mut self, message: &str) {
        JsonEvent::Note {
            message: message.to_owned(),
        }
        .emit();
    }

    fn finish(&mut self, summary: &Summary) {
        JsonEvent::Summary(SourceSummary::new(summary)).emit();
    }
}

#[cfg(test)]
mod tests {
    use qmigrate_qmp::MigrationInfo;
    use serde_json::json;

    use super::*;

    fn json(event: JsonEvent) -> serde_json::Value {
        serde_json::to_value(event).expect("serializes")
    }

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
        let v = json(JsonEvent::Summary(SourceSummary::new(&summary)));
        assert_eq!(v["type"], "summary");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["outcome"], "completed");
        assert_eq!(v["error"], serde_json::Value::Null);
        assert_eq!(v["throughput_bps"], 134_217_728u64);
        let text = summary_text(&summary);
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
        assert_eq!(
            json(JsonEvent::Summary(SourceSummary::new(&summary)))["error"],
            "Unable to write"
        );
        assert_eq!(summary.throughput(), None);
        assert!(summary_text(&summary).starts_with("migration failed: Unable to write"));
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
        let mut s = Snapshot::new(&info, Duration::from_secs(1));
        assert_eq!(s.throughput, 10_000_000.0);
        s.rate = 10_000_000.0;
        assert_eq!(s.eta(), Some(Duration::from_secs(8)));
        assert_eq!(s.dirty_rate(), 40960.0);
        let v = json(JsonEvent::progress(&s));
        assert_eq!(v["status"], "active");
        assert_eq!(v["eta_ms"], 8000);
        assert_eq!(v["pass"], 1);
        assert_eq!(v["throughput_bps"], 10_000_000);
        assert_eq!(v["dirty_rate_bps"], 40960);
        assert_eq!(v["converging"], serde_json::Value::Null);
        assert!(
            snapshot_line(&s).ends_with("ETA 8.0s"),
            "{}",
            snapshot_line(&s)
        );

        // Nothing moves: no ETA (it would be a lie), and the line says so.
        s.rate = 0.0;
        s.stalled_for = Some(Duration::from_secs(12));
        let v = json(JsonEvent::progress(&s));
        assert_eq!(v["stalled_ms"], 12_000);
        assert_eq!(v["eta_ms"], serde_json::Value::Null);
        assert!(
            snapshot_line(&s).ends_with("stalled for 12 s"),
            "{}",
            snapshot_line(&s)
        );

        s.rate = 10_000_000.0;
        s.stalled_for = None;
        s.convergence = Convergence::NotConverging;
        s.throttle = Some(40);
        let v = json(JsonEvent::progress(&s));
        assert_eq!(v["converging"], false);
        assert_eq!(v["throttle_percent"], 40);
        assert_eq!(v["eta_ms"], serde_json::Value::Null);
        assert!(
            snapshot_line(&s).ends_with("not converging (guest throttled to 40%)"),
            "{}",
            snapshot_line(&s)
        );
    }

    /// The summary names each copied disk and what was copied; a disk-phase line shows the
    /// disks, not a migration that has not started.
    #[test]
    fn disks_are_shown() {
        let disks = vec![DiskProgress {
            disk: "vblk0".into(),
            size: 64 << 20,
            copied: 24 << 20,
            to_copy: 32 << 20,
            ready: false,
        }];
        let mut summary = Summary::from_info(&completed(), Outcome::Completed, false);
        summary.disks = disks.clone();
        let text = summary_text(&summary);
        assert!(text.contains("disk vblk0"), "{text}");
        assert!(text.contains(&format_bytes(24 << 20)), "{text}");
        let line = snapshot_line(&Snapshot {
            disks,
            ..Snapshot::default()
        });
        assert!(line.starts_with("disks "), "{line}");
        assert!(line.contains("vblk0"), "{line}");
    }

    /// docs/JSON.md shows every event with exactly the keys this type prints.
    #[test]
    fn json_docs_match_the_events() {
        let doc = include_str!("../../../docs/JSON.md");
        let examples: Vec<serde_json::Value> = doc
            .split("```json\n")
            .skip(1)
            .map(|block| {
                let line = block.split("\n```").next().unwrap_or_default();
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
            })
            .collect();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let summary = Summary::from_info(&completed(), Outcome::Completed, false);
        let mut saved = SourceSummary::new(&summary);
        saved.file = Some("/f".into());
        saved.file_size = Some(1);
        saved.direct_io = Some(true);
        let mut piped = SourceSummary::new(&summary);
        piped.command = Some("cat".into());
        let disks = vec![DiskProgress {
            disk: "vblk0".into(),
            size: 1 << 30,
            copied: 1 << 28,
            to_copy: 1 << 28,
            ready: true,
        }];
        let mut copied = SourceSummary::new(&summary);
        copied.storage = JsonStorage::of(&disks);
        let events = [
            JsonEvent::progress(&Snapshot::new(&completed(), Duration::from_secs(1))),
            JsonEvent::progress(&Snapshot {
                disks: disks.clone(),
                ..Snapshot::default()
            }),
            JsonEvent::Note {
                message: "m".into(),
            },
            JsonEvent::Summary(SourceSummary::new(&summary)),
            JsonEvent::Summary(saved),
            JsonEvent::Summary(piped),
            JsonEvent::Summary(copied),
            JsonEvent::Destination {
                status: "completed".into(),
                vm: "running".into(),
                error: None,
                started: true,
            },
            JsonEvent::Ready {
                endpoint: "unix:/s".into(),
                multifd: None,
                compress: None,
                postcopy: false,
                mapped_ram: false,
                direct_io: false,
                channels: true,
                file_size: None,
            },
            JsonEvent::Received {
                status: "completed".into(),
                vm: "paused".into(),
                error: None,
                started: false,
                elapsed_ms: 1,
                file: None,
                file_size: None,
            },
        ];
        assert_eq!(examples.len(), events.len(), "one example per event");
        for (example, event) in examples.iter().zip(events) {
            let printed = json(event);
            assert_eq!(keys(example), keys(&printed), "{example}");
            assert_eq!(example["type"], printed["type"]);
        }
    }
}
