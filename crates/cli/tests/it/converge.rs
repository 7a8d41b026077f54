//! Convergence: a guest that dirties its memory faster than `--max-bandwidth` lets the
//! migration move it never converges in precopy. `migrate` says so, and after
//! `--converge-timeout` finishes it with `--postcopy`, gives `--auto-converge` its time, or
//! cancels cleanly (exit 1, both rates in the message, the source running on).
//!
//! The guest is the dirtying firmware (`qmigrate_testkit::dirtying`): it writes its 32 MiB
//! region at 64 MiB/s, paced by the TSC, and counts its passes where the test can read them on
//! the destination.

use crate::support;
use support::path;

use std::time::Duration;

use qmigrate_qmp::{MigrationStatus, RunState};
use qmigrate_testkit::dirtying::{read_counters, DirtyConfig};
use support::proc::{run, Output};
use support::qemu::{self, QemuBinary, Vm, VmConfig};
use support::tunnel::server;

const MEM_MIB: u64 = 128;
/// The link: a quarter of the guest's dirty rate.
const BANDWIDTH: &str = "16MiB";
const REGION_MIB: u64 = 32;
const DIRTY_MIB_S: f64 = 64.0;

/// KVM where it works here (the firmware runs under it), else TCG.
fn accel() -> &'static str {
    if std::fs::File::open("/dev/kvm").is_ok() {
        "kvm"
    } else {
        "tcg"
    }
}

struct Rig {
    src: Vm,
    dst: Vm,
    dir: tempfile::TempDir,
}

fn rig(bin: &QemuBinary) -> Rig {
    let cfg = VmConfig {
        mem_mib: MEM_MIB,
        random_ram: false,
        accel: Some(accel().to_owned()),
        dirtying: Some(DirtyConfig::new(REGION_MIB, DIRTY_MIB_S)),
        ..VmConfig::default()
    };
    let src = Vm::start(bin, &cfg).expect("start the source QEMU");
    let dst = Vm::start(
        bin,
        &VmConfig {
            incoming_defer: true,
            ..cfg
        },
    )
    .expect("start the destination QEMU");
    Rig {
        src,
        dst,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

async fn migrate(rig: &Rig, extra: &[&str]) -> Output {
    let (mut srv, url) = server(rig.dir.path(), &["--qmp".into(), path(&rig.dst.qmp_path)]).await;
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&rig.src.qmp_path),
        "--to".into(),
        url,
        "--max-bandwidth".into(),
        BANDWIDTH.into(),
        "--converge-timeout".into(),
        "5s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run(&args, Duration::from_secs(180)).await;
    srv.kill().await;
    out
}

/// The guest runs on the destination: its chunk counter moves there (a whole pass over the
/// region can take longer than the half second looked at).
async fn runs_on_destination(rig: &Rig) {
    let dst = support::qmp(&rig.dst.qmp_path).await;
    assert_eq!(support::vm_state(&dst).await.0, RunState::Running);
    let a = read_counters(&dst).await.expect("counters");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = read_counters(&dst).await.expect("counters");
    assert!(
        b.chunks > a.chunks,
        "the guest does not run on the destination: {a:?} {b:?}"
    );
    let src = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Postmigrate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_converging_is_cancelled_cleanly() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let rig = rig(&bin);
    let out = migrate(&rig, &[]).await;
    out.expect_code(1);
    let err = out.error_line();
    assert!(err.contains("did not converge"), "{err}");
    assert!(err.contains("--postcopy or --auto-converge"), "{err}");
    assert!(
        err.contains("the link moves 16.0 MiB/s") || err.contains("the link moves 1"),
        "{err}"
    );
    assert!(
        out.stderr.contains("not converging"),
        "the progress never said so:\n{}",
        out.stderr
    );
    let src = support::qmp(&rig.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Running);
    assert_eq!(
        support::migration_status(&src).await.0,
        MigrationStatus::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_converging_switches_to_postcopy() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let rig = rig(&bin);
    // Postcopy enabled but not asked to switch by passes: the policy does it.
    let out = migrate(&rig, &["--postcopy=1000"]).await;
    out.expect_success();
    assert!(
        out.stderr.contains("switching to postcopy") && out.stderr.contains("not converged"),
        "{}",
        out.stderr
    );
    runs_on_destination(&rig).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_converge_finishes_it() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let rig = rig(&bin);
    let out = migrate(&rig, &["--auto-converge"]).await;
    out.expect_success();
    runs_on_destination(&rig).await;
}
