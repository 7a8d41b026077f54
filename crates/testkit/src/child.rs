//! Child processes (the benchmark's relays, QEMUs and qmigrates): started with their output
//! captured, reaped with `wait4` so that their own CPU time and peak memory are known exactly,
//! sampled live from `/proc`, and killed when dropped; and waits for what they listen on,
//! without connecting to it.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::qemu::unix_listening;

/// What a finished child cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Peak resident set size in bytes.
    pub max_rss: u64,
    /// Whether it exited with status 0.
    pub success: bool,
}

/// A running process's open files, memory and CPU time so far, from `/proc/PID`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// Entries of `/proc/PID/fd`.
    pub fds: usize,
    /// `VmRSS` of `/proc/PID/status`, in bytes.
    pub rss: u64,
    /// User plus system CPU time (`/proc/PID/stat`).
    pub cpu: Duration,
}

fn live(pid: libc::pid_t) -> anyhow::Result<Live> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    // The fields after the command name, which is in parentheses and may hold spaces: utime
    // and stime are the 14th and 15th fields of the line, the 12th and 13th after it.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    if ticks.len() != 2 {
        bail!("unexpected /proc/PID/stat: {stat:?}");
    }
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(Live {
        fds,
        rss: rss_kib * 1024,
        cpu: Duration::from_secs_f64((ticks[0] + ticks[1]) as f64 / hz),
    })
}

/// A running child; killed and reaped on drop if not waited for.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    stdout: Option<BufReader<ChildStdout>>,
    log: PathBuf,
}

impl Proc {
    /// Starts `program args...`, stdout piped (for the ready line), stderr to `DIR/NAME.log`.
    pub fn spawn(name: &str, dir: &Path, program: &Path, args: &[String]) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let stderr =
            File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            log,
        })
    }

    /// The first line the child prints on stdout (qmigrate's ready line).
    pub fn ready_line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        let reader = self.stdout.as_mut().context("stdout already taken")?;
        reader.read_line(&mut line)?;
        if line.is_empty() {
            bail!(
                "{} exited before it was ready:\n{}",
                self.name,
                self.log_text()
            );
        }
        Ok(line.trim_end().to_owned())
    }

    /// The child's stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The child's process id (0 once reaped).
    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map_or(0, |c| c.id() as libc::pid_t)
    }

    /// What the running child holds right now, from `/proc` (see [`Live`]).
    pub fn live(&self) -> anyhow::Result<Live> {
        let pid = self.pid();
        if pid == 0 {
            bail!("{} was already reaped", self.name);
        }
        live(pid).with_context(|| format!("reading /proc/{pid} of {}", self.name))
    }

    /// Waits up to `limit` for the child to exit on its own and returns what it cost; kills it
    /// (and reports failure) when it does not.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<Usage> {
        let pid = self.pid();
        if pid == 0 {
            bail!("{} was already reaped", self.name);
        }
        let deadline = Instant::now() + limit;
        let mut killed = false;
        loop {
            let mut status = 0;
            // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: pid is our own unreaped child; status and usage are valid for writes.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                self.child = None;
                let tv = |t: libc::timeval| {
                    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
                };
                return Ok(Usage {
                    cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
                    max_rss: usage.ru_maxrss as u64 * 1024,
                    success: !killed && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                });
            }
            if r < 0 {
                bail!(
                    "wait4 on {}: {}",
                    self.name,
                    std::io::Error::last_os_error()
                );
            }
            if Instant::now() > deadline && !killed {
                // SAFETY: sending a signal to our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP port that was free a moment ago (for socat, which cannot report what it bound).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something listens on 127.0.0.1:`port` without connecting to it (a connection
/// would be taken as the migration stream): reads /proc/net/tcp.
pub fn wait_listening_tcp(port: u16, limit: Duration) -> anyhow::Result<()> {
    let needle = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + limit;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if table.lines().any(|l| {
            l.split_whitespace().nth(1) == Some(&needle)
                && l.split_whitespace().nth(3) == Some("0A")
        }) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until a Unix socket listens at `path` (see [`unix_listening`]) without connecting:
/// QEMU's monitor serves one client at a time.
pub fn wait_listening_unix(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !unix_listening(path) {
        if Instant::now() > deadline {
            bail!("nothing listens on {} after {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Waits until the socket file `path` exists.
pub fn wait_path(path: &Path, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear after {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
