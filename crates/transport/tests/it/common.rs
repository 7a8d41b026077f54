//! Fixtures for the tunnel tests: a server and a client wired together in-process, a fake
//! destination QEMU (a Unix listener on the server's destination socket), a fake source QEMU
//! (connections to the client's socket), and reproducible data streams to push through.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use qmigrate_transport::protocol;
use qmigrate_transport::tls::{CertificateDer, PrivateKeyDer};
use qmigrate_transport::{
    Client, ClientConfig, ClientTls, DeadPeer, Endpoint, Report, Scheme, Server, ServerCheck,
    ServerConfig, ServerTls, Token,
};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// Limit for a step that should finish: a hang fails the test instead of blocking the run.
pub const STEP: Duration = Duration::from_secs(20);

/// How long to watch the destination socket before concluding nothing will connect there.
pub const QUIET: Duration = Duration::from_millis(300);

pub use qmigrate_testkit::within;

// The tunnel's log, captured for the whole test binary (a subscriber is global, and all the
// tests share one binary): each test finds its own lines by the peer address it connected from.
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the test binary's subscriber once: `qmigrate_transport=debug` into the buffer that
/// [`log_text`] reads, and, with RUST_LOG=debug, the server's and client's logs with a failing
/// test's output.
pub fn capture_logs() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(buf.clone());
        let captured = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .with_filter(EnvFilter::new("qmigrate_transport=debug"));
        let shown = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(EnvFilter::from_default_env());
        let _ = tracing_subscriber::registry()
            .with(captured)
            .with(shown)
            .try_init();
        buf
    });
}

/// Everything [`capture_logs`] captured so far.
pub fn log_text() -> String {
    LOGS.get()
        .and_then(|l| {
            l.lock()
                .ok()
                .map(|l| String::from_utf8_lossy(&l).into_owned())
        })
        .unwrap_or_default()
}

/// How to start a [`Tunnel`].
#[derive(Debug, Clone)]
pub struct Opts {
    /// `once` for both the server and the client.
    pub once: bool,
    /// The server's wait for the destination socket.
    pub connect_timeout: Duration,
    /// The server's limit for a connection's handshake.
    pub handshake_timeout: Duration,
    /// The server's limit of connections in their handshake at once.
    pub max_unauthenticated: usize,
    /// The server's token.
    pub server_token: Option<Token>,
    /// The client's token.
    pub client_token: Option<Token>,
    /// The server's TLS settings (for `tls://` and `wss://`; without them a tunnel over TLS
    /// gets [`test_tls`]'s).
    pub server_tls: Option<ServerTls>,
    /// The client's TLS settings (likewise).
    pub client_tls: Option<ClientTls>,
    /// Put a [`CutProxy`] between the client and the server.
    pub proxy: bool,
    /// Both ends' dead-peer timeout (`None`: the default).
    pub dead_peer: Option<Duration>,
}

impl Default for Opts {
    fn default() -> Self {
        let defaults = ServerConfig::new("unused");
        Opts {
            once: true,
            connect_timeout: Duration::from_secs(30),
            handshake_timeout: defaults.handshake_timeout,
            max_unauthenticated: defaults.max_unauthenticated,
            server_token: None,
            client_token: None,
            server_tls: None,
            client_tls: None,
            proxy: false,
            dead_peer: None,
        }
    }
}

impl Opts {
    /// Both ends with the same token.
    pub fn with_token(token: &str) -> Opts {
        let token = Token::new(token, "the test").expect("a test token");
        Opts {
            server_token: Some(token.clone()),
            client_token: Some(token),
            ..Opts::default()
        }
    }
}

/// A tunnel server on `127.0.0.1:0` and a client pointed at it, each serving in its own task,
/// in a temporary directory of their own. Nothing listens on the destination socket until a
/// test binds it. Dropping the tunnel stops both.
#[derive(Debug)]
pub struct Tunnel {
    pub dir: TempDir,
    pub scheme: Scheme,
    /// The destination QEMU's socket (the server connects there).
    pub dest: PathBuf,
    /// The client's socket (the source QEMU connects there).
    pub source: PathBuf,
    /// Where the server listens.
    pub url: Endpoint,
    pub server_stop: CancellationToken,
    pub client_stop: CancellationToken,
    /// The proxy the client connects through, with [`Opts::proxy`].
    pub proxy: Option<CutProxy>,
    server: Option<JoinHandle<Report>>,
    client: Option<JoinHandle<Report>>,
}

impl Tunnel {
    /// Starts a server and a client.
    pub async fn start(scheme: Scheme, opts: Opts) -> Tunnel {
        capture_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("dest.sock");
        let source = dir.path().join("source.sock");
        let listen = Endpoint::parse("127.0.0.1:0", scheme).expect("endpoint");
        let (server_tls, client_tls) = match (&opts.server_tls, scheme.is_tls()) {
            (None, true) => {
                let (server, client) = test_tls();
                (Some(server), opts.client_tls.clone().or(Some(client)))
            }
            _ => (opts.server_tls.clone(), opts.client_tls.clone()),
        };
        let config = ServerConfig {
            tls: server_tls,
            connect_timeout: opts.connect_timeout,
            handshake_timeout: opts.handshake_timeout,
            max_unauthenticated: opts.max_unauthenticated,
            token: opts.server_token.clone(),
            once: opts.once,
            dead_peer: opts
                .dead_peer
                .map_or_else(DeadPeer::default, |timeout| DeadPeer { timeout }),
            ..ServerConfig::new(&dest)
        };
        let server = Server::bind(&listen, config).await.expect("server bind");
        let url = server.local_endpoint().clone();
        assert_ne!(url.port, 0, "the server reports the port it bound");
        assert_eq!(url.scheme, scheme);
        let proxy = match opts.proxy {
            true => Some(CutProxy::start(&url).await),
            false => None,
        };
        let client_url = match &proxy {
            Some(p) => Endpoint {
                port: p.port,
                ..url.clone()
            },
            None => url.clone(),
        };
        let client = Client::bind(
            &source,
            ClientConfig {
                once: opts.once,
                token: opts.client_token.clone(),
                tls: client_tls,
                dead_peer: opts
                    .dead_peer
                    .map_or_else(DeadPeer::default, |timeout| DeadPeer { timeout }),
                ..ClientConfig::new(client_url)
            },
        )
        .expect("client bind");
        assert_eq!(client.socket_path(), source);
        let (server_stop, client_stop) = (CancellationToken::new(), CancellationToken::new());
        let server = tokio::spawn(server.serve(server_stop.clone()));
        let client = tokio::spawn(client.serve(client_stop.clone()));
        Tunnel {
            dir,
            scheme,
            dest,
            source,
            url,
            server_stop,
            client_stop,
            proxy,
            server: Some(server),
            client: Some(client),
        }
    }

    /// The fake destination QEMU: listens on the destination socket.
    pub fn dest_listener(&self) -> UnixListener {
        UnixListener::bind(&self.dest).expect("bind the destination socket")
    }

    /// The fake source QEMU: one migration connection to the client.
    pub async fn source_connect(&self) -> UnixStream {
        within(
            STEP,
            "connect to the client socket",
            UnixStream::connect(&self.source),
        )
        .await
        .expect("connect to the client socket")
    }

    /// Whether the server's serve loop is still running.
    pub fn server_running(&self) -> bool {
        self.server.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Whether the client's serve loop is still running.
    pub fn client_running(&self) -> bool {
        self.client.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// The server's report once its serve loop returns (by itself with `once`, or after
    /// `server_stop`).
    pub async fn server_report(&mut self) -> Report {
        let h = self.server.take().expect("server report taken twice");
        within(STEP, "the server to return", h)
            .await
            .expect("server task")
    }

    /// The client's report once its serve loop returns.
    pub async fn client_report(&mut self) -> Report {
        let h = self.client.take().expect("client report taken twice");
        within(STEP, "the client to return", h)
            .await
            .expect("client task")
    }

    /// Cancels both ends and returns their reports (server, client).
    pub async fn stop(&mut self) -> (Report, Report) {
        self.server_stop.cancel();
        self.client_stop.cancel();
        (self.server_report().await, self.client_report().await)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.server_stop.cancel();
        self.client_stop.cancel();
    }
}

/// The write halves a swallowing [`CutProxy`] keeps open until it is dropped.
type Held = Arc<Mutex<Vec<tokio::net::tcp::OwnedWriteHalf>>>;

/// What a [`CutProxy`] does to its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Ends one direction.
    Way(Direction),
    /// Drops everything both ways, ends nothing.
    Swallow,
}

/// Which direction of a connection a [`CutProxy`] cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// A TCP proxy between a tunnel client and its server that forwards both directions byte for
/// byte until told to cut one: from then on it drops what comes that way and ends it towards
/// its receiver with a FIN, as a middlebox or a network that lost one direction would, while
/// the other direction flows on to its end.
#[derive(Debug)]
pub struct CutProxy {
    /// The port the client connects to.
    pub port: u16,
    cut: tokio::sync::watch::Sender<Option<Cut>>,
    task: JoinHandle<()>,
    /// Dropped with the proxy.
    #[allow(dead_code)]
    held: Held,
}

impl CutProxy {
    /// A proxy on `127.0.0.1:0` to `upstream`'s host and port.
    pub async fn start(upstream: &Endpoint) -> CutProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (cut, cut_rx) = tokio::sync::watch::channel(None);
        let to = upstream.authority();
        let held = Held::default();
        let task = tokio::spawn({
            let held = held.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&to).await else {
                        continue;
                    };
                    let (c_rd, c_wr) = client.into_split();
                    let (s_rd, s_wr) = server.into_split();
                    tokio::spawn(forward(
                        c_rd,
                        s_wr,
                        cut_rx.clone(),
                        Direction::Up,
                        held.clone(),
                    ));
                    tokio::spawn(forward(
                        s_rd,
                        c_wr,
                        cut_rx.clone(),
                        Direction::Down,
                        held.clone(),
                    ));
                }
            }
        });
        CutProxy {
            port,
            cut,
            task,
            held,
        }
    }

    /// Cuts `direction` of every connection, present and future.
    pub fn cut(&self, direction: Direction) {
        self.cut.send_replace(Some(Cut::Way(direction)));
    }

    /// From now on drops everything both ways and sends nothing, without a FIN: the TCP
    /// connections stay up (their kernels acknowledge every byte, so keepalive and
    /// `TCP_USER_TIMEOUT` see nothing wrong) but no frame arrives at either end, as with a
    /// hung peer or middlebox.
    pub fn swallow(&self) {
        self.cut.send_replace(Some(Cut::Swallow));
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until `from` ends (then a FIN to `to`) or `way` is cut (a FIN to
/// `to` at once, and whatever `from` still sends is read and dropped).
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<Option<Cut>>,
    way: Direction,
    held: Held,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = *cut.borrow_and_update();
        if now == Some(Cut::Way(way)) {
            let _ = to.shutdown().await;
            while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
        if now == Some(Cut::Swallow) {
            while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
            // Held as long as the proxy, so that no FIN goes on when the sender gives up.
            if let Ok(mut held) = held.lock() {
                held.push(to);
            }
            return;
        }
        tokio::select! {
            changed = cut.changed() => {
                if changed.is_err() {
                    // The proxy is gone: no cut will come.
                    let _ = tokio::io::copy(&mut from, &mut to).await;
                    let _ = to.shutdown().await;
                    return;
                }
            }
            n = from.read(&mut buf) => match n {
                Ok(n) if n > 0 => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    let _ = to.shutdown().await;
                    return;
                }
            },
        }
    }
}

/// A certificate authority for tests, made at test time (no key file in the repository).
pub struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

/// A certificate and its key, issued by a [`Ca`] or self-signed.
#[derive(Debug)]
pub struct Issued {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
    key_der: Vec<u8>,
}

fn params(names: &[&str], ca: bool) -> rcgen::CertificateParams {
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut p = rcgen::CertificateParams::new(names).expect("certificate names");
    if ca {
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
    }
    p
}

fn issued(cert: rcgen::Certificate, key: &rcgen::KeyPair) -> Issued {
    Issued {
        cert: cert.der().clone(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        key_der: key.serialize_der(),
    }
}

impl Ca {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut p = params(&[], true);
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("qmigrate test CA {name}"),
        );
        let cert = p.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// The CA's certificate, DER: what a client or server trusts.
    pub fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The CA itself as a server's certificate, as `openssl req -x509` makes a self-signed
    /// pair (CA:TRUE), for `names`.
    pub fn self_signed_ca(names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params(names, true).self_signed(&key).expect("certificate");
        issued(cert, &key)
    }

    /// A certificate for `names` (host names and IP addresses) signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params(names, false)
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        issued(cert, &key)
    }
}

impl Issued {
    /// A self-signed certificate for `names`.
    pub fn self_signed(names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params(names, false).self_signed(&key).expect("certificate");
        issued(cert, &key)
    }

    /// The chain to present: the certificate alone.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert.clone()]
    }

    /// The private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// The chain and key, as a client presents them.
    pub fn identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain(), self.key())
    }
}

/// A server with `cert`, requiring client certificates signed by `client_ca` if given.
pub fn server_tls(cert: &Issued, client_ca: Option<&Ca>) -> ServerTls {
    ServerTls::new(cert.chain(), cert.key(), client_ca.map(|ca| vec![ca.der()]))
        .expect("server TLS settings")
}

/// A client that checks the server with `check`, presenting `identity` if given.
pub fn client_tls(check: ServerCheck, identity: Option<&Issued>) -> ClientTls {
    ClientTls::new(check, identity.map(Issued::identity)).expect("client TLS settings")
}

/// A fresh CA, a server certificate for 127.0.0.1 signed by it, and a client that checks the
/// server against that CA.
pub fn test_tls() -> (ServerTls, ClientTls) {
    let ca = Ca::new("default");
    let cert = ca.issue(&["127.0.0.1", "localhost"]);
    (
        server_tls(&cert, None),
        client_tls(ServerCheck::Ca(vec![ca.der()]), None),
    )
}

/// Fails if `listener` gets a connection within [`QUIET`]: the destination must not be
/// touched (QEMU takes any connection as migration data).
pub async fn assert_no_connection(listener: &UnixListener, why: &str) {
    if let Ok(accepted) = tokio::time::timeout(QUIET, listener.accept()).await {
        panic!(
            "the destination got a connection ({why}): {:?}",
            accepted.map(|_| ())
        );
    }
}

/// Accepts one destination connection.
pub async fn accept(listener: &UnixListener) -> UnixStream {
    within(STEP, "a connection at the destination", listener.accept())
        .await
        .expect("accept at the destination")
        .0
}

/// Bytes per block of a [`Pattern`] stream.
const BLOCK: usize = 1 << 20;

/// Rotation between consecutive blocks: odd, so the first 2^20 blocks all differ.
const ROTATE: u64 = 7919;

/// A reproducible pseudo-random byte stream that costs next to nothing to produce and check,
/// even in a debug build: one block of xorshift64 output per seed, and block `k` of the stream
/// is that block rotated by `k * ROTATE`. Every block differs and every byte is random, so a
/// lost, repeated, reordered or altered byte anywhere shows as a mismatch at that offset, and
/// two seeds' streams differ from the first byte.
#[derive(Debug, Clone)]
pub struct Pattern {
    base: Vec<u8>,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        let mut x = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut base = Vec::with_capacity(BLOCK);
        while base.len() < BLOCK {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            base.extend_from_slice(&x.to_le_bytes());
        }
        Pattern { base }
    }

    /// The longest run of the stream that starts at `pos` and is contiguous in the block.
    pub fn at(&self, pos: u64) -> &[u8] {
        let (k, i) = (pos / BLOCK as u64, (pos % BLOCK as u64) as usize);
        let start = ((k.wrapping_mul(ROTATE) + i as u64) % BLOCK as u64) as usize;
        let run = (BLOCK - start).min(BLOCK - i);
        &self.base[start..start + run]
    }

    /// Bytes `pos..pos + len` of the stream.
    pub fn bytes(&self, mut pos: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let run = self.at(pos);
            let n = run.len().min(len - out.len());
            out.extend_from_slice(&run[..n]);
            pos += n as u64;
        }
        out
    }
}

/// Writes bytes `from..to` of `pattern` (no shutdown). On error, returns the stream offset
/// the failed write started at.
pub async fn write_range<W: AsyncWrite + Unpin>(
    w: &mut W,
    pattern: &Pattern,
    from: u64,
    to: u64,
) -> Result<(), (u64, io::Error)> {
    let mut pos = from;
    while pos < to {
        let run = pattern.at(pos);
        let n = run.len().min((to - pos) as usize).min(256 * 1024);
        w.write_all(&run[..n]).await.map_err(|e| (pos, e))?;
        pos += n as u64;
    }
    Ok(())
}

/// Writes the first `len` bytes of `pattern`, then shuts the write side down.
pub async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    pattern: &Pattern,
    len: u64,
) -> Result<(), (u64, io::Error)> {
    send_range(w, pattern, 0, len).await
}

/// Writes bytes `from..to` of `pattern`, then shuts the write side down.
pub async fn send_range<W: AsyncWrite + Unpin>(
    w: &mut W,
    pattern: &Pattern,
    from: u64,
    to: u64,
) -> Result<(), (u64, io::Error)> {
    write_range(w, pattern, from, to).await?;
    w.shutdown().await.map_err(|e| (to, e))
}

/// What a reader got, checked against the stream it expected.
#[derive(Debug)]
pub struct Received {
    /// Bytes read before EOF or the error.
    pub len: u64,
    /// Offset of the first byte that differs from the expected stream.
    pub mismatch_at: Option<u64>,
    /// The read error that ended the stream, if it did not end with EOF.
    pub error: Option<io::Error>,
}

impl Received {
    fn new(start: u64) -> Received {
        Received {
            len: start,
            mismatch_at: None,
            error: None,
        }
    }

    /// Takes the next bytes of the stream, checking them against `pattern`.
    fn check(&mut self, buf: &[u8], pattern: &Pattern) {
        let mut done = 0;
        while done < buf.len() && self.mismatch_at.is_none() {
            let expect = pattern.at(self.len + done as u64);
            let m = expect.len().min(buf.len() - done);
            if expect[..m] != buf[done..done + m] {
                let i = (0..m).find(|&i| expect[i] != buf[done + i]).unwrap_or(0);
                self.mismatch_at = Some(self.len + (done + i) as u64);
            }
            done += m;
        }
        self.len += buf.len() as u64;
    }

    /// Fails unless the stream was exactly `len` bytes of the expected data, then EOF.
    #[track_caller]
    pub fn assert_exact(&self, len: u64, what: &str) {
        assert!(self.error.is_none(), "{what}: read failed: {self:?}");
        assert_eq!(self.mismatch_at, None, "{what}: wrong byte at this offset");
        assert_eq!(self.len, len, "{what}: EOF after this many bytes");
    }

    /// Fails unless what arrived is a correct prefix of the expected stream.
    #[track_caller]
    pub fn assert_prefix(&self, what: &str) {
        assert_eq!(self.mismatch_at, None, "{what}: wrong byte at this offset");
    }
}

/// Reads until EOF or an error, comparing every byte with `pattern`.
pub async fn recv<R: AsyncRead + Unpin>(r: &mut R, pattern: &Pattern) -> Received {
    recv_from(r, pattern, 0, u64::MAX).await
}

/// Reads until EOF, an error or stream offset `until`, comparing every byte with `pattern`,
/// for a stream whose first `start` bytes were already read (`len` counts them).
pub async fn recv_from<R: AsyncRead + Unpin>(
    r: &mut R,
    pattern: &Pattern,
    start: u64,
    until: u64,
) -> Received {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = Received::new(start);
    while got.len < until {
        let want = buf
            .len()
            .min((until - got.len).try_into().unwrap_or(usize::MAX));
        match r.read(&mut buf[..want]).await {
            Ok(0) => break,
            Ok(n) => got.check(&buf[..n], pattern),
            Err(e) => {
                got.error = Some(e);
                break;
            }
        }
    }
    got
}

/// [`recv`] for a blocking socket.
pub fn recv_blocking<R: std::io::Read>(r: &mut R, pattern: &Pattern) -> Received {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = Received::new(0);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.check(&buf[..n], pattern),
            Err(e) => {
                got.error = Some(e);
                return got;
            }
        }
    }
}

/// [`send`] for a blocking socket.
pub fn send_blocking<W: std::io::Write>(
    w: &mut W,
    pattern: &Pattern,
    len: u64,
) -> Result<(), (u64, io::Error)> {
    let mut pos = 0;
    while pos < len {
        let run = pattern.at(pos);
        let n = run.len().min((len - pos) as usize).min(256 * 1024);
        w.write_all(&run[..n]).map_err(|e| (pos, e))?;
        pos += n as u64;
    }
    Ok(())
}

/// Runs `f` on a thread of its own, for blocking socket calls (QEMU's return path is read by
/// a thread of its own), and hands its result back. The thread is not joined: give its
/// sockets timeouts so that it ends even if the test fails.
pub fn on_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// Sends `len` bytes of `out` on `s` (then a half-close) while reading everything the peer
/// sends (checked against `inp`), both at once.
pub async fn duplex(s: UnixStream, out: Pattern, len: u64, inp: Pattern) -> Received {
    let (mut rd, mut wr) = s.into_split();
    let (sent, got) = tokio::join!(send(&mut wr, &out, len), recv(&mut rd, &inp));
    if let Err((n, e)) = sent {
        panic!("send failed at byte {n} of {len}: {e}");
    }
    got
}

/// Reads until the peer closes the connection (EOF or an error), failing the test if that
/// takes longer than [`STEP`]. Returns how many bytes came and the error, if any.
pub async fn read_until_closed<R: AsyncRead + Unpin>(
    r: &mut R,
    what: &str,
) -> (usize, Option<io::Error>) {
    within(STEP, what, async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return (total, None),
                Ok(n) => total += n,
                Err(e) => return (total, Some(e)),
            }
        }
    })
    .await
}

/// A tunnel peer driven by hand: plain TCP, or a WebSocket of tokio-tungstenite's. Not ours
/// on purpose: an independent implementation of the framing (what an older, tungstenite-based
/// qmigrate speaks), and one that sends what ours never would (text messages, oversized
/// frames, raw bytes).
#[derive(Debug)]
pub enum Peer {
    Tcp(TcpStream),
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl Peer {
    /// Connects to `url` (TCP, and the WebSocket upgrade for `ws://`).
    pub async fn connect(url: &Endpoint) -> Peer {
        Peer::connect_from(url).await.0
    }

    /// Connects to `url` as a data connection of `session` that speaks protocol versions up to
    /// `max_version` only, and checks that the server accepted it at that version.
    pub async fn connect_at_version(url: &Endpoint, session: &str, max_version: u32) -> Peer {
        let mut peer = Peer::connect(url).await;
        peer.send_msg(&protocol::Hello {
            max_version,
            ..protocol::Hello::data(session, 0)
        })
        .await
        .expect("hello");
        let reply: protocol::Reply = within(STEP, "the accept", peer.recv_msg())
            .await
            .expect("the accept");
        assert!(
            matches!(reply, protocol::Reply::Accept { version, .. } if version == max_version),
            "{reply:?}"
        );
        peer
    }

    /// As [`Peer::connect`], with the local address: the peer address the server logs.
    pub async fn connect_from(url: &Endpoint) -> (Peer, std::net::SocketAddr) {
        let tcp = within(
            STEP,
            "connect to the server",
            TcpStream::connect(url.authority()),
        )
        .await
        .expect("connect to the server");
        let local = tcp.local_addr().expect("local address");
        (Peer::client(tcp, url).await, local)
    }

    /// The client end on a connected `tcp`.
    pub async fn client(tcp: TcpStream, url: &Endpoint) -> Peer {
        match url.scheme {
            Scheme::Tcp => Peer::Tcp(tcp),
            Scheme::Ws => {
                let (ws, _) = within(
                    STEP,
                    "the WebSocket upgrade",
                    tokio_tungstenite::client_async(url.to_string(), tcp),
                )
                .await
                .expect("WebSocket upgrade");
                Peer::Ws(Box::new(ws))
            }
            other => unreachable!("a plain scheme only: {other:?}"),
        }
    }

    /// The server end on an accepted `tcp`; `None` if the upgrade failed.
    pub async fn accept(tcp: TcpStream, scheme: Scheme) -> Option<Peer> {
        match scheme {
            Scheme::Tcp => Some(Peer::Tcp(tcp)),
            Scheme::Ws => tokio_tungstenite::accept_async(tcp)
                .await
                .ok()
                .map(|ws| Peer::Ws(Box::new(ws))),
            other => unreachable!("a plain scheme only: {other:?}"),
        }
    }

    /// Sends `bytes` as they are (TCP) or as one binary message (WebSocket).
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        match self {
            Peer::Tcp(tcp) => tcp.write_all(&bytes).await.map_err(|e| e.to_string()),
            Peer::Ws(ws) => ws
                .send(Message::binary(bytes))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Sends a text message (WebSocket only).
    pub async fn send_text(&mut self, text: &str) -> Result<(), String> {
        match self {
            Peer::Ws(ws) => ws
                .send(Message::text(text))
                .await
                .map_err(|e| e.to_string()),
            Peer::Tcp(_) => unreachable!("text messages are WebSocket's"),
        }
    }

    /// Sends one handshake message given as its body.
    pub async fn send_body(&mut self, body: &[u8]) -> Result<(), String> {
        self.send_raw(protocol::envelope(body)).await
    }

    /// Sends one handshake message.
    pub async fn send_msg<T: serde::Serialize>(&mut self, msg: &T) -> Result<(), String> {
        self.send_raw(protocol::encode(msg)).await
    }

    /// Receives one handshake message's body (pings and pongs skipped).
    pub async fn recv_body(&mut self) -> Result<Vec<u8>, String> {
        match self {
            Peer::Tcp(tcp) => {
                let mut header = [0u8; 12];
                tcp.read_exact(&mut header)
                    .await
                    .map_err(|e| e.to_string())?;
                let len = protocol::parse_header(&header).map_err(|e| e.to_string())?;
                let mut body = vec![0u8; len as usize];
                tcp.read_exact(&mut body).await.map_err(|e| e.to_string())?;
                Ok(body)
            }
            Peer::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        return protocol::unwrap_envelope(&b)
                            .map(<[u8]>::to_vec)
                            .map_err(|e| e.to_string())
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(other)) => return Err(format!("not a binary message: {other:?}")),
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("closed".into()),
                }
            },
        }
    }

    /// Receives one handshake message.
    pub async fn recv_msg<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, String> {
        protocol::decode_body(&self.recv_body().await?).map_err(|e| e.to_string())
    }
}
