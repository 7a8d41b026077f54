//! End-to-end tests: real QEMU processes, the real `qmigrate` binary, real guest RAM.
//!
//! Every test starts its own QEMU pair in its own temporary directory, runs the tunnel on port 0
//! and `receive`/`send` as processes of the built binary, then checks the result over QMP: both
//! sides `completed` and the destination's RAM byte-identical to the source's.

use crate::support;
use support::path;

use std::path::Path;
use std::time::Duration;

use qmigrate_qmp::{MigrationStatus, RunState};
use support::proc::{run, Output, Proc};
use support::qemu::{self, QemuBinary, Vm, VmConfig};
use support::tunnel::{Transport, Tunnel};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Guest RAM for migrations that should be quick.
const MEM_MIB: u64 = 128;
/// Deadline for one `qmigrate` run that is expected to finish.
const RUN: Duration = Duration::from_secs(120);

fn qemu10() -> Option<QemuBinary> {
    qemu::require(qemu::qemu10(), "QEMU 10")
}

fn qemu72() -> Option<QemuBinary> {
    qemu::require(qemu::qemu72(), "QEMU 7.2")
}

/// A source VM (random RAM, running) and a destination VM (`-incoming defer`, started with `-S`
/// so that it stays paused after the migration and its RAM can be compared with the source's).
struct Pair {
    src: Vm,
    dst: Vm,
    mem_mib: u64,
    dir: tempfile::TempDir,
}

/// The destination as [`qemu::destination_config`] describes it.
fn pair_with(
    src_bin: &QemuBinary,
    dst_bin: &QemuBinary,
    mem_mib: u64,
    machine: Option<&str>,
) -> Pair {
    let dir = tempfile::tempdir().expect("tempdir");
    let machine = machine.unwrap_or("q35").to_owned();
    let src = Vm::start(
        src_bin,
        &VmConfig {
            mem_mib,
            random_ram: true,
            machine: machine.clone(),
            ..VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let dst = Vm::start(
        dst_bin,
        &VmConfig {
            machine,
            ..qemu::destination_config(mem_mib)
        },
    )
    .expect("start the destination QEMU");
    Pair {
        src,
        dst,
        mem_mib,
        dir,
    }
}

fn pair(bin: &QemuBinary, mem_mib: u64) -> Pair {
    pair_with(bin, bin, mem_mib, None)
}

impl Pair {
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `qmigrate receive` on the destination, which must succeed and say it is ready.
    async fn receive(&self, socket_args: &[String], extra: &[&str]) -> Output {
        let mut args = vec![
            "receive".to_owned(),
            "--qmp".to_owned(),
            path(&self.dst.qmp_path),
        ];
        args.extend(socket_args.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = run(&args, RUN).await;
        out.expect_success();
        assert!(
            out.stdout
                .starts_with("ready: destination QEMU listens on "),
            "receive's ready line: {:?}",
            out.stdout
        );
        out
    }

    /// `qmigrate send --json` on the source, as a child process.
    fn send(&self, socket_args: &[String], extra: &[&str]) -> Proc {
        let mut args = vec![
            "send".to_owned(),
            "--json".to_owned(),
            "--qmp".to_owned(),
            path(&self.src.qmp_path),
        ];
        args.extend(socket_args.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        Proc::spawn("send", self.dir(), &args)
    }

    /// Checks the result of a completed migration over QMP: both sides completed, the source
    /// paused in `postmigrate`, the destination's RAM identical to the source's.
    async fn verify_completed(&self) {
        let logs = || {
            format!(
                "--- source QEMU's log\n{}\n--- destination QEMU's log\n{}",
                self.src.log(),
                self.dst.log()
            )
        };
        let src = support::try_qmp(&self.src.qmp_path)
            .await
            .unwrap_or_else(|e| panic!("source: {e}\n{}", logs()));
        let dst = support::try_qmp(&self.dst.qmp_path)
            .await
            .unwrap_or_else(|e| panic!("destination: {e}\n{}", logs()));
        assert_eq!(
            support::migration_status(&src).await.0,
            MigrationStatus::Completed
        );
        // The source completes once it has sent everything; the destination a moment later,
        // when it has loaded what is still in flight in the tunnel.
        assert_eq!(
            support::wait_for_migration(&dst, Duration::from_secs(30)).await,
            MigrationStatus::Completed,
            "destination QEMU's log:\n{}",
            self.dst.log()
        );
        let (state, _) = support::vm_state(&src).await;
        assert_eq!(
            state,
            RunState::Postmigrate,
            "source QEMU's log:\n{}",
            self.src.log()
        );
        let src_ram = support::ram_sha256(&src, self.mem_mib, &self.dir().join("src.ram")).await;
        let dst_ram = support::ram_sha256(&dst, self.mem_mib, &self.dir().join("dst.ram")).await;
        assert_eq!(
            src_ram, dst_ram,
            "destination RAM differs from the source's"
        );
    }

    /// Checks that the source VM runs and is not migrating, after a migration that did not
    /// complete; returns the migration status and error.
    async fn verify_source_running(&self) -> (MigrationStatus, Option<String>) {
        let src = support::qmp(&self.src.qmp_path).await;
        let (state, running) = support::vm_state(&src).await;
        assert!(running, "source VM is {state:?}, not running");
        support::migration_status(&src).await
    }
}

/// QEMU's status after `migrate_cancel`: `cancelled`, or `failed` when its return path saw the
/// torn-down connection first (a race inside QEMU; qmigrate reports both as cancelled).
fn assert_cancelled(status: MigrationStatus) {
    assert!(
        matches!(status, MigrationStatus::Cancelled | MigrationStatus::Failed),
        "migration status after cancel: {status:?}"
    );
}

/// Reads `send --json` output until the migration has visibly moved data.
async fn wait_for_progress(send: &mut Proc, min_bytes: u64) {
    send.line_matching(Duration::from_secs(60), |line| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        v["type"] == "progress" && v["transferred"].as_u64().unwrap_or(0) >= min_bytes
    })
    .await;
}

/// The last JSON object `send --json` printed, which must be the summary.
fn summary_of(stdout: &str) -> serde_json::Value {
    let last = stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("summary {last:?}: {e}"));
    assert_eq!(v["type"], "summary", "last line is not the summary: {last}");
    v
}

async fn tunnel_migration(transport: Transport, multifd: Option<&str>) {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let tunnel = Tunnel::start(pair.dir(), transport).await;
    let mf: Vec<&str> = multifd.map(|n| vec!["--multifd", n]).unwrap_or_default();

    let out = pair
        .receive(&["--socket".into(), path(&tunnel.dest_socket)], &mf)
        .await;
    if let Some(n) = multifd {
        assert!(
            out.stdout.contains(&format!("multifd {n}")),
            "{}",
            out.stdout
        );
    }
    let mut send = pair.send(&["--socket".into(), path(&tunnel.source_socket)], &mf);
    let (status, stdout) = send.wait(RUN).await;
    assert!(
        status.success(),
        "send exited with {status}; stderr:\n{}\n{}",
        send.stderr(),
        tunnel.logs()
    );
    let summary = summary_of(&stdout);
    assert_eq!(summary["status"], "completed");
    // Guest RAM plus QEMU's small RAM blocks (ROMs, firmware).
    let total = summary["total"].as_u64().unwrap_or(0);
    assert!(
        (MEM_MIB << 20..(MEM_MIB + 8) << 20).contains(&total),
        "{summary}"
    );
    pair.verify_completed().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_tunnel_single_channel() {
    tunnel_migration(Transport::Tcp, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tcp_tunnel_multifd_4() {
    tunnel_migration(Transport::Tcp, Some("4")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ws_tunnel_single_channel() {
    tunnel_migration(Transport::Ws, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ws_tunnel_multifd_4() {
    tunnel_migration(Transport::Ws, Some("4")).await;
}

/// A token file (0600) in `dir` holding `token`.
fn token_file(dir: &Path, name: &str, token: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let file = dir.join(name);
    std::fs::write(&file, format!("{token}\n")).expect("write the token file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path(&file)
}

/// A tunnel server with a token: migrations through tunnel clients without the token or
/// with another one fail on the source (which keeps running) and never reach the
/// destination; garbage, a plain HTTP request and 100 connections that never say anything
/// follow; then a migration through a client with the token completes against the same
/// running server and the same waiting destination.
#[tokio::test(flavor = "multi_thread")]
async fn authenticated_tunnel_after_refused_attempts() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let good = token_file(
        pair.dir(),
        "token",
        "cXVpdGUgYSBnb29kIHRva2VuIGZvciB0aGUgdGVzdA==",
    );
    let wrong = token_file(
        pair.dir(),
        "wrong",
        "YW5vdGhlciB0b2tlbiBlbnRpcmVseSwgbG9uZyBlbm91Z2g=",
    );
    let token_args = |file: &str| vec!["--token-file".to_owned(), file.to_owned()];
    let tunnel = Tunnel::start_with(
        pair.dir(),
        Transport::Ws,
        &token_args(&good),
        &token_args(&good),
    )
    .await;
    pair.receive(&["--socket".into(), path(&tunnel.dest_socket)], &[])
        .await;

    for (name, extra) in [("no-token", vec![]), ("wrong-token", token_args(&wrong))] {
        let (_client, socket) = tunnel.another_client(pair.dir(), name, &extra).await;
        let mut send = pair.send(&["--socket".into(), path(&socket)], &[]);
        let (status, stdout) = send.wait(RUN).await;
        assert_eq!(
            status.code(),
            Some(1),
            "send through the {name} client: {status}\n{}\n{}",
            send.stderr(),
            tunnel.logs()
        );
        assert_eq!(summary_of(&stdout)["outcome"], "failed", "{name}: {stdout}");
        let (migration, _) = pair.verify_source_running().await;
        assert_eq!(migration, MigrationStatus::Failed, "{name}");
    }
    let refusals = tunnel
        .server
        .stderr()
        .lines()
        .filter(|l| l.contains("refused (authentication failed)") && l.contains("peer=127.0.0.1:"))
        .count();
    assert_eq!(refusals, 2, "the server's log:\n{}", tunnel.server.stderr());

    // Garbage, an HTTP request that is no upgrade, and 100 connections that stay silent
    // through the migration (more than the server lets wait, so it drops the oldest).
    let addr = tunnel
        .url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    for junk in [
        &b"\x16\x03\x01garbage garbage garbage"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let _ = tcp.write_all(junk).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(RUN, tcp.read_to_end(&mut answer)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }

    let mut send = pair.send(&["--socket".into(), path(&tunnel.source_socket)], &[]);
    let (status, stdout) = send.wait(RUN).await;
    assert!(
        status.success(),
        "send through the authenticated tunnel exited with {status}; stderr:\n{}\n{}",
        send.stderr(),
        tunnel.logs()
    );
    assert_eq!(summary_of(&stdout)["status"], "completed");
    pair.verify_completed().await;
    drop(idle);
    let log = tunnel.server.stderr();
    assert!(
        log.contains("WebSocket handshake failed") && log.contains("connections were waiting"),
        "the server's log:\n{log}"
    );
}

/// WebSocket over TLS with the server's certificate pinned by its fingerprint, plus the token:
/// a client pinning another certificate and a plain ws:// client fail on the source (which
/// keeps running) without reaching the destination; then a migration through the pinned
/// client completes and the destination's RAM is the source's.
#[tokio::test(flavor = "multi_thread")]
async fn wss_tunnel_with_pinned_certificate_and_token() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let token = token_file(
        pair.dir(),
        "token",
        "cXVpdGUgYSBnb29kIHRva2VuIGZvciB0aGUgdGVzdA==",
    );
    let (cert, key, fingerprint) = support::tunnel::self_signed_cert(pair.dir());
    let server_args: Vec<String> = [
        "--token-file",
        &token,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let client_args = |pin: &str| -> Vec<String> {
        ["--token-file", &token, "--tls-fingerprint", pin]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    };
    let tunnel = Tunnel::start_with(
        pair.dir(),
        Transport::Ws,
        &server_args,
        &client_args(&fingerprint),
    )
    .await;
    assert!(tunnel.url.starts_with("wss://127.0.0.1:"), "{}", tunnel.url);
    let pin = fingerprint.trim_start_matches("sha256 Fingerprint=");
    assert!(
        tunnel.server.stderr().contains(pin),
        "the server logs the fingerprint to pin:
{}",
        tunnel.server.stderr()
    );
    pair.receive(&["--socket".into(), path(&tunnel.dest_socket)], &[])
        .await;

    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let plain_url = tunnel.url.replacen("wss://", "ws://", 1);
    for (name, url, extra) in [
        ("wrong-pin", tunnel.url.clone(), client_args(&wrong_pin)),
        (
            "plain-ws",
            plain_url,
            vec!["--token-file".to_owned(), token.clone()],
        ),
    ] {
        let socket = pair.dir().join(format!("{name}.sock"));
        let mut args: Vec<String> = vec!["tunnel-client".into(), "--connect".into(), url];
        args.extend(["--socket".into(), path(&socket)]);
        args.extend(extra);
        let mut client = Proc::spawn(name, pair.dir(), &args);
        client.next_line(Duration::from_secs(20)).await;
        let mut send = pair.send(&["--socket".into(), path(&socket)], &[]);
        let (status, stdout) = send.wait(RUN).await;
        assert_eq!(
            status.code(),
            Some(1),
            "send through the {name} client: {status}\n{}\n{}",
            send.stderr(),
            client.stderr()
        );
        assert_eq!(summary_of(&stdout)["outcome"], "failed", "{name}: {stdout}");
        let (migration, _) = pair.verify_source_running().await;
        assert_eq!(migration, MigrationStatus::Failed, "{name}");
        let why = client.stderr();
        let expected = match name {
            "wrong-pin" => "certificate verification failed",
            _ => "wss://",
        };
        assert!(why.contains(expected), "{name} client's log:\n{why}");
    }

    let mut send = pair.send(&["--socket".into(), path(&tunnel.source_socket)], &[]);
    let (status, stdout) = send.wait(RUN).await;
    assert!(
        status.success(),
        "send through the wss:// tunnel exited with {status}; stderr:\n{}\n{}",
        send.stderr(),
        tunnel.logs()
    );
    assert_eq!(summary_of(&stdout)["status"], "completed");
    pair.verify_completed().await;
}

/// Without the tunnel: QEMU to QEMU over a Unix socket given as a legacy URI, with `receive
/// --start` following the migration on the destination at the same time and starting the
/// destination (paused by `-S`) afterwards.
#[tokio::test(flavor = "multi_thread")]
async fn direct_unix_uri_with_receive_start() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let uri = format!("unix:{}", pair.dir().join("direct.sock").display());
    let mut receive = Proc::spawn(
        "receive",
        pair.dir(),
        [
            "receive",
            "--qmp",
            &path(&pair.dst.qmp_path),
            "--uri",
            &uri,
            "--start",
        ],
    );
    let ready = receive.next_line(RUN).await;
    assert_eq!(
        ready,
        format!("ready: destination QEMU listens on {uri} (single channel, postcopy off)")
    );
    let mut send = pair.send(&["--uri".into(), uri.clone()], &[]);
    let (status, stdout) = send.wait(RUN).await;
    assert!(status.success(), "send: {status}\n{}", send.stderr());
    assert_eq!(summary_of(&stdout)["status"], "completed");
    let (status, _) = receive.wait(RUN).await;
    assert!(
        status.success(),
        "receive --start: {status}\n{}",
        receive.stderr()
    );
    pair.verify_completed().await;
    let dst = support::qmp(&pair.dst.qmp_path).await;
    assert_eq!(support::vm_state(&dst).await, (RunState::Running, true));
}

/// `send --detach` returns once the migration runs; QEMU finishes it on its own.
#[tokio::test(flavor = "multi_thread")]
async fn send_detach_returns_and_migration_completes() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let uri = format!("unix:{}", pair.dir().join("direct.sock").display());
    pair.receive(&["--uri".into(), uri.clone()], &[]).await;
    let out = run(
        [
            "send",
            "--qmp",
            &path(&pair.src.qmp_path),
            "--uri",
            &uri,
            "--detach",
            "--max-bandwidth",
            "64M",
        ],
        RUN,
    )
    .await;
    out.expect_success();
    assert!(
        out.stderr.contains("not following it (--detach)"),
        "{}",
        out.stderr
    );
    let src = support::qmp(&pair.src.qmp_path).await;
    let (status, _) = support::migration_status(&src).await;
    assert!(
        matches!(status, MigrationStatus::Setup | MigrationStatus::Active),
        "right after --detach the migration must still run, not {status:?}"
    );
    assert_eq!(
        support::wait_for_migration(&src, Duration::from_secs(60)).await,
        MigrationStatus::Completed
    );
    drop(src);
    pair.verify_completed().await;
}

/// Postcopy through the tunnel: precopy is throttled so that the switch really happens, and
/// postcopy itself must not be throttled.
#[tokio::test(flavor = "multi_thread")]
async fn postcopy_through_tunnel() {
    let Some(bin) = qemu10() else { return };
    let mem = 256;
    let pair = pair(&bin, mem);
    let tunnel = Tunnel::start(pair.dir(), Transport::Tcp).await;
    pair.receive(
        &["--socket".into(), path(&tunnel.dest_socket)],
        &["--postcopy"],
    )
    .await;
    let mut send = pair.send(
        &["--socket".into(), path(&tunnel.source_socket)],
        &["--postcopy=0", "--max-bandwidth", "32M"],
    );
    let (status, stdout) = send.wait(RUN).await;
    assert!(
        status.success(),
        "send: {status}\n{}\n{}",
        send.stderr(),
        tunnel.logs()
    );
    let summary = summary_of(&stdout);
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["postcopy"], true, "{summary}");
    // 256 MiB at 32 MiB/s would take 8 s in precopy; postcopy runs unthrottled.
    assert!(
        summary["total_time_ms"].as_u64().unwrap_or(u64::MAX) < 6000,
        "postcopy looks throttled: {summary}"
    );
    pair.verify_completed().await;
}

/// The tunnel server dies mid-migration: QEMU's reason, non-zero exit, source still running.
#[tokio::test(flavor = "multi_thread")]
async fn tunnel_server_killed_mid_migration() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let mut tunnel = Tunnel::start(pair.dir(), Transport::Tcp).await;
    pair.receive(&["--socket".into(), path(&tunnel.dest_socket)], &[])
        .await;
    let mut send = pair.send(
        &["--socket".into(), path(&tunnel.source_socket)],
        &["--max-bandwidth", "20M"],
    );
    wait_for_progress(&mut send, 4 << 20).await;
    tunnel.server.kill().await;
    let (status, stdout) = send.wait(Duration::from_secs(60)).await;
    let stderr = send.stderr();
    assert_eq!(status.code(), Some(1), "send: {status}\n{stderr}");
    let error: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("qmigrate: error: migration failed: "))
        .collect();
    assert_eq!(
        error.len(),
        1,
        "expected QEMU's reason on stderr:\n{stderr}"
    );
    assert_eq!(summary_of(&stdout)["outcome"], "failed");
    let (migration, desc) = pair.verify_source_running().await;
    assert_eq!(migration, MigrationStatus::Failed);
    let desc = desc.expect("error-desc");
    assert!(error[0].contains(&desc), "{} vs {desc}", error[0]);
}

/// SIGINT during the migration cancels it; the source keeps running; exit 4.
#[tokio::test(flavor = "multi_thread")]
async fn sigint_cancels_and_source_keeps_running() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let tunnel = Tunnel::start(pair.dir(), Transport::Tcp).await;
    pair.receive(&["--socket".into(), path(&tunnel.dest_socket)], &[])
        .await;
    let mut send = pair.send(
        &["--socket".into(), path(&tunnel.source_socket)],
        &["--max-bandwidth", "20M"],
    );
    wait_for_progress(&mut send, 4 << 20).await;
    send.signal(libc::SIGINT);
    let (status, stdout) = send.wait(Duration::from_secs(60)).await;
    let stderr = send.stderr();
    assert_eq!(status.code(), Some(4), "send: {status}\n{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.starts_with("qmigrate: error: "))
        .unwrap_or_default();
    assert!(
        error.starts_with("qmigrate: error: migration cancelled: interrupted by SIGINT")
            && error.ends_with("; the source VM is running"),
        "{stderr}"
    );
    assert_eq!(summary_of(&stdout)["outcome"], "cancelled");
    let (migration, _) = pair.verify_source_running().await;
    assert_cancelled(migration);
}

/// `--timeout` cancels like a signal does.
#[tokio::test(flavor = "multi_thread")]
async fn timeout_cancels() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let sock = pair.dir().join("direct.sock");
    let uri = format!("unix:{}", sock.display());
    pair.receive(&["--uri".into(), uri.clone()], &[]).await;
    let mut send = pair.send(
        &["--uri".into(), uri],
        &["--max-bandwidth", "10M", "--timeout", "1500ms"],
    );
    let (status, _) = send.wait(Duration::from_secs(60)).await;
    let stderr = send.stderr();
    assert_eq!(status.code(), Some(4), "send: {status}\n{stderr}");
    assert!(stderr.contains("--timeout 1.5s expired"), "{stderr}");
    let (migration, _) = pair.verify_source_running().await;
    assert_cancelled(migration);
}

/// A destination not started with `-incoming defer`: one clear line, exit 1, nothing changed.
#[tokio::test(flavor = "multi_thread")]
async fn receive_refuses_destination_without_incoming_defer() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: 64,
            random_ram: false,
            ..VmConfig::default()
        },
    )
    .expect("start QEMU");
    let sock = dir.path().join("dest.sock");
    let out = run(
        [
            "receive",
            "--qmp",
            &path(&vm.qmp_path),
            "--socket",
            &path(&sock),
        ],
        RUN,
    )
    .await;
    out.expect_code(1);
    let line = out.error_line();
    assert!(
        line.contains("not waiting for an incoming migration") && line.contains("-incoming defer"),
        "{line}"
    );
    assert!(!sock.exists(), "receive must not have started anything");
    let qmp = support::qmp(&vm.qmp_path).await;
    assert_eq!(
        support::migration_status(&qmp).await.0,
        MigrationStatus::None
    );
    assert!(support::vm_state(&qmp).await.1, "VM must still run");
}

/// Wrong or unusable `--qmp` paths: one clear line, exit 3, for both commands.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_qmp_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.qmp");
    let file = dir.path().join("file.qmp");
    std::fs::write(&file, b"not a socket").expect("write");
    let sock = dir.path().join("mig.sock");
    // send checks its migration socket first; give it one so that QMP is what fails.
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    for cmd in ["receive", "send"] {
        let out = run(
            [cmd, "--qmp", &path(&missing), "--socket", &path(&sock)],
            RUN,
        )
        .await;
        out.expect_code(3);
        assert_eq!(
            out.error_line(),
            format!(
                "qmigrate: error: cannot reach QEMU's QMP socket: {0} does not exist (is QEMU \
                 running with -qmp unix:{0},server=on,wait=off?)",
                missing.display()
            )
        );
        let out = run([cmd, "--qmp", &path(&file), "--socket", &path(&sock)], RUN).await;
        out.expect_code(3);
        assert!(
            out.error_line().contains("is a regular file, not a socket"),
            "{}",
            out.stderr
        );
    }
}

/// `send` preflight: no tunnel client (socket missing) or inconsistent flags: nothing starts.
#[tokio::test(flavor = "multi_thread")]
async fn send_preflight_starts_nothing() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: 64,
            random_ram: false,
            ..VmConfig::default()
        },
    )
    .expect("start QEMU");
    let qmp_path = path(&vm.qmp_path);
    let sock = dir.path().join("source.sock");
    let out = run(["send", "--qmp", &qmp_path, "--socket", &path(&sock)], RUN).await;
    out.expect_code(1);
    assert!(
        out.error_line()
            .contains("does not exist: start `qmigrate tunnel-client"),
        "{}",
        out.stderr
    );
    let out = run(
        [
            "send",
            "--qmp",
            &qmp_path,
            "--uri",
            "unix:/x",
            "--compress",
            "zstd",
        ],
        RUN,
    )
    .await;
    out.expect_code(2);
    assert!(
        out.error_line().contains("--compress needs --multifd"),
        "{}",
        out.stderr
    );
    let out = run(["send", "--qmp", &qmp_path, "--max-bandwidth", "fast"], RUN).await;
    out.expect_code(2);

    let qmp = support::qmp(&vm.qmp_path).await;
    assert_eq!(
        support::migration_status(&qmp).await.0,
        MigrationStatus::None
    );
    assert!(support::vm_state(&qmp).await.1, "VM must still run");
}

/// QEMU 7.2 has no `channels`: the legacy `uri` path, through the tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn qemu72_to_qemu72_through_tunnel() {
    let Some(bin) = qemu72() else { return };
    let pair = pair(&bin, MEM_MIB);
    let tunnel = Tunnel::start(pair.dir(), Transport::Tcp).await;
    pair.receive(&["--socket".into(), path(&tunnel.dest_socket)], &[])
        .await;
    let mut send = pair.send(&["--socket".into(), path(&tunnel.source_socket)], &[]);
    let (status, _) = send.wait(RUN).await;
    assert!(
        status.success(),
        "send: {status}\n{}\n{}",
        send.stderr(),
        tunnel.logs()
    );
    pair.verify_completed().await;
}

/// QEMU 7.2 to QEMU 10 with the same versioned machine type: uri on the source, channels on the
/// destination.
#[tokio::test(flavor = "multi_thread")]
async fn qemu72_to_qemu10_through_tunnel() {
    let (Some(old), Some(new)) = (qemu72(), qemu10()) else {
        return;
    };
    let pair = pair_with(&old, &new, MEM_MIB, Some("pc-q35-7.2"));
    let tunnel = Tunnel::start(pair.dir(), Transport::Ws).await;
    pair.receive(
        &["--socket".into(), path(&tunnel.dest_socket)],
        &["--multifd", "2"],
    )
    .await;
    let mut send = pair.send(
        &["--socket".into(), path(&tunnel.source_socket)],
        &["--multifd", "2"],
    );
    let (status, _) = send.wait(RUN).await;
    assert!(
        status.success(),
        "send: {status}\n{}\n{}",
        send.stderr(),
        tunnel.logs()
    );
    pair.verify_completed().await;
}

/// A source VM that was paused stays paused when its migration is cancelled: qmigrate resumes
/// only what was running.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_migration_of_paused_vm_leaves_it_paused() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    {
        let src = support::qmp(&pair.src.qmp_path).await;
        src.execute(&qmigrate_qmp::Stop).await.expect("stop");
    }
    let uri = format!("unix:{}", pair.dir().join("direct.sock").display());
    pair.receive(&["--uri".into(), uri.clone()], &[]).await;
    let mut send = pair.send(
        &["--uri".into(), uri],
        &["--max-bandwidth", "10M", "--timeout", "1s"],
    );
    let (status, _) = send.wait(Duration::from_secs(60)).await;
    let stderr = send.stderr();
    assert_eq!(status.code(), Some(4), "send: {status}\n{stderr}");
    assert!(
        stderr.contains("the source VM stays paused as it was"),
        "{stderr}"
    );
    let src = support::qmp(&pair.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await, (RunState::Paused, false));
    assert_cancelled(support::migration_status(&src).await.0);
}

/// Another client holds the QMP socket: exit 3 with QEMU's one-client rule explained.
#[tokio::test(flavor = "multi_thread")]
async fn busy_qmp_socket() {
    let Some(bin) = qemu10() else { return };
    let vm = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: 64,
            random_ram: false,
            ..VmConfig::default()
        },
    )
    .expect("start QEMU");
    let _holder = support::qmp(&vm.qmp_path).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        [
            "receive",
            "--qmp",
            &path(&vm.qmp_path),
            "--socket",
            &path(&dir.path().join("d.sock")),
        ],
        RUN,
    )
    .await;
    out.expect_code(3);
    assert!(
        out.error_line()
            .starts_with("qmigrate: error: cannot reach QEMU's QMP socket: QMP socket busy"),
        "{}",
        out.stderr
    );
}

/// Compressed multifd without the tunnel, with the other source-only knobs set.
#[tokio::test(flavor = "multi_thread")]
async fn direct_multifd_zstd() {
    let Some(bin) = qemu10() else { return };
    let pair = pair(&bin, MEM_MIB);
    let uri = format!("unix:{}", pair.dir().join("direct.sock").display());
    let flags = ["--multifd", "2", "--compress", "zstd"];
    let out = pair.receive(&["--uri".into(), uri.clone()], &flags).await;
    assert!(
        out.stdout.contains("(multifd 2 (zstd), postcopy off)"),
        "{}",
        out.stdout
    );
    let mut extra = flags.to_vec();
    extra.extend(["--auto-converge", "--downtime-limit", "500"]);
    let mut send = pair.send(&["--uri".into(), uri], &extra);
    let (status, stdout) = send.wait(RUN).await;
    assert!(status.success(), "send: {status}\n{}", send.stderr());
    assert_eq!(summary_of(&stdout)["status"], "completed");
    pair.verify_completed().await;
}
