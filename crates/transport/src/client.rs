//! The tunnel client: accepts the source QEMU's migration connections on a Unix socket and
//! opens one tunnel connection to the server for each.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::auth::{self, AuthFailure, Token};
use crate::endpoint::Endpoint;
use crate::error::{Error, Result, UnixSocketFailure};
use crate::keepalive::DeadPeer;
use crate::protocol::{self, Auth, Hello, Reply};
use crate::relay::{relay, RelayStats};
use crate::report::{Report, Tally};
use crate::stream::TunnelStream;
use crate::tls::ClientTls;
use crate::transport::{AnyTransport, Transport};

/// How a [`Client`] behaves.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The tunnel server; its scheme picks the transport.
    pub server: Endpoint,
    /// Limit for the TCP connect and WebSocket upgrade to the server.
    pub connect_timeout: Duration,
    /// Limit for the server's answer to a hello. The server may wait up to its own
    /// `--connect-timeout` for the destination socket before it answers, so this is longer.
    pub reply_timeout: Duration,
    /// Return after the first migration session's connections have all closed.
    pub once: bool,
    /// Put every connection into this migration session (the one a control connection
    /// prepared, see [`open_control`]) instead of starting a new one per migration.
    pub session: Option<String>,
    /// The pre-shared token: answer the server's challenge with it, and accept only a server
    /// that proves it knows it too. Without one, a server that asks for a token refuses us.
    pub token: Option<Token>,
    /// How to check a `tls://` or `wss://` server, and the client certificate if it wants
    /// one (required for those schemes, refused for the plain ones).
    pub tls: Option<ClientTls>,
    /// How soon a connection whose server vanished fails (keepalive, `TCP_USER_TIMEOUT`).
    pub dead_peer: DeadPeer,
}

impl ClientConfig {
    /// Defaults for a server address.
    pub fn new(server: Endpoint) -> Self {
        ClientConfig {
            server,
            connect_timeout: Duration::from_secs(10),
            reply_timeout: Duration::from_secs(120),
            once: false,
            session: None,
            token: None,
            tls: None,
            dead_peer: DeadPeer::default(),
        }
    }
}

/// A bound tunnel client, ready to [`serve`](Client::serve). Its socket file is removed when
/// it is dropped.
#[derive(Debug)]
pub struct Client {
    listener: UnixListener,
    path: PathBuf,
    config: ClientConfig,
    /// With [`Client::with_nbd`]: the listener for the NBD connections and its path.
    nbd: Option<(UnixListener, PathBuf)>,
}

/// The Unix socket for the NBD connections of a disk copy (`send`/`receive --copy-storage`)
/// beside the migration socket `socket`: the same path with the extension `nbd.sock`
/// (`/tmp/dest.sock` gives `/tmp/dest.nbd.sock`). On the destination QEMU's NBD server
/// listens there and `tunnel-server` connects NBD connections to it; on the source
/// `tunnel-client --copy-storage` listens there for the source QEMU's NBD client.
pub fn nbd_socket(socket: &Path) -> PathBuf {
    socket.with_extension("nbd.sock")
}

/// Creates a Unix socket at `path` (mode 0600), replacing a stale one.
fn bind_socket(path: &Path) -> Result<UnixListener> {
    let bad = |why: UnixSocketFailure| Error::UnixSocket {
        path: path.to_owned(),
        why,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Connecting to our own listening socket is harmless (unlike the destination
            // socket, where any connection is migration data).
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(bad(UnixSocketFailure::InUse));
            }
            std::fs::remove_file(path).map_err(|e| bad(UnixSocketFailure::RemoveStale(e)))?;
            debug!("removed stale socket {}", path.display());
        }
        Ok(_) => return Err(bad(UnixSocketFailure::NotASocket)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(UnixSocketFailure::Io(e))),
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        bad(match e.kind() {
            std::io::ErrorKind::NotFound => UnixSocketFailure::NoDirectory,
            _ => UnixSocketFailure::Io(e),
        })
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| bad(UnixSocketFailure::Chmod(e)))?;
    Ok(listener)
}

/// The migration session the next accepted connection belongs to. A session starts when a
/// connection arrives while none is open (QEMU opens all of a migration's connections while
/// its main connection is open) and numbers its connections from 0.
#[derive(Debug, Default)]
struct Sessions {
    id: String,
    next_seq: u64,
    active: u64,
    started: u64,
}

impl Client {
    /// Creates the Unix socket at `path` (mode 0600). A stale socket file there is replaced;
    /// a live one (another tunnel-client) or a file that is not a socket is refused, and so is
    /// a TLS address without TLS settings or the other way round.
    pub fn bind(path: &Path, config: ClientConfig) -> Result<Client> {
        transport_for(&config)?;
        let listener = bind_socket(path)?;
        Ok(Client {
            listener,
            path: path.to_owned(),
            config,
            nbd: None,
        })
    }

    /// Also listens on [`nbd_socket`] beside the migration socket, for the NBD connections of
    /// a disk copy (`send --copy-storage`): each becomes an NBD tunnel connection
    /// ([`crate::protocol::Purpose::Nbd`]), outside the migration's connection order. Refused
    /// like [`Client::bind`] when that socket is in use.
    pub fn with_nbd(mut self) -> Result<Client> {
        let path = nbd_socket(&self.path);
        let listener = bind_socket(&path)?;
        self.nbd = Some((listener, path));
        Ok(self)
    }

    /// The NBD socket, with [`Client::with_nbd`].
    pub fn nbd_socket_path(&self) -> Option<&Path> {
        self.nbd.as_ref().map(|(_, p)| p.as_path())
    }

    /// The socket path QEMU connects to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` is cancelled (or, with `once`, until the first migration is
    /// over).
    pub async fn serve(self, shutdown: CancellationToken) -> Report {
        let transport = match transport_for(&self.config) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                // `bind` checked the same settings.
                error!("{e}");
                return Report::default();
            }
        };
        let config = Arc::new(self.config.clone());
        let sessions = Arc::new(Mutex::new(Sessions::default()));
        let (done_tx, mut done_rx) = watch::channel(());
        let tally = Arc::new(Mutex::new(Tally::default()));
        let tracker = TaskTracker::new();
        let mut next_id: u64 = 0;
        // NBD connections name a session too; a server without a controller ignores it.
        let nbd_session = config.session.clone().unwrap_or_else(new_session_id);
        let nbd = self.nbd.as_ref().map(|(l, _)| l);
        loop {
            let once_over = config.once
                && sessions
                    .lock()
                    .map(|s| s.started > 0 && s.active == 0)
                    .unwrap_or(true);
            if once_over {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = done_rx.changed() => continue,
                accepted = accept_nbd(nbd) => match accepted {
                    Ok((unix, _)) => {
                        next_id += 1;
                        let span = info_span!("nbd", id = next_id);
                        let (config, session) = (config.clone(), nbd_session.clone());
                        let cancel = shutdown.child_token();
                        tracker.spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => debug!("shutting down"),
                                _ = handle_nbd(&config, unix, &session) => {}
                            }
                        }.instrument(span));
                    }
                    Err(e) => {
                        warn!("accept failed on the NBD socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                accepted = self.listener.accept() => match accepted {
                    Ok((unix, _)) => {
                        next_id += 1;
                        let (session, seq) = match sessions.lock() {
                            Ok(mut s) => {
                                if let Some(fixed) = &config.session {
                                    if s.started == 0 {
                                        s.id = fixed.clone();
                                    }
                                } else if s.active == 0 {
                                    s.id = new_session_id();
                                    s.next_seq = 0;
                                }
                                s.active += 1;
                                s.started += 1;
                                s.next_seq += 1;
                                (s.id.clone(), s.next_seq - 1)
                            }
                            Err(_) => continue,
                        };
                        let span = info_span!("conn", id = next_id, %session, seq);
                        let (config, sessions, tally) = (config.clone(), sessions.clone(), tally.clone());
                        let transport = transport.clone();
                        let done = done_tx.clone();
                        let cancel = shutdown.child_token();
                        tracker.spawn(async move {
                            tokio::select! {
                                _ = cancel.cancelled() => debug!("shutting down"),
                                _ = handle(&transport, &config, &tally, unix, &session, seq) => {}
                            }
                            if let Ok(mut s) = sessions.lock() {
                                s.active -= 1;
                            }
                            let _ = done.send(());
                        }.instrument(span));
                    }
                    Err(e) => {
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let report = tally.lock().map(|t| t.report()).unwrap_or_default();
        report
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some((_, path)) = &self.nbd {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The next connection on the NBD socket; never, without one.
async fn accept_nbd(
    listener: Option<&UnixListener>,
) -> std::io::Result<(UnixStream, tokio::net::unix::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// One NBD connection of the source QEMU: an NBD tunnel connection, relayed until either side
/// closes. QEMU's NBD client reconnects by itself (a new connection) when one breaks.
async fn handle_nbd(config: &ClientConfig, unix: UnixStream, session: &str) {
    let (stream, version) = match open_nbd(config, session).await {
        Ok(opened) => opened,
        Err(e) => {
            error!("NBD tunnel connection: {e}");
            return;
        }
    };
    let (stats, result) = relay(unix, stream, version).await;
    log_end(Relayed::Nbd, &stats, &result);
}

/// Which kind of connection a relay carried, for [`log_end`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relayed {
    /// A migration stream: its failure fails the migration.
    Data,
    /// An NBD connection: QEMU's NBD client reconnects after a failure, so it is a warning.
    Nbd,
}

/// Logs the end of a relayed connection: what it carried, and the error it failed with.
fn log_end(kind: Relayed, stats: &RelayStats, result: &Result<()>) {
    let what = match kind {
        Relayed::Data => "connection",
        Relayed::Nbd => "NBD connection",
    };
    let (sent, received) = (stats.to_tunnel, stats.from_tunnel);
    let secs = stats.elapsed.as_secs_f64();
    match result {
        Ok(()) => info!(sent, received, secs, "{what} closed"),
        Err(e) if kind == Relayed::Nbd => warn!(sent, received, "{what} failed: {e}"),
        Err(e) => error!(sent, received, secs, "{what} failed: {e}"),
    }
}

async fn handle(
    transport: &AnyTransport,
    config: &ClientConfig,
    tally: &Mutex<Tally>,
    unix: UnixStream,
    session: &str,
    seq: u64,
) {
    if let Ok(mut t) = tally.lock() {
        t.started();
    }
    let mut hello = Hello::data(session, seq);
    hello.route = config.server.route();
    let (stream, version) = match open(transport, config, &hello).await {
        Ok(opened) => opened,
        Err(e) => {
            error!("{e}");
            if let Ok(mut t) = tally.lock() {
                t.ended(&Default::default(), true);
            }
            return;
        }
    };
    let (stats, result) = relay(unix, stream, version).await;
    log_end(Relayed::Data, &stats, &result);
    if let Ok(mut t) = tally.lock() {
        t.ended(&stats, result.is_err());
    }
}

/// Opens the control connection of a new migration session to `config.server` (its path
/// names the route) and returns it with the session id and the protocol version the server
/// chose (from [`crate::protocol::HEARTBEATS`] the session exchanges heartbeats); then send
/// [`Control`] messages on it and serve a [`Client`] with that session in `config.session`.
///
/// [`Control`]: crate::protocol::Control
pub async fn open_control(config: &ClientConfig) -> Result<(TunnelStream, String, u32)> {
    let session = new_session_id();
    let transport = transport_for(config)?;
    let hello = Hello::control(&session, config.server.route());
    let (stream, version) = open(&transport, config, &hello).await?;
    Ok((stream, session, version))
}

/// Opens data connection `seq` of `session` (prepared on a control connection) and returns it
/// after the server's accept, for the caller to use as it is: the direct data path hands it to
/// the source QEMU.
pub async fn open_data(config: &ClientConfig, session: &str, seq: u64) -> Result<TunnelStream> {
    let transport = transport_for(config)?;
    let mut hello = Hello::data(session, seq);
    hello.route = config.server.route();
    Ok(open(&transport, config, &hello).await?.0)
}

/// Opens an NBD connection ([`crate::protocol::Purpose::Nbd`]) of `session` and returns it after
/// the server's accept, with the protocol version the server chose (for [`crate::relay()`]);
/// the server has connected it to the NBD server prepared for the session. A server that does
/// not know the purpose rejects it ([`Error::Rejected`] and the like).
pub async fn open_nbd(config: &ClientConfig, session: &str) -> Result<(TunnelStream, u32)> {
    let transport = transport_for(config)?;
    let hello = Hello::nbd(session, config.server.route());
    open(&transport, config, &hello).await
}

/// The transport for the server's scheme, with the TLS settings it needs.
fn transport_for(config: &ClientConfig) -> Result<AnyTransport> {
    AnyTransport::client(config.server.scheme, config.tls.as_ref())
        .map(|t| t.with_dead_peer(config.dead_peer))
}

/// Connects to the server and runs the handshake for one connection; returns it with the
/// protocol version the server chose.
async fn open(
    transport: &AnyTransport,
    config: &ClientConfig,
    hello: &Hello,
) -> Result<(TunnelStream, u32)> {
    let mut stream =
        tokio::time::timeout(config.connect_timeout, transport.connect(&config.server))
            .await
            .map_err(|_| Error::Timeout {
                what: "connecting to the tunnel server",
                after: config.connect_timeout,
            })??;
    let hello = Hello {
        nonce: match config.token {
            Some(_) => Some(auth::hex(&auth::nonce()?)),
            None => None,
        },
        ..hello.clone()
    };
    // The proofs cover the hello byte for byte, so keep the bytes sent.
    let body = protocol::encode_body(&hello);
    stream.send_body(&body).await?;
    let mut reply = recv_reply(&mut stream, config).await?;
    let mut server_nonce = None;
    if let Reply::Challenge { nonce } = &reply {
        let nonce = auth::parse_nonce(nonce).ok_or_else(|| {
            Error::Protocol(format!(
                "the server's challenge nonce is malformed: {nonce:?}"
            ))
        })?;
        let mac = config
            .token
            .as_ref()
            .map(|token| token.client_proof(&nonce, &body));
        let have_token = mac.is_some();
        stream.send_msg(&Auth { mac }).await?;
        reply = recv_reply(&mut stream, config).await?;
        if !have_token && !matches!(reply, Reply::Accept { .. }) {
            return Err(Error::Auth(AuthFailure::NoToken));
        }
        server_nonce = Some(nonce);
    }
    match reply {
        Reply::Accept {
            version,
            software,
            mac,
        } => {
            if let Some(token) = &config.token {
                check_server(token, server_nonce, &body, mac.as_deref(), &software)?;
            }
            if !(hello.min_version..=hello.max_version).contains(&version) {
                return Err(Error::Protocol(format!(
                    "the server ({software}) chose protocol version {version}, which this \
                     client did not offer ({}-{})",
                    hello.min_version, hello.max_version
                )));
            }
            debug!(version, server = %software, "tunnel connection accepted");
            Ok((stream, version))
        }
        Reply::Reject {
            reason,
            message,
            software,
            ..
        } => Err(Error::Rejected {
            reason,
            message,
            software,
        }),
        Reply::Challenge { .. } => {
            Err(Error::Protocol("the server sent a second challenge".into()))
        }
    }
}

async fn recv_reply(stream: &mut TunnelStream, config: &ClientConfig) -> Result<Reply> {
    tokio::time::timeout(config.reply_timeout, stream.recv_msg())
        .await
        .map_err(|_| Error::Timeout {
            what: "waiting for the tunnel server's answer",
            after: config.reply_timeout,
        })?
}

/// A client with a token sends migration data only to a server that proved it knows the
/// token: anyone else listening at the server's address would get the guest's memory.
fn check_server(
    token: &Token,
    nonce: Option<auth::Nonce>,
    hello: &[u8],
    mac: Option<&str>,
    software: &str,
) -> Result<()> {
    match (nonce, mac) {
        (Some(nonce), Some(mac)) if token.check_server_proof(&nonce, hello, mac) => Ok(()),
        (None, _) => Err(Error::Auth(AuthFailure::ServerHasNoToken {
            software: software.to_owned(),
        })),
        (Some(_), _) => Err(Error::Auth(AuthFailure::BadServerProof {
            software: software.to_owned(),
        })),
    }
}

/// 64 random bits in hex; falls back to time and pid if the kernel's RNG is unavailable
/// (the id only orders connections, it is not a secret).
fn new_session_id() -> String {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        bytes = (t ^ u64::from(std::process::id()) << 32).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
