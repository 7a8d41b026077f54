//! Network failures, made for real: the tunnel-server runs in a network namespace of its own
//! behind a veth pair, and the far end of the link goes down mid-migration (no FIN, no RST: a
//! pulled cable). `migrate` must end, exit 1, leave the source VM running with its QMP socket
//! free, and the same tunnel-server must carry the next migration once the link is back.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use qmigrate_qmp::{MigrationStatus, RunState};
use qmigrate_testkit::netns::NetNs;
use support::proc::{run, Proc};
use support::qemu::{self, QemuBinary, Vm, VmConfig};

/// Guest RAM: at [`BANDWIDTH`] the migration is still running when the link goes down.
const MEM_MIB: u64 = 256;
const BANDWIDTH: &str = "8MiB";
/// How long after the cut `migrate` may take to give up (the bound, with the default
/// timeouts).
const GIVE_UP: Duration = Duration::from_secs(90);
const READY: Duration = Duration::from_secs(20);

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The destination QEMU, at a fixed QMP path that a fresh one can take over.
fn destination(bin: &QemuBinary, qmp: &Path) -> Vm {
    Vm::start(
        bin,
        &VmConfig {
            qmp_path: Some(qmp.to_owned()),
            ..qemu::destination_config(MEM_MIB)
        },
    )
    .expect("start the destination QEMU")
}

/// What the server listens with, and what the client adds to reach it.
struct Setup {
    scheme: &'static str,
    server: Vec<String>,
    client: Vec<String>,
}

fn setup(dir: &Path, scheme: &'static str, addr: std::net::Ipv4Addr) -> Setup {
    use std::os::unix::fs::PermissionsExt as _;
    let token = dir.join("token");
    std::fs::write(&token, "a token for the namespace test\n").expect("token file");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut server = vec!["--token-file".to_owned(), path(&token)];
    let mut client = vec!["--token-file".to_owned(), path(&token)];
    if scheme == "tls" || scheme == "wss" {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![addr.to_string()])
            .expect("names")
            .self_signed(&key)
            .expect("certificate");
        let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_pem, cert.pem()).expect("cert");
        std::fs::write(&key_pem, key.serialize_pem()).expect("key");
        std::fs::set_permissions(&key_pem, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        server.extend([
            "--tls-cert".into(),
            path(&cert_pem),
            "--tls-key".into(),
            path(&key_pem),
        ]);
        client.extend(["--tls-ca".into(), path(&cert_pem)]);
    }
    Setup {
        scheme,
        server,
        client,
    }
}

/// Precopy through `scheme` (`relay`: through qmigrate even on tcp://), the far end of the
/// link down four seconds in.
async fn link_down_mid_precopy(scheme: &'static str, relay: bool) {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let src = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            ..VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let dst_qmp = d.join("dst.qmp");
    let dst = destination(&bin, &dst_qmp);
    let s = setup(d, scheme, ns.addr());

    let mut args = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        format!("{scheme}://{}:0", ns.addr()),
        "--qmp".into(),
        path(&dst_qmp),
    ];
    args.extend(s.server.iter().cloned());
    let mut srv = Proc::spawn_wrapped("tunnel-server", d, &ns.command("env"), &args);
    let line = srv.next_line(READY).await;
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .trim()
        .to_owned();
    assert!(url.starts_with(s.scheme), "{url}");

    let mut migrate = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&src.qmp_path),
        "--to".into(),
        url.clone(),
        "--max-bandwidth".into(),
        BANDWIDTH.into(),
    ];
    if relay {
        migrate.push("--relay".into());
    }
    migrate.extend(s.client.iter().cloned());
    let mut mig = Proc::spawn("migrate", d, &migrate);
    tokio::time::sleep(Duration::from_secs(4)).await;
    ns.link_down();
    let cut = Instant::now();
    let (status, _) = mig.wait(GIVE_UP + Duration::from_secs(30)).await;
    let took = cut.elapsed();
    let err = mig.stderr();
    assert_eq!(status.code(), Some(1), "migrate after the cut:\n{err}");
    assert!(
        took < GIVE_UP,
        "migrate took {took:?} after the cut:\n{err}"
    );
    assert!(
        err.contains("the source VM is running") || err.contains("migration failed"),
        "{err}"
    );
    // The source runs on, and its QMP socket is free for the next client.
    let qmp = support::qmp(&src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Running, "{err}");
    let after = support::migration_status(&qmp).await.0;
    assert!(
        matches!(after, MigrationStatus::Failed | MigrationStatus::Cancelled),
        "source migration status {after:?}"
    );
    drop(qmp);
    eprintln!(
        "{scheme}{}: gave up {took:?} after the cut",
        if relay { " relay" } else { "" }
    );

    // The link comes back; the failed destination is replaced by a fresh one (a QEMU takes
    // one incoming migration), and the same server carries the next migration.
    ns.link_up();
    drop(dst);
    let _dst = destination(&bin, &dst_qmp);
    let mut again = migrate.clone();
    again.retain(|a| a != BANDWIDTH && a != "--max-bandwidth");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(&again, Duration::from_secs(120)).await;
        if out.status.success() {
            break;
        }
        // The server frees the route once it has noticed the dead session.
        assert!(
            out.stderr.contains("already under way") && Instant::now() < deadline,
            "the next migration failed:\n{}\nserver log:\n{}",
            out.stderr,
            srv.stderr()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let qmp = support::qmp(&src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Postmigrate);
    srv.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_down_direct() {
    link_down_mid_precopy("tcp", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_down_tcp_relay() {
    link_down_mid_precopy("tcp", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_down_ws() {
    link_down_mid_precopy("ws", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_down_tls() {
    link_down_mid_precopy("tls", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_down_wss() {
    link_down_mid_precopy("wss", false).await;
}
