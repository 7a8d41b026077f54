//! Child processes of the benchmark: started with their output captured, reaped with `wait4` so
//! that their own CPU time and peak memory are known exactly, and killed when dropped.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

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

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map_or(0, |c| c.id() as libc::pid_t)
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
