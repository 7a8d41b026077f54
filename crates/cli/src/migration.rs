//! What both ends of a migration must agree on, and the two jobs built on it: preparing the
//! destination ([`prepare_incoming`]) and running the migration on the source
//! ([`run_migration`]).
//!
//! Kept apart from the subcommands so that other front ends (a tunnel server told over its
//! control channel to receive, a one-shot `migrate` command) can do the same jobs with the same
//! checks: these functions take a connected [`Qmp`] and report through [`Progress`], they never
//! print or exit.
//!
//! Saving a VM to a file and restoring it are the same two jobs with a `file:` or `exec:`
//! [`Endpoint`]: the plan then knows it is a [`Stream::File`] or [`Stream::Exec`] (no return
//! path, the guest paused before the save, mapped-ram with multifd), and [`statefile`] checks
//! and writes the state files.

pub mod statefile;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use qmigrate_qmp::probe::{self, MigrationSupport};
use qmigrate_qmp::{
    ConnectOptions, Error as QmpError, MigMode, Migrate, MigrateCancel, MigrateIncoming,
    MigrateSetCapabilities, MigrateSetParameters, MigrateStartPostcopy, MigrationAddress,
    MigrationCapability, MigrationCapabilityStatus, MigrationInfo, MigrationParameters,
    MigrationStatus, MigrationTarget, MultiFdCompression, Qmp, QmpTarget, QueryMigrate,
    QueryMigrateCapabilities, QueryMigrateParameters, QueryStatus, RunState, SocketAddress,
    StatusInfo, Stop,
};
use tracing::{debug, info, warn};

use crate::exit::Exit;
use crate::progress::{Progress, Snapshot, Summary};

/// Effectively no limit: QEMU's own default (128 MiB/s) throttles every migration on a fast
/// link, and 1 TiB/s is well inside what every QEMU accepts for `max-bandwidth`.
pub const UNLIMITED_BANDWIDTH: u64 = 1 << 40;

/// How long a cancelled migration may take to reach `cancelled` before we stop waiting.
const CANCEL_GRACE: Duration = Duration::from_secs(30);

/// How long QEMU may take to restart the source VM itself after a failed or cancelled
/// migration, before we send `cont`.
const RESUME_GRACE: Duration = Duration::from_secs(3);

/// How often the migration is polled with `query-migrate`; events wake us up in between.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Compression of multifd channels; both ends must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// No compression (QEMU's default).
    None,
    /// Slow, small.
    Zlib,
    /// Faster than zlib; the better choice when the link is the bottleneck.
    Zstd,
}

impl Compression {
    /// The `multifd-compression` value.
    pub fn qapi(self) -> MultiFdCompression {
        match self {
            Compression::None => MultiFdCompression::None,
            Compression::Zlib => MultiFdCompression::Zlib,
            Compression::Zstd => MultiFdCompression::Zstd,
        }
    }

    /// QEMU's name for it in `multifd-compression`.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// The migration mode (QEMU's `mode` parameter, QEMU 8.2+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Mode {
    /// An ordinary migration or save.
    #[default]
    Normal,
    /// Save for a restart of QEMU on this host (a host kernel upgrade): with a shared memory
    /// backend and `x-ignore-shared` the guest RAM stays in its backing file instead of the
    /// state file.
    CprReboot,
}

impl Mode {
    /// The `mode` value.
    pub fn qapi(self) -> MigMode {
        match self {
            Mode::Normal => MigMode::Normal,
            Mode::CprReboot => MigMode::CprReboot,
        }
    }
}

/// What carries the migration stream, as far as capabilities and the source's handling care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stream {
    /// A live migration to another QEMU (a socket): with a return path.
    #[default]
    Live,
    /// A state file QEMU writes or reads itself: seekable, so mapped-ram works.
    File,
    /// A command's stdin or stdout: a pipe.
    Exec,
}

/// The capabilities and parameters of one migration, as chosen on the command line.
///
/// The part that must match on both sides (multifd and its channel count, compression,
/// postcopy, mapped-ram, x-ignore-shared) is set by both [`prepare_incoming`] and
/// [`run_migration`]; the rest only matters to the source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationPlan {
    /// What carries the stream; a save or restore when it is not [`Stream::Live`].
    pub stream: Stream,
    /// `mapped-ram` (QEMU 9.0+, [`Stream::File`] only): every page at its own offset in the
    /// file, so multifd channels write and read it in parallel.
    pub mapped_ram: bool,
    /// The `direct-io` parameter (QEMU 9.1+, [`Stream::File`] with mapped-ram and multifd):
    /// the multifd channels open the state file with O_DIRECT, so pages go between guest RAM
    /// and the disk without a copy through the page cache, and a save no longer leaves the
    /// whole file to be flushed afterwards. Only for a file system that takes O_DIRECT (see
    /// [`statefile::can_write_direct`]); a QEMU without the parameter does without it.
    pub direct_io: bool,
    /// `x-ignore-shared`: leave out RAM on a shared memory backend (for `cpr-reboot`).
    pub ignore_shared: bool,
    /// The migration mode; `Normal` unless `--mode` says otherwise.
    pub mode: Mode,
    /// Number of multifd channels, or `None` for the single-stream migration.
    pub multifd: Option<u32>,
    /// Compression of the multifd channels (needs `multifd`).
    pub compression: Option<Compression>,
    /// Enable postcopy (`postcopy-ram`).
    pub postcopy: bool,
    /// Source only: throttle the guest's CPUs when the migration does not converge.
    pub auto_converge: bool,
    /// Source only: `max-bandwidth` in bytes per second; `None` means [`UNLIMITED_BANDWIDTH`].
    pub max_bandwidth: Option<u64>,
    /// Source only: `downtime-limit` in milliseconds; `None` keeps QEMU's (300 ms).
    pub downtime_limit: Option<u64>,
}

/// A combination of flags that cannot work; reported as a usage error before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// `--multifd 0` or more than QEMU's 255 channels.
    #[error("--multifd must be between 1 and 255, not {0}")]
    MultifdChannels(u32),
    /// Compression only exists for multifd channels.
    #[error("--compress needs --multifd N: QEMU compresses multifd channels only")]
    CompressionWithoutMultifd,
    /// QEMU rejects a downtime limit above 2000 s.
    #[error("--downtime-limit must be between 0 and 2000000 ms, not {0}")]
    DowntimeLimit(u64),
    /// Multifd to a file means mapped-ram, which writes each page at its own offset.
    #[error(
        "--multifd cannot be used with exec: multifd channels to or from a file use mapped-ram, \
         which puts every page at its own offset in a seekable file, and a command's stdin or \
         stdout is a pipe; use file:PATH for parallel channels, or drop --multifd"
    )]
    MultifdWithPipe,
    /// mapped-ram stores raw pages at fixed offsets.
    #[error(
        "--compress cannot be used with file: multifd channels to a file use mapped-ram, which \
         stores raw pages at fixed offsets; compress with exec:'zstd -q -o PATH' instead"
    )]
    CompressionToFile,
    /// Postcopy needs a running destination asking for pages.
    #[error(
        "--postcopy needs a running destination QEMU that asks for pages; a save to file: or \
         exec: is precopy only"
    )]
    PostcopyToFile,
    /// cpr-reboot keeps RAM on this host.
    #[error(
        "--mode cpr-reboot restarts QEMU on this host from a saved state: use it with file:PATH \
         (or exec:), not with a live migration"
    )]
    CprRebootLive,
}

impl MigrationPlan {
    /// Checks that the flags make sense together, before QEMU is touched.
    pub fn validate(&self) -> Result<(), PlanError> {
        if let Some(n) = self.multifd {
            if !(1..=255).contains(&n) {
                return Err(PlanError::MultifdChannels(n));
            }
        }
        if self.compression.is_some_and(|c| c != Compression::None) && self.multifd.is_none() {
            return Err(PlanError::CompressionWithoutMultifd);
        }
        if let Some(ms) = self.downtime_limit {
            if ms > 2_000_000 {
                return Err(PlanError::DowntimeLimit(ms));
            }
        }
        match self.stream {
            Stream::Live if self.mode == Mode::CprReboot => return Err(PlanError::CprRebootLive),
            Stream::Live => {}
            Stream::Exec if self.multifd.is_some() => return Err(PlanError::MultifdWithPipe),
            Stream::File | Stream::Exec if self.postcopy => return Err(PlanError::PostcopyToFile),
            Stream::File if self.compression.is_some_and(|c| c != Compression::None) => {
                return Err(PlanError::CompressionToFile)
            }
            Stream::File | Stream::Exec => {}
        }
        Ok(())
    }

    /// True for a save or restore ([`Stream::File`] or [`Stream::Exec`]).
    pub fn is_save(&self) -> bool {
        self.stream != Stream::Live
    }

    /// The capabilities that both QEMUs must agree on, set to exactly what this plan wants
    /// (so that a leftover from an earlier run cannot make the two sides disagree).
    fn shared_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        vec![
            cap(MigrationCapability::Events, true),
            cap(MigrationCapability::Multifd, self.multifd.is_some()),
            cap(MigrationCapability::PostcopyRam, self.postcopy),
            // The return path lets the destination tell the source how loading ended: with it
            // the source reports `completed` only after the destination has loaded everything
            // (not when the last byte left for the tunnel), and postcopy needs it for page
            // requests. A file or a command has no way back: QEMU fails the save at its end
            // ("Unable to read from file") if it is on.
            cap(MigrationCapability::ReturnPath, self.stream == Stream::Live),
            cap(MigrationCapability::MappedRam, self.mapped_ram),
            cap(MigrationCapability::XIgnoreShared, self.ignore_shared),
        ]
    }

    /// Capabilities for the destination QEMU.
    pub fn destination_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        self.shared_capabilities()
    }

    /// Capabilities for the source QEMU.
    pub fn source_capabilities(&self) -> Vec<MigrationCapabilityStatus> {
        let mut caps = self.shared_capabilities();
        caps.push(cap(MigrationCapability::AutoConverge, self.auto_converge));
        caps
    }

    /// Parameters for the destination QEMU: only what must match the source.
    pub fn destination_parameters(&self) -> MigrateSetParameters {
        let mut params = MigrateSetParameters {
            mode: Some(self.mode.qapi()),
            ..MigrateSetParameters::default()
        };
        if let Some(n) = self.multifd {
            params.multifd_channels = Some(u64::from(n));
            params.multifd_compression = Some(self.compression.unwrap_or(Compression::None).qapi());
        }
        if self.stream == Stream::File {
            // Off as well as on, so that a leftover from an earlier save cannot point O_DIRECT
            // at a file system that refuses it.
            params.direct_io = Some(self.direct_io);
        }
        params
    }

    /// Parameters for the source QEMU.
    pub fn source_parameters(&self) -> MigrateSetParameters {
        let mut params = self.destination_parameters();
        params.max_bandwidth = Some(self.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH));
        params.downtime_limit = self.downtime_limit;
        if self.postcopy {
            // 0 is "unlimited" here (unlike max-bandwidth): once the guest runs on the
            // destination, every missing page stalls it.
            params.max_postcopy_bandwidth = Some(0);
        }
        params
    }

    /// A short description for messages: `multifd 4 (zstd), postcopy on` for a live migration,
    /// `multifd 4, mapped-ram` for a save.
    pub fn describe(&self) -> String {
        let multifd = match (self.multifd, self.compression) {
            (None, _) => "single channel".to_owned(),
            (Some(n), None | Some(Compression::None)) => format!("multifd {n}"),
            (Some(n), Some(c)) => format!("multifd {n} ({})", c.qemu_name()),
        };
        if !self.is_save() {
            let postcopy = if self.postcopy { "on" } else { "off" };
            return format!("{multifd}, postcopy {postcopy}");
        }
        let mut text = multifd;
        if self.mapped_ram {
            text.push_str(", mapped-ram");
        }
        if self.direct_io {
            text.push_str(", direct-io");
        }
        if self.mode == Mode::CprReboot {
            text.push_str(", mode cpr-reboot");
        }
        if self.ignore_shared {
            text.push_str(", x-ignore-shared");
        }
        text
    }
}

fn cap(capability: MigrationCapability, state: bool) -> MigrationCapabilityStatus {
    MigrationCapabilityStatus { capability, state }
}

/// Where the migration stream goes: the tunnel's Unix socket, a state file, a command, or any
/// other legacy QEMU URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket: QEMU listens on it (destination) or connects to it (source).
    Socket(PathBuf),
    /// `file:PATH[,offset=N]`: QEMU writes (save) or reads (restore) the file itself.
    File {
        /// The file, absolute (QEMU's working directory is not ours).
        path: PathBuf,
        /// Where the stream starts in the file.
        offset: u64,
    },
    /// `exec:CMD`: QEMU runs the command and writes the stream to its stdin (save) or reads it
    /// from its stdout (restore).
    Exec(String),
    /// Any other legacy migration URI (`tcp:HOST:PORT`, `unix:PATH`, `fd:NAME`, ...).
    Uri(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Socket(path) => write!(f, "unix:{}", path.display()),
            Endpoint::File { path, offset: 0 } => write!(f, "file:{}", path.display()),
            Endpoint::File { path, offset } => {
                write!(f, "file:{},offset={offset}", path.display())
            }
            Endpoint::Exec(command) => write!(f, "exec:{command}"),
            Endpoint::Uri(uri) => f.write_str(uri),
        }
    }
}

/// Which way the stream flows, where a transport differs between the sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `migrate`: the source sends (or saves).
    Outgoing,
    /// `migrate-incoming`: the destination receives (or restores).
    Incoming,
}

impl Endpoint {
    /// The endpoint for a URI given on the command line: `file:` and `exec:` become
    /// [`Endpoint::File`] and [`Endpoint::Exec`] (a relative file name is taken from our working
    /// directory, not QEMU's), anything else stays a URI for QEMU.
    pub fn from_uri(uri: &str) -> Endpoint {
        match MigrationAddress::parse_uri(uri) {
            Ok(MigrationAddress::File { filename, offset }) => {
                let path = PathBuf::from(filename);
                let path = if path.is_absolute() {
                    path
                } else {
                    std::env::current_dir().map_or(path.clone(), |cwd| cwd.join(&path))
                };
                Endpoint::File { path, offset }
            }
            Ok(MigrationAddress::Exec { .. }) => match uri.strip_prefix("exec:") {
                Some(command) => Endpoint::Exec(command.to_owned()),
                None => Endpoint::Uri(uri.to_owned()),
            },
            _ => Endpoint::Uri(uri.to_owned()),
        }
    }

    /// What kind of stream this is: a save/restore for `file:` and `exec:`.
    pub fn stream(&self) -> Stream {
        match self {
            Endpoint::File { .. } => Stream::File,
            Endpoint::Exec(_) => Stream::Exec,
            Endpoint::Socket(_) | Endpoint::Uri(_) => Stream::Live,
        }
    }

    /// The typed address, or `None` for a URI our parser does not know (which QEMU may still).
    fn address(&self) -> Option<MigrationAddress> {
        match self {
            Endpoint::Socket(path) => Some(MigrationAddress::Socket(SocketAddress::Unix {
                path: path.display().to_string(),
            })),
            Endpoint::File { path, offset } => Some(MigrationAddress::File {
                filename: path.display().to_string(),
                offset: *offset,
            }),
            Endpoint::Exec(_) => None,
            Endpoint::Uri(uri) => match MigrationAddress::parse_uri(uri) {
                Ok(address) => Some(address),
                Err(err) => {
                    debug!(%uri, %err, "passing the URI to QEMU as is");
                    None
                }
            },
        }
    }

    /// The argument for `migrate`/`migrate-incoming`: the typed `channels` when this QEMU has
    /// them (8.2+, see [`probe::migration_support`]), the `uri` string otherwise. `direction`
    /// matters only for a file on a QEMU without the file transport. Says at info level how
    /// QEMU is told, for `file:` and `exec:`.
    pub fn target_for(
        &self,
        qmp: &Qmp,
        support: &MigrationSupport,
        direction: Direction,
    ) -> anyhow::Result<MigrationTarget> {
        let channels = support.channels;
        debug!(use_channels = channels, "migration argument style");
        let version = qmp.greeting().version.qemu;
        match self {
            Endpoint::File { path, offset } if !channels && !version.at_least(8, 2, 0) => {
                // QEMU before 8.2 has no file transport; `cat` through its exec transport
                // writes and reads the same stream.
                if *offset != 0 {
                    bail!(
                        "QEMU {version} has no file transport (8.2+), and file:PATH,offset=N \
                         cannot be emulated with exec:cat: save without offset"
                    );
                }
                let quoted = shell_quote(&path.display().to_string());
                let uri = match direction {
                    Direction::Outgoing => format!("exec:cat > {quoted}"),
                    Direction::Incoming => format!("exec:cat {quoted}"),
                };
                info!("QEMU {version} has no file transport (8.2+): using the legacy URI {uri}");
                Ok(MigrationTarget::Uri(uri))
            }
            Endpoint::Exec(command) => {
                let args = exec_args(command)?;
                if channels {
                    info!(?args, "exec: QEMU's typed exec transport (argv, no shell)");
                    Ok(MigrationTarget::from_address(
                        MigrationAddress::Exec { args },
                        true,
                    ))
                } else {
                    info!("exec: the legacy URI exec:{command} (QEMU runs it with /bin/sh -c)");
                    Ok(MigrationTarget::Uri(format!("exec:{command}")))
                }
            }
            _ => {
                let target = match self.address() {
                    Some(address) => MigrationTarget::from_address(address, channels),
                    None => MigrationTarget::Uri(self.to_string()),
                };
                if let Endpoint::File { .. } = self {
                    match &target {
                        MigrationTarget::Channels(_) => {
                            info!("file: QEMU's typed file transport ({self})")
                        }
                        MigrationTarget::Uri(uri) => info!("file: the legacy URI {uri}"),
                    }
                }
                Ok(target)
            }
        }
    }
}

/// The argv for the typed exec transport, which runs it without a shell and without a `PATH`
/// search: a simple command is split into words (see [`qmigrate_qmp::split_command`]) and its
/// program looked up on our `PATH`; anything that needs a shell (redirections, pipes,
/// variables) runs as `/bin/sh -c COMMAND`, exactly as QEMU runs an `exec:` URI.
pub fn exec_args(command: &str) -> anyhow::Result<Vec<String>> {
    let shell = || vec!["/bin/sh".into(), "-c".into(), command.to_owned()];
    let Some(mut words) = qmigrate_qmp::split_command(command) else {
        return Ok(shell());
    };
    let Some(first) = words.first_mut() else {
        return Ok(shell());
    };
    let program = find_program(first).with_context(|| format!("exec:{command}"))?;
    *first = program.display().to_string();
    Ok(words)
}

/// An executable file: `name` itself when it has a `/` (made absolute), else the first match
/// on `PATH`.
fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let is_executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let path = PathBuf::from(name);
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .context("cannot resolve a relative program path")?
                .join(path)
        };
        if !is_executable(&path) {
            bail!("{} is not an executable file", path.display());
        }
        return Ok(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| anyhow!("program {name:?} not found on PATH"))
}

/// `s` in single quotes for `/bin/sh` (a `'` inside becomes `'\''`).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Connects to QEMU's QMP socket (a path, or `tcp:HOST:PORT`), with an operator-readable error
/// marked [`Exit::QmpUnreachable`] when there is no QEMU to talk to.
pub async fn connect_qmp(qmp: &str) -> anyhow::Result<Qmp> {
    let Ok(target) = qmp.parse::<QmpTarget>();
    if let QmpTarget::Unix(path) = &target {
        check_qmp_path(path).context(Exit::QmpUnreachable)?;
    }
    match Qmp::connect(&target, &ConnectOptions::default()).await {
        Ok(qmp) => {
            let v = &qmp.greeting().version.qemu;
            debug!(qemu = %format!("{}.{}.{}", v.major, v.minor, v.micro), "connected to QMP");
            Ok(qmp)
        }
        Err(err) if err.is_unreachable() => Err(anyhow!(err).context(Exit::QmpUnreachable)),
        Err(err) => Err(anyhow!(err).context(format!("QMP handshake on {qmp} failed"))),
    }
}

/// Turns the common mistakes (typo in the path, QEMU not started, wrong file) into one line
/// that says what to do, instead of a bare `ENOENT`.
fn check_qmp_path(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "{shown} does not exist (is QEMU running with -qmp unix:{shown},server=on,wait=off?)"
        ),
        Err(err) => bail!("{shown}: {err}"),
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(meta) => {
            let kind = if meta.is_dir() {
                "a directory"
            } else if meta.is_file() {
                "a regular file"
            } else {
                "not a socket"
            };
            bail!(
                "{shown} is {kind}, not a socket (pass the PATH of QEMU's -qmp unix:PATH,server=on,wait=off)"
            )
        }
    }
}

/// Checks that a Unix socket we are about to hand to QEMU exists, so that a tunnel client
/// that is not running is reported by us and not as a connect error deep in QEMU.
pub fn check_migration_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt as _;
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "migration socket {shown} does not exist: start `qmigrate tunnel-client --socket {shown}` first"
        ),
        Err(err) => bail!("migration socket {shown}: {err}"),
        Ok(meta) if meta.file_type().is_socket() => Ok(()),
        Ok(_) => bail!("migration socket {shown} is not a socket"),
    }
}

/// Fits the capabilities a plan wants to what this QEMU has (`known`, from
/// `query-migrate-capabilities`): one it lacks is left out when it is to be off, and an error
/// naming the QEMU version that has it when it is to be on.
fn fit_capabilities(
    wanted: Vec<MigrationCapabilityStatus>,
    known: &[MigrationCapabilityStatus],
    qemu: &str,
) -> anyhow::Result<Vec<MigrationCapabilityStatus>> {
    let mut fitted = Vec::with_capacity(wanted.len());
    for want in wanted {
        if known.iter().any(|k| k.capability == want.capability) {
            fitted.push(want);
        } else if want.state {
            let since = match want.capability {
                MigrationCapability::MappedRam => " (QEMU 9.0+; needed for --multifd with file:)",
                _ => "",
            };
            bail!(
                "QEMU {qemu} does not have the migration capability {}{since}",
                want.capability
            );
        }
    }
    Ok(fitted)
}

/// Fits the parameters a plan wants to what this QEMU has (`current`, from
/// `query-migrate-parameters`): `mode` exists since QEMU 8.2 and is only sent where it does;
/// `direct-io` (9.1+) is a speed-up only, left out where QEMU lacks it.
fn fit_parameters(
    mut wanted: MigrateSetParameters,
    current: &MigrationParameters,
    qemu: &str,
) -> anyhow::Result<MigrateSetParameters> {
    if current.mode.is_none() {
        match wanted.mode.take() {
            Some(MigMode::Normal) | None => {}
            Some(mode) => bail!("QEMU {qemu} has no migration modes (8.2+), so no mode {mode}"),
        }
    }
    if current.direct_io.is_none() && wanted.direct_io.take() == Some(true) {
        info!("QEMU {qemu} has no direct-io (9.1+): mapped-ram goes through the page cache");
    }
    Ok(wanted)
}

/// The QEMU version from the greeting, for messages.
fn qemu_version(qmp: &Qmp) -> String {
    qmp.greeting().version.qemu.to_string()
}

/// Sets capabilities, with a hint when this QEMU lacks one we need.
async fn set_capabilities(qmp: &Qmp, wanted: Vec<MigrationCapabilityStatus>) -> anyhow::Result<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = wanted
        .iter()
        .map(|c| format!("{:?}={}", c.capability, c.state))
        .collect();
    qmp.execute(&MigrateSetCapabilities {
        capabilities: wanted,
    })
    .await
    .with_context(|| format!("QEMU refused the capabilities {}", names.join(", ")))?;
    Ok(())
}

async fn query_status(qmp: &Qmp) -> anyhow::Result<StatusInfo> {
    qmp.execute(&QueryStatus)
        .await
        .context("query-status failed")
}

async fn query_migrate(qmp: &Qmp) -> anyhow::Result<MigrationInfo> {
    qmp.execute(&QueryMigrate)
        .await
        .context("query-migrate failed")
}

fn status_of(info: &MigrationInfo) -> MigrationStatus {
    info.status.unwrap_or(MigrationStatus::None)
}

/// Fails, saying how to fix it, unless the destination QEMU waits for an incoming migration
/// that nothing has started yet (`-incoming defer`, no `migrate-incoming` so far).
pub async fn check_waiting_for_incoming(qmp: &Qmp) -> anyhow::Result<()> {
    let status = query_status(qmp).await?;
    if status.status != RunState::InMigrate {
        bail!(
            "destination QEMU is not waiting for an incoming migration (its state is {}): \
             start it with -incoming defer and the same machine options as the source",
            run_state_name(&status.status)
        );
    }
    let migration = status_of(&query_migrate(qmp).await?);
    match migration {
        MigrationStatus::None => {}
        MigrationStatus::Setup => bail!(
            "destination QEMU already listens for a migration (an earlier `receive`, or started \
             with -incoming URI): restart it with -incoming defer so that qmigrate sets the \
             socket and capabilities"
        ),
        other => bail!(
            "an incoming migration already ran on the destination QEMU (status {}): restart it \
             with -incoming defer",
            migration_status_name(&other)
        ),
    }
    Ok(())
}

/// What [`prepare_incoming`] set up.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Where QEMU listens, as the operator would write it.
    pub endpoint: String,
    /// Whether the typed `channels` argument was used (else the legacy `uri`).
    pub channels: bool,
    /// Whether QEMU stays up when the incoming migration fails (`exit-on-error: false`), so
    /// that [`follow_incoming`] can read its reason; else it exits, QEMU's default.
    pub stays_on_error: bool,
}

/// Prepares a destination QEMU started with `-incoming defer`: checks its state, sets the
/// capabilities and parameters that must match the source, and makes it listen on `endpoint`
/// (for a `file:` or `exec:` restore: start loading).
///
/// With `stay_on_error`, asks QEMU (9.1+; older ones ignore the wish) not to exit when the
/// incoming migration fails, so its reason can be reported: meant for a caller that follows
/// the migration to its end.
///
/// Returns once QEMU listens. Fails (before changing anything) when QEMU is not waiting for an
/// incoming migration, saying how to start it instead.
pub async fn prepare_incoming(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &Endpoint,
    stay_on_error: bool,
) -> anyhow::Result<Incoming> {
    check_waiting_for_incoming(qmp).await?;

    let qemu = qemu_version(qmp);
    let known = qmp
        .execute(&QueryMigrateCapabilities)
        .await
        .context("query-migrate-capabilities failed")?;
    set_capabilities(
        qmp,
        fit_capabilities(plan.destination_capabilities(), &known, &qemu)?,
    )
    .await?;
    let current = qmp
        .execute(&QueryMigrateParameters)
        .await
        .context("query-migrate-parameters failed")?;
    let params = fit_parameters(plan.destination_parameters(), &current, &qemu)?;
    if params != MigrateSetParameters::default() {
        qmp.execute(&params)
            .await
            .context("QEMU refused the migration parameters")?;
    }

    let support = probe::migration_support(qmp)
        .await
        .context("cannot ask QEMU which migration arguments it supports")?;
    let target = endpoint.target_for(qmp, &support, Direction::Incoming)?;
    let channels = matches!(target, MigrationTarget::Channels(_));
    let stays_on_error = stay_on_error && support.incoming_exit_on_error;
    let mut incoming = MigrateIncoming::new(target);
    if stays_on_error {
        incoming = incoming.exit_on_error(false);
    }
    qmp.execute(&incoming)
        .await
        .with_context(|| format!("migrate-incoming on {endpoint} failed"))?;
    let now = status_of(&query_migrate(qmp).await?);
    debug!(
        status = migration_status_name(&now),
        "after migrate-incoming"
    );
    Ok(Incoming {
        endpoint: endpoint.to_string(),
        channels,
        stays_on_error,
    })
}

/// How an incoming migration ended, as seen on the destination.
#[derive(Debug, Clone)]
pub struct IncomingOutcome {
    /// The final migration status (`completed` or `failed`).
    pub status: MigrationStatus,
    /// The VM's state afterwards.
    pub run_state: RunState,
    /// QEMU's `error-desc` when it failed.
    pub error: Option<String>,
    /// Whether `cont` was sent.
    pub started: bool,
}

/// Follows an incoming migration prepared by [`prepare_incoming`] to its end; with `start`,
/// sends `cont` afterwards when the destination VM is paused (QEMU started with `-S`).
///
/// A destination QEMU exits when an incoming migration fails (its default), so a lost QMP
/// connection is reported as that.
pub async fn follow_incoming(qmp: &Qmp, start: bool) -> anyhow::Result<IncomingOutcome> {
    let mut events = qmp.events();
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut last = MigrationStatus::None;
    let info = loop {
        tokio::select! {
            event = events.recv() => if let Ok(event) = event {
                debug!(event = %event.event, data = %event.data, "QMP event");
            },
            _ = poll.tick() => {}
        }
        let info = match qmp.execute(&QueryMigrate).await {
            Ok(info) => info,
            Err(QmpError::Disconnected) => bail!(
                "destination QEMU closed its QMP socket during the migration (it exits when an \
                 incoming migration fails; see its log)"
            ),
            Err(err) => return Err(anyhow!(err).context("query-migrate failed")),
        };
        let status = status_of(&info);
        if status != last {
            info!(
                status = migration_status_name(&status),
                "incoming migration"
            );
            last = status;
        }
        if matches!(
            status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        ) {
            break info;
        }
    };
    let status = status_of(&info);
    let mut run_state = query_status(qmp).await?;
    let mut started = false;
    if status == MigrationStatus::Completed && start && !run_state.running {
        qmp.execute(&qmigrate_qmp::Cont)
            .await
            .context("cont on the destination failed")?;
        started = true;
        run_state = query_status(qmp).await?;
    }
    Ok(IncomingOutcome {
        status,
        run_state: run_state.status,
        error: info.error_desc,
        started,
    })
}

/// What the source VM was doing before the migration, recorded by [`preflight_source`].
#[derive(Debug, Clone)]
pub struct SourceState {
    /// Whether the guest was running (rather than paused): only then may we `cont` it after a
    /// migration that did not complete.
    pub was_running: bool,
    /// The QEMU version, for messages.
    pub qemu: String,
}

/// Checks that the source VM can be migrated now: running or paused, no migration underway.
pub async fn preflight_source(qmp: &Qmp) -> anyhow::Result<SourceState> {
    let v = &qmp.greeting().version.qemu;
    let qemu = format!("{}.{}.{}", v.major, v.minor, v.micro);
    let status = query_status(qmp).await?;
    match status.status {
        RunState::Running | RunState::Paused => {}
        RunState::Postmigrate => bail!(
            "the source VM has already been migrated away or saved (state postmigrate); its \
             guest now runs on the destination, or waits in the saved state to be restored"
        ),
        RunState::InMigrate => bail!(
            "this QEMU is waiting for an incoming migration (state inmigrate): it is a \
             destination, use `qmigrate receive` on it"
        ),
        ref other => bail!(
            "the source VM must be running or paused to migrate, but its state is {}",
            run_state_name(other)
        ),
    }
    let migration = status_of(&query_migrate(qmp).await?);
    if is_underway(&migration) {
        bail!(
            "a migration is already underway on the source QEMU (status {})",
            migration_status_name(&migration)
        );
    }
    Ok(SourceState {
        was_running: status.running,
        qemu,
    })
}

fn is_underway(status: &MigrationStatus) -> bool {
    !matches!(
        status,
        MigrationStatus::None
            | MigrationStatus::Completed
            | MigrationStatus::Failed
            | MigrationStatus::Cancelled
    )
}

/// How [`run_migration`] should follow the migration.
#[derive(Debug, Clone, Default)]
pub struct FollowOptions {
    /// With postcopy: switch after this many completed precopy passes (0: at once).
    pub postcopy_after: Option<u64>,
    /// Return as soon as QEMU reports `setup`/`active`, without following.
    pub detach: bool,
}

/// How a migration ended on the source.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// QEMU reported `completed`: the guest runs on the destination.
    Completed,
    /// QEMU reported `failed`, with its `error-desc`.
    Failed(String),
    /// We cancelled it (signal, timeout, caller); the reason.
    Cancelled(String),
    /// The connection broke during postcopy: QEMU waits for a recovery (`migrate` with
    /// `resume`), the guest's state is split between the hosts and neither side can run alone.
    PostcopyPaused(String),
    /// `detach`: the migration was started and left running, in this status.
    Detached(MigrationStatus),
}

/// Runs a migration on the source whose state [`preflight_source`] checked: sets the plan's
/// capabilities and parameters, starts `migrate`, follows it by events and `query-migrate`
/// (reporting to `progress`) and returns how it ended.
///
/// When `cancel` resolves (with the reason, e.g. `interrupted by SIGINT`) the migration is
/// cancelled. Whenever it does not complete, the source VM is left running if it was running
/// before (QEMU restarts it itself; we `cont` only if it did not). The capabilities changed here
/// are restored afterwards, except with `detach` (the migration still needs them).
///
/// A save ([`MigrationPlan::is_save`]) pauses a running guest before `migrate` (except in
/// cpr-reboot mode, where QEMU does) and leaves it paused (`postmigrate`) once completed; a
/// save that does not complete resumes it. Writing the state file safely is the caller's job
/// (see [`statefile::Partial`]).
pub async fn run_migration(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &Endpoint,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    cancel: impl Future<Output = String>,
) -> anyhow::Result<Summary> {
    let qemu = qemu_version(qmp);
    let before = qmp
        .execute(&QueryMigrateCapabilities)
        .await
        .context("query-migrate-capabilities failed")?;
    let wanted = fit_capabilities(plan.source_capabilities(), &before, &qemu)?;
    let restore: Vec<MigrationCapabilityStatus> = wanted
        .iter()
        .filter_map(|want| {
            let was = before
                .iter()
                .find(|c| c.capability == want.capability)
                .is_some_and(|c| c.state);
            (was != want.state).then(|| cap(want.capability, was))
        })
        .collect();
    let before_params = qmp
        .execute(&QueryMigrateParameters)
        .await
        .context("query-migrate-parameters failed")?;
    let params = fit_parameters(plan.source_parameters(), &before_params, &qemu)?;
    let restore_params = parameters_to_restore(&params, &before_params);
    let support = probe::migration_support(qmp)
        .await
        .context("cannot ask QEMU which migration arguments it supports")?;
    let target = endpoint.target_for(qmp, &support, Direction::Outgoing)?;
    set_capabilities(qmp, wanted).await?;
    let set_params = qmp
        .execute(&params)
        .await
        .context("QEMU refused the migration parameters");
    if let Err(err) = set_params {
        restore_settings(qmp, restore, restore_params).await;
        return Err(err);
    }

    // A state saved while the guest runs is only consistent at QEMU's final pass, and every
    // page the guest dirties meanwhile is written again; paused, each page is written once. In
    // cpr-reboot mode QEMU pauses the guest at once itself, and records that it was running,
    // so that the restored guest resumes.
    let pause = plan.is_save() && plan.mode != Mode::CprReboot && source.was_running;
    if pause {
        if let Err(err) = qmp.execute(&Stop).await {
            restore_settings(qmp, restore, restore_params).await;
            return Err(anyhow!(err).context("cannot pause the guest for the save (stop failed)"));
        }
        progress.note("guest paused for the save");
    }
    // QEMU restarts a guest that was running when a migration fails by itself; one we paused
    // is ours to restart, at once.
    let resume_grace = if pause { Duration::ZERO } else { RESUME_GRACE };
    let result = migrate_and_follow(
        qmp,
        plan,
        endpoint,
        target,
        source,
        opts,
        progress,
        resume_grace,
        cancel,
    )
    .await;
    if pause && result.is_err() {
        if let Err(err) = ensure_source_running(qmp, source, progress, resume_grace).await {
            warn!("after the failed save: {err:#}");
        }
    }

    if matches!(
        result,
        Ok(Summary {
            outcome: Outcome::Detached(_) | Outcome::PostcopyPaused(_),
            ..
        })
    ) {
        // QEMU refuses capability changes while a migration is underway, and this one is.
        return result;
    }
    restore_settings(qmp, restore, restore_params).await;
    result
}

/// For each parameter that `set` changes, its value in `before`: what to set back afterwards so
/// that the source's settings are as we found them (as libvirt does).
fn parameters_to_restore(
    set: &MigrateSetParameters,
    before: &MigrationParameters,
) -> MigrateSetParameters {
    MigrateSetParameters {
        max_bandwidth: set.max_bandwidth.and(before.max_bandwidth),
        downtime_limit: set.downtime_limit.and(before.downtime_limit),
        multifd_channels: set.multifd_channels.and(before.multifd_channels),
        multifd_compression: set.multifd_compression.and(before.multifd_compression),
        max_postcopy_bandwidth: set
            .max_postcopy_bandwidth
            .and(before.max_postcopy_bandwidth),
        mode: set.mode.and(before.mode),
        direct_io: set.direct_io.and(before.direct_io),
        ..MigrateSetParameters::default()
    }
}

/// Sets back the capabilities and parameters we changed; a failure is only worth a warning,
/// the migration's outcome is what the caller reports.
async fn restore_settings(
    qmp: &Qmp,
    capabilities: Vec<MigrationCapabilityStatus>,
    params: MigrateSetParameters,
) {
    wait_for_cleanup(qmp).await;
    if let Err(err) = set_capabilities(qmp, capabilities).await {
        warn!("could not restore the source's migration capabilities: {err:#}");
    }
    if params != MigrateSetParameters::default() {
        if let Err(err) = qmp.execute(&params).await {
            warn!("could not restore the source's migration parameters: {err}");
        }
    }
}

/// Waits (at most 5 s) until QEMU has torn the finished migration down.
///
/// QEMU reports `completed` before its cleanup has run, and that cleanup reads the
/// capabilities: with `multifd` switched off under it, QEMU 10 skips closing the multifd
/// channels and then aborts on a yank assertion, killing the source VM (seen here about one
/// multifd migration in three). The migration's yank instance is the last thing the cleanup
/// removes, so its absence from `query-yank` tells it is over.
async fn wait_for_cleanup(qmp: &Qmp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match qmp.execute(&qmigrate_qmp::QueryYank).await {
            Ok(instances) if instances.iter().all(|i| i.kind != "migration") => return,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(_) => {
                warn!("QEMU has not finished cleaning up the migration after 5 s");
                return;
            }
            Err(err) => {
                debug!(%err, "query-yank failed; restoring the settings without waiting");
                return;
            }
        }
    }
}

#[allow(clippy::too_many_arguments)] // the one caller passes its own arguments on
async fn migrate_and_follow(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &Endpoint,
    target: MigrationTarget,
    source: &SourceState,
    opts: &FollowOptions,
    progress: &mut dyn Progress,
    resume_grace: Duration,
    cancel: impl Future<Output = String>,
) -> anyhow::Result<Summary> {
    let mut events = qmp.events();
    let started = Instant::now();
    qmp.execute(&Migrate::new(target))
        .await
        .with_context(|| format!("QEMU refused to start the migration to {endpoint}"))?;
    debug!(%endpoint, plan = %plan.describe(), "migration started");

    let mut cancel = pin!(cancel);
    let mut cancelling = Cancelling::No;
    let mut postcopy_requested = false;
    let mut last_status = MigrationStatus::None;
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    let mut events_alive = true;
    // QEMU drops the RAM statistics once a migration is cancelled or failed; the summary uses
    // the last ones it reported.
    let mut last_ram = None;

    let mut info = loop {
        tokio::select! {
            reason = &mut cancel, if cancelling == Cancelling::No => {
                cancelling = cancel_migration(qmp, &last_status, reason, progress).await;
            }
            event = events.recv(), if events_alive => match event {
                Ok(event) => debug!(event = %event.event, data = %event.data, "QMP event"),
                Err(QmpError::Disconnected) => events_alive = false,
                Err(err) => debug!("event stream: {err}"),
            },
            _ = poll.tick() => {}
        }
        let info = match qmp.execute(&QueryMigrate).await {
            Ok(info) => info,
            Err(QmpError::Disconnected) => {
                bail!("the source QEMU closed its QMP socket during the migration (did it exit?)")
            }
            Err(err) => return Err(anyhow!(err).context("query-migrate failed")),
        };
        let status = status_of(&info);
        if status != last_status {
            debug!(status = migration_status_name(&status), "migration status");
            last_status = status;
        }
        progress.tick(&Snapshot::new(&info, started.elapsed()));
        if info.ram.is_some() {
            last_ram.clone_from(&info.ram);
        }

        if opts.detach && !status.is_terminal() {
            return Ok(Summary::from_info(&info, Outcome::Detached(status), false));
        }
        if let (Some(after), false, MigrationStatus::Active, Cancelling::No) = (
            opts.postcopy_after,
            postcopy_requested,
            &status,
            &cancelling,
        ) {
            let passes = info
                .ram
                .as_ref()
                .and_then(|ram| ram.dirty_sync_count)
                .unwrap_or(0);
            // QEMU counts the bitmap sync that starts pass N+1 as "pass N+1", so N passes are
            // complete once the count exceeds N (libvirt switches at the same point).
            if plan.postcopy && passes > after {
                progress.note(&format!(
                    "switching to postcopy after {} precopy pass(es)",
                    passes.saturating_sub(1)
                ));
                qmp.execute(&MigrateStartPostcopy)
                    .await
                    .context("migrate-start-postcopy failed")?;
                postcopy_requested = true;
            }
        }
        if status == MigrationStatus::PostcopyPaused {
            let reason = info
                .error_desc
                .clone()
                .unwrap_or_else(|| "the connection broke during postcopy".to_owned());
            return Ok(Summary::from_info(
                &info,
                Outcome::PostcopyPaused(reason),
                postcopy_requested,
            ));
        }
        if status.is_terminal() {
            break info;
        }
        if let Cancelling::Requested { deadline, .. } = &cancelling {
            if Instant::now() > *deadline {
                bail!(
                    "QEMU did not cancel the migration within {}s (status {})",
                    CANCEL_GRACE.as_secs(),
                    migration_status_name(&status)
                );
            }
        }
    };

    if info.ram.is_none() {
        info.ram = last_ram;
    }
    if info.total_time.is_none() {
        info.total_time = u64::try_from(started.elapsed().as_millis()).ok();
    }
    let status = status_of(&info);
    let error = info
        .error_desc
        .clone()
        .unwrap_or_else(|| format!("QEMU reports {}", migration_status_name(&status)));
    let outcome = match (status, cancelling) {
        (MigrationStatus::Completed, _) => Outcome::Completed,
        (MigrationStatus::Cancelled, Cancelling::Requested { reason, .. }) => {
            Outcome::Cancelled(reason)
        }
        (MigrationStatus::Cancelled, _) => {
            Outcome::Cancelled("cancelled by another QMP client".to_owned())
        }
        // Cancelling tears the connection down; with the return path QEMU sometimes sees that
        // error first and ends the migration as failed. It still ended because we asked.
        (_, Cancelling::Requested { reason, .. }) => {
            Outcome::Cancelled(format!("{reason} (QEMU ended it as failed: {error})"))
        }
        _ => Outcome::Failed(error),
    };
    if outcome != Outcome::Completed {
        ensure_source_running(qmp, source, progress, resume_grace).await?;
    }
    Ok(Summary::from_info(&info, outcome, postcopy_requested))
}

/// Where a cancellation request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cancelling {
    /// Nobody asked.
    No,
    /// `migrate_cancel` was sent for this reason; QEMU should reach `cancelled` by `deadline`.
    Requested { reason: String, deadline: Instant },
    /// It was asked for during postcopy, where there is nothing left to cancel to.
    Refused,
}

/// Sends `migrate_cancel`, except in postcopy: the guest already runs on the destination there
/// and the source has no complete state to fall back to.
async fn cancel_migration(
    qmp: &Qmp,
    status: &MigrationStatus,
    reason: String,
    progress: &mut dyn Progress,
) -> Cancelling {
    if *status == MigrationStatus::PostcopyActive {
        progress.note(&format!(
            "{reason}: postcopy cannot be cancelled (the guest already runs on the destination); \
             waiting for it to complete"
        ));
        return Cancelling::Refused;
    }
    progress.note(&format!("{reason}: cancelling the migration"));
    if let Err(err) = qmp.execute(&MigrateCancel).await {
        // Most likely the migration ended in the meantime; the loop sees how.
        warn!("migrate_cancel failed: {err}");
    }
    Cancelling::Requested {
        reason,
        deadline: Instant::now() + CANCEL_GRACE,
    }
}

/// After a migration that did not complete: makes sure a source VM that was running before
/// runs again. QEMU restarts it by itself once its migration thread has cleaned up, so we give
/// it `grace` ([`RESUME_GRACE`], or nothing for a guest we paused) and only then `cont`.
async fn ensure_source_running(
    qmp: &Qmp,
    source: &SourceState,
    progress: &mut dyn Progress,
    grace: Duration,
) -> anyhow::Result<()> {
    if !source.was_running {
        return Ok(());
    }
    let deadline = Instant::now() + grace;
    loop {
        let status = query_status(qmp).await?;
        if status.running {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if grace.is_zero() {
                progress.note("resuming the guest, paused for the save");
            } else {
                progress.note(&format!(
                    "the source VM is {} after the migration stopped; resuming it",
                    run_state_name(&status.status)
                ));
            }
            qmp.execute(&qmigrate_qmp::Cont)
                .await
                .context("could not resume the source VM (cont failed)")?;
            let status = query_status(qmp).await?;
            if !status.running {
                bail!(
                    "the source VM is still {} after cont",
                    run_state_name(&status.status)
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resumes a source guest that was running before a save whose state file turned out unusable
/// although QEMU completed it (the guest is then in `postmigrate`).
pub async fn resume_source(
    qmp: &Qmp,
    source: &SourceState,
    progress: &mut dyn Progress,
) -> anyhow::Result<()> {
    ensure_source_running(qmp, source, progress, Duration::ZERO).await
}

/// QEMU's own lowercase name for a run state (`inmigrate`), for messages.
pub fn run_state_name(state: &RunState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{state:?}").to_lowercase())
}

/// QEMU's own name for a migration status (`postcopy-active`), for messages.
pub fn migration_status_name(status: &MigrationStatus) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{status:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_validation() {
        assert_eq!(MigrationPlan::default().validate(), Ok(()));
        let plan = MigrationPlan {
            multifd: Some(0),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Err(PlanError::MultifdChannels(0)));
        let plan = MigrationPlan {
            compression: Some(Compression::Zstd),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Err(PlanError::CompressionWithoutMultifd));
        let plan = MigrationPlan {
            compression: Some(Compression::None),
            ..Default::default()
        };
        assert_eq!(plan.validate(), Ok(()));
    }

    #[test]
    fn capabilities_match_on_both_sides() {
        let plan = MigrationPlan {
            multifd: Some(4),
            postcopy: true,
            auto_converge: true,
            ..Default::default()
        };
        let dest = plan.destination_capabilities();
        let src = plan.source_capabilities();
        for c in &dest {
            assert!(src.contains(c), "{c:?} differs");
        }
        assert!(dest.contains(&cap(MigrationCapability::Multifd, true)));
        assert!(dest.contains(&cap(MigrationCapability::PostcopyRam, true)));
        assert!(dest.contains(&cap(MigrationCapability::ReturnPath, true)));
        assert!(src.contains(&cap(MigrationCapability::AutoConverge, true)));

        let single = MigrationPlan::default().destination_capabilities();
        assert!(single.contains(&cap(MigrationCapability::Multifd, false)));
        assert!(single.contains(&cap(MigrationCapability::ReturnPath, true)));
    }

    #[test]
    fn parameters() {
        let plan = MigrationPlan {
            multifd: Some(4),
            compression: Some(Compression::Zstd),
            ..Default::default()
        };
        let src = plan.source_parameters();
        assert_eq!(src.max_bandwidth, Some(UNLIMITED_BANDWIDTH));
        assert_eq!(src.multifd_channels, Some(4));
        assert_eq!(src.downtime_limit, None);
        let dest = plan.destination_parameters();
        assert_eq!(dest.max_bandwidth, None);
        assert_eq!(dest.multifd_channels, Some(4));
        assert_eq!(dest.multifd_compression, src.multifd_compression);
        // The mode is always set (to what QEMU calls it), so that a leftover cpr-reboot from
        // an earlier run cannot apply.
        assert_eq!(
            MigrationPlan::default().destination_parameters(),
            MigrateSetParameters {
                mode: Some(MigMode::Normal),
                ..MigrateSetParameters::default()
            }
        );
        assert_eq!(plan.describe(), "multifd 4 (zstd), postcopy off");
    }

    #[test]
    fn direct_io_only_for_files_and_set_either_way() {
        let save = MigrationPlan {
            stream: Stream::File,
            multifd: Some(4),
            mapped_ram: true,
            direct_io: true,
            ..MigrationPlan::default()
        };
        assert_eq!(save.source_parameters().direct_io, Some(true));
        assert_eq!(save.destination_parameters().direct_io, Some(true));
        assert_eq!(save.describe(), "multifd 4, mapped-ram, direct-io");
        // A plain save turns a leftover direct-io off; a live migration leaves it alone.
        let plain = MigrationPlan {
            stream: Stream::File,
            ..MigrationPlan::default()
        };
        assert_eq!(plain.source_parameters().direct_io, Some(false));
        assert_eq!(MigrationPlan::default().source_parameters().direct_io, None);

        // Set back on the source afterwards; left out for a QEMU without it (before 9.1).
        let before = MigrationParameters {
            direct_io: Some(false),
            ..Default::default()
        };
        let restore = parameters_to_restore(&save.source_parameters(), &before);
        assert_eq!(restore.direct_io, Some(false));
        let fitted = fit_parameters(
            save.source_parameters(),
            &MigrationParameters {
                mode: Some(MigMode::Normal),
                ..Default::default()
            },
            "9.0.0",
        )
        .expect("fits without direct-io");
        assert_eq!(fitted.direct_io, None);
        assert_eq!(fitted.multifd_channels, Some(4));
    }

    #[test]
    fn only_changed_parameters_are_restored() {
        let plan = MigrationPlan {
            multifd: Some(4),
            ..Default::default()
        };
        let before = MigrationParameters {
            max_bandwidth: Some(134_217_728),
            downtime_limit: Some(300),
            multifd_channels: Some(2),
            multifd_compression: Some(MultiFdCompression::None),
            max_postcopy_bandwidth: Some(0),
            ..Default::default()
        };
        let restore = parameters_to_restore(&plan.source_parameters(), &before);
        assert_eq!(restore.max_bandwidth, Some(134_217_728));
        assert_eq!(restore.multifd_channels, Some(2));
        assert_eq!(restore.multifd_compression, Some(MultiFdCompression::None));
        assert_eq!(restore.downtime_limit, None);
        assert_eq!(restore.max_postcopy_bandwidth, None);
    }

    #[test]
    fn endpoints_from_uris() {
        assert_eq!(
            Endpoint::from_uri("file:/a/b,offset=4096"),
            Endpoint::File {
                path: "/a/b".into(),
                offset: 4096
            }
        );
        let Endpoint::File { path, offset: 0 } = Endpoint::from_uri("file:rel/state.bin") else {
            panic!("not a file endpoint");
        };
        assert!(
            path.is_absolute() && path.ends_with("rel/state.bin"),
            "{path:?}"
        );
        assert_eq!(
            Endpoint::from_uri("exec:gzip -c > f"),
            Endpoint::Exec("gzip -c > f".into())
        );
        assert_eq!(
            Endpoint::from_uri("exec:gzip -c > f").stream(),
            Stream::Exec
        );
        assert_eq!(
            Endpoint::from_uri("tcp:h:1"),
            Endpoint::Uri("tcp:h:1".into())
        );
        assert_eq!(Endpoint::from_uri("tcp:h:1").stream(), Stream::Live);
        assert_eq!(
            Endpoint::from_uri("file:/a b,offset=0x10").to_string(),
            "file:/a b,offset=16"
        );
    }

    #[test]
    fn exec_commands_become_argv_or_a_shell() {
        let args = exec_args("sh -c 'exit 0'").expect("sh is on PATH");
        assert!(
            args[0].starts_with('/') && args[0].ends_with("/sh"),
            "{args:?}"
        );
        assert_eq!(&args[1..], ["-c", "exit 0"]);
        assert_eq!(
            exec_args("gzip -c > '/x y'").expect("shell"),
            ["/bin/sh", "-c", "gzip -c > '/x y'"]
        );
        let err = exec_args("no-such-program-here -x").expect_err("missing");
        assert!(format!("{err:#}").contains("not found on PATH"), "{err:#}");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[test]
    fn capabilities_fit_the_qemu() {
        let old = [
            cap(MigrationCapability::Events, false),
            cap(MigrationCapability::Multifd, false),
        ];
        let plan = MigrationPlan {
            stream: Stream::File,
            ..MigrationPlan::default()
        };
        let fitted = fit_capabilities(plan.source_capabilities(), &old, "7.2.0").expect("fits");
        assert!(fitted.contains(&cap(MigrationCapability::Multifd, false)));
        assert!(!fitted
            .iter()
            .any(|c| c.capability == MigrationCapability::MappedRam));
        let plan = MigrationPlan {
            stream: Stream::File,
            multifd: Some(4),
            mapped_ram: true,
            ..MigrationPlan::default()
        };
        let err = fit_capabilities(plan.source_capabilities(), &old, "7.2.0").expect_err("old");
        assert!(err.to_string().contains("mapped-ram (QEMU 9.0+"), "{err}");
        // Saves have no return path.
        assert!(plan
            .source_capabilities()
            .contains(&cap(MigrationCapability::ReturnPath, false)));

        let cpr = MigrationPlan {
            mode: Mode::CprReboot,
            ..MigrationPlan::default()
        };
        let params = fit_parameters(
            cpr.destination_parameters(),
            &MigrationParameters::default(),
            "7.2.0",
        );
        assert!(params.is_err());
        let params = fit_parameters(
            MigrationPlan::default().destination_parameters(),
            &MigrationParameters::default(),
            "7.2.0",
        )
        .expect("normal fits");
        assert_eq!(params.mode, None);
    }

    #[test]
    fn qmp_path_errors_say_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("x.qmp");
        let err = check_qmp_path(&missing).expect_err("missing");
        assert!(err
            .to_string()
            .contains("does not exist (is QEMU running with -qmp unix:"));
        let file = dir.path().join("file");
        std::fs::write(&file, b"").expect("write");
        let err = check_qmp_path(&file).expect_err("file");
        assert!(
            err.to_string().contains("is a regular file, not a socket"),
            "{err}"
        );
    }
}
