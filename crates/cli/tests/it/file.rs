//! Save to a file and restore, against real QEMU: `qmigrate send --to file:|exec:` on a running
//! VM, then `qmigrate receive --from ...` into a new QEMU started with `-incoming defer`, with
//! the restored guest RAM compared byte for byte (SHA-256 of `pmemsave`) with the saved one.
//!
//! Every test has its own temporary directory and QEMUs (killed on drop). The restoring QEMU
//! runs with `-S` so that it stays paused and its RAM can be compared, and with anonymous RAM
//! under the same backend id as the source's file-backed RAM: mapped-ram leaves zero pages out
//! of the file and relies on the destination's RAM starting zeroed.

use crate::support;
use support::path;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qmigrate_qmp::{MigrationStatus, RunState};
use support::proc::{run, Output, Proc};
use support::qemu::{self, QemuBinary, Vm, VmConfig};

/// Guest RAM: small, so that the tests are quick.
const MEM_MIB: u64 = 128;
/// Deadline for one `qmigrate` run that is expected to finish.
const RUN: Duration = Duration::from_secs(120);

fn qemu10() -> Option<QemuBinary> {
    qemu::require(qemu::qemu10(), "QEMU 10")
}

fn qemu72() -> Option<QemuBinary> {
    qemu::require(qemu::qemu72(), "QEMU 7.2")
}

/// A running VM with `mem_mib` MiB of random RAM, to be saved.
fn source(bin: &QemuBinary, mem_mib: u64) -> Vm {
    Vm::start(
        bin,
        &VmConfig {
            mem_mib,
            ..VmConfig::default()
        },
    )
    .expect("start the source QEMU")
}

/// A QEMU waiting to restore (`-incoming defer`), paused afterwards (`-S`).
fn destination(bin: &QemuBinary, mem_mib: u64) -> Vm {
    Vm::start(
        bin,
        &VmConfig {
            mem_mib,
            random_ram: false,
            incoming_defer: true,
            extra_args: vec![
                "-S".to_owned(),
                "-object".to_owned(),
                format!("memory-backend-ram,id=m0,size={mem_mib}M"),
                "-machine".to_owned(),
                "memory-backend=m0".to_owned(),
            ],
            ..VmConfig::default()
        },
    )
    .expect("start the destination QEMU")
}

/// SHA-256 of a VM's RAM.
async fn ram_of(vm: &Vm, mem_mib: u64) -> String {
    let qmp = support::qmp(&vm.qmp_path).await;
    support::ram_sha256(&qmp, mem_mib, &vm.dir.join("ram.dump")).await
}

/// `qmigrate send --json --qmp SRC --to URI EXTRA...`, run to its end.
async fn save(vm: &Vm, to: &str, extra: &[&str]) -> Output {
    let mut args = vec!["send", "--json", "--qmp"];
    let qmp = path(&vm.qmp_path);
    args.push(&qmp);
    args.extend(["--to", to]);
    args.extend(extra);
    run(&args, RUN).await
}

/// `qmigrate receive --json --wait --qmp DST --from URI EXTRA...`, run to its end.
async fn restore(vm: &Vm, from: &str, extra: &[&str]) -> Output {
    let mut args = vec!["receive", "--json", "--wait", "--qmp"];
    let qmp = path(&vm.qmp_path);
    args.push(&qmp);
    args.extend(["--from", from]);
    args.extend(extra);
    run(&args, RUN).await
}

/// The JSON object on a line of stdout whose `type` is `kind` (the last one).
fn json_line(out: &Output, kind: &str) -> serde_json::Value {
    out.stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} line from `{}`:\n{}", out.what, out.stdout))
}

/// Waits until a QEMU process has exited.
fn wait_for_exit(vm: &mut Vm, limit: Duration) {
    let until = Instant::now() + limit;
    while vm.is_alive() {
        assert!(
            Instant::now() < until,
            "QEMU still runs {limit:?} after --quit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `name` and `name.partial` in `dir`: neither may exist after a failed save.
fn assert_no_state(file: &Path) {
    let partial = PathBuf::from(format!("{}.partial", file.display()));
    assert!(
        !file.exists(),
        "{} exists after a failed save",
        file.display()
    );
    assert!(
        !partial.exists(),
        "{} left behind after a failed save",
        partial.display()
    );
}

/// A state file is QEMU's stream: it starts with `QEVM`.
fn assert_qevm(file: &Path) {
    let head = std::fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    assert!(
        head.starts_with(b"QEVM"),
        "{} is not a QEMU stream",
        file.display()
    );
}

/// How a save and its restore went, for the timing report.
struct Timing {
    save: Duration,
    restore: Duration,
}

/// Saves a running VM to `to` (and with `quit`, ends its QEMU with `--quit`), restores `from`
/// into a new QEMU and checks its RAM is the saved one.
async fn save_and_restore(
    bin: &QemuBinary,
    to: &str,
    from: &str,
    send_extra: &[&str],
    receive_extra: &[&str],
    quit: bool,
) -> Timing {
    let mut src = source(bin, MEM_MIB);
    // The firmware only halts: the guest writes nothing, so its RAM before the save is its RAM
    // at the save.
    let before = if quit {
        Some(ram_of(&src, MEM_MIB).await)
    } else {
        None
    };
    let mut send_args = send_extra.to_vec();
    if quit {
        send_args.push("--quit");
    }
    let started = Instant::now();
    let out = save(&src, to, &send_args).await;
    let save_wall = started.elapsed();
    out.expect_success();
    let summary = json_line(&out, "summary");
    assert_eq!(summary["status"], "completed", "{summary}");
    let saved_ram = match before {
        Some(hash) => {
            wait_for_exit(&mut src, Duration::from_secs(10));
            hash
        }
        None => {
            let qmp = support::qmp(&src.qmp_path).await;
            assert_eq!(
                support::vm_state(&qmp).await,
                (RunState::Postmigrate, false),
                "the source after a save"
            );
            drop(qmp);
            let hash = ram_of(&src, MEM_MIB).await;
            src.kill();
            hash
        }
    };

    let dst = destination(bin, MEM_MIB);
    let started = Instant::now();
    let out = restore(&dst, from, receive_extra).await;
    let restore_wall = started.elapsed();
    assert!(
        out.code() == Some(0),
        "restore failed: {}\n{}\n--- destination QEMU's log\n{}",
        out.stdout,
        out.stderr,
        dst.log()
    );
    let result = json_line(&out, "summary");
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["vm"], "paused", "{result}");
    let qmp = support::qmp(&dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&qmp).await.0,
        MigrationStatus::Completed
    );
    drop(qmp);
    assert_eq!(
        ram_of(&dst, MEM_MIB).await,
        saved_ram,
        "restored RAM differs from the saved VM's"
    );
    let ms = |v: &serde_json::Value| v.as_u64().map(Duration::from_millis);
    let timing = Timing {
        save: ms(&summary["total_time_ms"]).unwrap_or(save_wall),
        restore: ms(&result["elapsed_ms"]).unwrap_or(restore_wall),
    };
    eprintln!(
        "timing {to}: save {:?} (qmigrate send {save_wall:?}), restore {:?} (qmigrate receive \
         {restore_wall:?})",
        timing.save, timing.restore
    );
    timing
}

#[tokio::test(flavor = "multi_thread")]
async fn file_save_quit_restore() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.bin");
    let uri = format!("file:{}", state.display());
    save_and_restore(&bin, &uri, &uri, &[], &[], true).await;
    assert_qevm(&state);
    assert_no_state(&dir.path().join("state.bin.partial"));
    // Guest RAM plus QEMU's small RAM blocks (ROMs, firmware) and device state.
    let size = std::fs::metadata(&state).expect("state file").len();
    assert!(
        (MEM_MIB << 20..(MEM_MIB + 8) << 20).contains(&size),
        "state file of {size} bytes"
    );
}

/// The summary names the state file and its size; the source stays paused (postmigrate).
#[tokio::test(flavor = "multi_thread")]
async fn file_save_summary_and_paused_source() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let src = source(&bin, MEM_MIB);
    let state = dir.path().join("vm state.bin");
    let out = save(&src, &format!("file:{}", state.display()), &[]).await;
    out.expect_success();
    let summary = json_line(&out, "summary");
    assert_eq!(summary["file"], path(&state), "{summary}");
    let size = std::fs::metadata(&state).expect("state file").len();
    assert_eq!(summary["file_size"], size, "{summary}");
    let qmp = support::qmp(&src.qmp_path).await;
    assert_eq!(
        support::vm_state(&qmp).await,
        (RunState::Postmigrate, false)
    );
    drop(qmp);

    // Human output: the same facts on stderr.
    let src = source(&bin, MEM_MIB);
    let out = run(
        [
            "send",
            "--qmp",
            &path(&src.qmp_path),
            "--to",
            &format!("file:{}", state.display()),
        ],
        RUN,
    )
    .await;
    out.expect_success();
    assert!(
        out.stderr
            .contains(&format!("  state file   {} (", state.display())),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("file: QEMU's typed file transport"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn file_mapped_ram_multifd_4() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.bin");
    let uri = format!("file:{}", state.display());
    save_and_restore(
        &bin,
        &uri,
        &uri,
        &["--multifd", "4"],
        &["--multifd", "4"],
        true,
    )
    .await;
    assert_qevm(&state);
    let head = std::fs::read(&state).expect("read");
    assert!(
        head.windows(10).take(4096).any(|w| w == b"mapped-ram"),
        "the state file does not record mapped-ram"
    );
}

/// mapped-ram with direct-io (QEMU 9.1+): where the state file's file system takes O_DIRECT,
/// QEMU's channels write and read it with O_DIRECT, and both commands say so; RAM identical.
#[tokio::test(flavor = "multi_thread")]
async fn mapped_ram_direct_io_where_the_file_system_takes_it() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let direct = takes_o_direct(dir.path());
    let state = dir.path().join("state.bin");
    let uri = format!("file:{}", state.display());
    let mut src = source(&bin, MEM_MIB);
    let saved_ram = ram_of(&src, MEM_MIB).await;
    let out = save(&src, &uri, &["--multifd", "2", "--quit"]).await;
    out.expect_success();
    assert_eq!(
        json_line(&out, "summary")["direct_io"],
        direct,
        "{}",
        out.stdout
    );
    wait_for_exit(&mut src, Duration::from_secs(10));

    let dst = destination(&bin, MEM_MIB);
    let out = restore(&dst, &uri, &["--multifd", "2"]).await;
    assert!(out.code() == Some(0), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        json_line(&out, "ready")["direct_io"],
        direct,
        "{}",
        out.stdout
    );
    assert_eq!(ram_of(&dst, MEM_MIB).await, saved_ram);
}

/// Whether a page-aligned page can be written to a file in `dir` with O_DIRECT.
fn takes_o_direct(dir: &Path) -> bool {
    use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
    let file = dir.join("o_direct.probe");
    let ok = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&file)
        .and_then(|f| {
            let buf = vec![0u8; 8192];
            let at = buf.as_ptr().align_offset(4096);
            f.write_all_at(&buf[at..at + 4096], 0)
        })
        .is_ok();
    let _ = std::fs::remove_file(&file);
    ok
}

/// A mapped-ram state restored without --multifd: the capability comes from the file.
#[tokio::test(flavor = "multi_thread")]
async fn mapped_ram_state_restores_without_multifd_flag() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = format!("file:{}", dir.path().join("state.bin").display());
    save_and_restore(&bin, &uri, &uri, &["--multifd", "2"], &[], true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_through_gzip() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let gz = dir.path().join("state.gz");
    // Saving needs a shell (a redirection); restoring is a simple command, run without one.
    save_and_restore(
        &bin,
        &format!("exec:gzip -1 -c > '{}'", gz.display()),
        &format!("exec:gzip -dc '{}'", gz.display()),
        &[],
        &[],
        false,
    )
    .await;
    let head = std::fs::read(&gz).expect("read");
    assert_eq!(&head[..2], b"\x1f\x8b", "not gzip");
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_through_zstd_without_shell() {
    let Some(bin) = qemu10() else { return };
    if !Path::new("/usr/bin/zstd").exists() {
        eprintln!("skipping: /usr/bin/zstd not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let zst = dir.path().join("state.zst");
    save_and_restore(
        &bin,
        &format!("exec:zstd -q -f -o {}", zst.display()),
        &format!("exec:zstd -q -dc {}", zst.display()),
        &[],
        &[],
        true,
    )
    .await;
    let head = std::fs::read(&zst).expect("read");
    assert_eq!(&head[..4], b"\x28\xb5\x2f\xfd", "not zstd");
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_state_fails_restore() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.bin");
    let src = source(&bin, MEM_MIB);
    save(&src, &format!("file:{}", state.display()), &[])
        .await
        .expect_success();
    drop(src);
    let half = std::fs::metadata(&state).expect("state").len() / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .and_then(|f| f.set_len(half))
        .expect("truncate");

    let dst = destination(&bin, MEM_MIB);
    let out = restore(&dst, &format!("file:{}", state.display()), &[]).await;
    out.expect_code(1);
    let error = out.error_line();
    assert!(
        error.contains(&format!("restoring from file:{} failed", state.display())),
        "{error}"
    );
    // QEMU's own reason.
    assert!(error.contains("load of migration failed"), "{error}");
    assert_eq!(json_line(&out, "summary")["status"], "failed");
    assert_eq!(
        std::fs::metadata(&state).expect("state").len(),
        half,
        "the state file was touched"
    );
    // QEMU 9.1+ stays up with exit-on-error off, as QEMU left it.
    let qmp = support::qmp(&dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&qmp).await.0,
        MigrationStatus::Failed
    );
}

/// Missing, empty or foreign files are refused before QEMU is asked; QEMU is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn restore_checks_the_file_first() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = destination(&bin, MEM_MIB);
    let empty = dir.path().join("empty.bin");
    std::fs::write(&empty, b"").expect("write");
    let foreign = dir.path().join("foreign.bin");
    std::fs::write(&foreign, b"\x1f\x8b\x08\0 surely not a VM").expect("write");
    for (file, message) in [
        (dir.path().join("missing.bin"), "does not exist"),
        (empty, "is empty"),
        (foreign, "is not a QEMU state file"),
    ] {
        let out = restore(&dst, &format!("file:{}", file.display()), &[]).await;
        out.expect_code(1);
        assert!(out.error_line().contains(message), "{}", out.error_line());
    }
    let qmp = support::qmp(&dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&qmp).await.0,
        MigrationStatus::None
    );
    assert_eq!(support::vm_state(&qmp).await, (RunState::InMigrate, false));
}

/// QEMU killed half-way through a save: no state file, no partial file.
#[tokio::test(flavor = "multi_thread")]
async fn save_killed_midway_leaves_no_file() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.bin");
    let mut src = source(&bin, MEM_MIB);
    let mut send = Proc::spawn(
        "send",
        dir.path(),
        [
            "send",
            "--json",
            "--qmp",
            &path(&src.qmp_path),
            "--to",
            &format!("file:{}", state.display()),
            "--max-bandwidth",
            "16M",
        ],
    );
    wait_for_progress(&mut send, 8 << 20).await;
    assert!(
        dir.path().join("state.bin.partial").exists(),
        "QEMU writes to the partial file"
    );
    src.kill();
    let (status, _) = send.wait(RUN).await;
    assert_eq!(status.code(), Some(1), "send: {status}\n{}", send.stderr());
    assert_no_state(&state);
}

/// A save QEMU cannot write (a directory nobody may create files in, not even root): a
/// clear failure, no file, the guest (paused for the save) running again.
#[tokio::test(flavor = "multi_thread")]
async fn save_to_unwritable_directory() {
    let Some(bin) = qemu10() else { return };
    let src = source(&bin, MEM_MIB);
    let state = Path::new("/proc/qmigrate-test-state.bin");
    let out = save(&src, &format!("file:{}", state.display()), &[]).await;
    out.expect_code(1);
    assert!(
        out.error_line().contains("qmigrate-test-state.bin.partial"),
        "{}",
        out.error_line()
    );
    assert_no_state(state);
    let qmp = support::qmp(&src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await, (RunState::Running, true));
}

/// Ctrl-C during a save: exit 4, the earlier state at PATH untouched, no partial file, the
/// guest running again.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_save_keeps_the_earlier_state() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.bin");
    std::fs::write(&state, b"QEVM: the earlier state").expect("write");
    let src = source(&bin, MEM_MIB);
    let mut send = Proc::spawn(
        "send",
        dir.path(),
        [
            "send",
            "--json",
            "--qmp",
            &path(&src.qmp_path),
            "--to",
            &format!("file:{}", state.display()),
            "--max-bandwidth",
            "16M",
        ],
    );
    wait_for_progress(&mut send, 4 << 20).await;
    send.signal(libc::SIGINT);
    let (status, _) = send.wait(RUN).await;
    assert_eq!(status.code(), Some(4), "send: {status}\n{}", send.stderr());
    assert_eq!(
        std::fs::read(&state).expect("read"),
        b"QEVM: the earlier state"
    );
    assert!(!dir.path().join("state.bin.partial").exists());
    let qmp = support::qmp(&src.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await, (RunState::Running, true));
}

/// Flags that cannot work with a save are refused before QEMU is touched (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn save_usage_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qmp = path(&dir.path().join("no-qemu.qmp"));
    let file = format!("file:{}", dir.path().join("s.bin").display());
    for (args, message) in [
        (
            vec!["--to", "exec:gzip -c > /tmp/x", "--multifd", "4"],
            "mapped-ram",
        ),
        (vec!["--to", &file, "--postcopy"], "precopy only"),
        (
            vec!["--to", &file, "--multifd", "2", "--compress", "zstd"],
            "exec:",
        ),
        (vec!["--to", &file, "--detach"], "PATH.partial"),
        (
            vec!["--to", "tcp:127.0.0.1:1", "--mode", "cpr-reboot"],
            "file:PATH",
        ),
    ] {
        let mut all = vec!["send", "--qmp", &qmp];
        all.extend(args);
        let out = run(&all, RUN).await;
        out.expect_code(2);
        assert!(out.error_line().contains(message), "{}", out.error_line());
    }
    let out = run(
        [
            "receive",
            "--qmp",
            &qmp,
            "--from",
            "exec:gzip -dc x",
            "--multifd",
            "2",
        ],
        RUN,
    )
    .await;
    out.expect_code(2);
}

/// QEMU 7.2 has neither `channels` nor the file transport: file: goes through `exec:cat`, exec:
/// through the legacy URI (run by /bin/sh -c).
#[tokio::test(flavor = "multi_thread")]
async fn qemu72_file_and_exec_fallback() {
    let Some(bin) = qemu72() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = format!("file:{}", dir.path().join("state.bin").display());
    save_and_restore(&bin, &file, &file, &[], &[], false).await;
    assert_no_state(&dir.path().join("state.bin.partial"));
    let gz = dir.path().join("state.gz");
    save_and_restore(
        &bin,
        &format!("exec:gzip -1 -c > {}", gz.display()),
        &format!("exec:gzip -dc {}", gz.display()),
        &[],
        &[],
        false,
    )
    .await;

    // What -v says it did.
    let src = source(&bin, MEM_MIB);
    let out = save(&src, &file, &["-v"]).await;
    out.expect_success();
    assert!(
        out.stderr
            .contains("has no file transport (8.2+): using the legacy URI exec:cat > '"),
        "{}",
        out.stderr
    );
    let out = save(&source(&bin, MEM_MIB), &file, &["--multifd", "2"]).await;
    out.expect_code(1);
    assert!(
        out.error_line().contains("mapped-ram"),
        "{}",
        out.error_line()
    );
}

/// cpr-reboot with the guest RAM on a shared memory backend: the state file holds only device
/// state, the RAM stays in its backing file, and the QEMU started anew on the same file
/// resumes the guest with it.
#[tokio::test(flavor = "multi_thread")]
async fn cpr_reboot_with_shared_memory() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let ram = dir.path().join("guest-ram");
    write_random(&ram, MEM_MIB);
    let shared = |extra: &[&str]| {
        let mut args = vec![
            "-object".to_owned(),
            format!(
                "memory-backend-file,id=m0,size={MEM_MIB}M,mem-path={},share=on",
                ram.display()
            ),
            "-machine".to_owned(),
            "memory-backend=m0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let mut src = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            random_ram: false,
            extra_args: shared(&[]),
            ..VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let before = ram_of(&src, MEM_MIB).await;
    let state = dir.path().join("cpr.state");
    let out = save(
        &src,
        &format!("file:{}", state.display()),
        &["--mode", "cpr-reboot", "--quit"],
    )
    .await;
    out.expect_success();
    wait_for_exit(&mut src, Duration::from_secs(10));
    let size = std::fs::metadata(&state).expect("state").len();
    assert!(
        size < 4 << 20,
        "the RAM went into the state file: {size} bytes"
    );

    let dst = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            random_ram: false,
            incoming_defer: true,
            extra_args: shared(&["-S"]),
            ..VmConfig::default()
        },
    )
    .expect("start the restoring QEMU");
    let out = restore(
        &dst,
        &format!("file:{}", state.display()),
        &["--mode", "cpr-reboot"],
    )
    .await;
    assert!(
        out.code() == Some(0),
        "{}\n{}\n{}",
        out.stdout,
        out.stderr,
        dst.log()
    );
    let ready = json_line(&out, "ready");
    assert_eq!(ready["file_size"], size);
    assert_eq!(ram_of(&dst, MEM_MIB).await, before);
}

/// Reads `send --json` output until the save has visibly moved data.
async fn wait_for_progress(send: &mut Proc, min_bytes: u64) {
    send.line_matching(Duration::from_secs(60), |line| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        v["type"] == "progress" && v["transferred"].as_u64().unwrap_or(0) >= min_bytes
    })
    .await;
}

/// Writes `mib` MiB of pseudo-random bytes (xorshift64*).
fn write_random(path: &Path, mib: u64) {
    use std::io::Write as _;
    let mut state = 0x2545_F491_4F6C_DD1D_u64 ^ u64::from(std::process::id());
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            chunk.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.write_all(&buf).expect("write");
    }
    out.flush().expect("flush");
}

/// The saved guest was paused for the save, so the restored one is paused too; `--start`
/// resumes it.
#[tokio::test(flavor = "multi_thread")]
async fn restore_with_start_runs_the_guest() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = format!("file:{}", dir.path().join("state.bin").display());
    let src = source(&bin, MEM_MIB);
    save(&src, &uri, &["--quit"]).await.expect_success();
    let dst = destination(&bin, MEM_MIB);
    let out = restore(&dst, &uri, &["--start"]).await;
    out.expect_success();
    let summary = json_line(&out, "summary");
    assert_eq!(summary["started"], true, "{summary}");
    let qmp = support::qmp(&dst.qmp_path).await;
    assert_eq!(support::vm_state(&qmp).await, (RunState::Running, true));
}
