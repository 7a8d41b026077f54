//! What the guest printed on its serial console, parsed: the workload's heartbeats, sweeps and
//! FAIL lines (their format is in `crates/testkit/guest/workload.c`), and the judgement of a
//! migration from the source's and the destination's logs.

use std::path::Path;

/// One `HB` line of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    /// The counter, from 0 at the workload's start.
    pub n: u64,
    /// Milliseconds since the workload started (guest clock).
    pub t_ms: u64,
    /// The checksum of what the buffer must hold.
    pub sum: u64,
    /// MiB dirtied so far.
    pub dirtied_mib: u64,
    /// Complete scrubs of the whole buffer so far.
    pub sweeps: u64,
    /// Disk records read back and verified so far.
    pub records: u64,
    /// Mismatches found so far.
    pub fails: u64,
}

impl Heartbeat {
    /// Parses `HB <n> t=<ms> sum=<hex> dirtied=<MiB> sweeps=<k> rec=<m> fail=<f>`; `None` for
    /// anything else (another line, or a heartbeat cut by the switch to the destination).
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let mut words = line.strip_prefix("HB ")?.split(' ');
        let n = words.next()?.parse().ok()?;
        let mut field = |name: &str, radix: u32| {
            let v = words.next()?.strip_prefix(name)?.strip_prefix('=')?;
            u64::from_str_radix(v, radix).ok()
        };
        let hb = Heartbeat {
            n,
            t_ms: field("t", 10)?,
            sum: field("sum", 16)?,
            dirtied_mib: field("dirtied", 10)?,
            sweeps: field("sweeps", 10)?,
            records: field("rec", 10)?,
            fails: field("fail", 10)?,
        };
        words.next().is_none().then_some(hb)
    }
}

/// A serial log, parsed.
#[derive(Debug, Clone, Default)]
pub struct SerialLog {
    /// The complete lines (without `\r`); a last line without its newline is left out: the
    /// guest may still be writing it.
    pub lines: Vec<String>,
    /// The heartbeats, in order.
    pub heartbeats: Vec<Heartbeat>,
    /// The text after the last newline (a line still being written, or the source's last line
    /// cut by the switch-over: the destination prints the rest).
    pub partial: String,
    /// The text before the first newline (on a destination, maybe the rest of the source's
    /// cut line).
    pub first_line: String,
    /// How many times the init said `GUEST-READY` (a boot).
    pub ready: usize,
    /// How many times the workload started (`WORKLOAD start`).
    pub starts: usize,
    /// `SWEEP` lines.
    pub sweeps: usize,
    /// Lines that report trouble: the workload's `FAIL` lines, and the kernel's panics, oopses
    /// and BUGs.
    pub failures: Vec<String>,
}

impl SerialLog {
    /// Parses a serial log's text.
    pub fn parse(text: &str) -> SerialLog {
        let mut log = SerialLog::default();
        let (complete, partial) = match text.rfind('\n') {
            Some(end) => (&text[..end], &text[end + 1..]),
            None => ("", text),
        };
        log.partial = partial.to_owned();
        log.first_line = text.split('\n').next().unwrap_or_default().to_owned();
        for raw in complete.split('\n') {
            let line = raw.trim_end_matches('\r');
            if let Some(hb) = Heartbeat::parse(line) {
                log.heartbeats.push(hb);
            }
            if line.starts_with("GUEST-READY") {
                log.ready += 1;
            }
            if line.starts_with("WORKLOAD start") {
                log.starts += 1;
            }
            if line.starts_with("SWEEP ") {
                log.sweeps += 1;
            }
            if line.contains("FAIL ")
                || line.contains("Kernel panic")
                || line.contains("Oops")
                || line.contains("BUG:")
            {
                log.failures.push(line.to_owned());
            }
            log.lines.push(line.to_owned());
        }
        log
    }

    /// Reads and parses `path` (an absent or unreadable file is an empty log).
    pub fn read(path: &Path) -> SerialLog {
        let bytes = std::fs::read(path).unwrap_or_default();
        SerialLog::parse(&String::from_utf8_lossy(&bytes))
    }

    /// The last heartbeat.
    pub fn last(&self) -> Option<&Heartbeat> {
        self.heartbeats.last()
    }

    /// The last `n` lines, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines[from..].join("\n")
    }
}

/// What a guest must show after a migration before it counts as continued.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Heartbeats on the destination past the source's last one.
    pub heartbeats_after: u64,
    /// Complete buffer scrubs on the destination past the source's last count: 2 guarantees
    /// one that ran wholly on the destination.
    pub sweeps_after: u64,
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            heartbeats_after: 10,
            sweeps_after: 2,
        }
    }
}

/// The judgement of a migration from the two serial logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing wrong yet, but the destination has not shown enough yet.
    Pending(String),
    /// The guest continued on the destination: the source's last heartbeat and the
    /// destination's first and last.
    Continued {
        /// The source's last heartbeat number.
        source_last: u64,
        /// The destination's first heartbeat number.
        destination_first: u64,
        /// The destination's last heartbeat number.
        destination_last: u64,
    },
    /// Something is wrong, and waiting will not mend it.
    Broken(String),
}

/// Judges a migration: the source booted once and printed heartbeats up to N without a FAIL;
/// the destination did not boot or start the workload again, its heartbeats start at N+1 (N+2
/// when the line of N+1 was cut between the two logs at the switch-over) and go up one by one,
/// with no FAIL line or failure count; and (else `Pending`) it went on for
/// `expect.heartbeats_after` more, with `expect.sweeps_after` more complete scrubs and more disk
/// records verified than on the source.
pub fn judge(src: &SerialLog, dst: &SerialLog, expect: Expect) -> Verdict {
    use Verdict::{Broken, Pending};
    if src.ready != 1 || src.starts != 1 {
        return Broken(format!(
            "the source booted {} times and started the workload {} times, not once",
            src.ready, src.starts
        ));
    }
    if let Some(line) = src.failures.first() {
        return Broken(format!("the source reported: {line}"));
    }
    let Some(last) = src.last() else {
        return Broken("the source printed no heartbeat".to_owned());
    };
    if dst.ready > 0 || dst.starts > 0 {
        return Broken(
            "the destination booted the guest afresh (GUEST-READY or WORKLOAD start in its log)"
                .to_owned(),
        );
    }
    if let Some(line) = dst.failures.first() {
        return Broken(format!("the destination reported: {line}"));
    }
    let Some(first) = dst.heartbeats.first() else {
        return Pending("no heartbeat on the destination yet".to_owned());
    };
    if first.n <= last.n || first.n > last.n + 2 {
        return Broken(format!(
            "the destination's first heartbeat is {}, the source's last {}: expected {} (or {} \
             with a line cut at the switch-over)",
            first.n,
            last.n,
            last.n + 1,
            last.n + 2
        ));
    }
    // The serial port's bytes carry on where the source stopped: a line cut there is the
    // source's partial line followed by the destination's first.
    let cut = Heartbeat::parse((src.partial.clone() + &dst.first_line).trim_end_matches('\r'));
    if first.n == last.n + 2 && cut.map(|hb| hb.n) != Some(last.n + 1) {
        return Broken(format!(
            "heartbeat {} is missing: neither log has it, not even cut between them",
            last.n + 1
        ));
    }
    for pair in dst.heartbeats.windows(2) {
        if pair[1].n != pair[0].n + 1 {
            return Broken(format!(
                "the destination's heartbeats jump from {} to {}",
                pair[0].n, pair[1].n
            ));
        }
    }
    let end = dst.heartbeats.last().unwrap_or(first);
    if let Some(bad) = dst.heartbeats.iter().find(|hb| hb.fails > 0) {
        return Broken(format!(
            "the workload counts {} failures at heartbeat {}",
            bad.fails, bad.n
        ));
    }
    let want_n = last.n + expect.heartbeats_after;
    let want_sweeps = last.sweeps + expect.sweeps_after;
    if end.n < want_n || end.sweeps < want_sweeps || end.records <= last.records {
        return Pending(format!(
            "the destination is at heartbeat {} (want {want_n}), sweep {} (want {want_sweeps}), \
             {} records verified (want more than {})",
            end.n, end.sweeps, end.records, last.records
        ));
    }
    Verdict::Continued {
        source_last: last.n,
        destination_first: first.n,
        destination_last: end.n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(n: u64, sweeps: u64, rec: u64, fail: u64) -> String {
        format!(
            "HB {n} t={} sum=00000000deadbeef dirtied=3 sweeps={sweeps} rec={rec} fail={fail}\r\n",
            n * 100
        )
    }

    fn source(upto: u64) -> SerialLog {
        let mut text = "GUEST-READY kernel=6.1\nWORKLOAD start buf=32MiB\n".to_owned();
        for n in 0..=upto {
            text += &hb(n, n / 10, n, 0);
        }
        SerialLog::parse(&text)
    }

    fn dest(from: u64, to: u64, sweeps: u64) -> String {
        (from..=to).map(|n| hb(n, sweeps, n, 0)).collect()
    }

    #[test]
    fn parses_a_heartbeat_and_refuses_a_cut_one() {
        let hb = Heartbeat::parse("HB 7 t=700 sum=00ff dirtied=1 sweeps=2 rec=6 fail=0");
        assert_eq!(hb.map(|h| (h.n, h.sum, h.records)), Some((7, 0xff, 6)));
        assert_eq!(Heartbeat::parse("HB 7 t=700 sum=00ff dirti"), None);
        assert_eq!(Heartbeat::parse("ed=1 sweeps=2 rec=6 fail=0"), None);
    }

    #[test]
    fn a_continued_guest_passes_and_a_short_run_is_pending() {
        let src = source(20);
        let dst = SerialLog::parse(&dest(21, 40, 4));
        assert_eq!(
            judge(&src, &dst, Expect::default()),
            Verdict::Continued {
                source_last: 20,
                destination_first: 21,
                destination_last: 40
            }
        );
        let dst = SerialLog::parse(&dest(21, 25, 4));
        assert!(matches!(
            judge(&src, &dst, Expect::default()),
            Verdict::Pending(_)
        ));
        // The last line is still being written: left out.
        let dst = SerialLog::parse(&(dest(21, 40, 4) + "HB 41 t="));
        assert_eq!(dst.heartbeats.len(), 20);
    }

    #[test]
    fn a_line_cut_at_the_switch_over_is_allowed() {
        let mut text = "GUEST-READY\nWORKLOAD start\n".to_owned();
        for n in 0..=20 {
            text += &hb(n, 2, n, 0);
        }
        let line = hb(21, 2, 21, 0);
        for cut in [1, 2, 15, line.len() - 2, line.len() - 1] {
            let src = SerialLog::parse(&(text.clone() + &line[..cut]));
            let dst = SerialLog::parse(&(line[cut..].to_owned() + &dest(22, 40, 4)));
            assert!(
                matches!(
                    judge(&src, &dst, Expect::default()),
                    Verdict::Continued { .. }
                ),
                "cut at {cut}"
            );
        }
        // The same logs without heartbeat 21 at all.
        let src = SerialLog::parse(&text);
        let dst = SerialLog::parse(&dest(22, 40, 4));
        assert!(matches!(
            judge(&src, &dst, Expect::default()),
            Verdict::Broken(_)
        ));
    }

    #[test]
    fn reboots_gaps_and_failures_are_broken() {
        let src = source(20);
        let broken = |dst: &str| {
            matches!(
                judge(&src, &SerialLog::parse(dst), Expect::default()),
                Verdict::Broken(_)
            )
        };
        assert!(broken(
            &("GUEST-READY\nWORKLOAD start\n".to_owned() + &dest(0, 40, 4))
        ));
        assert!(broken(&dest(0, 40, 4)), "restarted from an old state");
        assert!(broken(&dest(25, 40, 4)), "heartbeats skipped");
        assert!(broken(&(dest(21, 30, 4) + &dest(32, 40, 4))));
        assert!(broken(&(dest(21, 30, 4) + "FAIL disk: record 30\n")));
        assert!(broken(&(dest(21, 30, 4) + &hb(31, 4, 31, 1))));
        assert!(broken(&(dest(21, 30, 4) + "Kernel panic - not syncing\n")));
    }
}
