//! The relay: one QEMU-side Unix connection and one tunnel connection, copied both ways at
//! once until both directions have ended.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tokio::net::UnixStream;

use crate::error::Result;
use crate::stream::TunnelStream;

/// What one relayed connection carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes read from the Unix side and sent into the tunnel.
    pub to_tunnel: u64,
    /// Bytes received from the tunnel and written to the Unix side.
    pub from_tunnel: u64,
    /// From the start of the relay to its end.
    pub elapsed: Duration,
}

/// Copies `unix` <-> `tunnel` until both directions end.
///
/// An end of one direction is forwarded as a half-close (QEMU's return path keeps flowing
/// the other way); an error in either direction drops both sockets at once, so the tunnel
/// peer sees a lost connection rather than an end marker and QEMU sees its stream cut
/// short. The stats are returned in both cases.
pub async fn relay(mut unix: UnixStream, tunnel: TunnelStream) -> (RelayStats, Result<()>) {
    let start = Instant::now();
    let (to_tunnel, from_tunnel) = (AtomicU64::new(0), AtomicU64::new(0));
    // Borrowed halves: tokio's owned write half shuts the socket down when dropped, and that
    // half-close would reach QEMU as a clean EOF before the close that resets its connection.
    let (mut unix_rd, mut unix_wr) = unix.split();
    let (mut tun_rd, mut tun_wr) = tunnel.into_split();

    let result = tokio::try_join!(
        tun_wr.pump_from(&mut unix_rd, &to_tunnel),
        tun_rd.pump_to(&mut unix_wr, &from_tunnel),
    );
    if result.is_ok() {
        TunnelStream::finish(tun_rd, tun_wr).await;
    }
    let stats = RelayStats {
        to_tunnel: to_tunnel.load(Relaxed),
        from_tunnel: from_tunnel.load(Relaxed),
        elapsed: start.elapsed(),
    };
    (stats, result.map(|_| ()))
}
