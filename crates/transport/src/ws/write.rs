//! The sending direction: the write state (role, masking keys, queued control frames) and
//! [`WsWriter`], whose data path reads from the Unix socket straight into its frame buffer
//! behind a gap for the header and masks in place.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::frame::{
    apply_mask, header_len, put_header, Role, MAX_HEADER, OP_BINARY, OP_PING, OP_PONG,
};
use super::read::PongSlot;
use super::WS_MESSAGE;
use crate::error::{Error, Result};
use crate::protocol::PING_IDLE;

/// Masking keys for a client: fresh random ones, drawn from the kernel in batches (one
/// `getrandom` per 64 frames instead of one per frame).
struct MaskKeys {
    /// On the heap: the writer stays small next to the other transports' in `TunnelWriter`.
    batch: Box<[u8; 256]>,
    next: usize,
}

impl MaskKeys {
    fn new() -> Self {
        MaskKeys {
            batch: Box::new([0; 256]),
            next: 256,
        }
    }

    fn next(&mut self) -> io::Result<[u8; 4]> {
        if self.next == self.batch.len() {
            getrandom::fill(&mut self.batch[..]).map_err(|e| {
                io::Error::other(format!(
                    "the kernel's random number generator failed (WebSocket masking keys): {e}"
                ))
            })?;
            self.next = 0;
        }
        let mut key = [0u8; 4];
        key.copy_from_slice(&self.batch[self.next..self.next + 4]);
        self.next += 4;
        Ok(key)
    }
}

/// The write side's state: the role (masking or not), the keys, and frames queued but not
/// fully written (so that a cancelled handshake send or a pong queued by a receive is never
/// left half-written on the wire).
pub(super) struct WriteState {
    pub(super) role: Role,
    keys: MaskKeys,
    out: Vec<u8>,
    sent: usize,
}

impl WriteState {
    pub(super) fn new(role: Role) -> Self {
        WriteState {
            role,
            keys: MaskKeys::new(),
            out: Vec::new(),
            sent: 0,
        }
    }

    /// A masking key for the next frame, if this end masks.
    fn key(&mut self) -> Result<Option<[u8; 4]>> {
        match self.role {
            Role::Client => Ok(Some(self.keys.next()?)),
            Role::Server => Ok(None),
        }
    }

    /// Appends one final frame with `payload` to the queue.
    pub(super) fn queue(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        let key = self.key()?;
        let h = header_len(payload.len(), key.is_some());
        let start = self.out.len();
        self.out.resize(start + h, 0);
        put_header(&mut self.out[start..], opcode, payload.len(), key);
        self.out.extend_from_slice(payload);
        if let Some(key) = key {
            apply_mask(&mut self.out[start + h..], key);
        }
        Ok(())
    }

    /// Writes the queue out and flushes (nothing at all when it is empty).
    pub(super) async fn drain<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        while self.sent < self.out.len() {
            let n = io
                .write(&self.out[self.sent..])
                .await
                .map_err(Error::lost_or_io)?;
            if n == 0 {
                return Err(Error::lost_or_io(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        io.flush().await.map_err(Error::lost_or_io)
    }
}

/// The sending direction of a WebSocket tunnel connection after the handshake.
pub struct WsWriter<W> {
    pub(crate) io: W,
    pub(super) st: WriteState,
    pub(super) pong: Arc<PongSlot>,
    /// One frame: header gap, then payload.
    pub(super) frame: Vec<u8>,
    /// Protocol version 3: ping when quiet for [`PING_IDLE`], so that the peer can tell a
    /// quiet direction from a hung end.
    pub(super) ping: bool,
}

impl<W> fmt::Debug for WsWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsWriter")
            .field("role", &self.st.role)
            .finish_non_exhaustive()
    }
}

impl<W: AsyncWrite + Unpin> WsWriter<W> {
    /// Frames the `n` payload bytes at `frame[MAX_HEADER..]` as one binary message, masking
    /// them in place, and writes header and payload with one write.
    async fn send_frame(&mut self, n: usize) -> Result<()> {
        self.st.drain(&mut self.io).await?;
        let key = self.st.key()?;
        let h = header_len(n, key.is_some());
        let start = MAX_HEADER - h;
        let frame = &mut self.frame[start..MAX_HEADER + n];
        put_header(&mut frame[..h], OP_BINARY, n, key);
        if let Some(key) = key {
            apply_mask(&mut frame[h..], key);
        }
        self.io.write_all(frame).await.map_err(Error::lost_or_io)?;
        // TLS keeps what the socket did not take in its own buffer until a flush, and
        // QEMU's small return-path messages must not wait there.
        self.io.flush().await.map_err(Error::lost_or_io)
    }

    /// Sends a pong for the latest ping, if one is waiting.
    pub(super) async fn answer_ping(&mut self) -> Result<()> {
        if let Some(ping) = self.pong.take() {
            self.st.queue(OP_PONG, ping.get())?;
        }
        self.st.drain(&mut self.io).await
    }

    /// Sends all of `data`, in messages of at most [`WS_MESSAGE`] bytes.
    pub(crate) async fn write_all(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(WS_MESSAGE) {
            self.frame[MAX_HEADER..MAX_HEADER + chunk.len()].copy_from_slice(chunk);
            self.send_frame(chunk.len()).await?;
        }
        Ok(())
    }

    /// Drops the connection for a reason the peer is told: a close frame with `code` and
    /// `reason` (after whatever frame was half sent), then the write side's shutdown.
    pub(crate) async fn close_with(&mut self, code: u16, reason: &str) -> Result<()> {
        self.st
            .queue(super::frame::OP_CLOSE, &super::close_payload(code, reason))?;
        self.st.drain(&mut self.io).await?;
        self.io.shutdown().await.map_err(Error::lost_or_io)
    }

    /// Sends the end marker, an empty binary message.
    pub(crate) async fn finish(&mut self) -> Result<()> {
        self.answer_ping().await?;
        self.send_frame(0).await
    }

    /// Copies everything from `r` into the stream until `r` ends (the end marker is the
    /// caller's), one read into the frame buffer per message. Pings the reader saw are
    /// answered between messages, also while `r` is quiet.
    pub(crate) async fn pump_from<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        count: &AtomicU64,
    ) -> Result<()> {
        let slot = self.pong.clone();
        let mut ping = std::pin::pin!(slot.notify.notified());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PING_IDLE, PING_IDLE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Whether a frame went out since the last tick: a busy direction needs no ping.
        let mut sent = false;
        loop {
            tokio::select! {
                biased;
                () = &mut ping => {
                    ping.set(slot.notify.notified());
                    self.answer_ping().await?;
                    sent = true;
                }
                _ = tick.tick(), if self.ping => {
                    if !std::mem::take(&mut sent) {
                        self.st.queue(OP_PING, &[])?;
                        self.st.drain(&mut self.io).await?;
                    }
                }
                n = r.read(&mut self.frame[MAX_HEADER..]) => {
                    let n = n.map_err(Error::lost_or_io)?;
                    if n == 0 {
                        return Ok(());
                    }
                    self.send_frame(n).await?;
                    sent = true;
                    count.fetch_add(n as u64, Relaxed);
                }
            }
        }
    }
}
