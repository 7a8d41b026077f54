//! `qmigrate-bench relay`: the data path alone, without QEMU.
//!
//! A writer thread stands in for the source QEMU and a reader thread for the destination QEMU;
//! between them run the relay processes under test, exactly as an operator would start them.
//! The direct variant connects the writer straight to the reader's socket: that is the limit
//! every relay is measured against. The relays' CPU time and peak memory come from `wait4`,
//! so they count the relay processes only, not the writer and reader.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use qmigrate_testkit::child::{Proc, Usage};

use crate::common::{self, Common};
use crate::table::{self, median, num, Table};

/// Arguments of `qmigrate-bench relay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes to send through each variant per repetition (K, M, G: binary units).
    #[arg(long, default_value = "2GiB", value_parser = table::parse_size)]
    size: u64,

    /// Variants to run, comma-separated, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,socat,socat-1m,tcp,ws,tls,wss"
    )]
    only: Vec<Variant>,

    /// The socat binary.
    #[arg(long, value_name = "PATH", default_value = "socat")]
    socat: PathBuf,

    #[command(flatten)]
    common: Common,
}

/// One way of getting bytes from the source socket to the destination socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Variant {
    /// The writer connects to the reader's socket: no relay at all.
    Direct,
    /// Two socats (Unix -> TCP -> Unix) with their default 8 KiB buffers.
    Socat,
    /// Two socats with `-b 1048576`, the usual tuning.
    #[value(name = "socat-1m")]
    Socat1m,
    /// qmigrate tunnel-client and tunnel-server over TCP.
    Tcp,
    /// qmigrate tunnel-client and tunnel-server over WebSocket.
    Ws,
    /// qmigrate over TLS (tls://), the server's certificate pinned by its fingerprint.
    Tls,
    /// qmigrate over WebSocket over TLS (wss://), likewise.
    Wss,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct unix socket",
            Variant::Socat => "socat (default buffers)",
            Variant::Socat1m => "socat -b 1048576",
            Variant::Tcp => "qmigrate tcp",
            Variant::Ws => "qmigrate ws",
            Variant::Tls => "qmigrate tls",
            Variant::Wss => "qmigrate wss",
        }
    }

    fn is_qmigrate(self) -> bool {
        matches!(
            self,
            Variant::Tcp | Variant::Ws | Variant::Tls | Variant::Wss
        )
    }
}

/// One repetition of one variant.
#[derive(Debug, Clone, Copy)]
struct Sample {
    elapsed: Duration,
    relay: Usage,
    verified: bool,
}

/// The size of the writer's and reader's buffers, and of a pattern block.
const BLOCK: usize = 1 << 20;

/// How long a relay may take to exit after the stream ended.
const EXIT_LIMIT: Duration = Duration::from_secs(15);

pub fn run(args: Args) -> anyhow::Result<bool> {
    let qmigrate = args
        .common
        .qmigrate_bin(args.only.iter().any(|v| v.is_qmigrate()))?;
    let size = args.size.div_ceil(BLOCK as u64) * BLOCK as u64;
    let dir = tempfile::Builder::new()
        .prefix("qmigrate-bench-")
        .tempdir()?;
    let tls = if args
        .only
        .iter()
        .any(|v| matches!(v, Variant::Tls | Variant::Wss))
    {
        Some(make_cert(dir.path())?)
    } else {
        None
    };
    let base = pattern_block();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); args.only.len()];
    let mut all_ok = true;
    eprintln!(
        "relay benchmark: {} per run, {} repetitions, variants interleaved",
        human(size),
        args.common.reps
    );
    for rep in 0..args.common.reps {
        for (i, &variant) in args.only.iter().enumerate() {
            let run_dir = dir.path().join(format!("{rep}-{i}"));
            std::fs::create_dir(&run_dir)?;
            let env = Env {
                dir: &run_dir,
                qmigrate: &qmigrate,
                socat: &args.socat,
                tls: tls.as_ref(),
            };
            match run_once(variant, &env, size, &base) {
                Ok(sample) => {
                    eprintln!(
                        "  rep {}/{}  {:<24} {:>6.2} GB/s  relay {:>5.2} core-s/GB  {}",
                        rep + 1,
                        args.common.reps,
                        variant.label(),
                        gbps(size, sample.elapsed),
                        core_per_gb(size, sample.relay.cpu),
                        if sample.verified {
                            "verified"
                        } else {
                            "NOT VERIFIED"
                        }
                    );
                    all_ok &= sample.verified;
                    samples[i].push(sample);
                }
                Err(err) => {
                    common::rep_failed(rep, args.common.reps, variant.label(), &err);
                    all_ok = false;
                }
            }
        }
    }
    report(&args, size, &samples);
    Ok(all_ok)
}

fn gbps(size: u64, elapsed: Duration) -> f64 {
    size as f64 / elapsed.as_secs_f64() / 1e9
}

fn core_per_gb(size: u64, cpu: Duration) -> f64 {
    cpu.as_secs_f64() / (size as f64 / 1e9)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn report(args: &Args, size: u64, samples: &[Vec<Sample>]) {
    let direct = args
        .only
        .iter()
        .position(|&v| v == Variant::Direct)
        .map(|i| {
            median(
                &samples[i]
                    .iter()
                    .map(|s| gbps(size, s.elapsed))
                    .collect::<Vec<_>>(),
            )
        });
    if args.common.json {
        let variants: Vec<serde_json::Value> = args
            .only
            .iter()
            .zip(samples)
            .map(|(v, s)| {
                let rate = median(&s.iter().map(|s| gbps(size, s.elapsed)).collect::<Vec<_>>());
                serde_json::json!({
                    "variant": format!("{v:?}").to_lowercase(),
                    "label": v.label(),
                    "runs": s.len(),
                    "gb_per_s": rate,
                    "ratio_to_direct": direct.map(|d| rate / d),
                    "relay_core_s_per_gb": median(&s.iter().map(|s| core_per_gb(size, s.relay.cpu)).collect::<Vec<_>>()),
                    "relay_peak_rss_bytes": s.iter().map(|s| s.relay.max_rss).max(),
                    "verified": !s.is_empty() && s.iter().all(|s| s.verified),
                    "samples_gb_per_s": s.iter().map(|s| gbps(size, s.elapsed)).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({"benchmark": "relay", "bytes": size, "reps": args.common.reps, "variants": variants});
        println!("{out}");
        return;
    }
    let mut t = Table::new(&[
        "variant",
        "GB/s",
        "x direct",
        "relay core-s/GB",
        "relay peak RSS",
        "verified",
    ]);
    for (v, s) in args.only.iter().zip(samples) {
        let rate = median(&s.iter().map(|s| gbps(size, s.elapsed)).collect::<Vec<_>>());
        let is_relay = *v != Variant::Direct;
        t.row(vec![
            v.label().to_owned(),
            num(rate, 2),
            direct.map_or("-".into(), |d| num(rate / d, 2)),
            if is_relay {
                num(
                    median(
                        &s.iter()
                            .map(|s| core_per_gb(size, s.relay.cpu))
                            .collect::<Vec<_>>(),
                    ),
                    2,
                )
            } else {
                "-".into()
            },
            match s.iter().map(|s| s.relay.max_rss).max() {
                Some(rss) if is_relay => format!("{:.1} MiB", rss as f64 / (1 << 20) as f64),
                _ => "-".into(),
            },
            if !s.is_empty() && s.iter().all(|s| s.verified) {
                format!("yes ({}/{})", s.len(), args.common.reps)
            } else {
                format!(
                    "NO ({} of {} ok)",
                    s.iter().filter(|s| s.verified).count(),
                    args.common.reps
                )
            },
        ]);
    }
    println!(
        "\n{} per run, median of {} runs; GB = 10^9 bytes; relay CPU and RSS are the two relay \
         processes' (wait4), summed and maximum\n",
        human(size),
        args.common.reps
    );
    print!("{}", t.render());
}

/// Paths shared by one run.
struct Env<'a> {
    dir: &'a Path,
    qmigrate: &'a Path,
    socat: &'a Path,
    tls: Option<&'a Cert>,
}

/// The tunnel-server's certificate for the TLS variants, and its fingerprint as openssl
/// prints it (which is what the client pins, as an operator would).
pub(crate) struct Cert {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) fingerprint: String,
}

/// A self-signed P-256 certificate for 127.0.0.1, made with the command the README shows.
pub(crate) fn make_cert(dir: &Path) -> anyhow::Result<Cert> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let openssl = |args: &[&str]| -> anyhow::Result<String> {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .context("cannot run openssl (install it: apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &k,
        "-out",
        &c,
        "-days",
        "2",
        "-subj",
        "/CN=bench",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    ])?;
    let fingerprint = openssl(&["x509", "-in", &c, "-noout", "-fingerprint", "-sha256"])?;
    Ok(Cert {
        cert,
        key,
        fingerprint,
    })
}

fn run_once(variant: Variant, env: &Env<'_>, size: u64, base: &[u8]) -> anyhow::Result<Sample> {
    let dest = env.dir.join("dest.sock");
    let listener = UnixListener::bind(&dest).with_context(|| format!("bind {}", dest.display()))?;
    let expected = base.to_vec();
    let reader = thread::spawn(move || read_and_verify(&listener, size, &expected));

    let source = env.dir.join("source.sock");
    let mut relays: Vec<Proc> = Vec::new();
    match variant {
        Variant::Direct => {}
        Variant::Socat | Variant::Socat1m => {
            relays = common::socat_pair(
                env.dir,
                env.socat,
                &source,
                &dest,
                variant == Variant::Socat1m,
            )?;
        }
        Variant::Tcp | Variant::Ws | Variant::Tls | Variant::Wss => {
            let ws = matches!(variant, Variant::Ws | Variant::Wss);
            let tls = match variant {
                Variant::Tls | Variant::Wss => Some(env.tls.context("no certificate made")?),
                _ => None,
            };
            relays = common::tunnel_pair(env.dir, env.qmigrate, &source, &dest, ws, tls)?;
        }
    }
    let target = if variant == Variant::Direct {
        &dest
    } else {
        &source
    };

    let start = Instant::now();
    let written = write_pattern(target, size, base);
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;
    let mut relay = Usage {
        success: true,
        ..Usage::default()
    };
    for p in &mut relays {
        let u = p.wait(EXIT_LIMIT)?;
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
    written.context("writing the source stream")?;
    let (end, intact) = read.context("reading the destination stream")?;
    Ok(Sample {
        elapsed: end - start,
        relay,
        verified: intact && relay.success,
    })
}

/// 1 MiB of pseudo-random bytes (xorshift): incompressible, cheap to make.
fn pattern_block() -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut block = Vec::with_capacity(BLOCK);
    while block.len() < BLOCK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        block.extend_from_slice(&x.to_le_bytes());
    }
    block
}

/// Block `i` of the stream is the base block with its first 8 bytes replaced by `i`, so that a
/// lost, repeated or reordered block is detected by a plain comparison.
fn stamp(block: &mut [u8], i: u64) {
    block[..8].copy_from_slice(&i.to_le_bytes());
}

fn write_pattern(target: &Path, size: u64, base: &[u8]) -> anyhow::Result<()> {
    let mut stream =
        UnixStream::connect(target).with_context(|| format!("connect {}", target.display()))?;
    let mut block = base.to_vec();
    let blocks = size / BLOCK as u64;
    for i in 0..blocks {
        stamp(&mut block, i);
        stream.write_all(&block)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Accepts one connection, reads it to the end and compares every block; returns when the
/// stream ended and whether it was exactly the expected bytes.
fn read_and_verify(
    listener: &UnixListener,
    size: u64,
    base: &[u8],
) -> anyhow::Result<(Instant, bool)> {
    let (mut stream, _) = listener.accept()?;
    let mut buf = vec![0u8; BLOCK];
    let mut expected = base.to_vec();
    let mut intact = true;
    let mut i = 0u64;
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            let n = stream.read(&mut buf[filled..])?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        stamp(&mut expected, i);
        if filled < BLOCK || buf != expected {
            intact = false;
        }
        i += 1;
        if filled < BLOCK {
            break;
        }
    }
    let end = Instant::now();
    Ok((end, intact && i * BLOCK as u64 == size))
}
