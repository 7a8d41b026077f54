//! Judging a running migration from the source's `query-migrate` figures: how fast data really
//! moves, whether it moves at all, and whether precopy is getting anywhere.
//!
//! A migration whose guest dirties memory faster than the link carries it never ends by itself,
//! and one whose link died keeps reporting the last rate QEMU measured. [`Watch`] is fed every
//! [`Snapshot`] and fills in what QEMU does not say (the rate between ticks, how long nothing
//! has moved, whether the remaining amount still shrinks from pass to pass); it then says what
//! the source job should do about it ([`Action`]). It does no I/O: the follow loop in
//! [`crate::source`] acts, and the tests here drive it with made-up snapshots.

use std::collections::VecDeque;
use std::time::Duration;

use qmigrate_qmp::MigrationStatus;

use crate::outcome::Snapshot;

/// How long the rate between ticks is averaged over.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// A pass whose peak remaining amount is not at least this much smaller than the best of the
/// passes before counts as no progress.
const SHRINK: f64 = 0.9;

/// How many passes after the first (the full copy) must show no progress before precopy is
/// called not converging.
const FLAT_PASSES: usize = 3;

/// The default time a migration may go on without converging before the policy acts: this
/// much per GiB of guest RAM (a bigger guest takes longer per pass), and at least
/// [`MIN_CONVERGE_TIMEOUT`].
pub const CONVERGE_TIMEOUT_PER_GIB: Duration = Duration::from_secs(30);

/// The least default converge timeout, whatever the guest's size.
pub const MIN_CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The default time a precopy migration may move nothing before it is cancelled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// What the source does about a migration that does not converge or does not move.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchPolicy {
    /// How long precopy may go on without converging before the policy acts; `None` scales
    /// with the guest's RAM ([`CONVERGE_TIMEOUT_PER_GIB`], at least
    /// [`MIN_CONVERGE_TIMEOUT`]); zero never acts (the progress still says so).
    pub converge_timeout: Option<Duration>,
    /// How long a precopy migration may move nothing before it is cancelled; zero never.
    pub stall_timeout: Duration,
    /// Postcopy is enabled: a migration that does not converge is switched to it.
    pub postcopy: bool,
    /// QEMU's auto-converge is on: it throttles the guest, and the policy gives it time as
    /// long as the throttle still rises.
    pub auto_converge: bool,
}

impl Default for WatchPolicy {
    fn default() -> Self {
        WatchPolicy {
            converge_timeout: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            postcopy: false,
            auto_converge: false,
        }
    }
}

impl WatchPolicy {
    /// The converge timeout for a guest of `ram` bytes; `None` when the policy never acts.
    pub fn converge_timeout_for(&self, ram: u64) -> Option<Duration> {
        match self.converge_timeout {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => {
                let gib = ram as f64 / (1u64 << 30) as f64;
                Some(
                    CONVERGE_TIMEOUT_PER_GIB
                        .mul_f64(gib)
                        .max(MIN_CONVERGE_TIMEOUT),
                )
            }
        }
    }
}

/// Whether precopy is getting anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Convergence {
    /// Too early to say (the first pass, or too few passes since).
    #[default]
    Unknown,
    /// The remaining amount still shrinks from pass to pass.
    Converging,
    /// It has stopped shrinking.
    NotConverging,
}

/// What the source job should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Nothing: keep following.
    Continue,
    /// Switch to postcopy now (`migrate-start-postcopy`), for this reason.
    StartPostcopy(String),
    /// Say this and keep going (auto-converge is throttling the guest).
    Note(String),
    /// Cancel the migration: it will not end by itself, for this reason. The migration fails
    /// (it did not end as asked); the source keeps running.
    Cancel(String),
}

/// The judge of one migration; see the module's documentation.
#[derive(Debug)]
pub struct Watch {
    policy: WatchPolicy,
    /// (elapsed, transferred) of the recent ticks, oldest first.
    samples: VecDeque<(Duration, u64)>,
    /// When `transferred` last grew (or the watch started).
    moved_at: Duration,
    last_transferred: u64,
    /// The pass being watched and the most it had left (right after its bitmap sync).
    pass: u64,
    pass_peak: u64,
    /// The peak remaining amount of each finished pass after the first.
    peaks: Vec<u64>,
    /// Since when precopy has not converged, and the peak it had then.
    flat_since: Option<Duration>,
    /// The throttle when the policy last gave auto-converge more time.
    throttle_seen: Option<u64>,
    /// The policy switched to postcopy or cancelled: it does not act again.
    acted: bool,
}

impl Watch {
    /// A watch with `policy`, started at elapsed time zero.
    pub fn new(policy: WatchPolicy) -> Self {
        Watch {
            policy,
            samples: VecDeque::new(),
            moved_at: Duration::ZERO,
            last_transferred: 0,
            pass: 0,
            pass_peak: 0,
            peaks: Vec::new(),
            flat_since: None,
            throttle_seen: None,
            acted: false,
        }
    }

    /// Takes in one snapshot, fills in its measured fields (`rate`, `stalled_for`,
    /// `convergence`) and says what to do.
    pub fn observe(&mut self, s: &mut Snapshot) -> Action {
        self.measure(s);
        if self.acted {
            return Action::Continue;
        }
        let precopy = matches!(s.status, MigrationStatus::Setup | MigrationStatus::Active);
        if !precopy {
            // Postcopy cannot be cancelled, and the other states are the switch-over.
            self.flat_since = None;
            return Action::Continue;
        }
        let stall = self.policy.stall_timeout;
        if let Some(stalled) = s.stalled_for {
            if !stall.is_zero() && stalled >= stall {
                self.acted = true;
                return Action::Cancel(format!(
                    "nothing moved for {} s: the network to the destination, or the \
                     destination itself, stopped taking data",
                    stalled.as_secs()
                ));
            }
        }
        self.converge_action(s)
    }

    fn measure(&mut self, s: &mut Snapshot) {
        let now = s.elapsed;
        if s.transferred > self.last_transferred {
            self.last_transferred = s.transferred;
            self.moved_at = now;
        }
        self.samples.push_back((now, s.transferred));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(at, _)| now.saturating_sub(*at) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        s.rate = match (self.samples.front(), self.samples.back()) {
            (Some((t0, b0)), Some((t1, b1))) if t1 > t0 => {
                b1.saturating_sub(*b0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let moving = matches!(s.status, MigrationStatus::Setup | MigrationStatus::Active)
            || s.status == MigrationStatus::PostcopyActive;
        let idle = now.saturating_sub(self.moved_at);
        // Two ticks without a byte is noise; from a second on it is worth saying.
        s.stalled_for = (moving && idle >= Duration::from_secs(1)).then_some(idle);

        if s.status == MigrationStatus::Active {
            if s.pass > self.pass {
                if self.pass >= 2 {
                    self.peaks.push(self.pass_peak);
                }
                self.pass = s.pass;
                self.pass_peak = 0;
            }
            self.pass_peak = self.pass_peak.max(s.remaining);
        }
        s.convergence = self.convergence();
    }

    /// Converging while some pass of the last [`FLAT_PASSES`] left clearly less than the
    /// passes before it had.
    fn convergence(&self) -> Convergence {
        if self.peaks.len() < FLAT_PASSES + 1 {
            return Convergence::Unknown;
        }
        let (before, recent) = self.peaks.split_at(self.peaks.len() - FLAT_PASSES);
        let best_before = before.iter().copied().min().unwrap_or(u64::MAX);
        let best_recent = recent.iter().copied().min().unwrap_or(u64::MAX);
        if (best_recent as f64) < best_before as f64 * SHRINK {
            Convergence::Converging
        } else {
            Convergence::NotConverging
        }
    }

    fn converge_action(&mut self, s: &Snapshot) -> Action {
        if s.convergence != Convergence::NotConverging {
            self.flat_since = None;
            return Action::Continue;
        }
        let since = *self.flat_since.get_or_insert(s.elapsed);
        let Some(timeout) = self.policy.converge_timeout_for(s.total) else {
            return Action::Continue;
        };
        let flat = s.elapsed.saturating_sub(since);
        if flat < timeout {
            return Action::Continue;
        }
        let rates = format!(
            "the guest dirties {} while the link moves {}",
            human_rate(s.dirty_rate()),
            human_rate(s.rate)
        );
        if self.policy.postcopy {
            self.acted = true;
            return Action::StartPostcopy(format!(
                "precopy has not converged for {} s ({rates}): switching to postcopy",
                flat.as_secs()
            ));
        }
        if self.policy.auto_converge {
            let throttle = s.throttle.unwrap_or(0);
            if self.throttle_seen.is_none_or(|seen| throttle > seen) {
                // QEMU is still raising the throttle: give it another round.
                self.throttle_seen = Some(throttle);
                self.flat_since = Some(s.elapsed);
                return Action::Note(format!(
                    "precopy has not converged for {} s ({rates}): auto-converge throttles \
                     the guest's CPUs, now at {throttle}%",
                    flat.as_secs()
                ));
            }
            self.acted = true;
            return Action::Cancel(format!(
                "precopy did not converge in {} s although auto-converge throttled the guest's \
                 CPUs to {throttle}% ({rates}); --postcopy would finish it, or a faster link \
                 (--max-bandwidth)",
                flat.as_secs()
            ));
        }
        self.acted = true;
        Action::Cancel(format!(
            "precopy did not converge in {} s: {rates}, so it would never end; --postcopy or \
             --auto-converge would have finished it",
            flat.as_secs()
        ))
    }
}

/// A rate for messages, in MiB/s (the library has no unit formatting of its own).
fn human_rate(bytes_per_sec: f64) -> String {
    format!("{:.1} MiB/s", bytes_per_sec / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A guest of `ram` bytes whose migration runs at `link` bytes/s while the guest dirties
    /// `dirty` bytes/s of a `working_set`, sampled every 500 ms as QEMU would report it.
    struct Sim {
        ram: u64,
        link: u64,
        dirty: u64,
        working_set: u64,
        t: Duration,
        transferred: u64,
        pass: u64,
        remaining: u64,
        dirtied: u64,
        status: MigrationStatus,
    }

    impl Sim {
        fn new(ram: u64, link: u64, dirty: u64, working_set: u64) -> Self {
            Sim {
                ram,
                link,
                dirty,
                working_set,
                t: Duration::ZERO,
                transferred: 0,
                pass: 1,
                remaining: ram,
                dirtied: 0,
                status: MigrationStatus::Active,
            }
        }

        fn step(&mut self) -> Snapshot {
            let dt = Duration::from_millis(500);
            let sent = (self.link as f64 * dt.as_secs_f64()) as u64;
            let sent = sent.min(self.remaining);
            self.transferred += sent;
            self.remaining -= sent;
            // The guest dirties while the pass sends (a pass shorter than a tick dirties less).
            let busy = if self.link == 0 {
                dt.as_secs_f64()
            } else {
                sent as f64 / self.link as f64
            };
            self.dirtied = (self.dirtied + (self.dirty as f64 * busy) as u64).min(self.working_set);
            self.t += dt;
            if self.remaining == 0 {
                if self.dirtied < self.link / 10 {
                    self.status = MigrationStatus::Completed;
                } else {
                    self.pass += 1;
                    self.remaining = self.dirtied;
                    self.dirtied = 0;
                }
            }
            self.snapshot()
        }

        fn snapshot(&self) -> Snapshot {
            Snapshot {
                status: self.status,
                elapsed: self.t,
                transferred: self.transferred,
                total: self.ram,
                remaining: self.remaining,
                throughput: self.link as f64,
                dirty_pages_rate: self.dirty / 4096,
                pass: self.pass,
                ..Snapshot::default()
            }
        }
    }

    /// Steps until the watch acts, the migration completes, or `limit`; the last snapshot as
    /// the watch filled it in.
    fn run(sim: &mut Sim, watch: &mut Watch, limit: Duration) -> (Action, Snapshot) {
        loop {
            let mut s = sim.step();
            let action = watch.observe(&mut s);
            if action != Action::Continue
                || s.status == MigrationStatus::Completed
                || sim.t >= limit
            {
                return (action, s);
            }
        }
    }

    #[test]
    fn rate_is_measured_between_ticks() {
        let mut watch = Watch::new(WatchPolicy::default());
        let mut sim = Sim::new(1024 * MIB, 40 * MIB, 0, 0);
        let mut s = sim.step();
        watch.observe(&mut s);
        let mut s = sim.step();
        watch.observe(&mut s);
        assert!(
            (s.rate - (40 * MIB) as f64).abs() < MIB as f64,
            "{}",
            s.rate
        );
        assert_eq!(s.stalled_for, None);
    }

    #[test]
    fn a_dead_link_is_a_stall_and_cancels_precopy() {
        let mut watch = Watch::new(WatchPolicy {
            stall_timeout: Duration::from_secs(10),
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(1024 * MIB, 40 * MIB, 0, 0);
        for _ in 0..4 {
            let mut s = sim.step();
            assert_eq!(watch.observe(&mut s), Action::Continue);
        }
        sim.link = 0;
        let mut stalled = Vec::new();
        let action = loop {
            let mut s = sim.step();
            let action = watch.observe(&mut s);
            stalled.push(s.stalled_for);
            if action != Action::Continue {
                break action;
            }
            assert!(sim.t < Duration::from_secs(30), "never cancelled");
        };
        assert!(matches!(&action, Action::Cancel(m) if m.contains("nothing moved for 10 s")));
        assert_eq!(stalled[0], None);
        assert_eq!(stalled.last(), Some(&Some(Duration::from_secs(10))));
        // The rate falls to nothing within the window, instead of QEMU's last figure.
        let mut s = sim.step();
        watch.observe(&mut s);
        assert_eq!(s.rate, 0.0);
    }

    #[test]
    fn postcopy_cannot_stall_into_a_cancel() {
        let mut watch = Watch::new(WatchPolicy {
            stall_timeout: Duration::from_secs(2),
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(1024 * MIB, 0, 0, 0);
        sim.status = MigrationStatus::PostcopyActive;
        let (action, s) = run(&mut sim, &mut watch, Duration::from_secs(10));
        assert_eq!(action, Action::Continue);
        assert!(s.stalled_for.is_some());
    }

    #[test]
    fn a_guest_slower_than_the_link_converges() {
        let mut watch = Watch::new(WatchPolicy {
            converge_timeout: Some(Duration::from_secs(5)),
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(256 * MIB, 64 * MIB, 32 * MIB, 256 * MIB);
        let (action, s) = run(&mut sim, &mut watch, Duration::from_secs(120));
        assert_eq!(action, Action::Continue);
        assert_eq!(s.status, MigrationStatus::Completed);
    }

    #[test]
    fn a_guest_faster_than_the_link_is_cancelled_with_both_rates() {
        let mut watch = Watch::new(WatchPolicy {
            converge_timeout: Some(Duration::from_secs(5)),
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(256 * MIB, 32 * MIB, 64 * MIB, 64 * MIB);
        let (action, s) = run(&mut sim, &mut watch, Duration::from_secs(120));
        let Action::Cancel(message) = action else {
            panic!("not cancelled: {action:?}")
        };
        assert!(
            message.contains("64.0 MiB/s") && message.contains("32.0 MiB/s"),
            "{message}"
        );
        assert!(
            message.contains("--postcopy or --auto-converge"),
            "{message}"
        );
        assert_eq!(s.convergence, Convergence::NotConverging);
        // Not before the timeout: the first full pass takes 8 s, then 2 s per pass.
        assert!(s.elapsed > Duration::from_secs(8 + 5), "{:?}", s.elapsed);
    }

    #[test]
    fn with_postcopy_it_switches_instead() {
        let mut watch = Watch::new(WatchPolicy {
            converge_timeout: Some(Duration::from_secs(5)),
            postcopy: true,
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(256 * MIB, 32 * MIB, 64 * MIB, 64 * MIB);
        let (action, _) = run(&mut sim, &mut watch, Duration::from_secs(120));
        assert!(matches!(&action, Action::StartPostcopy(m) if m.contains("switching")));
    }

    #[test]
    fn auto_converge_gets_time_while_the_throttle_rises() {
        let mut watch = Watch::new(WatchPolicy {
            converge_timeout: Some(Duration::from_secs(5)),
            auto_converge: true,
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(256 * MIB, 32 * MIB, 64 * MIB, 64 * MIB);
        let mut throttle = 20;
        let mut notes = 0;
        let action = loop {
            let mut s = sim.step();
            s.throttle = Some(throttle);
            match watch.observe(&mut s) {
                Action::Continue => {}
                Action::Note(_) => {
                    notes += 1;
                    // QEMU raises the throttle twice, then it is at its maximum.
                    if notes <= 2 {
                        throttle += 10;
                    }
                }
                other => break other,
            }
            assert!(sim.t < Duration::from_secs(300), "never acted");
        };
        assert_eq!(notes, 3);
        assert!(
            matches!(&action, Action::Cancel(m) if m.contains("40%")),
            "{action:?}"
        );
    }

    #[test]
    fn zero_never_acts_but_still_says_so() {
        let mut watch = Watch::new(WatchPolicy {
            converge_timeout: Some(Duration::ZERO),
            ..WatchPolicy::default()
        });
        let mut sim = Sim::new(256 * MIB, 32 * MIB, 64 * MIB, 64 * MIB);
        let (action, s) = run(&mut sim, &mut watch, Duration::from_secs(120));
        assert_eq!(action, Action::Continue);
        assert_eq!(s.convergence, Convergence::NotConverging);
    }

    #[test]
    fn the_default_timeout_scales_with_ram() {
        let p = WatchPolicy::default();
        assert_eq!(
            p.converge_timeout_for(128 * MIB),
            Some(MIN_CONVERGE_TIMEOUT)
        );
        assert_eq!(
            p.converge_timeout_for(16 << 30),
            Some(Duration::from_secs(16 * 30))
        );
    }
}
