//! Real Linux guests for migration tests: a Debian cloud kernel booting a busybox initramfs
//! whose init runs the workload (`crates/testkit/guest/workload.c`), which dirties memory,
//! writes checksummed records to a virtio-blk disk, verifies both, and prints heartbeats on the
//! serial console.
//!
//! - [`image`]: the kernel and initramfs, built from Debian packages at test time and cached in
//!   `target/guest/<key>/` ([`require`] skips or fails like [`crate::qemu::require`]).
//! - [`serial`]: the serial log parsed, and [`serial::judge`], which decides from the two logs
//!   whether the guest continued on the destination.
//! - [`GuestPair`]: a source guest booted to its first heartbeats and a destination waiting
//!   with `-incoming defer`, both on one qcow2 image (shared storage), and
//!   [`GuestPair::assert_continued`] after the migration.
//! - [`gate`]: running guests cost CPU (TCG), so guest tests take one of
//!   `$QMIGRATE_GUEST_SLOTS` (default 1) slots, a file lock under `target/guest/` that holds
//!   across threads and test binaries.
//!
//! Under TCG on the 2-core CI machine a guest boots to its first heartbeats in 4-7 s (more when
//! other jobs keep both cores busy). The workload's reachable dirty rate depends on the CPU it
//! gets: measured with a 32 MiB buffer, about 1000 MiB/s with its page checks on (`check_pages`)
//! and 2200 MiB/s without on a lightly loaded machine (load 4), 200 and 460 MiB/s with the
//! machine's load at 10. A rate the CPU cannot reach is dirtied as fast as it can, and the
//! heartbeats keep coming (the dirtying yields to them; `dirtied=` shows what was reached);
//! convergence tests that need 200 MiB/s should turn the checks off and look at `dirtied=`.

pub mod image;
pub mod serial;

mod flock;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qmigrate_qmp::{MigrationStatus, RunState};

use crate::check;
use crate::qemu::{Boot, QemuBinary, Vm, VmConfig};
pub use image::{require, GuestImage};
pub use serial::{Expect, Heartbeat, SerialLog, Verdict};

/// The workload's parameters (its `wl.*` kernel command line words).
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// The buffer it dirties and verifies, in MiB.
    pub buf_mib: u64,
    /// MiB of pages rewritten per second (0: none; above what the CPU does, as fast as it can).
    pub rate_mib_s: u64,
    /// Milliseconds between heartbeats (each one also writes and verifies a disk record).
    pub heartbeat_ms: u64,
    /// Milliseconds for one complete scrub of the buffer.
    pub sweep_ms: u64,
    /// Verify each page before rewriting it (halves the reachable rate).
    pub check_pages: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            buf_mib: 32,
            rate_mib_s: 8,
            heartbeat_ms: 100,
            sweep_ms: 1000,
            check_pages: true,
        }
    }
}

impl Workload {
    /// The kernel command line words.
    pub fn cmdline(&self) -> String {
        format!(
            "wl.buf={} wl.rate={} wl.hb={} wl.sweep={} wl.check={} wl.disk=/dev/vda",
            self.buf_mib,
            self.rate_mib_s,
            self.heartbeat_ms,
            self.sweep_ms,
            u8::from(self.check_pages)
        )
    }
}

/// How to start a guest pair.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// What the workload does.
    pub workload: Workload,
    /// The shared disk's size in MiB (the workload uses up to 16 MiB of it).
    pub disk_mib: u64,
    /// Start the destination with `-S`, so that it runs only after a `cont` (without it, QEMU
    /// starts the guest itself when the migration completes, or when postcopy begins).
    pub destination_paused: bool,
    /// The longest wait for the source to boot and print its first heartbeats.
    pub boot_limit: Duration,
    /// A second disk of this many MiB, a raw image (`-device virtio-blk-pci,id=vblk1`), that
    /// the workload does not touch; with [`GuestPair::start_local`] each side has its own.
    pub raw_disk_mib: Option<u64>,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            mem_mib: 128,
            workload: Workload::default(),
            disk_mib: 16,
            destination_paused: true,
            boot_limit: Duration::from_secs(120),
            raw_disk_mib: None,
        }
    }
}

/// A slot of the guest gate (see the module doc); released on drop.
#[derive(Debug)]
pub struct Gate {
    _file: File,
    /// Which slot.
    pub slot: usize,
    /// How long it took to get it.
    pub waited: Duration,
}

/// Takes a slot of the guest gate, waiting (at most 20 min) for one to be free.
pub async fn gate() -> Gate {
    let slots: usize = std::env::var("QMIGRATE_GUEST_SLOTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let root = image::cache_root();
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    let files: Vec<File> = (0..slots)
        .map(|i| {
            let path = root.join(format!("gate-{i}.lock"));
            File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect();
    let start = Instant::now();
    let limit = Duration::from_secs(20 * 60);
    loop {
        for (slot, file) in files.iter().enumerate() {
            match flock::try_lock_exclusive(file) {
                Ok(true) => {
                    let file = file.try_clone().expect("dup the gate's lock file");
                    return Gate {
                        _file: file,
                        slot,
                        waited: start.elapsed(),
                    };
                }
                Ok(false) => {}
                Err(e) => panic!("locking the guest gate: {e}"),
            }
        }
        assert!(
            start.elapsed() < limit,
            "no guest slot free after {limit:?} (QMIGRATE_GUEST_SLOTS={slots})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A guest's QEMU: a [`Vm`] booting the guest image, its serial console in a file.
#[derive(Debug)]
pub struct GuestVm {
    /// The QEMU (killed on drop).
    pub vm: Vm,
    /// "source" or "destination", for messages.
    pub name: &'static str,
}

impl GuestVm {
    /// Starts QEMU on `img` with `disk` as its virtio-blk disk (`-incoming defer` when
    /// `incoming`, and then `-S` with `cfg.destination_paused`). Returns once QMP listens; a
    /// source still boots (see [`GuestVm::wait_ready`]).
    pub fn start(
        bin: &QemuBinary,
        img: &GuestImage,
        cfg: &GuestConfig,
        disk: &Path,
        raw_disk: Option<&Path>,
        incoming: bool,
    ) -> std::io::Result<GuestVm> {
        let mut extra = vec![
            "-smp".to_owned(),
            "1".into(),
            "-blockdev".into(),
            format!("driver=file,filename={},node-name=file0", disk.display()),
            "-blockdev".into(),
            "driver=qcow2,file=file0,node-name=disk0".into(),
            "-device".into(),
            "virtio-blk-pci,drive=disk0,id=vblk0".into(),
        ];
        if let Some(raw) = raw_disk {
            extra.extend([
                "-blockdev".to_owned(),
                format!("driver=file,filename={},node-name=file1", raw.display()),
                "-blockdev".into(),
                "driver=raw,file=file1,node-name=disk1".into(),
                "-device".into(),
                "virtio-blk-pci,drive=disk1,id=vblk1".into(),
            ]);
        }
        if incoming && cfg.destination_paused {
            extra.push("-S".into());
        }
        let vm = Vm::start(
            bin,
            &VmConfig {
                mem_mib: cfg.mem_mib,
                random_ram: false,
                incoming_defer: incoming,
                extra_args: extra,
                boot: Boot::Linux {
                    kernel: img.kernel.clone(),
                    initrd: img.initrd.clone(),
                    append: format!("console=ttyS0 panic=-1 quiet {}", cfg.workload.cmdline()),
                },
                ..VmConfig::default()
            },
        )?;
        Ok(GuestVm {
            vm,
            name: if incoming { "destination" } else { "source" },
        })
    }

    /// The QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.vm.qmp_path
    }

    /// The serial console's file.
    pub fn serial_path(&self) -> PathBuf {
        self.vm.serial_path()
    }

    /// The serial console so far, parsed.
    pub fn serial(&self) -> SerialLog {
        SerialLog::read(&self.serial_path())
    }

    /// The serial log's tail and QEMU's own output, for failure messages.
    pub fn report(&self) -> String {
        format!(
            "--- {0} serial (last lines)\n{1}\n--- {0} QEMU log\n{2}",
            self.name,
            self.serial().tail(15),
            self.vm.log()
        )
    }

    /// Waits (at most `limit`) for `GUEST-READY` and `heartbeats` heartbeats; an error says
    /// why (QEMU exited, the guest reported a failure, or the time ran out) with the logs.
    pub async fn wait_ready(&mut self, limit: Duration, heartbeats: usize) -> Result<(), String> {
        let until = Instant::now() + limit;
        loop {
            let log = self.serial();
            if let Some(line) = log.failures.first() {
                return Err(format!("the guest reported: {line}\n{}", self.report()));
            }
            if log.ready > 0 && log.heartbeats.len() >= heartbeats {
                return Ok(());
            }
            if !self.vm.is_alive() {
                return Err(format!("QEMU exited while booting\n{}", self.report()));
            }
            if Instant::now() > until {
                return Err(format!(
                    "no GUEST-READY and {heartbeats} heartbeats within {limit:?}\n{}",
                    self.report()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A qcow2 image of `mib` MiB made with `qemu-img create` (panics with its output).
pub fn create_disk(path: &Path, mib: u64) {
    create_disk_bytes(path, mib << 20);
}

/// A qcow2 image of exactly `bytes` bytes (a multiple of 512) made with `qemu-img create`.
pub fn create_disk_bytes(path: &Path, bytes: u64) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(bytes.to_string())
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-img: {e}"));
    assert!(
        out.status.success(),
        "qemu-img create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `mib` MiB of a non-zero pattern into the qcow2 image at `at_mib` (`qemu-io`).
pub fn fill_disk(path: &Path, at_mib: u64, mib: u64) {
    fill_image(path, "qcow2", at_mib, mib);
}

/// A sparse raw image of `mib` MiB.
pub fn create_raw(path: &Path, mib: u64) {
    let file = File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.set_len(mib << 20)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// [`fill_disk`] for an image of `format`.
pub fn fill_image(path: &Path, format: &str, at_mib: u64, mib: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c"])
        .arg(format!("write -P 0xa5 {at_mib}M {mib}M"))
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io: {e}"));
    assert!(
        out.status.success(),
        "qemu-io write failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running source guest and a destination waiting for it (`-incoming defer`), on one disk
/// image (shared storage: the destination opens it inactive and takes its lock only when the
/// migration hands the guest over). Holds a slot of the [`gate`]; both QEMUs die on drop.
#[derive(Debug)]
pub struct GuestPair {
    /// The source, running the workload.
    pub src: GuestVm,
    /// The destination, `-incoming defer` (and `-S` as configured).
    pub dst: GuestVm,
    /// The source's qcow2 image (shared with the destination, unless started with
    /// [`GuestPair::start_local`]).
    pub disk: PathBuf,
    /// The destination's image: [`GuestPair::disk`] itself for shared storage.
    pub dst_disk: PathBuf,
    /// The second (raw) disk of each side, with [`GuestConfig::raw_disk_mib`]: source's and
    /// destination's (the same file for shared storage).
    pub raw_disks: Option<(PathBuf, PathBuf)>,
    /// How long the source took from start to its first heartbeats.
    pub boot_time: Duration,
    dir: tempfile::TempDir,
    _gate: Gate,
}

impl GuestPair {
    /// Takes a gate slot, makes the disk, boots the source to its third heartbeat and starts
    /// the destination; panics with the logs when any of it fails.
    pub async fn start(bin: &QemuBinary, img: &GuestImage, cfg: &GuestConfig) -> GuestPair {
        Self::start_with(bin, img, cfg, None).await
    }

    /// [`GuestPair::start`] with local storage: the destination gets its own empty qcow2 image
    /// of `dst_bytes` (the source's size, for a copy that fits), for `migrate --copy-storage`;
    /// the source's image has `fill_mib` MiB of data written from 32 MiB on before the guest
    /// boots (the workload's records stay below 16 MiB), so that the copy has something to do.
    pub async fn start_local(
        bin: &QemuBinary,
        img: &GuestImage,
        cfg: &GuestConfig,
        dst_bytes: u64,
        fill_mib: u64,
    ) -> GuestPair {
        Self::start_with(bin, img, cfg, Some((dst_bytes, fill_mib))).await
    }

    async fn start_with(
        bin: &QemuBinary,
        img: &GuestImage,
        cfg: &GuestConfig,
        local: Option<(u64, u64)>,
    ) -> GuestPair {
        let gate = gate().await;
        let dir = tempfile::Builder::new()
            .prefix("qmigrate-guest-")
            .tempdir()
            .expect("tempdir");
        let disk = dir.path().join("disk.qcow2");
        create_disk(&disk, cfg.disk_mib);
        if let Some((_, fill)) = local.filter(|(_, fill)| *fill > 0) {
            fill_disk(&disk, 32, fill);
        }
        let started = Instant::now();
        let raw_disks = cfg.raw_disk_mib.map(|mib| {
            let src = dir.path().join("raw.img");
            create_raw(&src, mib);
            if let Some((_, fill)) = local.filter(|(_, fill)| *fill > 0) {
                fill_image(&src, "raw", 0, fill.min(mib));
            }
            let dst = match local {
                Some(_) => {
                    let dst = dir.path().join("dst-raw.img");
                    create_raw(&dst, mib);
                    dst
                }
                None => src.clone(),
            };
            (src, dst)
        });
        let mut src = GuestVm::start(
            bin,
            img,
            cfg,
            &disk,
            raw_disks.as_ref().map(|(s, _)| s.as_path()),
            false,
        )
        .expect("start the source guest");
        if let Err(why) = src.wait_ready(cfg.boot_limit, 3).await {
            panic!("the source guest did not come up: {why}");
        }
        let boot_time = started.elapsed();
        let dst_disk = match local {
            Some((bytes, _)) => {
                let path = dir.path().join("dst.qcow2");
                create_disk_bytes(&path, bytes);
                path
            }
            None => disk.clone(),
        };
        let dst = GuestVm::start(
            bin,
            img,
            cfg,
            &dst_disk,
            raw_disks.as_ref().map(|(_, d)| d.as_path()),
            true,
        )
        .expect("start the destination guest's QEMU");
        GuestPair {
            src,
            dst,
            disk,
            dst_disk,
            raw_disks,
            boot_time,
            dir,
            _gate: gate,
        }
    }

    /// The pair's temp dir (for sockets, logs, certificates).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Both serial tails and QEMU logs.
    pub fn report(&self) -> String {
        format!("{}\n{}", self.src.report(), self.dst.report())
    }

    /// After a migration (no qmigrate holding either QMP socket): the source is paused in
    /// `postmigrate`, the destination's migration completed and its guest runs, and within
    /// `limit` the destination's serial log shows the guest continued (see
    /// [`serial::judge`] with `expect`). Panics with both logs otherwise.
    pub async fn assert_continued(&self, expect: Expect, limit: Duration) -> Verdict {
        let fail = |why: String| -> ! { panic!("{why}\n{}", self.report()) };
        let src = check::try_qmp(self.src.qmp_path())
            .await
            .unwrap_or_else(|e| fail(format!("source: {e}")));
        let (state, _) = check::vm_state(&src).await;
        if state != RunState::Postmigrate {
            fail(format!("the source is {state:?}, not postmigrate"));
        }
        drop(src);
        let dst = check::try_qmp(self.dst.qmp_path())
            .await
            .unwrap_or_else(|e| fail(format!("destination: {e}")));
        let status = check::wait_for_migration(&dst, Duration::from_secs(60)).await;
        if status != MigrationStatus::Completed {
            fail(format!("the destination's migration is {status:?}"));
        }
        let (state, running) = check::vm_state(&dst).await;
        if !running {
            fail(format!(
                "the destination guest does not run: {state:?} (was it started with cont?)"
            ));
        }
        drop(dst);
        let until = Instant::now() + limit;
        loop {
            let verdict = serial::judge(&self.src.serial(), &self.dst.serial(), expect);
            match verdict {
                Verdict::Continued { .. } => return verdict,
                Verdict::Broken(why) => fail(format!("the guest did not continue: {why}")),
                Verdict::Pending(why) if Instant::now() > until => {
                    fail(format!("after {limit:?}: {why}"))
                }
                Verdict::Pending(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the workload for this host (as the image does, warnings as errors) and runs it
    /// for a second against a file as its disk; `None` when gcc or static glibc is not there.
    fn run_on_host(args: &[&str]) -> Option<SerialLog> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (src, bin, disk) = (
            dir.path().join("workload.c"),
            dir.path().join("workload"),
            dir.path().join("disk"),
        );
        std::fs::write(&src, image::WORKLOAD_C).expect("write workload.c");
        let built = Command::new("gcc")
            .args(["-O2", "-static", "-Wall", "-Werror", "-o"])
            .arg(&bin)
            .arg(&src)
            .output();
        let built = match built {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("skipping: no gcc");
                return None;
            }
            Err(e) => panic!("cannot run gcc: {e}"),
        };
        let errors = String::from_utf8_lossy(&built.stderr);
        if errors.contains("cannot find -lc") {
            eprintln!("skipping: no static glibc (libc6-dev)");
            return None;
        }
        assert!(built.status.success(), "gcc: {errors}");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk file");
        let out = Command::new(&bin)
            .arg(format!("wl.disk={}", disk.display()))
            .args(["wl.buf=4", "wl.rate=64", "wl.sweep=200", "wl.run=1"])
            .args(args)
            .output()
            .expect("run the workload");
        Some(SerialLog::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    #[test]
    fn the_workload_runs_clean_and_catches_damage() {
        let Some(clean) = run_on_host(&[]) else {
            return;
        };
        assert!(clean.failures.is_empty(), "{:?}", clean.failures);
        let last = clean.last().expect("heartbeats");
        assert!(
            last.n >= 8 && last.sweeps >= 3 && last.records >= 8,
            "{last:?}"
        );
        assert!(last.dirtied_mib >= 32, "64 MiB/s for 1 s: {last:?}");

        let Some(damaged) = run_on_host(&["wl.inject=300"]) else {
            return;
        };
        let fails = damaged.failures.join("\n");
        assert!(
            fails.contains("FAIL buffer") && fails.contains("FAIL disk: record"),
            "{fails}"
        );
    }
}
