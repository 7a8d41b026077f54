//! Totals over all connections a tunnel endpoint served, for the `--once` summary.

use std::fmt;
use std::time::{Duration, Instant};

use crate::relay::RelayStats;

/// What a tunnel server or client carried over its lifetime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Tunnel connections that got past the handshake.
    pub connections: u64,
    /// Of those, how many ended with an error.
    pub failed: u64,
    /// Bytes sent into the tunnel (from the local Unix side).
    pub to_tunnel: u64,
    /// Bytes received from the tunnel (written to the local Unix side).
    pub from_tunnel: u64,
    /// From the first connection's start to the last one's end.
    pub elapsed: Duration,
}

/// Accumulates a [`Report`] as connections end.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    report: Report,
    first: Option<Instant>,
}

impl Tally {
    pub(crate) fn started(&mut self) {
        self.first.get_or_insert_with(Instant::now);
        self.report.connections += 1;
    }

    pub(crate) fn ended(&mut self, stats: &RelayStats, failed: bool) {
        self.report.to_tunnel += stats.to_tunnel;
        self.report.from_tunnel += stats.from_tunnel;
        self.report.failed += u64::from(failed);
        if let Some(first) = self.first {
            self.report.elapsed = first.elapsed();
        }
    }

    pub(crate) fn report(&self) -> Report {
        self.report
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            (self.to_tunnel + self.from_tunnel) as f64 / secs / 1e9
        } else {
            0.0
        };
        write!(
            f,
            "{} connection{}, {} failed, {} bytes sent, {} bytes received in {:.2}s ({:.2} GB/s)",
            self.connections,
            if self.connections == 1 { "" } else { "s" },
            self.failed,
            self.to_tunnel,
            self.from_tunnel,
            secs,
            rate
        )
    }
}
