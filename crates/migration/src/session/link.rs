//! A session's control connection with heartbeats (protocol version 3).
//!
//! Keepalive and `TCP_USER_TIMEOUT` notice a peer whose kernel stopped answering, not a peer
//! process that hangs while its kernel acknowledges every byte (`kill -STOP`, a stuck host
//! daemon): the control connection then looks idle and healthy forever. So from version
//! [`HEARTBEATS`] each side sends [`Control::Heartbeat`] whenever it has sent nothing for
//! [`PING_IDLE`], for as long as it waits on the connection, and takes a silence of its
//! dead-peer timeout for a hung peer. The interval is the protocol's, not the timeout's, so the
//! two sides may have different timeouts. With an older peer nothing is sent or expected.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::anyhow;
use qmigrate_transport::protocol::{self, HEARTBEATS, PING_IDLE};
use qmigrate_transport::TunnelStream;
use tokio::time::Instant;

use super::Control;

/// The shortest silence taken for a hung peer: a few heartbeat intervals, so that a
/// scheduling hiccup is not one.
const MIN_SILENCE: Duration = Duration::from_secs(3);

/// A control connection: the tunnel connection, its receive buffer, and the heartbeats.
pub(crate) struct Link {
    stream: TunnelStream,
    /// Bytes read but not yet a whole message (see [`TunnelStream::recv_body_buffered`]).
    buf: Vec<u8>,
    /// Whether both sides send heartbeats (version 3).
    heartbeats: bool,
    /// A silence this long means a hung peer (`None`: never, or no heartbeats).
    silence: Option<Duration>,
    last_heard: Instant,
    next_beat: Instant,
    /// Messages that came while [`Link::watch`] only kept the connection alive.
    pending: VecDeque<Control>,
    /// Why the connection is over, once it is (lost, or the peer silent).
    dead: Option<String>,
    /// Whether it ended by the peer's silence.
    silent: bool,
    /// Whether silence counts yet ([`Link::arm`]).
    armed: bool,
    /// The peer, for messages ("the tunnel-server", "the source").
    peer: &'static str,
}

impl Link {
    /// A control connection whose handshake agreed on `version`, to `peer` (named in
    /// messages), taking a silence of `dead_peer` (zero: none) for a hung peer.
    pub(crate) fn new(
        stream: TunnelStream,
        version: u32,
        dead_peer: Duration,
        peer: &'static str,
    ) -> Self {
        let heartbeats = version >= HEARTBEATS;
        let now = Instant::now();
        Link {
            stream,
            buf: Vec::new(),
            heartbeats,
            silence: (heartbeats && !dead_peer.is_zero()).then(|| dead_peer.max(MIN_SILENCE)),
            last_heard: now,
            next_beat: now + PING_IDLE,
            pending: VecDeque::new(),
            dead: None,
            silent: false,
            armed: false,
            peer,
        }
    }

    /// From now on a silence of the dead-peer timeout is a hung peer: once the destination
    /// is ready (until then the destination prepares its QEMU without a word, bounded by the
    /// source's wait for `ready`).
    pub(crate) fn arm(&mut self) {
        self.armed = true;
        self.last_heard = Instant::now();
    }

    /// The tunnel connection underneath (to see its transport).
    pub(crate) fn stream(&self) -> &TunnelStream {
        &self.stream
    }

    /// Why the peer was taken for dead, if it was: its silence outlasted the dead-peer timeout.
    pub(crate) fn silent(&self) -> Option<&str> {
        self.dead.as_deref().filter(|_| self.silent)
    }

    /// Sends one message.
    pub(crate) async fn send(&mut self, msg: &Control) -> qmigrate_transport::Result<()> {
        self.stream.send_msg(msg).await?;
        self.next_beat = Instant::now() + PING_IDLE;
        Ok(())
    }

    /// Receives the next message other than a heartbeat, sending heartbeats while it waits.
    /// Cancel-safe (except for a heartbeat cut off half-sent, which only a peer that stopped
    /// reading sees). An error once the peer was silent for the dead-peer timeout, and from
    /// then on.
    pub(crate) async fn recv(&mut self) -> anyhow::Result<Control> {
        if let Some(msg) = self.pending.pop_front() {
            return Ok(msg);
        }
        if let Some(dead) = &self.dead {
            return Err(anyhow!("{dead}"));
        }
        loop {
            let silent = self
                .silence
                .filter(|_| self.armed)
                .map(|s| self.last_heard + s);
            let beat = self.next_beat;
            let heartbeats = self.heartbeats;
            tokio::select! {
                body = self.stream.recv_body_buffered(&mut self.buf) => {
                    let body = body?;
                    self.last_heard = Instant::now();
                    match protocol::decode_body::<Control>(&body)? {
                        Control::Heartbeat => continue,
                        msg => return Ok(msg),
                    }
                }
                () = tokio::time::sleep_until(beat), if heartbeats => {
                    self.stream.send_msg(&Control::Heartbeat).await?;
                    self.next_beat = Instant::now() + PING_IDLE;
                }
                () = sleep_until_some(silent) => {
                    let dead = format!(
                        "{} sent nothing on the control connection for {} s (not even a \
                         heartbeat): it hangs (a stopped process?) or the network between \
                         the hosts is down",
                        self.peer,
                        self.silence.unwrap_or_default().as_secs()
                    );
                    self.dead = Some(dead.clone());
                    self.silent = true;
                    return Err(anyhow!(dead));
                }
            }
        }
    }

    /// Keeps the connection alive while the session does something else (the migration):
    /// heartbeats go out, messages that arrive are kept for [`Link::recv`]. Returns only when
    /// the peer has been silent for the dead-peer timeout, with why; never without
    /// heartbeats, or once the connection is lost (the migration's own connections tell).
    pub(crate) async fn watch(&mut self) -> String {
        if !self.heartbeats {
            return std::future::pending().await;
        }
        loop {
            match self.recv().await {
                Ok(msg) => self.pending.push_back(msg),
                Err(e) => match self.silent() {
                    Some(dead) => return dead.to_owned(),
                    None => {
                        tracing::debug!("control connection: {e:#}");
                        // Lost: what comes next is for `recv` to report.
                        self.lost(e);
                        return std::future::pending().await;
                    }
                },
            }
        }
    }

    /// Remembers a lost connection for the next [`Link::recv`].
    fn lost(&mut self, e: anyhow::Error) {
        self.dead = Some(format!("{e:#}"));
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::session::SourceEnd;

    /// Two ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    const TIMEOUT: Duration = Duration::from_secs(3);

    /// Version 3, both ends armed: one side busy elsewhere ([`Link::watch`]) for two
    /// timeouts, the other waiting in [`Link::recv`] all along; the heartbeats keep both
    /// alive, and the message that finally comes arrives whole although every heartbeat
    /// tick cancels a receive.
    #[tokio::test]
    async fn heartbeats_keep_a_quiet_session_alive() {
        let (a, b) = pair().await;
        let mut a = Link::new(TunnelStream::Tcp(a), 3, TIMEOUT, "a");
        let mut b = Link::new(TunnelStream::Tcp(b), 3, TIMEOUT, "b");
        a.arm();
        b.arm();
        let msg = Control::Finished {
            outcome: SourceEnd::Completed,
            downtime_ms: Some(7),
        };
        let sender = async {
            let quiet = tokio::time::timeout(2 * TIMEOUT, a.watch()).await;
            assert!(quiet.is_err(), "a took b for dead: {quiet:?}");
            a.send(&msg).await.expect("send");
            // Kept alive until b has read it.
            let _ = tokio::time::timeout(Duration::from_secs(2), a.watch()).await;
        };
        let (_, got) = tokio::join!(sender, b.recv());
        assert_eq!(got.expect("b receives"), msg);
        assert!(a.silent().is_none() && b.silent().is_none());
    }

    /// A peer whose connection stays up but says nothing (a stopped process) is taken for
    /// hung after the timeout, not before, and the reason names it.
    #[tokio::test]
    async fn a_silent_peer_is_taken_for_hung() {
        let (a, _b) = pair().await;
        let mut a = Link::new(TunnelStream::Tcp(a), 3, TIMEOUT, "the tunnel-server");
        a.arm();
        let start = Instant::now();
        let err = a.recv().await.expect_err("silence");
        let took = start.elapsed();
        assert!(
            took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        assert!(
            err.to_string()
                .starts_with("the tunnel-server sent nothing on the control connection for 3 s"),
            "{err}"
        );
        assert!(a.silent().is_some());
        // And from then on, at once.
        assert!(tokio::time::timeout(Duration::from_millis(100), a.recv())
            .await
            .expect("at once")
            .is_err());
    }

    /// With a version-2 peer nothing new goes on the wire and silence is no error: an older
    /// qmigrate would refuse a message type it does not know.
    #[tokio::test]
    async fn version_2_sends_and_expects_no_heartbeat() {
        let (a, mut b) = pair().await;
        let mut a = Link::new(TunnelStream::Tcp(a), 2, TIMEOUT, "a");
        a.arm();
        let waited = tokio::time::timeout(TIMEOUT + Duration::from_secs(1), a.recv()).await;
        assert!(waited.is_err(), "recv ended: {waited:?}");
        let mut byte = [0u8; 1];
        let sent = tokio::time::timeout(Duration::from_millis(200), b.read(&mut byte)).await;
        assert!(
            sent.is_err(),
            "a sent something to a version-2 peer: {sent:?}"
        );
    }

    /// A message whose second half comes after a heartbeat tick (which cancels the receive
    /// under way) arrives whole: the half already read is kept.
    #[tokio::test]
    async fn a_message_cut_by_a_heartbeat_tick_arrives_whole() {
        let (a, mut b) = pair().await;
        let mut a = Link::new(TunnelStream::Tcp(a), 3, TIMEOUT, "a");
        a.arm();
        let mut all = protocol::encode(&Control::Heartbeat);
        all.extend_from_slice(&protocol::encode(&Control::Failed {
            message: "the destination says why".into(),
        }));
        let (first, rest) = all.split_at(all.len() - 10);
        let writer = async {
            b.write_all(first).await.expect("write");
            tokio::time::sleep(PING_IDLE + Duration::from_millis(500)).await;
            b.write_all(rest).await.expect("write");
        };
        let (got, ()) = tokio::join!(a.recv(), writer);
        assert_eq!(
            got.expect("recv"),
            Control::Failed {
                message: "the destination says why".into()
            }
        );
    }
}
