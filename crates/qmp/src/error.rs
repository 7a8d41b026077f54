//! The one error type of this crate.

use std::io;
use std::time::Duration;

/// Everything that can go wrong talking QMP.
///
/// Connect-time failures ([`Error::Io`], [`Error::Busy`], [`Error::Greeting`]) mean the QEMU
/// could not be reached ([`Error::is_unreachable`]); the others happen on a live connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the QMP socket failed (missing socket, refused, connect timeout).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, naming the socket, e.g. `connecting to QMP socket /run/x.qmp`.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The socket accepted the connection but QEMU sent no greeting in time: QMP serves one
    /// client at a time and QEMU greets a second client only when the first leaves.
    #[error(
        "QMP socket busy: {target} sent no greeting within {after:?} (is another client, e.g. \
         libvirt or a script, connected? QMP serves one client at a time)"
    )]
    Busy {
        /// The socket path or `host:port`.
        target: String,
        /// How long we waited for the greeting.
        after: Duration,
    },
    /// The peer's greeting or capability negotiation was not what QMP specifies.
    #[error("QMP handshake failed: {0}")]
    Greeting(String),
    /// QEMU refused a command and said why.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp {
        /// The command's QMP name.
        command: String,
        /// QEMU's error class, e.g. `GenericError` or `CommandNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The connection ended (QEMU exited, the socket closed, or [`crate::Qmp::close`] was called).
    #[error("QMP connection closed")]
    Disconnected,
    /// No reply arrived in time. The connection stays usable; a late reply is dropped.
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout {
        /// The command's QMP name.
        command: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The peer broke the protocol (malformed JSON, an error without `id`, a line over the
    /// size limit). Fatal for the connection: every pending and later call fails.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The reply arrived but does not have the shape of the command's reply type. Only this one
    /// call fails; use [`crate::Qmp::execute_raw`] to see the raw reply.
    #[error("cannot decode the reply to {command}: {source}")]
    Decode {
        /// The command's QMP name.
        command: String,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
    /// The command's arguments could not be turned into a JSON object.
    #[error("invalid QMP arguments: {0}")]
    InvalidArguments(String),
}

impl Error {
    /// True when the QEMU could not be reached at all (connect-time I/O error, busy socket, bad
    /// greeting): the CLI maps this to its "unreachable" exit code.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::Busy { .. } | Error::Greeting(_)
        )
    }
}
