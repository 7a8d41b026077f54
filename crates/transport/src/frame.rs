//! The data framing of `tcp://` and `tls://` tunnel connections, without I/O: a big-endian
//! `u32` length and that many bytes, a zero length marking the end of the stream. From protocol
//! version 2 a second zero length follows the end, once the peer's own end has arrived: the
//! acknowledgement that closes the connection (see `docs/PROTOCOL.md`). The TCP
//! reader (`stream.rs`) and the TLS relay pump (`tls/stream.rs`) both decode with one
//! [`FrameDecoder`], so a frame header split anywhere (between reads, between TLS records)
//! is read the same way, and the limit is checked in one place.

use std::ops::Range;

use crate::protocol::MAX_FRAME;

/// Bytes of a frame header: the payload's length.
pub(crate) const HEADER: usize = 4;

/// A peer broke the data framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A frame header announced more than [`MAX_FRAME`] bytes.
    #[error("data frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Bytes came after the end-of-stream frame.
    #[error("data after the end of the stream")]
    AfterEnd,
}

/// What a [`FrameDecoder`] expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// The rest of a frame header: `missing` bytes.
    Header {
        /// Header bytes still to come.
        missing: usize,
    },
    /// `left` more payload bytes of the current frame.
    Payload {
        /// Payload bytes still to come.
        left: usize,
    },
    /// Nothing: the end-of-stream frame has arrived (and, when one is expected, the
    /// acknowledgement after it).
    End,
}

/// The decoder's state between reads: a partial header, the payload left in the current
/// frame, whether the end marker arrived and, when the version has one, its acknowledgement.
#[derive(Debug, Default)]
pub(crate) struct FrameDecoder {
    header: [u8; HEADER],
    have: usize,
    left: usize,
    eos: bool,
    expect_ack: bool,
    acked: bool,
}

impl FrameDecoder {
    /// A decoder before the first frame.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Expect the acknowledgement (a second empty frame) after the end marker, as protocol
    /// version 2 sends it.
    pub(crate) fn expect_ack(&mut self, yes: bool) {
        self.expect_ack = yes;
    }

    /// What comes next in the stream.
    pub(crate) fn expect(&self) -> Expect {
        if self.eos && (self.acked || !self.expect_ack) {
            Expect::End
        } else if self.left > 0 {
            Expect::Payload { left: self.left }
        } else {
            Expect::Header {
                missing: HEADER - self.have,
            }
        }
    }

    /// Whether the end-of-stream frame has arrived: the data is complete.
    pub(crate) fn ended(&self) -> bool {
        self.eos
    }

    /// Whether the acknowledgement after the end marker has arrived.
    pub(crate) fn acked(&self) -> bool {
        self.acked
    }

    /// Takes header bytes (at most what [`Expect::Header`] asked for); returns how many it
    /// took. A complete header starts the frame's payload or ends the stream.
    pub(crate) fn header(&mut self, bytes: &[u8]) -> Result<usize, DecodeError> {
        let take = (HEADER - self.have).min(bytes.len());
        self.header[self.have..self.have + take].copy_from_slice(&bytes[..take]);
        self.have += take;
        if self.have == HEADER {
            self.have = 0;
            match u32::from_be_bytes(self.header) as usize {
                0 if self.eos => self.acked = true,
                _ if self.eos => return Err(DecodeError::AfterEnd),
                0 => self.eos = true,
                n if n > MAX_FRAME => return Err(DecodeError::TooLarge(n)),
                n => self.left = n,
            }
        }
        Ok(take)
    }

    /// Notes that `n` payload bytes (at most what [`Expect::Payload`] said) were consumed.
    pub(crate) fn payload(&mut self, n: usize) {
        debug_assert!(n <= self.left);
        self.left -= n;
    }

    /// Decodes `buf[range]`, whatever it holds (payload, headers or parts of them), and hands
    /// each run of payload to `out` as a range into `buf`. Bytes after the end marker (and its
    /// acknowledgement, when one is expected) are an error.
    pub(crate) fn decode(
        &mut self,
        buf: &[u8],
        range: Range<usize>,
        mut out: impl FnMut(Range<usize>),
    ) -> Result<(), DecodeError> {
        let mut at = range.start;
        while at < range.end {
            match self.expect() {
                Expect::End => return Err(DecodeError::AfterEnd),
                Expect::Payload { left } => {
                    let take = left.min(range.end - at);
                    out(at..at + take);
                    self.payload(take);
                    at += take;
                }
                Expect::Header { .. } => at += self.header(&buf[at..range.end])?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut wire = Vec::new();
        for p in payloads {
            wire.extend_from_slice(&(p.len() as u32).to_be_bytes());
            wire.extend_from_slice(p);
        }
        wire.extend_from_slice(&[0; HEADER]);
        wire
    }

    /// Split at every step size, the payload comes out whole and the end is seen.
    #[test]
    fn decodes_frames_split_anywhere() {
        let wire = frames(&[b"hello", b"world!"]);
        for step in 1..=wire.len() {
            let mut dec = FrameDecoder::new();
            let mut got = Vec::new();
            for start in (0..wire.len()).step_by(step) {
                let end = (start + step).min(wire.len());
                dec.decode(&wire, start..end, |r| got.extend_from_slice(&wire[r]))
                    .expect("valid frames");
            }
            assert_eq!(got, b"helloworld!", "{step} bytes at a time");
            assert!(dec.ended(), "{step} bytes at a time");
        }
    }

    #[test]
    fn the_acknowledgement_follows_the_end_when_expected() {
        let mut wire = frames(&[b"data"]);
        wire.extend_from_slice(&[0; HEADER]);
        for step in 1..=wire.len() {
            let mut dec = FrameDecoder::new();
            dec.expect_ack(true);
            let mut got = Vec::new();
            for start in (0..wire.len()).step_by(step) {
                let end = (start + step).min(wire.len());
                dec.decode(&wire, start..end, |r| got.extend_from_slice(&wire[r]))
                    .expect("frames, end and acknowledgement");
            }
            assert_eq!(got, b"data");
            assert!(dec.ended() && dec.acked(), "{step} bytes at a time");
            assert_eq!(dec.expect(), Expect::End);
        }
        // Version 1 has no acknowledgement: a second end is a byte after the end.
        let mut dec = FrameDecoder::new();
        assert_eq!(
            dec.decode(&wire, 0..wire.len(), |_| {}),
            Err(DecodeError::AfterEnd)
        );
        // Anything but an empty frame after the end is refused, and so is anything after
        // the acknowledgement.
        let mut bad = frames(&[]);
        bad.extend_from_slice(&1u32.to_be_bytes());
        let mut dec = FrameDecoder::new();
        dec.expect_ack(true);
        assert_eq!(
            dec.decode(&bad, 0..bad.len(), |_| {}),
            Err(DecodeError::AfterEnd)
        );
        let mut more = wire.clone();
        more.push(0);
        let mut dec = FrameDecoder::new();
        dec.expect_ack(true);
        assert_eq!(
            dec.decode(&more, 0..more.len(), |_| {}),
            Err(DecodeError::AfterEnd)
        );
    }

    #[test]
    fn refuses_oversized_frames_and_bytes_after_the_end() {
        let mut dec = FrameDecoder::new();
        let over = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert_eq!(
            dec.decode(&over, 0..HEADER, |_| {}),
            Err(DecodeError::TooLarge(MAX_FRAME + 1))
        );
        let mut wire = frames(&[]);
        wire.push(1);
        let mut dec = FrameDecoder::new();
        assert_eq!(
            dec.decode(&wire, 0..wire.len(), |_| {}),
            Err(DecodeError::AfterEnd)
        );
    }
}
