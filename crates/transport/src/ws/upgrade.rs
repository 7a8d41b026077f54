//! The WebSocket upgrade: tungstenite runs the HTTP exchange, on a stream that hands it the
//! bytes of the HTTP message and not one byte more; the frames after it are ours.
//!
//! tungstenite reads in 4 KiB chunks and keeps whatever came after the HTTP message in its
//! own buffer, for its own frame reader; `WebSocketStream::into_inner` would drop those bytes
//! (the peer's first frames, if it sent them at once). We take the raw stream back after the
//! upgrade and read the frames ourselves (`frame.rs`), so the bytes after the header stay here,
//! whatever the timing, and [`Upgrade::into_parts`] returns them with the stream.
//!
//! One exception: a client whose server answered with anything but `101` hands tungstenite
//! everything it read, as tungstenite alone would, so that the body of the refusal (a TLS
//! server tells a `ws://` client to use `wss://` that way) reaches the error message. That
//! connection is never used for frames.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Role, WsStream};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::protocol::{MAX_FRAME, MAX_HANDSHAKE_LEN};
use crate::tls::TlsFailure;

/// Bytes of the start of the HTTP message kept to read the status code: `HTTP/1.1 101`.
const HEAD: usize = 12;

/// `io` during the upgrade; see the module documentation.
#[derive(Debug)]
pub(crate) struct Upgrade<S> {
    io: S,
    /// Reading a server's response (else a client's request).
    client: bool,
    head: [u8; HEAD],
    head_len: usize,
    /// How much of a header end (`\n`, `\r`?, `\n`) the last bytes were.
    scan: Scan,
    /// The header has ended.
    done: bool,
    /// The header has ended and was not a `101`: reads go straight through.
    passthrough: bool,
    /// What arrived after the header.
    after: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Line,
    Lf,
    LfCr,
}

impl Scan {
    /// The state after `b`, or `None` when `b` ended the header: a line end followed by an
    /// empty line. httparse takes `\n` as well as `\r\n` as a line end, so `\n\n` and
    /// `\n\r\n` both end a header, and whichever comes first is where httparse stops too.
    fn step(self, b: u8) -> Option<Scan> {
        match (self, b) {
            (Scan::Lf | Scan::LfCr, b'\n') => None,
            (Scan::Lf, b'\r') => Some(Scan::LfCr),
            (_, b'\n') => Some(Scan::Lf),
            _ => Some(Scan::Line),
        }
    }
}

impl<S> Upgrade<S> {
    /// Wraps `io` for the upgrade; `client` when it reads the server's response.
    pub(crate) fn new(io: S, client: bool) -> Self {
        Upgrade {
            io,
            client,
            head: [0; HEAD],
            head_len: 0,
            scan: Scan::Line,
            done: false,
            passthrough: false,
            after: Vec::new(),
        }
    }

    /// The stream and the bytes that arrived after the HTTP message, once the upgrade
    /// succeeded. An error if tungstenite finished without the whole header passing through
    /// here, which would mean bytes lost: it cannot happen with tungstenite's parser (which
    /// stops at the same empty line), and is checked rather than assumed.
    pub(crate) fn into_parts(self) -> Result<(S, Vec<u8>)> {
        if !self.done || self.passthrough {
            return Err(Error::Protocol(
                "the WebSocket upgrade finished at another point than the end of its HTTP \
                 header"
                    .into(),
            ));
        }
        Ok((self.io, self.after))
    }

    /// Whether the response's status line says `101 Switching Protocols`.
    fn switching(&self) -> bool {
        let head = &self.head[..self.head_len];
        head.len() == HEAD && head.starts_with(b"HTTP/") && head[8] == b' ' && &head[9..] == b"101"
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Upgrade<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.passthrough {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.done {
            // The HTTP message is over: anything more is frames, which are not
            // tungstenite's to read.
            return Poll::Ready(Err(io::Error::other(
                "the WebSocket upgrade read past its HTTP message",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        let mut end = None;
        for (i, &b) in new.iter().enumerate() {
            if this.head_len < HEAD {
                this.head[this.head_len] = b;
                this.head_len += 1;
            }
            match this.scan.step(b) {
                Some(next) => this.scan = next,
                None => {
                    end = Some(i + 1);
                    break;
                }
            }
        }
        if let Some(end) = end {
            this.done = true;
            if this.client && !this.switching() {
                this.passthrough = true;
            } else {
                this.after = new[end..].to_vec();
                buf.set_filled(before + end);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Upgrade<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// tungstenite's settings. It only runs the HTTP upgrade: the frames after it are ours
/// (`frame.rs`), so its read buffer is never used beyond the `WebSocket` it builds and we take
/// apart at once; the limits are the ones our reader enforces.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

/// Largest WebSocket message before the split: one handshake envelope (12-byte header and
/// body), refused from its frame header when larger.
pub(crate) const WS_HANDSHAKE_MESSAGE: usize = 12 + MAX_HANDSHAKE_LEN as usize;

/// The client's upgrade: tungstenite sends the request and checks the response, then the
/// stream (with any bytes that came after the response) is ours.
pub(crate) async fn ws_connect<S>(to: &Endpoint, io: S) -> Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (ws, _response) = tokio_tungstenite::client_async_with_config(
        to.to_string(),
        Upgrade::new(io, true),
        Some(ws_config()),
    )
    .await
    .map_err(ws_handshake_error)?;
    let (io, after) = ws.into_inner().into_parts()?;
    Ok(WsStream::new(io, Role::Client, after, WS_HANDSHAKE_MESSAGE))
}

/// The server's upgrade, likewise.
pub(crate) async fn ws_accept<S>(io: S) -> Result<WsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The callback's error type is tungstenite's HTTP response, large by its design.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| {
        tracing::debug!(path = %req.uri().path(), "WebSocket upgrade");
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        Upgrade::new(io, false),
        check,
        Some(ws_config()),
    )
    .await
    .map_err(ws_handshake_error)?;
    let (io, after) = ws.into_inner().into_parts()?;
    Ok(WsStream::new(io, Role::Server, after, WS_HANDSHAKE_MESSAGE))
}

/// A failed upgrade. A server's explanation in the body of its HTTP refusal is kept (a TLS
/// server tells a ws:// client to use wss:// that way), and TLS failures underneath keep
/// their own words.
fn ws_handshake_error(e: tokio_tungstenite::tungstenite::Error) -> Error {
    use tokio_tungstenite::tungstenite::Error as W;
    match e {
        W::Http(resp) => {
            let body = resp
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                .filter(|b| !b.is_empty() && b.len() < 1024);
            match body {
                Some(body) => Error::WebSocketRefused {
                    status: resp.status().to_string(),
                    message: body,
                },
                None => Error::WebSocketHandshake(Box::new(W::Http(resp))),
            }
        }
        W::Io(io) => match TlsFailure::in_io(&io) {
            Some(failure) => Error::Tls(failure.clone()),
            None => Error::WebSocketHandshake(Box::new(W::Io(io))),
        },
        other => Error::WebSocketHandshake(Box::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

    use super::Upgrade;

    /// A peer whose bytes arrive at most `step` at a time.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self.step.min(self.data.len()).min(buf.remaining());
            buf.put_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Poll::Ready(Ok(()))
        }
    }

    /// Reads as tungstenite does (4 KiB at a time until the header is in what it got) from a
    /// peer that sends `all` `step` bytes at a time: what tungstenite got, what was kept for
    /// the frames, and what is still unread.
    async fn run(client: bool, all: &[u8], step: usize, until: &[u8]) -> [Vec<u8>; 3] {
        let mut up = Upgrade::new(Trickle { data: all, step }, client);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.windows(until.len()).any(|w| w == until) {
            let n = up.read(&mut chunk).await.expect("read");
            assert!(n > 0, "EOF before the header ended: {got:?}");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(up.read(&mut chunk).await.is_err(), "a read past the header");
        let (rest, after) = up.into_parts().expect("parts");
        [got, after, rest.data.to_vec()]
    }

    #[tokio::test]
    async fn the_header_passes_and_the_frames_stay() {
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let frames = b"\x82\x03abc\x82\x00";
        let all = [&resp[..], frames].concat();
        for step in [1, 2, 3, 7, resp.len() - 1, resp.len(), 4096] {
            let [got, after, unread] = run(true, &all, step, b"\r\n\r\n").await;
            assert_eq!(got, resp, "step {step}");
            assert_eq!([after, unread].concat(), frames, "step {step}");
        }
        let req = b"GET / HTTP/1.1\nHost: x\n\n";
        let all = [&req[..], frames].concat();
        let [got, after, _] = run(false, &all, 4096, b"\n\n").await;
        assert_eq!(got, req);
        assert_eq!(after, frames);
    }

    #[tokio::test]
    async fn a_refusal_keeps_its_body() {
        let resp = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 4\r\n\r\nno!\n";
        let mut up = Upgrade::new(&resp[..], true);
        let mut got = Vec::new();
        up.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, resp);
        assert!(up.into_parts().is_err(), "a refused upgrade has no stream");
    }
}
