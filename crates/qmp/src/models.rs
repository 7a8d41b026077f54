//! QAPI types of QEMU's migration schema (names as in QEMU 10's `query-qmp-schema`).
//!
//! Reply types accept unknown fields and every enum QEMU may grow has an `Other` case, so a
//! newer QEMU decodes; arguments skip `None` fields so an older QEMU is not sent what it lacks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Implements `Display` as QEMU spells the value (its serde name).
macro_rules! display_as_qapi {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::String(s)) => f.write_str(&s),
                    _ => write!(f, "{self:?}"),
                }
            }
        }
    )*};
}

/// The reply of commands that return nothing (`{}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Empty {}

/// `VersionTriple`: a QEMU version.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl VersionTriple {
    /// True when this version is `major.minor.micro` or newer.
    pub fn at_least(&self, major: u32, minor: u32, micro: u32) -> bool {
        (self.major, self.minor, self.micro) >= (major, minor, micro)
    }
}

impl fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// `VersionInfo`: reply of `query-version`, also in the greeting.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionInfo {
    /// The QEMU version.
    pub qemu: VersionTriple,
    /// Distribution package string (may be empty).
    #[serde(default)]
    pub package: String,
}

/// `RunState`: what a VM is doing (`query-status`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Stopped in the debugger.
    Debug,
    /// Waiting for an incoming migration (`-incoming`).
    #[serde(rename = "inmigrate")]
    InMigrate,
    /// Stopped by an internal error.
    InternalError,
    /// Stopped by a disk I/O error.
    IoError,
    /// Paused (`stop`).
    Paused,
    /// Source side after a completed migration.
    Postmigrate,
    /// Started with `-S`, not yet run.
    Prelaunch,
    /// Migration's final stage.
    FinishMigrate,
    /// Restoring a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// Shut down (with `-no-shutdown`).
    Shutdown,
    /// Suspended (ACPI S3).
    Suspended,
    /// Stopped by a watchdog.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO checkpointing.
    Colo,
    /// A state this crate does not know.
    #[serde(other)]
    Other,
}

/// `StatusInfo`: reply of `query-status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// `MigrationStatus`: the state of a migration (`query-migrate`, `MIGRATION` event).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration started.
    None,
    /// Setting up.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled (terminal).
    Cancelled,
    /// Transferring (precopy).
    Active,
    /// Transferring in postcopy.
    PostcopyActive,
    /// Postcopy paused by a network failure; can be recovered.
    PostcopyPaused,
    /// Setting up postcopy recovery.
    PostcopyRecoverSetup,
    /// Recovering postcopy.
    PostcopyRecover,
    /// Completed (terminal).
    Completed,
    /// Failed (terminal); see `error-desc`.
    Failed,
    /// COLO.
    Colo,
    /// Paused before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Migrating device state.
    Device,
    /// Waiting for device unplug (failover).
    WaitUnplug,
    /// A status this crate does not know.
    #[serde(other)]
    Other,
}

impl MigrationStatus {
    /// True for `completed`, `failed` and `cancelled`: the migration will not change again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// `MigrationStats`: RAM transfer counters in `query-migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationStats {
    /// Bytes transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred: Option<u64>,
    /// Bytes remaining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Total guest RAM bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Zero pages sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<u64>,
    /// Full pages sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal: Option<u64>,
    /// Bytes of full pages sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normal_bytes: Option<u64>,
    /// Pages dirtied per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_pages_rate: Option<u64>,
    /// Throughput in Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mbps: Option<f64>,
    /// Dirty bitmap syncs so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_sync_count: Option<u64>,
    /// Postcopy page requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_requests: Option<u64>,
    /// Target page size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Bytes sent over multifd channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_bytes: Option<u64>,
    /// Pages sent per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages_per_second: Option<u64>,
    /// Bytes sent in precopy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_bytes: Option<u64>,
    /// Bytes sent while the VM was stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_bytes: Option<u64>,
    /// Bytes sent in postcopy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_bytes: Option<u64>,
    /// Zero-copy syncs missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_sync_missed_zero_copy: Option<u64>,
}

/// `XBZRLECacheStats` in `query-migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleCacheStats {
    /// Cache size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_size: Option<u64>,
    /// Bytes sent XBZRLE-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Pages sent XBZRLE-encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
    /// Cache misses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_miss: Option<u64>,
    /// Cache miss rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_miss_rate: Option<f64>,
    /// Encoding rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_rate: Option<f64>,
    /// Overflows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overflow: Option<u64>,
}

/// `VfioStats` in `query-migrate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VfioStats {
    /// Bytes of VFIO device state transferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transferred: Option<u64>,
}

/// `MigrationInfo`: reply of `query-migrate`. Every field is optional (`{}` decodes: no
/// migration has run).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Migration status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<MigrationStatus>,
    /// RAM counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<MigrationStats>,
    /// VFIO counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio: Option<VfioStats>,
    /// XBZRLE cache counters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache: Option<XbzrleCacheStats>,
    /// Milliseconds since the migration started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    /// Expected downtime in ms (while active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    /// Actual downtime in ms (when completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    /// Setup time in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    /// Auto-converge throttle percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
    /// Why migration is currently blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_reasons: Option<Vec<String>>,
    /// Postcopy blocktime total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_blocktime: Option<u64>,
    /// Postcopy blocktime per vCPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_vcpu_blocktime: Option<Vec<u64>>,
    /// Addresses an incoming migration listens on (destination side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_address: Option<Vec<SocketAddress>>,
    /// Dirty-limit throttle time per round (µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_limit_throttle_time_per_round: Option<u64>,
    /// Dirty-limit ring-full time (µs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_limit_ring_full_time: Option<u64>,
}

/// `MigrationCapability`: a switch set with `migrate-set-capabilities`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum MigrationCapability {
    Xbzrle,
    RdmaPinAll,
    AutoConverge,
    ZeroBlocks,
    Events,
    PostcopyRam,
    XColo,
    ReleaseRam,
    ReturnPath,
    PauseBeforeSwitchover,
    Multifd,
    DirtyBitmaps,
    PostcopyBlocktime,
    LateBlockActivate,
    XIgnoreShared,
    ValidateUuid,
    BackgroundSnapshot,
    ZeroCopySend,
    PostcopyPreempt,
    SwitchoverAck,
    DirtyLimit,
    MappedRam,
    /// A capability this crate does not know (cannot be sent back).
    #[serde(other)]
    Other,
}

/// `MigrationCapabilityStatus`: one capability and whether it is on.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// Whether it is enabled.
    pub state: bool,
}

/// `MultiFDCompression`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum MultiFdCompression {
    None,
    Zlib,
    Zstd,
    Qpl,
    Uadk,
    Qatzip,
    /// Unknown to this crate.
    #[serde(other)]
    Other,
}

/// `MigMode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum MigMode {
    Normal,
    CprReboot,
    CprTransfer,
    /// Unknown to this crate.
    #[serde(other)]
    Other,
}

/// `ZeroPageDetection`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum ZeroPageDetection {
    None,
    Legacy,
    Multifd,
    /// Unknown to this crate.
    #[serde(other)]
    Other,
}

display_as_qapi!(
    RunState,
    MigrationStatus,
    MigrationCapability,
    MultiFdCompression,
    MigMode,
    ZeroPageDetection
);

/// `StrOrNull`: a string, or `null` to reset a parameter (the `tls-*` parameters).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum StrOrNull {
    /// A value.
    Str(String),
    /// JSON `null`.
    Null,
}

/// `MigrationParameters`: reply of `query-migrate-parameters`. All optional so any QEMU's
/// reply decodes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct MigrationParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_initial: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_max: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_rounds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_trigger_threshold: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_tailslow: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_checkpoint_delay: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cpu_throttle: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<MultiFdCompression>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_zlib_level: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_qatzip_level: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_zstd_level: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_bitmap_mapping: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_vcpu_dirty_limit_period: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_dirty_limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MigMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_page_detection: Option<ZeroPageDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
}

/// `InetSocketAddress`: a TCP host and port, with QEMU's optional knobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct InetSocketAddress {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port number or service name.
    pub port: String,
    /// Do not resolve names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric: Option<bool>,
    /// Try ports up to this one when listening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
    /// Restrict to IPv4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<bool>,
    /// Restrict to IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<bool>,
    /// Enable TCP keep-alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_alive: Option<bool>,
    /// Use MPTCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mptcp: Option<bool>,
}

impl InetSocketAddress {
    /// A plain `host:port` address.
    pub fn new(host: impl Into<String>, port: impl Into<String>) -> Self {
        InetSocketAddress {
            host: host.into(),
            port: port.into(),
            ..Default::default()
        }
    }
}

/// `SocketAddress` (flat union on `type`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SocketAddress {
    /// TCP.
    Inet(InetSocketAddress),
    /// A Unix socket path.
    Unix {
        /// The socket path.
        path: String,
    },
    /// AF_VSOCK.
    Vsock {
        /// Context id.
        cid: String,
        /// Port.
        port: String,
    },
    /// A file descriptor passed earlier with `getfd` (or its number).
    Fd {
        /// The fd name.
        str: String,
    },
    /// A socket type this crate does not know (decoding only).
    #[serde(other)]
    Other,
}

/// `MigrationAddress` (flat union on `transport`): where a migration stream goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum MigrationAddress {
    /// A socket.
    Socket(SocketAddress),
    /// A command run by QEMU, the stream on its stdin/stdout.
    Exec {
        /// argv of the command.
        args: Vec<String>,
    },
    /// RDMA.
    Rdma(InetSocketAddress),
    /// A file (mapped-ram).
    File {
        /// The file path.
        filename: String,
        /// Offset in the file.
        offset: u64,
    },
    /// A transport this crate does not know (decoding only).
    #[serde(other)]
    Other,
}

/// `MigrationChannelType`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MigrationChannelType {
    /// The main migration channel.
    Main,
    /// The CPR channel (`cpr-transfer` mode).
    Cpr,
    /// Unknown to this crate.
    #[serde(other)]
    Other,
}

/// `MigrationChannel`: one element of `channels` in `migrate` / `migrate-incoming`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationChannel {
    /// Which channel.
    pub channel_type: MigrationChannelType,
    /// Where it goes.
    pub addr: MigrationAddress,
}

/// The destination of `migrate` / source of `migrate-incoming`: QEMU takes exactly one of a
/// legacy `uri` string or a `channels` list (QEMU >= 8.2), and this type makes sending both or
/// neither impossible.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MigrationTarget {
    /// `"uri": "unix:/path"` and the like.
    Uri(String),
    /// `"channels": [...]`.
    Channels(Vec<MigrationChannel>),
}

impl MigrationTarget {
    /// The target for `addr`: a single `main` channel when `use_channels` (see
    /// [`crate::probe::supports_channels`]), else the legacy URI from
    /// [`MigrationAddress::to_uri`].
    pub fn from_address(addr: MigrationAddress, use_channels: bool) -> Self {
        if use_channels {
            MigrationTarget::Channels(vec![MigrationChannel {
                channel_type: MigrationChannelType::Main,
                addr,
            }])
        } else {
            MigrationTarget::Uri(addr.to_uri())
        }
    }
}
