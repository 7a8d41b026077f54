//! Live migrations of a running Linux guest (testkit's `guest`): a TCG guest dirtying memory
//! and writing checksummed records to a disk image both QEMUs open (shared storage), moved by
//! the real binary along each data path. After each one the source must be paused in
//! `postmigrate` and the guest must go on on the destination: its heartbeat counter continues
//! from the source's last, with no reboot, and the workload's own checks of its buffer and of
//! the disk records (including the source's last one, read back on the destination) pass.
//!
//! The guests take a slot of testkit's guest gate (one at a time by default), so these tests
//! queue behind each other however many test threads run.

use crate::support;
use support::path;

use std::time::{Duration, Instant};

use qmigrate_testkit::guest::{Expect, GuestConfig, GuestPair, Verdict};
use support::proc::{run, Output, Proc};
use support::tunnel::{server, Transport, Tunnel};

/// Deadline for one `qmigrate` run.
const RUN: Duration = Duration::from_secs(120);
/// How long the destination has to show that the guest continued.
const CONTINUE: Duration = Duration::from_secs(60);

/// A 128 MiB guest dirtying 8 MiB/s of a 32 MiB buffer: converges at the TCP and TLS paths'
/// speeds (100 MiB/s and more) within QEMU's default 300 ms downtime.
fn config() -> GuestConfig {
    GuestConfig::default()
}

/// What a test prints about its run (visible with `--nocapture`).
fn report(name: &str, pair: &GuestPair, started: Instant, migration: Duration, verdict: &Verdict) {
    eprintln!(
        "{name}: boot {:.1} s, migration {:.1} s, whole test {:.1} s; {verdict:?}",
        pair.boot_time.as_secs_f64(),
        migration.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// `receive --start` on the destination through a tunnel's server side, `send SEND_EXTRA` on
/// the source through its client side; both must succeed.
async fn send_receive(pair: &GuestPair, tunnel: &Tunnel, send_extra: &[&str]) {
    let mut receive = Proc::spawn(
        "receive",
        pair.dir(),
        [
            "receive",
            "--qmp",
            &path(pair.dst.qmp_path()),
            "--socket",
            &path(&tunnel.dest_socket),
            "--start",
        ],
    );
    let ready = receive.next_line(RUN).await;
    assert!(ready.starts_with("ready: "), "{ready}");
    let mut args = vec![
        "send",
        "--qmp",
        pair.src.qmp_path().to_str().expect("a UTF-8 temp path"),
        "--socket",
        tunnel.source_socket.to_str().expect("a UTF-8 temp path"),
    ];
    args.extend(send_extra);
    let out = run(&args, RUN).await;
    assert!(
        out.status.success(),
        "send: {:?}\n{}\n{}\n{}",
        out.status,
        out.stderr,
        tunnel.logs(),
        pair.report()
    );
    let (status, _) = receive.wait(RUN).await;
    assert!(
        status.success(),
        "receive --start: {status}\n{}\n{}",
        receive.stderr(),
        pair.report()
    );
}

async fn through_tunnel(name: &str, transport: Transport, cfg: GuestConfig, send_extra: &[&str]) {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let started = Instant::now();
    let pair = GuestPair::start(&bin, &img, &cfg).await;
    let tunnel = Tunnel::start(pair.dir(), transport).await;
    let t = Instant::now();
    send_receive(&pair, &tunnel, send_extra).await;
    let migration = t.elapsed();
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    report(name, &pair, started, migration, &verdict);
}

/// The TCP relay: `tunnel-client` and `tunnel-server` carry the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_relay() {
    through_tunnel("tcp_relay", Transport::Tcp, config(), &[]).await;
}

/// The WebSocket relay. The test binary's debug build of qmigrate relays WebSocket at 10-25
/// MiB/s here (beside two TCG guests on two cores), so the guest dirties 4 MiB/s, and
/// `--auto-converge` throttles it if the relay is slower still on a busier machine: at 8 MiB/s
/// against 10 MiB/s of bandwidth precopy would not converge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_relay() {
    let mut cfg = config();
    cfg.workload.rate_mib_s = 4;
    through_tunnel("ws_relay", Transport::Ws, cfg, &["--auto-converge"]).await;
}

/// `migrate --to URL EXTRA` against a `tunnel-server --qmp` of the destination with
/// `server_extra`; returns its output (which must be a success) and how long it took.
async fn one_command(
    pair: &GuestPair,
    server_extra: &[String],
    scheme: &str,
    extra: &[&str],
) -> (Output, Duration) {
    let mut args = vec!["--qmp".to_owned(), path(pair.dst.qmp_path())];
    args.extend(server_extra.iter().cloned());
    let (mut srv, url) = server(pair.dir(), &args).await;
    assert!(url.starts_with(scheme), "{url}");
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(pair.src.qmp_path()),
        "--to".into(),
        url,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let t = Instant::now();
    let out = run(&args, RUN).await;
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "migrate: {:?}\n{}\n--- tunnel-server\n{}\n{}",
        out.status,
        out.stderr,
        srv.stderr(),
        pair.report()
    );
    srv.kill().await;
    (out, took)
}

/// The `summary` object of `migrate --json` (with the text output, stderr says which data path
/// was taken instead).
fn summary(out: &Output) -> serde_json::Value {
    out.stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "summary")
        .unwrap_or_else(|| panic!("no summary in:\n{}", out.stdout))
}

/// `migrate` over plain TCP with one channel: the direct data path (QEMU to QEMU over the
/// authenticated tunnel connection), the server starting the destination afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_direct() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let started = Instant::now();
    let pair = GuestPair::start(&bin, &img, &config()).await;
    let (out, took) = one_command(&pair, &[], "tcp://", &[]).await;
    assert!(out.stderr.contains("direct data path"), "{}", out.stderr);
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    report("migrate_direct", &pair, started, took, &verdict);
}

/// `migrate --multifd 4`: five tunnel connections, relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_multifd_4() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let started = Instant::now();
    let pair = GuestPair::start(&bin, &img, &config()).await;
    let (out, took) = one_command(&pair, &[], "tcp://", &["--multifd", "4"]).await;
    assert!(out.stderr.contains("relayed"), "{}", out.stderr);
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    report("migrate_multifd_4", &pair, started, took, &verdict);
}

/// `migrate` over tls:// with the server's certificate pinned by fingerprint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_tls() {
    use sha2::Digest as _;
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let started = Instant::now();
    let pair = GuestPair::start(&bin, &img, &config()).await;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["dest".to_owned()])
        .expect("names")
        .self_signed(&key)
        .expect("certificate");
    let (cert_pem, key_pem) = (pair.dir().join("cert.pem"), pair.dir().join("key.pem"));
    std::fs::write(&cert_pem, cert.pem()).expect("cert.pem");
    std::fs::write(&key_pem, key.serialize_pem()).expect("key.pem");
    let pin = sha2::Sha256::digest(cert.der().as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let (out, took) = one_command(
        &pair,
        &[
            "--tls-cert".into(),
            path(&cert_pem),
            "--tls-key".into(),
            path(&key_pem),
        ],
        "tls://",
        &["--tls-fingerprint", &format!("sha256:{pin}")],
    )
    .await;
    assert!(out.stderr.contains("relayed"), "{}", out.stderr);
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    report("migrate_tls", &pair, started, took, &verdict);
}

/// `migrate --postcopy=0`: postcopy from the start, the destination not started with `-S`, so
/// that the guest runs there while its pages still come from the source (faulted in on
/// demand): its checks read every page of its buffer during postcopy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_postcopy() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let started = Instant::now();
    let cfg = GuestConfig {
        destination_paused: false,
        ..config()
    };
    let pair = GuestPair::start(&bin, &img, &cfg).await;
    let (out, took) = one_command(&pair, &[], "tcp://", &["--postcopy=0", "--json"]).await;
    let summary = summary(&out);
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["postcopy"], true, "{summary}");
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    report("migrate_postcopy", &pair, started, took, &verdict);
}
