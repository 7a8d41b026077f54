//! `migrate --copy-storage`: a running Linux guest (testkit's `guest`) writing checksummed
//! records to its own disk image, moved with its disk to a destination that has an empty image
//! of the same size (local storage on both hosts), through a `tunnel-server --qmp`. After the
//! migration, with the source paused and the destination not yet started (`--no-start`), both
//! images must be identical (`qemu-img compare`); then the destination is started and the
//! guest must go on (its heartbeats continue, its disk records check out, including the
//! source's last one, read back from the copy).
//!
//! The guests take a slot of testkit's guest gate, like `running_guest`.

use crate::support;
use support::path;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use qmigrate_qmp::{MigrationStatus, RunState};
use qmigrate_testkit::check;
use qmigrate_testkit::guest::{Expect, GuestConfig, GuestPair};
use support::proc::{run, Proc};
use support::qemu::{self, QemuBinary};
use support::tunnel::{server, Transport, Tunnel};

/// Deadline for one `qmigrate` run.
const RUN: Duration = Duration::from_secs(180);
/// How long the destination has to show that the guest continued.
const CONTINUE: Duration = Duration::from_secs(60);

/// The source after a copy that did not complete: running, no block job and no NBD node of
/// ours left.
async fn source_left_clean(qmp: &Path) {
    let src = check::qmp(qmp).await;
    assert_eq!(check::vm_state(&src).await, (RunState::Running, true));
    let jobs = src
        .execute(&qmigrate_qmp::QueryBlockJobs)
        .await
        .expect("query-block-jobs");
    assert!(jobs.is_empty(), "{jobs:?}");
    let nodes = src
        .execute(&qmigrate_qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await
        .expect("query-named-block-nodes");
    assert!(
        nodes.iter().all(|n| !n.node_name.starts_with("qmigrate-")),
        "{:?}",
        nodes.iter().map(|n| &n.node_name).collect::<Vec<_>>()
    );
}

/// MiB of data on the source's disk before the guest boots (beside the workload's records).
const FILL_MIB: u64 = 24;

/// The source's disk: 64 MiB, of which the workload writes up to 16 MiB.
fn config() -> GuestConfig {
    GuestConfig {
        disk_mib: 64,
        ..GuestConfig::default()
    }
}

/// `qemu-img compare -U` of the two images of `format` (`-U`: QEMU holds them open).
fn compare(a: &Path, b: &Path, format: &str) -> (bool, String) {
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", format, "-F", format])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img compare");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Asserts that the VM behind `qmp` has no block export (its NBD server stopped or released).
async fn assert_no_exports(qmp: &qmigrate_qmp::Qmp) {
    let exports = qmp
        .execute(&qmigrate_qmp::QueryBlockExports)
        .await
        .expect("query-block-exports");
    assert!(exports.is_empty(), "{exports:?}");
}

/// The JSON objects of `--json` output of `type`.
fn events(stdout: &str, kind: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// The whole path over TCP: the disk copied while the guest writes to it, then the RAM, the
/// images identical afterwards, and the guest continuing on the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_tcp() {
    copy_and_compare("storage_copy_tcp", &[], "tcp://", config(), FILL_MIB).await;
}

/// Two disks, a qcow2 one the guest writes to and a raw one, both copied (each destination
/// image of its own format).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_qcow2_and_raw() {
    let cfg = GuestConfig {
        raw_disk_mib: Some(32),
        ..config()
    };
    let Some((_, summary)) =
        copy_and_compare("storage_copy_qcow2_and_raw", &[], "tcp://", cfg, FILL_MIB).await
    else {
        return;
    };
    let disks: Vec<&str> = summary["storage"]["disks"]
        .as_array()
        .map(|a| a.iter().filter_map(|d| d["disk"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(disks, ["vblk0", "vblk1"], "{summary}");
}

/// A 4 GiB disk with 256 MiB of data: only the data is copied, and the destination's image
/// takes about as much room as the source's (within 10%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_sparse() {
    let cfg = GuestConfig {
        disk_mib: 4096,
        ..config()
    };
    let Some((pair, summary)) =
        copy_and_compare("storage_copy_sparse", &[], "tcp://", cfg, 256).await
    else {
        return;
    };
    let (src, dst) = (allocated(&pair.disk), allocated(&pair.dst_disk));
    assert!(
        dst.abs_diff(src) * 10 <= src,
        "allocated: source {src}, destination {dst}; {summary}"
    );
    let copied = summary["storage"]["copied"].as_u64().unwrap_or(0);
    assert!(
        copied < 512 << 20,
        "copied {copied} of a 4 GiB disk: {summary}"
    );
    eprintln!("storage_copy_sparse: allocated source {src}, destination {dst}, copied {copied}");
}

/// The bytes an image takes on its host (`qemu-img info`'s `actual-size`).
fn allocated(image: &Path) -> u64 {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .expect("run qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("qemu-img info JSON");
    info["actual-size"].as_u64().expect("actual-size")
}

/// The same over WebSocket: the NBD connections are WebSocket tunnel connections too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_ws() {
    copy_and_compare("storage_copy_ws", &["--ws"], "ws://", config(), FILL_MIB).await;
}

/// `migrate --copy-storage --no-start --json` of a guest writing to its disk (`cfg`, with
/// `fill` MiB of data on the disk beforehand), through a `tunnel-server --qmp` with
/// `server_extra`; then the checks of the module doc. The pair and the summary, for more
/// checks (`None`: skipped, no QEMU 10 or guest image).
async fn copy_and_compare(
    name: &str,
    server_extra: &[&str],
    scheme: &str,
    cfg: GuestConfig,
    fill: u64,
) -> Option<(GuestPair, serde_json::Value)> {
    let (bin, img) = support::linux_guest()?;
    let started = Instant::now();
    let pair = GuestPair::start_local(&bin, &img, &cfg, cfg.disk_mib << 20, fill).await;
    let mut args = vec!["--qmp".to_owned(), path(pair.dst.qmp_path())];
    args.extend(server_extra.iter().map(|s| s.to_string()));
    let (mut srv, url) = server(pair.dir(), &args).await;
    assert!(url.starts_with(scheme), "{url}");
    let t = Instant::now();
    let out = run(
        [
            "migrate",
            "--qmp",
            &path(pair.src.qmp_path()),
            "--to",
            &url,
            "--copy-storage",
            "--no-start",
            "--json",
        ],
        RUN,
    )
    .await;
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

    // Progress went through both phases, per disk.
    let ticks = events(&out.stdout, "progress");
    let disk_phase = ticks
        .iter()
        .filter(|t| t["status"] == "none" && t["storage"]["disks"][0]["disk"] == "vblk0")
        .count();
    let ram_phase = ticks
        .iter()
        .filter(|t| t["status"] == "active" && t["storage"]["disks"][0]["ready"] == true)
        .count();
    assert!(disk_phase > 0 && ram_phase > 0, "{}", out.stdout);
    let summary = events(&out.stdout, "summary").pop().expect("a summary");
    assert_eq!(summary["status"], "completed", "{summary}");
    let copied = summary["storage"]["disks"][0]["copied"]
        .as_u64()
        .unwrap_or(0);
    assert!(copied >= fill << 20, "{summary}");
    // "disks copied (1.2 s); ...": the disk phase's own measure.
    let copy_note = events(&out.stdout, "note")
        .into_iter()
        .filter_map(|n| n["message"].as_str().map(str::to_owned))
        .find(|m| m.starts_with("disks copied"))
        .unwrap_or_else(|| panic!("no 'disks copied' note in:\n{}", out.stdout));

    // The source is paused for good, the destination not started: the images must match now.
    let src = check::qmp(pair.src.qmp_path()).await;
    assert_eq!(check::vm_state(&src).await.0, RunState::Postmigrate);
    drop(src);
    let (same, said) = compare(&pair.disk, &pair.dst_disk, "qcow2");
    assert!(same, "qemu-img compare: {said}\n{}", pair.report());
    if let Some((src_raw, dst_raw)) = &pair.raw_disks {
        let (same, said) = compare(src_raw, dst_raw, "raw");
        assert!(
            same,
            "qemu-img compare of the raw disks: {said}\n{}",
            pair.report()
        );
    }

    let dst = check::qmp(pair.dst.qmp_path()).await;
    assert_eq!(
        check::migration_status(&dst).await.0,
        MigrationStatus::Completed
    );
    dst.execute(&qmigrate_qmp::Cont).await.expect("cont");
    drop(dst);
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    let secs = took.as_secs_f64();
    eprintln!(
        "{name}: boot {:.1} s, migration {secs:.1} s ({:.1} MiB copied; {copy_note}), downtime \
         {} ms, whole test {:.1} s; {verdict:?}",
        pair.boot_time.as_secs_f64(),
        copied as f64 / (1 << 20) as f64,
        summary["downtime_ms"],
        started.elapsed().as_secs_f64()
    );
    Some((pair, summary))
}

/// The `-blockdev`/`-device` arguments of a VM's disk `vblk0` on the qcow2 `image`.
fn disk_args(image: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=file,filename={},node-name=file0", path(image)),
        "-blockdev".into(),
        "driver=qcow2,file=file0,node-name=disk0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vblk0".into(),
    ]
}

/// A firmware VM of `bin` waiting for an incoming migration (`-incoming defer -S`) on the qcow2
/// `image`.
fn firmware_destination(bin: &QemuBinary, image: &Path) -> qemu::Vm {
    let mut cfg = qemu::destination_config(64);
    cfg.extra_args.extend(disk_args(image));
    qemu::Vm::start(bin, &cfg).expect("start a destination QEMU")
}

/// Firmware VMs (KVM: the unpacked QEMU 7.2 has no TCG, which the Linux guest needs) of QEMU
/// `src_bin` and `dst_bin` on machine `machine`, on the images `src_disk` and `dst_disk`,
/// migrated with `migrate FLAG --no-start --json` through a `tunnel-server --qmp`. The output
/// and the source's QMP path; both VMs stay up until the returned guard is dropped.
async fn firmware_copy(
    (src_bin, dst_bin): (&QemuBinary, &QemuBinary),
    machine: &str,
    (src_disk, dst_disk): (&Path, &Path),
    flag: &str,
) -> (support::proc::Output, (qemu::Vm, qemu::Vm), Duration) {
    let src = qemu::Vm::start(
        src_bin,
        &qemu::VmConfig {
            mem_mib: 64,
            machine: machine.into(),
            extra_args: disk_args(src_disk),
            ..qemu::VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let mut dst_cfg = qemu::destination_config(64);
    dst_cfg.machine = machine.into();
    dst_cfg.extra_args.extend(disk_args(dst_disk));
    let dst = qemu::Vm::start(dst_bin, &dst_cfg).expect("start the destination QEMU");
    let (mut srv, url) = server(&src.dir, &["--qmp".into(), path(&dst.qmp_path)]).await;
    let t = Instant::now();
    let out = run(
        [
            "migrate",
            "--qmp",
            &path(&src.qmp_path),
            "--to",
            &url,
            flag,
            "--no-start",
            "--json",
        ],
        RUN,
    )
    .await;
    let took = t.elapsed();
    srv.kill().await;
    (out, (src, dst), took)
}

/// After a completed [`firmware_copy`]: the summary (completed, at least `min` bytes copied),
/// the source postmigrate, the images identical and the destination's exports gone.
async fn check_copied(
    out: &support::proc::Output,
    (src, dst): &(qemu::Vm, qemu::Vm),
    (src_disk, dst_disk): (&Path, &Path),
    min: u64,
) -> serde_json::Value {
    assert!(
        out.status.success(),
        "migrate: {:?}\n{}\n--- source QEMU\n{}\n--- destination QEMU\n{}",
        out.status,
        out.stderr,
        src.log(),
        dst.log()
    );
    let summary = events(&out.stdout, "summary").pop().expect("a summary");
    assert_eq!(summary["status"], "completed", "{summary}");
    let copied = summary["storage"]["disks"][0]["copied"]
        .as_u64()
        .unwrap_or(0);
    assert!(copied >= min, "{summary}");
    let s = check::qmp(&src.qmp_path).await;
    assert_eq!(check::vm_state(&s).await.0, RunState::Postmigrate);
    drop(s);
    let (same, said) = compare(src_disk, dst_disk, "qcow2");
    assert!(same, "qemu-img compare: {said}");
    let t_dst = check::qmp(&dst.qmp_path).await;
    assert_no_exports(&t_dst).await;
    summary
}

/// `migrate --copy-storage` between firmware VMs of QEMU `src_bin` and `dst_bin`, each with its
/// own disk (the source's with 24 MiB of data): completed, with the images identical and the
/// destination's NBD server gone.
async fn copy_between(src_bin: &QemuBinary, dst_bin: &QemuBinary, machine: &str, name: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (src_disk, dst_disk) = (d.join("src.qcow2"), d.join("dst.qcow2"));
    qmigrate_testkit::guest::create_disk(&src_disk, 64);
    qmigrate_testkit::guest::fill_disk(&src_disk, 8, FILL_MIB);
    qmigrate_testkit::guest::create_disk(&dst_disk, 64);
    let disks = (src_disk.as_path(), dst_disk.as_path());
    let (out, vms, took) =
        firmware_copy((src_bin, dst_bin), machine, disks, "--copy-storage").await;
    let summary = check_copied(&out, &vms, disks, FILL_MIB << 20).await;
    eprintln!(
        "{name}: QEMU {:?} -> {:?}, {} bytes copied, migration {:.1} s, downtime {} ms",
        src_bin.version,
        dst_bin.version,
        summary["storage"]["disks"][0]["copied"],
        took.as_secs_f64(),
        summary["downtime_ms"]
    );
}

/// `qemu-img create -f qcow2 -b BACKING -F qcow2 IMAGE`: an empty overlay.
fn overlay(image: &Path, backing: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(image)
        .output()
        .expect("run qemu-img create");
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--copy-storage-inc`: the source's disk is an overlay (8 MiB of data) on a base image (24
/// MiB), the destination's an empty overlay on a copy of that base. Only the top image's data
/// crosses (`sync=top`), and the two chains read the same afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_incremental() {
    let Some(bin) = support::qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (base, dst_base) = (d.join("base.qcow2"), d.join("dst-base.qcow2"));
    qmigrate_testkit::guest::create_disk(&base, 64);
    qmigrate_testkit::guest::fill_disk(&base, 8, FILL_MIB);
    std::fs::copy(&base, &dst_base).expect("copy the base image");
    let (src_disk, dst_disk) = (d.join("src.qcow2"), d.join("dst.qcow2"));
    overlay(&src_disk, &base);
    qmigrate_testkit::guest::fill_image(&src_disk, "qcow2", 40, 8);
    overlay(&dst_disk, &dst_base);
    let disks = (src_disk.as_path(), dst_disk.as_path());
    let (out, vms, took) = firmware_copy((&bin, &bin), "q35", disks, "--copy-storage-inc").await;
    let summary = check_copied(&out, &vms, disks, 8 << 20).await;
    let copied = summary["storage"]["disks"][0]["copied"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        copied < 16 << 20,
        "the base image was copied too: {summary}"
    );
    eprintln!(
        "storage_copy_incremental: {copied} bytes copied (8 MiB in the top image, 24 MiB in \
         the base), migration {:.1} s",
        took.as_secs_f64()
    );
}

/// `--copy-storage-inc` to a destination image without a backing file: refused before anything
/// is copied, saying how to make one; both QEMUs stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_incremental_without_backing_refused() {
    let Some(bin) = support::qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = d.join("base.qcow2");
    qmigrate_testkit::guest::create_disk(&base, 64);
    let (src_disk, dst_disk) = (d.join("src.qcow2"), d.join("dst.qcow2"));
    overlay(&src_disk, &base);
    qmigrate_testkit::guest::create_disk(&dst_disk, 64);
    let disks = (src_disk.as_path(), dst_disk.as_path());
    let (out, (src, dst), _) =
        firmware_copy((&bin, &bin), "q35", disks, "--copy-storage-inc").await;
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    for needle in [
        "vblk0",
        "no backing file",
        "qemu-img create -f qcow2 -b BASE",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?} in:\n{}",
            out.stderr
        );
    }
    let s = check::qmp(&src.qmp_path).await;
    assert_eq!(check::migration_status(&s).await.0, MigrationStatus::None);
    let jobs = s
        .execute(&qmigrate_qmp::QueryBlockJobs)
        .await
        .expect("query-block-jobs");
    assert!(jobs.is_empty(), "{jobs:?}");
    drop(s);
    let t = check::qmp(&dst.qmp_path).await;
    assert_eq!(check::vm_state(&t).await.0, RunState::InMigrate);
    assert_eq!(check::migration_status(&t).await.0, MigrationStatus::None);
}

fn qemu72() -> Option<QemuBinary> {
    qemu::require(qemu::qemu72(), "QEMU 7.2")
}

/// QEMU 7.2 on both sides: no `block-job-change` there, so the source's mirrors start in
/// write-blocking mode; the destination exports and releases its disk as QEMU 10 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_qemu72_to_qemu72() {
    let Some(old) = qemu72() else { return };
    copy_between(&old, &old, "q35", "storage_copy_qemu72_to_qemu72").await;
}

/// A QEMU 7.2 source (write-blocking from the start) to a QEMU 10 destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_qemu72_to_qemu10() {
    let (Some(old), Some(new)) = (qemu72(), support::qemu10()) else {
        return;
    };
    copy_between(&old, &new, "pc-q35-7.2", "storage_copy_qemu72_to_qemu10").await;
}

/// A QEMU 10 source (switching to write-blocking at ready) to a QEMU 7.2 destination, on 7.2's
/// machine type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_copy_qemu10_to_qemu72() {
    let (Some(new), Some(old)) = (support::qemu10(), qemu72()) else {
        return;
    };
    copy_between(&new, &old, "pc-q35-7.2", "storage_copy_qemu10_to_qemu72").await;
}

/// A destination image 1 MiB too small is refused before anything is copied, with a message
/// naming the disk, both sizes and the `qemu-img create` that fixes it; both QEMUs stay as
/// they were (the source running, the destination waiting for a migration).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_size_mismatch_refused() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let cfg = config();
    let size = cfg.disk_mib << 20;
    let small = size - (1 << 20);
    let pair = GuestPair::start_local(&bin, &img, &cfg, small, 0).await;
    let (mut srv, url) = server(pair.dir(), &["--qmp".into(), path(pair.dst.qmp_path())]).await;
    let out = run(
        [
            "migrate",
            "--qmp",
            &path(pair.src.qmp_path()),
            "--to",
            &url,
            "--copy-storage=vblk0",
        ],
        RUN,
    )
    .await;
    srv.kill().await;
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    for needle in [
        "vblk0".to_owned(),
        size.to_string(),
        small.to_string(),
        format!("qemu-img create -f qcow2 {} {size}", path(&pair.dst_disk)),
    ] {
        assert!(
            out.stderr.contains(&needle),
            "{needle:?} in:\n{}",
            out.stderr
        );
    }
    let src = check::qmp(pair.src.qmp_path()).await;
    assert_eq!(check::vm_state(&src).await, (RunState::Running, true));
    assert_eq!(check::migration_status(&src).await.0, MigrationStatus::None);
    let jobs = src
        .execute(&qmigrate_qmp::QueryBlockJobs)
        .await
        .expect("query-block-jobs");
    assert!(jobs.is_empty(), "{jobs:?}");
    drop(src);
    let dst = check::qmp(pair.dst.qmp_path()).await;
    assert_eq!(check::vm_state(&dst).await.0, RunState::InMigrate);
    assert_eq!(check::migration_status(&dst).await.0, MigrationStatus::None);
    let (same_size, said) = compare(&pair.dst_disk, &pair.dst_disk, "qcow2");
    assert!(same_size, "the destination image is still readable: {said}");
}

/// MiB of data on the disk of [`big_copy_pair`]'s guest.
const BIG_FILL_MIB: u64 = 384;

/// A guest pair on a 512 MiB disk with [`BIG_FILL_MIB`] of data: several seconds to copy at
/// the rates seen here (50-100 MiB/s), for tests that act mid-copy (`None`: skipped).
async fn big_copy_pair() -> Option<GuestPair> {
    let (bin, img) = support::linux_guest()?;
    let cfg = GuestConfig {
        disk_mib: 512,
        ..GuestConfig::default()
    };
    Some(GuestPair::start_local(&bin, &img, &cfg, cfg.disk_mib << 20, BIG_FILL_MIB).await)
}

/// Spawns `send --copy-storage --json` of `pair`'s source through the tunnel-client on
/// `socket`.
fn spawn_send(pair: &GuestPair, socket: &Path) -> Proc {
    Proc::spawn(
        "send",
        pair.dir(),
        [
            "send",
            "--qmp",
            &path(pair.src.qmp_path()),
            "--socket",
            &path(socket),
            "--copy-storage",
            "--json",
        ],
    )
}

/// Waits for the first disk-phase progress tick of `proc` (a `migrate` or `send` with
/// `--copy-storage --json`) with something copied, and asserts that not all of `total` was:
/// the bytes copied then.
async fn mid_copy(proc: &mut Proc, total: u64) -> u64 {
    loop {
        let line = proc.next_line(RUN).await;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let copied = v["storage"]["copied"].as_u64().unwrap_or(0);
        if v["type"] == "progress" && v["status"] == "none" && copied > 0 {
            assert!(copied < total, "the copy was done already: {line}");
            return copied;
        }
    }
}

/// Starts `migrate --copy-storage --json EXTRA` of `pair` through a new `tunnel-server --qmp`
/// (with `extra` too) and waits until the disk copy is under way: the server and the `migrate`.
async fn migrate_mid_copy(pair: &GuestPair, extra: &[String]) -> (Proc, Proc) {
    let mut args = vec!["--qmp".to_owned(), path(pair.dst.qmp_path())];
    args.extend(extra.iter().cloned());
    let (srv, url) = server(pair.dir(), &args).await;
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(pair.src.qmp_path()),
        "--to".into(),
        url,
        "--copy-storage".into(),
        "--json".into(),
    ];
    args.extend(extra.iter().cloned());
    let mut migrate = Proc::spawn("migrate", pair.dir(), &args);
    mid_copy(&mut migrate, BIG_FILL_MIB << 20).await;
    (srv, migrate)
}

/// Ctrl-C to a `migrate --copy-storage` under way: it exits 4 within 15 s saying the
/// destination's images are incomplete, and the source is left clean ([`source_left_clean`]);
/// how long it took after the signal.
async fn interrupted(pair: &GuestPair, srv: &mut Proc, migrate: &mut Proc) -> Duration {
    let t = Instant::now();
    migrate.signal(libc::SIGINT);
    let (status, _) = migrate.wait(RUN).await;
    let stopped = t.elapsed();
    let stderr = migrate.stderr();
    srv.kill().await;
    assert_eq!(status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("incomplete"), "{stderr}");
    assert!(
        stopped < Duration::from_secs(15),
        "took {stopped:?}: {stderr}"
    );
    source_left_clean(pair.src.qmp_path()).await;
    stopped
}

/// `qemu-img check` finds `image` intact (read while QEMU has it open).
fn image_intact(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(image)
        .output()
        .expect("run qemu-img check");
    assert!(
        out.status.success(),
        "qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The guest still runs on the source, and its own checks of its records pass.
async fn source_guest_runs(pair: &GuestPair) {
    let before = pair.src.serial().heartbeats.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = pair.src.serial();
    assert!(log.failures.is_empty(), "{:?}", log.failures);
    assert!(log.heartbeats.len() > before, "{}", pair.report());
}

/// Starts `migrate --copy-storage --max-bandwidth 2M --json` of `pair` through a new
/// `tunnel-server --qmp` and waits until the RAM phase has moved something (2 MB/s for 128 MiB
/// of RAM: it lasts until the test ends it): the server, the `migrate` and that progress tick.
async fn migrate_into_ram_phase(pair: &GuestPair) -> (Proc, Proc, serde_json::Value) {
    let (srv, url) = server(pair.dir(), &["--qmp".into(), path(pair.dst.qmp_path())]).await;
    let mut migrate = Proc::spawn(
        "migrate",
        pair.dir(),
        [
            "migrate",
            "--qmp",
            &path(pair.src.qmp_path()),
            "--to",
            &url,
            "--copy-storage",
            "--max-bandwidth",
            "2M",
            "--json",
        ],
    );
    loop {
        let line = migrate.next_line(RUN).await;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["type"] == "progress" && v["status"] == "active" && v["transferred"].as_u64() > Some(0)
        {
            return (srv, migrate, v);
        }
    }
}

/// Ctrl-C during the disk phase: `migrate` exits 4 at once, the mirrors are gone (no job, no
/// NBD node left on the source), the source VM keeps running on its own image, which
/// `qemu-img check` finds intact, and the message says the destination's images are
/// incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_interrupted_during_copy() {
    let Some(pair) = big_copy_pair().await else {
        return;
    };
    let (mut srv, mut migrate) = migrate_mid_copy(&pair, &[]).await;
    let stopped = interrupted(&pair, &mut srv, &mut migrate).await;
    image_intact(&pair.disk);
    // The guest still runs (and checks its records) on the source.
    source_guest_runs(&pair).await;
    eprintln!("storage_interrupted_during_copy: exit 4 after {stopped:?}");
}

/// The tunnel-server hangs (SIGSTOP) during the disk phase: the control connection falls
/// silent, and `migrate` gives up after the dead-peer timeout with exit 1 (a failure, not the
/// operator's cancel), naming the silent server and the incomplete images; the mirrors are
/// gone and the source runs on its own disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_server_silent_during_copy() {
    let Some(pair) = big_copy_pair().await else {
        return;
    };
    let dead_peer = ["--dead-peer-timeout".to_owned(), "3s".to_owned()];
    let (mut srv, mut migrate) = migrate_mid_copy(&pair, &dead_peer).await;
    srv.signal(libc::SIGSTOP);
    let t = Instant::now();
    let (status, _) = migrate.wait(RUN).await;
    let took = t.elapsed();
    srv.signal(libc::SIGCONT);
    let stderr = migrate.stderr();
    srv.kill().await;
    eprintln!(
        "storage_server_silent_during_copy: exit {:?} {took:?} after the stop (NBD connections \
         yanked: {}): {}",
        status.code(),
        stderr.contains("yanking"),
        stderr.lines().last().unwrap_or_default()
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("sent nothing on the control connection"),
        "the message names the silent server:\n{stderr}"
    );
    assert!(stderr.contains("incomplete"), "{stderr}");
    // The dead-peer timeout, the mirrors' forced cancel, the tunnel's bounded stop.
    assert!(took < Duration::from_secs(30), "took {took:?}: {stderr}");
    source_left_clean(pair.src.qmp_path()).await;
    source_guest_runs(&pair).await;
}

/// The destination QEMU dies while the RAM migrates (the disks already copied and kept in
/// sync): `migrate` exits 1 saying the destination's images are incomplete, the mirrors are
/// abandoned and the NBD nodes removed, and the guest goes on on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_destination_lost_during_ram() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let cfg = config();
    let mut pair = GuestPair::start_local(&bin, &img, &cfg, cfg.disk_mib << 20, FILL_MIB).await;
    let (mut srv, mut migrate, _) = migrate_into_ram_phase(&pair).await;
    pair.dst.vm.kill();
    let (status, _) = migrate.wait(RUN).await;
    let stderr = migrate.stderr();
    srv.kill().await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("incomplete"), "{stderr}");

    source_left_clean(pair.src.qmp_path()).await;
    source_guest_runs(&pair).await;
}

/// Spawns `receive --qmp QMP --socket SOCKET EXTRA...` (a `--copy-storage` flag among `extra`)
/// in `dir` and waits until it has exported the disks: the process and its "disks exported"
/// line.
async fn start_receive(dir: &Path, qmp: &Path, socket: &Path, extra: &[&str]) -> (Proc, String) {
    let mut args = vec![
        "receive".to_owned(),
        "--qmp".into(),
        path(qmp),
        "--socket".into(),
        path(socket),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let mut receive = Proc::spawn("receive", dir, &args);
    let exported = receive
        .line_matching(RUN, |l| l.starts_with("disks exported"))
        .await;
    (receive, exported)
}

/// The tunnels of the step-by-step tests.
#[derive(Debug, Clone, Copy)]
enum Scheme {
    Tcp,
    Ws,
    /// TLS over TCP, the server's self-signed certificate pinned by the client.
    Tls,
}

/// `tunnel-server` and `tunnel-client --copy-storage` over `scheme`, in `dir`.
async fn copy_tunnel(dir: &Path, scheme: Scheme) -> Tunnel {
    let (transport, server_extra, mut client_extra) = match scheme {
        Scheme::Tcp => (Transport::Tcp, Vec::new(), Vec::new()),
        Scheme::Ws => (Transport::Ws, Vec::new(), Vec::new()),
        Scheme::Tls => {
            let (cert, key, pin) = support::tunnel::self_signed_cert(dir);
            let server = vec!["--tls-cert".into(), cert, "--tls-key".into(), key];
            (
                Transport::Tcp,
                server,
                vec!["--tls-fingerprint".into(), pin],
            )
        }
    };
    client_extra.push("--copy-storage".into());
    let tunnel = Tunnel::start_with(dir, transport, &server_extra, &client_extra).await;
    let expected = format!("{scheme:?}://").to_lowercase();
    assert!(tunnel.url.starts_with(&expected), "{}", tunnel.url);
    tunnel
}

/// Step by step through the TCP tunnel: `receive --copy-storage` exports the destination's
/// disk over NBD beside its migration socket, `tunnel-server` (without --qmp) routes the NBD
/// connections there, `tunnel-client --copy-storage` carries them from the socket beside its
/// own, and `send --copy-storage` mirrors the disk of the running guest, then migrates the RAM.
/// `receive` stops its NBD server and leaves the guest paused (no --start); with the source
/// paused for good, the images are identical, and once started the guest goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_step_by_step_tcp() {
    step_by_step(Scheme::Tcp).await;
}

/// [`storage_step_by_step_tcp`] over WebSocket: the NBD connections are WebSocket tunnel
/// connections too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_step_by_step_ws() {
    step_by_step(Scheme::Ws).await;
}

/// [`storage_step_by_step_tcp`] over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_step_by_step_tls() {
    step_by_step(Scheme::Tls).await;
}

/// Stall timeout of `receive` in the tests that copy to the end: the guest writes all along,
/// and the RAM migration begins moments after the copy, so it never runs out (a false alarm
/// would fail them).
const RECEIVE_STALL: &str = "10s";

/// The step-by-step migration of [`storage_step_by_step_tcp`] through a tunnel of `scheme`.
async fn step_by_step(scheme: Scheme) {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let name = format!("storage_step_by_step_{scheme:?}").to_lowercase();
    let started = Instant::now();
    let cfg = config();
    let pair = GuestPair::start_local(&bin, &img, &cfg, cfg.disk_mib << 20, FILL_MIB).await;
    let tunnel = copy_tunnel(pair.dir(), scheme).await;
    let (mut receive, exported) = start_receive(
        pair.dir(),
        pair.dst.qmp_path(),
        &tunnel.dest_socket,
        &["--copy-storage", "--stall-timeout", RECEIVE_STALL],
    )
    .await;
    assert!(exported.contains("vblk0"), "{exported}");
    let t = Instant::now();
    let out = run(
        [
            "send",
            "--qmp",
            &path(pair.src.qmp_path()),
            "--socket",
            &path(&tunnel.source_socket),
            "--copy-storage",
            "--json",
        ],
        RUN,
    )
    .await;
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "send: {:?}\n{}\n{}\n--- receive\n{}\n{}",
        out.status,
        out.stderr,
        tunnel.logs(),
        receive.stderr(),
        pair.report()
    );
    let (status, _) = receive.wait(RUN).await;
    assert!(status.success(), "receive: {}", receive.stderr());
    // The destination released its exports only once the source's NBD clients had gone: none
    // of them tried to reconnect to a stopped server.
    assert!(
        !tunnel.client.stderr().contains("NBD tunnel connection"),
        "{}",
        tunnel.logs()
    );

    let summary = events(&out.stdout, "summary").pop().expect("a summary");
    assert_eq!(summary["status"], "completed", "{summary}");
    let copied = summary["storage"]["disks"][0]["copied"]
        .as_u64()
        .unwrap_or(0);
    assert!(copied >= FILL_MIB << 20, "{summary}");
    assert!(
        events(&out.stdout, "progress")
            .iter()
            .any(|t| t["status"] == "none" && t["storage"]["disks"][0]["disk"] == "vblk0"),
        "no disk-phase progress: {}",
        out.stdout
    );

    let src = check::qmp(pair.src.qmp_path()).await;
    assert_eq!(check::vm_state(&src).await.0, RunState::Postmigrate);
    let nodes = src
        .execute(&qmigrate_qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await
        .expect("query-named-block-nodes");
    assert!(
        nodes.iter().all(|n| !n.node_name.starts_with("qmigrate-")),
        "NBD nodes left on the source"
    );
    drop(src);
    let (same, said) = compare(&pair.disk, &pair.dst_disk, "qcow2");
    assert!(same, "qemu-img compare: {said}\n{}", pair.report());

    let dst = check::qmp(pair.dst.qmp_path()).await;
    assert_eq!(
        check::migration_status(&dst).await.0,
        MigrationStatus::Completed
    );
    assert_eq!(check::vm_state(&dst).await.0, RunState::Paused);
    // The NBD server stopped before the guest may start (its exports hold the images).
    assert_no_exports(&dst).await;
    dst.execute(&qmigrate_qmp::Cont).await.expect("cont");
    drop(dst);
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    eprintln!(
        "{name}: send {:.1} s ({:.1} MiB copied), downtime {} ms, whole test {:.1} s; \
         {verdict:?}",
        took.as_secs_f64(),
        copied as f64 / (1 << 20) as f64,
        summary["downtime_ms"],
        started.elapsed().as_secs_f64()
    );
}

/// Step by step, `send` and the `tunnel-client` killed mid disk copy (the source's host gone):
/// QMP shows the destination nothing, but no NBD write reaches its exported disk any more, and
/// `receive --stall-timeout 5s` gives up within that bound: exit 1, saying that the source
/// stopped sending disk data, that the images are incomplete and that the destination QEMU
/// must be restarted; its NBD server is stopped and its dirty bitmaps removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_step_by_step_source_dies_during_copy() {
    let Some(pair) = big_copy_pair().await else {
        return;
    };
    let mut tunnel = copy_tunnel(pair.dir(), Scheme::Tcp).await;
    let (mut receive, _) = start_receive(
        pair.dir(),
        pair.dst.qmp_path(),
        &tunnel.dest_socket,
        &["--copy-storage", "--stall-timeout", "5s"],
    )
    .await;
    let mut send = spawn_send(&pair, &tunnel.source_socket);
    let copied = mid_copy(&mut send, BIG_FILL_MIB << 20).await;
    send.kill().await;
    tunnel.client.kill().await;
    let t = Instant::now();
    // The bound, from the last write (at most the kill), with a margin for a loaded host.
    let (status, _) = receive.wait(Duration::from_secs(5 + 25)).await;
    let took = t.elapsed();
    let stderr = receive.stderr();
    assert_eq!(status.code(), Some(1), "{stderr}\n{}", tunnel.logs());
    for needle in [
        "the source stopped sending disk data",
        "incomplete",
        "restart the destination QEMU",
    ] {
        assert!(stderr.contains(needle), "{needle:?} in:\n{stderr}");
    }
    // Not before the stall timeout (less the poll interval).
    assert!(
        took >= Duration::from_secs(3),
        "receive gave up {took:?} after the kill: {stderr}"
    );
    let dst = check::qmp(pair.dst.qmp_path()).await;
    assert_no_exports(&dst).await;
    let nodes = dst
        .execute(&qmigrate_qmp::QueryNamedBlockNodes { flat: Some(true) })
        .await
        .expect("query-named-block-nodes");
    assert!(
        nodes.iter().all(|n| n.dirty_bitmaps.is_empty()),
        "bitmaps left: {nodes:?}"
    );
    assert_eq!(check::vm_state(&dst).await.0, RunState::InMigrate);
    eprintln!(
        "storage_step_by_step_source_dies_during_copy: killed after {:.1} MiB, receive exit 1 \
         {:.1} s later",
        copied as f64 / (1 << 20) as f64,
        took.as_secs_f64()
    );
}

/// `receive --copy-storage --stall-timeout 3s` and no `send` at all: no disk data arrives, and
/// `receive` gives up after the bound (exit 1), its NBD server stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_receive_without_source_gives_up() {
    let Some(bin) = support::qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("dst.qcow2");
    qmigrate_testkit::guest::create_disk(&disk, 64);
    let dst = firmware_destination(&bin, &disk);
    let t = Instant::now();
    let out = run(
        [
            "receive",
            "--qmp",
            &path(&dst.qmp_path),
            "--socket",
            &path(&dir.path().join("dest.sock")),
            "--copy-storage",
            "--stall-timeout",
            "3s",
        ],
        RUN,
    )
    .await;
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("no disk data arrived within 3 s"),
        "{}",
        out.stderr
    );
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(3 + 20),
        "took {took:?}"
    );
    let t_dst = check::qmp(&dst.qmp_path).await;
    assert_no_exports(&t_dst).await;
    eprintln!(
        "storage_receive_without_source_gives_up: exit 1 after {:.1} s: {}",
        took.as_secs_f64(),
        out.stderr.trim()
    );
}

/// Step by step, a destination image 1 MiB too small: `send --copy-storage` reads the size of
/// the export over NBD and refuses before anything is copied, naming the disk, both sizes and
/// the `qemu-img create` that fixes it; the source keeps running with no NBD node left, and
/// the destination still waits for a migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_step_by_step_size_mismatch_refused() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let cfg = config();
    let size = cfg.disk_mib << 20;
    let small = size - (1 << 20);
    let pair = GuestPair::start_local(&bin, &img, &cfg, small, 0).await;
    let tunnel = copy_tunnel(pair.dir(), Scheme::Tcp).await;
    let (mut receive, _) = start_receive(
        pair.dir(),
        pair.dst.qmp_path(),
        &tunnel.dest_socket,
        &["--copy-storage"],
    )
    .await;
    let out = run(
        [
            "send",
            "--qmp",
            &path(pair.src.qmp_path()),
            "--socket",
            &path(&tunnel.source_socket),
            "--copy-storage=vblk0",
        ],
        RUN,
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    for needle in [
        "vblk0".to_owned(),
        size.to_string(),
        small.to_string(),
        format!("qemu-img create -f qcow2 IMAGE {size}"),
    ] {
        assert!(
            out.stderr.contains(&needle),
            "{needle:?} in:\n{}",
            out.stderr
        );
    }
    source_left_clean(pair.src.qmp_path()).await;
    let src = check::qmp(pair.src.qmp_path()).await;
    assert_eq!(check::migration_status(&src).await.0, MigrationStatus::None);
    drop(src);
    // `receive` still waits (its QMP connection is the destination's one client): stop it.
    receive.signal(libc::SIGINT);
    let (status, _) = receive.wait(RUN).await;
    assert_eq!(status.code(), Some(4), "{}", receive.stderr());
    let dst = check::qmp(pair.dst.qmp_path()).await;
    assert_eq!(check::vm_state(&dst).await.0, RunState::InMigrate);
    assert_no_exports(&dst).await;
}

/// The part of the source's image that the guest's workload never writes (its records stay
/// below 16 MiB), as raw bytes, read with the guest paused.
async fn untouched_part(qmp: &Path, image: &Path, out: &Path) -> Vec<u8> {
    let src = check::qmp(qmp).await;
    src.execute(&qmigrate_qmp::Stop).await.expect("stop");
    let dd = Command::new("qemu-img")
        .args(["dd", "-U", "-f", "qcow2", "-O", "raw", "bs=1M", "skip=16"])
        .arg(format!("if={}", path(image)))
        .arg(format!("of={}", path(out)))
        .output()
        .expect("run qemu-img dd");
    src.execute(&qmigrate_qmp::Cont).await.expect("cont");
    assert!(
        dd.status.success(),
        "qemu-img dd: {}",
        String::from_utf8_lossy(&dd.stderr)
    );
    std::fs::read(out).expect("read the copy")
}

/// Ctrl-C during the RAM phase (the disks copied and kept in sync by write-blocking mirrors):
/// `migrate` exits 4 saying the destination's images are incomplete, the mirrors are
/// abandoned and the NBD nodes removed, the guest's device is still on its own image, which
/// `qemu-img check` finds intact and whose part the guest never writes is byte for byte what
/// it was before the migration (both read with the guest paused); the guest goes on checking
/// its records on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_interrupted_during_ram() {
    let Some((bin, img)) = support::linux_guest() else {
        return;
    };
    let cfg = config();
    let pair = GuestPair::start_local(&bin, &img, &cfg, cfg.disk_mib << 20, FILL_MIB).await;
    let before = untouched_part(
        pair.src.qmp_path(),
        &pair.disk,
        &pair.dir().join("before.raw"),
    )
    .await;
    let (mut srv, mut migrate, tick) = migrate_into_ram_phase(&pair).await;
    assert_eq!(tick["storage"]["disks"][0]["ready"], true, "{tick}");
    let stopped = interrupted(&pair, &mut srv, &mut migrate).await;
    let src = check::qmp(pair.src.qmp_path()).await;
    let devices = src
        .execute(&qmigrate_qmp::QueryBlock)
        .await
        .expect("query-block");
    let vblk0 = devices
        .iter()
        .find(|d| d.qdev_id() == Some("vblk0"))
        .and_then(|d| d.inserted.as_ref())
        .expect("vblk0 has a medium");
    assert_eq!(vblk0.file, path(&pair.disk), "{vblk0:?}");
    drop(src);
    let after = untouched_part(
        pair.src.qmp_path(),
        &pair.disk,
        &pair.dir().join("after.raw"),
    )
    .await;
    assert!(
        before == after,
        "the part of the image the guest never writes changed"
    );
    image_intact(&pair.disk);
    source_guest_runs(&pair).await;
    eprintln!("storage_interrupted_during_ram: exit 4 after {stopped:?}");
}

/// The link to the destination down for 3 s during the disk copy (step by step, the
/// tunnel-server in a network namespace of its own): with a 1 s dead-peer timeout the NBD
/// tunnel connection breaks, QEMU's NBD client reconnects through a new one once the link is
/// back (within its reconnect delay, its requests waiting meanwhile), the copy completes
/// (`receive`'s stall timeout, 10 s, does not run out), and the images are identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_link_down_during_copy() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(ns) = qmigrate_testkit::netns::NetNs::new() else {
        return;
    };
    // Several seconds of copy, so that the link goes down mid-copy.
    let Some(pair) = big_copy_pair().await else {
        return;
    };
    let d = pair.dir();
    let token = d.join("token");
    std::fs::write(&token, "a token for the storage namespace test\n").expect("token file");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (dest_sock, src_sock) = (d.join("dest.sock"), d.join("source.sock"));
    let auth = ["--token-file".to_owned(), path(&token)];
    let dead_peer = ["--dead-peer-timeout".to_owned(), "1s".to_owned()];
    let mut args = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        format!("tcp://{}:0", ns.addr()),
        "--socket".into(),
        path(&dest_sock),
    ];
    args.extend(auth.iter().chain(&dead_peer).cloned());
    let mut srv = Proc::spawn_wrapped("tunnel-server", d, &ns.command("env"), &args);
    let line = srv.next_line(RUN).await;
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .trim()
        .to_owned();
    let mut args = vec![
        "tunnel-client".to_owned(),
        "--connect".into(),
        url,
        "--socket".into(),
        path(&src_sock),
        "--copy-storage".into(),
    ];
    args.extend(auth.iter().chain(&dead_peer).cloned());
    let mut client = Proc::spawn("tunnel-client", d, &args);
    let line = client.next_line(RUN).await;
    assert!(line.starts_with("listening on "), "{line}");

    // The outage and the NBD client's reconnection stay well within the stall timeout.
    let (mut receive, _) = start_receive(
        d,
        pair.dst.qmp_path(),
        &dest_sock,
        &["--copy-storage", "--stall-timeout", RECEIVE_STALL],
    )
    .await;
    let mut send = spawn_send(&pair, &src_sock);
    let copied_at_cut = mid_copy(&mut send, BIG_FILL_MIB << 20).await;
    let t = Instant::now();
    ns.link_down();
    tokio::time::sleep(Duration::from_secs(3)).await;
    ns.link_up();
    let (status, stdout) = send.wait(RUN).await;
    let took = t.elapsed();
    let logs = format!(
        "--- send\n{}\n--- tunnel-server\n{}\n--- tunnel-client\n{}\n--- receive\n{}",
        send.stderr(),
        srv.stderr(),
        client.stderr(),
        receive.stderr()
    );
    assert!(status.success(), "send: {status:?}\n{logs}");
    let (status, _) = receive.wait(RUN).await;
    assert!(status.success(), "receive: {logs}");
    // The NBD client did reconnect: more than one NBD connection reached the destination.
    let nbd_connections = srv
        .stderr()
        .lines()
        .filter(|l| l.contains("NBD connection closed") || l.contains("NBD connection failed"))
        .count();
    assert!(nbd_connections >= 2, "no NBD reconnect:\n{logs}");
    srv.kill().await;
    client.kill().await;
    let summary = events(&stdout, "summary").pop().expect("a summary");
    assert_eq!(summary["status"], "completed", "{summary}");

    let src = check::qmp(pair.src.qmp_path()).await;
    assert_eq!(check::vm_state(&src).await.0, RunState::Postmigrate);
    drop(src);
    let (same, said) = compare(&pair.disk, &pair.dst_disk, "qcow2");
    assert!(same, "qemu-img compare: {said}\n{logs}");
    let dst = check::qmp(pair.dst.qmp_path()).await;
    dst.execute(&qmigrate_qmp::Cont).await.expect("cont");
    drop(dst);
    let verdict = pair.assert_continued(Expect::default(), CONTINUE).await;
    eprintln!(
        "storage_link_down_during_copy: cut after {:.1} MiB, send done {:.1} s after the cut, \
         {nbd_connections} NBD connections; {verdict:?}",
        copied_at_cut as f64 / (1 << 20) as f64,
        took.as_secs_f64()
    );
}

/// Step by step, `--copy-storage-inc` (firmware VMs): `receive --copy-storage-inc` refuses a
/// destination image without a backing file at once; on an overlay over a copy of the base it
/// exports, `send --copy-storage-inc` mirrors only the top image through the tunnel, and the
/// chains read the same afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_step_by_step_incremental() {
    let Some(bin) = support::qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (base, dst_base) = (d.join("base.qcow2"), d.join("dst-base.qcow2"));
    qmigrate_testkit::guest::create_disk(&base, 64);
    qmigrate_testkit::guest::fill_disk(&base, 8, FILL_MIB);
    std::fs::copy(&base, &dst_base).expect("copy the base image");
    let (src_disk, dst_disk, flat) = (
        d.join("src.qcow2"),
        d.join("dst.qcow2"),
        d.join("flat.qcow2"),
    );
    overlay(&src_disk, &base);
    qmigrate_testkit::guest::fill_image(&src_disk, "qcow2", 40, 8);
    overlay(&dst_disk, &dst_base);
    qmigrate_testkit::guest::create_disk(&flat, 64);
    let src = qemu::Vm::start(
        &bin,
        &qemu::VmConfig {
            mem_mib: 64,
            extra_args: disk_args(&src_disk),
            ..qemu::VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let tunnel = copy_tunnel(d, Scheme::Tcp).await;

    // A destination image without a backing file: refused, nothing exported.
    let wrong = firmware_destination(&bin, &flat);
    let out = run(
        [
            "receive",
            "--qmp",
            &path(&wrong.qmp_path),
            "--socket",
            &path(&tunnel.dest_socket),
            "--copy-storage-inc",
        ],
        // Refused at once; accepted, it would wait for a migration.
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("no backing file"), "{}", out.stderr);
    let w = check::qmp(&wrong.qmp_path).await;
    assert_eq!(check::migration_status(&w).await.0, MigrationStatus::None);
    assert_no_exports(&w).await;
    drop(w);
    drop(wrong);

    let dst = firmware_destination(&bin, &dst_disk);
    let (mut receive, _) = start_receive(
        d,
        &dst.qmp_path,
        &tunnel.dest_socket,
        // Firmware VMs write nothing: once the copy is done no disk data comes until the RAM
        // migration begins, which must come before the stall timeout.
        &["--copy-storage-inc", "--stall-timeout", "5s"],
    )
    .await;
    let out = run(
        [
            "send",
            "--qmp",
            &path(&src.qmp_path),
            "--socket",
            &path(&tunnel.source_socket),
            "--copy-storage-inc",
            "--json",
        ],
        RUN,
    )
    .await;
    assert!(
        out.status.success(),
        "send: {}\n{}\n--- receive\n{}",
        out.stderr,
        tunnel.logs(),
        receive.stderr()
    );
    let (status, _) = receive.wait(RUN).await;
    assert!(status.success(), "receive: {}", receive.stderr());
    let vms = (src, dst);
    let summary = check_copied(
        &out,
        &vms,
        (src_disk.as_path(), dst_disk.as_path()),
        8 << 20,
    )
    .await;
    let copied = summary["storage"]["disks"][0]["copied"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        copied < 16 << 20,
        "the base image was copied too: {summary}"
    );
    eprintln!("storage_step_by_step_incremental: {copied} bytes copied");
}
