//! Running the real `qmigrate` binary from tests: one-shot runs with a deadline, and long-lived
//! children that are killed when the test ends, however it ends.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The binary under test.
pub fn qmigrate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qmigrate")
}

/// A `qmigrate` command with the given arguments, killed if its handle is dropped.
pub fn qmigrate<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(qmigrate_bin());
    cmd.args(args).kill_on_drop(true).stdin(Stdio::null());
    cmd
}

/// What a finished `qmigrate` run printed and how it exited.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub what: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Output {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Panics with the whole output unless the run exited with `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code(),
            Some(code),
            "`{}` exited with {:?}, expected {code}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Panics unless the run exited 0.
    pub fn expect_success(&self) -> &Self {
        self.expect_code(0)
    }

    /// The `qmigrate: error: ...` line; panics unless there is exactly one.
    pub fn error_line(&self) -> &str {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("qmigrate: error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "`{}`: expected one error line on stderr, got:\n{}",
            self.what,
            self.stderr
        );
        errors[0]
    }
}

/// Runs `qmigrate ARGS` to its end; panics (killing it) if it takes longer than `deadline`.
pub async fn run<I, S>(args: I, deadline: Duration) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let what = format!(
        "qmigrate {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let child = qmigrate(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`{what}` did not finish within {deadline:?}"))
        .unwrap_or_else(|e| panic!("waiting for `{what}`: {e}"));
    Output {
        what,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A long-lived `qmigrate` child: stdout is read line by line by the test, stderr goes to a
/// file in the test's directory (shown by [`Proc::stderr`] in failure messages). Killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr_path: PathBuf,
}

impl Proc {
    /// Starts `qmigrate ARGS`; `name` names the stderr log in `dir`.
    pub fn spawn<I, S>(name: &str, dir: &Path, args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::spawn_command(name, dir, qmigrate(args))
    }

    /// Starts `PREFIX... qmigrate ARGS` (e.g. `ip netns exec NS`, which execs the binary, so
    /// that the child is still qmigrate itself).
    pub fn spawn_wrapped<I, S>(name: &str, dir: &Path, prefix: &[String], args: I) -> Proc
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let (program, rest) = prefix.split_first().expect("a prefix command");
        let mut cmd = Command::new(program);
        cmd.args(rest)
            .arg(qmigrate_bin())
            .args(args)
            .kill_on_drop(true)
            .stdin(Stdio::null());
        Self::spawn_command(name, dir, cmd)
    }

    fn spawn_command(name: &str, dir: &Path, mut cmd: Command) -> Proc {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = std::fs::File::create(&stderr_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", stderr_path.display()));
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        Proc {
            name: name.to_owned(),
            child,
            stdout: BufReader::new(stdout).lines(),
            stderr_path,
        }
    }

    /// The process id (for signals).
    pub fn pid(&self) -> i32 {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or_else(|| panic!("{} has already been reaped", self.name))
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The next stdout line; panics with its stderr on EOF or after `deadline`.
    pub async fn next_line(&mut self, deadline: Duration) -> String {
        match tokio::time::timeout(deadline, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => panic!(
                "{} closed stdout (exited?) before printing the expected line; stderr:\n{}",
                self.name,
                self.stderr()
            ),
            Ok(Err(e)) => panic!("reading {}'s stdout: {e}", self.name),
            Err(_) => panic!(
                "{} printed nothing for {deadline:?}; stderr:\n{}",
                self.name,
                self.stderr()
            ),
        }
    }

    /// Reads stdout lines until one satisfies `pred`, and returns it.
    pub async fn line_matching(
        &mut self,
        deadline: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            let line = self.next_line(left).await;
            if pred(&line) {
                return line;
            }
        }
    }

    /// Sends a signal (`libc::SIGINT`, `libc::SIGKILL`, ...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.name);
    }

    /// Waits for the process to exit, draining stdout; panics after `deadline`.
    pub async fn wait(&mut self, deadline: Duration) -> (ExitStatus, String) {
        let name = self.name.clone();
        let rest = async {
            let mut rest = String::new();
            while let Ok(Some(line)) = self.stdout.next_line().await {
                rest.push_str(&line);
                rest.push('\n');
            }
            let status = self.child.wait().await;
            (status, rest)
        };
        match tokio::time::timeout(deadline, rest).await {
            Ok((Ok(status), rest)) => (status, rest),
            Ok((Err(e), _)) => panic!("waiting for {name}: {e}"),
            Err(_) => panic!(
                "{name} did not exit within {deadline:?}; stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// Kills it now (SIGKILL) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}
