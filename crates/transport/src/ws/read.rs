//! The receiving direction: the read state (parser and buffer, which survive the split) and
//! [`WsReader`], whose data path unmasks payloads where they were read and writes them out
//! with one vectored write.

use std::fmt;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use super::frame::{FrameError, Item, Parser, Role, MAX_CONTROL, MAX_HEADER};
use crate::error::{Error, Result};

/// The reader's buffer during the handshake, where messages are a few hundred bytes: what an
/// unauthenticated peer costs.
const HANDSHAKE_BUFFER: usize = 16 * 1024;

/// Most payload pieces handed to one vectored write (the kernel takes up to 1024).
const MAX_IOV: usize = 64;

/// Room below which the data path's reader stops reading on without waiting: a TLS record.
const MIN_ROOM: usize = 16 * 1024 + 256;

/// Why a peer's close frame ended the stream, in its own words when it gave some.
fn close_reason(payload: &[u8]) -> Option<String> {
    let reason = String::from_utf8_lossy(payload.get(2..)?);
    (!reason.is_empty()).then(|| reason.into_owned())
}

/// The read side's state, owned by [`WsStream`] during the handshake and by [`WsReader`]
/// after the split: the parser and its buffer, whose unparsed bytes survive the split.
pub(super) struct ReadState {
    pub(super) parser: Parser,
    pub(super) buf: Vec<u8>,
    /// Unparsed bytes: `buf[pos..end]`.
    pub(super) pos: usize,
    pub(super) end: usize,
    /// Unmasked payload not handed out yet (the byte-at-a-time [`WsReader::read`]).
    pending: Range<usize>,
    /// The handshake message being collected, and whether it is complete (kept here so
    /// that a cancelled receive loses nothing).
    pub(super) message: Vec<u8>,
    pub(super) complete: bool,
    eos: bool,
}

/// What one pass of the parser over the buffered bytes produced for the data path.
enum Parsed {
    /// Some data, or nothing; the buffer has no complete item left.
    NeedMore,
    /// The batch of payload pieces is full; more items may be buffered.
    Full,
    /// The end of the stream.
    Eos,
}

impl ReadState {
    pub(super) fn new(role: Role, max_message: usize, buffered: Vec<u8>) -> Self {
        let mut buf = vec![0; HANDSHAKE_BUFFER.max(buffered.len())];
        buf[..buffered.len()].copy_from_slice(&buffered);
        ReadState {
            parser: Parser::new(role, max_message),
            buf,
            pos: 0,
            end: buffered.len(),
            pending: 0..0,
            message: Vec::new(),
            complete: false,
            eos: false,
        }
    }

    /// Moves the unparsed bytes to the front and reads more after them. Only ever moves a
    /// partial header or a partial control frame: data payloads are consumed as they arrive.
    pub(super) async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> io::Result<usize> {
        // So there is always room to read into (the smallest buffer is 16 KiB).
        debug_assert!(self.end - self.pos <= MAX_HEADER + MAX_CONTROL);
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let n = io.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads on without waiting while the stream has bytes at once and the buffer has room,
    /// so that one vectored write to the Unix socket carries all of them. Over TLS each read
    /// returns one record (at most 16 KiB): without this, every record would cost a write.
    /// Over TCP it costs nothing extra: tokio remembers that a short read emptied the socket.
    /// The end of the stream is left for the next [`fill`](Self::fill) to see.
    async fn fill_more<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> io::Result<()> {
        std::future::poll_fn(|cx| {
            while self.buf.len() - self.end >= MIN_ROOM {
                let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
                match Pin::new(&mut *io).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                    Poll::Ready(Ok(())) => self.end += rb.filled().len(),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Grows the buffer to the data path's read size, keeping the unparsed bytes. A fresh
    /// zeroed allocation rather than a resize: the kernel's zero pages are only touched as
    /// the reads reach them.
    pub(super) fn widen(&mut self, size: usize) {
        if self.buf.len() < size {
            let mut buf = vec![0; size];
            let n = self.end - self.pos;
            buf[..n].copy_from_slice(&self.buf[self.pos..self.end]);
            (self.buf, self.pos, self.end) = (buf, 0, n);
        }
    }

    /// Parses the next item of the buffered bytes: its range made absolute.
    pub(super) fn next_item(&mut self) -> Result<Option<Item>, FrameError> {
        let base = self.pos;
        let (used, item) = self.parser.parse(&mut self.buf[base..self.end])?;
        self.pos += used;
        let shift = |r: Range<usize>| base + r.start..base + r.end;
        Ok(item.map(|item| match item {
            Item::Data(r) => Item::Data(shift(r)),
            Item::Ping(r) => Item::Ping(shift(r)),
            Item::Close(r) => Item::Close(shift(r)),
            other => other,
        }))
    }

    /// The error for a close frame that came before the end of the stream.
    fn closed_early(&self, payload: Range<usize>) -> Error {
        Error::ConnectionLost(match close_reason(&self.buf[payload]) {
            Some(reason) => format!("the peer closed the WebSocket early: {reason}"),
            None => "the peer closed the WebSocket before ending the stream".into(),
        })
    }

    /// Parses what is buffered into payload pieces (at most [`MAX_IOV`]), handing pings'
    /// payloads to `pong`.
    fn parse_batch(&mut self, pieces: &mut Vec<Range<usize>>, pong: &PongSlot) -> Result<Parsed> {
        while pieces.len() < MAX_IOV {
            match self.next_item().map_err(data_error)? {
                None => return Ok(Parsed::NeedMore),
                Some(Item::Data(r)) => pieces.push(r),
                Some(Item::End { len: 0 }) => return Ok(Parsed::Eos),
                Some(Item::End { .. } | Item::Pong) => {}
                Some(Item::Ping(r)) => pong.offer(&self.buf[r]),
                Some(Item::Close(r)) => return Err(self.closed_early(r)),
            }
        }
        Ok(Parsed::Full)
    }
}

/// A frame error met in the data stream, typed, so that the relay can tell the peer why in
/// its close frame.
fn data_error(e: FrameError) -> Error {
    Error::WebSocket(e)
}

/// A read error, or the end of the connection without a close.
fn read_result(n: io::Result<usize>) -> Result<()> {
    match n {
        Ok(0) => Err(Error::ConnectionLost(
            "the connection closed without a WebSocket close".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(Error::lost_or_io(e)),
    }
}

/// Where the reader leaves the latest ping's payload for the writer to answer: the reader
/// never waits for the writer (which may be in the middle of a large frame), and only the
/// latest ping needs its pong (RFC 6455, 5.5.3).
#[derive(Debug, Default)]
pub(super) struct PongSlot {
    latest: Mutex<Option<ControlPayload>>,
    pub(super) notify: Notify,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ControlPayload {
    bytes: [u8; MAX_CONTROL],
    len: usize,
}

impl ControlPayload {
    pub(super) fn new(payload: &[u8]) -> Self {
        let len = payload.len().min(MAX_CONTROL);
        let mut bytes = [0u8; MAX_CONTROL];
        bytes[..len].copy_from_slice(&payload[..len]);
        ControlPayload { bytes, len }
    }

    pub(super) fn get(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl PongSlot {
    fn offer(&self, payload: &[u8]) {
        let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        *latest = Some(ControlPayload::new(payload));
        drop(latest);
        self.notify.notify_one();
    }

    pub(super) fn take(&self) -> Option<ControlPayload> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The receiving direction of a WebSocket tunnel connection after the handshake.
pub struct WsReader<R> {
    pub(super) io: R,
    pub(super) st: ReadState,
    pub(super) pong: Arc<PongSlot>,
    /// From protocol version 3 the peer pings while its stream is open: a wait for bytes
    /// that lasts this long means it hung or the network between is gone.
    pub(super) silence: Option<Duration>,
}

impl<R> fmt::Debug for WsReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsReader")
            .field("role", &self.st.parser.role)
            .field("buffered", &(self.st.end - self.st.pos))
            .field("eos", &self.st.eos)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> WsReader<R> {
    /// Reads the next bytes of the stream into `out`; `Ok(0)` at the end marker.
    pub(crate) async fn read(&mut self, out: &mut [u8]) -> Result<usize> {
        loop {
            if !self.st.pending.is_empty() {
                let n = self.st.pending.len().min(out.len());
                let from = self.st.pending.start;
                out[..n].copy_from_slice(&self.st.buf[from..from + n]);
                self.st.pending.start += n;
                return Ok(n);
            }
            if self.st.eos {
                return Ok(0);
            }
            match self.st.next_item().map_err(data_error)? {
                Some(Item::Data(r)) => self.st.pending = r,
                Some(Item::End { len: 0 }) => self.st.eos = true,
                Some(Item::End { .. } | Item::Pong) => {}
                Some(Item::Ping(r)) => self.pong.offer(&self.st.buf[r]),
                Some(Item::Close(r)) => return Err(self.st.closed_early(r)),
                None => self.fill_watched().await?,
            }
        }
    }

    /// Reads more bytes of the stream, as [`ReadState::fill`], failing when the peer was to
    /// ping and has sent nothing for [`WsReader::silence`].
    async fn fill_watched(&mut self) -> Result<()> {
        let Some(limit) = self.silence else {
            return read_result(self.st.fill(&mut self.io).await);
        };
        match tokio::time::timeout(limit, self.st.fill(&mut self.io)).await {
            Ok(n) => read_result(n),
            Err(_) => Err(Error::ConnectionLost(format!(
                "the peer did not answer WebSocket pings for {}: it hangs, or the network \
                 between the hosts is down",
                crate::keepalive::show(limit)
            ))),
        }
    }

    /// Copies the stream into `w` until its end marker: each batch of complete and partial
    /// payloads in the buffer goes out with one vectored write, straight from where it was
    /// read and unmasked.
    pub(crate) async fn pump_to<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        count: &AtomicU64,
    ) -> Result<()> {
        if !self.st.pending.is_empty() {
            let r = std::mem::replace(&mut self.st.pending, 0..0);
            w.write_all(&self.st.buf[r.clone()])
                .await
                .map_err(Error::lost_or_io)?;
            count.fetch_add(r.len() as u64, Relaxed);
        }
        let mut pieces = Vec::with_capacity(MAX_IOV);
        while !self.st.eos {
            pieces.clear();
            let parsed = self.st.parse_batch(&mut pieces, &self.pong)?;
            let n = write_pieces(w, &self.st.buf, &pieces).await?;
            count.fetch_add(n as u64, Relaxed);
            match parsed {
                Parsed::Eos => self.st.eos = true,
                Parsed::Full => {}
                Parsed::NeedMore => {
                    self.fill_watched().await?;
                    self.st
                        .fill_more(&mut self.io)
                        .await
                        .map_err(Error::lost_or_io)?;
                }
            }
        }
        Ok(())
    }

    /// Reads until the peer's close frame, dropping whatever comes before it: the second half
    /// of the close handshake. `Ok` for a normal close (status 1000, or no status); the end of
    /// the connection, an error or another status is an error.
    pub(super) async fn until_close(&mut self) -> Result<()> {
        loop {
            match self.st.next_item().map_err(data_error)? {
                Some(Item::Close(r)) => return close_status(&self.st.buf[r]),
                Some(_) => {}
                None => read_result(self.st.fill(&mut self.io).await).map_err(|_| {
                    Error::ConnectionLost(
                        "the peer closed without a WebSocket close after the end of the stream"
                            .into(),
                    )
                })?,
            }
        }
    }
}

/// A close frame's payload after the end of the stream: a normal close, or the peer's reason
/// for another.
fn close_status(payload: &[u8]) -> Result<()> {
    let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    match code {
        None | Some(super::CLOSE_NORMAL) => Ok(()),
        Some(code) => Err(Error::ConnectionLost(match close_reason(payload) {
            Some(reason) => format!("the peer closed the WebSocket with status {code}: {reason}"),
            None => format!("the peer closed the WebSocket with status {code}"),
        })),
    }
}

/// Writes the payload pieces `buf[r]` for each `r` in `pieces` with as few vectored writes as
/// `w` takes. Returns the bytes written.
async fn write_pieces<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    pieces: &[Range<usize>],
) -> Result<usize> {
    match pieces {
        [] => return Ok(0),
        [one] => {
            w.write_all(&buf[one.clone()])
                .await
                .map_err(Error::lost_or_io)?;
            return Ok(one.len());
        }
        _ => {}
    }
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let mut total = 0;
    for (slice, r) in slices.iter_mut().zip(pieces) {
        *slice = IoSlice::new(&buf[r.clone()]);
        total += r.len();
    }
    let mut rest = &mut slices[..pieces.len().min(MAX_IOV)];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await.map_err(Error::lost_or_io)?;
        if n == 0 {
            return Err(Error::lost_or_io(io::ErrorKind::WriteZero.into()));
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(total)
}
