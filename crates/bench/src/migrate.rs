//! `qmigrate-bench migrate`: whole QEMU migrations, side by side.
//!
//! Every run starts a fresh pair of tiny VMs (the source's RAM is a file of random bytes, so
//! nothing compresses and every page moves; its vCPU halts, so nothing is dirtied), connects
//! them through the variant under test, and drives the migration with `qmigrate receive` and
//! `qmigrate send` as an operator would (bandwidth unlimited). The figures come from QEMU's own
//! summary (total time, downtime) and from `wait4` on the relay processes. After each run both
//! guests' RAM is dumped with `pmemsave` and compared byte for byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use qmigrate_testkit::child::{self as procs, Proc, Usage};
use qmigrate_testkit::qemu::{self, QemuBinary, Vm, VmConfig};
use qmigrate_testkit::ram::same_ram;

use crate::common::{self, Common};
use crate::relay::{make_cert, Cert};
use crate::table::{self, median, num, Table};

/// Arguments of `qmigrate-bench migrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM (K, M, G: binary units), all of it random bytes. Several sizes
    /// (256MiB,1GiB,4GiB) run every variant at each and fit total time and relay CPU to a
    /// line in the size.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1GiB",
        value_parser = table::parse_size,
        value_name = "SIZE,..."
    )]
    mem: Vec<u64>,

    /// Variants to run, comma-separated, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct-unix,direct-tcp,socat,socat-1m,tcp,ws,tls,wss,tcp-direct,direct-unix-multifd4,tcp-multifd4,ws-multifd4"
    )]
    only: Vec<Variant>,

    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    /// The socat binary.
    #[arg(long, value_name = "PATH", default_value = "socat")]
    socat: PathBuf,

    #[command(flatten)]
    common: Common,
}

/// How the migration stream gets from the source QEMU to the destination QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// QEMU to QEMU over a Unix socket: the limit.
    DirectUnix,
    /// QEMU to QEMU over loopback TCP.
    DirectTcp,
    /// QEMU to QEMU over a Unix socket with `--multifd 4`.
    #[value(name = "direct-unix-multifd4")]
    DirectUnixMultifd4,
    /// Two socats (Unix -> TCP -> Unix), default buffers.
    Socat,
    /// Two socats with `-b 1048576`.
    #[value(name = "socat-1m")]
    Socat1m,
    /// The qmigrate TCP tunnel.
    Tcp,
    /// The qmigrate WebSocket tunnel.
    Ws,
    /// The qmigrate TCP tunnel with `--multifd 4`.
    #[value(name = "tcp-multifd4")]
    TcpMultifd4,
    /// The qmigrate WebSocket tunnel with `--multifd 4`.
    #[value(name = "ws-multifd4")]
    WsMultifd4,
    /// The qmigrate TLS tunnel (tls://, the server's certificate pinned).
    Tls,
    /// The qmigrate WebSocket-over-TLS tunnel (wss://, pinned).
    Wss,
    /// `qmigrate migrate` to a `tunnel-server --qmp` over TCP: the direct data path, where
    /// both QEMUs take the tunnel connection over (relay CPU: both qmigrate processes).
    #[value(name = "tcp-direct")]
    TcpDirect,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::DirectUnix => "direct unix:",
            Variant::DirectTcp => "direct tcp:",
            Variant::DirectUnixMultifd4 => "direct unix:, multifd 4",
            Variant::Socat => "socat (default buffers)",
            Variant::Socat1m => "socat -b 1048576",
            Variant::Tcp => "qmigrate tcp",
            Variant::Ws => "qmigrate ws",
            Variant::TcpMultifd4 => "qmigrate tcp, multifd 4",
            Variant::WsMultifd4 => "qmigrate ws, multifd 4",
            Variant::Tls => "qmigrate tls",
            Variant::Wss => "qmigrate wss",
            Variant::TcpDirect => "qmigrate migrate tcp, direct",
        }
    }

    fn multifd(self) -> Option<u32> {
        matches!(
            self,
            Variant::DirectUnixMultifd4 | Variant::TcpMultifd4 | Variant::WsMultifd4
        )
        .then_some(4)
    }

    fn is_relay(self) -> bool {
        !matches!(
            self,
            Variant::DirectUnix | Variant::DirectTcp | Variant::DirectUnixMultifd4
        )
    }
}

/// One repetition of one variant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total: Duration,
    downtime: Option<Duration>,
    relay: Usage,
    verified: bool,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let qmigrate = args.common.qmigrate_bin(true)?;
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-bench-")
        .tempdir()?;
    let ram = dir.path().join("ram.bin");
    let qemu = find_qemu(&args.qemu)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cert = if args
        .only
        .iter()
        .any(|v| matches!(v, Variant::Tls | Variant::Wss))
    {
        Some(make_cert(dir.path())?)
    } else {
        None
    };
    let mut all_ok = true;
    let mut sizes = Vec::new();
    for &mem in &args.mem {
        let mib = mem.div_ceil(1 << 20);
        write_random(&ram, mib)?;
        // Every run gets its own directory; everything else is shared.
        let base = Env {
            dir: dir.path(),
            qmigrate: &qmigrate,
            qemu: &qemu,
            socat: &args.socat,
            ram: &ram,
            mib,
            tls: cert.as_ref(),
        };
        let (samples, ok) = run_size(&args, &base, &rt)?;
        all_ok &= ok;
        report(&args, mib, &samples);
        sizes.push((mib, samples));
    }
    if sizes.len() > 1 {
        report_scale(&args, &sizes);
    }
    Ok(all_ok)
}

/// Every variant at one guest size, `--reps` times, interleaved; the samples per variant and
/// whether every run was verified.
fn run_size(
    args: &Args,
    base: &Env<'_>,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<(Vec<Vec<Sample>>, bool)> {
    let mib = base.mib;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); args.only.len()];
    let mut all_ok = true;
    eprintln!(
        "migration benchmark: {mib} MiB of random guest RAM, {} repetitions, variants interleaved",
        args.common.reps
    );
    // One untimed migration first: the first QEMU start of a run pays for loading the binary
    // and faulting in the RAM file, which would otherwise count against the first variant.
    if let Some(&first) = args.only.first() {
        let warm = base.dir.join("warm-up");
        std::fs::create_dir(&warm)?;
        if let Err(err) = run_once(
            first,
            &Env {
                dir: &warm,
                ..*base
            },
            rt,
        ) {
            eprintln!("  warm-up ({}) failed: {err:#}", first.label());
        }
        let _ = std::fs::remove_dir_all(&warm);
    }
    for rep in 0..args.common.reps {
        for (i, &variant) in args.only.iter().enumerate() {
            let run_dir = base.dir.join(format!("{rep}-{i}"));
            std::fs::create_dir(&run_dir)?;
            match run_once(
                variant,
                &Env {
                    dir: &run_dir,
                    ..*base
                },
                rt,
            ) {
                Ok(s) => {
                    eprintln!(
                        "  rep {}/{}  {:<24} {:>6.2} s  {:>5.2} GB/s  downtime {:>4} ms  relay {:>5} core-s/GB  {}",
                        rep + 1,
                        args.common.reps,
                        variant.label(),
                        s.total.as_secs_f64(),
                        gbps(mib, s.total),
                        s.downtime.map_or("-".into(), |d| d.as_millis().to_string()),
                        if variant.is_relay() { num(core_per_gb(mib, s.relay.cpu), 2) } else { "-".into() },
                        if s.verified { "verified" } else { "NOT VERIFIED" }
                    );
                    all_ok &= s.verified;
                    samples[i].push(s);
                }
                Err(err) => {
                    common::rep_failed(rep, args.common.reps, variant.label(), &err);
                    all_ok = false;
                }
            }
            let _ = std::fs::remove_dir_all(&run_dir);
        }
    }
    Ok((samples, all_ok))
}

/// How total time and relay CPU grow with the guest: per variant the median at each size and
/// a least-squares line through every run, `y = a + b * GiB`.
fn report_scale(args: &Args, sizes: &[(u64, Vec<Vec<Sample>>)]) {
    let gib = |mib: u64| mib as f64 / 1024.0;
    // Per variant: (median at each size, fit), for total seconds and relay CPU seconds.
    let series = |i: usize, y: &dyn Fn(&Sample) -> f64| {
        let medians: Vec<f64> = sizes
            .iter()
            .map(|(_, s)| median(&s[i].iter().map(y).collect::<Vec<_>>()))
            .collect();
        let points: Vec<(f64, f64)> = sizes
            .iter()
            .flat_map(|(mib, s)| s[i].iter().map(move |x| (gib(*mib), y(x))))
            .collect();
        (medians, table::linear_fit(&points))
    };
    let time = |s: &Sample| s.total.as_secs_f64();
    let cpu = |s: &Sample| s.relay.cpu.as_secs_f64();
    if args.common.json {
        let fit_json = |f: Option<table::Fit>| {
            f.map(|f| serde_json::json!({"a": f.a, "b_per_gib": f.b, "r2": f.r2}))
        };
        let variants: Vec<serde_json::Value> = args
            .only
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let (t, tf) = series(i, &time);
                let (c, cf) = series(i, &cpu);
                serde_json::json!({
                    "variant": v.label(),
                    "total_s": t,
                    "total_fit": fit_json(tf),
                    "relay_cpu_s": v.is_relay().then_some(c),
                    "relay_cpu_fit": if v.is_relay() { fit_json(cf) } else { None },
                })
            })
            .collect();
        let sizes_mib: Vec<u64> = sizes.iter().map(|(mib, _)| *mib).collect();
        let out = serde_json::json!({"benchmark": "migrate-scale", "guest_ram_mib": sizes_mib, "reps": args.common.reps, "variants": variants});
        println!("{out}");
        return;
    }
    let mut header: Vec<String> = vec!["variant".into()];
    header.extend(sizes.iter().map(|(mib, _)| format!("{mib} MiB")));
    header.extend(["a".into(), "b per GiB".into(), "R^2".into()]);
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let table = |y: &dyn Fn(&Sample) -> f64, relays_only: bool| {
        let mut t = Table::new(&header);
        for (i, v) in args.only.iter().enumerate() {
            if relays_only && !v.is_relay() {
                continue;
            }
            let (medians, fit) = series(i, y);
            let mut row = vec![v.label().to_owned()];
            row.extend(medians.iter().map(|m| num(*m, 2)));
            match fit {
                Some(f) => row.extend([num(f.a, 3), num(f.b, 3), num(f.r2, 3)]),
                None => row.extend(["-".into(), "-".into(), "-".into()]),
            }
            t.row(row);
        }
        t.render()
    };
    println!(
        "\nScaling with guest RAM, QEMU {}: medians of {} runs at each size; a + b * GiB is the \
         least-squares line through every run, R^2 its fit\n\ntotal s (QEMU's total time):\n",
        qemu_version(&args.qemu),
        args.common.reps
    );
    print!("{}", table(&time, false));
    println!("\nrelay CPU s (user + system of the relay processes, wait4):\n");
    print!("{}", table(&cpu, true));
}

fn gbps(mib: u64, total: Duration) -> f64 {
    (mib << 20) as f64 / total.as_secs_f64() / 1e9
}

fn core_per_gb(mib: u64, cpu: Duration) -> f64 {
    cpu.as_secs_f64() / ((mib << 20) as f64 / 1e9)
}

fn report(args: &Args, mib: u64, samples: &[Vec<Sample>]) {
    let rate = |s: &[Sample]| median(&s.iter().map(|s| gbps(mib, s.total)).collect::<Vec<_>>());
    let direct = args
        .only
        .iter()
        .position(|&v| v == Variant::DirectUnix)
        .map(|i| rate(&samples[i]));
    let rows: Vec<_> = args
        .only
        .iter()
        .zip(samples)
        .map(|(&v, s)| {
            let total = median(&s.iter().map(|s| s.total.as_secs_f64()).collect::<Vec<_>>());
            let downtime = median(
                &s.iter()
                    .filter_map(|s| s.downtime.map(|d| d.as_secs_f64() * 1000.0))
                    .collect::<Vec<_>>(),
            );
            let cpu = median(
                &s.iter()
                    .map(|s| core_per_gb(mib, s.relay.cpu))
                    .collect::<Vec<_>>(),
            );
            let rss = s.iter().map(|s| s.relay.max_rss).max();
            let ok = s.iter().filter(|s| s.verified).count();
            (v, total, downtime, rate(s), cpu, rss, ok)
        })
        .collect();
    if args.common.json {
        let variants: Vec<serde_json::Value> = rows
            .iter()
            .map(|&(v, total, downtime, r, cpu, rss, ok)| {
                serde_json::json!({
                    "variant": v.label(),
                    "total_s": total,
                    "downtime_ms": downtime,
                    "gb_per_s": r,
                    "ratio_to_direct_unix": direct.map(|d| r / d),
                    "relay_core_s_per_gb": v.is_relay().then_some(cpu),
                    "relay_peak_rss_bytes": if v.is_relay() { rss } else { None },
                    "verified_runs": ok,
                })
            })
            .collect();
        let out = serde_json::json!({"benchmark": "migrate", "guest_ram_mib": mib, "reps": args.common.reps, "variants": variants});
        println!("{out}");
        return;
    }
    let mut t = Table::new(&[
        "variant",
        "total s",
        "downtime ms",
        "GB/s",
        "x direct unix",
        "relay core-s/GB",
        "relay peak RSS",
        "verified",
    ]);
    for (v, total, downtime, r, cpu, rss, ok) in rows {
        t.row(vec![
            v.label().to_owned(),
            num(total, 2),
            num(downtime, 0),
            num(r, 2),
            direct.map_or("-".into(), |d| num(r / d, 2)),
            if v.is_relay() {
                num(cpu, 2)
            } else {
                "-".into()
            },
            match rss {
                Some(rss) if v.is_relay() => format!("{:.1} MiB", rss as f64 / (1 << 20) as f64),
                _ => "-".into(),
            },
            if ok == args.common.reps as usize {
                format!("yes ({ok}/{})", args.common.reps)
            } else {
                format!("NO ({ok} of {})", args.common.reps)
            },
        ]);
    }
    println!(
        "\n{mib} MiB of random guest RAM, QEMU {}, median of {} runs; GB/s = guest RAM / total \
         time (GB = 10^9 bytes); relay CPU and RSS are the relay processes' (wait4), summed and \
         maximum\n",
        qemu_version(&args.qemu),
        args.common.reps
    );
    print!("{}", t.render());
}

pub(crate) fn qemu_version(qemu: &Path) -> String {
    std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(3).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Paths shared by one run.
#[derive(Clone, Copy)]
struct Env<'a> {
    dir: &'a Path,
    qmigrate: &'a Path,
    qemu: &'a QemuBinary,
    socat: &'a Path,
    ram: &'a Path,
    mib: u64,
    tls: Option<&'a Cert>,
}

impl Env<'_> {
    /// Starts a VM in this run's directory (see [`start_vm`]).
    fn vm(&self, name: &str, source: bool) -> anyhow::Result<(Vm, PathBuf)> {
        let guest = Guest {
            qemu: self.qemu,
            ram: self.ram,
            mib: self.mib,
        };
        start_vm(&guest, self.dir, name, source)
    }

    fn qmigrate(&self, name: &str, args: &[String]) -> anyhow::Result<Proc> {
        Proc::spawn(name, self.dir, self.qmigrate, args)
    }
}

/// What every benchmark VM is made of.
pub(crate) struct Guest<'a> {
    pub(crate) qemu: &'a QemuBinary,
    pub(crate) ram: &'a Path,
    pub(crate) mib: u64,
}

/// The QEMU at `path` (a bare name is looked up on PATH).
pub(crate) fn find_qemu(path: &Path) -> anyhow::Result<QemuBinary> {
    qemu::probe(path.to_owned(), None)
        .with_context(|| format!("{} --version does not run as QEMU's", path.display()))
}

/// Starts a tiny VM with its QMP socket at `DIR/NAME.qmp` and waits for it: the source's RAM is
/// the file of random bytes, the destination's anonymous RAM (zeroed, which mapped-ram relies
/// on: it leaves zero pages out of the file) under the same block name `m0`, waiting with
/// `-incoming defer`.
pub(crate) fn start_vm(
    guest: &Guest<'_>,
    dir: &Path,
    name: &str,
    source: bool,
) -> anyhow::Result<(Vm, PathBuf)> {
    let qmp = dir.join(format!("{name}.qmp"));
    let cfg = if source {
        VmConfig {
            mem_mib: guest.mib,
            ram_file: Some(guest.ram.to_owned()),
            ..VmConfig::default()
        }
    } else {
        qemu::incoming_config(guest.mib)
    };
    let cfg = VmConfig {
        temp_in: Some(dir.to_owned()),
        qmp_path: Some(qmp.clone()),
        ..cfg
    };
    let vm = Vm::start(guest.qemu, &cfg).with_context(|| format!("QEMU {name} did not start"))?;
    Ok((vm, qmp))
}

/// `mib` MiB of pseudo-random bytes: incompressible guest RAM.
pub(crate) fn write_random(path: &Path, mib: u64) -> anyhow::Result<()> {
    qemu::write_random(
        path,
        mib,
        0x0005_EED0_F0DD_u64 ^ u64::from(std::process::id()),
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn run_once(
    variant: Variant,
    env: &Env<'_>,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<Sample> {
    let (_src_vm, src_qmp) = env.vm("source", true)?;
    let (dst_vm, dst_qmp) = env.vm("destination", false)?;
    let dest_sock = env.dir.join("dest.sock");
    let src_sock = env.dir.join("source.sock");

    // Where receive listens and where send sends.
    let (recv_to, send_to) = match variant {
        Variant::DirectUnix | Variant::DirectUnixMultifd4 => {
            let uri = format!("unix:{}", dest_sock.display());
            (vec!["--uri".into(), uri.clone()], vec!["--uri".into(), uri])
        }
        Variant::DirectTcp => {
            let uri = format!("tcp:127.0.0.1:{}", procs::free_port()?);
            (vec!["--uri".into(), uri.clone()], vec!["--uri".into(), uri])
        }
        _ => (
            vec!["--socket".into(), dest_sock.display().to_string()],
            vec!["--socket".into(), src_sock.display().to_string()],
        ),
    };
    let multifd: Vec<String> = variant
        .multifd()
        .map(|n| vec!["--multifd".into(), n.to_string()])
        .unwrap_or_default();

    let mut relays: Vec<Proc> = Vec::new();
    let mut one_command_url = None;
    match variant {
        Variant::TcpDirect => {
            let a = strings(&[
                "tunnel-server",
                "--listen",
                "127.0.0.1:0",
                "--once",
                "--qmp",
                &dst_qmp.display().to_string(),
            ]);
            let mut server = env.qmigrate("tunnel-server", &a)?;
            let line = server.ready_line()?;
            one_command_url = line
                .strip_prefix("listening on ")
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned);
            relays.push(server);
        }
        Variant::DirectUnix | Variant::DirectTcp | Variant::DirectUnixMultifd4 => {}
        Variant::Socat | Variant::Socat1m => {
            relays = common::socat_pair(
                env.dir,
                env.socat,
                &src_sock,
                &dest_sock,
                variant == Variant::Socat1m,
            )?;
        }
        Variant::Tcp
        | Variant::Ws
        | Variant::Tls
        | Variant::Wss
        | Variant::TcpMultifd4
        | Variant::WsMultifd4 => {
            let ws = matches!(variant, Variant::Ws | Variant::Wss | Variant::WsMultifd4);
            let tls = match variant {
                Variant::Tls | Variant::Wss => Some(env.tls.context("no certificate made")?),
                _ => None,
            };
            relays = common::tunnel_pair(env.dir, env.qmigrate, &src_sock, &dest_sock, ws, tls)?;
        }
    }

    if one_command_url.is_none() {
        let mut a = strings(&["receive", "--qmp", &dst_qmp.display().to_string()]);
        a.extend(recv_to);
        a.extend(multifd.clone());
        let mut receive = env.qmigrate("receive", &a)?;
        let u = receive.wait(Duration::from_secs(30))?;
        if !u.success {
            bail!("qmigrate receive failed:\n{}", receive.log_text());
        }
    }

    let mut a = strings(&[
        if one_command_url.is_some() {
            "migrate"
        } else {
            "send"
        },
        "--json",
        "--timeout",
        "10m",
        "--qmp",
        &src_qmp.display().to_string(),
    ]);
    match &one_command_url {
        Some(url) => a.extend(["--to".into(), url.clone(), "--no-start".into()]),
        None => a.extend(send_to),
    }
    a.extend(multifd);
    let mut send = env.qmigrate("send", &a)?;
    let mut summary = None;
    while let Ok(line) = send.ready_line() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["type"] == "summary" {
                summary = Some(v);
            }
        }
    }
    let sent = send.wait(Duration::from_secs(30))?;
    let summary = summary
        .with_context(|| format!("qmigrate send printed no summary:\n{}", send.log_text()))?;
    if !sent.success || summary["outcome"] != "completed" {
        bail!(
            "the migration did not complete: {}\n--- destination QEMU's log:\n{}",
            summary["error"],
            dst_vm.log()
        );
    }
    let ms = |key: &str| summary[key].as_u64().map(Duration::from_millis);
    let total = ms("total_time_ms").context("the summary has no total time")?;

    let mut relay = Usage {
        success: true,
        ..Usage::default()
    };
    if one_command_url.is_some() {
        // `migrate` is the relay's other half here (and also what `send` does).
        relay.cpu += sent.cpu;
        relay.max_rss = relay.max_rss.max(sent.max_rss);
    }
    for p in &mut relays {
        let u = p.wait(Duration::from_secs(15))?;
        relay.cpu += u.cpu;
        relay.max_rss = relay.max_rss.max(u.max_rss);
        if !u.success {
            eprintln!(
                "    relay exited unsuccessfully; its log:\n{}",
                p.log_text()
            );
        }
        relay.success &= u.success;
    }

    let identical = rt.block_on(same_ram(&src_qmp, &dst_qmp, env.mib))?;
    Ok(Sample {
        total,
        downtime: ms("downtime_ms"),
        relay,
        verified: identical && relay.success,
    })
}
