//! Flags shared by the subcommands, defined once and flattened into each: the source's tuning
//! of a migration, and the engine's enums as clap sees them (the engine itself knows nothing
//! of clap).

use std::time::Duration;

use anyhow::Context as _;
use qmigrate_migration::source::FollowOptions;
use qmigrate_migration::storage::StorageCopy;
use qmigrate_migration::watch::WatchPolicy;
use qmigrate_migration::{Compression, MigrationPlan, Mode};
use qmigrate_transport::{ClientConfig, DeadPeer, Endpoint, Scheme};

use crate::exit::Exit;
use crate::tls::{default_scheme, ClientTlsArgs};
use crate::token::TokenArgs;

use crate::units;

/// How the source runs a migration: `send` and `migrate` flatten it (`migrate` words three of
/// the helps for its both-sides case, with `mut_arg`).
#[derive(Debug, Clone, clap::Args)]
pub struct SourceTuning {
    /// Enable postcopy and switch to it after AFTER complete precopy passes (default 1; 0
    /// switches at once). The destination needs --postcopy too.
    #[arg(
        long,
        value_name = "AFTER",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "1"
    )]
    pub postcopy: Option<u64>,

    /// Bandwidth cap in bytes per second (100M, 1G, 512MiB; binary units). Default: unlimited
    /// (QEMU's own default of 128 MiB/s would throttle every migration).
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate)]
    pub max_bandwidth: Option<u64>,

    /// Bandwidth cap once in postcopy, in bytes per second. Default: unlimited (the guest
    /// already runs on the destination, and every page it misses stalls it).
    #[arg(long, value_name = "RATE", value_parser = units::parse_rate, requires = "postcopy")]
    pub postcopy_bandwidth: Option<u64>,

    /// Longest pause of the guest at the switch-over, in milliseconds (QEMU's default: 300).
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,

    /// Compress multifd channels (needs --multifd; the destination needs the same --compress).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<CompressArg>,

    /// Throttle the guest's CPUs when the migration does not converge.
    #[arg(long)]
    pub auto_converge: bool,

    /// Cancel the migration if it has not ended after DUR (30s, 10m, 1h); exits with 4.
    #[arg(long, value_name = "DUR", value_parser = units::parse_duration)]
    pub timeout: Option<Duration>,

    /// When precopy has not converged for DUR (the guest dirties memory as fast as the link
    /// moves it), switch to postcopy with --postcopy, keep throttling with --auto-converge
    /// while the throttle still rises, else cancel and exit 1 (the source keeps running).
    /// Default: 30s per GiB of guest RAM, at least 30s; `off` only reports it.
    #[arg(long, value_name = "DUR", value_parser = units::parse_duration_or_off)]
    pub converge_timeout: Option<Duration>,

    /// Cancel a precopy migration that has moved nothing for DUR (a dead network or
    /// destination) and exit 1; the source keeps running. `off` never does.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = units::parse_duration_or_off)]
    pub stall_timeout: Duration,
}

impl SourceTuning {
    /// How the source follows the migration: the postcopy switch, the convergence and
    /// stall policy.
    pub fn follow(&self) -> FollowOptions {
        FollowOptions {
            postcopy_after: self.postcopy,
            detach: false,
            watch: WatchPolicy {
                converge_timeout: self.converge_timeout,
                stall_timeout: self.stall_timeout,
                ..WatchPolicy::default()
            },
            storage: None,
        }
    }

    /// The plan of a live migration with `multifd` channels and these settings; a save fills
    /// in the rest.
    pub fn plan(&self, multifd: Option<u32>) -> MigrationPlan {
        MigrationPlan {
            multifd,
            compression: self.compress.map(Into::into),
            postcopy: self.postcopy.is_some(),
            auto_converge: self.auto_converge,
            max_bandwidth: self.max_bandwidth,
            max_postcopy_bandwidth: self.postcopy_bandwidth,
            downtime_limit: self.downtime_limit,
            ..MigrationPlan::default()
        }
    }
}

/// `--recover-timeout`: how long a postcopy migration that paused is recovered before both
/// QEMUs are left paused for `qmigrate recover`; `migrate`, `send` and `receive` flatten it.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoverArgs {
    /// When the network breaks during postcopy (both QEMUs pause: the guest's memory is split
    /// between the hosts), keep reconnecting and resume the migration for up to DUR, with
    /// backoff; then exit 1 and leave both paused for `qmigrate recover`. `off`: do not try.
    #[arg(long, value_name = "DUR", default_value = "10m", value_parser = units::parse_duration_or_off)]
    pub recover_timeout: Duration,
}

/// `--copy-storage[=DISK,...]` and `--copy-storage-inc[=DISK,...]`, parsed alike by `send` and
/// `receive`, which word the helps for their side and add their conflicts with `mut_arg`.
#[derive(Debug, Clone, clap::Args)]
pub struct CopyStorageArgs {
    /// Copy the disks (all writable ones, or those named by qdev id).
    #[arg(
        long,
        value_name = "DISK,...",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = ""
    )]
    pub copy_storage: Option<String>,

    /// As --copy-storage, only each disk's top image.
    #[arg(
        long,
        value_name = "DISK,...",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "",
        conflicts_with = "copy_storage"
    )]
    pub copy_storage_inc: Option<String>,
}

impl CopyStorageArgs {
    /// Which disks to copy, and how.
    pub fn copy(&self) -> StorageCopy {
        StorageCopy::parse(
            self.copy_storage.as_deref(),
            self.copy_storage_inc.as_deref(),
        )
    }
}

/// How a command reaches a tunnel-server: the connect limit, the token, TLS and the dead-peer
/// timeout, for `tunnel-client`, `migrate` and `recover`.
#[derive(Debug, Clone, clap::Args)]
pub struct TunnelClientArgs {
    /// How long connecting to the tunnel server may take.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = units::parse_duration)]
    pub connect_timeout: Duration,

    #[command(flatten)]
    pub token: TokenArgs,

    #[command(flatten)]
    pub tls: ClientTlsArgs,

    #[command(flatten)]
    pub dead_peer: DeadPeerArgs,
}

impl TunnelClientArgs {
    /// `to` (or `HOST:PORT`) as an endpoint, its scheme plain or TLS as the TLS flags say;
    /// a usage error when it does not parse.
    pub fn server(&self, to: &str, plain: Scheme) -> anyhow::Result<Endpoint> {
        Endpoint::parse(to, default_scheme(plain, self.tls.any())).context(Exit::Usage)
    }

    /// The transport's settings for reaching `server` (token and TLS files read now).
    pub fn client_config(&self, server: Endpoint) -> anyhow::Result<ClientConfig> {
        Ok(ClientConfig {
            connect_timeout: self.connect_timeout,
            dead_peer: self.dead_peer.dead_peer(),
            token: self.token.load()?,
            tls: self.tls.load(server.scheme)?,
            ..ClientConfig::new(server)
        })
    }
}

/// `--dead-peer-timeout`: how soon a tunnel connection whose peer vanished without a word (a
/// pulled cable, a host that died) fails, for every command that opens tunnel connections.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadPeerArgs {
    /// A tunnel connection whose peer has not answered for DUR fails (TCP keepalive probes
    /// idle connections; data unacknowledged for DUR is an error, also on the direct data
    /// path's socket in QEMU's hands). With peers of this version, ws:// and wss:// connections
    /// and the control connection of migrate/tunnel-server --qmp also fail when the peer sends
    /// nothing (not even a ping or heartbeat) for DUR, at least 3s: a hung peer process.
    /// `off` leaves the system's defaults (hours) and takes no silence for a dead peer.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = units::parse_duration_or_off)]
    pub dead_peer_timeout: Duration,
}

impl DeadPeerArgs {
    /// The transport's setting.
    pub fn dead_peer(&self) -> DeadPeer {
        DeadPeer {
            timeout: self.dead_peer_timeout,
        }
    }
}

/// `--compress ALGO`: compression of multifd channels; both ends must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompressArg {
    /// No compression (QEMU's default).
    None,
    /// Slow, small.
    Zlib,
    /// Faster than zlib; the better choice when the link is the bottleneck.
    Zstd,
}

impl From<CompressArg> for Compression {
    fn from(arg: CompressArg) -> Self {
        match arg {
            CompressArg::None => Compression::None,
            CompressArg::Zlib => Compression::Zlib,
            CompressArg::Zstd => Compression::Zstd,
        }
    }
}

/// `--mode MODE`: the migration mode (QEMU's `mode` parameter, QEMU 8.2+).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ModeArg {
    /// An ordinary migration or save.
    #[default]
    Normal,
    /// Save for a restart of QEMU on this host (a host kernel upgrade): with a shared memory
    /// backend and `x-ignore-shared` the guest RAM stays in its backing file instead of the
    /// state file.
    CprReboot,
}

impl From<ModeArg> for Mode {
    fn from(arg: ModeArg) -> Self {
        match arg {
            ModeArg::Normal => Mode::Normal,
            ModeArg::CprReboot => Mode::CprReboot,
        }
    }
}
