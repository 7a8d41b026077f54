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

/// Copies `unix` <-> `tunnel` until both directions end, then closes the tunnel connection as
/// the negotiated protocol `version` says (see [`TunnelStream::finish`]).
///
/// An end of one direction is forwarded as a half-close (QEMU's return path keeps flowing
/// the other way); an error in either direction drops both sockets at once, so the tunnel
/// peer sees a lost connection rather than an end marker and QEMU sees its stream cut
/// short. From version 2 the connection is complete only once the peer has acknowledged our
/// end of stream: a direction cut after our end marker left is an error too. The stats are
/// returned in all cases.
pub async fn relay(
    unix: UnixStream,
    tunnel: TunnelStream,
    version: u32,
) -> (RelayStats, Result<()>) {
    let (to_tunnel, from_tunnel) = (AtomicU64::new(0), AtomicU64::new(0));
    relay_counted(unix, tunnel, version, &to_tunnel, &from_tunnel).await
}

/// [`relay`], counting into `to_tunnel` and `from_tunnel` as the bytes go, so that another
/// task can read them while the relay runs.
pub(crate) async fn relay_counted(
    mut unix: UnixStream,
    mut tunnel: TunnelStream,
    version: u32,
    to_tunnel: &AtomicU64,
    from_tunnel: &AtomicU64,
) -> (RelayStats, Result<()>) {
    let start = Instant::now();
    widen_send_buffer(&unix);
    // Borrowed halves: tokio's owned write half shuts the socket down when dropped, and that
    // half-close would reach QEMU as a clean EOF before the close that resets its connection.
    let (mut unix_rd, mut unix_wr) = unix.split();
    tunnel.set_version(version);
    let (mut tun_rd, mut tun_wr) = tunnel.into_split();
    tun_rd.expect_acknowledged_end(version);

    let result = match tokio::try_join!(
        tun_wr.pump_from(&mut unix_rd, to_tunnel),
        tun_rd.pump_to(&mut unix_wr, from_tunnel),
    ) {
        Ok(_) => TunnelStream::finish(tun_rd, tun_wr, version).await,
        Err(e) => {
            tun_wr.abort(&e).await;
            Err(e)
        }
    };
    let stats = RelayStats {
        to_tunnel: to_tunnel.load(Relaxed),
        from_tunnel: from_tunnel.load(Relaxed),
        elapsed: start.elapsed(),
    };
    (stats, result)
}

/// What [`widen_send_buffer`] asks for: room for a few of our largest frames.
const UNIX_SEND_BUFFER: libc::c_int = 4 << 20;

/// Raises the send buffer of our end of QEMU's Unix socket.
///
/// QEMU reads its migration socket 32 KiB at a time; with the default buffer (208 KiB) a
/// non-blocking write of one of our frames stops part-way again and again, and every stop
/// costs an `EAGAIN`, a wait and another call. With a few MiB of room a frame goes in with one
/// call. `SO_SNDBUFFORCE` (root) passes the `net.core.wmem_max` cap, `SO_SNDBUF` otherwise gets
/// what the cap allows; neither is required to work.
fn widen_send_buffer(unix: &UnixStream) {
    use std::os::fd::AsRawFd as _;
    let size = UNIX_SEND_BUFFER;
    for option in [libc::SO_SNDBUFFORCE, libc::SO_SNDBUF] {
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                unix.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}
