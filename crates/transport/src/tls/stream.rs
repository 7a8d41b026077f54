//! An established TLS 1.3 session on a TCP socket ([`TlsStream`]) and its two directions
//! ([`TlsReader`], [`TlsWriter`]), which run independently once split: each owns its own key
//! and sequence number, and they meet only for key updates.
//!
//! Both directions are `AsyncRead` / `AsyncWrite` for the handshake envelopes and WebSocket
//! over TLS. The relay uses two faster paths on top ([`TlsReader::pump_frames_to`],
//! [`TlsWriter::pump_frames_from`]): the writer reads QEMU's bytes straight into the payload
//! areas of up to 64 records with one `readv`, seals them where they lie and sends them with one
//! `write`; the reader opens every complete record in its buffer in place and hands the
//! payloads to QEMU's socket with one `writev`. No byte is copied in user space.

use std::future::poll_fn;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use rustls::{AlertDescription, CipherSuite, ProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::diagnose::{diagnose, Side};
use super::handshake::{Established, Kernel};
use super::record::{
    self, parse_alert, parse_handshake, sealed_len, Alert, PostHandshake, RecordKey, ALERT,
    APPLICATION_DATA, CLOSE_NOTIFY, FULL_RECORD, HANDSHAKE, HEADER, KEY_UPDATE_MESSAGE,
    MAX_PLAINTEXT,
};
use crate::error::{Error, Result};
use crate::frame::FrameDecoder;

/// The reader's buffer: up to this much ciphertext per `read`.
const RX_BUFFER: usize = 1024 * 1024;
/// Records the writer's fast path fills per `readv`: 64 x 16 KiB, the 1 MiB of a TCP frame.
const BATCH_RECORDS: usize = 64;
/// Payload of one of our frames in the fast path: a record's plaintext less the frame header.
const BATCH_PAYLOAD: usize = MAX_PLAINTEXT - 4;
/// The generic writer seals at most this much per `poll_write`, and stops taking data while
/// this much is still unsent.
const TX_CHUNK: usize = 64 * 1024;

/// What the two directions share: rustls' key schedule, the peer's request that we update
/// our sending key, and the alert the reader owes the peer after refusing what it sent.
struct Shared {
    kernel: Mutex<Kernel>,
    answer_key_update: AtomicBool,
    /// Set by the reader when it refuses a record; sent by the writer (which owns the sending
    /// key and the socket's write side), once.
    alert: Mutex<Option<AlertDescription>>,
    /// Send a `key_update` before the sending key protects this many records: the suite's
    /// confidentiality limit, less room for one batch.
    key_update_at: u64,
}

/// An established TLS session, both directions; [`TlsStream::into_split`] separates them.
#[derive(Debug)]
pub struct TlsStream {
    reader: TlsReader,
    writer: TlsWriter,
    suite: CipherSuite,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("key_update_at", &self.key_update_at)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// Takes over a session from the handshake. TLS 1.3 only: the record layer here has no
    /// TLS 1.2 (whose nonces and key schedule differ), and qmigrate offers nothing older.
    pub(crate) fn new(est: Established) -> Result<TlsStream, rustls::Error> {
        Self::with_key_update_at(est, None)
    }

    pub(crate) fn with_key_update_at(
        est: Established,
        key_update_at: Option<u64>,
    ) -> Result<TlsStream, rustls::Error> {
        let Established {
            tcp,
            plaintext,
            leftover,
            secrets,
            kernel,
            suite,
            version,
        } = est;
        let tls13 = match (version, suite.tls13()) {
            (ProtocolVersion::TLSv1_3, Some(s)) => s,
            _ => {
                return Err(rustls::Error::General(format!(
                    "{version:?} negotiated; qmigrate needs TLS 1.3"
                )))
            }
        };
        let limit = tls13.common.confidentiality_limit;
        let key_update_at =
            key_update_at.unwrap_or_else(|| limit.saturating_sub(4 * BATCH_RECORDS as u64).max(1));
        let shared = Arc::new(Shared {
            kernel: Mutex::new(kernel),
            answer_key_update: AtomicBool::new(false),
            alert: Mutex::new(None),
            key_update_at,
        });
        let (rx_seq, rx) = &secrets.rx;
        let (tx_seq, tx) = &secrets.tx;
        let (rd, wr) = tcp.into_split();
        // What rustls already opened goes first, then the ciphertext it left.
        let (p, l) = (plaintext.len(), leftover.len());
        let mut buf = vec![0u8; RX_BUFFER.max(p + l + 2 * FULL_RECORD)];
        buf[..p].copy_from_slice(&plaintext);
        buf[p..p + l].copy_from_slice(&leftover);
        Ok(TlsStream {
            reader: TlsReader {
                tcp: rd,
                key: RecordKey::new(*rx_seq, rx)?,
                shared: shared.clone(),
                buf,
                start: p,
                end: p + l,
                plain: (0, p),
                closed: false,
            },
            writer: TlsWriter {
                tcp: wr,
                key: RecordKey::new(*tx_seq, tx)?,
                shared,
                out: Vec::with_capacity(TX_CHUNK + 8 * FULL_RECORD),
                pos: 0,
                closed: false,
                batch: Vec::new(),
                batch_out: 0..0,
            },
            suite: suite.suite(),
        })
    }

    /// The negotiated cipher suite, for logs.
    pub fn cipher_suite(&self) -> CipherSuite {
        self.suite
    }

    /// The two directions, to run side by side.
    pub fn into_split(self) -> (TlsReader, TlsWriter) {
        (self.reader, self.writer)
    }
}

impl AsyncRead for TlsStream {
    /// Reads as [`TlsReader`] does. A record it refuses is answered with its alert at once,
    /// best effort, since the writer is at hand (before the split, during the handshake
    /// messages, nobody else writes).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = ready!(Pin::new(&mut this.reader).poll_read(cx, buf));
        if result.is_err() && matches!(this.writer.seal_owed_alert(), Ok(true)) {
            if let Poll::Ready(Ok(())) = this.writer.poll_drain(cx) {
                let _ = Pin::new(&mut this.writer.tcp).poll_shutdown(cx);
            }
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().writer).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().writer).poll_shutdown(cx)
    }
}

/// The receiving direction of a [`TlsStream`].
#[derive(Debug)]
pub struct TlsReader {
    tcp: OwnedReadHalf,
    key: RecordKey,
    shared: Arc<Shared>,
    /// Ciphertext not yet opened is `buf[start..end]`; opened records lie before `start`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Offset and length of opened application data not yet handed out.
    plain: (usize, usize),
    /// The peer's `close_notify` arrived: nothing more comes.
    closed: bool,
}

/// What the next record in the buffer held.
enum Next {
    /// Application data at this offset and length of the buffer.
    Data(usize, usize),
    /// No complete record: read more.
    NeedMore,
    /// `close_notify`.
    Closed,
}

impl TlsReader {
    /// Opens the next complete record in the buffer, acting on alerts and post-handshake
    /// messages, until one holds application data.
    fn next_record(&mut self) -> io::Result<Next> {
        loop {
            let avail = self.end - self.start;
            if avail < HEADER {
                return Ok(Next::NeedMore);
            }
            let mut header = [0u8; HEADER];
            header.copy_from_slice(&self.buf[self.start..self.start + HEADER]);
            let body_len = record::parse_header(&header).map_err(|e| self.refuse(e))?;
            if avail < HEADER + body_len {
                return Ok(Next::NeedMore);
            }
            let body = self.start + HEADER;
            let opened = match self.key.open(header, &mut self.buf[body..body + body_len]) {
                Ok(opened) => opened,
                Err(e) => return Err(self.refuse(e)),
            };
            self.start = body + body_len;
            let content = body..body + opened.len;
            match opened.typ {
                APPLICATION_DATA if opened.len == 0 => continue,
                APPLICATION_DATA => return Ok(Next::Data(body, opened.len)),
                ALERT => match parse_alert(&self.buf[content]).map_err(|e| self.refuse(e))? {
                    Alert::CloseNotify => {
                        self.closed = true;
                        return Ok(Next::Closed);
                    }
                    Alert::Fatal(desc) => {
                        // As rustls would report it, so that the error says what the peer
                        // refused (a missing client certificate, say).
                        let alert = rustls::Error::AlertReceived(desc);
                        return Err(diagnose(&alert, Side::Either).into_io());
                    }
                },
                HANDSHAKE => {
                    let messages =
                        parse_handshake(&self.buf[content]).map_err(|e| self.refuse(e))?;
                    self.post_handshake(messages).map_err(|e| self.refuse(e))?;
                }
                other => {
                    return Err(self.refuse(rustls::Error::InappropriateMessage {
                        expect_types: vec![rustls::ContentType::ApplicationData],
                        got_type: rustls::ContentType::from(other),
                    }))
                }
            }
        }
    }

    /// Refuses what the peer sent: notes the alert the writer owes it, and the error.
    fn refuse(&self, e: rustls::Error) -> io::Error {
        let alert = match &e {
            rustls::Error::DecryptError => AlertDescription::BadRecordMac,
            rustls::Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
            rustls::Error::InvalidMessage(_) => AlertDescription::DecodeError,
            rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. }
            | rustls::Error::PeerMisbehaved(_) => AlertDescription::UnexpectedMessage,
            _ => AlertDescription::InternalError,
        };
        let mut owed = self.shared.alert.lock().unwrap_or_else(|e| e.into_inner());
        owed.get_or_insert(alert);
        record_error(e)
    }

    fn post_handshake(&mut self, messages: Vec<PostHandshake>) -> Result<(), rustls::Error> {
        let last = messages.len().saturating_sub(1);
        for (i, message) in messages.into_iter().enumerate() {
            match message {
                PostHandshake::KeyUpdate { requested } => {
                    // The next record is under the new key, so nothing may follow in this one.
                    if i != last {
                        return Err(rustls::Error::PeerMisbehaved(
                            rustls::PeerMisbehaved::KeyEpochWithPendingFragment,
                        ));
                    }
                    let (seq, secrets) = lock(&self.shared.kernel).update_rx()?;
                    self.key = RecordKey::new(seq, &secrets)?;
                    if requested {
                        self.shared.answer_key_update.store(true, Ordering::Release);
                    }
                    tracing::debug!("TLS: the peer updated its key");
                }
                PostHandshake::NewSessionTicket(body) => {
                    lock(&self.shared.kernel).session_ticket(&body)?;
                }
            }
        }
        Ok(())
    }

    /// Makes room for at least one more whole record after `end`, moving the unopened rest
    /// to the front once nothing before it is still needed.
    fn make_room(&mut self) {
        debug_assert_eq!(self.plain.1, 0);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < FULL_RECORD + 256 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads more ciphertext. A socket that ends before the peer's `close_notify` is a
    /// truncated session: an error, never a clean end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.make_room();
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the TLS connection without close_notify",
            )));
        }
        self.end += n;
        Poll::Ready(Ok(()))
    }

    /// The relay's receiving side for `tls://`: reads our frames (see `crate::frame`) out of
    /// the records and writes their payloads to `w`, many records per `writev`, until the
    /// end-of-stream frame. `dec` is the frame reader's state, so that this can take over
    /// from byte-wise reads.
    pub(crate) async fn pump_frames_to<W: AsyncWrite + Unpin>(
        &mut self,
        dec: &mut FrameDecoder,
        w: &mut W,
        count: &AtomicU64,
    ) -> Result<()> {
        let mut slices: Vec<(usize, usize)> = Vec::with_capacity(2 * BATCH_RECORDS);
        if self.plain.1 > 0 {
            let (at, len) = std::mem::take(&mut self.plain);
            payload_slices(dec, &self.buf, at, len, &mut slices)?;
        }
        loop {
            while !dec.ended() {
                match self.next_record().map_err(Error::lost_or_io)? {
                    Next::Data(at, len) => payload_slices(dec, &self.buf, at, len, &mut slices)?,
                    Next::NeedMore | Next::Closed => break,
                }
            }
            if !slices.is_empty() {
                let total = write_slices(w, &self.buf, &slices).await?;
                count.fetch_add(total as u64, Ordering::Relaxed);
                slices.clear();
            }
            if dec.ended() {
                return Ok(());
            }
            if self.closed {
                return Err(Error::ConnectionLost(
                    "the peer ended the TLS session without ending the stream".into(),
                ));
            }
            poll_fn(|cx| self.poll_fill(cx))
                .await
                .map_err(Error::lost_or_io)?;
        }
    }
}

impl AsyncRead for TlsReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = out.filled().len();
        loop {
            if this.plain.1 > 0 {
                let (at, len) = this.plain;
                let n = len.min(out.remaining());
                out.put_slice(&this.buf[at..at + n]);
                this.plain = (at + n, len - n);
                if out.remaining() == 0 {
                    return Poll::Ready(Ok(()));
                }
            }
            if this.closed {
                return Poll::Ready(Ok(()));
            }
            // Fill `out` with every record already in the buffer, not one record (16 KiB) per
            // call: a WebSocket reader above asks for 1 MiB at a time. Only an empty `out`
            // waits for the socket.
            match this.next_record()? {
                Next::Data(at, len) => this.plain = (at, len),
                Next::Closed => {}
                Next::NeedMore if out.filled().len() > start => return Poll::Ready(Ok(())),
                Next::NeedMore => ready!(this.poll_fill(cx))?,
            }
        }
    }
}

/// Decodes `len` bytes of plaintext at `at` (our frames, see `crate::frame`, split anywhere
/// between records) and adds their payload to `slices`, joining runs that touch.
fn payload_slices(
    dec: &mut FrameDecoder,
    buf: &[u8],
    at: usize,
    len: usize,
    slices: &mut Vec<(usize, usize)>,
) -> Result<()> {
    dec.decode(buf, at..at + len, |r| match slices.last_mut() {
        Some((start, n)) if *start + *n == r.start => *n += r.len(),
        _ => slices.push((r.start, r.len())),
    })?;
    Ok(())
}

/// Writes the given slices of `buf` to `w`, in order, with as few `writev`s as it takes.
async fn write_slices<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    slices: &[(usize, usize)],
) -> Result<usize> {
    let mut iov: Vec<IoSlice<'_>> = slices
        .iter()
        .map(|&(at, len)| IoSlice::new(&buf[at..at + len]))
        .collect();
    let total = slices.iter().map(|s| s.1).sum();
    let mut rest = &mut iov[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await.map_err(Error::lost_or_io)?;
        if n == 0 {
            return Err(Error::ConnectionLost("the Unix socket took no more".into()));
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(total)
}

/// The sending direction of a [`TlsStream`].
#[derive(Debug)]
pub struct TlsWriter {
    tcp: OwnedWriteHalf,
    key: RecordKey,
    shared: Arc<Shared>,
    /// Sealed records not yet sent: `out[pos..]`.
    out: Vec<u8>,
    pos: usize,
    /// `close_notify` sealed: nothing more may be sent.
    closed: bool,
    /// The fast path's records, allocated on its first use.
    batch: Vec<u8>,
    /// The part of `batch` being written: what a cancelled write left unsent, which must go
    /// out before anything else (an alert) can follow it on the wire.
    batch_out: std::ops::Range<usize>,
}

impl TlsWriter {
    /// Seals `content` as one record of type `typ` at the end of `out`.
    fn seal_into_out(&mut self, content: &[u8], typ: u8) -> io::Result<()> {
        let at = self.out.len();
        self.out.extend_from_slice(&[0u8; HEADER]);
        self.out.extend_from_slice(content);
        self.out.extend_from_slice(&[0u8; 1 + record::TAG]);
        self.key
            .seal(&mut self.out[at..], content.len(), typ)
            .map_err(record_error)
    }

    /// Whether a `key_update` must go out before `records` more records.
    fn key_update_due(&self, records: u64) -> bool {
        self.key.seq().saturating_add(records) >= self.shared.key_update_at
            || self.shared.answer_key_update.load(Ordering::Acquire)
    }

    /// Seals a `key_update` (not asking the peer for one) under the current key into `out`,
    /// then switches to the next key.
    fn update_key(&mut self) -> io::Result<()> {
        self.seal_into_out(&KEY_UPDATE_MESSAGE, HANDSHAKE)?;
        let (seq, secrets) = lock(&self.shared.kernel)
            .update_tx()
            .map_err(record_error)?;
        self.key = RecordKey::new(seq, &secrets).map_err(record_error)?;
        self.shared
            .answer_key_update
            .store(false, Ordering::Release);
        tracing::debug!("TLS: sending key updated");
        Ok(())
    }

    /// Sends what `out` holds.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.out.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Writes what is left of the batch, keeping track of it, so that a write cancelled half
    /// way can be finished before an alert.
    async fn write_batch(&mut self) -> Result<()> {
        while !self.batch_out.is_empty() {
            let n = self
                .tcp
                .write(&self.batch[self.batch_out.clone()])
                .await
                .map_err(Error::lost_or_io)?;
            if n == 0 {
                return Err(Error::lost_or_io(io::ErrorKind::WriteZero.into()));
            }
            self.batch_out.start += n;
        }
        Ok(())
    }

    /// Seals the fatal alert the reader owes the peer, if any (and nothing was closed yet),
    /// into `out`; nothing may be sent after it.
    fn seal_owed_alert(&mut self) -> io::Result<bool> {
        let owed = self
            .shared
            .alert
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match owed {
            Some(desc) if !self.closed => {
                self.seal_into_out(&[2, u8::from(desc)], ALERT)?;
                self.closed = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether the reader refused a record and the alert it owes is not sent yet.
    pub(crate) fn owes_alert(&self) -> bool {
        !self.closed
            && self
                .shared
                .alert
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    /// After the reader refused a record: sends the fatal alert it owes the peer (RFC 8446,
    /// 6.2: `bad_record_mac` for one that does not decrypt, say), behind whatever a cancelled
    /// write left half sent, then the FIN. Does nothing when no alert is owed.
    pub(crate) async fn send_owed_alert(&mut self) -> Result<()> {
        if !self.seal_owed_alert().map_err(Error::lost_or_io)? {
            return Ok(());
        }
        self.write_batch().await?;
        poll_fn(|cx| self.poll_drain(cx))
            .await
            .map_err(Error::lost_or_io)?;
        self.tcp.shutdown().await.map_err(Error::lost_or_io)
    }

    /// The relay's sending side for `tls://`: reads from `r` into the payload areas of up to
    /// 64 records at once, frames and seals each in place and sends them with one write, until
    /// `r` ends. The caller sends the end-of-stream frame and `close_notify` after.
    pub(crate) async fn pump_frames_from<R: VectoredRead>(
        &mut self,
        r: &mut R,
        count: &AtomicU64,
    ) -> Result<()> {
        poll_fn(|cx| self.poll_drain(cx))
            .await
            .map_err(Error::lost_or_io)?;
        if self.batch.is_empty() {
            self.batch = vec![0u8; BATCH_RECORDS * FULL_RECORD];
        }
        loop {
            let n = {
                let mut iov: Vec<IoSliceMut<'_>> = self
                    .batch
                    .chunks_exact_mut(FULL_RECORD)
                    .map(|rec| IoSliceMut::new(&mut rec[HEADER + 4..HEADER + 4 + BATCH_PAYLOAD]))
                    .collect();
                poll_fn(|cx| r.poll_read_vectored(cx, &mut iov))
                    .await
                    .map_err(Error::lost_or_io)?
            };
            if n == 0 {
                return Ok(());
            }
            // Checked after the read, which may have waited long: a peer's request that
            // arrived meanwhile is answered before these records (RFC 8446, 4.6.3).
            if self.key_update_due(BATCH_RECORDS as u64) {
                self.update_key().map_err(Error::lost_or_io)?;
                poll_fn(|cx| self.poll_drain(cx))
                    .await
                    .map_err(Error::lost_or_io)?;
            }
            let mut wire = 0;
            let mut left = n;
            for rec in self.batch.chunks_exact_mut(FULL_RECORD) {
                if left == 0 {
                    break;
                }
                let m = left.min(BATCH_PAYLOAD);
                rec[HEADER..HEADER + 4].copy_from_slice(&(m as u32).to_be_bytes());
                self.key
                    .seal(rec, 4 + m, APPLICATION_DATA)
                    .map_err(|e| Error::lost_or_io(record_error(e)))?;
                wire += sealed_len(4 + m);
                left -= m;
            }
            self.batch_out = 0..wire;
            self.write_batch().await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncWrite for TlsWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS session was closed (close_notify sent)",
            )));
        }
        if this.out.len() - this.pos >= TX_CHUNK {
            ready!(this.poll_drain(cx))?;
        }
        if this.key_update_due(1) {
            this.update_key()?;
        }
        let n = data.len().min(TX_CHUNK);
        for chunk in data[..n].chunks(MAX_PLAINTEXT) {
            this.seal_into_out(chunk, APPLICATION_DATA)?;
        }
        // Start sending now; what the socket does not take waits for the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// `close_notify`, then the TCP FIN: this direction ends, the other keeps going (TLS 1.3
    /// closes each direction on its own).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closed {
            this.seal_into_out(&CLOSE_NOTIFY, ALERT)?;
            this.closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// A source the TLS writer's fast path can read into many buffers with one system call.
/// Implemented for tokio's Unix sockets, which is what the relay reads QEMU from.
pub trait VectoredRead: AsyncRead + Unpin {
    /// Reads into `bufs` in order, as `readv(2)`; `Ok(0)` at the end of the stream.
    fn poll_read_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>>;
}

fn unix_read_vectored(
    s: &tokio::net::UnixStream,
    cx: &mut Context<'_>,
    bufs: &mut [IoSliceMut<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        match s.try_read_vectored(bufs) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

impl VectoredRead for tokio::net::UnixStream {
    fn poll_read_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        unix_read_vectored(self, cx, bufs)
    }
}

impl VectoredRead for tokio::net::unix::ReadHalf<'_> {
    fn poll_read_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        unix_read_vectored(self.as_ref(), cx, bufs)
    }
}

impl VectoredRead for tokio::net::unix::OwnedReadHalf {
    fn poll_read_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        unix_read_vectored(self.as_ref(), cx, bufs)
    }
}

fn lock(kernel: &Mutex<Kernel>) -> std::sync::MutexGuard<'_, Kernel> {
    // A panic while holding it cannot leave rustls' key schedule half-updated in a way that
    // matters more than the panic itself; keep going.
    kernel
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record-layer failure as an I/O error. The stream is broken either way; the text says
/// why (a record that does not decrypt, an alert, a malformed message).
fn record_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, format!("TLS: {e}"))
}

#[cfg(test)]
mod tests {
    //! The record layer against itself and against a stock rustls stream (tokio-rustls) on
    //! the other end: what we seal, rustls opens, and the other way round, key updates
    //! included both ways.

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream, UnixStream};

    use super::*;
    use crate::tls::{handshake, ClientTls, Fingerprint, ServerCheck, ServerTls};

    struct Pair {
        server: ServerTls,
        client: ClientTls,
    }

    fn pair() -> Pair {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der: CertificateDer<'static> = cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let server = ServerTls::new(vec![der.clone()], key, None).expect("server settings");
        let client = ClientTls::new(ServerCheck::Fingerprint(Fingerprint::of(&der)), None)
            .expect("client settings");
        Pair { server, client }
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("127.0.0.1").expect("name")
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.expect("connect"), s.expect("accept").0)
    }

    /// Our client and our server, `key_update_at` records per key on both.
    async fn ours(p: &Pair, key_update_at: Option<u64>) -> (TlsStream, TlsStream) {
        let (c, s) = tcp_pair().await;
        let (c, s) = tokio::join!(
            handshake::client(p.client.config.clone(), name(), c),
            handshake::server(p.server.config.clone(), s)
        );
        let (Ok(c), Ok(s)) = (c, s) else {
            panic!("handshake failed")
        };
        (
            TlsStream::with_key_update_at(c, key_update_at).expect("client"),
            TlsStream::with_key_update_at(s, key_update_at).expect("server"),
        )
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 13) as u8)
            .collect()
    }

    /// Sends `data` through `w` in uneven pieces, then closes; returns what `r` read.
    async fn send_and_read<W, R>(mut w: W, mut r: R, data: Vec<u8>) -> Vec<u8>
    where
        W: AsyncWrite + Unpin + Send + 'static,
        R: AsyncRead + Unpin,
    {
        let writer = tokio::spawn(async move {
            let mut at = 0;
            let mut step = 1;
            while at < data.len() {
                let n = step.min(data.len() - at);
                w.write_all(&data[at..at + n]).await.expect("write");
                at += n;
                step = step * 7 % 200_003 + 1;
            }
            w.shutdown().await.expect("shutdown");
            w
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        let _ = writer.await.expect("writer");
        got
    }

    #[tokio::test]
    async fn ours_to_ours_both_ways_with_key_updates() {
        let p = pair();
        // A key update every 3 records, so that a few MB cross many keys.
        let (c, s) = ours(&p, Some(3)).await;
        let (c_rd, c_wr) = c.into_split();
        let (s_rd, s_wr) = s.into_split();
        let up = pattern(3_000_017, 1);
        let down = pattern(1_000_003, 2);
        let (got_up, got_down) = tokio::join!(
            send_and_read(c_wr, s_rd, up.clone()),
            send_and_read(s_wr, c_rd, down.clone())
        );
        assert!(got_up == up, "client to server differs");
        assert!(got_down == down, "server to client differs");
    }

    #[tokio::test]
    async fn ours_to_stock_rustls_and_back_with_key_updates() {
        let p = pair();
        let (c, s) = tcp_pair().await;
        // Our client, rustls' own server (same configuration).
        let acceptor = tokio_rustls::TlsAcceptor::from(p.server.config.clone());
        let (ours, theirs) = tokio::join!(
            handshake::client(p.client.config.clone(), name(), c),
            acceptor.accept(s)
        );
        let Ok(ours) = ours else {
            panic!("our handshake")
        };
        let ours = TlsStream::with_key_update_at(ours, Some(5)).expect("ours");
        let mut theirs = theirs.expect("their handshake");
        let (mut rd, mut wr) = ours.into_split();

        // Ours -> theirs, crossing several of our key updates.
        let up = pattern(200_000, 3);
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.expect("write");
            wr.flush().await.expect("flush");
            wr
        });
        let mut got = vec![0u8; up.len()];
        theirs
            .read_exact(&mut got)
            .await
            .expect("rustls reads ours");
        assert!(got == up, "rustls read other bytes than we sealed");
        let mut wr = writer.await.expect("writer");

        // Theirs -> ours, with a key update of theirs in the middle.
        let down = pattern(100_000, 4);
        theirs.write_all(&down[..50_000]).await.expect("write");
        theirs
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        theirs.write_all(&down[50_000..]).await.expect("write");
        theirs.flush().await.expect("flush");
        let mut got = vec![0u8; down.len()];
        rd.read_exact(&mut got).await.expect("we read rustls");
        assert!(got == down, "we read other bytes than rustls sealed");

        // close_notify both ways.
        wr.shutdown().await.expect("our close");
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.expect("their end");
        assert!(rest.is_empty());
        theirs.shutdown().await.expect("their close");
        let mut rest = Vec::new();
        rd.read_to_end(&mut rest).await.expect("our end");
        assert!(rest.is_empty());
    }

    /// RFC 8446, 4.6.3: a peer's request for a key update is answered before the next
    /// application data record. The relay's writer waits in its read of QEMU's socket while
    /// the request arrives: the records it seals from that read must go out under the new
    /// key, after the `key_update`.
    #[tokio::test]
    async fn a_requested_key_update_goes_out_before_the_next_record() {
        let p = pair();
        let (c, s) = tcp_pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(p.server.config.clone());
        let (ours, theirs) = tokio::join!(
            handshake::client(p.client.config.clone(), name(), c),
            acceptor.accept(s)
        );
        let Ok(ours) = ours else {
            panic!("our handshake")
        };
        let (mut rd, mut wr) = TlsStream::new(ours).expect("ours").into_split();
        let mut theirs = theirs.expect("their handshake");
        let (mut qemu, mut relay_src) = UnixStream::pair().expect("pair");
        let data = pattern(1000, 8);
        let count = AtomicU64::new(0);
        let pump = async {
            wr.pump_frames_from(&mut relay_src, &count)
                .await
                .expect("pump from");
            wr
        };
        let drive = async {
            // The writer is in its read of the Unix socket by now.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            theirs
                .get_mut()
                .1
                .refresh_traffic_keys()
                .expect("a key update request");
            theirs.write_all(b"ping").await.expect("write");
            theirs.flush().await.expect("flush");
            let mut got = [0u8; 4];
            rd.read_exact(&mut got).await.expect("read");
            assert!(
                rd.shared.answer_key_update.load(Ordering::Acquire),
                "the request was read"
            );
            qemu.write_all(&data).await.expect("feed");
            qemu.shutdown().await.expect("eof");
        };
        let (wr, ()) = tokio::join!(pump, drive);
        let records = data.len().div_ceil(BATCH_PAYLOAD) as u64;
        assert_eq!(
            wr.key.seq(),
            records,
            "records under the new key: the others went out under the old one, after the \
             peer's request was read"
        );
        let mut got = vec![0u8; data.len() + 4 * records as usize];
        theirs
            .read_exact(&mut got)
            .await
            .expect("rustls reads what we sealed");
    }

    #[tokio::test]
    async fn stock_rustls_client_to_our_server() {
        let p = pair();
        let (c, s) = tcp_pair().await;
        let connector = tokio_rustls::TlsConnector::from(p.client.config.clone());
        let (theirs, ours) = tokio::join!(
            connector.connect(name(), c),
            handshake::server(p.server.config.clone(), s)
        );
        let Ok(ours) = ours else {
            panic!("our handshake")
        };
        let mut ours = TlsStream::new(ours).expect("ours");
        let mut theirs = theirs.expect("their handshake");
        let data = pattern(777_777, 5);
        let (_, got) = tokio::join!(
            async {
                theirs.write_all(&data).await.expect("write");
                theirs.shutdown().await.expect("close");
            },
            async {
                let mut got = Vec::new();
                ours.read_to_end(&mut got).await.expect("read");
                got
            }
        );
        assert!(got == data);
    }

    #[tokio::test]
    async fn a_truncated_stream_is_an_error_never_an_end() {
        let p = pair();
        // Truncated: the TCP connection ends without close_notify.
        let (c, s) = ours(&p, None).await;
        let (mut s_rd, _s_wr) = s.into_split();
        let (_c_rd, mut c_wr) = c.into_split();
        c_wr.write_all(b"some bytes").await.expect("write");
        c_wr.flush().await.expect("flush");
        drop(c_wr); // FIN, no close_notify
        let mut got = Vec::new();
        let err = s_rd.read_to_end(&mut got).await.expect_err("a truncation");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        assert_eq!(got, b"some bytes");
    }

    #[tokio::test]
    async fn the_relay_paths_carry_frames_through_unix_sockets() {
        let p = pair();
        let (c, s) = ours(&p, Some(40)).await;
        let (_c_rd, mut c_wr) = c.into_split();
        let (mut s_rd, _s_wr) = s.into_split();
        // QEMU's side: a Unix pair on each end.
        let (mut qemu_src, relay_src) = UnixStream::pair().expect("pair");
        let (relay_dst, mut qemu_dst) = UnixStream::pair().expect("pair");
        let data = pattern(9 * 1024 * 1024 + 77, 6);
        let sent = data.clone();
        let feeder = tokio::spawn(async move {
            qemu_src.write_all(&sent).await.expect("feed");
            qemu_src.shutdown().await.expect("eof");
        });
        let count_up = AtomicU64::new(0);
        let count_down = AtomicU64::new(0);
        let up = async {
            let mut src = relay_src;
            c_wr.pump_frames_from(&mut src, &count_up)
                .await
                .expect("pump from");
            // The end-of-stream frame, as the tunnel writer sends it.
            c_wr.write_all(&[0u8; 4]).await.expect("eos");
            c_wr.shutdown().await.expect("close");
        };
        let down = async {
            let mut dst = relay_dst;
            let mut dec = FrameDecoder::new();
            s_rd.pump_frames_to(&mut dec, &mut dst, &count_down)
                .await
                .expect("pump to");
            assert!(dec.ended());
            dst.shutdown().await.expect("half-close");
        };
        let read = async {
            let mut got = Vec::new();
            qemu_dst.read_to_end(&mut got).await.expect("drain");
            got
        };
        let ((), (), got) = tokio::join!(up, down, read);
        feeder.await.expect("feeder");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the relay paths changed the bytes");
        assert_eq!(count_up.load(Ordering::Relaxed), data.len() as u64);
        assert_eq!(count_down.load(Ordering::Relaxed), data.len() as u64);
    }
}
