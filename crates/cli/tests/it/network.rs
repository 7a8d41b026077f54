//! Network failures, made for real: the tunnel-server runs in a network namespace of its own
//! behind a veth pair, and the far end of the link goes down mid-migration (no FIN, no RST: a
//! pulled cable). `migrate` must end, exit 1, leave the source VM running with its QMP socket
//! free, and the same tunnel-server must carry the next migration once the link is back.

use crate::support;
use support::path;

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

/// Starts `tunnel-server ARGS` inside `ns` (named `name` for its log in `dir`) and returns it
/// with the URL it listens on.
async fn server_in(ns: &NetNs, dir: &Path, name: &str, args: &[String]) -> (Proc, String) {
    let mut srv = Proc::spawn_wrapped(name, dir, &ns.command("env"), args);
    let line = srv.next_line(READY).await;
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .trim()
        .to_owned();
    (srv, url)
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
    let (mut srv, url) = server_in(&ns, d, "tunnel-server", &args).await;
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

/// A halting guest's migration in postcopy through a server in `ns`: the server, with the
/// short dead-peer timeout these tests use so that a cut kills the connections quickly.
struct PostcopyRig {
    _dir: tempfile::TempDir,
    src: Vm,
    dst: Vm,
    srv: Proc,
    url: String,
    client: Vec<String>,
    d: std::path::PathBuf,
}

/// The dead-peer timeout of the postcopy tests: the link stays down well beyond it, so that
/// the connections die and both QEMUs pause (a short outage is absorbed by TCP).
const DEAD_PEER: &str = "5s";

async fn postcopy_rig(bin: &QemuBinary, ns: &NetNs, scheme: &'static str) -> PostcopyRig {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_owned();
    let src = Vm::start(
        bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            ..VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let dst_qmp = d.join("dst.qmp");
    let dst = destination(bin, &dst_qmp);
    let s = setup(&d, scheme, ns.addr());
    let mut args = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        format!("{scheme}://{}:0", ns.addr()),
        "--qmp".into(),
        path(&dst_qmp),
        "--dead-peer-timeout".into(),
        DEAD_PEER.into(),
    ];
    args.extend(s.server.iter().cloned());
    let (srv, url) = server_in(ns, &d, "tunnel-server", &args).await;
    let mut client = s.client.clone();
    client.extend(["--dead-peer-timeout".into(), DEAD_PEER.into()]);
    PostcopyRig {
        _dir: dir,
        src,
        dst,
        srv,
        url,
        client,
        d,
    }
}

impl PostcopyRig {
    /// `migrate --postcopy=0` capped at [`BANDWIDTH`] in precopy and postcopy, started.
    fn start(&self, recover_timeout: &str) -> Proc {
        let mut args = vec![
            "migrate".to_owned(),
            "--qmp".into(),
            path(&self.src.qmp_path),
            "--to".into(),
            self.url.clone(),
            "--postcopy=0".into(),
            "--max-bandwidth".into(),
            BANDWIDTH.into(),
            "--postcopy-bandwidth".into(),
            BANDWIDTH.into(),
            "--recover-timeout".into(),
            recover_timeout.into(),
        ];
        args.extend(self.client.iter().cloned());
        Proc::spawn("migrate", &self.d, &args)
    }

    /// Both completed, the source in postmigrate, and the destination's RAM the source's.
    async fn verify(&self) {
        let src = support::qmp(&self.src.qmp_path).await;
        let dst = support::qmp(&self.dst.qmp_path).await;
        assert_eq!(
            support::migration_status(&src).await.0,
            MigrationStatus::Completed
        );
        assert_eq!(
            support::migration_status(&dst).await.0,
            MigrationStatus::Completed
        );
        assert_eq!(support::vm_state(&src).await.0, RunState::Postmigrate);
        let a = support::ram_sha256(&src, MEM_MIB, &self.d.join("src.ram")).await;
        let b = support::ram_sha256(&dst, MEM_MIB, &self.d.join("dst.ram")).await;
        assert_eq!(a, b, "destination RAM differs from the source's");
    }
}

/// Waits until `path`'s QEMU reports `want` (the QMP socket may still be held for a moment by
/// the tunnel-server's session).
async fn wait_status(path: &Path, want: MigrationStatus, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(qmp) = support::try_qmp(path).await {
            let status = support::migration_status(&qmp).await.0;
            if status == want {
                return;
            }
            assert!(Instant::now() < deadline, "status {status:?}, not {want:?}");
        }
        assert!(Instant::now() < deadline, "QMP {} busy", path.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Postcopy, the link down for three dead-peer timeouts: both QEMUs pause, `migrate`
/// reconnects once the link is back, resumes, and the destination's RAM is the source's.
async fn postcopy_recovers(scheme: &'static str) {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, scheme).await;
    let mut mig = rig.start("3m");
    // At 8 MiB/s the 256 MiB take half a minute; postcopy starts after the first pass is
    // under way.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ns.link_down();
    tokio::time::sleep(Duration::from_secs(15)).await;
    ns.link_up();
    let (status, _) = mig.wait(Duration::from_secs(240)).await;
    let err = mig.stderr();
    assert_eq!(
        status.code(),
        Some(0),
        "{err}\nserver:\n{}",
        rig.srv.stderr()
    );
    assert!(err.contains("postcopy paused"), "no pause seen:\n{err}");
    assert!(err.contains("resuming the migration"), "{err}");
    rig.verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_recovers_direct() {
    postcopy_recovers("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_recovers_ws() {
    postcopy_recovers("ws").await;
}

/// Postcopy with the link down longer than `--recover-timeout`: `migrate` exits 1 and says
/// to run `qmigrate recover`, both QEMUs are left paused (not killed); once the link is back,
/// `qmigrate recover` completes the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_given_up_then_recover_command() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut mig = rig.start("5s");
    tokio::time::sleep(Duration::from_secs(6)).await;
    ns.link_down();
    let (status, _) = mig.wait(Duration::from_secs(120)).await;
    let err = mig.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("qmigrate recover"), "{err}");
    wait_status(
        &rig.src.qmp_path,
        MigrationStatus::PostcopyPaused,
        Duration::from_secs(10),
    )
    .await;
    wait_status(
        &rig.dst.qmp_path,
        MigrationStatus::PostcopyPaused,
        Duration::from_secs(60),
    )
    .await;
    ns.link_up();

    let mut args = vec![
        "recover".to_owned(),
        "--qmp".into(),
        path(&rig.src.qmp_path),
        "--to".into(),
        rig.url.clone(),
    ];
    args.extend(rig.client.iter().cloned());
    let out = run(&args, Duration::from_secs(240)).await;
    assert!(
        out.status.success(),
        "recover:\n{}\nserver:\n{}",
        out.stderr,
        rig.srv.stderr()
    );
    rig.verify().await;

    // Nothing left to recover: a usage error, and nothing touched.
    let again = run(&args, Duration::from_secs(60)).await;
    assert_eq!(again.status.code(), Some(2), "{}", again.stderr);
    assert!(
        again.stderr.contains("nothing to recover"),
        "{}",
        again.stderr
    );
}

/// Restarts the rig's tunnel-server on the same address (a crash and a restart by systemd).
async fn restart_server(rig: &mut PostcopyRig, ns: &NetNs) {
    rig.srv.kill().await;
    let listen = rig.url.trim_end_matches('/').to_owned();
    let s = setup(&rig.d, "tcp", ns.addr());
    let mut args = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        listen,
        "--qmp".into(),
        path(&rig.dst.qmp_path),
        "--dead-peer-timeout".into(),
        DEAD_PEER.into(),
    ];
    args.extend(s.server.iter().cloned());
    let (srv, url) = server_in(ns, &rig.d, "tunnel-server-2", &args).await;
    assert_eq!(url.trim_end_matches('/'), rig.url.trim_end_matches('/'));
    rig.srv = srv;
}

/// The tunnel-server killed during postcopy and started again: the migration (relayed: on the
/// direct data path the QEMUs hold the connection and a server's death does not touch it)
/// recovers through the new process and completes, RAM identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_during_postcopy() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let mut rig = postcopy_rig(&bin, &ns, "tcp").await;
    rig.client.push("--relay".into());
    let mut mig = rig.start("3m");
    tokio::time::sleep(Duration::from_secs(6)).await;
    restart_server(&mut rig, &ns).await;
    let (status, _) = mig.wait(Duration::from_secs(240)).await;
    let err = mig.stderr();
    assert_eq!(
        status.code(),
        Some(0),
        "{err}\nserver:\n{}",
        rig.srv.stderr()
    );
    assert!(err.contains("postcopy paused"), "no pause seen:\n{err}");
    rig.verify().await;
}

/// The tunnel-server killed mid-precopy (relayed): `migrate` fails at once (the connections
/// are reset), the source runs on, and after a restart the next migration to a fresh
/// destination works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_precopy() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let mut rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&rig.src.qmp_path),
        "--to".into(),
        rig.url.clone(),
        "--max-bandwidth".into(),
        BANDWIDTH.into(),
        "--relay".into(),
    ];
    args.extend(rig.client.iter().cloned());
    let mut mig = Proc::spawn("migrate", &rig.d, &args);
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.srv.kill().await;
    let killed = Instant::now();
    let (status, _) = mig.wait(GIVE_UP + Duration::from_secs(30)).await;
    let err = mig.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(killed.elapsed() < GIVE_UP, "{:?}:\n{err}", killed.elapsed());
    let qmp = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Running, "{err}");
    drop(qmp);

    // The old destination dies first: its exit unlinks the QMP socket at the same path,
    // which would otherwise take the new one's away.
    rig.dst.kill();
    drop(std::mem::replace(
        &mut rig.dst,
        destination(&bin, &rig.d.join("dst.qmp")),
    ));
    restart_server(&mut rig, &ns).await;
    args.retain(|a| a != BANDWIDTH && a != "--max-bandwidth");
    let out = run(&args, Duration::from_secs(120)).await;
    assert!(
        out.status.success(),
        "{}\nserver:\n{}",
        out.stderr,
        rig.srv.stderr()
    );
    let qmp = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Postmigrate);
}

/// A step-by-step rig: a plain tunnel-server (no --qmp) in the namespace beside the rig's,
/// connecting to `dest.sock`, and a tunnel-client on `src.sock` reaching it.
struct StepByStep {
    srv: Proc,
    client: Proc,
    dest_sock: std::path::PathBuf,
    src_sock: std::path::PathBuf,
}

async fn step_by_step_tunnel(rig: &PostcopyRig, ns: &NetNs, scheme: &'static str) -> StepByStep {
    let d = rig.d.clone();
    let dest_sock = d.join("dest.sock");
    let src_sock = d.join("src.sock");
    let s = setup(&d, scheme, ns.addr());
    let mut args = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        format!("{scheme}://{}:0", ns.addr()),
        "--socket".into(),
        path(&dest_sock),
        "--dead-peer-timeout".into(),
        DEAD_PEER.into(),
    ];
    args.extend(s.server.iter().cloned());
    let (srv, url) = server_in(ns, &d, "plain-server", &args).await;
    assert!(url.starts_with(scheme), "{url}");
    let mut args = vec![
        "tunnel-client".to_owned(),
        "--connect".into(),
        url,
        "--socket".into(),
        path(&src_sock),
        "--dead-peer-timeout".into(),
        DEAD_PEER.into(),
    ];
    args.extend(s.client.iter().cloned());
    let mut client = Proc::spawn("tunnel-client", &d, &args);
    let line = client.next_line(READY).await;
    assert!(line.starts_with("listening on "), "{line}");
    StepByStep {
        srv,
        client,
        dest_sock,
        src_sock,
    }
}

impl StepByStep {
    /// `receive --postcopy --wait` on the destination's socket, once it has said it is ready.
    async fn receive_waiting(&self, rig: &PostcopyRig) -> Proc {
        let mut receive = Proc::spawn(
            "receive",
            &rig.d,
            [
                "receive",
                "--qmp",
                &path(&rig.dst.qmp_path),
                "--socket",
                &path(&self.dest_sock),
                "--postcopy",
                "--wait",
            ],
        );
        let line = receive.next_line(READY).await;
        assert!(line.starts_with("ready: "), "{line}");
        receive
    }

    /// `recover --socket` on the source completes the paused migration (every log shown if
    /// not, `receive`'s too when there is one).
    async fn recover_source(&self, rig: &PostcopyRig, receive: Option<&Proc>) {
        let mut recover = Proc::spawn(
            "recover",
            &rig.d,
            [
                "recover",
                "--qmp",
                &path(&rig.src.qmp_path),
                "--socket",
                &path(&self.src_sock),
            ],
        );
        let (status, _) = recover.wait(Duration::from_secs(240)).await;
        assert!(
            status.success(),
            "recover: {}\nreceive:\n{}\nserver:\n{}\nclient:\n{}",
            recover.stderr(),
            receive.map(Proc::stderr).unwrap_or_default(),
            self.srv.stderr(),
            self.client.stderr()
        );
    }

    /// `send --postcopy=0` capped at [`BANDWIDTH`] through the tunnel-client, with `extra`.
    fn send(&self, rig: &PostcopyRig, extra: &[&str]) -> Proc {
        let mut args = vec![
            "send".to_owned(),
            "--qmp".into(),
            path(&rig.src.qmp_path),
            "--socket".into(),
            path(&self.src_sock),
            "--postcopy=0".into(),
            "--max-bandwidth".into(),
            BANDWIDTH.into(),
            "--postcopy-bandwidth".into(),
            BANDWIDTH.into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        Proc::spawn("send", &rig.d, &args)
    }
}

/// Waits until `proc` has written `text` to stderr.
async fn stderr_says(proc: &Proc, text: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !proc.stderr().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} within {limit:?}:\n{}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Step by step (`receive --wait`, `send` through tunnel-server and tunnel-client): the link
/// pulled during postcopy for longer than the dead-peer timeout, so that both QEMUs pause;
/// once it is back, `receive` (the destination listens again) and `send` (resuming with
/// backoff) recover by themselves and the migration completes, RAM identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_by_step_postcopy_recovers_by_itself() {
    recovers_by_itself(false).await;
}

/// As [`step_by_step_postcopy_recovers_by_itself`], with the destination's migration socket
/// file removed as the link goes down. QEMU (10 and 7.2) keeps listening on its first listener
/// for the whole incoming migration, and that alone would take the resume; without the file
/// only `receive` making the destination listen again (`migrate-recover` binds the path anew)
/// lets it through, so this test fails when `receive` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_by_step_postcopy_recovers_by_itself_socket_removed() {
    recovers_by_itself(true).await;
}

async fn recovers_by_itself(remove_socket: bool) {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut t = step_by_step_tunnel(&rig, &ns, "tcp").await;
    let mut receive = t.receive_waiting(&rig).await;
    let mut send = t.send(&rig, &[]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    ns.link_down();
    let down = Instant::now();
    if remove_socket {
        // Before the destination notices (the dead-peer timeout): it has not paused yet.
        std::fs::remove_file(&t.dest_sock).expect("remove the destination's socket");
    }
    // Both QEMUs pause once the dead-peer timeout has closed the tunnel's connections.
    stderr_says(&send, "postcopy paused", Duration::from_secs(60)).await;
    stderr_says(&receive, "listening again", Duration::from_secs(60)).await;
    // A resume that cannot get through while the link is down, and is retried.
    stderr_says(&send, "trying again", Duration::from_secs(60)).await;
    // Down long enough for the backoff to grow past its first steps.
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(down.elapsed())).await;
    let paused = down.elapsed();
    ns.link_up();
    let up = Instant::now();
    stderr_says(&receive, "the source resumed", Duration::from_secs(120)).await;
    let resumed = up.elapsed();
    let (status, _) = send.wait(Duration::from_secs(240)).await;
    let took = up.elapsed();
    let err = send.stderr();
    assert_eq!(
        status.code(),
        Some(0),
        "send: {err}\nreceive:\n{}\nserver:\n{}\nclient:\n{}",
        receive.stderr(),
        t.srv.stderr(),
        t.client.stderr()
    );
    let (status, _) = receive.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "receive: {}", receive.stderr());
    assert!(
        receive.stderr().contains("incoming migration completed"),
        "{}",
        receive.stderr()
    );
    eprintln!(
        "link down for {paused:?}; after it came back: resumed in {resumed:?}, completed in \
         {took:?}\nsend:\n{err}\nreceive:\n{}",
        receive.stderr()
    );
    rig.verify().await;
    t.srv.kill().await;
    t.client.kill().await;
}

/// Step by step, Ctrl-C while `send` and `receive --wait` wait for the link: both stop
/// within bounds, `send` exits 1 and `receive` 4, both QEMUs are left postcopy-paused (not
/// killed, not cancelled); once the link is back `recover --socket` on the source completes
/// the migration (the destination still listens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_by_step_postcopy_recovery_interrupted() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut t = step_by_step_tunnel(&rig, &ns, "tcp").await;
    let mut receive = t.receive_waiting(&rig).await;
    let mut send = t.send(&rig, &[]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    ns.link_down();
    stderr_says(&send, "trying again", Duration::from_secs(60)).await;
    stderr_says(&receive, "listening again", Duration::from_secs(60)).await;
    send.signal(libc::SIGINT);
    receive.signal(libc::SIGINT);
    let sent = Instant::now();
    let (status, _) = receive.wait(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(4), "receive: {}", receive.stderr());
    // A resume under way ends within the tunnel's connect timeout (10 s) and a margin.
    let (status, _) = send.wait(Duration::from_secs(40)).await;
    let err = send.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("the recovery stops"), "{err}");
    assert!(err.contains("qmigrate recover"), "{err}");
    eprintln!("send stopped {:?} after SIGINT", sent.elapsed());
    wait_status(
        &rig.src.qmp_path,
        MigrationStatus::PostcopyPaused,
        Duration::from_secs(10),
    )
    .await;
    wait_status(
        &rig.dst.qmp_path,
        MigrationStatus::PostcopyPaused,
        Duration::from_secs(10),
    )
    .await;
    ns.link_up();
    t.recover_source(&rig, None).await;
    rig.verify().await;
    t.srv.kill().await;
    t.client.kill().await;
}

/// QEMU 7.2 on both sides, whose source hangs in `postcopy-recover` when a resume cannot get
/// through: `send` does not resume blind and exits 1 naming `qmigrate recover`, while
/// `receive --wait` makes the paused destination listen again by itself; once the link is
/// back, `recover --socket` on the source alone completes the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_by_step_postcopy_qemu72_recover_after_send() {
    let Some(bin) = qemu::require(qemu::qemu72(), "QEMU 7.2") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut t = step_by_step_tunnel(&rig, &ns, "tcp").await;
    let mut receive = t.receive_waiting(&rig).await;
    let mut send = t.send(&rig, &[]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    ns.link_down();
    let (status, _) = send.wait(Duration::from_secs(120)).await;
    let err = send.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("cannot retry a resume"), "{err}");
    assert!(err.contains("qmigrate recover"), "{err}");
    stderr_says(&receive, "listening again", Duration::from_secs(60)).await;
    ns.link_up();
    t.recover_source(&rig, Some(&receive)).await;
    let (status, _) = receive.wait(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "receive: {}", receive.stderr());
    rig.verify().await;
    t.srv.kill().await;
    t.client.kill().await;
}

/// Step by step, `send` giving up: postcopy paused by a pulled link, `send` retries the resume
/// for its short --recover-timeout, then exits 1 naming the recovery, both QEMUs paused; once
/// the link is back, `recover --incoming` on the destination and `recover --socket` on the
/// source complete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_by_step_postcopy_recovers() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut t = step_by_step_tunnel(&rig, &ns, "tcp").await;
    let dst_qmp = path(&rig.dst.qmp_path);
    let dest_sock = path(&t.dest_sock);
    let out = run(
        [
            "receive",
            "--qmp",
            &dst_qmp,
            "--socket",
            &dest_sock,
            "--postcopy",
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success(), "receive: {}", out.stderr);
    assert!(out.stderr.contains("recover --incoming"), "{}", out.stderr);
    let mut send = t.send(&rig, &["--recover-timeout", "5s"]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    ns.link_down();
    let (status, _) = send.wait(Duration::from_secs(120)).await;
    let err = send.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("trying again"), "no retry:\n{err}");
    assert!(err.contains("recover --incoming"), "{err}");
    wait_status(
        &rig.src.qmp_path,
        MigrationStatus::PostcopyPaused,
        Duration::from_secs(10),
    )
    .await;
    wait_status(
        &rig.dst.qmp_path,
        MigrationStatus::PostcopyPaused,
        Duration::from_secs(60),
    )
    .await;
    ns.link_up();

    let out = run(
        [
            "recover",
            "--incoming",
            "--qmp",
            &dst_qmp,
            "--socket",
            &dest_sock,
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success(), "recover --incoming: {}", out.stderr);
    t.recover_source(&rig, None).await;
    rig.verify().await;
    t.srv.kill().await;
    t.client.kill().await;
}

/// The tunnel-server frozen mid-precopy (`SIGSTOP`: its kernel still acknowledges every byte,
/// so keepalive sees nothing wrong): the control connection's heartbeats stop, and `migrate`
/// gives up within the dead-peer timeout and a margin, naming the silent control connection,
/// exit 1, the source running. Once the server runs again it frees the route, and the next
/// migration through it (to a fresh destination QEMU) succeeds.
async fn server_stopped_mid_precopy(relay: bool) {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let mut rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&rig.src.qmp_path),
        "--to".into(),
        rig.url.clone(),
        "--max-bandwidth".into(),
        BANDWIDTH.into(),
    ];
    if relay {
        args.push("--relay".into());
    }
    args.extend(rig.client.iter().cloned());
    let mut mig = Proc::spawn("migrate", &rig.d, &args);
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.srv.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let (status, _) = mig.wait(Duration::from_secs(90)).await;
    let took = stopped.elapsed();
    rig.srv.signal(libc::SIGCONT);
    let err = mig.stderr();
    eprintln!(
        "{}: migrate gave up {took:?} after the server stopped: {}",
        if relay { "relay" } else { "direct" },
        err.lines().last().unwrap_or_default()
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("the tunnel-server sent nothing on the control connection for 5 s"),
        "the message names the silent control connection:\n{err}"
    );
    // The dead-peer timeout (5 s), the cancel, and the tunnel's bounded stop (5 s).
    assert!(took < Duration::from_secs(20), "took {took:?}:\n{err}");
    let qmp = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Running, "{err}");
    // Cancelled; relayed, QEMU sometimes sees the torn-down connection first.
    let after = support::migration_status(&qmp).await.0;
    assert!(
        matches!(after, MigrationStatus::Cancelled | MigrationStatus::Failed),
        "source migration status {after:?}"
    );
    drop(qmp);

    // The same server, running again, with a fresh destination (the old one took its one
    // incoming migration). The old one dies first: while it lives, its socket at the same
    // path passes for the new one's.
    rig.dst.kill();
    drop(std::mem::replace(
        &mut rig.dst,
        destination(&bin, &rig.d.join("dst.qmp")),
    ));
    args.retain(|a| a != BANDWIDTH && a != "--max-bandwidth");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(&args, Duration::from_secs(120)).await;
        if out.status.success() {
            break;
        }
        assert!(
            out.stderr.contains("already under way") && Instant::now() < deadline,
            "the next migration failed:\n{}\nserver log:\n{}",
            out.stderr,
            rig.srv.stderr()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let qmp = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Postmigrate);
    rig.srv.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_precopy_relay() {
    server_stopped_mid_precopy(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stopped_mid_precopy_direct() {
    server_stopped_mid_precopy(false).await;
}

/// A migration that lasts several dead-peer timeouts (the tests' 5 s), with nothing wrong:
/// the heartbeats keep both ends of the control connection satisfied, and it completes with
/// the destination's RAM the source's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_migration_keeps_its_control_connection() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&rig.src.qmp_path),
        "--to".into(),
        rig.url.clone(),
        // 256 MiB at 16 MiB/s: about three dead-peer timeouts.
        "--max-bandwidth".into(),
        "16MiB".into(),
    ];
    args.extend(rig.client.iter().cloned());
    let started = Instant::now();
    let out = run(&args, Duration::from_secs(120)).await;
    let took = started.elapsed();
    eprintln!("the migration took {took:?}");
    assert!(
        out.status.success(),
        "{}\nserver:\n{}",
        out.stderr,
        rig.srv.stderr()
    );
    assert!(
        took > Duration::from_secs(10),
        "too quick to prove anything: {took:?}"
    );
    rig.verify().await;
}

/// Step by step over `ws://` (`send`, tunnel-client, a plain tunnel-server, `receive`): the
/// tunnel-server frozen mid-precopy. There is no control connection here: the WebSocket pings
/// are what notice it. The tunnel-client drops the connection within its dead-peer timeout,
/// which fails the source QEMU's migration, and `send` exits 1 with the source running, even
/// with the stall timeout off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_by_step_ws_server_stopped() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let Some(ns) = NetNs::new() else { return };
    let rig = postcopy_rig(&bin, &ns, "tcp").await;
    let mut t = step_by_step_tunnel(&rig, &ns, "ws").await;
    let dst_qmp = path(&rig.dst.qmp_path);
    let src_qmp = path(&rig.src.qmp_path);
    let out = run(
        [
            "receive",
            "--qmp",
            &dst_qmp,
            "--socket",
            &path(&t.dest_sock),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(out.status.success(), "receive: {}", out.stderr);
    let mut send = Proc::spawn(
        "send",
        &rig.d,
        [
            "send",
            "--qmp",
            &src_qmp,
            "--socket",
            &path(&t.src_sock),
            "--max-bandwidth",
            BANDWIDTH,
            "--stall-timeout",
            "off",
        ],
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    t.srv.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let (status, _) = send.wait(Duration::from_secs(90)).await;
    let took = stopped.elapsed();
    t.srv.signal(libc::SIGCONT);
    let err = send.stderr();
    eprintln!(
        "send ended {took:?} after the ws server stopped: {}",
        err.lines().last().unwrap_or_default()
    );
    assert_eq!(status.code(), Some(1), "{err}");
    // The dead-peer timeout (5 s) and QEMU's failure.
    assert!(
        took < Duration::from_secs(20),
        "took {took:?}:\n{err}\nclient:\n{}",
        t.client.stderr()
    );
    assert!(
        t.client
            .stderr()
            .contains("the peer did not answer WebSocket pings for 5s"),
        "the tunnel-client names the pings:\n{}",
        t.client.stderr()
    );
    let qmp = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await.0, RunState::Running, "{err}");
    drop(qmp);
    t.srv.kill().await;
    t.client.kill().await;
}
