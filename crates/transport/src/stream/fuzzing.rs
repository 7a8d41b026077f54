//! The entry points of the `handshake` and `ws_frames` fuzz targets (`fuzz/`), not part of
//! the API: what a tunnel end reads of a peer's bytes, without a socket.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::recv_envelope;
use crate::error::Result;
use crate::protocol::MAX_FRAME;
use crate::ws::WS_HANDSHAKE_MESSAGE;
use crate::ws::{self, Event, Role, WsStream};

/// Reads envelopes from `data` the way a TCP or TLS tunnel connection reads its handshake,
/// at most `max`: each body, up to and including the error that ended the reading.
pub fn recv_bodies(data: &[u8], max: usize) -> Vec<Result<Vec<u8>>> {
    let mut reader = data;
    let mut bodies = Vec::new();
    while bodies.len() < max {
        let body = ready(recv_envelope(&mut reader));
        let end = body.is_err();
        bodies.push(body);
        if end {
            break;
        }
    }
    bodies
}

/// WebSocket handshake messages read before the data stream, at most.
const MAX_WS_MESSAGES: usize = 4;

/// Reads `data` as the frames a WebSocket peer sends after the upgrade, as a server (masked
/// frames expected) and as a client, and checks what the readers promise; panics if a promise
/// is broken:
///
/// - the parser finds the same messages, control frames and error whether `data` comes whole
///   or in pieces (of the size of its first byte), and never holds back a payload;
/// - the connection's reader hands out handshake messages no larger than the envelope limit,
///   and then a data stream no longer than the input.
pub fn ws_frames(data: &[u8]) {
    let handshake_limit = WS_HANDSHAKE_MESSAGE;
    for role in [Role::Server, Role::Client] {
        let whole = ws::events(role, &[data]);
        let step = usize::from(data.first().copied().unwrap_or(1)).max(1);
        let pieces: Vec<&[u8]> = data.chunks(step).collect();
        assert_eq!(ws::events(role, &pieces), whole, "{step} bytes at a time");
        for event in &whole {
            if let Event::Message(m) = event {
                assert!(m.len() <= MAX_FRAME, "a message of {} bytes", m.len());
            }
        }

        let mut stream = WsStream::new(SliceIo(data), role, Vec::new(), handshake_limit);
        for _ in 0..MAX_WS_MESSAGES {
            match ready(stream.recv_message()) {
                Ok(message) => assert!(message.len() <= handshake_limit),
                Err(_) => break,
            }
        }
        let (mut rd, _wr) = stream.split(tokio::io::split);
        let mut out = Vec::new();
        let _ = ready(rd.pump_to(&mut out, &AtomicU64::new(0)));
        assert!(out.len() <= data.len());
    }
}

/// A connection whose peer sent `data` and reads nothing: writes (pongs) go nowhere.
struct SliceIo<'a>(&'a [u8]);

impl AsyncRead for SliceIo<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SliceIo<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that cannot wait: the reader is a byte slice, always ready, and so is every
/// writer here.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("reading from a byte slice does not wait"),
    }
}

#[cfg(test)]
mod tests {
    use super::{recv_bodies, ws_frames};
    use crate::error::Error;
    use crate::protocol::{self, EnvelopeError, Hello, MAGIC};

    /// The fuzz target's seeds read as envelopes, and a length past the limit is refused
    /// before anything is allocated for it.
    #[test]
    fn seeds_read_and_the_length_limit_holds() {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/handshake/hello.bin");
        let bodies = recv_bodies(&std::fs::read(&seed).expect("seed"), 8);
        let hello: Hello =
            protocol::decode_body(bodies[0].as_ref().expect("an envelope")).expect("a hello");
        assert_eq!(hello.seq, 0);
        assert!(matches!(bodies[1], Err(Error::ConnectionLost(_))));

        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            recv_bodies(&huge, 8)[..],
            [Err(Error::Envelope(EnvelopeError::TooLarge(u32::MAX)))]
        ));
        assert_eq!(recv_bodies(b"", 8).len(), 1);
    }

    /// The `ws_frames` seeds run through every reader without breaking a promise.
    #[test]
    fn ws_seeds_read() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/ws_frames");
        let mut seeds = 0;
        for entry in std::fs::read_dir(&dir).expect("the ws_frames seeds") {
            let data = std::fs::read(entry.expect("a seed").path()).expect("a seed");
            ws_frames(&data);
            seeds += 1;
        }
        assert!(seeds >= 3, "only {seeds} seeds in {}", dir.display());
    }

    /// A few thousand mutations of the seeds (bytes flipped, cut short, spliced): a fuzzer's
    /// first minutes, on every `cargo test`.
    #[test]
    fn ws_seed_mutations_read() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/ws_frames");
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("the ws_frames seeds")
            .map(|e| std::fs::read(e.expect("a seed").path()).expect("a seed"))
            .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        for _ in 0..3000 {
            let mut data = seeds[next(seeds.len())].clone();
            for _ in 0..1 + next(4) {
                match next(4) {
                    0 if !data.is_empty() => {
                        let i = next(data.len());
                        data[i] ^= 1 << next(8);
                    }
                    1 if !data.is_empty() => {
                        let i = next(data.len());
                        data[i] = [0x00, 0x7e, 0x7f, 0x80, 0x88, 0x89, 0xff][next(7)];
                    }
                    2 => data.truncate(next(data.len() + 1)),
                    _ => {
                        let other = &seeds[next(seeds.len())];
                        let from = next(other.len());
                        let at = next(data.len() + 1);
                        data.splice(at..at, other[from..].iter().copied());
                    }
                }
            }
            ws_frames(&data);
        }
    }
}
