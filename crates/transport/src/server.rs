//! The tunnel server: accepts tunnel connections and connects each to the destination QEMU's
//! migration socket, in the order the source opened them.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::auth::{self, Token};
use crate::endpoint::Endpoint;
use crate::error::{DestinationFailure, Error, Result};
use crate::keepalive::DeadPeer;
use crate::observe::{Hook, Refusal, ServerObserver};
use crate::protocol::{self, Auth, Hello, Purpose, RejectReason, Reply};
use crate::report::{Report, Tally};
use crate::stream::TunnelStream;
use crate::tls::ServerTls;
use crate::transport::{AnyTransport, Transport};

/// How a [`Server`] behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The destination QEMU's migration socket (`migrate-incoming` listens there).
    pub dest_socket: PathBuf,
    /// How long a connection waits for the destination socket to appear (and for the
    /// connections opened before it to be connected).
    pub connect_timeout: Duration,
    /// How long a new connection may take to finish the upgrade, send its hello and (with a
    /// token) prove that it knows the token.
    pub handshake_timeout: Duration,
    /// Return after the first migration session's connections have all closed.
    pub once: bool,
    /// The pre-shared token every connection must prove it knows before anything else
    /// happens. Without one, [`Server::bind`] listens on loopback addresses only, unless
    /// `insecure` is set.
    pub token: Option<Token>,
    /// Listen beyond loopback without a token (a warning is logged at every start).
    pub insecure: bool,
    /// The certificate and key for `tls://` and `wss://` (required there, refused for the
    /// plain schemes). With client certificates required, clients are authenticated even
    /// without a token.
    pub tls: Option<ServerTls>,
    /// How many connections may be in their handshake (not authenticated yet) at once. A new
    /// one beyond this drops the oldest, so a flood of idle connections neither grows without
    /// bound nor locks out a client that authenticates within a round trip.
    pub max_unauthenticated: usize,
    /// The words of the refusals that tell a client how this server is set up. The library's
    /// own ([`SetupRefusal::default_text`]) name no flags; a binary that knows its command line
    /// passes wording that does (`tunnel-server` names `--qmp`).
    pub refusal_text: fn(SetupRefusal) -> String,
    /// How soon a connection whose client vanished fails (keepalive, `TCP_USER_TIMEOUT`).
    pub dead_peer: DeadPeer,
}

/// A refusal caused by how the server was started rather than by what the client sent: the
/// operator on the client's side reads its text, so it says what to change on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetupRefusal {
    /// A control connection (`qmigrate migrate`) to a server that has no destination QMP
    /// socket, so it cannot prepare the destination QEMU.
    NoController,
    /// A data connection naming a session no control connection prepared, on a server that
    /// prepares its destinations itself.
    UnpreparedSession,
}

impl SetupRefusal {
    /// The library's wording, naming no command-line flags.
    pub fn default_text(self) -> String {
        match self {
            SetupRefusal::NoController => {
                "this tunnel-server has no destination QMP socket, so it \
                                      cannot prepare the destination QEMU: give it one, or run \
                                      `qmigrate receive` on the destination and `qmigrate send` \
                                      here"
                    .into()
            }
            SetupRefusal::UnpreparedSession => {
                "this server prepares its destination QEMUs itself, \
                                           so migrations through it start with `qmigrate \
                                           migrate`"
                    .into()
            }
        }
    }
}

impl ServerConfig {
    /// Defaults for a destination socket.
    pub fn new(dest_socket: impl Into<PathBuf>) -> Self {
        ServerConfig {
            dest_socket: dest_socket.into(),
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            once: false,
            token: None,
            insecure: false,
            tls: None,
            max_unauthenticated: 64,
            refusal_text: SetupRefusal::default_text,
            dead_peer: DeadPeer::default(),
        }
    }
}

/// A bound tunnel server, ready to [`serve`](Server::serve).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local: Endpoint,
    transport: AnyTransport,
    config: ServerConfig,
    controller: Option<Arc<dyn Controller>>,
    observer: Option<Arc<dyn ServerObserver>>,
}

/// The destination side of control connections (`tunnel-server --qmp`): prepares the
/// destination QEMU for a migration session when the source asks, and follows it to its end.
///
/// Without a controller the server only relays, to [`ServerConfig::dest_socket`]; with one,
/// each data connection goes to the socket its session was prepared with, and data
/// connections of sessions nobody prepared are refused.
pub trait Controller: Send + Sync + std::fmt::Debug + 'static {
    /// Serves one accepted control connection (version agreed, [`Reply::Accept`] sent) to its
    /// end: [`protocol::Control`] messages. `hello.route` names the destination. The
    /// controller registers the session's destination socket in `sessions` before it answers
    /// `Ready`, and removes it at the end.
    fn serve(
        &self,
        hello: Hello,
        stream: TunnelStream,
        sessions: SessionMap,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// Where each migration session a [`Controller`] prepared goes.
#[derive(Debug, Clone, Default)]
pub struct SessionMap(Arc<Mutex<HashMap<String, SessionDest>>>, NbdMap);

/// Session id to the NBD server socket its [`Purpose::Nbd`] connections go to.
#[derive(Debug, Clone, Default)]
struct NbdMap(Arc<Mutex<HashMap<String, PathBuf>>>);

/// Where the data connections of one prepared session go.
#[derive(Debug, Clone)]
enum SessionDest {
    /// Relayed to this Unix socket.
    Socket(PathBuf),
    /// Handed over as they are (plain TCP only, never TLS, after the handshake and its
    /// accept): the direct data path, where the controller gives the socket to the
    /// destination QEMU.
    Handover(tokio::sync::mpsc::UnboundedSender<TcpStream>),
}

impl SessionMap {
    /// Sends the data connections of `session` to `dest`.
    pub fn insert(&self, session: &str, dest: PathBuf) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(session.to_owned(), SessionDest::Socket(dest));
        }
    }

    /// Hands the data connections of `session` (TCP, after their handshake) to the returned
    /// receiver instead of relaying them: the direct data path.
    pub fn hand_over(&self, session: &str) -> tokio::sync::mpsc::UnboundedReceiver<TcpStream> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut map) = self.0.lock() {
            map.insert(session.to_owned(), SessionDest::Handover(tx));
        }
        rx
    }

    /// Forgets `session`: its later data connections are refused.
    pub fn remove(&self, session: &str) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(session);
        }
    }

    fn get(&self, session: &str) -> Option<SessionDest> {
        self.0.lock().ok().and_then(|map| map.get(session).cloned())
    }

    /// Sends the NBD connections ([`Purpose::Nbd`]) of `session` to the NBD server at `socket`
    /// (kept apart from its data connections: they live before, during and after them).
    pub fn insert_nbd(&self, session: &str, socket: PathBuf) {
        if let Ok(mut map) = self.1 .0.lock() {
            map.insert(session.to_owned(), socket);
        }
    }

    /// Forgets `session`'s NBD server: its later NBD connections are refused.
    pub fn remove_nbd(&self, session: &str) {
        if let Ok(mut map) = self.1 .0.lock() {
            map.remove(session);
        }
    }

    fn get_nbd(&self, session: &str) -> Option<PathBuf> {
        self.1
             .0
            .lock()
            .ok()
            .and_then(|map| map.get(session).cloned())
    }
}

/// How many connections are under way, and whether any has started: `--once` ends when a
/// migration has started and all its connections are gone.
#[derive(Debug, Clone, Copy, Default)]
struct Activity {
    started: u64,
    active: u64,
}

#[derive(Debug)]
struct Shared {
    transport: AnyTransport,
    config: ServerConfig,
    controller: Option<Arc<dyn Controller>>,
    hook: Hook,
    /// Cancelled when the server drains: new control connections are refused.
    draining: CancellationToken,
    prepared: SessionMap,
    sessions: Mutex<HashMap<String, Session>>,
    activity: watch::Sender<Activity>,
    tally: Mutex<Tally>,
    unauthenticated: Arc<Unauthenticated>,
}

/// The connections still in their handshake, oldest first (connection ids grow), each with
/// the token that drops it.
#[derive(Debug, Default)]
struct Unauthenticated(Mutex<BTreeMap<u64, CancellationToken>>);

impl Unauthenticated {
    /// Registers connection `id`, dropping the oldest ones while `limit` are waiting.
    fn admit(&self, id: u64, limit: usize) -> CancellationToken {
        let drop_me = CancellationToken::new();
        if let Ok(mut waiting) = self.0.lock() {
            while waiting.len() >= limit.max(1) {
                match waiting.pop_first() {
                    Some((_, oldest)) => oldest.cancel(),
                    None => break,
                }
            }
            waiting.insert(id, drop_me.clone());
        }
        drop_me
    }

    fn done(&self, id: u64) {
        if let Ok(mut waiting) = self.0.lock() {
            waiting.remove(&id);
        }
    }
}

/// A connection's place among the unauthenticated ones, given up when it authenticates or
/// ends.
struct Waiting {
    set: Arc<Unauthenticated>,
    id: u64,
    dropped: CancellationToken,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.set.done(self.id);
    }
}

/// Connect order of one migration session: connection `seq` may connect to the destination
/// once `next` has reached `seq`.
#[derive(Debug)]
struct Session {
    next: watch::Sender<u64>,
    last_used: Instant,
}

/// Sessions idle this long are forgotten.
const SESSION_TTL: Duration = Duration::from_secs(600);

impl Server {
    /// Binds the listening socket. `listen`'s scheme picks the transport; `tls://` and
    /// `wss://` need `config.tls`, and the plain schemes refuse it ([`Error::TlsSetup`]).
    ///
    /// Without client authentication in `config` (a token, or TLS client certificates), an
    /// address that is not loopback (`0.0.0.0`, a LAN address, a name that resolves to one)
    /// is refused with [`Error::Unauthenticated`], unless `config.insecure` is set, which logs
    /// a warning instead. A server certificate alone authenticates the server, not clients.
    pub async fn bind(listen: &Endpoint, config: ServerConfig) -> Result<Server> {
        let transport = AnyTransport::server(listen.scheme, config.tls.as_ref())?
            .with_dead_peer(config.dead_peer);
        let bind_err = |source| Error::Bind {
            addr: listen.authority(),
            source,
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen.authority())
            .await
            .map_err(bind_err)?
            .collect();
        let client_certs = config
            .tls
            .as_ref()
            .is_some_and(ServerTls::requires_client_certificates);
        let authenticated = config.token.is_some() || client_certs;
        if !authenticated && addrs.iter().any(|a| !is_loopback(a.ip())) {
            if !config.insecure {
                return Err(Error::Unauthenticated {
                    addr: listen.authority(),
                });
            }
            warn!(
                "listening on {} WITHOUT AUTHENTICATION, as asked: anyone who can reach this \
                 port can write a migration stream into the destination VM and run code there",
                listen.authority()
            );
        }
        let listener = TcpListener::bind(&addrs[..]).await.map_err(bind_err)?;
        let local = listen.with_bound(listener.local_addr()?);
        Ok(Server {
            listener,
            local,
            transport,
            config,
            controller: None,
            observer: None,
        })
    }

    /// Reports connections, relayed bytes and refusals to `observer` (see
    /// [`ServerEvent`](crate::ServerEvent)).
    pub fn with_observer(mut self, observer: Arc<dyn ServerObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Serves control connections with `controller` (see [`Controller`]).
    pub fn with_controller(mut self, controller: Arc<dyn Controller>) -> Self {
        self.controller = Some(controller);
        self
    }

    /// The address actually bound (port 0 resolved), as a URL clients can use.
    pub fn local_endpoint(&self) -> &Endpoint {
        &self.local
    }

    /// Serves until `shutdown` is cancelled (or, with `once`, until the first migration is
    /// over). Connections still open at shutdown are dropped.
    pub async fn serve(self, shutdown: CancellationToken) -> Report {
        self.serve_until(CancellationToken::new(), shutdown).await
    }

    /// Serves until `shutdown` is cancelled (or, with `once`, until the first migration is
    /// over), draining from the moment `drain` is cancelled: new migration sessions (control
    /// connections) are then refused as shutting down, while the sessions under way go on
    /// (their data connections are still accepted: multifd and postcopy open some late).
    pub async fn serve_until(
        self,
        drain: CancellationToken,
        shutdown: CancellationToken,
    ) -> Report {
        let (activity, mut activity_rx) = watch::channel(Activity::default());
        let shared = Arc::new(Shared {
            hook: Hook {
                observer: self.observer,
                transport: self.local.scheme,
            },
            draining: drain,
            transport: self.transport,
            config: self.config,
            controller: self.controller,
            prepared: SessionMap::default(),
            sessions: Mutex::new(HashMap::new()),
            activity,
            tally: Mutex::new(Tally::default()),
            unauthenticated: Arc::default(),
        });
        let tracker = TaskTracker::new();
        let once = shared.config.once;
        let mut next_id: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = async { let _ = activity_rx.wait_for(|a| a.started > 0 && a.active == 0).await; }, if once => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        next_id += 1;
                        let id = next_id;
                        let span = info_span!("conn", id, %peer, session = tracing::field::Empty, seq = tracing::field::Empty);
                        let dropped = shared.unauthenticated.admit(id, shared.config.max_unauthenticated);
                        let shared = shared.clone();
                        let cancel = shutdown.child_token();
                        shared.hook.opened();
                        tracker.spawn(async move {
                            let waiting = Waiting { set: shared.unauthenticated.clone(), id, dropped };
                            let hook = shared.hook.clone();
                            tokio::select! {
                                _ = cancel.cancelled() => debug!("shutting down"),
                                _ = handle(shared, tcp, waiting) => {}
                            }
                            hook.closed();
                        }.instrument(span));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        let report = shared.tally.lock().map(|t| t.report()).unwrap_or_default();
        report
    }
}

/// Decrements the active count however a connection ends.
struct ActiveGuard<'a>(&'a watch::Sender<Activity>);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|a| a.active -= 1);
    }
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, waiting: Waiting) {
    let config = &shared.config;
    let started = Instant::now();
    let outcome = tokio::select! {
        _ = waiting.dropped.cancelled() => {
            shared.hook.refused(Refusal::Flood);
            warn!(
                "dropped after {:.1}s without a finished handshake: {} connections were waiting \
                 to authenticate and this was the oldest",
                started.elapsed().as_secs_f64(),
                config.max_unauthenticated
            );
            return;
        }
        outcome = tokio::time::timeout(config.handshake_timeout, handshake(&shared, tcp)) => outcome,
    };
    let (mut stream, hello, mac) = match outcome {
        Ok(Ok(Some(ok))) => ok,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            shared.hook.refused(Refusal::of(&e));
            warn!("refused a connection: {e}");
            return;
        }
        Err(_) => {
            shared.hook.refused(Refusal::Timeout);
            warn!(
                "refused a connection: no finished handshake within {}s",
                config.handshake_timeout.as_secs()
            );
            return;
        }
    };
    drop(waiting);
    let span = tracing::Span::current();
    span.record("session", hello.session.as_str());
    span.record("seq", hello.seq);

    let Some(version) = protocol::negotiate(hello.min_version, hello.max_version) else {
        let message = format!(
            "no common protocol version: the client ({}) speaks {}-{}, this server ({}) speaks {}-{}; upgrade the older side",
            hello.software,
            hello.min_version,
            hello.max_version,
            protocol::software(),
            protocol::PROTOCOL_MIN,
            protocol::PROTOCOL_MAX
        );
        shared.hook.refused(Refusal::Version);
        reject(&mut stream, RejectReason::Version, message).await;
        return;
    };
    match (hello.purpose, &shared.controller) {
        (Purpose::Data, _) => {}
        (Purpose::Control, Some(_)) if shared.draining.is_cancelled() => {
            let message = "this tunnel-server is shutting down: it finishes the migrations under \
                           way and starts no new one"
                .to_owned();
            reject(&mut stream, RejectReason::ShuttingDown, message).await;
            return;
        }
        (Purpose::Control, Some(controller)) => {
            shared.activity.send_modify(|a| {
                a.started += 1;
                a.active += 1;
            });
            let _active = ActiveGuard(&shared.activity);
            if !accept(&mut stream, version, mac).await {
                return;
            }
            info!(route = ?hello.route, client = %hello.software, "control connection");
            controller
                .serve(hello, stream, shared.prepared.clone())
                .await;
            return;
        }
        (Purpose::Control, None) => {
            let message = (shared.config.refusal_text)(SetupRefusal::NoController);
            reject(&mut stream, RejectReason::BadRequest, message).await;
            return;
        }
        (Purpose::Nbd, _) => {
            serve_nbd(&shared, hello, stream, version, mac).await;
            return;
        }
        (Purpose::Other, _) => {
            let message = "unknown connection purpose (a newer client?)".to_owned();
            reject(&mut stream, RejectReason::BadRequest, message).await;
            return;
        }
    }
    if let (Some(route), None) = (&hello.route, &shared.controller) {
        let message = format!("this server has no routes, but the client asked for {route:?}");
        reject(&mut stream, RejectReason::BadRequest, message).await;
        return;
    }

    shared.activity.send_modify(|a| {
        a.started += 1;
        a.active += 1;
    });
    let _active = ActiveGuard(&shared.activity);
    if let Ok(mut t) = shared.tally.lock() {
        t.started();
    }

    // The direct data path: no destination socket; the connection itself goes to QEMU.
    let handover = match shared.prepared.get(&hello.session) {
        Some(SessionDest::Handover(to)) if matches!(stream, TunnelStream::Tcp(_)) => Some(to),
        _ => None,
    };
    let dest = match &handover {
        Some(_) => Ok(None),
        None => connect_in_order(&shared, &hello).await.map(Some),
    };
    let dest = match dest {
        Ok(dest) => dest,
        Err(e) => {
            error!("{e}");
            reject(&mut stream, RejectReason::Destination, e.to_string()).await;
            if let Ok(mut t) = shared.tally.lock() {
                t.ended(&Default::default(), true);
            }
            return;
        }
    };
    if !accept(&mut stream, version, mac).await {
        if let Ok(mut t) = shared.tally.lock() {
            t.ended(&Default::default(), true);
        }
        return;
    }
    let (Some(dest), None) = (dest, &handover) else {
        if let (Some(to), TunnelStream::Tcp(tcp)) = (handover, stream) {
            info!("direct data path: the connection goes to the destination QEMU itself");
            let _ = to.send(tcp);
        }
        if let Ok(mut t) = shared.tally.lock() {
            t.ended(&Default::default(), false);
        }
        return;
    };
    debug!(version, client = %hello.software, "connected to the destination socket");

    let (stats, result) = shared.hook.relay(dest, stream, version).await;
    match &result {
        Ok(()) => info!(
            received = stats.from_tunnel,
            sent = stats.to_tunnel,
            secs = stats.elapsed.as_secs_f64(),
            "connection closed"
        ),
        Err(e) => error!(
            received = stats.from_tunnel,
            sent = stats.to_tunnel,
            secs = stats.elapsed.as_secs_f64(),
            "connection failed: {e}"
        ),
    }
    if let Ok(mut t) = shared.tally.lock() {
        t.ended(&stats, result.is_err());
    }
}

/// The part of a connection before it is trusted: the upgrade, the hello and, with a token,
/// the challenge. Returns the stream, the hello and the server's proof for the accept, or
/// `None` when the client failed to authenticate (it was told so, and it was logged).
async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
) -> Result<Option<(TunnelStream, Hello, Option<String>)>> {
    let mut stream = shared.transport.accept(tcp).await?;
    let body = stream.recv_body().await?;
    let hello: Hello = match protocol::decode_body(&body) {
        Ok(hello) => hello,
        Err(e) => {
            reject(
                &mut stream,
                RejectReason::BadRequest,
                format!("not a hello: {e}"),
            )
            .await;
            return Ok(None);
        }
    };
    let Some(token) = &shared.config.token else {
        if hello.nonce.is_some() {
            // It would refuse our accept, after the destination got a connection.
            let message = "the client has a token, but this server has none: give \
                           tunnel-server the same token"
                .to_owned();
            shared.hook.refused(Refusal::UnexpectedToken);
            reject(&mut stream, RejectReason::Auth, message).await;
            return Ok(None);
        }
        return Ok(Some((stream, hello, None)));
    };
    if let Some(theirs) = hello
        .nonce
        .as_deref()
        .filter(|n| auth::parse_nonce(n).is_none())
    {
        let message = format!(
            "the hello's nonce must be {} bytes in hex ({} digits), not {theirs:?}",
            auth::NONCE_LEN,
            2 * auth::NONCE_LEN
        );
        reject(&mut stream, RejectReason::BadRequest, message).await;
        return Ok(None);
    }
    let nonce = auth::nonce()?;
    stream
        .send_msg(&Reply::Challenge {
            nonce: auth::hex(&nonce),
        })
        .await?;
    let answer: Auth = stream.recv_msg().await?;
    let failure = match &answer.mac {
        None => "the client has no token, and this server requires one",
        Some(mac) if token.check_client_proof(&nonce, &body, mac) => {
            debug!("the client proved it knows the token");
            return Ok(Some((
                stream,
                hello,
                Some(token.server_proof(&nonce, &body)),
            )));
        }
        Some(_) => {
            "the client's proof does not match this server's token (a wrong token, or a \
             replayed handshake)"
        }
    };
    shared.hook.refused(match answer.mac {
        None => Refusal::NoToken,
        Some(_) => Refusal::WrongToken,
    });
    reject(&mut stream, RejectReason::Auth, failure.to_owned()).await;
    Ok(None)
}

async fn reject(stream: &mut TunnelStream, reason: RejectReason, message: String) {
    warn!("refused ({reason}): {message}");
    let reply = Reply::Reject {
        reason,
        message,
        software: protocol::software(),
        versions: (reason == RejectReason::Version)
            .then_some((protocol::PROTOCOL_MIN, protocol::PROTOCOL_MAX)),
    };
    if stream.send_msg(&reply).await.is_ok() {
        stream.close_refused(&reason.to_string()).await;
    }
}

/// An NBD connection ([`Purpose::Nbd`]): connected to its session's NBD socket at once (no
/// order to keep, no retry: QEMU's NBD server listens before the session is ready), then
/// relayed like a data connection.
async fn serve_nbd(
    shared: &Shared,
    hello: Hello,
    mut stream: TunnelStream,
    version: u32,
    mac: Option<String>,
) {
    // Without a controller, `receive --copy-storage` runs the NBD server beside --socket.
    let socket = match &shared.controller {
        Some(_) => shared.prepared.get_nbd(&hello.session),
        None => Some(crate::client::nbd_socket(&shared.config.dest_socket)),
    };
    let Some(socket) = socket else {
        let message = format!(
            "no disk copy was prepared for migration session {} on this server",
            hello.session
        );
        reject(&mut stream, RejectReason::BadRequest, message).await;
        return;
    };
    let dest = match UnixStream::connect(&socket).await {
        Ok(dest) => dest,
        Err(e) => {
            let hint = if shared.controller.is_none() {
                " (run `qmigrate receive --copy-storage` on the destination first)"
            } else {
                ""
            };
            let message = format!(
                "cannot connect to the destination's NBD server {}: {e}{hint}",
                socket.display()
            );
            error!("{message}");
            reject(&mut stream, RejectReason::Destination, message).await;
            return;
        }
    };
    if !accept(&mut stream, version, mac).await {
        return;
    }
    shared.activity.send_modify(|a| {
        a.started += 1;
        a.active += 1;
    });
    let _active = ActiveGuard(&shared.activity);
    debug!("NBD connection to {}", socket.display());
    let (stats, result) = crate::relay::relay(dest, stream, version).await;
    match result {
        Ok(()) => info!(
            received = stats.from_tunnel,
            sent = stats.to_tunnel,
            secs = stats.elapsed.as_secs_f64(),
            "NBD connection closed"
        ),
        Err(e) => warn!(
            received = stats.from_tunnel,
            sent = stats.to_tunnel,
            "NBD connection failed: {e}"
        ),
    }
}

/// Waits until the connections the source opened before this one are connected, connects
/// this one, and lets the next one go, so the destination QEMU sees its connections in the
/// source's order (the postcopy-preempt channel has no magic to be recognised by).
async fn connect_in_order(shared: &Shared, hello: &Hello) -> Result<UnixStream> {
    let config = &shared.config;
    let turn = {
        let mut sessions = shared
            .sessions
            .lock()
            .map_err(|_| Error::Protocol("session table poisoned".into()))?;
        let now = Instant::now();
        sessions.retain(|_, s| now.duration_since(s.last_used) < SESSION_TTL);
        let session = sessions
            .entry(hello.session.clone())
            .or_insert_with(|| Session {
                next: watch::channel(0).0,
                last_used: now,
            });
        session.last_used = now;
        session.next.clone()
    };
    let mut rx = turn.subscribe();
    let deadline = tokio::time::Instant::now() + config.connect_timeout;
    if tokio::time::timeout_at(deadline, rx.wait_for(|next| *next >= hello.seq))
        .await
        .is_err()
    {
        warn!(
            "connections before #{} of this session did not arrive within {}s; connecting anyway",
            hello.seq,
            config.connect_timeout.as_secs()
        );
    }
    let result = match &shared.controller {
        None => connect_dest(&config.dest_socket, deadline, config.connect_timeout).await,
        Some(_) => match shared.prepared.get(&hello.session) {
            Some(SessionDest::Socket(path)) => {
                connect_dest(&path, deadline, config.connect_timeout).await
            }
            Some(SessionDest::Handover(_)) => Err(Error::Protocol(
                "this session uses the direct data path, which needs plain TCP and one connection"
                    .into(),
            )),
            None => Err(Error::Protocol(format!(
                "no migration session {} was prepared on this server: {}",
                hello.session,
                (config.refusal_text)(SetupRefusal::UnpreparedSession)
            ))),
        },
    };
    turn.send_modify(|next| *next = (*next).max(hello.seq + 1));
    result
}

/// Sends `accept` with the chosen version (and our proof of the token); false, logged, when
/// the client went away meanwhile.
async fn accept(stream: &mut TunnelStream, version: u32, mac: Option<String>) -> bool {
    let accept = Reply::Accept {
        version,
        software: protocol::software(),
        mac,
    };
    match stream.send_msg(&accept).await {
        Ok(()) => true,
        Err(e) => {
            warn!("the client went away during the handshake: {e}");
            false
        }
    }
}

/// Whether `ip` is a loopback address (`127.0.0.0/8`, `::1`, or `::ffff:127.x.y.z`).
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Connects to the destination socket, retrying while it does not exist yet or nobody
/// listens on it (`migrate-incoming` may come after the tunnel is up). One attempt is one
/// connection that QEMU takes as migration data, so nothing else ever connects there.
async fn connect_dest(
    path: &std::path::Path,
    deadline: tokio::time::Instant,
    timeout: Duration,
) -> Result<UnixStream> {
    let mut told = false;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Destination {
                        path: path.to_owned(),
                        why: if e.kind() == std::io::ErrorKind::NotFound {
                            DestinationFailure::NeverAppeared(timeout)
                        } else {
                            DestinationFailure::NobodyListened(timeout)
                        },
                    });
                }
                if !told {
                    info!(
                        "waiting up to {}s for the destination socket {} ({e})",
                        timeout.as_secs(),
                        path.display()
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(Error::Destination {
                    path: path.to_owned(),
                    why: DestinationFailure::Connect(e),
                })
            }
        }
    }
}
