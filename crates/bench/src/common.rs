//! The flags every benchmark takes, where the qmigrate under test is, and the relays that
//! `relay` and `migrate` put between a source and a destination Unix socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use qmigrate_testkit::child::{self, Proc};

use crate::relay::Cert;

/// Flags shared by `relay`, `migrate` and `save`.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// Repetitions; the variants are interleaved so that machine noise hits all of them alike.
    #[arg(long, default_value_t = 3)]
    pub reps: u32,

    /// The qmigrate binary to measure (default: the one next to this benchmark).
    #[arg(long, value_name = "PATH")]
    pub qmigrate: Option<PathBuf>,

    /// Print the results as one JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl Common {
    /// The qmigrate binary to run; `needed` says whether it must exist (a run of only
    /// socat and direct variants does without).
    pub fn qmigrate_bin(&self, needed: bool) -> anyhow::Result<PathBuf> {
        qmigrate_bin(self.qmigrate.as_deref(), needed)
    }
}

/// `explicit` (a `--qmigrate PATH`), else the qmigrate next to this benchmark; `needed` says
/// whether it must exist.
pub fn qmigrate_bin(explicit: Option<&Path>, needed: bool) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?.with_file_name("qmigrate"),
    };
    if needed && !path.exists() {
        bail!(
            "{} does not exist: build it first (cargo build --release -p qmigrate) or pass --qmigrate PATH",
            path.display()
        );
    }
    Ok(path)
}

/// How long a relay may take to listen.
const READY: Duration = Duration::from_secs(10);

/// Two socats, Unix -> loopback TCP -> Unix: one listening on `source`, one connecting to
/// `dest`; `big_buffers` for `-b 1048576`. Returns once both listen.
pub fn socat_pair(
    dir: &Path,
    socat: &Path,
    source: &Path,
    dest: &Path,
    big_buffers: bool,
) -> anyhow::Result<Vec<Proc>> {
    let buf: Vec<String> = if big_buffers {
        vec!["-b".into(), "1048576".into()]
    } else {
        vec![]
    };
    let port = child::free_port()?;
    let mut a = buf.clone();
    a.push(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"));
    a.push(format!("UNIX-CONNECT:{}", dest.display()));
    let dest_side = Proc::spawn("socat-dest", dir, socat, &a)?;
    child::wait_listening_tcp(port, READY)?;
    let mut a = buf;
    a.push(format!("UNIX-LISTEN:{}", source.display()));
    a.push(format!("TCP:127.0.0.1:{port}"));
    let source_side = Proc::spawn("socat-source", dir, socat, &a)?;
    // The socket file appears at socat's bind, before its listen: wait for the listen.
    child::wait_listening_unix(source, READY)?;
    Ok(vec![dest_side, source_side])
}

/// A qmigrate `tunnel-server --once` on 127.0.0.1:0 for `dest` and a `tunnel-client --once`
/// listening on `source`, over WebSocket if `ws`, over TLS with `tls`'s certificate (pinned by
/// the client) if given. Returns once both printed their ready lines.
pub fn tunnel_pair(
    dir: &Path,
    qmigrate: &Path,
    source: &Path,
    dest: &Path,
    ws: bool,
    tls: Option<&Cert>,
) -> anyhow::Result<Vec<Proc>> {
    let mut a: Vec<String> = vec!["tunnel-server".into()];
    if ws {
        a.push("--ws".into());
    }
    a.extend(["--listen".into(), "127.0.0.1:0".into(), "--once".into()]);
    a.extend(["--socket".into(), dest.display().to_string()]);
    if let Some(tls) = tls {
        a.extend(["--tls-cert".into(), tls.cert.display().to_string()]);
        a.extend(["--tls-key".into(), tls.key.display().to_string()]);
    }
    let mut server = Proc::spawn("tunnel-server", dir, qmigrate, &a)?;
    let line = server.ready_line()?;
    let url = line
        .strip_prefix("listening on ")
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("unexpected ready line from tunnel-server: {line:?}"))?
        .to_owned();
    let mut a: Vec<String> = vec!["tunnel-client".into()];
    if ws {
        a.push("--ws".into());
    }
    a.extend(["--connect".into(), url, "--once".into()]);
    a.extend(["--socket".into(), source.display().to_string()]);
    if let Some(tls) = tls {
        a.extend(["--tls-fingerprint".into(), tls.fingerprint.clone()]);
    }
    let mut client = Proc::spawn("tunnel-client", dir, qmigrate, &a)?;
    client.ready_line()?;
    Ok(vec![server, client])
}

/// Prints that repetition `rep` (from 0) of `reps` of the variant `label` failed, and why.
pub fn rep_failed(rep: u32, reps: u32, label: &str, err: &anyhow::Error) {
    eprintln!("  rep {}/{reps}  {label:<24} failed: {err:#}", rep + 1);
}
