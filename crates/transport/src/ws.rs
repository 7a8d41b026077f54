//! RFC 6455 framing on a byte stream: what a `ws://` or `wss://` tunnel connection carries
//! after the HTTP upgrade (which tungstenite still does, see `upgrade.rs`).
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

use std::fmt;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::protocol::MAX_FRAME;

/// Largest WebSocket data message qmigrate sends: what one read from the Unix socket may
/// return, up to the limit every peer accepts. With tungstenite, which copied each payload
/// into its write buffer, 64 KiB had measured fastest; without that copy, `qmigrate-bench
/// relay` measured 64 KiB, 256 KiB and 1 MiB close together and 1 MiB a little leaner
/// (fewer headers, reads and wake-ups per GB).
pub const WS_MESSAGE: usize = MAX_FRAME;

/// How much the data path's reader asks the socket for at once: whole frames of the largest
/// size and several smaller ones per read, all written out with one vectored write.
const READ_CHUNK: usize = 1024 * 1024;

/// The reader's buffer during the handshake, where messages are a few hundred bytes: what an
/// unauthenticated peer costs.
const HANDSHAKE_BUFFER: usize = 16 * 1024;

/// Longest frame header: 2 bytes, a 64-bit length, a masking key.
pub(crate) const MAX_HEADER: usize = 14;

/// Largest control frame payload (RFC 6455, 5.5).
const MAX_CONTROL: usize = 125;

/// Most payload pieces handed to one vectored write (the kernel takes up to 1024).
const MAX_IOV: usize = 64;

/// Room below which the data path's reader stops reading on without waiting: a TLS record.
const MIN_ROOM: usize = 16 * 1024 + 256;

/// The status code of a normal close.
const CLOSE_NORMAL: u16 = 1000;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// Which end of the WebSocket connection this is: a client masks what it sends and requires
/// unmasked frames, a server the other way round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
}

/// A peer broke the WebSocket framing. Every case ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RSV1-3 set: meaningful only with an extension, and none is negotiated.
    #[error("a frame with reserved bits set ({0:#04x}), but no extension was negotiated")]
    ReservedBits(u8),
    /// An opcode RFC 6455 leaves undefined.
    #[error("a frame with the reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A text frame: the tunnel carries bytes, in binary messages only.
    #[error("a text message")]
    Text,
    /// A client's frame without a mask (RFC 6455, 5.1).
    #[error("an unmasked frame (a client must mask every frame)")]
    Unmasked,
    /// A server's frame with a mask (RFC 6455, 5.1).
    #[error("a masked frame (a server must not mask)")]
    Masked,
    /// A frame above the limit, refused from its header.
    #[error("a frame of {0} bytes, above the {MAX_FRAME}-byte limit")]
    FrameTooLarge(u64),
    /// A message whose frames add up to more than the limit.
    #[error("a message of more than {limit} bytes")]
    MessageTooLarge {
        /// The limit in force (smaller during the handshake).
        limit: usize,
    },
    /// A ping, pong or close above 125 bytes.
    #[error("a control frame of {0} bytes (at most 125 are allowed)")]
    ControlTooLong(u64),
    /// A ping, pong or close without FIN.
    #[error("a fragmented control frame")]
    FragmentedControl,
    /// A continuation frame with no message to continue.
    #[error("a continuation frame outside a message")]
    StrayContinuation,
    /// A new data message before the previous one's last frame.
    #[error("a new message before the end of the previous one")]
    UnfinishedMessage,
}

// ---------------------------------------------------------------------------------------
// Masking and headers.

/// XORs `buf` with the masking key, byte `i` with `key[i % 4]`.
///
/// 32 bytes at a time against the key repeated eight times: the fixed-size inner loop
/// compiles to vector XORs, and the pass over each payload is most of what masking costs.
pub(crate) fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    const LANES: usize = 32;
    let mut wide = [0u8; LANES];
    for (i, b) in wide.iter_mut().enumerate() {
        *b = key[i % 4];
    }
    let mut chunks = buf.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (b, k) in chunk.iter_mut().zip(wide) {
            *b ^= k;
        }
    }
    // LANES is a multiple of 4: the remainder starts at key[0].
    for (b, k) in chunks.into_remainder().iter_mut().zip(wide) {
        *b ^= k;
    }
}

/// The key for the rest of a payload of which `done` bytes were unmasked.
fn advance_key(mut key: [u8; 4], done: usize) -> [u8; 4] {
    key.rotate_left(done % 4);
    key
}

/// Length of the header of a frame of `len` payload bytes.
pub(crate) fn header_len(len: usize, masked: bool) -> usize {
    let base = match len {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    };
    base + if masked { 4 } else { 0 }
}

/// Writes a final frame's header (FIN set) into `dst`, which is exactly
/// [`header_len`]`(len, key.is_some())` long.
pub(crate) fn put_header(dst: &mut [u8], opcode: u8, len: usize, key: Option<[u8; 4]>) {
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    dst[0] = 0x80 | opcode;
    let at = match len {
        0..=125 => {
            dst[1] = mask_bit | len as u8;
            2
        }
        126..=0xffff => {
            dst[1] = mask_bit | 126;
            dst[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            dst[1] = mask_bit | 127;
            dst[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    };
    if let Some(key) = key {
        dst[at..at + 4].copy_from_slice(&key);
    }
}

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

// ---------------------------------------------------------------------------------------
// Parsing.

/// One thing the parser found. Ranges are into the slice given to [`Parser::parse`], and the
/// payloads there are already unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    /// Payload bytes of the current binary message (a frame's payload may come in pieces).
    Data(Range<usize>),
    /// The current binary message ended; it had `len` bytes (0: the end of the stream).
    End {
        /// The message's length.
        len: usize,
    },
    /// A ping, with its payload.
    Ping(Range<usize>),
    /// A pong.
    Pong,
    /// A close frame, with its payload (status code and reason, or nothing).
    Close(Range<usize>),
}

/// Where the parser is in the byte stream.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Before a frame header.
    Header,
    /// Inside a data frame's payload: bytes still to come, the masking key for the next one,
    /// and whether the frame ends its message.
    Payload {
        left: usize,
        key: Option<[u8; 4]>,
        fin: bool,
    },
    /// A message's last frame is done; [`Item::End`] is next.
    End,
}

/// A frame header, checked.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    len: usize,
    key: Option<[u8; 4]>,
    size: usize,
}

/// The incremental frame parser: bytes in (any split), [`Item`]s out. Data payloads are handed
/// out as soon as they arrive, so a frame is never buffered whole; control frames (at most
/// 125 bytes) are handed out complete.
#[derive(Debug)]
pub(crate) struct Parser {
    role: Role,
    state: State,
    /// Bytes of the data message in progress, if one is.
    message: Option<usize>,
    /// Largest message accepted.
    max_message: usize,
}

impl Parser {
    /// A parser for `role`'s end (a server expects masked frames).
    pub(crate) fn new(role: Role, max_message: usize) -> Self {
        Parser {
            role,
            state: State::Header,
            message: None,
            max_message: max_message.min(MAX_FRAME),
        }
    }

    /// Parses the next item from `buf` (the bytes not consumed yet), unmasking its payload in
    /// place. Returns how many bytes of `buf` it consumed and the item, or `None` when it
    /// needs more bytes (having consumed what it could: headers of empty frames).
    pub(crate) fn parse(&mut self, buf: &mut [u8]) -> Result<(usize, Option<Item>), FrameError> {
        let mut at = 0;
        loop {
            match self.state {
                State::End => {
                    self.state = State::Header;
                    let len = self.message.take().unwrap_or(0);
                    return Ok((at, Some(Item::End { len })));
                }
                State::Payload { left, key, fin } => {
                    let n = left.min(buf.len() - at);
                    if n == 0 {
                        return Ok((at, None));
                    }
                    if let Some(key) = key {
                        apply_mask(&mut buf[at..at + n], key);
                    }
                    self.state = match left - n {
                        0 if fin => State::End,
                        0 => State::Header,
                        left => State::Payload {
                            left,
                            key: key.map(|k| advance_key(k, n)),
                            fin,
                        },
                    };
                    return Ok((at + n, Some(Item::Data(at..at + n))));
                }
                State::Header => {
                    let Some(h) = parse_header(&buf[at..], self.role)? else {
                        return Ok((at, None));
                    };
                    if h.opcode & 0x8 != 0 {
                        let end = at + h.size + h.len;
                        if buf.len() < end {
                            return Ok((at, None));
                        }
                        let payload = at + h.size..end;
                        if let Some(key) = h.key {
                            apply_mask(&mut buf[payload.clone()], key);
                        }
                        let item = match h.opcode {
                            OP_PING => Item::Ping(payload),
                            OP_PONG => Item::Pong,
                            _ => Item::Close(payload),
                        };
                        return Ok((end, Some(item)));
                    }
                    let so_far = match (h.opcode, self.message) {
                        (OP_BINARY, None) => 0,
                        (OP_BINARY, Some(_)) => return Err(FrameError::UnfinishedMessage),
                        (_, Some(so_far)) => so_far, // continuation
                        (_, None) => return Err(FrameError::StrayContinuation),
                    };
                    let total = so_far + h.len;
                    if total > self.max_message {
                        return Err(FrameError::MessageTooLarge {
                            limit: self.max_message,
                        });
                    }
                    self.message = Some(total);
                    at += h.size;
                    self.state = match h.len {
                        0 if h.fin => State::End,
                        0 => State::Header,
                        len => State::Payload {
                            left: len,
                            key: h.key,
                            fin: h.fin,
                        },
                    };
                }
            }
        }
    }
}

/// Checks and parses the frame header at the start of `buf`; `None` if it is incomplete.
/// Everything that can be judged from the bytes present is judged at once, so a bad frame is
/// refused before the rest of it arrives.
fn parse_header(buf: &[u8], role: Role) -> Result<Option<Header>, FrameError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits(b0 & 0x70));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    match opcode {
        OP_CONTINUATION | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        OP_TEXT => return Err(FrameError::Text),
        other => return Err(FrameError::ReservedOpcode(other)),
    }
    let masked = b1 & 0x80 != 0;
    match (role, masked) {
        (Role::Server, false) => return Err(FrameError::Unmasked),
        (Role::Client, true) => return Err(FrameError::Masked),
        _ => {}
    }
    let len7 = b1 & 0x7f;
    if opcode & 0x8 != 0 {
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
        if usize::from(len7) > MAX_CONTROL {
            // 126 or 127: a length of at least 126 follows.
            return Err(FrameError::ControlTooLong(u64::from(len7)));
        }
    }
    let (len, at) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                (u64::from_be_bytes(be), 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME as u64 {
        return Err(FrameError::FrameTooLarge(len));
    }
    let size = at + if masked { 4 } else { 0 };
    let Some(header) = buf.get(..size) else {
        return Ok(None);
    };
    let key = masked.then(|| {
        let mut key = [0u8; 4];
        key.copy_from_slice(&header[at..]);
        key
    });
    Ok(Some(Header {
        fin,
        opcode,
        len: len as usize,
        key,
        size,
    }))
}

/// What a parser made of a byte stream: each message whole, control frames, or the error
/// that stopped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    Message(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Vec<u8>),
    Error(FrameError),
}

/// Feeds `chunks` to a fresh parser as a reader would (unconsumed bytes carried over to the
/// next chunk) and collects what it found, checking the parser's promises on the way: a
/// message's end gives its length right, and only a partial header or control frame is ever
/// left unconsumed. For the tests and the `ws_frames` fuzz target.
pub(crate) fn events(role: Role, chunks: &[&[u8]]) -> Vec<Event> {
    let mut parser = Parser::new(role, MAX_FRAME);
    let mut got = Vec::new();
    let mut message = Vec::new();
    let mut buf = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            match parser.parse(&mut buf[pos..]) {
                Err(e) => {
                    got.push(Event::Error(e));
                    return got;
                }
                Ok((used, item)) => {
                    let at = pos;
                    pos += used;
                    let Some(item) = item else { break };
                    let slice = |r: Range<usize>| buf[at + r.start..at + r.end].to_vec();
                    match item {
                        Item::Data(r) => message.extend_from_slice(&slice(r)),
                        Item::End { len } => {
                            assert_eq!(len, message.len(), "the message's length");
                            got.push(Event::Message(std::mem::take(&mut message)));
                        }
                        Item::Ping(r) => got.push(Event::Ping(slice(r))),
                        Item::Pong => got.push(Event::Pong),
                        Item::Close(r) => got.push(Event::Close(slice(r))),
                    }
                }
            }
        }
        buf.drain(..pos);
        assert!(
            buf.len() <= MAX_HEADER + MAX_CONTROL,
            "a payload was held back"
        );
    }
    got
}

// ---------------------------------------------------------------------------------------
// Reading.

/// Why a peer's close frame ended the stream, in its own words when it gave some.
fn close_reason(payload: &[u8]) -> Option<String> {
    let reason = String::from_utf8_lossy(payload.get(2..)?);
    (!reason.is_empty()).then(|| reason.into_owned())
}

/// The read side's state, owned by [`WsStream`] during the handshake and by [`WsReader`]
/// after the split: the parser and its buffer, whose unparsed bytes survive the split.
struct ReadState {
    parser: Parser,
    buf: Vec<u8>,
    /// Unparsed bytes: `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// Unmasked payload not handed out yet (the byte-at-a-time [`WsReader::read`]).
    pending: Range<usize>,
    /// The handshake message being collected, and whether it is complete (kept here so
    /// that a cancelled receive loses nothing).
    message: Vec<u8>,
    complete: bool,
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
    fn new(role: Role, max_message: usize, buffered: Vec<u8>) -> Self {
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
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> io::Result<usize> {
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
    fn widen(&mut self, size: usize) {
        if self.buf.len() < size {
            let mut buf = vec![0; size];
            let n = self.end - self.pos;
            buf[..n].copy_from_slice(&self.buf[self.pos..self.end]);
            (self.buf, self.pos, self.end) = (buf, 0, n);
        }
    }

    /// Parses the next item of the buffered bytes: its range made absolute.
    fn next_item(&mut self) -> Result<Option<Item>, FrameError> {
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

/// A frame error met in the data stream. A text message keeps the words it had with
/// tungstenite.
fn data_error(e: FrameError) -> Error {
    match e {
        FrameError::Text => {
            Error::Protocol("the peer sent a text message inside the data stream".into())
        }
        other => Error::WebSocket(other),
    }
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
struct PongSlot {
    latest: Mutex<Option<ControlPayload>>,
    notify: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ControlPayload {
    bytes: [u8; MAX_CONTROL],
    len: usize,
}

impl ControlPayload {
    fn new(payload: &[u8]) -> Self {
        let len = payload.len().min(MAX_CONTROL);
        let mut bytes = [0u8; MAX_CONTROL];
        bytes[..len].copy_from_slice(&payload[..len]);
        ControlPayload { bytes, len }
    }

    fn get(&self) -> &[u8] {
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

    fn take(&self) -> Option<ControlPayload> {
        self.latest.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The receiving direction of a WebSocket tunnel connection after the handshake.
pub struct WsReader<R> {
    io: R,
    st: ReadState,
    pong: Arc<PongSlot>,
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
                None => read_result(self.st.fill(&mut self.io).await)?,
            }
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
                    read_result(self.st.fill(&mut self.io).await)?;
                    self.st
                        .fill_more(&mut self.io)
                        .await
                        .map_err(Error::lost_or_io)?;
                }
            }
        }
        Ok(())
    }

    /// Reads until the peer's close frame (or the end of the connection, or an error),
    /// dropping whatever comes before it: the second half of the close handshake.
    async fn until_close(&mut self) {
        loop {
            match self.st.next_item() {
                Ok(Some(Item::Close(_))) | Err(_) => return,
                Ok(Some(_)) => {}
                Ok(None) => {
                    if !matches!(self.st.fill(&mut self.io).await, Ok(n) if n > 0) {
                        return;
                    }
                }
            }
        }
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

// ---------------------------------------------------------------------------------------
// Writing.

/// The write side's state: the role (masking or not), the keys, and frames queued but not
/// fully written (so that a cancelled handshake send or a pong queued by a receive is never
/// left half-written on the wire).
struct WriteState {
    role: Role,
    keys: MaskKeys,
    out: Vec<u8>,
    sent: usize,
}

impl WriteState {
    fn new(role: Role) -> Self {
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
    fn queue(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
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
    async fn drain<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<()> {
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
    io: W,
    st: WriteState,
    pong: Arc<PongSlot>,
    /// One frame: header gap, then payload.
    frame: Vec<u8>,
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
    async fn answer_ping(&mut self) -> Result<()> {
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
        loop {
            tokio::select! {
                biased;
                () = &mut ping => {
                    ping.set(slot.notify.notified());
                    self.answer_ping().await?;
                }
                n = r.read(&mut self.frame[MAX_HEADER..]) => {
                    let n = n.map_err(Error::lost_or_io)?;
                    if n == 0 {
                        return Ok(());
                    }
                    self.send_frame(n).await?;
                    count.fetch_add(n as u64, Relaxed);
                }
            }
        }
    }
}

/// Ends a connection whose both directions finished: our close frame, the peer's (bounded
/// by `wait`), then the write side's shutdown (TLS: close_notify). A peer that never answers
/// is left after `wait`.
pub(crate) async fn close<R, W>(mut rd: WsReader<R>, mut wr: WsWriter<W>, wait: std::time::Duration)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(wait, async {
        let _ = wr.answer_ping().await;
        if wr.st.queue(OP_CLOSE, &CLOSE_NORMAL.to_be_bytes()).is_ok()
            && wr.st.drain(&mut wr.io).await.is_ok()
        {
            rd.until_close().await;
        }
        let _ = wr.io.shutdown().await;
    })
    .await;
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
        }
    }

    /// Sends `payload` as one binary message (one frame).
    pub(crate) async fn send_message(&mut self, payload: &[u8]) -> Result<()> {
        self.wr.queue(OP_BINARY, payload)?;
        self.wr.drain(&mut self.io).await
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
        (
            WsReader {
                io: r,
                st: rd,
                pong: pong.clone(),
            },
            WsWriter {
                io: w,
                st: self.wr,
                pong,
                frame: vec![0; MAX_HEADER + WS_MESSAGE],
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A frame as a peer would send it, any header form: `len_form` 7, 16 or 64 picks the
    /// length field (a longer one than needed is legal, if wasteful).
    fn frame(first: u8, payload: &[u8], key: Option<[u8; 4]>, len_form: u8) -> Vec<u8> {
        let mask_bit = if key.is_some() { 0x80 } else { 0 };
        let mut f = vec![first];
        match len_form {
            7 => f.push(mask_bit | payload.len() as u8),
            16 => {
                f.push(mask_bit | 126);
                f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                f.push(mask_bit | 127);
                f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        let mut body = payload.to_vec();
        if let Some(key) = key {
            f.extend_from_slice(&key);
            for (i, b) in body.iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        f.extend_from_slice(&body);
        f
    }

    fn seq(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A stream with every header length form, fragmentation, control frames between
    /// fragments, an empty message and a close; masked when `masked`.
    fn sample_stream(masked: bool) -> (Vec<u8>, Vec<Event>) {
        let mut keys = (1u8..).map(|i| [i, i.wrapping_mul(3), 0xa5, i ^ 0x5a]);
        let mut key = || masked.then(|| keys.next().unwrap_or([1, 2, 3, 4]));
        let (a, b, c, d) = (seq(100, 1), seq(300, 2), seq(7, 3), seq(5, 4));
        let mut stream = Vec::new();
        stream.extend(frame(0x82, &a, key(), 7));
        stream.extend(frame(0x82, &b, key(), 16));
        stream.extend(frame(0x02, &c[..3], key(), 64));
        stream.extend(frame(0x89, b"ping!", key(), 7));
        stream.extend(frame(0x00, &[], key(), 7));
        stream.extend(frame(0x8a, b"", key(), 7));
        stream.extend(frame(0x80, &c[3..], key(), 16));
        stream.extend(frame(0x82, &d, key(), 64));
        stream.extend(frame(0x82, &[], key(), 7));
        stream.extend(frame(0x88, b"\x03\xe8bye", key(), 7));
        let expect = vec![
            Event::Message(a),
            Event::Message(b),
            Event::Ping(b"ping!".to_vec()),
            Event::Pong,
            Event::Message(c),
            Event::Message(d),
            Event::Message(Vec::new()),
            Event::Close(b"\x03\xe8bye".to_vec()),
        ];
        (stream, expect)
    }

    #[test]
    fn masking_matches_the_definition_at_every_length_and_offset() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in 0..80 {
            let data = seq(len, 9);
            let mut fast = data.clone();
            apply_mask(&mut fast, key);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(fast, slow, "length {len}");
            for split in 0..=len {
                let mut parts = data.clone();
                let (x, y) = parts.split_at_mut(split);
                apply_mask(x, key);
                apply_mask(y, advance_key(key, split));
                assert_eq!(parts, slow, "length {len} in two pieces at {split}");
            }
        }
    }

    #[test]
    fn headers_round_trip_in_every_length_form() {
        for len in [0, 1, 125, 126, 127, 0xffff, 0x10000, MAX_FRAME] {
            for (role, key) in [(Role::Server, Some([9, 8, 7, 6])), (Role::Client, None)] {
                let h = header_len(len, key.is_some());
                let mut buf = vec![0u8; h];
                put_header(&mut buf, OP_BINARY, len, key);
                let parsed = parse_header(&buf, role).expect("valid").expect("complete");
                assert_eq!((parsed.len, parsed.key, parsed.size), (len, key, h));
                assert!(parsed.fin);
                for cut in 0..h {
                    assert!(
                        parse_header(&buf[..cut], role)
                            .expect("valid so far")
                            .is_none(),
                        "a header of {len} cut at {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_stream_parses_the_same_split_at_every_byte() {
        for (role, masked) in [(Role::Server, true), (Role::Client, false)] {
            let (stream, expect) = sample_stream(masked);
            assert_eq!(events(role, &[&stream]), expect);
            for cut in 0..=stream.len() {
                let (x, y) = stream.split_at(cut);
                assert_eq!(events(role, &[x, y]), expect, "split at {cut}");
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(events(role, &bytes), expect, "a byte at a time");
        }
    }

    #[test]
    fn large_frames_come_out_in_pieces_without_being_held() {
        let big = seq(MAX_FRAME, 5);
        let stream = frame(0x82, &big, Some([1, 2, 3, 4]), 64);
        for step in [1000, 4096, 65536, 333_333] {
            let chunks: Vec<&[u8]> = stream.chunks(step).collect();
            assert_eq!(
                events(Role::Server, &chunks),
                [Event::Message(big.clone())],
                "{step} at a time"
            );
        }
    }

    #[test]
    fn masking_must_follow_the_role() {
        let masked = frame(0x82, b"x", Some([1, 2, 3, 4]), 7);
        let plain = frame(0x82, b"x", None, 7);
        assert_eq!(
            events(Role::Server, &[&plain]),
            [Event::Error(FrameError::Unmasked)]
        );
        assert_eq!(
            events(Role::Client, &[&masked]),
            [Event::Error(FrameError::Masked)]
        );
    }

    #[test]
    fn limits_are_checked_from_the_header() {
        // Only the header: the error comes before any payload.
        let mut over = vec![0x82, 0xff];
        over.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        over.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            events(Role::Server, &[&over[..10]]),
            [Event::Error(FrameError::FrameTooLarge(
                MAX_FRAME as u64 + 1
            ))]
        );
        let mut huge = vec![0x82, 0x7f];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            events(Role::Client, &[&huge]),
            [Event::Error(FrameError::FrameTooLarge(u64::MAX))]
        );
        // Exactly the limit is fine, one more byte over two frames is not.
        let half = seq(MAX_FRAME / 2, 1);
        let mut stream = frame(0x02, &half, None, 64);
        stream.extend(frame(0x80, &half, None, 64));
        assert_eq!(
            events(Role::Client, &[&stream]),
            [Event::Message([&half[..], &half[..]].concat())]
        );
        let mut stream = frame(0x02, &half, None, 64);
        stream.extend(frame(0x00, &half, None, 64));
        let header_only = frame(0x80, &[], None, 7);
        stream.extend_from_slice(&[header_only[0], 1]);
        assert_eq!(
            events(Role::Client, &[&stream]),
            [Event::Error(FrameError::MessageTooLarge {
                limit: MAX_FRAME
            })]
        );
        // A smaller limit (the handshake's).
        let mut p = Parser::new(Role::Client, 10);
        let mut f = frame(0x82, &seq(11, 0), None, 7);
        assert_eq!(
            p.parse(&mut f[..2]),
            Err(FrameError::MessageTooLarge { limit: 10 })
        );
    }

    #[test]
    fn control_frames_are_short_and_whole() {
        let ping = |first: u8, len: usize| frame(first, &seq(len, 0), None, 7);
        assert_eq!(
            events(Role::Client, &[&ping(0x89, 125)]),
            [Event::Ping(seq(125, 0))]
        );
        assert_eq!(
            events(Role::Client, &[&ping(0x89, 126)[..2]]),
            [Event::Error(FrameError::ControlTooLong(126))]
        );
        assert_eq!(
            events(Role::Client, &[&ping(0x09, 3)[..2]]),
            [Event::Error(FrameError::FragmentedControl)]
        );
        assert_eq!(
            events(Role::Client, &[&frame(0x08, b"", None, 7)]),
            [Event::Error(FrameError::FragmentedControl)]
        );
    }

    #[test]
    fn reserved_bits_opcodes_and_text_are_refused() {
        for rsv in [0x40, 0x20, 0x10, 0x70] {
            assert_eq!(
                events(Role::Client, &[&[0x82 | rsv, 0]]),
                [Event::Error(FrameError::ReservedBits(rsv))]
            );
        }
        for op in (0x3..=0x7).chain(0xb..=0xf) {
            assert_eq!(
                events(Role::Client, &[&[0x80 | op, 0]]),
                [Event::Error(FrameError::ReservedOpcode(op))]
            );
        }
        assert_eq!(
            events(Role::Client, &[&[0x81, 0]]),
            [Event::Error(FrameError::Text)]
        );
    }

    #[test]
    fn continuations_need_a_message_and_messages_need_an_end() {
        assert_eq!(
            events(Role::Client, &[&frame(0x80, b"x", None, 7)]),
            [Event::Error(FrameError::StrayContinuation)]
        );
        let mut stream = frame(0x02, b"x", None, 7);
        stream.extend(frame(0x82, b"y", None, 7));
        assert_eq!(
            events(Role::Client, &[&stream]),
            [Event::Error(FrameError::UnfinishedMessage)]
        );
        let mut stream = frame(0x02, b"x", None, 7);
        stream.extend(frame(0x01, b"y", None, 7));
        assert_eq!(
            events(Role::Client, &[&stream]),
            [Event::Error(FrameError::Text)]
        );
    }

    /// Our client's writer and our server's reader over an in-memory pipe: byte-exact, with
    /// masking on the way, at sizes around every header form and the message size.
    #[tokio::test]
    async fn writer_to_reader_is_byte_exact() {
        for len in [
            0,
            1,
            125,
            126,
            65535,
            65537,
            WS_MESSAGE,
            WS_MESSAGE + 1,
            3 << 20,
        ] {
            let data = seq(len, 7);
            let (a, b) = tokio::io::duplex(1 << 20);
            let client = WsStream::new(a, Role::Client, Vec::new(), MAX_FRAME);
            let server = WsStream::new(b, Role::Server, Vec::new(), MAX_FRAME);
            let (_, mut wr) = client.split(tokio::io::split);
            let (mut rd, _) = server.split(tokio::io::split);
            let count = (AtomicU64::new(0), AtomicU64::new(0));
            let mut out = Vec::new();
            let send = async {
                wr.pump_from(&mut &data[..], &count.0).await?;
                wr.finish().await
            };
            let (sent, got) = tokio::join!(send, rd.pump_to(&mut out, &count.1));
            sent.expect("send");
            got.expect("receive");
            assert!(
                out == data,
                "{len} bytes arrived as {} other bytes",
                out.len()
            );
            assert_eq!(count.1.load(Relaxed), len as u64);
        }
    }

    /// The frames a client sends are masked, each with its own key.
    #[tokio::test]
    async fn a_client_masks_every_frame_with_a_fresh_key() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut client = WsStream::new(a, Role::Client, Vec::new(), MAX_FRAME);
        let payload = vec![0u8; 64];
        for _ in 0..3 {
            client.send_message(&payload).await.expect("send");
        }
        let mut wire = vec![0u8; 3 * (6 + 64)];
        b.read_exact(&mut wire).await.expect("read");
        let keys: Vec<&[u8]> = wire.chunks(70).map(|f| &f[2..6]).collect();
        for f in wire.chunks(70) {
            assert_eq!(f[..2], [0x82, 0x80 | 64]);
            // A zero payload masked is the key repeated.
            assert_eq!(
                f[6..10],
                f[2..6],
                "the payload is masked with the frame's key"
            );
        }
        assert!(
            keys[0] != keys[1] && keys[1] != keys[2],
            "keys repeat: {keys:?}"
        );
    }

    /// A ping in the middle of the data gets its pong from the writer, even while the
    /// writer's source is quiet; the reader never waits for it.
    #[tokio::test]
    async fn a_ping_mid_stream_gets_a_pong() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let server = WsStream::new(ours, Role::Server, Vec::new(), MAX_FRAME);
        let (mut rd, mut wr) = server.split(tokio::io::split);
        // A source that never sends anything and never ends.
        let (_quiet_peer, mut quiet) = tokio::io::duplex(64);
        let key = Some([5, 6, 7, 8]);
        let mut input = frame(0x82, b"before", key, 7);
        input.extend(frame(0x89, b"are you there?", key, 7));
        input.extend(frame(0x82, b"after", key, 7));
        input.extend(frame(0x82, b"", key, 7));
        peer.write_all(&input).await.expect("write");
        let mut out = Vec::new();
        let counts = (AtomicU64::new(0), AtomicU64::new(0));
        let pump = wr.pump_from(&mut quiet, &counts.0);
        let check = async {
            rd.pump_to(&mut out, &counts.1).await.expect("receive");
            let mut pong = [0u8; 16];
            peer.read_exact(&mut pong).await.expect("the pong");
            pong
        };
        let pong = tokio::select! {
            pong = check => pong,
            r = pump => panic!("the quiet source ended: {r:?}"),
        };
        assert_eq!(out, b"beforeafter");
        assert_eq!(pong[..2], [0x8a, 14], "an unmasked final pong of 14 bytes");
        assert_eq!(&pong[2..], b"are you there?");
    }

    /// During the handshake a ping is answered from within the receive.
    #[tokio::test]
    async fn a_ping_during_the_handshake_gets_a_pong() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let mut client = WsStream::new(ours, Role::Client, Vec::new(), MAX_FRAME);
        let mut input = frame(0x89, b"hi", None, 7);
        input.extend(frame(0x82, b"envelope", None, 7));
        peer.write_all(&input).await.expect("write");
        assert_eq!(client.recv_message().await.expect("message"), b"envelope");
        let mut pong = [0u8; 8];
        peer.read_exact(&mut pong).await.expect("the pong");
        assert_eq!(pong[..2], [0x8a, 0x82], "a masked pong of 2 bytes");
        let mut body = [pong[6], pong[7]];
        apply_mask(&mut body, [pong[2], pong[3], pong[4], pong[5]]);
        assert_eq!(&body, b"hi");
    }

    /// Bytes that arrived with the upgrade are the start of the frame stream, and whatever
    /// the reader already buffered during the handshake survives the split.
    #[tokio::test]
    async fn buffered_bytes_survive_the_upgrade_and_the_split() {
        let key = Some([1, 1, 2, 3]);
        let mut early = frame(0x82, b"hello", key, 7);
        early.extend(frame(0x82, b"data", key, 7));
        early.extend(frame(0x02, b"da", key, 7)); // a fragment, finished later
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let mut server = WsStream::new(ours, Role::Server, early, MAX_FRAME);
        assert_eq!(server.recv_message().await.expect("message"), b"hello");
        let (mut rd, _wr) = server.split(tokio::io::split);
        let mut rest = frame(0x80, b"ta", key, 7);
        rest.extend(frame(0x82, b"", key, 7));
        peer.write_all(&rest).await.expect("write");
        let mut out = Vec::new();
        rd.pump_to(&mut out, &AtomicU64::new(0))
            .await
            .expect("receive");
        assert_eq!(out, b"datadata");
    }

    /// Closing before the end of the stream is a lost connection with the peer's reason; so
    /// is a connection that ends without a close.
    #[tokio::test]
    async fn an_early_close_is_a_lost_connection() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let (mut rd, _wr) =
            WsStream::new(ours, Role::Client, Vec::new(), MAX_FRAME).split(tokio::io::split);
        let mut input = frame(0x82, b"some", None, 7);
        input.extend(frame(0x88, b"\x03\xe9going away", None, 7));
        peer.write_all(&input).await.expect("write");
        let err = rd
            .pump_to(&mut Vec::new(), &AtomicU64::new(0))
            .await
            .expect_err("a close is no end marker");
        let msg = err.to_string();
        assert!(
            matches!(err, Error::ConnectionLost(_)) && msg.contains("going away"),
            "{msg}"
        );

        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let (mut rd, _wr) =
            WsStream::new(ours, Role::Client, Vec::new(), MAX_FRAME).split(tokio::io::split);
        peer.write_all(&frame(0x82, b"some", None, 7))
            .await
            .expect("write");
        drop(peer);
        let err = rd
            .pump_to(&mut Vec::new(), &AtomicU64::new(0))
            .await
            .expect_err("EOF is no end marker");
        assert!(matches!(err, Error::ConnectionLost(_)), "{err}");
    }
}
