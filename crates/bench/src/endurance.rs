//! `qmigrate-bench endurance`: many migrations back and forth through one long-running
//! `tunnel-server`.
//!
//! The server has two routes, `a` and `b`, each naming the QMP socket of one side. A guest
//! with random RAM moves a -> b -> a -> ... `--hops` times: each hop starts a fresh destination
//! QEMU (`-incoming defer`) on the empty side, runs `qmigrate migrate --to URL/ROUTE` as an
//! operator would, compares the destination's RAM with the original random file (`pmemsave`),
//! then stops the old source. After every hop the server's open file descriptors, resident
//! memory and CPU time are read from `/proc`: a server that keeps something per migration
//! shows it here. Each variant (the direct data path, the TCP relay, the WebSocket relay) has
//! its own server and its own chain of hops.

use std::fs::File;
use std::io::{Seek as _, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use qmigrate_qmp::Pmemsave;
use qmigrate_testkit::check::try_qmp;
use qmigrate_testkit::child::{Live, Proc};
use qmigrate_testkit::ram::{ram_ranges, read_full};

use crate::common;
use crate::migrate::{find_qemu, qemu_version, start_vm, write_random, Guest};
use crate::table::{self, median, num, Table};

/// Arguments of `qmigrate-bench endurance`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Guest RAM (K, M, G: binary units), all of it random bytes.
    #[arg(long, default_value = "256MiB", value_parser = table::parse_size)]
    mem: u64,

    /// Migrations per variant, back and forth between the two routes.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    hops: u32,

    /// Variants to run, comma-separated, one after the other, each through its own
    /// tunnel-server.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,relay-tcp,relay-ws"
    )]
    only: Vec<Variant>,

    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,

    /// The qmigrate binary to measure (default: the one next to this benchmark).
    #[arg(long, value_name = "PATH")]
    qmigrate: Option<PathBuf>,

    /// Print the results as one JSON object on stdout instead of the tables.
    #[arg(long)]
    json: bool,
}

/// How `migrate` reaches the server and how the stream travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// Plain TCP, one channel: the direct data path (both QEMUs take the tunnel connection
    /// over; no byte goes through qmigrate).
    Direct,
    /// Plain TCP with `migrate --relay`: every byte through the server.
    #[value(name = "relay-tcp")]
    RelayTcp,
    /// WebSocket (`tunnel-server --ws`), which always relays.
    #[value(name = "relay-ws")]
    RelayWs,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Direct => "tcp, direct data path",
            Variant::RelayTcp => "tcp relay",
            Variant::RelayWs => "ws relay",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::RelayTcp => "relay-tcp",
            Variant::RelayWs => "relay-ws",
        }
    }
}

/// The two sides and their route names.
const ROUTES: [&str; 2] = ["a", "b"];

/// Where the guest sees something else than its RAM: on q35 the 256 KiB below 1 MiB are, behind
/// the PAM registers, the BIOS and option-ROM space (a `pmemsave` of a fresh guest differs from
/// its RAM file there and nowhere else). Left out of the comparison.
const ROM_WINDOW: Range<u64> = 0xC_0000..0x10_0000;

/// One migration of the chain.
#[derive(Debug, Clone, Copy)]
struct Hop {
    /// Index into [`ROUTES`] of the source side.
    from: usize,
    /// `qmigrate migrate` from start to exit (QEMU, the tunnel, the destination's verdict).
    wall: Duration,
    /// QEMU's `total_time_ms` and `downtime_ms`.
    total: Option<Duration>,
    downtime: Option<Duration>,
    /// The first guest-physical address where the destination's RAM differs from the random
    /// file (`None`: identical).
    mismatch: Option<u64>,
    /// The server after the hop (old source stopped, descriptors settled).
    server: Live,
    /// The server's CPU time during this hop.
    server_cpu: Duration,
}

/// One variant's chain of hops through one server.
#[derive(Debug)]
struct Chain {
    variant: Variant,
    /// The server before the first hop.
    at_start: Live,
    hops: Vec<Hop>,
    /// Why the chain stopped early, if it did.
    failure: Option<String>,
}

impl Chain {
    fn verified(&self) -> usize {
        self.hops.iter().filter(|h| h.mismatch.is_none()).count()
    }

    /// The server's descriptors after the first and after the last hop.
    fn fds(&self) -> Option<(usize, usize)> {
        Some((self.hops.first()?.server.fds, self.hops.last()?.server.fds))
    }

    /// The server's RSS after the first hop, half-way and after the last: the allocator keeps
    /// what the first few hops needed, a leak keeps growing in the second half.
    fn rss(&self) -> Option<(u64, u64, u64)> {
        let middle = self.hops.get(self.hops.len().checked_sub(1)? / 2)?;
        Some((
            self.hops.first()?.server.rss,
            middle.server.rss,
            self.hops.last()?.server.rss,
        ))
    }

    /// Every hop ran and was verified, and the server holds no more descriptors after the last
    /// than after the first.
    fn passed(&self, hops: u32) -> bool {
        self.failure.is_none()
            && self.hops.len() == hops as usize
            && self.verified() == self.hops.len()
            && self.fds().is_some_and(|(first, last)| last <= first)
    }
}

/// Paths shared by every chain.
struct Env<'a> {
    qmigrate: &'a Path,
    guest: Guest<'a>,
    token: &'a Path,
    /// Where the RAM dumps go (tmpfs when there is one).
    dumps: &'a Path,
    hops: u32,
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let qmigrate = common::qmigrate_bin(args.qmigrate.as_deref(), true)?;
    let mib = args.mem.div_ceil(1 << 20);
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-bench-")
        .tempdir()?;
    let ram = dir.path().join("ram.bin");
    write_random(&ram, mib)?;
    let qemu = find_qemu(&args.qemu)?;
    let token = dir.path().join("token");
    write_token(&token)?;
    let shm = Path::new("/dev/shm");
    let dumps = tempfile::Builder::new()
        .prefix("qmigrate-bench-ram-")
        .tempdir_in(if shm.is_dir() { shm } else { dir.path() })?;
    let env = Env {
        qmigrate: &qmigrate,
        guest: Guest {
            qemu: &qemu,
            ram: &ram,
            mib,
        },
        token: &token,
        dumps: dumps.path(),
        hops: args.hops,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    eprintln!(
        "endurance benchmark: {mib} MiB of random guest RAM, {} migrations a -> b -> a ... per \
         variant, each variant through one tunnel-server",
        args.hops
    );
    let mut chains = Vec::new();
    for &variant in &args.only {
        let chain_dir = dir.path().join(variant.name());
        std::fs::create_dir(&chain_dir)?;
        eprintln!("  {}:", variant.label());
        let mut chain = Chain {
            variant,
            at_start: Live::default(),
            hops: Vec::new(),
            failure: None,
        };
        if let Err(err) = run_chain(&mut chain, &env, &chain_dir, &rt) {
            eprintln!("    stopped: {err:#}");
            chain.failure = Some(format!("{err:#}"));
        }
        chains.push(chain);
    }
    report(&args, mib, &chains);
    Ok(chains.iter().all(|c| c.passed(args.hops)))
}

/// A token only this user can read, for the server and every `migrate`.
fn write_token(path: &Path) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .with_context(|| format!("cannot write the token file {}", path.display()))
}

/// Starts the server and the first source on side `a`, then migrates back and forth,
/// appending each hop to `chain`; stops at the first hop that does not complete.
fn run_chain(
    chain: &mut Chain,
    env: &Env<'_>,
    dir: &Path,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<()> {
    let sides: Vec<PathBuf> = ROUTES.iter().map(|r| dir.join(r)).collect();
    for side in &sides {
        std::fs::create_dir(side)?;
    }
    // Each side's QEMU, whichever is running there, has its QMP socket at the same path: that
    // is what the routes name.
    let qmp: Vec<PathBuf> = sides.iter().map(|s| s.join("vm.qmp")).collect();
    let (mut source, _) = start_vm(&env.guest, &sides[0], "vm", true)?;

    let mut a: Vec<String> = vec![
        "tunnel-server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--token-file".into(),
        env.token.display().to_string(),
    ];
    if chain.variant == Variant::RelayWs {
        a.push("--ws".into());
    }
    for (route, qmp) in ROUTES.iter().zip(&qmp) {
        a.extend(["--route".into(), format!("{route}={}", qmp.display())]);
    }
    let mut server = Proc::spawn("tunnel-server", dir, env.qmigrate, &a)?;
    let line = server.ready_line()?;
    let url = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unexpected ready line from tunnel-server: {line:?}"))?
        .trim_end_matches('/')
        .to_owned();
    chain.at_start = settled(&server)?;

    let mut from = 0;
    for n in 1..=env.hops {
        let to = 1 - from;
        // The QEMU killed here a hop ago left its socket file behind.
        let _ = std::fs::remove_file(&qmp[to]);
        let (dest, _) = start_vm(&env.guest, &sides[to], "vm", false)?;
        let before = server.live()?;

        let mut a: Vec<String> = vec![
            "migrate".into(),
            "--json".into(),
            "--timeout".into(),
            "10m".into(),
            "--qmp".into(),
            qmp[from].display().to_string(),
            "--to".into(),
            format!("{url}/{}", ROUTES[to]),
            "--token-file".into(),
            env.token.display().to_string(),
        ];
        if chain.variant == Variant::RelayTcp {
            a.push("--relay".into());
        }
        let started = Instant::now();
        let mut migrate = Proc::spawn(&format!("migrate-{n}"), dir, env.qmigrate, &a)?;
        let (mut summary, mut verdict) = (None, None);
        while let Ok(line) = migrate.ready_line() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                match v["type"].as_str() {
                    Some("summary") => summary = Some(v),
                    Some("destination") => verdict = Some(v),
                    _ => {}
                }
            }
        }
        let exited = migrate.wait(Duration::from_secs(60))?;
        let wall = started.elapsed();
        let completed = summary
            .as_ref()
            .is_some_and(|s| s["outcome"] == "completed")
            && verdict.as_ref().is_some_and(|v| v["status"] == "completed");
        if !exited.success || !completed {
            bail!(
                "hop {n} ({} -> {}) did not complete\n--- migrate:\n{}--- tunnel-server:\n{}\
                 --- destination QEMU:\n{}",
                ROUTES[from],
                ROUTES[to],
                migrate.log_text(),
                server.log_text(),
                dest.log()
            );
        }
        let ms = |key: &str| {
            summary
                .as_ref()
                .and_then(|s| s[key].as_u64())
                .map(Duration::from_millis)
        };
        let mismatch = rt.block_on(first_difference(
            &qmp[to],
            env.guest.mib,
            env.guest.ram,
            env.dumps,
        ))?;
        // The old source has done its part; the new one is the next hop's source.
        drop(std::mem::replace(&mut source, dest));
        let after = settled(&server)?;
        let hop = Hop {
            from,
            wall,
            total: ms("total_time_ms"),
            downtime: ms("downtime_ms"),
            mismatch,
            server: after,
            server_cpu: after.cpu.saturating_sub(before.cpu),
        };
        eprintln!(
            "    hop {n:>2}/{}  {} -> {}  {:>5.2} s  server: {:>3} fds  {:>6.2} MiB  {:.2} CPU s  {}",
            env.hops,
            ROUTES[from],
            ROUTES[to],
            wall.as_secs_f64(),
            after.fds,
            mib_of(after.rss),
            hop.server_cpu.as_secs_f64(),
            match mismatch {
                None => "verified".to_owned(),
                Some(at) => format!("RAM DIFFERS at {at:#x}"),
            }
        );
        chain.hops.push(hop);
        from = to;
    }
    Ok(())
}

fn mib_of(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The server's figures once its open descriptors have stopped changing: a session's last
/// connections may close a moment after `migrate` has the destination's verdict.
fn settled(server: &Proc) -> anyhow::Result<Live> {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = server.live()?;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = server.live()?;
        if now.fds == last.fds || Instant::now() > deadline {
            return Ok(now);
        }
        last = now;
    }
}

/// Dumps the guest's RAM with `pmemsave` into `dumps` and compares it with the random file it
/// started from, outside [`ROM_WINDOW`]; returns the first guest-physical address that
/// differs.
async fn first_difference(
    qmp: &Path,
    mib: u64,
    ram: &Path,
    dumps: &Path,
) -> anyhow::Result<Option<u64>> {
    let qmp = try_qmp(qmp).await.map_err(anyhow::Error::msg)?;
    // Guest-physical ranges follow each other in the RAM block, and so in the file.
    let mut offset = 0;
    for (n, (start, len)) in ram_ranges(mib).into_iter().enumerate() {
        let dump = dumps.join(format!("dump-{n}.bin"));
        qmp.execute_with_timeout(
            &Pmemsave {
                val: start,
                size: len,
                filename: dump.display().to_string(),
            },
            Duration::from_secs(120),
        )
        .await
        .context("pmemsave")?;
        let differs = compare(&dump, ram, offset, start, len);
        let _ = std::fs::remove_file(&dump);
        if let Some(at) = differs? {
            return Ok(Some(at));
        }
        offset += len;
    }
    Ok(None)
}

/// The first guest-physical address in `start..start + len` where `dump` differs from `ram` at
/// `offset`, [`ROM_WINDOW`] left out; a short dump differs where it ends.
fn compare(
    dump: &Path,
    ram: &Path,
    offset: u64,
    start: u64,
    len: u64,
) -> anyhow::Result<Option<u64>> {
    let mut d = File::open(dump).with_context(|| format!("open {}", dump.display()))?;
    let mut r = File::open(ram).with_context(|| format!("open {}", ram.display()))?;
    r.seek(SeekFrom::Start(offset))?;
    let (mut bd, mut br) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let end = start + len;
    let mut at = start;
    while at < end {
        let want = usize::try_from(end - at)
            .unwrap_or(usize::MAX)
            .min(bd.len());
        let n = read_full(&mut d, &mut bd[..want])?;
        if read_full(&mut r, &mut br[..want])? != want {
            bail!("{} is shorter than the guest's RAM", ram.display());
        }
        if bd[..n] != br[..n] {
            let outside =
                (0..n).find(|&i| bd[i] != br[i] && !ROM_WINDOW.contains(&(at + i as u64)));
            if let Some(i) = outside {
                return Ok(Some(at + i as u64));
            }
        }
        if n < want {
            return Ok(Some(at + n as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

fn report(args: &Args, mib: u64, chains: &[Chain]) {
    if args.json {
        let variants: Vec<serde_json::Value> = chains
            .iter()
            .map(|c| {
                let hops: Vec<serde_json::Value> = c
                    .hops
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        serde_json::json!({
                            "hop": i + 1,
                            "from": ROUTES[h.from],
                            "to": ROUTES[1 - h.from],
                            "migrate_s": h.wall.as_secs_f64(),
                            "total_ms": h.total.map(|d| d.as_millis() as u64),
                            "downtime_ms": h.downtime.map(|d| d.as_millis() as u64),
                            "verified": h.mismatch.is_none(),
                            "server_fds": h.server.fds,
                            "server_rss_bytes": h.server.rss,
                            "server_cpu_s": h.server_cpu.as_secs_f64(),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "variant": c.variant.name(),
                    "passed": c.passed(args.hops),
                    "failure": c.failure,
                    "verified_hops": c.verified(),
                    "server_at_start": {"fds": c.at_start.fds, "rss_bytes": c.at_start.rss},
                    "hops": hops,
                })
            })
            .collect();
        let out = serde_json::json!({
            "benchmark": "endurance",
            "guest_ram_mib": mib,
            "hops": args.hops,
            "variants": variants,
        });
        println!("{out}");
        return;
    }
    println!(
        "\n{mib} MiB of random guest RAM, QEMU {}, {} migrations per variant through one \
         tunnel-server; \"migrate s\" is `qmigrate migrate` from start to exit, \"in QEMU s\" \
         QEMU's total time; the server's descriptors (/proc/PID/fd), RSS (VmRSS) and CPU time \
         are read after each hop, once the old source has been stopped",
        qemu_version(&args.qemu),
        args.hops
    );
    for c in chains {
        println!("\n{}:\n", c.variant.label());
        let mut t = Table::new(&[
            "hop",
            "route",
            "migrate s",
            "in QEMU s",
            "downtime ms",
            "server CPU s",
            "server fds",
            "server RSS",
            "RAM",
        ]);
        t.row(vec![
            "start".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            c.at_start.fds.to_string(),
            format!("{:.2} MiB", mib_of(c.at_start.rss)),
            "-".into(),
        ]);
        for (i, h) in c.hops.iter().enumerate() {
            t.row(vec![
                (i + 1).to_string(),
                format!("{} -> {}", ROUTES[h.from], ROUTES[1 - h.from]),
                num(h.wall.as_secs_f64(), 2),
                h.total.map_or("-".into(), |d| num(d.as_secs_f64(), 2)),
                h.downtime.map_or("-".into(), |d| d.as_millis().to_string()),
                num(h.server_cpu.as_secs_f64(), 2),
                h.server.fds.to_string(),
                format!("{:.2} MiB", mib_of(h.server.rss)),
                match h.mismatch {
                    None => "verified".into(),
                    Some(at) => format!("DIFFERS at {at:#x}"),
                },
            ]);
        }
        print!("{}", t.render());
        if let Some(why) = &c.failure {
            println!("stopped early: {}", why.lines().next().unwrap_or(""));
        }
    }

    println!();
    let mut t = Table::new(&[
        "variant",
        "verified",
        "migrate s (median, min-max)",
        "server fds (start, hop 1, last)",
        "server RSS (hop 1, half-way, last)",
        "passed",
    ]);
    for c in chains {
        let walls: Vec<f64> = c.hops.iter().map(|h| h.wall.as_secs_f64()).collect();
        let (lo, hi) = walls
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &w| {
                (lo.min(w), hi.max(w))
            });
        t.row(vec![
            c.variant.label().to_owned(),
            format!("{} of {}", c.verified(), args.hops),
            format!("{} ({}-{})", num(median(&walls), 2), num(lo, 2), num(hi, 2)),
            c.fds().map_or("-".into(), |(first, last)| {
                format!("{}, {first}, {last}", c.at_start.fds)
            }),
            c.rss().map_or("-".into(), |(first, middle, last)| {
                format!(
                    "{:.2}, {:.2}, {:.2} MiB",
                    mib_of(first),
                    mib_of(middle),
                    mib_of(last)
                )
            }),
            if c.passed(args.hops) { "yes" } else { "NO" }.to_owned(),
        ]);
    }
    print!("{}", t.render());
    println!(
        "\npassed: every hop completed and was verified, and the server held no more \
         descriptors after the last hop than after the first"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn compare_ignores_the_rom_window_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 0x20_0000u64;
        let ram: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let ram_path = write(dir.path(), "ram", &ram);
        let mut dump = ram.clone();
        dump[0xC_0000..0x10_0000].fill(0xFF);
        let same = write(dir.path(), "same", &dump);
        assert_eq!(compare(&same, &ram_path, 0, 0, len).expect("compare"), None);
        dump[0x15_0001] ^= 1;
        let differs = write(dir.path(), "differs", &dump);
        assert_eq!(
            compare(&differs, &ram_path, 0, 0, len).expect("compare"),
            Some(0x15_0001)
        );
        let short = write(dir.path(), "short", &ram[..0x18_0000]);
        assert_eq!(
            compare(&short, &ram_path, 0, 0, len).expect("compare"),
            Some(0x18_0000)
        );
        // Above 4 GiB the dump starts at the file's offset, and no ROM window applies.
        let high = write(dir.path(), "high", &ram[0x10_0000..]);
        assert_eq!(
            compare(&high, &ram_path, 0x10_0000, 1 << 32, 0x10_0000).expect("compare"),
            None
        );
    }
}
