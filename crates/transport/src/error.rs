//! The transport crate's one error type, built from the errors of the leaf modules (frames,
//! envelopes, TLS settings and handshakes, authentication), which know nothing of it. The
//! messages say what went wrong; which of a front end's options fixes it is the front end's
//! to say.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::AuthFailure;
use crate::frame::DecodeError;
use crate::protocol::{EnvelopeError, RejectReason};
use crate::tls::config::TlsError;
use crate::tls::diagnose::TlsFailure;
use crate::ws::frame::FrameError;

/// Everything that can go wrong while setting up or carrying a tunnel connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tunnel address could not be parsed.
    #[error("invalid tunnel address {addr:?}: {why}")]
    InvalidAddress {
        /// What the operator wrote.
        addr: String,
        /// What is wrong with it.
        why: String,
    },
    /// Listening on a TCP address failed (in use, not ours to bind, ...).
    #[error("cannot listen on {addr}: {source}{}", bind_hint(source))]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why the kernel refused.
        source: io::Error,
    },
    /// The client's Unix socket could not be set up.
    #[error("cannot listen on Unix socket {}: {why}", path.display())]
    UnixSocket {
        /// The socket path.
        path: PathBuf,
        /// What is wrong.
        why: UnixSocketFailure,
    },
    /// The tunnel server could not be reached.
    #[error("cannot reach the tunnel server at {url}: {source} (is `qmigrate tunnel-server` running there, and is the port open?)")]
    Connect {
        /// The server URL.
        url: String,
        /// The connect error.
        source: io::Error,
    },
    /// The WebSocket upgrade failed (wrong path, not a WebSocket server, proxy refused, ...).
    #[error("WebSocket handshake failed: {0}")]
    WebSocketHandshake(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The server answered the WebSocket upgrade with an HTTP error and an explanation.
    #[error("the server refused the WebSocket upgrade ({status}): {message}")]
    WebSocketRefused {
        /// The HTTP status.
        status: String,
        /// The body of the server's answer.
        message: String,
    },
    /// The peer broke the WebSocket framing after the upgrade (a frame above the limit, an
    /// unmasked client frame, reserved bits, ...): not a WebSocket peer we can talk to.
    #[error("WebSocket protocol violation: the peer sent {0}")]
    WebSocket(#[from] FrameError),
    /// TLS settings that cannot be used (unreadable files, a key that does not match, a TLS
    /// address without settings).
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    /// The TLS handshake failed (this side or the peer refused a certificate, the peer does
    /// not speak TLS, ...), or the peer ended the TLS session with an alert.
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    /// The peer sent a handshake that is not ours or is malformed.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The peer broke the data framing of an established tunnel connection.
    #[error("tunnel protocol violation: {0}")]
    Protocol(String),
    /// The peer broke the length-prefixed data framing of a `tcp://` or `tls://` connection.
    #[error("tunnel protocol violation: {0}")]
    Frame(#[from] DecodeError),
    /// The server refused this connection.
    #[error("the tunnel server ({software}) refused the connection ({reason}): {message}")]
    Rejected {
        /// Why, as a code.
        reason: RejectReason,
        /// The server's explanation.
        message: String,
        /// The server's software and version.
        software: String,
    },
    /// Authentication failed on the client's side: the server asked for a token this client
    /// does not have, or could not prove that it knows the token.
    #[error("authentication failed: {0}")]
    Auth(AuthFailure),
    /// A server was asked to listen beyond the loopback interface without a token or TLS
    /// client certificates.
    #[error("refusing to listen on {addr} without authentication: anyone who can reach it could write a migration stream into the destination VM, and run code there")]
    Unauthenticated {
        /// The address asked for.
        addr: String,
    },
    /// The destination migration socket could not be connected (in time).
    #[error("destination migration socket {}: {why} (is the destination QEMU started with `-incoming defer`, and told to listen there?)", path.display())]
    Destination {
        /// The socket path.
        path: PathBuf,
        /// What happened, including how long the server kept retrying.
        why: DestinationFailure,
    },
    /// A step took longer than allowed.
    #[error("timed out after {}s {what}", after.as_secs_f32())]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The tunnel connection ended without the peer's end-of-stream marker: the other side
    /// died, was killed, or the network dropped. The stream is truncated.
    #[error("the tunnel connection was lost before the end of the stream ({0})")]
    ConnectionLost(String),
    /// Any other I/O error on a socket.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// An I/O error, classified as a lost connection when it is one.
    pub(crate) fn lost_or_io(e: io::Error) -> Self {
        use io::ErrorKind::*;
        if let Some(failure) = TlsFailure::in_io(&e) {
            return Error::Tls(failure.clone());
        }
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                Error::ConnectionLost(e.to_string())
            }
            _ => Error::Io(e),
        }
    }
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::AddrInUse => " (another process listens there)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root)",
        io::ErrorKind::AddrNotAvailable => " (that IP address is not on this host)",
        _ => "",
    }
}

/// Why the client's Unix socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketFailure {
    /// A live socket is there: another client listens on it.
    #[error("another process is listening on it (a tunnel-client already running?)")]
    InUse,
    /// A stale socket is there and could not be removed.
    #[error("cannot remove the stale socket: {0}")]
    RemoveStale(io::Error),
    /// Something that is not a socket is there.
    #[error("the path exists and is not a socket; refusing to replace it")]
    NotASocket,
    /// The socket's directory does not exist.
    #[error("its directory does not exist")]
    NoDirectory,
    /// The socket could not be made private to its owner.
    #[error("cannot make it private (chmod 600): {0}")]
    Chmod(io::Error),
    /// Looking at the path or binding the socket failed otherwise.
    #[error("{0}")]
    Io(io::Error),
}

/// Why the destination migration socket could not be connected.
#[derive(Debug, thiserror::Error)]
pub enum DestinationFailure {
    /// The socket did not exist until the deadline.
    #[error("did not appear within {}s", .0.as_secs())]
    NeverAppeared(Duration),
    /// The socket existed but refused connections until the deadline.
    #[error("nobody listened on it within {}s", .0.as_secs())]
    NobodyListened(Duration),
    /// Connecting failed otherwise (permissions, not a socket, ...).
    #[error("cannot connect: {0}")]
    Connect(io::Error),
}

/// This crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
