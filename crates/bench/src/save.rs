//! `qmigrate-bench save`: saving a VM to a file and restoring it, next to the disk's own speed.
//!
//! Every repetition first measures the disk under the state directory with `dd` (the same
//! number of bytes, `oflag=direct conv=fsync` to write, `iflag=direct` to read), then saves and
//! restores a fresh VM once per variant: plain `file:` (one stream) and mapped-ram
//! (`--multifd N`, for each N asked for). Save and restore run through the real `qmigrate send --to file:` and
//! `qmigrate receive --from file: --wait`, timed from start to exit: a save counts until
//! `send` has flushed the state file to disk and renamed it into place, as an operator waits
//! for it; QEMU's own share of it (`total_time_ms` of the summary) is shown next to it. As root
//! the page cache is dropped before each restore (and before the `dd` read), so restores read
//! from the disk; otherwise they are warm, and the table says so. The source VM's RAM is a file
//! of random bytes kept in tmpfs, out of reach of the cache drop; after each restore both VMs'
//! RAM is compared byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use qmigrate_testkit::child::Proc;
use qmigrate_testkit::qemu::{QemuBinary, Vm};
use qmigrate_testkit::ram::same_ram;

use crate::common::{self, Common};
use crate::migrate::{find_qemu, qemu_version, start_vm, write_random, Guest};
use crate::table::{self, median, num, Table};

/// Arguments of `qmigrate-bench save`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM (K, M, G: binary units), all of it random bytes.
    #[arg(long, default_value = "1GiB", value_parser = table::parse_size)]
    mem: u64,

    /// Where the state files (and dd's test file) go: the disk being measured. Default: a new
    /// temporary directory in /var/tmp.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,

    /// Multifd channels of the mapped-ram variant; several (2,4,8) give one variant each.
    #[arg(long, value_delimiter = ',', default_value = "4", value_name = "N,...")]
    multifd: Vec<u32>,

    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    #[command(flatten)]
    common: Common,
}

/// One repetition of one variant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// `qmigrate send` from start to exit: the state file complete, on disk, renamed.
    save: Duration,
    /// QEMU's `total_time_ms`: until its last byte was written (into the page cache, unless
    /// QEMU wrote with O_DIRECT).
    save_qemu: Duration,
    /// `qmigrate receive --wait` from start to exit.
    restore: Duration,
    verified: bool,
}

/// One repetition of the disk measurement.
#[derive(Debug, Clone, Copy)]
struct Disk {
    write: Duration,
    read: Duration,
}

/// Paths and settings shared by every run.
struct Env<'a> {
    /// Scratch space for sockets and logs (tmpfs when there is one).
    scratch: &'a Path,
    /// The directory on the disk under test.
    disk_dir: &'a Path,
    qmigrate: &'a Path,
    qemu: &'a QemuBinary,
    ram: &'a Path,
    mib: u64,
    cold: bool,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let qmigrate = args.common.qmigrate_bin(true)?;
    if args.multifd.iter().any(|n| !(1..=255).contains(n)) {
        bail!("--multifd must be between 1 and 255");
    }
    let mib = args.mem.div_ceil(1 << 20);
    // The random RAM file, sockets and logs stay off the disk under test, and in tmpfs the
    // RAM file survives dropping the page cache (else the save would read it from disk).
    let shm = Path::new("/dev/shm");
    let scratch = tempfile::Builder::new()
        .prefix("qmigrate-bench-save-")
        .tempdir_in(if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        })?;
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let disk_dir = tempfile::Builder::new()
        .prefix("qmigrate-bench-save-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))?;
    let ram = scratch.path().join("ram.bin");
    write_random(&ram, mib)?;
    let qemu = find_qemu(&args.qemu)?;

    let cold = drop_caches();
    let env = Env {
        scratch: scratch.path(),
        disk_dir: disk_dir.path(),
        qmigrate: &qmigrate,
        qemu: &qemu,
        ram: &ram,
        mib,
        cold,
    };
    let variants: Vec<Option<u32>> = std::iter::once(None)
        .chain(args.multifd.iter().copied().map(Some))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "save/restore benchmark: {mib} MiB of random guest RAM, state files in {}, {} \
         repetitions, disk and variants interleaved, {} restores",
        disk_dir.path().display(),
        args.common.reps,
        if cold {
            "cold (page cache dropped)"
        } else {
            "warm (not root: cannot drop the page cache)"
        }
    );
    // One untimed save and restore first: the first QEMU start pays for loading the binary.
    if let Err(err) = run_once(None, &env, &rt, "warm-up") {
        eprintln!("  warm-up failed: {err:#}");
    }

    let mut disk: Vec<Disk> = Vec::new();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); variants.len()];
    let mut all_ok = true;
    for rep in 0..args.common.reps {
        match measure_disk(&env) {
            Ok(d) => {
                eprintln!(
                    "  rep {}/{}  {:<24} write {:>6.2} s {:>5.2} GB/s   read {:>6.2} s {:>5.2} GB/s",
                    rep + 1,
                    args.common.reps,
                    "disk (dd, O_DIRECT)",
                    d.write.as_secs_f64(),
                    gbps(mib, d.write),
                    d.read.as_secs_f64(),
                    gbps(mib, d.read),
                );
                disk.push(d);
            }
            Err(err) => {
                eprintln!("  rep {}/{}  dd failed: {err:#}", rep + 1, args.common.reps);
                all_ok = false;
            }
        }
        for (i, &multifd) in variants.iter().enumerate() {
            match run_once(multifd, &env, &rt, &format!("{rep}-{i}")) {
                Ok(s) => {
                    eprintln!(
                        "  rep {}/{}  {:<24} save {:>6.2} s {:>5.2} GB/s (QEMU {:.2} s)   restore {:>6.2} s {:>5.2} GB/s   {}",
                        rep + 1,
                        args.common.reps,
                        label(multifd),
                        s.save.as_secs_f64(),
                        gbps(mib, s.save),
                        s.save_qemu.as_secs_f64(),
                        s.restore.as_secs_f64(),
                        gbps(mib, s.restore),
                        if s.verified { "verified" } else { "NOT VERIFIED" }
                    );
                    all_ok &= s.verified;
                    samples[i].push(s);
                }
                Err(err) => {
                    common::rep_failed(rep, args.common.reps, &label(multifd), &err);
                    all_ok = false;
                }
            }
        }
    }
    report(&args, &env, &variants, &disk, &samples);
    Ok(all_ok)
}

fn label(multifd: Option<u32>) -> String {
    match multifd {
        None => "plain file:".to_owned(),
        Some(n) => format!("mapped-ram, multifd {n}"),
    }
}

fn gbps(mib: u64, t: Duration) -> f64 {
    (mib << 20) as f64 / t.as_secs_f64() / 1e9
}

/// Flushes dirty pages and drops the page cache; false when we may not (not root).
fn drop_caches() -> bool {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

/// Runs `program args`, returning how long it took; fails with its stderr when it fails.
fn timed(program: &str, args: &[String]) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// The disk's sequential speed: the RAM file's bytes written to the state directory with
/// O_DIRECT (and flushed, as `send` flushes a state file), then read back with O_DIRECT.
fn measure_disk(env: &Env<'_>) -> anyhow::Result<Disk> {
    let file = env.disk_dir.join("dd.bin");
    drop_caches();
    let write = timed(
        "dd",
        &[
            format!("if={}", env.ram.display()),
            format!("of={}", file.display()),
            "bs=4M".into(),
            "oflag=direct".into(),
            "conv=fsync".into(),
        ],
    );
    drop_caches();
    let read = write.and_then(|write| {
        let read = timed(
            "dd",
            &[
                format!("if={}", file.display()),
                "of=/dev/null".into(),
                "bs=4M".into(),
                "iflag=direct".into(),
            ],
        )?;
        Ok(Disk { write, read })
    });
    let _ = std::fs::remove_file(&file);
    read
}

impl Env<'_> {
    /// Starts a VM in `dir` (see [`start_vm`]).
    fn vm(&self, dir: &Path, name: &str, source: bool) -> anyhow::Result<(Vm, PathBuf)> {
        let guest = Guest {
            qemu: self.qemu,
            ram: self.ram,
            mib: self.mib,
        };
        start_vm(&guest, dir, name, source)
    }
}

/// Saves a fresh VM with `multifd` channels (mapped-ram) or plain, restores it into another,
/// and compares their RAM.
fn run_once(
    multifd: Option<u32>,
    env: &Env<'_>,
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> anyhow::Result<Sample> {
    let dir = env.scratch.join(name);
    std::fs::create_dir(&dir)?;
    let state = env.disk_dir.join(format!("{name}.state"));
    let result = save_and_restore(multifd, env, rt, &dir, &state);
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn save_and_restore(
    multifd: Option<u32>,
    env: &Env<'_>,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    state: &Path,
) -> anyhow::Result<Sample> {
    let (_src_vm, src_qmp) = env.vm(dir, "source", true)?;
    let (dst_vm, dst_qmp) = env.vm(dir, "destination", false)?;
    let uri = format!("file:{}", state.display());
    let multifd: Vec<String> = multifd
        .map(|n| vec!["--multifd".into(), n.to_string()])
        .unwrap_or_default();

    // Start from a clean page cache, so that writeback of earlier runs does not count here.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let mut a: Vec<String> = ["send", "--json", "--timeout", "10m", "--qmp"]
        .map(String::from)
        .to_vec();
    a.extend([src_qmp.display().to_string(), "--to".into(), uri.clone()]);
    a.extend(multifd.clone());
    let started = Instant::now();
    let mut send = Proc::spawn("send", dir, env.qmigrate, &a)?;
    let mut summary = None;
    while let Ok(line) = send.ready_line() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["type"] == "summary" {
                summary = Some(v);
            }
        }
    }
    let sent = send.wait(Duration::from_secs(600))?;
    let save = started.elapsed();
    let summary = summary
        .with_context(|| format!("qmigrate send printed no summary:\n{}", send.log_text()))?;
    if !sent.success || summary["outcome"] != "completed" {
        bail!(
            "the save did not complete: {}\n{}",
            summary["error"],
            send.log_text()
        );
    }
    let save_qemu = summary["total_time_ms"]
        .as_u64()
        .map(Duration::from_millis)
        .context("the summary has no total time")?;

    if env.cold {
        drop_caches();
    }
    let mut a: Vec<String> = ["receive", "--wait", "--json", "--qmp"]
        .map(String::from)
        .to_vec();
    a.extend([dst_qmp.display().to_string(), "--from".into(), uri]);
    a.extend(multifd);
    let started = Instant::now();
    let mut receive = Proc::spawn("receive", dir, env.qmigrate, &a)?;
    let received = receive.wait(Duration::from_secs(600))?;
    let restore = started.elapsed();
    if !received.success {
        bail!(
            "the restore failed:\n{}\n--- destination QEMU's log:\n{}",
            receive.log_text(),
            dst_vm.log()
        );
    }

    let verified = rt.block_on(same_ram(&src_qmp, &dst_qmp, env.mib))?;
    Ok(Sample {
        save,
        save_qemu,
        restore,
        verified,
    })
}

/// Medians of one variant, and its ratios to the disk and to plain `file:`.
#[derive(Debug, Clone, Copy)]
struct Row {
    save: f64,
    save_qemu: f64,
    save_gbps: f64,
    restore: f64,
    restore_gbps: f64,
    verified: usize,
}

fn report(
    args: &Args,
    env: &Env<'_>,
    variants: &[Option<u32>],
    disk: &[Disk],
    samples: &[Vec<Sample>],
) {
    let mib = env.mib;
    let secs = |v: Vec<Duration>| median(&v.iter().map(Duration::as_secs_f64).collect::<Vec<_>>());
    let rate = |v: Vec<Duration>| median(&v.iter().map(|&t| gbps(mib, t)).collect::<Vec<_>>());
    let disk_write = rate(disk.iter().map(|d| d.write).collect());
    let disk_read = rate(disk.iter().map(|d| d.read).collect());
    let rows: Vec<Row> = samples
        .iter()
        .map(|s| Row {
            save: secs(s.iter().map(|s| s.save).collect()),
            save_qemu: secs(s.iter().map(|s| s.save_qemu).collect()),
            save_gbps: rate(s.iter().map(|s| s.save).collect()),
            restore: secs(s.iter().map(|s| s.restore).collect()),
            restore_gbps: rate(s.iter().map(|s| s.restore).collect()),
            verified: s.iter().filter(|s| s.verified).count(),
        })
        .collect();
    let plain = rows[0];
    let restores = if env.cold { "cold" } else { "warm" };

    if args.common.json {
        let out = serde_json::json!({
            "benchmark": "save",
            "guest_ram_mib": mib,
            "reps": args.common.reps,
            "dir": env.disk_dir.parent().unwrap_or(env.disk_dir).display().to_string(),
            "restores": restores,
            "disk": {
                "write_s": secs(disk.iter().map(|d| d.write).collect()),
                "write_gb_per_s": disk_write,
                "read_s": secs(disk.iter().map(|d| d.read).collect()),
                "read_gb_per_s": disk_read,
            },
            "variants": variants.iter().zip(&rows).map(|(&v, r)| serde_json::json!({
                "variant": label(v),
                "multifd": v,
                "save_s": r.save,
                "save_qemu_s": r.save_qemu,
                "save_gb_per_s": r.save_gbps,
                "save_x_disk": r.save_gbps / disk_write,
                "save_x_plain": r.save_gbps / plain.save_gbps,
                "restore_s": r.restore,
                "restore_gb_per_s": r.restore_gbps,
                "restore_x_disk": r.restore_gbps / disk_read,
                "restore_x_plain": r.restore_gbps / plain.restore_gbps,
                "verified_runs": r.verified,
            })).collect::<Vec<_>>(),
        });
        println!("{out}");
        return;
    }

    let mut t = Table::new(&[
        "variant",
        "save s",
        "in QEMU s",
        "GB/s",
        "x disk",
        "x plain",
        "restore s",
        "GB/s",
        "x disk",
        "x plain",
        "RAM identical",
    ]);
    t.row(vec![
        "disk (dd, O_DIRECT)".into(),
        num(secs(disk.iter().map(|d| d.write).collect()), 2),
        "-".into(),
        num(disk_write, 2),
        num(1.0, 2),
        "-".into(),
        num(secs(disk.iter().map(|d| d.read).collect()), 2),
        num(disk_read, 2),
        num(1.0, 2),
        "-".into(),
        "-".into(),
    ]);
    for (&v, r) in variants.iter().zip(&rows) {
        t.row(vec![
            label(v),
            num(r.save, 2),
            num(r.save_qemu, 2),
            num(r.save_gbps, 2),
            num(r.save_gbps / disk_write, 2),
            num(r.save_gbps / plain.save_gbps, 2),
            num(r.restore, 2),
            num(r.restore_gbps, 2),
            num(r.restore_gbps / disk_read, 2),
            num(r.restore_gbps / plain.restore_gbps, 2),
            if r.verified == args.common.reps as usize {
                format!("yes ({}/{})", r.verified, args.common.reps)
            } else {
                format!("NO ({} of {})", r.verified, args.common.reps)
            },
        ]);
    }
    println!(
        "\n{mib} MiB of random guest RAM, QEMU {}, state files in {}, median of {} runs, \
         {restores} restores{}. save s: `qmigrate send` start to exit (state file flushed to \
         disk and renamed), in QEMU s: QEMU's total time; restore s: `qmigrate receive --wait` \
         start to exit; GB/s = guest RAM / time (GB = 10^9 bytes); x disk: against dd of the \
         same size with oflag=direct conv=fsync (save) and iflag=direct (restore)\n",
        qemu_version(&env.qemu.path),
        env.disk_dir.parent().unwrap_or(env.disk_dir).display(),
        args.common.reps,
        if env.cold {
            " (page cache dropped before each)"
        } else {
            " (not root: the page cache could not be dropped)"
        },
    );
    print!("{}", t.render());
}
