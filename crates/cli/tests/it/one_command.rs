//! `qmigrate migrate` against a `tunnel-server --qmp/--route`: real QEMU pairs, the real
//! binary, the destination prepared by the server from the source's settings, RAM compared.

use crate::support;
use support::{path, qemu10, Pair};

use std::path::Path;
use std::time::Duration;

use qmigrate_qmp::{MigrationStatus, RunState};
use support::proc::{run, Output, Proc};
use support::qemu::{QemuBinary, Vm, VmConfig};
use support::tunnel::server;

const MEM_MIB: u64 = 128;
const RUN: Duration = Duration::from_secs(120);

/// A source VM and a destination waiting with `-incoming defer`, of [`MEM_MIB`].
fn pair(bin: &QemuBinary) -> Pair {
    support::pair(bin, MEM_MIB)
}

async fn migrate(pair: &Pair, to: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&pair.src.qmp_path),
        "--to".into(),
        to.to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run(&args, RUN).await
}

/// Both sides completed, the source in postmigrate, the destination in `want` and its RAM
/// identical to the source's.
async fn verify(pair: &Pair, dir: &Path, want: RunState) {
    let src = support::qmp(&pair.src.qmp_path).await;
    let dst = support::qmp(&pair.dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&src).await.0,
        MigrationStatus::Completed
    );
    assert_eq!(
        support::migration_status(&dst).await.0,
        MigrationStatus::Completed
    );
    assert_eq!(support::vm_state(&src).await.0, RunState::Postmigrate);
    assert_eq!(support::vm_state(&dst).await.0, want);
    let a = support::ram_sha256(&src, MEM_MIB, &dir.join("src.ram")).await;
    let b = support::ram_sha256(&dst, MEM_MIB, &dir.join("dst.ram")).await;
    assert_eq!(a, b, "destination RAM differs from the source's");
}

/// Two VM pairs through one WebSocket server with two routes, at the same time: both
/// complete, each destination gets its own source's RAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_routes_two_concurrent_migrations() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (pair(&bin), pair(&bin));
    let (mut srv, url) = server(
        dir.path(),
        &[
            "--ws".into(),
            "--route".into(),
            format!("alpha={}", path(&a.dst.qmp_path)),
            "--route".into(),
            format!("beta={}", path(&b.dst.qmp_path)),
        ],
    )
    .await;
    let (to_a, to_b) = (format!("{url}alpha"), format!("{url}beta"));
    let (out_a, out_b) = tokio::join!(
        migrate(&a, &to_a, &["--no-start"]),
        migrate(&b, &to_b, &["--no-start", "--multifd", "2"]),
    );
    out_a.expect_success();
    out_b.expect_success();
    for out in [&out_a, &out_b] {
        assert!(
            out.stderr.contains("destination: completed"),
            "the destination's verdict is reported on the source:\n{}",
            out.stderr
        );
    }
    verify(&a, dir.path(), RunState::Paused).await;
    verify(&b, dir.path(), RunState::Paused).await;
    srv.kill().await;
}

/// The default route over TCP: the server starts the destination VM afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_route_starts_the_destination() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let (mut srv, url) = server(dir.path(), &["--qmp".into(), path(&p.dst.qmp_path)]).await;
    assert!(url.starts_with("tcp://"), "{url}");
    let out = migrate(&p, &url, &[]).await;
    out.expect_success();
    assert!(
        out.stderr.contains("direct data path"),
        "plain TCP with one channel takes the direct data path:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("VM started"), "{}", out.stderr);
    verify(&p, dir.path(), RunState::Running).await;
    srv.kill().await;
}

/// `--relay` keeps qmigrate in the data path even where the direct one would do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_flag_keeps_the_relay() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let (mut srv, url) = server(dir.path(), &["--qmp".into(), path(&p.dst.qmp_path)]).await;
    let out = migrate(&p, &url, &["--relay", "--no-start"]).await;
    out.expect_success();
    assert!(out.stderr.contains("relayed"), "{}", out.stderr);
    verify(&p, dir.path(), RunState::Paused).await;
    srv.kill().await;
}

/// An unknown route is refused with the routes the server has; nothing is migrated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_is_refused() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let (mut srv, url) = server(
        dir.path(),
        &[
            "--ws".into(),
            "--route".into(),
            format!("alpha={}", path(&p.dst.qmp_path)),
        ],
    )
    .await;
    let out = migrate(&p, &format!("{url}gamma"), &[]).await;
    out.expect_code(1);
    let err = out.error_line();
    assert!(
        err.contains("unknown route") && err.contains("gamma") && err.contains("/alpha"),
        "{err}"
    );
    let src = support::qmp(&p.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Running);
    assert_eq!(
        support::migration_status(&src).await.0,
        MigrationStatus::None
    );
    srv.kill().await;
}

/// `migrate` to a tunnel-server started without `--qmp`: refused with the tunnel-server's
/// flags in the words (the library's own wording names none), the source untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_without_qmp_names_the_flag() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let socket = dir.path().join("unused.sock");
    let (mut srv, url) = server(dir.path(), &["--socket".into(), path(&socket)]).await;
    let out = migrate(&p, &url, &[]).await;
    out.expect_code(1);
    let err = out.error_line();
    assert!(
        err.contains("has no --qmp") && err.contains("start it with --qmp PATH"),
        "{err}"
    );
    let src = support::qmp(&p.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Running);
    assert_eq!(
        support::migration_status(&src).await.0,
        MigrationStatus::None
    );
    srv.kill().await;
}

/// The relay stops taking data (the tunnel-server frozen with SIGSTOP, as a dead peer looks
/// from the source): `migrate` says it stalled, cancels after `--stall-timeout`, exits 1, and
/// the source VM runs on with its QMP socket free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_migration_is_cancelled() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let (mut srv, url) = server(dir.path(), &["--qmp".into(), path(&p.dst.qmp_path)]).await;
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&p.src.qmp_path),
        "--to".into(),
        url,
        "--relay".into(),
        // 128 MiB at 4 MiB/s: still running when the server freezes.
        "--max-bandwidth".into(),
        "4MiB".into(),
        "--stall-timeout".into(),
        "3s".into(),
    ];
    let mut mig = Proc::spawn("migrate", dir.path(), std::mem::take(&mut args));
    tokio::time::sleep(Duration::from_secs(3)).await;
    srv.signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    let (status, _) = mig.wait(Duration::from_secs(90)).await;
    let waited = started.elapsed();
    srv.signal(libc::SIGCONT);
    let err = mig.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("stalled for"), "no stall shown: {err}");
    assert!(err.contains("nothing moved for 3 s"), "{err}");
    assert!(waited < Duration::from_secs(60), "took {waited:?}: {err}");
    let src = support::qmp(&p.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Running);
    assert_eq!(
        support::migration_status(&src).await.0,
        MigrationStatus::Cancelled
    );
    srv.kill().await;
}

/// A destination QEMU that was not started with `-incoming defer`: the destination's own
/// explanation reaches the source, which keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_not_waiting_is_reported_on_the_source() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let src = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            ..VmConfig::default()
        },
    )
    .expect("source");
    let dst = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            random_ram: false,
            ..VmConfig::default()
        },
    )
    .expect("destination without -incoming defer");
    let (mut srv, url) = server(dir.path(), &["--qmp".into(), path(&dst.qmp_path)]).await;
    let p = Pair { src, dst };
    let out = migrate(&p, &url, &[]).await;
    out.expect_code(1);
    let err = out.error_line();
    assert!(
        err.contains("destination refused") && err.contains("-incoming defer"),
        "{err}"
    );
    let qmp = support::qmp(&p.src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Running);
    srv.kill().await;
}

/// With a token, the control and data connections are authenticated (then the direct data
/// path hands the authenticated socket to QEMU); without it the source is refused and its VM
/// keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_required_and_enough() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "correct horse battery staple\n").expect("token file");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let p = pair(&bin);
    let (mut srv, url) = server(
        dir.path(),
        &[
            "--qmp".into(),
            path(&p.dst.qmp_path),
            "--token-file".into(),
            path(&token),
        ],
    )
    .await;
    let refused = migrate(&p, &url, &[]).await;
    refused.expect_code(1);
    let err = refused.error_line().to_lowercase();
    assert!(
        err.contains("token"),
        "the refusal names the missing token: {err}"
    );
    let src = support::qmp(&p.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Running);
    drop(src);
    let out = migrate(&p, &url, &["--token-file", &path(&token), "--no-start"]).await;
    out.expect_success();
    assert!(out.stderr.contains("direct data path"), "{}", out.stderr);
    verify(&p, dir.path(), RunState::Paused).await;
    srv.kill().await;
}

/// Writes `pem` to `dir/name` (0600) and returns the path.
fn write_pem(dir: &Path, name: &str, pem: &str) -> String {
    use std::os::unix::fs::PermissionsExt as _;
    let file = dir.join(name);
    std::fs::write(&file, pem).expect("write a PEM file");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path(&file)
}

/// `migrate` over tls:// with mutual TLS and no token: the server's certificate checked
/// against --tls-ca, the client's against the server's --tls-client-ca. A client without a
/// certificate is refused before the destination is touched; with one, the migration is
/// relayed (TLS never takes the direct data path: QEMU would get ciphertext) and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_relays_and_completes() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("names")
        .self_signed(&key)
        .expect("server certificate");
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("client CA");
    let client_key = rcgen::KeyPair::generate().expect("client key");
    let client = rcgen::CertificateParams::new(vec!["source".to_owned()])
        .expect("names")
        .signed_by(&client_key, &ca, &ca_key)
        .expect("client certificate");
    let d = dir.path();
    let (cert_pem, key_pem) = (
        write_pem(d, "cert.pem", &cert.pem()),
        write_pem(d, "key.pem", &key.serialize_pem()),
    );
    let ca_pem = write_pem(d, "clients-ca.pem", &ca.pem());
    let (client_pem, client_key_pem) = (
        write_pem(d, "client.pem", &client.pem()),
        write_pem(d, "client-key.pem", &client_key.serialize_pem()),
    );

    let (mut srv, url) = server(
        d,
        &[
            "--qmp".into(),
            path(&p.dst.qmp_path),
            "--tls-cert".into(),
            cert_pem.clone(),
            "--tls-key".into(),
            key_pem,
            "--tls-client-ca".into(),
            ca_pem,
        ],
    )
    .await;
    assert!(url.starts_with("tls://127.0.0.1:"), "{url}");

    let refused = migrate(&p, &url, &["--tls-ca", &cert_pem]).await;
    assert_eq!(
        refused.status.code(),
        Some(1),
        "without a client certificate:\n{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains("client certificate"),
        "{}",
        refused.stderr
    );
    let dst = support::qmp(&p.dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&dst).await.0,
        MigrationStatus::None,
        "the destination was not touched"
    );
    drop(dst);

    let out = migrate(
        &p,
        &url,
        &[
            "--tls-ca",
            &cert_pem,
            "--tls-cert",
            &client_pem,
            "--tls-key",
            &client_key_pem,
        ],
    )
    .await;
    out.expect_success();
    assert!(
        out.stderr.contains("relayed") && !out.stderr.contains("direct data path"),
        "TLS relays:\n{}",
        out.stderr
    );
    verify(&p, d, RunState::Running).await;
    srv.kill().await;
}

/// A flag only the source checks (`--downtime-limit` above QEMU's 2000 s) is refused as a
/// usage error before either QEMU is touched: the destination has not run `migrate-incoming`,
/// so the corrected command that follows, to the same server, completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flag_is_refused_before_the_destination_is_prepared() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let p = pair(&bin);
    let (mut srv, url) = server(dir.path(), &["--qmp".into(), path(&p.dst.qmp_path)]).await;
    let out = migrate(&p, &url, &["--downtime-limit", "3000000"]).await;
    out.expect_code(2);
    assert!(
        out.error_line().contains("--downtime-limit"),
        "{}",
        out.stderr
    );
    let dst = support::qmp(&p.dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&dst).await.0,
        MigrationStatus::None,
        "the destination QEMU was prepared for a migration that could not start"
    );
    drop(dst);
    let out = migrate(&p, &url, &["--downtime-limit", "300"]).await;
    out.expect_success();
    verify(&p, dir.path(), RunState::Running).await;
    srv.kill().await;
}
