//! The tunnel that carries QEMU migration streams between hosts.
//!
//! QEMU migrates over a Unix socket on each host; this crate joins the two. A [`Client`] on
//! the source accepts each connection QEMU opens and carries it over one tunnel connection
//! (TCP or WebSocket, either with TLS, see [`Transport`]) to a [`Server`] on the destination, which connects
//! it to the destination QEMU's socket. Every QEMU connection stays its own tunnel
//! connection, in order, full duplex, with half-close forwarded and any failure turned into
//! a torn-down pair rather than a silently truncated stream. The handshake that opens each
//! tunnel connection is in [`protocol`]; with a [`Token`] on both ends it also proves, both
//! ways, that each end knows the token ([`auth`]). Over TLS ([`tls`]) the client checks the
//! server's certificate against a CA or a pinned fingerprint, and a server may require client
//! certificates. `docs/PROTOCOL.md` describes the wire format.
//!
//! # Layout
//!
//! - `protocol`, `auth`: the handshake's messages and the token's proofs.
//! - `frame`: the length-prefixed data framing of `tcp://` and `tls://`, without I/O.
//! - `sniff`: what a peer speaks when it is not this protocol, and how a TLS server refuses a
//!   plain client.
//! - `ws/`: WebSocket (the upgrade, RFC 6455 frames, the two directions); `tls/`: settings,
//!   verifiers, handshake diagnosis, the record layer.
//! - `transport`, `stream`: connecting and accepting per scheme, and one tunnel connection
//!   whatever it runs on; `relay`, `report`: copying and counting.
//! - `client`, `server`: the two ends; `observe`: the typed events a server reports to an
//!   observer (a front end's metrics).
//! - `error`: [`Error`], built from the leaf modules' errors. Error messages say what went wrong,
//!   never which command-line flag fixes it: that is the front end's to add.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qmigrate_transport::Error> {
//! use qmigrate_transport::{Endpoint, Scheme, Server, ServerConfig};
//! use tokio_util::sync::CancellationToken;
//!
//! let listen = Endpoint::parse("127.0.0.1:0", Scheme::Ws)?;
//! let server = Server::bind(&listen, ServerConfig::new("/tmp/dest.sock")).await?;
//! println!("listening on {}", server.local_endpoint());
//! let report = server.serve(CancellationToken::new()).await;
//! println!("{report}");
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod auth;
mod client;
mod endpoint;
mod error;
mod frame;
mod keepalive;
mod observe;
pub mod protocol;
mod relay;
mod report;
mod server;
mod sniff;
mod stream;
pub mod tls;
mod transport;
mod ws;

pub use auth::{AuthFailure, Token, TokenError};
pub use client::{nbd_socket, open_control, open_data, open_nbd, Client, ClientConfig};
pub use endpoint::{Endpoint, Scheme};
pub use error::{DestinationFailure, Error, Result, UnixSocketFailure};
pub use frame::DecodeError;
pub use keepalive::{DeadPeer, DEFAULT_DEAD_PEER_TIMEOUT};
pub use observe::{Direction, Refusal, ServerEvent, ServerObserver};
pub use relay::{relay, RelayStats};
pub use report::Report;
pub use server::{Controller, Server, ServerConfig, SessionMap, SetupRefusal};
#[doc(hidden)]
pub use stream::fuzzing;
pub use stream::{FrameReader, TunnelReader, TunnelStream, TunnelWriter};
pub use tls::{ClientTls, Fingerprint, ServerCheck, ServerTls, TlsError};
pub use transport::{AnyTransport, Tcp, Tls, Transport, WebSocket};
pub use ws::{FrameError, WsReader, WsStream, WsWriter, WS_MESSAGE};
