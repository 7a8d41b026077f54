//! RFC 6455 frames without I/O: header layout, masking, and the incremental [`Parser`] that
//! turns bytes (split anywhere) into payload pieces and control frames, refusing every
//! breach of the framing with a [`FrameError`].

use std::ops::Range;

use crate::protocol::MAX_FRAME;

/// Longest frame header: 2 bytes, a 64-bit length, a masking key.
pub(crate) const MAX_HEADER: usize = 14;

/// Largest control frame payload (RFC 6455, 5.5).
pub(super) const MAX_CONTROL: usize = 125;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
pub(super) const OP_BINARY: u8 = 0x2;
pub(super) const OP_CLOSE: u8 = 0x8;
pub(super) const OP_PING: u8 = 0x9;
pub(super) const OP_PONG: u8 = 0xa;

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

impl FrameError {
    /// The close status that tells the peer why (RFC 6455, 7.4.1): 1003 for a text message
    /// (a kind of data this end does not accept), 1009 for a frame or message above the
    /// limit, 1002 (protocol error) for the rest.
    pub(crate) fn close_code(&self) -> u16 {
        match self {
            FrameError::Text => 1003,
            FrameError::FrameTooLarge(_) | FrameError::MessageTooLarge { .. } => 1009,
            _ => 1002,
        }
    }
}

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
pub(super) fn advance_key(mut key: [u8; 4], done: usize) -> [u8; 4] {
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
pub(super) struct Header {
    pub(super) fin: bool,
    pub(super) opcode: u8,
    pub(super) len: usize,
    pub(super) key: Option<[u8; 4]>,
    pub(super) size: usize,
}

/// The incremental frame parser: bytes in (any split), [`Item`]s out. Data payloads are handed
/// out as soon as they arrive, so a frame is never buffered whole; control frames (at most
/// 125 bytes) are handed out complete.
#[derive(Debug)]
pub(crate) struct Parser {
    pub(super) role: Role,
    state: State,
    /// Bytes of the data message in progress, if one is.
    message: Option<usize>,
    /// Largest message accepted.
    pub(super) max_message: usize,
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
pub(super) fn parse_header(buf: &[u8], role: Role) -> Result<Option<Header>, FrameError> {
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
