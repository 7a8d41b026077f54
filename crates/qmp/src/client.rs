//! The QMP connection: handshake, a background reader that routes replies by `id` and fans
//! events out to subscribers, and the calls that send commands.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

use crate::commands::Command;
use crate::error::Error;
use crate::models::{MigrationStatus, VersionInfo};

#[doc(hidden)]
pub mod fuzzing;

/// Longest line accepted from QEMU. `query-qmp-schema` is one line of ~120 KB; anything
/// beyond this is treated as a broken peer instead of being buffered without bound.
pub(crate) const MAX_LINE: usize = 16 << 20;

/// How many events a slow subscriber may fall behind before it skips some.
const EVENT_BUFFER: usize = 1024;

/// Timeouts for [`Qmp::connect`] and the default for every command.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Bound on establishing the socket connection.
    pub connect_timeout: Duration,
    /// Bound on receiving QEMU's greeting and negotiating capabilities; when it expires the
    /// socket is reported as [`Error::Busy`] (another client holds it).
    pub greeting_timeout: Duration,
    /// Default per-command bound used by [`Qmp::execute`] and [`Qmp::execute_raw`].
    pub command_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(5),
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// Where a QMP server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpTarget {
    /// A Unix socket path (`-qmp unix:PATH,server=on`).
    Unix(PathBuf),
    /// A TCP `host:port` (`-qmp tcp:HOST:PORT,server=on`).
    Tcp(String),
}

impl FromStr for QmpTarget {
    type Err = std::convert::Infallible;

    /// `tcp:HOST:PORT` is TCP; anything else (with an optional `unix:` prefix) is a socket path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if let Some(addr) = s.strip_prefix("tcp:") {
            QmpTarget::Tcp(addr.to_string())
        } else {
            QmpTarget::Unix(PathBuf::from(s.strip_prefix("unix:").unwrap_or(s)))
        })
    }
}

impl fmt::Display for QmpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpTarget::Unix(p) => write!(f, "{}", p.display()),
            QmpTarget::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// QEMU's greeting: its version and the QMP capabilities it offers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Greeting {
    /// The QEMU version (`QMP.version`).
    pub version: VersionInfo,
    /// Capabilities offered (`QMP.capabilities`, e.g. `["oob"]`); none are enabled by us.
    #[serde(default)]
    pub capabilities: Vec<Value>,
}

/// When QEMU emitted an event (host time).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// One QMP event, e.g. `MIGRATION` or `STOP`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// The event name.
    pub event: String,
    /// The event's data (`null` when it has none).
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Timestamp,
}

impl Event {
    /// The status of a `MIGRATION` event; `None` for other events or a malformed one.
    pub fn migration_status(&self) -> Option<MigrationStatus> {
        if self.event != "MIGRATION" {
            return None;
        }
        MigrationStatus::deserialize(self.data.get("status")?).ok()
    }

    /// The pass number of a `MIGRATION_PASS` event; `None` for other events.
    pub fn migration_pass(&self) -> Option<u64> {
        if self.event != "MIGRATION_PASS" {
            return None;
        }
        self.data.get("pass")?.as_u64()
    }
}

/// A subscription to the events of one connection, made by [`Qmp::events`].
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
}

impl Events {
    /// The next event. Returns [`Error::Disconnected`] once the connection has ended and every
    /// earlier event was received. A subscriber that fell more than 1024 events behind skips
    /// the oldest ones (logged as a warning) rather than failing.
    pub async fn recv(&mut self) -> Result<Event, Error> {
        loop {
            match self.rx.recv().await {
                Ok(ev) => return Ok(ev),
                Err(broadcast::error::RecvError::Closed) => return Err(Error::Disconnected),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "QMP event subscriber lagged, skipping events");
                }
            }
        }
    }
}

/// Why the connection ended, handed to every call made after that.
#[derive(Debug, Clone)]
enum Closed {
    Disconnected,
    Protocol(String),
}

impl Closed {
    fn to_error(&self) -> Error {
        match self {
            Closed::Disconnected => Error::Disconnected,
            Closed::Protocol(msg) => Error::Protocol(msg.clone()),
        }
    }
}

type Reply = Result<Value, Error>;

#[derive(Debug, Default)]
struct Pending {
    waiting: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    closed: Option<Closed>,
}

/// State shared by the handles and the reader task.
#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// `None` once the reader has ended, so subscribers see the end of the stream.
    events: Mutex<Option<broadcast::Sender<Event>>>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        // A panic while holding this lock cannot leave the map inconsistent; keep going.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the connection: fails every pending call with `why`.
    fn close(&self, why: Closed) {
        let waiting = {
            let mut p = self.pending();
            if p.closed.is_none() {
                p.closed = Some(why.clone());
            }
            std::mem::take(&mut p.waiting)
        };
        for (_, (_, tx)) in waiting {
            let _ = tx.send(Err(why.to_error()));
        }
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<Option<Writer>>,
    reader: JoinHandle<()>,
    next_id: AtomicU64,
    greeting: Greeting,
    command_timeout: Duration,
    target: String,
}

/// The write side of the connection; concrete so a Unix socket can also pass file descriptors.
#[derive(Debug)]
enum Writer {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

impl Writer {
    /// Writes `line`; with `fd`, the descriptor rides along (SCM_RIGHTS) with its first bytes.
    async fn send(&mut self, line: &[u8], fd: Option<RawFd>) -> std::io::Result<()> {
        let mut rest = line;
        if let Some(fd) = fd {
            let Writer::Unix(w) = self else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "file descriptors can only be passed over a Unix socket",
                ));
            };
            let sock: &tokio::net::UnixStream = w.as_ref();
            loop {
                sock.writable().await?;
                match sock.try_io(tokio::io::Interest::WRITABLE, || {
                    crate::fdpass::send_with_fd(sock.as_raw_fd(), rest, fd)
                }) {
                    Ok(n) => {
                        rest = &rest[n..];
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }
        match self {
            Writer::Unix(w) => {
                w.write_all(rest).await?;
                w.flush().await
            }
            Writer::Tcp(w) => {
                w.write_all(rest).await?;
                w.flush().await
            }
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            Writer::Unix(w) => w.shutdown().await,
            Writer::Tcp(w) => w.shutdown().await,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
        self.shared.close(Closed::Disconnected);
    }
}

/// A handle to one QMP connection. Cloning is cheap and every clone talks over the same
/// connection; the connection closes when the last clone is dropped or on [`Qmp::close`].
///
/// Commands may be issued concurrently from many tasks: each carries its own `id`.
#[derive(Debug, Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl Qmp {
    /// Connects to `target`, reads the greeting and negotiates capabilities.
    ///
    /// Errors: [`Error::Io`] when the socket cannot be reached, [`Error::Busy`] when no
    /// greeting arrives within `greeting_timeout`, [`Error::Greeting`] when the peer does not
    /// speak QMP.
    pub async fn connect(target: &QmpTarget, opts: &ConnectOptions) -> Result<Qmp, Error> {
        match target {
            QmpTarget::Unix(path) => Qmp::connect_unix(path, opts).await,
            QmpTarget::Tcp(addr) => Qmp::connect_tcp(addr, opts).await,
        }
    }

    /// Connects to a QMP Unix socket; see [`Qmp::connect`].
    pub async fn connect_unix(path: impl AsRef<Path>, opts: &ConnectOptions) -> Result<Qmp, Error> {
        let path = path.as_ref();
        let target = path.display().to_string();
        let context = format!("connecting to QMP socket {target}");
        let stream =
            match tokio::time::timeout(opts.connect_timeout, tokio::net::UnixStream::connect(path))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(Error::Io { context, source }),
                Err(_) => return Err(connect_timed_out(context, opts.connect_timeout)),
            };
        let (r, w) = stream.into_split();
        Qmp::handshake(target, Box::new(r), Writer::Unix(w), opts).await
    }

    /// Connects to a QMP TCP server at `host:port`; see [`Qmp::connect`].
    pub async fn connect_tcp(addr: &str, opts: &ConnectOptions) -> Result<Qmp, Error> {
        let target = format!("tcp:{addr}");
        let context = format!("connecting to QMP at {target}");
        let stream =
            match tokio::time::timeout(opts.connect_timeout, tokio::net::TcpStream::connect(addr))
                .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(source)) => return Err(Error::Io { context, source }),
                Err(_) => return Err(connect_timed_out(context, opts.connect_timeout)),
            };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Qmp::handshake(target, Box::new(r), Writer::Tcp(w), opts).await
    }

    #[tracing::instrument(level = "debug", skip(reader, writer, opts))]
    async fn handshake(
        target: String,
        reader: Box<dyn AsyncRead + Send + Unpin>,
        mut writer: Writer,
        opts: &ConnectOptions,
    ) -> Result<Qmp, Error> {
        let mut reader = BufReader::new(reader);
        let mut line = Vec::new();
        let busy = || Error::Busy {
            target: target.clone(),
            after: opts.greeting_timeout,
        };
        let deadline = tokio::time::Instant::now() + opts.greeting_timeout;

        let got = tokio::time::timeout_at(deadline, read_line(&mut reader, &mut line))
            .await
            .map_err(|_| busy())?;
        let greeting_value = handshake_line(got, &line, &target, "greeting")?;
        tracing::trace!(greeting = %greeting_value, "qmp <- greeting");
        let greeting = parse_greeting(&greeting_value, &target)?;

        let negotiate = b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n";
        tracing::debug!(command = "qmp_capabilities", args = "{}", "qmp ->");
        match tokio::time::timeout_at(deadline, writer.send(negotiate, None)).await {
            Err(_) => return Err(busy()),
            Ok(Err(e)) => {
                return Err(Error::Greeting(format!(
                    "{target}: sending qmp_capabilities failed: {e}"
                )))
            }
            Ok(Ok(())) => {}
        }
        loop {
            let got = tokio::time::timeout_at(deadline, read_line(&mut reader, &mut line))
                .await
                .map_err(|_| busy())?;
            let msg = handshake_line(got, &line, &target, "qmp_capabilities reply")?;
            tracing::trace!(reply = %msg, "qmp <-");
            if msg.get("return").is_some() {
                break;
            }
            if let Some(err) = msg.get("error") {
                return Err(Error::Greeting(format!(
                    "{target} refused qmp_capabilities: {err}"
                )));
            }
            // Events cannot come before negotiation, but tolerate anything else.
        }

        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            events: Mutex::new(Some(events)),
        });
        let reader_task = tokio::spawn(read_loop(reader, shared.clone()));
        Ok(Qmp {
            inner: Arc::new(Inner {
                shared,
                writer: tokio::sync::Mutex::new(Some(writer)),
                reader: reader_task,
                next_id: AtomicU64::new(1),
                greeting,
                command_timeout: opts.command_timeout,
                target,
            }),
        })
    }

    /// QEMU's greeting (version and offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// The socket path or `tcp:host:port` this connection talks to, for messages.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// Runs a typed command with the connection's default timeout and decodes its reply.
    ///
    /// Errors: [`Error::Qmp`] when QEMU refuses it, [`Error::Decode`] when the reply has an
    /// unexpected shape (the connection stays usable), [`Error::Timeout`],
    /// [`Error::Disconnected`], [`Error::Protocol`].
    pub async fn execute<C: Command>(&self, cmd: &C) -> Result<C::Reply, Error> {
        self.execute_with_timeout(cmd, self.inner.command_timeout)
            .await
    }

    /// Like [`Qmp::execute`] with an explicit timeout (e.g. for a slow `pmemsave`).
    pub async fn execute_with_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Reply, Error> {
        self.execute_inner(cmd, timeout, None).await
    }

    /// Runs a command with a file descriptor attached (SCM_RIGHTS), e.g. [`crate::Getfd`] to
    /// give QEMU a socket under a name. Unix sockets only: over TCP this fails with
    /// [`Error::InvalidArguments`]. QEMU keeps its own copy; `fd` stays open here.
    pub async fn execute_with_fd<C: Command>(
        &self,
        cmd: &C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Reply, Error> {
        if !matches!(
            self.inner.writer.lock().await.as_ref(),
            Some(Writer::Unix(_)) | None
        ) {
            return Err(Error::InvalidArguments(format!(
                "{}: file descriptors can only be passed over a Unix socket",
                C::NAME
            )));
        }
        self.execute_inner(cmd, self.inner.command_timeout, Some(fd.as_raw_fd()))
            .await
    }

    async fn execute_inner<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
        fd: Option<RawFd>,
    ) -> Result<C::Reply, Error> {
        let args = serde_json::to_value(cmd)
            .map_err(|e| Error::InvalidArguments(format!("{}: {e}", C::NAME)))?;
        let args = match args {
            Value::Null => None,
            Value::Object(m) if m.is_empty() => None,
            Value::Object(m) => Some(Value::Object(m)),
            other => {
                return Err(Error::InvalidArguments(format!(
                    "{}: arguments must be a JSON object, got {other}",
                    C::NAME
                )))
            }
        };
        let reply = self.call(C::NAME, args, timeout, fd).await?;
        decode_reply::<C>(reply)
    }

    /// Runs any command by name and returns the raw `return` value, with the default timeout.
    /// `args` must be a JSON object or `None`.
    pub async fn execute_raw(&self, name: &str, args: Option<Value>) -> Result<Value, Error> {
        if let Some(a) = &args {
            if !a.is_object() {
                return Err(Error::InvalidArguments(format!(
                    "{name}: arguments must be a JSON object, got {a}"
                )));
            }
        }
        self.call(name, args, self.inner.command_timeout, None)
            .await
    }

    async fn call(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
        fd: Option<RawFd>,
    ) -> Result<Value, Error> {
        let shared = &self.inner.shared;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = shared.pending();
            if let Some(closed) = &p.closed {
                return Err(closed.to_error());
            }
            p.waiting.insert(id, (name.to_string(), tx));
        }
        // Removes our entry however this call ends (timeout, cancellation, error).
        let _guard = PendingGuard { shared, id };

        let mut msg = serde_json::Map::new();
        msg.insert("execute".into(), Value::String(name.to_string()));
        if let Some(a) = &args {
            msg.insert("arguments".into(), a.clone());
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = Value::Object(msg).to_string();
        line.push('\n');
        let args_text = args
            .as_ref()
            .map_or_else(|| "{}".to_string(), Value::to_string);
        tracing::debug!(command = %name, args = %args_text, id, "qmp ->");

        let exchange = async {
            {
                let mut w = self.inner.writer.lock().await;
                let Some(w) = w.as_mut() else {
                    return Err(Error::Disconnected);
                };
                if let Err(e) = w.send(line.as_bytes(), fd).await {
                    tracing::debug!(error = %e, command = %name, "qmp write failed");
                    return Err(Error::Disconnected);
                }
            }
            match rx.await {
                Ok(reply) => reply,
                Err(_) => Err(Error::Disconnected),
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                command: name.to_string(),
                after: timeout,
            }),
        }
    }

    /// Subscribes to events: the returned [`Events`] gets every event arriving after this call.
    /// On a closed connection it reports [`Error::Disconnected`] at once.
    pub fn events(&self) -> Events {
        let guard = self
            .inner
            .shared
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let rx = match guard.as_ref() {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        };
        Events { rx }
    }

    /// Closes the connection politely (shuts the socket down). Every clone of this handle sees
    /// [`Error::Disconnected`] afterwards. Dropping the last clone also closes it.
    pub async fn close(self) {
        if let Some(mut w) = self.inner.writer.lock().await.take() {
            let _ = w.shutdown().await;
        }
        self.inner.reader.abort();
        self.inner.shared.close(Closed::Disconnected);
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending().waiting.remove(&self.id);
    }
}

fn connect_timed_out(context: String, after: Duration) -> Error {
    Error::Io {
        context,
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {after:?}"),
        ),
    }
}

/// The greeting in QEMU's first line (`{"QMP": {...}}`).
fn parse_greeting(greeting: &Value, target: &str) -> Result<Greeting, Error> {
    let g = greeting.get("QMP").cloned().ok_or_else(|| {
        Error::Greeting(format!(
            "{target} sent {greeting} instead of a QMP greeting"
        ))
    })?;
    Greeting::deserialize(g)
        .map_err(|e| Error::Greeting(format!("{target}: malformed greeting: {e}")))
}

/// Decodes the `return` value of `C` into its typed reply.
fn decode_reply<C: Command>(reply: Value) -> Result<C::Reply, Error> {
    serde_json::from_value(reply).map_err(|source| Error::Decode {
        command: C::NAME.to_string(),
        source,
    })
}

/// Interprets one handshake line.
fn handshake_line(
    got: std::io::Result<Line>,
    line: &[u8],
    target: &str,
    what: &str,
) -> Result<Value, Error> {
    match got {
        Ok(Line::Complete) => serde_json::from_slice(line).map_err(|e| {
            Error::Greeting(format!(
                "{target}: {what} is not JSON ({e}): {}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            ))
        }),
        Ok(Line::Eof) => Err(Error::Greeting(format!(
            "{target} closed the connection before the {what}"
        ))),
        Ok(Line::TooLong) => Err(Error::Greeting(format!(
            "{target}: {what} longer than {MAX_LINE} bytes"
        ))),
        Err(e) => Err(Error::Greeting(format!(
            "{target}: reading the {what}: {e}"
        ))),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Line {
    Complete,
    Eof,
    TooLong,
}

/// Reads one `\n`-terminated line into `buf` (without the line ending), refusing lines longer
/// than [`MAX_LINE`]. A final unterminated line counts as a line.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    buf.clear();
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Complete
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        buf.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if buf.len() > MAX_LINE + 2 {
            return Ok(Line::TooLong);
        }
        if done {
            while matches!(buf.last(), Some(b'\n' | b'\r')) {
                buf.pop();
            }
            return Ok(Line::Complete);
        }
    }
}

/// The background reader: routes replies to callers and events to subscribers until the
/// connection ends or the peer breaks the protocol.
async fn read_loop<R: AsyncBufRead + Unpin>(mut reader: R, shared: Arc<Shared>) {
    let mut line = Vec::new();
    let why = loop {
        match read_line(&mut reader, &mut line).await {
            Ok(Line::Complete) => {}
            Ok(Line::Eof) => break Closed::Disconnected,
            Ok(Line::TooLong) => {
                break Closed::Protocol(format!("QEMU sent a line longer than {MAX_LINE} bytes"))
            }
            Err(e) => {
                tracing::debug!(error = %e, "qmp read failed");
                break Closed::Disconnected;
            }
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg: Value = match serde_json::from_slice(&line) {
            Ok(v) => v,
            Err(e) => {
                break Closed::Protocol(format!(
                    "malformed JSON from QEMU ({e}): {}",
                    String::from_utf8_lossy(&line[..line.len().min(200)])
                ))
            }
        };
        if let Some(why) = dispatch(&shared, msg) {
            break why;
        }
    };
    tracing::debug!(reason = ?why, "qmp connection ended");
    shared.close(why);
}

/// Handles one message; returns why the connection must end, if it must.
fn dispatch(shared: &Shared, msg: Value) -> Option<Closed> {
    if msg.get("event").is_some() {
        match serde_json::from_value::<Event>(msg) {
            Ok(ev) => {
                tracing::trace!(event = %ev.event, data = %ev.data, "qmp <- event");
                if let Some(tx) = shared
                    .events
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    // No subscribers is fine: events are then dropped.
                    let _ = tx.send(ev);
                }
            }
            Err(e) => tracing::debug!(error = %e, "dropping malformed QMP event"),
        }
        return None;
    }
    let id = msg.get("id").cloned();
    let Some(id) = id else {
        if let Some(err) = msg.get("error") {
            // QEMU answers without our id only when it could not parse what we sent.
            return Some(Closed::Protocol(format!(
                "QEMU could not parse a command: {}",
                describe_error(err).1
            )));
        }
        tracing::debug!(message = %msg, "dropping QMP message without id");
        return None;
    };
    let entry = id
        .as_u64()
        .and_then(|id| shared.pending().waiting.remove(&id));
    let Some((command, tx)) = entry else {
        tracing::debug!(id = %id, "dropping QMP reply with unknown id");
        return None;
    };
    tracing::trace!(command = %command, id = %id, reply = %msg, "qmp <-");
    let reply = if let Some(ret) = msg.get("return") {
        Ok(ret.clone())
    } else if let Some(err) = msg.get("error") {
        let (class, desc) = describe_error(err);
        Err(Error::Qmp {
            command,
            class,
            desc,
        })
    } else {
        Err(Error::Protocol(format!(
            "reply to {command} has neither return nor error: {msg}"
        )))
    };
    let _ = tx.send(reply);
    None
}

fn describe_error(err: &Value) -> (String, String) {
    let class = err
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or("GenericError")
        .to_string();
    let desc = err
        .get("desc")
        .and_then(Value::as_str)
        .map_or_else(|| err.to_string(), str::to_string);
    (class, desc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_line_limits_and_strips() {
        let data = b"{\"a\":1}\r\nlast".to_vec();
        let mut r = BufReader::new(&data[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut r, &mut buf).await.expect("read"),
            Line::Complete
        );
        assert_eq!(buf, b"{\"a\":1}");
        assert_eq!(
            read_line(&mut r, &mut buf).await.expect("read"),
            Line::Complete
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line(&mut r, &mut buf).await.expect("read"), Line::Eof);

        let long = vec![b'x'; MAX_LINE + 10];
        let mut r = BufReader::new(&long[..]);
        assert_eq!(
            read_line(&mut r, &mut buf).await.expect("read"),
            Line::TooLong
        );
    }

    #[test]
    fn target_parse() {
        assert_eq!(
            "tcp:localhost:4444".parse::<QmpTarget>(),
            Ok(QmpTarget::Tcp("localhost:4444".into()))
        );
        assert_eq!(
            "/run/q.sock".parse::<QmpTarget>(),
            Ok(QmpTarget::Unix("/run/q.sock".into()))
        );
        assert_eq!(
            "unix:/run/q.sock".parse::<QmpTarget>(),
            Ok(QmpTarget::Unix("/run/q.sock".into()))
        );
    }
}
