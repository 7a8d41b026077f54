//! Error paths against a scripted QMP peer: each test starts a tiny server on a Unix socket in
//! a temp dir that greets, negotiates and then plays a fixed script.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

use qmigrate_qmp::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "test"}, "capabilities": ["oob"]}}"#;

/// The peer side of one connection.
struct Peer {
    r: BufReader<Box<dyn AsyncRead + Send + Unpin>>,
    w: Box<dyn AsyncWrite + Send + Unpin>,
}

impl Peer {
    async fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
        self.w.write_all(b"\r\n").await.unwrap();
        self.w.flush().await.unwrap();
    }

    /// Reads one command; returns it parsed.
    async fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).await.unwrap();
        assert!(n > 0, "client closed");
        serde_json::from_str(&line).unwrap()
    }

    /// Reads a command, checks its name, returns its id.
    async fn expect(&mut self, name: &str) -> Value {
        let cmd = self.recv().await;
        assert_eq!(cmd["execute"], name, "{cmd}");
        cmd["id"].clone()
    }

    async fn reply(&mut self, id: &Value, ret: Value) {
        self.send(&json!({"return": ret, "id": id}).to_string())
            .await;
    }

    /// Waits until the client closes the connection.
    async fn wait_close(&mut self) {
        let mut line = String::new();
        while self
            .r
            .read_line(&mut line)
            .await
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            line.clear();
        }
    }

    async fn handshake(&mut self) {
        self.send(GREETING).await;
        let id = self.expect("qmp_capabilities").await;
        self.reply(&id, json!({})).await;
    }
}

struct Fake {
    _dir: tempfile::TempDir,
    path: PathBuf,
    task: JoinHandle<()>,
}

/// Starts a peer that accepts one client and runs `script` (after nothing: the script greets).
fn fake<F, Fut>(script: F) -> Fake
where
    F: FnOnce(Peer) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (r, w) = s.into_split();
        let r: Box<dyn AsyncRead + Send + Unpin> = Box::new(r);
        script(Peer {
            r: BufReader::new(r),
            w: Box::new(w),
        })
        .await;
    });
    Fake {
        _dir: dir,
        path,
        task,
    }
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        connect_timeout: Duration::from_secs(2),
        greeting_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(5),
    }
}

async fn connect(f: &Fake) -> Qmp {
    Qmp::connect_unix(&f.path, &opts()).await.unwrap()
}

#[tokio::test]
async fn events_interleaved_with_replies() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("query-status").await;
        p.send(r#"{"event": "MIGRATION", "data": {"status": "active"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#).await;
        p.send(r#"{"event": "MIGRATION_PASS", "data": {"pass": 3}, "timestamp": {"seconds": 1, "microseconds": 3}}"#).await;
        p.reply(&id, json!({"running": true, "status": "running"}))
            .await;
        p.send(r#"{"event": "STOP", "timestamp": {"seconds": 2, "microseconds": 0}}"#)
            .await;
        // Keep the connection open until the client is done.
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    assert_eq!(qmp.greeting().version.qemu.major, 10);
    assert_eq!(qmp.greeting().capabilities, vec![json!("oob")]);
    let mut a = qmp.events();
    let mut b = qmp.events();
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(st.status, RunState::Running);
    for ev in [&mut a, &mut b] {
        let e1 = ev.recv().await.unwrap();
        assert_eq!(e1.migration_status(), Some(MigrationStatus::Active));
        assert_eq!(e1.timestamp.microseconds, 2);
        let e2 = ev.recv().await.unwrap();
        assert_eq!(e2.migration_pass(), Some(3));
        assert_eq!(e2.migration_status(), None);
        let e3 = ev.recv().await.unwrap();
        assert_eq!(e3.event, "STOP");
        assert_eq!(e3.data, Value::Null);
    }
    qmp.close().await;
}

#[tokio::test]
async fn error_reply_is_typed_and_connection_survives() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("migrate-incoming").await;
        p.send(&json!({"error": {"class": "GenericError", "desc": "boom"}, "id": id}).to_string())
            .await;
        let id = p.expect("query-version").await;
        p.reply(
            &id,
            json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}),
        )
        .await;
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let err = qmp
        .execute(&MigrateIncoming::new(MigrationTarget::Uri(
            "tcp:[::]:4444".into(),
        )))
        .await
        .unwrap_err();
    match err {
        Error::Qmp {
            command,
            class,
            desc,
        } => {
            assert_eq!(
                (command.as_str(), class.as_str(), desc.as_str()),
                ("migrate-incoming", "GenericError", "boom")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(qmp.execute(&QueryVersion).await.unwrap().qemu.micro, 2);
}

#[tokio::test]
async fn malformed_json_is_fatal_protocol_error() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let _ = p.expect("query-status").await;
        p.send("{this is not json").await;
        // Stay connected: the client must fail on its own.
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&f).await;
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("malformed JSON")),
        "{err:?}"
    );
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
    assert!(matches!(
        qmp.events().recv().await,
        Err(Error::Disconnected)
    ));
}

#[tokio::test]
async fn error_without_id_fails_pending_calls() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let _ = p.expect("query-status").await;
        p.send(
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword"}}"#,
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&f).await;
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("invalid keyword")),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_id_is_dropped_and_real_reply_matched() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("query-migrate").await;
        p.send(r#"{"return": {"status": "failed"}, "id": 987654}"#)
            .await;
        p.send(r#"{"return": {"status": "failed"}, "id": "not-ours"}"#)
            .await;
        p.reply(&id, json!({"status": "completed", "downtime": 156}))
            .await;
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let info = qmp.execute(&QueryMigrate).await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Completed));
    assert_eq!(info.downtime, Some(156));
}

#[tokio::test]
async fn concurrent_calls_answered_out_of_order() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let a = p.recv().await;
        let b = p.recv().await;
        for cmd in [b, a] {
            let ret = json!(cmd["execute"].as_str().unwrap());
            p.reply(&cmd["id"], json!({"echo": ret})).await;
        }
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let (x, y) = tokio::join!(
        qmp.execute_raw("first", None),
        qmp.execute_raw("second", None)
    );
    assert_eq!(x.unwrap()["echo"], "first");
    assert_eq!(y.unwrap()["echo"], "second");
}

#[tokio::test]
async fn disconnect_mid_command_gives_disconnected() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let _ = p.expect("query-migrate").await;
        // Drop the connection without answering.
    });
    let qmp = connect(&f).await;
    let mut events = qmp.events();
    let err = tokio::time::timeout(Duration::from_secs(3), qmp.execute(&QueryMigrate))
        .await
        .expect("no hang")
        .unwrap_err();
    assert!(matches!(err, Error::Disconnected), "{err:?}");
    assert!(matches!(events.recv().await, Err(Error::Disconnected)));
    assert!(matches!(
        qmp.execute(&QueryMigrate).await,
        Err(Error::Disconnected)
    ));
}

#[tokio::test]
async fn no_greeting_is_busy() {
    let f = fake(|mut p| async move {
        // Accept but never greet, like QEMU while another client holds the monitor.
        p.wait_close().await;
    });
    let opts = ConnectOptions {
        greeting_timeout: Duration::from_millis(200),
        ..opts()
    };
    let started = std::time::Instant::now();
    let err = Qmp::connect_unix(&f.path, &opts).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(err, Error::Busy { .. }), "{err:?}");
    assert!(err.is_unreachable());
    let msg = err.to_string();
    assert!(msg.contains("QMP socket busy"), "{msg}");
    assert!(msg.contains(&f.path.display().to_string()), "{msg}");
    assert!(msg.contains("200ms"), "{msg}");
    f.task.abort();
}

#[tokio::test]
async fn not_a_qmp_greeting() {
    let f = fake(|mut p| async move {
        p.send(r#"{"hello": "world"}"#).await;
        p.wait_close().await;
    });
    let err = Qmp::connect_unix(&f.path, &opts()).await.unwrap_err();
    assert!(matches!(err, Error::Greeting(_)), "{err:?}");
    assert!(err.is_unreachable());
}

#[tokio::test]
async fn missing_socket_is_io_error_naming_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.sock");
    let err = Qmp::connect_unix(&path, &opts()).await.unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.is_unreachable());
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    let target: QmpTarget = path.display().to_string().parse().unwrap();
    assert!(Qmp::connect(&target, &opts())
        .await
        .unwrap_err()
        .is_unreachable());
}

#[tokio::test]
async fn call_after_failed_decode_still_works() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("query-status").await;
        p.reply(&id, json!({"running": "yes", "status": 7})).await;
        let id = p.expect("query-status").await;
        p.reply(
            &id,
            json!({"running": false, "status": "some-future-state", "new": 1}),
        )
        .await;
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let err = qmp.execute(&QueryStatus).await.unwrap_err();
    assert!(
        matches!(&err, Error::Decode { command, .. } if command == "query-status"),
        "{err:?}"
    );
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(st.status, RunState::Other);
}

#[tokio::test]
async fn timeout_then_late_reply_is_dropped() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let late = p.expect("query-migrate").await;
        let id = p.expect("query-version").await;
        p.reply(&late, json!({"status": "active"})).await;
        p.reply(
            &id,
            json!({"qemu": {"major": 10, "minor": 1, "micro": 0}, "package": ""}),
        )
        .await;
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let err = qmp
        .execute_with_timeout(&QueryMigrate, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Timeout { command, after } if command == "query-migrate" && *after == Duration::from_millis(100)),
        "{err:?}"
    );
    assert_eq!(qmp.execute(&QueryVersion).await.unwrap().qemu.minor, 1);
}

#[tokio::test]
async fn overlong_line_is_protocol_error() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("query-qmp-schema").await;
        let big = "x".repeat(17 << 20);
        p.send(&format!(r#"{{"return": ["{big}"], "id": {id}}}"#))
            .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let qmp = connect(&f).await;
    let err = qmp.execute(&QueryQmpSchema).await.unwrap_err();
    assert!(
        matches!(&err, Error::Protocol(m) if m.contains("longer than")),
        "{err:?}"
    );
}

#[tokio::test]
async fn big_schema_line_within_limit_is_fine() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("query-qmp-schema").await;
        let entries: Vec<Value> = (0..20_000)
            .map(|i| json!({"name": i.to_string(), "meta-type": "builtin", "json-type": "int"}))
            .collect();
        p.reply(&id, Value::Array(entries)).await;
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    assert_eq!(qmp.execute(&QueryQmpSchema).await.unwrap().len(), 20_000);
}

#[tokio::test]
async fn sends_exact_arguments_and_id() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let f = fake(|mut p| async move {
        p.handshake().await;
        let cmd = p.recv().await;
        p.reply(&cmd["id"], json!({})).await;
        tx.send(cmd).unwrap();
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let addr: MigrationAddress = "unix:/tmp/in.sock".parse().unwrap();
    qmp.execute(
        &MigrateIncoming::new(MigrationTarget::from_address(addr, true)).exit_on_error(false),
    )
    .await
    .unwrap();
    let cmd = rx.await.unwrap();
    assert!(cmd["id"].is_u64(), "{cmd}");
    assert_eq!(
        cmd["arguments"],
        json!({"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/in.sock"}}], "exit-on-error": false})
    );
}

#[tokio::test]
async fn tcp_connect() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (r, w) = s.into_split();
        let r: Box<dyn AsyncRead + Send + Unpin> = Box::new(r);
        let mut p = Peer {
            r: BufReader::new(r),
            w: Box::new(w),
        };
        p.handshake().await;
        let id = p.expect("query-status").await;
        p.reply(&id, json!({"running": false, "status": "inmigrate"}))
            .await;
        p.wait_close().await;
    });
    let target: QmpTarget = format!("tcp:{addr}").parse().unwrap();
    let qmp = Qmp::connect(&target, &opts()).await.unwrap();
    assert_eq!(
        qmp.execute(&QueryStatus).await.unwrap().status,
        RunState::InMigrate
    );
    // Descriptors cannot travel over TCP; refused before anything is sent.
    let (_r, w) = std::io::pipe().unwrap();
    let err = qmp
        .execute_with_fd(&Getfd { fdname: "x".into() }, std::os::fd::AsFd::as_fd(&w))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArguments(m) if m.contains("Unix socket")),
        "{err:?}"
    );
    drop(qmp);
    task.await.unwrap();
}

#[tokio::test]
async fn lagging_subscriber_skips_instead_of_failing() {
    let f = fake(|mut p| async move {
        p.handshake().await;
        let id = p.expect("query-status").await;
        for i in 0..1100 {
            p.send(&json!({"event": "MIGRATION_PASS", "data": {"pass": i}, "timestamp": {"seconds": 0, "microseconds": 0}}).to_string()).await;
        }
        p.reply(&id, json!({"running": true, "status": "running"}))
            .await;
        p.wait_close().await;
    });
    let qmp = connect(&f).await;
    let mut events = qmp.events();
    qmp.execute(&QueryStatus).await.unwrap();
    // The reply came after all events, so all 1100 were broadcast; only the last 1024 are kept.
    let first = events.recv().await.unwrap();
    assert_eq!(first.migration_pass(), Some(1100 - 1024));
    let mut last = first;
    for _ in 1..1024 {
        last = events.recv().await.unwrap();
    }
    assert_eq!(last.migration_pass(), Some(1099));
}

/// Records every tracing event as `message field=value ...` lines.
#[derive(Clone, Default)]
struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

impl tracing::Subscriber for Recorder {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = Line(format!("{}", event.metadata().level()));
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[test]
fn commands_logged_at_debug_replies_at_trace() {
    let rec = Recorder::default();
    tracing::subscriber::with_default(rec.clone(), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let f = fake(|mut p| async move {
                    p.handshake().await;
                    let id = p.expect("pmemsave").await;
                    p.reply(&id, json!({})).await;
                    p.wait_close().await;
                });
                let qmp = connect(&f).await;
                qmp.execute(&Pmemsave {
                    val: 0,
                    size: 4096,
                    filename: "/tmp/d".into(),
                })
                .await
                .unwrap();
            });
    });
    let lines = rec.0.lock().unwrap().clone();
    let sent = lines
        .iter()
        .find(|l| l.contains("command=pmemsave") && l.contains("qmp ->"))
        .unwrap_or_else(|| panic!("no debug line for pmemsave in {lines:#?}"));
    assert!(sent.starts_with("DEBUG"), "{sent}");
    assert!(
        sent.contains(r#"args={"filename":"/tmp/d","size":4096,"val":0}"#),
        "{sent}"
    );
    let got = lines
        .iter()
        .find(|l| l.contains("command=pmemsave") && l.contains("qmp <-"))
        .unwrap_or_else(|| panic!("no trace line for the reply in {lines:#?}"));
    assert!(got.starts_with("TRACE"), "{got}");
}
