//! `qmigrate-bench storage`: copying a VM's local disk (`migrate --copy-storage`) next to QEMU
//! alone mirroring into an NBD export.
//!
//! Two disks, each a qcow2 image made once per run of the benchmark: a dense one (`--disk-gib`
//! GiB of random bytes) and a sparse one (`--sparse-gib` GiB virtual, `--sparse-data-mib` MiB of
//! random bytes in 16 MiB pieces spread over it). Every repetition starts, for each disk and
//! each variant, a fresh pair of halting-firmware VMs (the guest never runs, so nothing is
//! dirtied): the source on the image, the destination on an empty qcow2 of the same virtual
//! size, `-incoming defer`. The variants:
//!
//! - QEMU alone, the sequence qmigrate drives, by hand: the destination's `nbd-server-start` (on a Unix socket, or `tcp:` loopback) and a writable
//!   `block-export-add`; the source's NBD client node (`discard: unmap`, `reconnect-delay` as
//!   qmigrate sets them) and `blockdev-mirror sync=full`, cancelled without force at READY
//!   (which completes it). On request (`--only qemu-fd`) also over `tcp:` with the source's
//!   NBD client handed a connected socket (`getfd`, an `fd:` address), as the direct path
//!   hands QEMU the RAM's connection.
//! - `qmigrate migrate --copy-storage --no-start` to a `tunnel-server --once --qmp`: plain TCP
//!   with the direct data path (the RAM goes QEMU to QEMU; the NBD connection is relayed), with
//!   `--relay`, and over WebSocket (which always relays).
//!
//! What is timed is the same for all: the mirror job's own copy, from its first
//! `JOB_STATUS_CHANGE` to `ready`, by the timestamps QEMU puts on those events (read on a
//! second QMP monitor of the source, so qmigrate keeps its own). The bytes are the `offset` of
//! `BLOCK_JOB_READY` (what the job copied). Relay CPU is the user + system time the
//! tunnel-server and `migrate` spent between those two events (`/proc/PID/stat`, sampled as
//! the events arrive), per GB copied. `migrate` from start to exit is shown too: it adds the
//! handshake, the disk checks, the NBD setup and a RAM migration of the tiny guest (`--mem`,
//! zeroed RAM).
//!
//! After every run both QEMUs are told to `quit` (closing their images cleanly) and
//! `qemu-img compare` checks the destination image against the source; the allocated size of
//! both is read with `qemu-img info` (sparse must stay sparse).

use std::io::{Seek as _, SeekFrom, Write as _};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use qmigrate_qmp::{ConnectOptions, Event, Events, Getfd, Qmp};
use qmigrate_testkit::child::{self as procs, Proc};
use qmigrate_testkit::qemu::{self, QemuBinary, Vm, VmConfig};
use serde_json::{json, Value};

use crate::common::{self, Common};
use crate::migrate::{find_qemu, qemu_version};
use crate::table::{self, median, num, Table};

/// Arguments of `qmigrate-bench storage`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// GiB of random data on the dense disk (its virtual size too).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    disk_gib: u64,

    /// Virtual size of the sparse disk, in GiB.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    sparse_gib: u64,

    /// MiB of random data on the sparse disk, in 16 MiB pieces spread evenly over it.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(16..))]
    sparse_data_mib: u64,

    /// Which disks, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "dense,sparse")]
    disks: Vec<Kind>,

    /// Variants to run, comma-separated, in this order (interleaved over the repetitions).
    #[arg(
        long,
        visible_alias = "variants",
        value_delimiter = ',',
        default_value = "qemu-unix,qemu-tcp,direct,relay-tcp,relay-ws"
    )]
    only: Vec<Variant>,

    /// Guest RAM of both VMs (zeroed: the RAM phase of `migrate` stays short).
    #[arg(long, default_value = "64MiB", value_parser = table::parse_size)]
    mem: u64,

    /// Where the images go. Default: a new directory in /dev/shm (tmpfs, so that the host's
    /// disk does not set the pace), else in the temporary directory.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,

    /// The QEMU binary (qemu-img is looked up next to it, else on PATH).
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    #[command(flatten)]
    common: Common,
}

/// Which disk a run copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Every byte random, fully allocated.
    Dense,
    /// Mostly unallocated.
    Sparse,
}

/// How the disk gets from the source QEMU to the destination QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// QEMU alone: mirror into the destination's NBD export over a Unix socket.
    QemuUnix,
    /// QEMU alone: the same over loopback TCP (`tcp:`).
    QemuTcp,
    /// QEMU alone over loopback TCP, the source's NBD client handed a connected socket
    /// (`getfd`, an `fd:` server address) as qmigrate's direct path hands QEMU the RAM's
    /// connection. Not in the default set: what handing the NBD connection over would give at
    /// best (the destination's NBD server cannot be handed a connection, so qmigrate would still
    /// relay that side), and QEMU does not reconnect such a client (BENCHMARKS.md).
    QemuFd,
    /// `migrate --copy-storage` over plain TCP with the direct data path.
    Direct,
    /// `migrate --copy-storage --relay` over plain TCP.
    RelayTcp,
    /// `migrate --copy-storage` over WebSocket (`tunnel-server --ws`).
    RelayWs,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::QemuUnix => "QEMU alone, unix:",
            Variant::QemuTcp => "QEMU alone, tcp:",
            Variant::QemuFd => "QEMU alone, fd: (tcp)",
            Variant::Direct => "qmigrate tcp, direct path",
            Variant::RelayTcp => "qmigrate tcp, --relay",
            Variant::RelayWs => "qmigrate ws",
        }
    }

    fn is_qmigrate(self) -> bool {
        !matches!(self, Variant::QemuUnix | Variant::QemuTcp | Variant::QemuFd)
    }
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Dense => "dense",
            Kind::Sparse => "sparse",
        }
    }
}

/// A source image, made once.
struct Image {
    kind: Kind,
    path: PathBuf,
    /// Virtual size in bytes.
    size: u64,
    /// Host bytes allocated (`actual-size`).
    allocated: u64,
}

/// One repetition of one variant on one disk.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// The mirror's copy: first job event to `ready`, by QEMU's timestamps.
    copy: Duration,
    /// Bytes the job copied (`offset` at READY).
    bytes: u64,
    /// User + system CPU of the tunnel-server and `migrate` during the copy.
    relay_cpu: Duration,
    /// `migrate` from start to exit (qmigrate variants).
    wall: Option<Duration>,
    /// Allocated bytes of the destination image afterwards.
    allocated: u64,
    verified: bool,
}

/// Paths and settings shared by every run.
struct Env<'a> {
    dir: &'a Path,
    qmigrate: &'a Path,
    qemu: &'a QemuBinary,
    qemu_img: &'a Path,
    mib: u64,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let needs_qmigrate = args.only.iter().any(|v| v.is_qmigrate());
    let qmigrate = args.common.qmigrate_bin(needs_qmigrate)?;
    let qemu = find_qemu(&args.qemu)?;
    let qemu_img = qemu_img_next_to(&qemu.path);
    let shm = Path::new("/dev/shm");
    let base = args.dir.clone().unwrap_or_else(|| {
        if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    });
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-bench-storage-")
        .tempdir_in(&base)
        .with_context(|| format!("cannot create a directory in {}", base.display()))?;
    let env = Env {
        dir: dir.path(),
        qmigrate: &qmigrate,
        qemu: &qemu,
        qemu_img: &qemu_img,
        mib: args.mem.div_ceil(1 << 20),
    };
    let mut images = Vec::new();
    for &kind in &args.disks {
        eprintln!("making the {} image ...", kind.label());
        images.push(make_image(&args, &env, kind)?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "storage benchmark: {} in {}, {} repetitions, variants interleaved",
        images
            .iter()
            .map(|i| format!(
                "{} disk {} GiB virtual, {} MiB allocated",
                i.kind.label(),
                i.size >> 30,
                i.allocated >> 20
            ))
            .collect::<Vec<_>>()
            .join("; "),
        dir.path().display(),
        args.common.reps
    );
    // One untimed run first: the first QEMU start pays for loading the binary.
    if let (Some(&first), Some(image)) = (args.only.first(), images.first()) {
        if let Err(err) = run_once(first, image, &env, &rt, "warm-up") {
            eprintln!("  warm-up ({}) failed: {err:#}", first.label());
        }
    }
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); args.only.len()]; images.len()];
    let mut all_ok = true;
    for rep in 0..args.common.reps {
        for (k, image) in images.iter().enumerate() {
            for (i, &variant) in args.only.iter().enumerate() {
                let name = format!("{rep}-{k}-{i}");
                let label = format!("{}, {}", variant.label(), image.kind.label());
                match run_once(variant, image, &env, &rt, &name) {
                    Ok(s) => {
                        eprintln!(
                            "  rep {}/{}  {label:<36} copy {:>6.2} s {:>5.2} GB/s  relay {:>5} core-s/GB  migrate {:>6} s  alloc {:>5} MiB  {}",
                            rep + 1,
                            args.common.reps,
                            s.copy.as_secs_f64(),
                            gbps(s.bytes, s.copy),
                            if variant.is_qmigrate() { num(core_per_gb(s.bytes, s.relay_cpu), 2) } else { "-".into() },
                            s.wall.map_or("-".into(), |w| num(w.as_secs_f64(), 2)),
                            s.allocated >> 20,
                            if s.verified { "verified" } else { "NOT VERIFIED" }
                        );
                        all_ok &= s.verified;
                        samples[k][i].push(s);
                    }
                    Err(err) => {
                        common::rep_failed(rep, args.common.reps, &label, &err);
                        all_ok = false;
                    }
                }
            }
        }
    }
    report(&args, &env, &images, &samples);
    Ok(all_ok)
}

/// `qemu-img` in the directory of `qemu` when it is there, else the one on PATH.
fn qemu_img_next_to(qemu: &Path) -> PathBuf {
    let sibling = qemu.with_file_name("qemu-img");
    if qemu.parent().is_some_and(|p| !p.as_os_str().is_empty()) && sibling.exists() {
        sibling
    } else {
        PathBuf::from("qemu-img")
    }
}

/// Runs `qemu-img args`; its stdout, or an error with its stderr.
fn qemu_img(env: &Env<'_>, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(env.qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", env.qemu_img.display()))?;
    if !out.status.success() {
        bail!(
            "qemu-img {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Virtual size and allocated bytes of an image (`qemu-img info`).
fn image_sizes(env: &Env<'_>, path: &Path) -> anyhow::Result<(u64, u64)> {
    let info: Value = serde_json::from_str(&qemu_img(
        env,
        &["info", "-U", "--output=json", &path.display().to_string()],
    )?)?;
    let size = info["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual-size")?;
    let allocated = info["actual-size"]
        .as_u64()
        .context("qemu-img info gave no actual-size")?;
    Ok((size, allocated))
}

/// Writes a raw file of random bytes (dense) or of random pieces with holes between them
/// (sparse), converts it to qcow2 (which leaves the holes unallocated) and removes it.
fn make_image(args: &Args, env: &Env<'_>, kind: Kind) -> anyhow::Result<Image> {
    let raw = env.dir.join(format!("{}.raw", kind.label()));
    let path = env.dir.join(format!("{}.qcow2", kind.label()));
    let seed = qemu::fresh_seed();
    match kind {
        Kind::Dense => qemu::write_random(&raw, args.disk_gib << 10, seed)
            .with_context(|| format!("cannot write {}", raw.display()))?,
        Kind::Sparse => {
            const PIECE_MIB: u64 = 16;
            let size = args.sparse_gib << 30;
            let pieces = args.sparse_data_mib / PIECE_MIB;
            if pieces * PIECE_MIB > size >> 20 {
                bail!("--sparse-data-mib is larger than --sparse-gib");
            }
            let piece = env.dir.join("piece.raw");
            let mut f = std::fs::File::create(&raw)?;
            f.set_len(size)?;
            for n in 0..pieces {
                qemu::write_random(&piece, PIECE_MIB, seed ^ n.wrapping_mul(0x9E37_79B9))?;
                let bytes = std::fs::read(&piece)?;
                f.seek(SeekFrom::Start(n * (size / pieces)))?;
                f.write_all(&bytes)?;
            }
            f.flush()?;
            let _ = std::fs::remove_file(&piece);
        }
    }
    let converted = qemu_img(
        env,
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &raw.display().to_string(),
            &path.display().to_string(),
        ],
    );
    let _ = std::fs::remove_file(&raw);
    converted?;
    let (size, allocated) = image_sizes(env, &path)?;
    Ok(Image {
        kind,
        path,
        size,
        allocated,
    })
}

/// The `-blockdev`s and virtio-blk device of a VM on `image`.
fn disk_args(image: &Path) -> Vec<String> {
    vec![
        "-blockdev".into(),
        format!("driver=file,filename={},node-name=file0", image.display()),
        "-blockdev".into(),
        "driver=qcow2,file=file0,node-name=disk0".into(),
        "-device".into(),
        "virtio-blk-pci,drive=disk0,id=vblk0".into(),
    ]
}

/// One run in its own directory, removed afterwards.
fn run_once(
    variant: Variant,
    image: &Image,
    env: &Env<'_>,
    rt: &tokio::runtime::Runtime,
    name: &str,
) -> anyhow::Result<Sample> {
    let dir = env.dir.join(name);
    std::fs::create_dir(&dir)?;
    let result = copy_and_verify(variant, image, env, rt, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn copy_and_verify(
    variant: Variant,
    image: &Image,
    env: &Env<'_>,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
) -> anyhow::Result<Sample> {
    let dst_image = dir.join("dst.qcow2");
    qemu_img(
        env,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            &dst_image.display().to_string(),
            &image.size.to_string(),
        ],
    )?;
    let events = dir.join("events.qmp");
    let mut src_args = disk_args(&image.path);
    src_args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", events.display()),
    ]);
    let src_cfg = VmConfig {
        mem_mib: env.mib,
        random_ram: false,
        extra_args: src_args,
        temp_in: Some(dir.to_owned()),
        qmp_path: Some(dir.join("source.qmp")),
        ..VmConfig::default()
    };
    let dst_cfg = VmConfig {
        mem_mib: env.mib,
        random_ram: false,
        incoming_defer: true,
        extra_args: disk_args(&dst_image),
        temp_in: Some(dir.to_owned()),
        qmp_path: Some(dir.join("destination.qmp")),
        ..VmConfig::default()
    };
    let mut src_vm = Vm::start(env.qemu, &src_cfg).context("the source QEMU did not start")?;
    let mut dst_vm = Vm::start(env.qemu, &dst_cfg).context("the destination QEMU did not start")?;
    procs::wait_listening_unix(&events, Duration::from_secs(10))?;
    let watch = rt.block_on(Qmp::connect_unix(&events, &ConnectOptions::default()))?;
    let mut sample = if variant.is_qmigrate() {
        with_qmigrate(variant, env, rt, dir, &src_vm, &dst_vm, &watch)?
    } else {
        rt.block_on(qemu_alone(variant, dir, &src_vm, &dst_vm, &watch))?
    };

    // Close both images cleanly (qcow2 metadata flushed), then compare them.
    let _ = rt.block_on(watch.execute_raw("quit", None));
    rt.block_on(quit(&dst_vm.qmp_path));
    for vm in [&mut src_vm, &mut dst_vm] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while vm.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if vm.is_alive() {
            vm.kill();
            bail!("QEMU did not quit within 10 s:\n{}", vm.log());
        }
    }
    let out = Command::new(env.qemu_img)
        .args(["compare", "-q", "-f", "qcow2", "-F", "qcow2"])
        .arg(&image.path)
        .arg(&dst_image)
        .stdin(Stdio::null())
        .output()
        .context("cannot run qemu-img compare")?;
    sample.verified &= out.status.success();
    if !out.status.success() {
        eprintln!(
            "    qemu-img compare: the images differ (exit {:?}): {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    sample.allocated = image_sizes(env, &dst_image)?.1;
    Ok(sample)
}

/// Sends `quit` to the QEMU whose QMP socket is `path` (errors ignored: it may be gone).
async fn quit(path: &Path) {
    if let Ok(qmp) = Qmp::connect_unix(path, &ConnectOptions::default()).await {
        let _ = qmp.execute_raw("quit", None).await;
    }
}

/// What the source's job events told: the copy's time by QEMU's clock, its bytes, and the
/// relay processes' CPU over it.
struct Copy {
    time: Duration,
    bytes: u64,
    cpu: Duration,
}

fn stamp(ev: &Event) -> f64 {
    ev.timestamp.seconds as f64 + ev.timestamp.microseconds as f64 / 1e6
}

/// Waits on `events` (subscribed before the job starts) for a job's first status change and
/// its `ready`, sampling the CPU time of `pids` at both; fails when the job ends otherwise or
/// nothing happens within `limit`.
async fn watch_copy(
    mut events: Events,
    pids: &[libc::pid_t],
    limit: Duration,
) -> anyhow::Result<Copy> {
    let cpu = || {
        pids.iter()
            .map(|&p| cpu_of(p).unwrap_or_default())
            .sum::<Duration>()
    };
    let wait = async {
        let mut start: Option<(f64, Duration)> = None;
        let mut ready: Option<(f64, Duration)> = None;
        let mut bytes = None;
        loop {
            let ev = events.recv().await?;
            match ev.event.as_str() {
                "JOB_STATUS_CHANGE" => match ev.data["status"].as_str() {
                    Some("ready") => ready = Some((stamp(&ev), cpu())),
                    Some("concluded" | "aborting") if ready.is_none() => {
                        bail!("the mirror ended before it was ready: {}", ev.data)
                    }
                    Some(_) if start.is_none() => start = Some((stamp(&ev), cpu())),
                    _ => {}
                },
                "BLOCK_JOB_READY" => bytes = ev.data["offset"].as_u64(),
                _ => {}
            }
            if let (Some(s), Some(r), Some(b)) = (start, ready, bytes) {
                return Ok(Copy {
                    time: Duration::from_secs_f64((r.0 - s.0).max(0.0)),
                    bytes: b,
                    cpu: r.1.saturating_sub(s.1),
                });
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .context("the mirror was not ready in time")?
}

/// User + system CPU time of a running process, from `/proc/PID/stat`.
fn cpu_of(pid: libc::pid_t) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: utime and stime are the 12th and 13th fields.
    let after = stat.rsplit_once(')')?.1;
    let mut ticks = after.split_whitespace().skip(11).take(2);
    let (u, s): (u64, u64) = (ticks.next()?.parse().ok()?, ticks.next()?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64((u + s) as f64 / hz))
}

/// The name of the NBD connection handed to the source QEMU in the `fd:` variant.
const NBD_FD: &str = "bench-nbd";

/// QEMU's own sequence, driven over both primary monitors.
async fn qemu_alone(
    variant: Variant,
    dir: &Path,
    src_vm: &Vm,
    dst_vm: &Vm,
    watch: &Qmp,
) -> anyhow::Result<Sample> {
    let opts = ConnectOptions::default();
    let src = Qmp::connect_unix(&src_vm.qmp_path, &opts).await?;
    let dst = Qmp::connect_unix(&dst_vm.qmp_path, &opts).await?;
    let (server_addr, client_addr) = match variant {
        Variant::QemuTcp | Variant::QemuFd => {
            let port = procs::free_port()?.to_string();
            (
                json!({"type": "inet", "data": {"host": "127.0.0.1", "port": port}}),
                json!({"type": "inet", "host": "127.0.0.1", "port": port}),
            )
        }
        _ => {
            let path = dir.join("nbd.sock").display().to_string();
            (
                json!({"type": "unix", "data": {"path": path}}),
                json!({"type": "unix", "path": path}),
            )
        }
    };
    let run = |qmp: &Qmp, name: &'static str, args: Value| {
        let qmp = qmp.clone();
        async move {
            qmp.execute_raw(name, Some(args))
                .await
                .with_context(|| format!("{name} failed"))
        }
    };
    run(&dst, "nbd-server-start", json!({"addr": server_addr})).await?;
    let client_addr = if variant == Variant::QemuFd {
        // Connected here, handed over, closed here: QEMU's copy is the only one left.
        let port = client_addr["port"].as_str().unwrap_or_default();
        let conn = std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>()?))
            .context("connecting to the destination's NBD server")?;
        src.execute_with_fd(
            &Getfd {
                fdname: NBD_FD.into(),
            },
            conn.as_fd(),
        )
        .await
        .context("getfd failed")?;
        json!({"type": "fd", "str": NBD_FD})
    } else {
        client_addr
    };
    run(
        &dst,
        "block-export-add",
        json!({"type": "nbd", "id": "exp-disk0", "node-name": "disk0", "writable": true, "name": "disk0"}),
    )
    .await?;
    run(
        &src,
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "mig-disk0", "server": client_addr, "export": "disk0",
               "reconnect-delay": 10, "discard": "unmap"}),
    )
    .await?;
    let copied = watch_copy(watch.events(), &[], Duration::from_secs(600));
    let (copied, started) = tokio::join!(
        copied,
        run(
            &src,
            "blockdev-mirror",
            json!({"job-id": "mirror-disk0", "device": "disk0", "target": "mig-disk0",
                   "sync": "full", "auto-dismiss": false}),
        )
    );
    started?;
    let copied = copied?;
    // A cancel without force after READY completes the copy (the point-in-time copy qmigrate
    // takes at switch-over).
    run(&src, "block-job-cancel", json!({"device": "mirror-disk0"})).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = src.execute_raw("query-block-jobs", None).await?;
        let status = jobs
            .as_array()
            .and_then(|j| j.iter().find(|j| j["device"] == "mirror-disk0"))
            .map(|j| j["status"].as_str().unwrap_or("").to_owned());
        match status.as_deref() {
            Some("concluded") | None => break,
            _ if Instant::now() > deadline => bail!("the mirror did not conclude within 60 s"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    let jobs = src.execute_raw("query-block-jobs", None).await?;
    if let Some(err) = jobs.as_array().and_then(|j| {
        j.iter()
            .find_map(|j| j["error"].as_str().map(str::to_owned))
    }) {
        bail!("the mirror failed: {err}");
    }
    run(&src, "job-dismiss", json!({"id": "mirror-disk0"})).await?;
    run(&src, "blockdev-del", json!({"node-name": "mig-disk0"})).await?;
    run(&dst, "nbd-server-stop", json!({})).await?;
    src.close().await;
    dst.close().await;
    Ok(Sample {
        copy: copied.time,
        bytes: copied.bytes,
        relay_cpu: Duration::ZERO,
        wall: None,
        allocated: 0,
        verified: true,
    })
}

/// `qmigrate migrate --copy-storage --no-start` to a `tunnel-server --once --qmp`.
fn with_qmigrate(
    variant: Variant,
    env: &Env<'_>,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    src_vm: &Vm,
    dst_vm: &Vm,
    watch: &Qmp,
) -> anyhow::Result<Sample> {
    let mut a: Vec<String> = vec!["tunnel-server".into()];
    if variant == Variant::RelayWs {
        a.push("--ws".into());
    }
    a.extend(["--listen", "127.0.0.1:0", "--once", "--qmp"].map(String::from));
    a.push(dst_vm.qmp_path.display().to_string());
    let mut server = Proc::spawn("tunnel-server", dir, env.qmigrate, &a)?;
    let line = server.ready_line()?;
    let url = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unexpected ready line from tunnel-server: {line:?}"))?
        .to_owned();

    let mut a: Vec<String> = [
        "migrate",
        "--json",
        "--timeout",
        "10m",
        "--copy-storage",
        "--no-start",
        "--qmp",
    ]
    .map(String::from)
    .to_vec();
    a.push(src_vm.qmp_path.display().to_string());
    a.extend(["--to".into(), url]);
    if variant == Variant::RelayTcp {
        a.push("--relay".into());
    }
    // Subscribed before `migrate` starts, so that no job event is missed.
    let events = watch.events();
    let started = Instant::now();
    let mut migrate = Proc::spawn("migrate", dir, env.qmigrate, &a)?;
    let pids = [server.pid(), migrate.pid()];
    let copied = rt.block_on(watch_copy(events, &pids, Duration::from_secs(600)));
    // Its progress lines are read only now: a copy of minutes would fill the pipe first.
    let mut summary = None;
    while let Ok(line) = migrate.ready_line() {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["type"] == "summary" {
                summary = Some(v);
            }
        }
    }
    let exited = migrate.wait(Duration::from_secs(600))?;
    let wall = started.elapsed();
    let served = server.wait(Duration::from_secs(15))?;
    let copied = copied.with_context(|| {
        format!(
            "--- migrate:\n{}--- tunnel-server:\n{}",
            migrate.log_text(),
            server.log_text()
        )
    })?;
    let completed = summary
        .as_ref()
        .is_some_and(|s| s["outcome"] == "completed");
    if !exited.success || !completed {
        bail!(
            "the migration did not complete: {}\n--- migrate:\n{}--- tunnel-server:\n{}\
             --- destination QEMU:\n{}",
            summary.map_or(Value::Null, |s| s["error"].clone()),
            migrate.log_text(),
            server.log_text(),
            dst_vm.log()
        );
    }
    Ok(Sample {
        copy: copied.time,
        bytes: copied.bytes,
        relay_cpu: copied.cpu,
        wall: Some(wall),
        allocated: 0,
        verified: served.success,
    })
}

fn gbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn core_per_gb(bytes: u64, cpu: Duration) -> f64 {
    cpu.as_secs_f64() / (bytes as f64 / 1e9)
}

/// `median (min-max)` of `values` with `digits` decimals.
fn spread(values: &[f64], digits: usize) -> String {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return "-".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{} ({}-{})",
        num(median(&v), digits),
        num(min, digits),
        num(max, digits)
    )
}

fn report(args: &Args, env: &Env<'_>, images: &[Image], samples: &[Vec<Vec<Sample>>]) {
    let reps = args.common.reps as usize;
    let mut json_rows = Vec::new();
    let mut t = Table::new(&[
        "variant",
        "disk",
        "copy s (min-max)",
        "GB/s (min-max)",
        "x QEMU tcp:",
        "relay core-s/GB (min-max)",
        "migrate s",
        "dst/src allocated",
        "verified",
    ]);
    for (image, per_variant) in images.iter().zip(samples) {
        let rates = |s: &[Sample]| s.iter().map(|s| gbps(s.bytes, s.copy)).collect::<Vec<_>>();
        let tcp = args
            .only
            .iter()
            .position(|&v| v == Variant::QemuTcp)
            .map(|i| median(&rates(&per_variant[i])));
        for (&v, s) in args.only.iter().zip(per_variant) {
            let copy: Vec<f64> = s.iter().map(|s| s.copy.as_secs_f64()).collect();
            let rate = rates(s);
            let cpu: Vec<f64> = s
                .iter()
                .map(|s| core_per_gb(s.bytes, s.relay_cpu))
                .collect();
            let wall: Vec<f64> = s
                .iter()
                .filter_map(|s| s.wall.map(|w| w.as_secs_f64()))
                .collect();
            let alloc = median(
                &s.iter()
                    .map(|s| s.allocated as f64 / image.allocated as f64)
                    .collect::<Vec<_>>(),
            );
            let ok = s.iter().filter(|s| s.verified).count();
            let ratio = tcp.map(|t| median(&rate) / t);
            json_rows.push(json!({
                "variant": v.label(),
                "disk": image.kind.label(),
                "copy_s": copy,
                "copy_s_median": median(&copy),
                "gb_per_s_median": median(&rate),
                "x_qemu_tcp": ratio,
                "relay_core_s_per_gb": v.is_qmigrate().then_some(cpu.clone()),
                "migrate_s": v.is_qmigrate().then_some(wall.clone()),
                "bytes_copied": s.first().map(|s| s.bytes),
                "dst_over_src_allocated": alloc,
                "verified_runs": ok,
            }));
            t.row(vec![
                v.label().to_owned(),
                image.kind.label().to_owned(),
                spread(&copy, 2),
                spread(&rate, 2),
                ratio.map_or("-".into(), |r| num(r, 2)),
                if v.is_qmigrate() {
                    spread(&cpu, 2)
                } else {
                    "-".into()
                },
                if v.is_qmigrate() {
                    spread(&wall, 2)
                } else {
                    "-".into()
                },
                num(alloc, 2),
                if ok == reps {
                    format!("yes ({ok}/{reps})")
                } else {
                    format!("NO ({ok} of {reps})")
                },
            ]);
        }
    }
    if args.common.json {
        let out = json!({
            "benchmark": "storage",
            "reps": reps,
            "guest_ram_mib": env.mib,
            "images": images.iter().map(|i| json!({
                "disk": i.kind.label(), "virtual_size": i.size, "allocated": i.allocated,
            })).collect::<Vec<_>>(),
            "variants": json_rows,
        });
        println!("{out}");
        return;
    }
    println!(
        "\nQEMU {}, images in {}, median (min-max) of {reps} runs. copy s: the mirror job from \
         its first status change to ready, by QEMU's event timestamps; GB/s = bytes the job \
         copied / copy s (GB = 10^9 bytes); relay core-s/GB: user + system CPU of tunnel-server \
         and migrate over the copy; migrate s: `qmigrate migrate` start to exit (with a {} MiB \
         zeroed guest's RAM); allocated: destination image / source image; verified: \
         qemu-img compare after each run\n",
        qemu_version(&env.qemu.path),
        env.dir.display(),
        env.mib,
    );
    print!("{}", t.render());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads() {
        assert_eq!(spread(&[3.0, 1.0, 2.0], 1), "2.0 (1.0-3.0)");
        assert_eq!(spread(&[f64::NAN, 0.5], 2), "0.50 (0.50-0.50)");
        assert_eq!(spread(&[], 2), "-");
    }

    #[test]
    fn own_cpu_time() {
        // Burn a little CPU so that the clock ticks at least once.
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let pid = libc::pid_t::try_from(std::process::id()).expect("a pid");
        assert!(cpu_of(pid).is_some_and(|t| t > Duration::ZERO));
        assert_eq!(cpu_of(0), None);
    }
}
