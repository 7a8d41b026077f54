//! [`TunnelStream`]: one tunnel connection, full duplex, over TCP or WebSocket, each with or
//! without TLS.
//!
//! Every transport carries the same thing: a handshake (see [`crate::protocol`]) and then two
//! independent byte streams, each ending with an explicit end-of-stream marker. The marker is
//! what lets the far side tell a finished stream (forward a half-close to QEMU) from a peer
//! that died or a network that dropped (tear everything down, never a clean EOF on a
//! truncated migration stream). On TCP (and inside TLS) the data is framed as a big-endian
//! `u32` length and that many bytes, a zero length marking the end; on WebSocket each binary
//! message is data and an empty binary message is the end (the framing is in `ws/`). From
//! protocol version 2 each side also acknowledges the peer's end before either calls the
//! connection complete ([`TunnelStream::finish`]), so that a direction cut after its end marker
//! left is a failure at both ends.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::error::{Error, Result};
use crate::frame::{self, Expect, FrameDecoder};
use crate::protocol::{self, EnvelopeError, MAX_FRAME};
use crate::tls::{TlsReader, TlsStream, TlsWriter, VectoredRead};
use crate::ws::{self, FrameError, RecvError, WsReader, WsStream, WsWriter};

#[doc(hidden)]
pub mod fuzzing;

/// How long a finished WebSocket connection of protocol version 1 waits for the peer's close
/// frame, which it does not require.
const WS_CLOSE_WAIT: Duration = Duration::from_secs(5);

/// How long a finished connection of protocol version 2 waits for the peer's acknowledgement
/// of its end of stream. The peer sends it once it has written all of our stream to its QEMU,
/// so this covers the last socket buffers' worth of a destination that reads slowly; a peer
/// that failed drops the connection, which ends the wait at once.
pub(crate) const END_ACK_WAIT: Duration = Duration::from_secs(60);

/// One established tunnel connection (after the TCP connect, TLS handshake or WebSocket
/// upgrade, before or after the tunnel handshake).
#[derive(Debug)]
pub enum TunnelStream {
    /// Plain TCP with length-prefixed frames: the only kind the direct data path hands to
    /// QEMU as it is.
    Tcp(TcpStream),
    /// TLS over TCP, the same frames inside. Never handed to QEMU, which would see ciphertext.
    Tls(Box<TlsStream>),
    /// WebSocket binary messages.
    Ws(Box<WsStream<TcpStream>>),
    /// WebSocket binary messages over TLS.
    Wss(Box<WsStream<TlsStream>>),
}

impl TunnelStream {
    /// Sends one handshake message.
    pub async fn send_msg<T: Serialize>(&mut self, msg: &T) -> Result<()> {
        self.send_body(&protocol::encode_body(msg)).await
    }

    /// Sends one handshake message given as its body (the JSON an authentication proof
    /// covers), in an envelope.
    pub async fn send_body(&mut self, body: &[u8]) -> Result<()> {
        let bytes = protocol::envelope(body);
        match self {
            TunnelStream::Tcp(s) => s.write_all(&bytes).await.map_err(Error::lost_or_io),
            TunnelStream::Tls(s) => write_flushed(s, &bytes).await,
            TunnelStream::Ws(ws) => ws.send_message(&bytes).await,
            TunnelStream::Wss(ws) => ws.send_message(&bytes).await,
        }
    }

    /// Receives one handshake message. Reads no further than the message's own bytes on TCP
    /// and TLS, so the data that follows stays in the socket; on WebSocket what follows stays
    /// in the connection's buffer.
    pub async fn recv_msg<T: DeserializeOwned>(&mut self) -> Result<T> {
        Ok(protocol::decode_body(&self.recv_body().await?)?)
    }

    /// Receives one handshake message's body, unparsed (checked against the envelope's
    /// magic and length limit only).
    pub async fn recv_body(&mut self) -> Result<Vec<u8>> {
        match self {
            TunnelStream::Tcp(s) => recv_envelope(s).await,
            TunnelStream::Tls(s) => recv_envelope(s).await,
            TunnelStream::Ws(ws) => recv_ws_envelope(ws).await,
            TunnelStream::Wss(ws) => recv_ws_envelope(ws).await,
        }
    }

    /// Receives one message's body as [`recv_body`](Self::recv_body) does, but cancel-safe,
    /// for a receive that races a timer (the control connection's heartbeats): on TCP and
    /// TLS the bytes read go into `buf` first, and what a cancelled receive had read stays
    /// there for the next call. Once used on a connection, every later receive on it must go
    /// through here with the same `buf`. WebSocket keeps partial messages itself.
    pub async fn recv_body_buffered(&mut self, buf: &mut Vec<u8>) -> Result<Vec<u8>> {
        loop {
            if buf.len() >= 12 {
                let mut header = [0u8; 12];
                header.copy_from_slice(&buf[..12]);
                let len = protocol::parse_header(&header)? as usize;
                if buf.len() >= 12 + len {
                    let body = buf[12..12 + len].to_vec();
                    buf.drain(..12 + len);
                    return Ok(body);
                }
            }
            let mut chunk = [0u8; 4096];
            // `read` is cancel-safe: bytes it returns are kept before the next await.
            let n = match self {
                TunnelStream::Tcp(s) => s.read(&mut chunk).await,
                TunnelStream::Tls(s) => s.read(&mut chunk).await,
                TunnelStream::Ws(_) | TunnelStream::Wss(_) => return self.recv_body().await,
            }
            .map_err(Error::lost_or_io)?;
            if n == 0 {
                return Err(Error::ConnectionLost(if buf.is_empty() {
                    "the peer closed the connection".into()
                } else {
                    "the peer closed in the middle of a message".into()
                }));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Ends a connection this side refused, after the `reject` that says why: TCP a FIN, TLS
    /// `close_notify` and FIN, WebSocket a close frame with status 1008 (policy violation)
    /// and `reason`. Then, for at most a second, it reads what the peer still sends, so that
    /// the answer is not destroyed by a reset (unread bytes at close make the kernel send
    /// one).
    pub async fn close_refused(&mut self, reason: &str) {
        match self {
            TunnelStream::Tcp(s) => linger(s).await,
            TunnelStream::Tls(s) => linger(&mut **s).await,
            TunnelStream::Ws(ws) => ws.close_with(ws::CLOSE_REFUSED, reason).await,
            TunnelStream::Wss(ws) => ws.close_with(ws::CLOSE_REFUSED, reason).await,
        }
    }

    /// Tells the connection the protocol version the handshake agreed on, before the split:
    /// from [`protocol::HEARTBEATS`] a WebSocket connection pings while quiet and drops a
    /// peer that stays silent for the dead-peer timeout. Other transports ignore it.
    pub fn set_version(&mut self, version: u32) {
        match self {
            TunnelStream::Tcp(_) | TunnelStream::Tls(_) => {}
            TunnelStream::Ws(ws) => ws.set_version(version),
            TunnelStream::Wss(ws) => ws.set_version(version),
        }
    }

    /// Splits the connection into its two directions, so both can run at once.
    pub fn into_split(self) -> (TunnelReader, TunnelWriter) {
        match self {
            TunnelStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (TunnelReader::Tcp(FrameReader::new(r)), TunnelWriter::Tcp(w))
            }
            TunnelStream::Tls(s) => {
                let (r, w) = s.into_split();
                (
                    TunnelReader::Tls(Box::new(FrameReader::new(r))),
                    TunnelWriter::Tls(Box::new(w)),
                )
            }
            TunnelStream::Ws(ws) => {
                let (r, w) = ws.split(TcpStream::into_split);
                (TunnelReader::Ws(r), TunnelWriter::Ws(w))
            }
            TunnelStream::Wss(ws) => {
                let (r, w) = ws.split(TlsStream::into_split);
                (
                    TunnelReader::Wss(Box::new(r)),
                    TunnelWriter::Wss(Box::new(w)),
                )
            }
        }
    }

    /// Ends a connection whose both directions finished (their end markers sent and
    /// received), as the negotiated protocol `version` says.
    ///
    /// From version 2 ([`protocol::ACKNOWLEDGED_END`]) this is where each side learns that the
    /// peer received its stream: on TCP and TLS each side sends a second empty frame (the
    /// acknowledgement), then its FIN (TLS: `close_notify` and FIN), and waits for the
    /// peer's; on WebSocket each side sends a close frame and waits for the peer's. A peer that
    /// closes without it, or sends none within [`END_ACK_WAIT`], lost some of our stream: an
    /// error. Version 1 peers send no acknowledgement on TCP and TLS, and their close frame
    /// is waited for (so that neither side resets a connection with it unread) but not
    /// required.
    pub async fn finish(reader: TunnelReader, writer: TunnelWriter, version: u32) -> Result<()> {
        let acked = version >= protocol::ACKNOWLEDGED_END;
        let wait = if acked { END_ACK_WAIT } else { WS_CLOSE_WAIT };
        match (reader, writer) {
            (TunnelReader::Tcp(mut rd), TunnelWriter::Tcp(mut wr)) => {
                frames_close(&mut rd, &mut wr, acked).await
            }
            (TunnelReader::Tls(mut rd), TunnelWriter::Tls(mut wr)) => {
                frames_close(&mut *rd, &mut *wr, acked).await
            }
            (TunnelReader::Ws(rd), TunnelWriter::Ws(wr)) => {
                let closed = ws::close(rd, wr, wait).await;
                if acked {
                    closed
                } else {
                    Ok(())
                }
            }
            (TunnelReader::Wss(rd), TunnelWriter::Wss(wr)) => {
                let closed = ws::close(*rd, *wr, wait).await;
                if acked {
                    closed
                } else {
                    Ok(())
                }
            }
            _ => Err(Error::Protocol(
                "the two directions of a connection belong to different transports".into(),
            )),
        }
    }
}

/// The end of a TCP or TLS connection after both end markers: in version 2 our
/// acknowledgement of the peer's end, then FIN (TLS: `close_notify`), then the peer's
/// acknowledgement of ours and its FIN.
async fn frames_close<R, W>(rd: &mut FrameReader<R>, wr: &mut W, acked: bool) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if !acked {
        return wr.shutdown().await.map_err(Error::lost_or_io);
    }
    rd.dec.expect_ack(true);
    wr.write_all(&[0u8; frame::HEADER])
        .await
        .map_err(Error::lost_or_io)?;
    wr.shutdown().await.map_err(Error::lost_or_io)?;
    match tokio::time::timeout(END_ACK_WAIT, rd.until_ack()).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(Error::ConnectionLost(format!(
                "the peer did not acknowledge the end of the stream within {}s",
                END_ACK_WAIT.as_secs()
            )))
        }
    }
    // Acknowledged: what follows can only be the end. Wait a moment for it, so that our
    // close does not reset a connection with bytes unread; its absence loses nothing.
    tokio::time::timeout(ws::REFUSAL_WAIT, rd.after_ack())
        .await
        .unwrap_or(Ok(()))
}

/// Shuts the write side down (TLS: `close_notify`), then reads and drops what the peer still
/// sends until it closes too, for at most [`ws::REFUSAL_WAIT`].
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let _ = tokio::time::timeout(ws::REFUSAL_WAIT, async {
        let _ = s.shutdown().await;
        let mut sink = [0u8; 4096];
        while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Writes all of `bytes` and flushes: TLS keeps what the socket did not take at once in its
/// own buffer until the next write or flush.
async fn write_flushed<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<()> {
    w.write_all(bytes).await.map_err(Error::lost_or_io)?;
    w.flush().await.map_err(Error::lost_or_io)
}

async fn recv_envelope<R: AsyncRead + Unpin>(s: &mut R) -> Result<Vec<u8>> {
    let mut header = [0u8; 12];
    read_exact_or_lost(s, &mut header, "before the handshake").await?;
    let len = protocol::parse_header(&header)?;
    let mut body = vec![0u8; len as usize];
    read_exact_or_lost(s, &mut body, "in the handshake").await?;
    Ok(body)
}

/// Receives one envelope as one binary message. A message this end refuses (text, above the
/// limit, broken framing) is answered with a close frame that says why, and the connection is
/// over.
async fn recv_ws_envelope<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WsStream<S>,
) -> Result<Vec<u8>> {
    let received = ws.recv_message().await;
    if let Err(RecvError::Frame(e)) = &received {
        ws.close_with(e.close_code(), &e.to_string()).await;
    }
    match received {
        Ok(message) => Ok(protocol::unwrap_envelope(&message)?.to_vec()),
        Err(RecvError::Frame(FrameError::Text)) => {
            Err(EnvelopeError::NotOurProtocol(protocol::Sniffed::WebSocketText).into())
        }
        Err(RecvError::Frame(e)) => Err(e.into()),
        Err(RecvError::Closed) => Err(Error::ConnectionLost(
            "closed before the handshake finished".into(),
        )),
        Err(RecvError::Io(e)) => Err(e),
    }
}

async fn read_exact_or_lost<R: AsyncRead + Unpin>(
    s: &mut R,
    buf: &mut [u8],
    when: &str,
) -> Result<()> {
    match s.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(Error::ConnectionLost(format!("the peer closed {when}")))
        }
        Err(e) => Err(Error::lost_or_io(e)),
    }
}

/// The receiving direction of a [`TunnelStream`].
#[derive(Debug)]
pub enum TunnelReader {
    /// TCP: length-prefixed frames.
    Tcp(FrameReader<OwnedReadHalf>),
    /// TLS: length-prefixed frames inside.
    Tls(Box<FrameReader<TlsReader>>),
    /// WebSocket: binary messages.
    Ws(WsReader<OwnedReadHalf>),
    /// WebSocket over TLS: binary messages.
    Wss(Box<WsReader<TlsReader>>),
}

/// Reads length-prefixed frames: the byte stream and the frame decoder's state.
#[derive(Debug)]
pub struct FrameReader<R> {
    rd: R,
    dec: FrameDecoder,
}

impl TunnelReader {
    /// Tells a TCP or TLS reader whether an acknowledgement follows the peer's end marker
    /// (protocol version 2, [`protocol::ACKNOWLEDGED_END`]), so that it takes one that arrives
    /// together with the end for what it is. WebSocket acknowledges with its close frame.
    pub fn expect_acknowledged_end(&mut self, version: u32) {
        let yes = version >= protocol::ACKNOWLEDGED_END;
        match self {
            TunnelReader::Tcp(r) => r.dec.expect_ack(yes),
            TunnelReader::Tls(r) => r.dec.expect_ack(yes),
            TunnelReader::Ws(_) | TunnelReader::Wss(_) => {}
        }
    }

    /// Reads the next bytes into `buf`; `Ok(0)` means the peer ended the stream cleanly.
    /// A connection that ends without the end marker is [`Error::ConnectionLost`].
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match self {
            TunnelReader::Tcp(r) => r.read(buf).await,
            TunnelReader::Tls(r) => r.read(buf).await,
            TunnelReader::Ws(r) => r.read(buf).await,
            TunnelReader::Wss(r) => r.read(buf).await,
        }
    }

    /// Copies everything the peer sends into `w` until its end marker, then shuts `w`'s write
    /// side down (the half-close). `count` is bumped as bytes go, so a caller sees the
    /// progress of a stream that fails half-way.
    pub async fn pump_to<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        count: &AtomicU64,
    ) -> Result<()> {
        match self {
            TunnelReader::Tcp(r) => r.pump_to(w, count).await?,
            TunnelReader::Tls(r) => r.rd.pump_frames_to(&mut r.dec, w, count).await?,
            TunnelReader::Ws(r) => r.pump_to(w, count).await?,
            TunnelReader::Wss(r) => r.pump_to(w, count).await?,
        }
        w.shutdown().await.map_err(Error::lost_or_io)
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R) -> Self {
        FrameReader {
            rd,
            dec: FrameDecoder::new(),
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            if self.dec.ended() {
                return Ok(0);
            }
            match self.dec.expect() {
                Expect::End => return Ok(0),
                Expect::Payload { left } => {
                    let want = left.min(buf.len());
                    let n = self
                        .rd
                        .read(&mut buf[..want])
                        .await
                        .map_err(Error::lost_or_io)?;
                    if n == 0 {
                        return Err(Error::ConnectionLost("the peer closed mid-frame".into()));
                    }
                    self.dec.payload(n);
                    return Ok(n);
                }
                Expect::Header { missing } => {
                    let mut header = [0u8; frame::HEADER];
                    match self.rd.read_exact(&mut header[..missing]).await {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            return Err(Error::ConnectionLost(
                                "the peer closed without ending the stream".into(),
                            ))
                        }
                        Err(e) => return Err(Error::lost_or_io(e)),
                    }
                    self.dec.header(&header[..missing])?;
                }
            }
        }
    }

    /// After the peer's end marker: its acknowledgement of ours (unless it came with the end).
    async fn until_ack(&mut self) -> Result<()> {
        while let Expect::Header { missing } = self.dec.expect() {
            let mut header = [0u8; frame::HEADER];
            match self.rd.read_exact(&mut header[..missing]).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(Error::ConnectionLost(
                        "the peer closed without acknowledging the end of the stream".into(),
                    ))
                }
                Err(e) => return Err(Error::lost_or_io(e)),
            }
            self.dec.header(&header[..missing])?;
        }
        if !self.dec.acked() {
            return Err(crate::frame::DecodeError::AfterEnd.into());
        }
        Ok(())
    }

    /// After the acknowledgement: the end of the connection (TLS: `close_notify`). More
    /// bytes break the protocol; a connection that ends otherwise loses nothing.
    async fn after_ack(&mut self) -> Result<()> {
        let mut byte = [0u8; 1];
        match self.rd.read(&mut byte).await {
            Ok(n) if n > 0 => Err(crate::frame::DecodeError::AfterEnd.into()),
            _ => Ok(()),
        }
    }

    async fn pump_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W, count: &AtomicU64) -> Result<()> {
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            // TLS hands out one record (at most 16 KiB) per read. Collecting a frame's
            // records before writing them on measured worse (more CPU per GB) than writing
            // each at once, and so did a read buffer under rustls (which reads 4 KiB at a
            // time): the copies cost more than the system calls they save.
            let n = self.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            w.write_all(&buf[..n]).await.map_err(Error::lost_or_io)?;
            count.fetch_add(n as u64, Relaxed);
        }
    }
}

/// The sending direction of a [`TunnelStream`].
#[derive(Debug)]
pub enum TunnelWriter {
    /// TCP: length-prefixed frames.
    Tcp(OwnedWriteHalf),
    /// TLS: length-prefixed frames inside.
    Tls(Box<TlsWriter>),
    /// WebSocket: binary messages.
    Ws(WsWriter<OwnedWriteHalf>),
    /// WebSocket over TLS: binary messages.
    Wss(Box<WsWriter<TlsWriter>>),
}

impl TunnelWriter {
    /// Sends all of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<()> {
        match self {
            TunnelWriter::Tcp(w) => frames_write_all(w, data, false).await,
            TunnelWriter::Tls(w) => frames_write_all(&mut **w, data, true).await,
            TunnelWriter::Ws(w) => w.write_all(data).await,
            TunnelWriter::Wss(w) => w.write_all(data).await,
        }
    }

    /// Ends this direction: the end marker. The FIN (TLS: `close_notify` and FIN) waits for
    /// [`TunnelStream::finish`], which in protocol version 2 sends an acknowledgement first.
    /// The other direction stays open.
    pub async fn finish(&mut self) -> Result<()> {
        match self {
            TunnelWriter::Tcp(w) => frames_finish(w).await,
            TunnelWriter::Tls(w) => frames_finish(&mut **w).await,
            TunnelWriter::Ws(w) => w.finish().await,
            TunnelWriter::Wss(w) => w.finish().await,
        }
    }

    /// After a failed connection, tells the peer why where the transport has a way to: TLS
    /// sends the alert its reader owes (`bad_record_mac` for a record that did not decrypt,
    /// ...), WebSocket a close frame with the status for a frame this side refused (1003 a
    /// text message, 1009 one above the limit, 1002 a broken frame). Bounded by a second;
    /// anything else just drops the connection, as before.
    pub async fn abort(&mut self, why: &Error) {
        let _ = tokio::time::timeout(ws::REFUSAL_WAIT, async {
            match (self, why) {
                (TunnelWriter::Tls(w), _) => {
                    let _ = w.send_owed_alert().await;
                }
                (TunnelWriter::Wss(w), _) if w.io.owes_alert() => {
                    let _ = w.io.send_owed_alert().await;
                }
                (TunnelWriter::Ws(w), Error::WebSocket(e)) => {
                    let _ = w.close_with(e.close_code(), &e.to_string()).await;
                }
                (TunnelWriter::Wss(w), Error::WebSocket(e)) => {
                    let _ = w.close_with(e.close_code(), &e.to_string()).await;
                }
                _ => {}
            }
        })
        .await;
    }

    /// Copies everything from `r` to the peer until `r` ends, then sends the end marker.
    /// `count` is bumped as bytes go.
    pub async fn pump_from<R: VectoredRead>(&mut self, r: &mut R, count: &AtomicU64) -> Result<()> {
        match self {
            TunnelWriter::Tcp(w) => frames_pump_from(w, r, count).await?,
            TunnelWriter::Tls(w) => w.pump_frames_from(r, count).await?,
            TunnelWriter::Ws(w) => w.pump_from(r, count).await?,
            TunnelWriter::Wss(w) => w.pump_from(r, count).await?,
        }
        self.finish().await
    }
}

async fn frames_write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    data: &[u8],
    flush: bool,
) -> Result<()> {
    for chunk in data.chunks(MAX_FRAME) {
        w.write_all(&(chunk.len() as u32).to_be_bytes())
            .await
            .map_err(Error::lost_or_io)?;
        w.write_all(chunk).await.map_err(Error::lost_or_io)?;
    }
    if flush {
        w.flush().await.map_err(Error::lost_or_io)?;
    }
    Ok(())
}

async fn frames_finish<W: AsyncWrite + Unpin>(w: &mut W) -> Result<()> {
    w.write_all(&[0u8; frame::HEADER])
        .await
        .map_err(Error::lost_or_io)?;
    w.flush().await.map_err(Error::lost_or_io)
}

async fn frames_pump_from<W: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    w: &mut W,
    r: &mut R,
    count: &AtomicU64,
) -> Result<()> {
    // Read behind a 4-byte gap so header and payload leave in one write.
    let mut buf = vec![0u8; 4 + MAX_FRAME];
    loop {
        let n = r.read(&mut buf[4..]).await.map_err(Error::lost_or_io)?;
        if n == 0 {
            return Ok(());
        }
        buf[..4].copy_from_slice(&(n as u32).to_be_bytes());
        w.write_all(&buf[..4 + n])
            .await
            .map_err(Error::lost_or_io)?;
        count.fetch_add(n as u64, Relaxed);
    }
}
