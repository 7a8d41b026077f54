//! What a [`Server`](crate::Server) tells an observer about its connections, as typed events:
//! a front end counts them (the CLI's Prometheus metrics) without this crate knowing how.
//!
//! Events carry no token, no path and no guest data: the transport, a direction and a byte
//! count, or why a handshake was refused.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;

use crate::endpoint::Scheme;
use crate::error::{Error, Result};
use crate::relay::{relay_counted, RelayStats};
use crate::stream::TunnelStream;

/// Receives a server's [`ServerEvent`]s. Called on the connection's task: keep it quick and
/// never block (count, do not do I/O).
pub trait ServerObserver: Send + Sync + fmt::Debug + 'static {
    /// One event.
    fn event(&self, event: ServerEvent);
}

/// Something that happened to one of a server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A TCP connection was accepted (before its handshake).
    Opened {
        /// The server's transport.
        transport: Scheme,
    },
    /// A connection ended, whatever happened to it (each `Opened` has one).
    Closed {
        /// The server's transport.
        transport: Scheme,
    },
    /// Bytes relayed since the last such event of this connection (reported about once a
    /// second while the connection relays, and at its end). Connections that take the direct
    /// data path relay nothing: QEMU has the socket.
    Relayed {
        /// The server's transport.
        transport: Scheme,
        /// Which way.
        direction: Direction,
        /// How many bytes.
        bytes: u64,
    },
    /// A connection was refused before it was trusted.
    Refused {
        /// Why.
        reason: Refusal,
    },
}

/// Which way relayed bytes went, seen from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Received from the tunnel, written to the destination socket (the migration stream).
    Received,
    /// Read from the destination socket, sent into the tunnel (QEMU's return path).
    Sent,
}

impl Direction {
    /// A short lower-case name (`received`, `sent`).
    pub fn name(self) -> &'static str {
        match self {
            Direction::Received => "received",
            Direction::Sent => "sent",
        }
    }
}

/// Why a server refused a connection during its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The server requires a token and the client has none.
    NoToken,
    /// The client's proof does not match the server's token (or was replayed).
    WrongToken,
    /// The client has a token and the server none.
    UnexpectedToken,
    /// The TLS handshake failed (a plain client at a TLS server, a refused certificate, ...).
    Tls,
    /// The peer sent something that is not this protocol (HTTP, SSH, a QEMU stream, bad
    /// framing or JSON).
    Garbage,
    /// No finished handshake within the handshake timeout.
    Timeout,
    /// Dropped as the oldest while too many connections were in their handshake.
    Flood,
    /// The peer closed the connection (or it failed) before its handshake was complete.
    Closed,
    /// No protocol version in common.
    Version,
}

impl Refusal {
    /// A short snake_case name, for a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::NoToken => "no_token",
            Refusal::WrongToken => "wrong_token",
            Refusal::UnexpectedToken => "unexpected_token",
            Refusal::Tls => "tls",
            Refusal::Garbage => "garbage",
            Refusal::Timeout => "timeout",
            Refusal::Flood => "flood",
            Refusal::Closed => "closed",
            Refusal::Version => "version",
        }
    }

    /// Every reason, for a front end that lists them all (with zeros).
    pub const ALL: [Refusal; 9] = [
        Refusal::NoToken,
        Refusal::WrongToken,
        Refusal::UnexpectedToken,
        Refusal::Tls,
        Refusal::Garbage,
        Refusal::Timeout,
        Refusal::Flood,
        Refusal::Closed,
        Refusal::Version,
    ];

    /// The reason for an error that ended a handshake.
    pub(crate) fn of(error: &Error) -> Refusal {
        match error {
            Error::Tls(_) | Error::TlsSetup(_) => Refusal::Tls,
            Error::Envelope(_)
            | Error::Frame(_)
            | Error::WebSocket(_)
            | Error::WebSocketHandshake(_)
            | Error::WebSocketRefused { .. }
            | Error::Protocol(_) => Refusal::Garbage,
            _ => Refusal::Closed,
        }
    }
}

/// An optional observer and the server's transport: what the server's code calls.
#[derive(Debug, Clone)]
pub(crate) struct Hook {
    pub(crate) observer: Option<Arc<dyn ServerObserver>>,
    pub(crate) transport: Scheme,
}

impl Hook {
    pub(crate) fn emit(&self, event: ServerEvent) {
        if let Some(observer) = &self.observer {
            observer.event(event);
        }
    }

    pub(crate) fn opened(&self) {
        self.emit(ServerEvent::Opened {
            transport: self.transport,
        });
    }

    pub(crate) fn closed(&self) {
        self.emit(ServerEvent::Closed {
            transport: self.transport,
        });
    }

    pub(crate) fn refused(&self, reason: Refusal) {
        self.emit(ServerEvent::Refused { reason });
    }

    /// [`relay`](crate::relay()) that reports its bytes as it goes.
    pub(crate) async fn relay(
        &self,
        unix: UnixStream,
        tunnel: TunnelStream,
        version: u32,
    ) -> (RelayStats, Result<()>) {
        let Some(_) = &self.observer else {
            return crate::relay::relay(unix, tunnel, version).await;
        };
        let counts = [AtomicU64::new(0), AtomicU64::new(0)];
        let mut reported = [0u64; 2];
        let report = |reported: &mut [u64; 2]| {
            for (i, direction) in [Direction::Received, Direction::Sent]
                .into_iter()
                .enumerate()
            {
                let now = counts[i].load(Relaxed);
                if now > reported[i] {
                    self.emit(ServerEvent::Relayed {
                        transport: self.transport,
                        direction,
                        bytes: now - reported[i],
                    });
                    reported[i] = now;
                }
            }
        };
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let mut relay =
            std::pin::pin!(relay_counted(unix, tunnel, version, &counts[1], &counts[0]));
        let out = loop {
            tokio::select! {
                out = &mut relay => break out,
                _ = ticks.tick() => report(&mut reported),
            }
        };
        report(&mut reported);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_errors_have_reasons() {
        use crate::protocol::EnvelopeError;
        use crate::sniff::Sniffed;
        let garbage = Error::Envelope(EnvelopeError::NotOurProtocol(Sniffed::Http));
        assert_eq!(Refusal::of(&garbage), Refusal::Garbage);
        let eof = Error::Io(std::io::ErrorKind::UnexpectedEof.into());
        assert_eq!(Refusal::of(&eof), Refusal::Closed);
        let names: std::collections::HashSet<&str> =
            Refusal::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), Refusal::ALL.len(), "names are distinct");
    }
}
