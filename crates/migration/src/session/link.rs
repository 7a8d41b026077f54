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
