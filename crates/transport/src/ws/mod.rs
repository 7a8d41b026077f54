//! RFC 6455 framing on a byte stream: what a `ws://` or `wss://` tunnel connection carries
//! after the HTTP upgrade (which tungstenite still does, see `upgrade.rs`).
//!
//! Layout: `frame.rs` is the sans-IO part (headers, masking, the parser), `read.rs` and
//! `write.rs` the two directions, this file the whole connection during the handshake, the
//! split and the close handshake.
//!
//! Our own framing rather than tungstenite's because of the data path: tungstenite copies
//! every payload into its write buffer and masks it there, reads through a small zero-filled
//! buffer and hands out one message at a time. Here the writer reads from the Unix socket
//! straight into its frame buffer behind a gap for the header and masks in place, and the
//! reader takes large chunks off the socket, unmasks the payloads where they lie and writes
//! them to the Unix socket with one vectored write. The wire format is plain RFC 6455, so a
//! tungstenite-based peer (an older qmigrate) and this one interoperate.
//!
//! What is accepted: binary messages, fragmented or not (an empty one is the end of the
//! stream), ping (answered with a pong), pong (ignored) and close. Anything else is a
//! [`FrameError`]: text messages, reserved bits (no extension is ever negotiated), reserved
//! opcodes, a frame or message above [`MAX_FRAME`] (refused from its header, before a byte
//! of it is buffered), a control frame above 125 bytes or fragmented, an unmasked frame from a
//! client or a masked one from a server.

pub(crate) mod frame;
mod read;
#[cfg(test)]
mod tests;
mod upgrade;
mod write;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use self::frame::{Item, MAX_HEADER, OP_BINARY, OP_CLOSE, OP_PONG};
use self::read::{ControlPayload, PongSlot, ReadState};
use self::write::WriteState;
use crate::error::{Error, Result};
use crate::protocol::{HEARTBEATS, MAX_FRAME, PING_IDLE};

pub use self::frame::FrameError;
pub(crate) use self::frame::{events, Event, Role};
pub use self::read::WsReader;
pub(crate) use self::upgrade::{ws_accept, ws_connect, WS_HANDSHAKE_MESSAGE};
pub use self::write::WsWriter;

/// Largest WebSocket data message qmigrate sends: what one read from the Unix socket may
/// return, up to the limit every peer accepts. With tungstenite, which copied each payload
/// into its write buffer, 64 KiB had measured fastest; without that copy, `qmigrate-bench
/// relay` measured 64 KiB, 256 KiB and 1 MiB close together and 1 MiB a little leaner
/// (fewer headers, reads and wake-ups per GB).
pub const WS_MESSAGE: usize = MAX_FRAME;

/// How much the data path's reader asks the socket for at once: whole frames of the largest
/// size and several smaller ones per read, all written out with one vectored write.
const READ_CHUNK: usize = 1024 * 1024;

/// The status code of a normal close.
const CLOSE_NORMAL: u16 = 1000;

/// The status code of a refused connection (RFC 6455, 7.4.1: policy violation).
pub(crate) const CLOSE_REFUSED: u16 = 1008;

/// How long a connection that is dropped for a reason waits to tell the peer why: its close
/// frame, the peer's answer, the end of the connection.
pub(crate) const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A close frame's payload: the status code, then as much of `reason` as fits in a control
/// frame (123 bytes), cut at a character boundary.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(frame::MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    payload
}

/// Ends a connection whose both directions finished: our close frame, the peer's (bounded
/// by `wait`), then the write side's shutdown (TLS: close_notify). `Ok` once the peer's close
/// frame (status 1000, or none) has arrived: the peer has received our whole stream, since it
/// closes only after both directions ended. A peer that never answers is left after `wait`.
pub(crate) async fn close<R, W>(
    mut rd: WsReader<R>,
    mut wr: WsWriter<W>,
    wait: std::time::Duration,
) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let closed = tokio::time::timeout(wait, async {
        wr.answer_ping().await?;
        wr.st.queue(OP_CLOSE, &CLOSE_NORMAL.to_be_bytes())?;
        wr.st.drain(&mut wr.io).await?;
        let peer = rd.until_close().await;
        let _ = wr.io.shutdown().await;
        peer
    })
    .await;
    closed.unwrap_or_else(|_| {
        Err(Error::ConnectionLost(format!(
            "the peer sent no WebSocket close within {}s after the end of the stream",
            wait.as_secs()
        )))
    })
}

// ---------------------------------------------------------------------------------------
// The whole connection, during the handshake.

/// A WebSocket tunnel connection after the HTTP upgrade, before it is split for the data: one
/// byte stream and our framing on it. The handshake messages go through here, one envelope a
/// binary message.
pub struct WsStream<S> {
    io: S,
    rd: ReadState,
    wr: WriteState,
    /// This end's dead-peer timeout (zero: none): after the split, from protocol version
    /// [`HEARTBEATS`], the reader fails when the peer sends nothing for this long.
    dead_peer: Duration,
    /// Whether the negotiated version has heartbeats ([`WsStream::set_version`]).
    heartbeats: bool,
}

impl<S> fmt::Debug for WsStream<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsStream")
            .field("role", &self.wr.role)
            .field("buffered", &(self.rd.end - self.rd.pos))
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// Takes over `io` after the upgrade as `role`'s end, with `buffered`: the bytes that
    /// arrived after the HTTP message, which are the start of the frame stream. Messages
    /// received before the split are limited to `max_message` bytes.
    pub(crate) fn new(io: S, role: Role, buffered: Vec<u8>, max_message: usize) -> Self {
        WsStream {
            io,
            rd: ReadState::new(role, max_message, buffered),
            wr: WriteState::new(role),
            dead_peer: Duration::ZERO,
            heartbeats: false,
        }
    }

    /// The same connection, taking a silence of `timeout` (zero: never) for a hung peer once
    /// the negotiated version has heartbeats.
    pub(crate) fn with_dead_peer(mut self, timeout: Duration) -> Self {
        self.dead_peer = timeout;
        self
    }

    /// Tells the connection the negotiated protocol `version`: from [`HEARTBEATS`] the data
    /// path's writer pings whenever it has been quiet for [`PING_IDLE`], and its reader fails
    /// when the peer has sent nothing (not even a ping) for the dead-peer timeout.
    pub(crate) fn set_version(&mut self, version: u32) {
        self.heartbeats = version >= HEARTBEATS;
    }

    /// Sends `payload` as one binary message (one frame).
    pub(crate) async fn send_message(&mut self, payload: &[u8]) -> Result<()> {
        self.wr.queue(OP_BINARY, payload)?;
        self.wr.drain(&mut self.io).await
    }

    /// Drops the connection for a reason the peer is told: a close frame with `code` and
    /// `reason`, then (for at most [`REFUSAL_WAIT`]) the peer's close frame or the end of the
    /// connection, so that the close frame is not lost to a reset, then the write side's
    /// shutdown (TLS: `close_notify`).
    pub(crate) async fn close_with(&mut self, code: u16, reason: &str) {
        let _ = tokio::time::timeout(REFUSAL_WAIT, async {
            if self
                .wr
                .queue(OP_CLOSE, &close_payload(code, reason))
                .is_ok()
                && self.wr.drain(&mut self.io).await.is_ok()
            {
                loop {
                    match self.rd.next_item() {
                        Ok(Some(Item::Close(_))) | Err(_) => break,
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            if !matches!(self.rd.fill(&mut self.io).await, Ok(n) if n > 0) {
                                break;
                            }
                        }
                    }
                }
            }
            let _ = self.io.shutdown().await;
        })
        .await;
    }

    /// Receives the next binary message whole, answering pings meanwhile. Cancel-safe: a
    /// message received in part stays in the buffer for the next call.
    pub(crate) async fn recv_message(&mut self) -> Result<Vec<u8>, RecvError> {
        loop {
            if self.rd.complete {
                // Pongs first: the peer may wait for them before it sends more.
                self.wr.drain(&mut self.io).await?;
                self.rd.complete = false;
                return Ok(std::mem::take(&mut self.rd.message));
            }
            match self.rd.next_item()? {
                Some(Item::Data(r)) => self.rd.message.extend_from_slice(&self.rd.buf[r]),
                Some(Item::End { .. }) => self.rd.complete = true,
                Some(Item::Ping(r)) => {
                    let payload = ControlPayload::new(&self.rd.buf[r]);
                    self.wr.queue(OP_PONG, payload.get())?;
                }
                Some(Item::Pong) => {}
                Some(Item::Close(_)) => return Err(RecvError::Closed),
                None => {
                    self.wr.drain(&mut self.io).await?;
                    match self.rd.fill(&mut self.io).await {
                        Ok(0) => return Err(RecvError::Closed),
                        Ok(_) => {}
                        Err(e) => return Err(Error::lost_or_io(e).into()),
                    }
                }
            }
        }
    }

    /// Splits the connection with `split` into its two directions for the data path; the
    /// bytes already buffered and any frame still queued go with them.
    pub(crate) fn split<R, W>(self, split: impl FnOnce(S) -> (R, W)) -> (WsReader<R>, WsWriter<W>) {
        let (r, w) = split(self.io);
        let mut rd = self.rd;
        rd.widen(READ_CHUNK);
        rd.parser.max_message = MAX_FRAME;
        let pong = Arc::new(PongSlot::default());
        // A ping every PING_IDLE at most: a timeout shorter than a few of them would take
        // a scheduling hiccup for a dead peer.
        let silence = (self.heartbeats && !self.dead_peer.is_zero())
            .then(|| self.dead_peer.max(3 * PING_IDLE));
        (
            WsReader {
                io: r,
                st: rd,
                pong: pong.clone(),
                silence,
            },
            WsWriter {
                io: w,
                st: self.wr,
                pong,
                frame: vec![0; MAX_HEADER + WS_MESSAGE],
                ping: self.heartbeats,
            },
        )
    }
}

/// Why [`WsStream::recv_message`] returned no message.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The peer sent a close frame or closed the connection.
    Closed,
    /// The peer broke the framing.
    Frame(FrameError),
    /// The connection failed.
    Io(Error),
}

impl From<FrameError> for RecvError {
    fn from(e: FrameError) -> Self {
        RecvError::Frame(e)
    }
}

impl From<Error> for RecvError {
    fn from(e: Error) -> Self {
        RecvError::Io(e)
    }
}
