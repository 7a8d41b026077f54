//! `qmigrate-bench converge`: does a migration of a guest that keeps writing its RAM end, and
//! how, through QEMU alone and through `qmigrate migrate`.
//!
//! The guest runs the dirtying firmware (`qmigrate_testkit::dirtying`): it writes every page
//! of a region of its RAM, paced by its TSC, at a set rate. Its RAM starts as random bytes, so
//! every page it dirties costs a whole page on the wire. The link is QEMU's `max-bandwidth`;
//! the guest's rate goes from 0 to above it. Each cell (rate, strategy) runs two ways:
//!
//! - **QEMU alone**: the benchmark sets the capabilities and parameters on both QEMUs over QMP
//!   as qmigrate's plan would (`events`, `return-path`, `multifd`, `postcopy-ram` on both,
//!   `auto-converge` on the source; `max-bandwidth`, `multifd-channels`, and with postcopy
//!   `max-postcopy-bandwidth` 0), `migrate-incoming tcp:` on the destination and `migrate tcp:`
//!   on the source, polls `query-migrate` every 100 ms and, for postcopy, sends
//!   `migrate-start-postcopy` once the first pass is done (`dirty-sync-count` > 1).
//! - **qmigrate**: a `tunnel-server --once --qmp` for the destination and `qmigrate migrate
//!   --to tcp://... --max-bandwidth ... --timeout LIMIT` with `--auto-converge`,
//!   `--postcopy=1` or `--multifd 4`. With one channel that is the direct data path (both
//!   QEMUs take the tunnel connection over; `--relay` relays it instead); multifd's channels
//!   always go through qmigrate's relay.
//!
//! Two more drivers take qmigrate's relay topology apart (`--via socat,tunnel`): the benchmark
//! drives QEMU as for QEMU alone, but over `unix:` sockets with a relay pair between them
//! (Unix -> loopback TCP -> Unix), two socats (`socat`: default buffers, `socat-1m`: `-b
//! 1048576`, `socat-1m-tcp`: the same with loopback TCP instead of the source's Unix socket)
//! or qmigrate's `tunnel-client` and `tunnel-server` (`tunnel`). `qmigrate-b` runs a second
//! qmigrate binary (`--qmigrate-b`) beside the first, for a before/after comparison.
//!
//! A migration that has not ended after `--limit` is cancelled (`migrate_cancel`, or
//! qmigrate's own `--timeout`) and counts as not completed. Every figure comes from the source
//! QEMU's `query-migrate` (qmigrate's `--json` summary carries the same): total time,
//! downtime, passes (`dirty-sync-count`), bytes moved (`ram.transferred`). A second QMP
//! monitor on the source is polled every 100 ms the same way for both drivers: the highest
//! `dirty-pages-rate` and `cpu-throttle-percentage`, and `remaining`, `mbps` and
//! `expected-downtime` in the last poll before the switch-over. After a completed migration the destination's pass counter
//! must advance: the guest runs there.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use qmigrate_qmp::{MigrationInfo, MigrationStatus, Qmp, QueryMigrate};
use qmigrate_testkit::child::{self as procs, Proc};
use qmigrate_testkit::dirtying::{self, DirtyConfig};
use qmigrate_testkit::qemu::{self, QemuBinary, Vm, VmConfig};
use serde_json::{json, Value};

use crate::common::{self, Common};
use crate::migrate::{find_qemu, qemu_version, write_random};
use crate::table::{self, median, num, Table};

/// Arguments of `qmigrate-bench converge`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM (K, M, G: binary units), random bytes.
    #[arg(long, default_value = "512MiB", value_parser = table::parse_size, value_name = "SIZE")]
    mem: u64,

    /// The region the guest dirties, from 1 MiB (default: half the guest's RAM).
    #[arg(long, value_parser = table::parse_size, value_name = "SIZE")]
    region: Option<u64>,

    /// The guest's dirty rates in MiB/s, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,16,32,48,96",
        value_name = "MIB_S,..."
    )]
    rates: Vec<f64>,

    /// The link: QEMU's max-bandwidth in bytes per second (K, M, G: binary units).
    #[arg(long, default_value = "64MiB", value_parser = table::parse_size, value_name = "RATE")]
    max_bandwidth: u64,

    /// Strategies to run, comma-separated, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "precopy,auto-converge,postcopy,multifd4"
    )]
    strategies: Vec<Strategy>,

    /// Who drives the migration, comma-separated, in this order (`socat`, `socat-1m` and
    /// `tunnel`: the benchmark drives QEMU through a relay pair).
    #[arg(long, value_delimiter = ',', default_value = "qemu,qmigrate")]
    via: Vec<Via>,

    /// Give up on a migration after this many seconds: cancel it and record "not completed".
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    limit: u64,

    /// qmigrate runs relay the stream (`migrate --relay`) even where the direct data path
    /// would do (single-channel TCP: both QEMUs take the tunnel connection over).
    #[arg(long)]
    relay: bool,

    /// The accelerator (kvm, tcg); default: KVM where it works, else TCG.
    #[arg(long, value_name = "ACCEL")]
    accel: Option<String>,

    /// Quick settings: a 256 MiB guest, rates 0, 32 and 96 MiB/s, a 25 s limit, each where
    /// its own flag was left at its default.
    #[arg(long)]
    quick: bool,

    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    /// The second qmigrate binary, for `--via qmigrate-b`.
    #[arg(long, value_name = "PATH")]
    qmigrate_b: Option<PathBuf>,

    /// The socat binary (`--via socat`).
    #[arg(long, value_name = "PATH", default_value = "socat")]
    socat: PathBuf,

    #[command(flatten)]
    common: Common,
}

/// How a non-converging migration is helped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// Plain precopy.
    Precopy,
    /// Precopy with `auto-converge` (vCPU throttling).
    AutoConverge,
    /// Postcopy, switched to after the first precopy pass.
    Postcopy,
    /// Precopy over 4 multifd channels.
    #[value(name = "multifd4")]
    Multifd4,
}

impl Strategy {
    fn label(self) -> &'static str {
        match self {
            Strategy::Precopy => "precopy",
            Strategy::AutoConverge => "auto-converge",
            Strategy::Postcopy => "postcopy",
            Strategy::Multifd4 => "multifd 4",
        }
    }

    fn multifd(self) -> Option<u32> {
        (self == Strategy::Multifd4).then_some(4)
    }
}

/// Who drives the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The benchmark drives both QEMUs over QMP; QEMU to QEMU over `tcp:`.
    Qemu,
    /// As `qemu`, but over `unix:` sockets with two socats in between (Unix -> loopback TCP
    /// -> Unix, `fork` for multifd's connections, `nodelay` on the TCP hop): qmigrate's relay
    /// topology without qmigrate. Default buffers (8 KiB).
    Socat,
    /// As `socat`, with `-b 1048576` (the size of qmigrate's reads).
    #[value(name = "socat-1m")]
    Socat1m,
    /// As `socat-1m`, but the source QEMU connects to the first socat over loopback TCP
    /// (`tcp:`) instead of a Unix socket: what the Unix hop on the source side costs.
    #[value(name = "socat-1m-tcp")]
    Socat1mTcp,
    /// As `qemu`, but over `unix:` sockets with qmigrate's `tunnel-client` and `tunnel-server`
    /// in between (`tcp://`): qmigrate's relay, driven by the benchmark rather than by
    /// `qmigrate migrate`.
    Tunnel,
    /// `qmigrate migrate` to a `tunnel-server --qmp` over `tcp://`.
    Qmigrate,
    /// As `qmigrate`, with the binary given by `--qmigrate-b` (a before/after comparison
    /// within one run).
    #[value(name = "qmigrate-b")]
    QmigrateB,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Qemu => "QEMU alone",
            Via::Socat => "QEMU + socat",
            Via::Socat1m => "QEMU + socat -b 1M",
            Via::Socat1mTcp => "QEMU tcp: + socat -b 1M",
            Via::Tunnel => "QEMU + tunnel",
            Via::Qmigrate => "qmigrate",
            Via::QmigrateB => "qmigrate B",
        }
    }
}

/// One migration.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    completed: bool,
    /// QEMU's total time (the time until it gave up, for a cancelled one).
    total: Duration,
    /// From the first QMP command (QEMU alone) or the start of `qmigrate migrate` to its end.
    wall: Duration,
    downtime: Option<Duration>,
    passes: u64,
    transferred: u64,
    /// The highest `dirty-pages-rate` QEMU reported, in MiB/s.
    dirty_mib_s: f64,
    /// The highest `cpu-throttle-percentage`.
    throttle: Option<u64>,
    /// The last precopy `query-migrate` before the switch-over (postcopy's or the final one).
    last_active: Option<LastActive>,
    /// The guest's pass counter advanced on the destination (only checked when completed).
    dest_ran: bool,
}

/// What QEMU reported in the last poll of the `active` (precopy) state: where it stood when it
/// decided to switch over.
#[derive(Debug, Clone, Copy, Default)]
struct LastActive {
    /// `ram.remaining`, bytes.
    remaining: u64,
    /// `ram.mbps`, QEMU's throughput estimate in megabits per second.
    mbps: f64,
    /// `expected-downtime`, ms.
    expected_downtime: u64,
}

/// One cell of the table: a rate, a strategy, a driver.
#[derive(Debug, Clone, Copy)]
struct Cell {
    rate: f64,
    strategy: Strategy,
    via: Via,
}

/// What every run shares.
struct Env<'a> {
    dir: &'a Path,
    qmigrate: &'a Path,
    qemu: &'a QemuBinary,
    ram: &'a Path,
    mib: u64,
    region_mib: u64,
    tsc_hz: u64,
    max_bandwidth: u64,
    limit: Duration,
    accel: Option<&'a str>,
    relay: bool,
    socat: &'a Path,
    qmigrate_b: Option<&'a Path>,
}

const POLL: Duration = Duration::from_millis(100);

pub fn run(mut args: Args) -> anyhow::Result<bool> {
    if args.quick {
        // Only what is still at its default: an explicit flag wins.
        if args.mem == 512 << 20 {
            args.mem = 256 << 20;
        }
        if args.rates == [0.0, 16.0, 32.0, 48.0, 96.0] {
            args.rates = vec![0.0, 32.0, 96.0];
        }
        if args.limit == 60 {
            args.limit = 25;
        }
    }
    let via_qmigrate = args.via.contains(&Via::Qmigrate) || args.via.contains(&Via::Tunnel);
    if args.via.contains(&Via::QmigrateB) && args.qmigrate_b.is_none() {
        bail!("--via qmigrate-b needs --qmigrate-b PATH");
    }
    let qmigrate = args.common.qmigrate_bin(via_qmigrate)?;
    let qemu = find_qemu(&args.qemu)?;
    let mib = args.mem.div_ceil(1 << 20);
    let region_mib = args.region.map_or(mib / 2, |r| r.div_ceil(1 << 20));
    if region_mib + 1 > mib {
        bail!("the region ({region_mib} MiB from 1 MiB) does not fit in a {mib} MiB guest");
    }
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-bench-")
        .tempdir()?;
    let ram = dir.path().join("ram.bin");
    write_random(&ram, mib)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tsc_hz = dirtying::tsc_hz();
    let env = Env {
        dir: dir.path(),
        qmigrate: &qmigrate,
        qemu: &qemu,
        ram: &ram,
        mib,
        region_mib,
        tsc_hz,
        max_bandwidth: args.max_bandwidth,
        limit: Duration::from_secs(args.limit),
        accel: args.accel.as_deref(),
        relay: args.relay,
        socat: &args.socat,
        qmigrate_b: args.qmigrate_b.as_deref(),
    };

    let mut cells = Vec::new();
    for &rate in &args.rates {
        for &strategy in &args.strategies {
            for &via in &args.via {
                cells.push(Cell {
                    rate,
                    strategy,
                    via,
                });
            }
        }
    }
    eprintln!(
        "convergence benchmark: {mib} MiB guest of random bytes dirtying {region_mib} MiB, link \
         {} MiB/s, limit {} s, TSC {:.3} GHz, {} repetitions, cells interleaved",
        args.max_bandwidth >> 20,
        args.limit,
        tsc_hz as f64 / 1e9,
        args.common.reps
    );
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); cells.len()];
    let mut all_ok = true;
    for rep in 0..args.common.reps {
        for (i, cell) in cells.iter().enumerate() {
            let run_dir = env.dir.join(format!("{rep}-{i}"));
            std::fs::create_dir(&run_dir)?;
            let label = format!(
                "{:>3} MiB/s {:<13} {}",
                cell.rate,
                cell.strategy.label(),
                cell.via.label()
            );
            match run_once(*cell, &env, &run_dir, &rt) {
                Ok(s) => {
                    eprintln!(
                        "  rep {}/{}  {label:<40} {:<3} {:>6.1} s  downtime {:>5} ms  passes {:>3}  {:>6} MiB  dirty {:>5.1} MiB/s{}{}",
                        rep + 1,
                        args.common.reps,
                        if s.completed { "yes" } else { "no" },
                        s.total.as_secs_f64(),
                        s.downtime.map_or("-".into(), |d| d.as_millis().to_string()),
                        s.passes,
                        s.transferred >> 20,
                        s.dirty_mib_s,
                        s.throttle.map_or(String::new(), |t| format!("  throttle {t}%"))
                            + &s.last_active.map_or(String::new(), |l| format!(
                                "  at switch-over: {:.1} MiB left, {:.0} Mbit/s, expected {} ms",
                                l.remaining as f64 / 1048576.0,
                                l.mbps,
                                l.expected_downtime
                            )),
                        match (s.completed, s.dest_ran) {
                            (true, false) => "  GUEST NOT RUNNING ON THE DESTINATION",
                            _ => "",
                        }
                    );
                    all_ok &= !s.completed || s.dest_ran;
                    samples[i].push(s);
                }
                Err(err) => {
                    common::rep_failed(rep, args.common.reps, &label, &err);
                    all_ok = false;
                }
            }
            let _ = std::fs::remove_dir_all(&run_dir);
        }
    }
    report(&args, &env, &cells, &samples);
    Ok(all_ok)
}

/// The source's second QMP monitor, for [`Watch`].
fn watch_path(dir: &Path) -> PathBuf {
    dir.join("source-watch.qmp")
}

/// Starts the source (random RAM, dirtying at `rate`, a second QMP monitor for the watch) and the destination (`-incoming defer`,
/// anonymous RAM, the same firmware and accelerator), QMP sockets in `dir`.
fn start_pair(env: &Env<'_>, dir: &Path, rate: f64) -> anyhow::Result<(Vm, Vm)> {
    let dirty = DirtyConfig {
        tsc_hz: env.tsc_hz,
        ..DirtyConfig::new(env.region_mib, rate)
    };
    let common = |cfg: VmConfig, name: &str| VmConfig {
        temp_in: Some(dir.to_owned()),
        qmp_path: Some(dir.join(format!("{name}.qmp"))),
        dirtying: Some(dirty),
        accel: env.accel.map(str::to_owned),
        ..cfg
    };
    let src = common(
        VmConfig {
            mem_mib: env.mib,
            ram_file: Some(env.ram.to_owned()),
            extra_args: vec![
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", watch_path(dir).display()),
            ],
            ..VmConfig::default()
        },
        "source",
    );
    let dst = common(qemu::incoming_config(env.mib), "destination");
    let src = Vm::start(env.qemu, &src).context("the source QEMU did not start")?;
    let dst = Vm::start(env.qemu, &dst).context("the destination QEMU did not start")?;
    Ok((src, dst))
}

fn run_once(
    cell: Cell,
    env: &Env<'_>,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Sample> {
    let (src, dst) = start_pair(env, dir, cell.rate)?;
    // Let the guest get going (and its clock settle) before the migration starts.
    std::thread::sleep(Duration::from_millis(500));
    let watch = Watch::start(watch_path(dir));
    let sample = match cell.via {
        Via::Qemu | Via::Socat | Via::Socat1m | Via::Socat1mTcp | Via::Tunnel => {
            rt.block_on(qemu_alone(
                cell.strategy,
                cell.via,
                env,
                dir,
                &src.qmp_path,
                &dst.qmp_path,
            ))
        }
        Via::Qmigrate | Via::QmigrateB => {
            let bin = match cell.via {
                Via::QmigrateB => env.qmigrate_b.context("no --qmigrate-b")?,
                _ => env.qmigrate,
            };
            through_qmigrate(cell.strategy, env, bin, dir, &src.qmp_path, &dst.qmp_path)
        }
    };
    let mut sample = sample.with_context(|| format!("destination QEMU's log:\n{}", dst.log()))?;
    watch.finish(&mut sample)?;
    if sample.completed {
        sample.dest_ran = rt.block_on(guest_runs(&dst.qmp_path))?;
    }
    Ok(sample)
}

/// True when the guest's pass counter advances on the VM at `qmp` within 3 s.
async fn guest_runs(qmp: &Path) -> anyhow::Result<bool> {
    let q = connect(qmp).await?;
    let first = dirtying::read_counters(&q)
        .await
        .map_err(anyhow::Error::msg)?;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = dirtying::read_counters(&q)
            .await
            .map_err(anyhow::Error::msg)?;
        if now.chunks != first.chunks {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn connect(path: &Path) -> anyhow::Result<Qmp> {
    qmigrate_testkit::check::try_qmp(path)
        .await
        .map_err(anyhow::Error::msg)
}

fn caps(list: &[(&str, bool)]) -> Value {
    let caps: Vec<Value> = list
        .iter()
        .map(|(name, state)| json!({"capability": name, "state": state}))
        .collect();
    json!({ "capabilities": caps })
}

/// The migration driven by hand over QMP, QEMU to QEMU over loopback TCP.
///
/// With `via` [`Via::Socat`] or [`Via::Tunnel`], over `unix:` sockets in `dir` with a relay
/// pair between them instead.
async fn qemu_alone(
    strategy: Strategy,
    via: Via,
    env: &Env<'_>,
    dir: &Path,
    src_qmp: &Path,
    dst_qmp: &Path,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let src = connect(src_qmp).await?;
    let dst = connect(dst_qmp).await?;
    let postcopy = strategy == Strategy::Postcopy;
    let multifd = strategy.multifd();
    let shared = [
        ("events", true),
        ("multifd", multifd.is_some()),
        ("postcopy-ram", postcopy),
        ("return-path", true),
    ];
    dst.execute_raw("migrate-set-capabilities", Some(caps(&shared)))
        .await
        .context("destination: migrate-set-capabilities")?;
    let mut source_caps = shared.to_vec();
    source_caps.push(("auto-converge", strategy == Strategy::AutoConverge));
    src.execute_raw("migrate-set-capabilities", Some(caps(&source_caps)))
        .await
        .context("source: migrate-set-capabilities")?;
    let mut params = json!({ "max-bandwidth": env.max_bandwidth });
    if let Some(n) = multifd {
        dst.execute_raw(
            "migrate-set-parameters",
            Some(json!({ "multifd-channels": n })),
        )
        .await
        .context("destination: migrate-set-parameters")?;
        params["multifd-channels"] = json!(n);
    }
    if postcopy {
        params["max-postcopy-bandwidth"] = json!(0);
    }
    src.execute_raw("migrate-set-parameters", Some(params))
        .await
        .context("source: migrate-set-parameters")?;
    let (src_uri, _relays) = match via {
        Via::Qemu => {
            let port = procs::free_port()?;
            let uri = format!("tcp:127.0.0.1:{port}");
            dst.execute_raw("migrate-incoming", Some(json!({ "uri": uri })))
                .await
                .context("destination: migrate-incoming")?;
            procs::wait_listening_tcp(port, Duration::from_secs(10))?;
            (uri, Vec::new())
        }
        _ => {
            let (src_sock, dst_sock) = (dir.join("src-mig.sock"), dir.join("dst-mig.sock"));
            dst.execute_raw(
                "migrate-incoming",
                Some(json!({ "uri": format!("unix:{}", dst_sock.display()) })),
            )
            .await
            .context("destination: migrate-incoming")?;
            procs::wait_listening_unix(&dst_sock, Duration::from_secs(10))?;
            let source_port = (via == Via::Socat1mTcp)
                .then(procs::free_port)
                .transpose()?;
            let relays = match via {
                Via::Socat | Via::Socat1m | Via::Socat1mTcp => socat_relays(
                    dir,
                    env.socat,
                    source_port.map_or(SocatSource::Unix(&src_sock), SocatSource::Tcp),
                    &dst_sock,
                    via != Via::Socat,
                )?,
                _ => common::tunnel_pair(dir, env.qmigrate, &src_sock, &dst_sock, false, None)?,
            };
            let uri = match source_port {
                Some(port) => format!("tcp:127.0.0.1:{port}"),
                None => format!("unix:{}", src_sock.display()),
            };
            (uri, relays)
        }
    };
    let t0 = Instant::now();
    src.execute_raw("migrate", Some(json!({ "uri": src_uri })))
        .await
        .context("source: migrate")?;

    let mut sample = Sample::default();
    let mut last: Option<MigrationInfo> = None;
    let mut postcopy_requested = false;
    let mut cancelled = false;
    let info = loop {
        tokio::time::sleep(POLL).await;
        let info = src.execute(&QueryMigrate).await.context("query-migrate")?;
        let status = info.status.unwrap_or(MigrationStatus::None);
        if postcopy
            && !postcopy_requested
            && status == MigrationStatus::Active
            && info
                .ram
                .as_ref()
                .and_then(|r| r.dirty_sync_count)
                .unwrap_or(0)
                > 1
        {
            src.execute_raw("migrate-start-postcopy", None)
                .await
                .context("migrate-start-postcopy")?;
            postcopy_requested = true;
        }
        if status.is_terminal() {
            break info;
        }
        if info.ram.is_some() {
            last = Some(info.clone());
        }
        let elapsed = t0.elapsed();
        if elapsed > env.limit && !cancelled && status != MigrationStatus::PostcopyActive {
            src.execute_raw("migrate_cancel", None)
                .await
                .context("migrate_cancel")?;
            cancelled = true;
        }
        if elapsed > env.limit + Duration::from_secs(60) {
            bail!("the migration neither ended nor cancelled (status {status})");
        }
    };
    sample.wall = started.elapsed();
    let status = info.status.unwrap_or(MigrationStatus::None);
    sample.completed = status == MigrationStatus::Completed;
    if !sample.completed && status != MigrationStatus::Cancelled {
        bail!("the migration ended {status}: {:?}", info.error_desc);
    }
    // QEMU drops the RAM counters of a cancelled migration: keep the last ones it reported.
    let info = if info.ram.is_some() {
        info
    } else {
        last.unwrap_or(info)
    };
    let ram = info.ram.clone().unwrap_or_default();
    sample.passes = ram.dirty_sync_count.unwrap_or(0);
    sample.transferred = ram.transferred.unwrap_or(0);
    sample.total = match (sample.completed, info.total_time) {
        (true, Some(ms)) => Duration::from_millis(ms),
        _ => t0.elapsed(),
    };
    sample.downtime = sample
        .completed
        .then_some(info.downtime)
        .flatten()
        .map(Duration::from_millis);
    src.close().await;
    dst.close().await;
    Ok(sample)
}

/// Two socats, Unix `source` -> loopback TCP -> Unix `dest`, each forking a child per
/// connection (multifd opens 1 + N), `nodelay` on both ends of the TCP hop as qmigrate's
/// tunnel sets it; `big_buffers` for `-b 1048576`. Returns once both listen.
fn socat_relays(
    dir: &Path,
    socat: &Path,
    source: SocatSource<'_>,
    dest: &Path,
    big_buffers: bool,
) -> anyhow::Result<Vec<Proc>> {
    let buf: Vec<String> = if big_buffers {
        vec!["-b".into(), "1048576".into()]
    } else {
        vec![]
    };
    let port = procs::free_port()?;
    let mut a = buf.clone();
    a.push(format!(
        "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"
    ));
    a.push(format!("UNIX-CONNECT:{}", dest.display()));
    let dest_side = Proc::spawn("socat-dest", dir, socat, &a)?;
    procs::wait_listening_tcp(port, Duration::from_secs(10))?;
    let mut a = buf;
    a.push(match source {
        SocatSource::Unix(path) => format!("UNIX-LISTEN:{},fork", path.display()),
        SocatSource::Tcp(port) => {
            format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay")
        }
    });
    a.push(format!("TCP:127.0.0.1:{port},nodelay"));
    let source_side = Proc::spawn("socat-source", dir, socat, &a)?;
    match source {
        // The socket file appears at socat's bind, before its listen: wait for the listen.
        SocatSource::Unix(path) => procs::wait_listening_unix(path, Duration::from_secs(10))?,
        SocatSource::Tcp(port) => procs::wait_listening_tcp(port, Duration::from_secs(10))?,
    }
    Ok(vec![dest_side, source_side])
}

/// Where the source-side socat listens for the source QEMU.
#[derive(Clone, Copy)]
enum SocatSource<'a> {
    Unix(&'a Path),
    Tcp(u16),
}

/// Keeps the highest dirty rate and throttle `query-migrate` reported, and the last precopy
/// figures.
fn observe(sample: &mut Sample, info: &MigrationInfo) {
    if let Some(rate) = info.ram.as_ref().and_then(|r| r.dirty_pages_rate) {
        sample.dirty_mib_s = sample.dirty_mib_s.max(pages_to_mib(rate));
    }
    if let Some(pct) = info.cpu_throttle_percentage {
        sample.throttle = Some(sample.throttle.unwrap_or(0).max(pct));
    }
    if let (Some(MigrationStatus::Active), Some(ram)) = (info.status, &info.ram) {
        sample.last_active = Some(LastActive {
            remaining: ram.remaining.unwrap_or(0),
            mbps: ram.mbps.unwrap_or(0.0),
            expected_downtime: info.expected_downtime.unwrap_or(0),
        });
    }
}

/// Polls the source's second QMP monitor every [`POLL`] for [`observe`], in a thread of its
/// own, until told to stop: the same watch whoever drives the migration on the first monitor.
struct Watch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Sample>>,
}

impl Watch {
    fn start(path: PathBuf) -> Watch {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let q = connect(&path).await?;
                let mut seen = Sample::default();
                while !flag.load(Ordering::Relaxed) {
                    if let Ok(info) = q.execute(&QueryMigrate).await {
                        observe(&mut seen, &info);
                    }
                    tokio::time::sleep(POLL).await;
                }
                q.close().await;
                Ok(seen)
            })
        });
        Watch { stop, thread }
    }

    /// Stops the watch and puts what it saw into `sample`.
    fn finish(self, sample: &mut Sample) -> anyhow::Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the watch thread panicked"))??;
        sample.dirty_mib_s = seen.dirty_mib_s;
        sample.throttle = seen.throttle;
        sample.last_active = seen.last_active;
        Ok(())
    }
}

fn pages_to_mib(pages_per_s: u64) -> f64 {
    pages_per_s as f64 * 4096.0 / 1048576.0
}

/// The same migration through `qmigrate migrate` and a `tunnel-server --once --qmp`.
fn through_qmigrate(
    strategy: Strategy,
    env: &Env<'_>,
    qmigrate: &Path,
    dir: &Path,
    src_qmp: &Path,
    dst_qmp: &Path,
) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let a: Vec<String> = [
        "tunnel-server",
        "--listen",
        "127.0.0.1:0",
        "--once",
        "--qmp",
        &dst_qmp.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut server = Proc::spawn("tunnel-server", dir, qmigrate, &a)?;
    let line = server.ready_line()?;
    let url = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unexpected ready line from tunnel-server: {line:?}"))?
        .to_owned();
    let mut a: Vec<String> = vec![
        "migrate".into(),
        "--json".into(),
        "--qmp".into(),
        src_qmp.display().to_string(),
        "--to".into(),
        url,
        "--max-bandwidth".into(),
        env.max_bandwidth.to_string(),
        "--timeout".into(),
        format!("{}s", env.limit.as_secs()),
    ];
    match strategy {
        Strategy::Precopy => {}
        Strategy::AutoConverge => a.push("--auto-converge".into()),
        Strategy::Postcopy => a.push("--postcopy=1".into()),
        Strategy::Multifd4 => a.extend(["--multifd".into(), "4".into()]),
    }
    if env.relay {
        a.push("--relay".into());
    }
    let mut migrate = Proc::spawn("migrate", dir, qmigrate, &a)?;
    let mut sample = Sample::default();
    let mut summary = None;
    while let Ok(line) = migrate.ready_line() {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["type"] == "summary" {
            summary = Some(v);
        }
    }
    let usage = migrate.wait(env.limit + Duration::from_secs(60))?;
    sample.wall = started.elapsed();
    let _ = server.wait(Duration::from_secs(15));
    let summary = summary.with_context(|| {
        format!(
            "qmigrate migrate printed no summary:\n{}",
            migrate.log_text()
        )
    })?;
    let outcome = summary["outcome"].as_str().unwrap_or_default();
    sample.completed = outcome == "completed" && usage.success;
    if !sample.completed && outcome != "cancelled" {
        bail!(
            "qmigrate migrate ended {outcome}: {}\n{}",
            summary["error"],
            migrate.log_text()
        );
    }
    let ms = |key: &str| summary[key].as_u64().map(Duration::from_millis);
    sample.total = ms("total_time_ms").unwrap_or(sample.wall);
    sample.downtime = if sample.completed {
        ms("downtime_ms")
    } else {
        None
    };
    sample.passes = summary["passes"].as_u64().unwrap_or(0);
    sample.transferred = summary["transferred"].as_u64().unwrap_or(0);
    Ok(sample)
}

/// Median and range of `values`, "-" for none.
fn spread(values: &[f64], digits: usize) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return "-".into();
    }
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let m = median(&finite);
    if finite.len() == 1 || (max - min) < 10f64.powi(-(digits as i32)) {
        num(m, digits)
    } else {
        format!(
            "{} ({}-{})",
            num(m, digits),
            num(min, digits),
            num(max, digits)
        )
    }
}

/// Per cell: completed runs, then medians of total and downtime over the completed runs.
struct Summary {
    done: usize,
    runs: usize,
    total_s: f64,
    downtime_ms: f64,
}

fn summarize(s: &[Sample]) -> Summary {
    let done: Vec<&Sample> = s.iter().filter(|s| s.completed).collect();
    Summary {
        done: done.len(),
        runs: s.len(),
        total_s: median(
            &done
                .iter()
                .map(|s| s.total.as_secs_f64())
                .collect::<Vec<_>>(),
        ),
        downtime_ms: median(
            &done
                .iter()
                .filter_map(|s| s.downtime.map(|d| d.as_secs_f64() * 1000.0))
                .collect::<Vec<_>>(),
        ),
    }
}

fn report(args: &Args, env: &Env<'_>, cells: &[Cell], samples: &[Vec<Sample>]) {
    if args.common.json {
        let rows: Vec<Value> = cells
            .iter()
            .zip(samples)
            .map(|(c, s)| {
                let sum = summarize(s);
                json!({
                    "rate_mib_s": c.rate,
                    "strategy": c.strategy.label(),
                    "via": c.via.label(),
                    "completed": sum.done,
                    "runs": sum.runs,
                    "total_s": sum.total_s,
                    "downtime_ms": sum.downtime_ms,
                    "samples": s.iter().map(|s| json!({
                        "completed": s.completed,
                        "total_s": s.total.as_secs_f64(),
                        "wall_s": s.wall.as_secs_f64(),
                        "downtime_ms": s.downtime.map(|d| d.as_millis() as u64),
                        "passes": s.passes,
                        "transferred": s.transferred,
                        "dirty_mib_s": s.dirty_mib_s,
                        "throttle_pct": s.throttle,
                        "last_active": s.last_active.map(|l| json!({
                            "remaining": l.remaining,
                            "mbps": l.mbps,
                            "expected_downtime_ms": l.expected_downtime,
                        })),
                        "dest_ran": s.dest_ran,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = json!({
            "benchmark": "converge",
            "guest_ram_mib": env.mib,
            "region_mib": env.region_mib,
            "max_bandwidth": env.max_bandwidth,
            "limit_s": env.limit.as_secs(),
            "reps": args.common.reps,
            "cells": rows,
        });
        println!("{out}");
        return;
    }
    let mut t = Table::new(&[
        "dirty rate, strategy",
        "via",
        "completed",
        "total s",
        "downtime ms",
        "passes",
        "moved MiB",
        "wall s",
        "dirty MiB/s",
        "throttle %",
    ]);
    for (c, s) in cells.iter().zip(samples) {
        let sum = summarize(s);
        let done: Vec<&Sample> = s.iter().filter(|s| s.completed).collect();
        let f = |get: &dyn Fn(&Sample) -> f64, all: bool, digits: usize| {
            let v: Vec<f64> = if all {
                s.iter().map(get).collect()
            } else {
                done.iter().map(|s| get(s)).collect()
            };
            spread(&v, digits)
        };
        t.row(vec![
            format!("{} MiB/s, {}", num(c.rate, 0), c.strategy.label()),
            c.via.label().to_owned(),
            format!("{}/{}", sum.done, sum.runs),
            f(&|s| s.total.as_secs_f64(), false, 1),
            f(
                &|s| s.downtime.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
                false,
                0,
            ),
            f(&|s| s.passes as f64, true, 0),
            f(&|s| (s.transferred >> 20) as f64, true, 0),
            f(&|s| s.wall.as_secs_f64(), true, 1),
            f(&|s| s.dirty_mib_s, true, 0),
            f(&|s| s.throttle.map_or(f64::NAN, |t| t as f64), true, 0),
        ]);
    }
    println!(
        "\n{} MiB guest of random bytes dirtying {} MiB at each rate, link (max-bandwidth) {} \
         MiB/s, limit {} s, QEMU {}; medians of {} runs (range in brackets); total s and \
         downtime over the completed runs; passes = dirty-sync-count, moved = ram.transferred, \
         wall = from the first QMP command or the start of qmigrate to the end, dirty = the \
         highest dirty-pages-rate QEMU reported{}\n",
        env.mib,
        env.region_mib,
        env.max_bandwidth >> 20,
        env.limit.as_secs(),
        qemu_version(&args.qemu),
        args.common.reps,
        if env.relay {
            "; qmigrate with --relay"
        } else {
            ""
        }
    );
    print!("{}", t.render());
    verdict(cells, samples);
}

/// Against the goal: where QEMU alone completes, qmigrate completes too, with total time and
/// downtime within 10%. The relayed QEMU-alone variants get the same line, for comparison.
fn verdict(cells: &[Cell], samples: &[Vec<Sample>]) {
    println!("\nAgainst QEMU alone (goal for qmigrate: completes where QEMU does; total and downtime within 10%):\n");
    for (j, d) in cells.iter().enumerate() {
        if d.via == Via::Qemu {
            continue;
        }
        let Some(i) = cells
            .iter()
            .position(|c| c.via == Via::Qemu && d.rate == c.rate && d.strategy == c.strategy)
        else {
            continue;
        };
        let (q, m) = (summarize(&samples[i]), summarize(&samples[j]));
        let who = d.via.label();
        let line = if q.done == 0 {
            format!("QEMU alone never completed; {who} {}/{}", m.done, m.runs)
        } else if m.done * q.runs < q.done * m.runs {
            format!(
                "NOT MET: {who} completed {}/{}, QEMU alone {}/{}",
                m.done, m.runs, q.done, q.runs
            )
        } else {
            let rt = m.total_s / q.total_s;
            let rd = m.downtime_ms / q.downtime_ms;
            let ok = rt <= 1.1 && rd <= 1.1;
            format!(
                "{who}: {}: total x{} ({} s vs {} s), downtime x{} ({} vs {} ms)",
                if ok { "met" } else { "NOT MET" },
                num(rt, 2),
                num(m.total_s, 1),
                num(q.total_s, 1),
                num(rd, 2),
                num(m.downtime_ms, 0),
                num(q.downtime_ms, 0)
            )
        };
        println!(
            "  {:>3} MiB/s {:<13} {line}",
            num(d.rate, 0),
            d.strategy.label()
        );
    }
}
