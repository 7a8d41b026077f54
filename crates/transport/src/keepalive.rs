//! Noticing a dead peer: TCP keepalive and `TCP_USER_TIMEOUT` on every tunnel socket.
//!
//! A cable pulled at the far end sends neither FIN nor RST: without these a connection that
//! waits for data waits forever, and one that writes fills its buffers and then blocks
//! forever. Keepalive probes an idle connection; `TCP_USER_TIMEOUT` fails a write that the
//! peer has not acknowledged in time (it also bounds the keepalive probing). Both stay on the
//! socket when it is handed to QEMU on the direct data path, so QEMU's own reads and writes
//! fail too instead of hanging.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// How soon a dead peer is noticed unless told otherwise.
pub const DEFAULT_DEAD_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// How a tunnel socket notices a dead peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadPeer {
    /// A connection whose peer has not answered for this long fails: idle connections are
    /// probed, and written data unacknowledged for this long is an error. Zero leaves the
    /// system's defaults (about two hours idle, and 15 retransmissions: many minutes).
    pub timeout: Duration,
}

impl Default for DeadPeer {
    fn default() -> Self {
        DeadPeer {
            timeout: DEFAULT_DEAD_PEER_TIMEOUT,
        }
    }
}

impl DeadPeer {
    /// Sets the options on `socket`: the first keepalive probe after a third of the timeout
    /// idle, then one every sixth, so that four unanswered probes end it within the timeout.
    pub fn apply(&self, socket: impl AsFd) -> io::Result<()> {
        if self.timeout.is_zero() {
            return Ok(());
        }
        let sock = SockRef::from(&socket);
        let secs = |d: Duration| d.max(Duration::from_secs(1));
        let keepalive = TcpKeepalive::new()
            .with_time(secs(self.timeout / 3))
            .with_interval(secs(self.timeout / 6))
            .with_retries(4);
        sock.set_tcp_keepalive(&keepalive)?;
        sock.set_tcp_user_timeout(Some(self.timeout))?;
        Ok(())
    }
}

/// A timeout for a message: whole seconds as `30s`, anything else in milliseconds.
pub(crate) fn show(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_land_on_the_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let tcp =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        DeadPeer {
            timeout: Duration::from_secs(12),
        }
        .apply(&tcp)
        .expect("apply");
        let sock = SockRef::from(&tcp);
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("idle"),
            Duration::from_secs(4)
        );
        assert_eq!(
            sock.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(2)
        );
        assert_eq!(sock.tcp_keepalive_retries().expect("retries"), 4);
        assert_eq!(
            sock.tcp_user_timeout().expect("user timeout"),
            Some(Duration::from_secs(12))
        );
    }

    #[test]
    fn zero_leaves_the_defaults() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let tcp =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        DeadPeer {
            timeout: Duration::ZERO,
        }
        .apply(&tcp)
        .expect("apply");
        assert_eq!(
            SockRef::from(&tcp)
                .tcp_user_timeout()
                .expect("user timeout"),
            None
        );
    }
}
