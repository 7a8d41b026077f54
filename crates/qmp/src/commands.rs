//! One type per QMP command: its fields are the QAPI arguments, [`Command::NAME`] its QMP name
//! and [`Command::Reply`] the typed `return` value.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::models::{
    Empty, MigMode, MigrationCapabilityStatus, MigrationInfo, MigrationParameters, MigrationTarget,
    MultiFdCompression, StatusInfo, StrOrNull, VersionInfo, ZeroPageDetection,
};

/// A QMP command. Its serialization (a struct, or a unit struct for no arguments) is the
/// `arguments` object.
pub trait Command: Serialize {
    /// The QMP name, e.g. `query-migrate`.
    const NAME: &'static str;
    /// What `return` decodes into; [`Empty`] for `{}`.
    type Reply: DeserializeOwned;
}

macro_rules! command {
    ($t:ty, $name:literal, $reply:ty) => {
        impl Command for $t {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

/// `migrate`: start migrating this VM out. Progress: `query-migrate` or `MIGRATION` events.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Migrate {
    /// Where to (exactly one of `uri` / `channels`).
    #[serde(flatten)]
    pub target: MigrationTarget,
    /// Resume a paused postcopy migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

impl Migrate {
    /// A migration to `target`.
    pub fn new(target: MigrationTarget) -> Self {
        Migrate {
            target,
            resume: None,
        }
    }

    /// Sets `resume` (recover a paused postcopy).
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = Some(resume);
        self
    }
}
command!(Migrate, "migrate", Empty);

/// `migrate-incoming`: start listening on a VM started with `-incoming defer`. Fails with a
/// `GenericError` on a VM not started that way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateIncoming {
    /// Where from (exactly one of `uri` / `channels`).
    #[serde(flatten)]
    pub target: MigrationTarget,
    /// Exit QEMU when the incoming migration fails (QEMU >= 9.1; default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_on_error: Option<bool>,
}

impl MigrateIncoming {
    /// An incoming migration from `target`.
    pub fn new(target: MigrationTarget) -> Self {
        MigrateIncoming {
            target,
            exit_on_error: None,
        }
    }

    /// Sets `exit-on-error` (only QEMU >= 9.1 knows it).
    pub fn exit_on_error(mut self, exit: bool) -> Self {
        self.exit_on_error = Some(exit);
        self
    }
}
command!(MigrateIncoming, "migrate-incoming", Empty);

/// `query-migrate`: migration status and counters.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryMigrate;
command!(QueryMigrate, "query-migrate", MigrationInfo);

/// `migrate-set-capabilities`: switch capabilities (both sides must agree before `migrate`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateSetCapabilities {
    /// The capabilities to set.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}
command!(MigrateSetCapabilities, "migrate-set-capabilities", Empty);

/// `query-migrate-capabilities`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryMigrateCapabilities;
command!(
    QueryMigrateCapabilities,
    "query-migrate-capabilities",
    Vec<MigrationCapabilityStatus>
);

/// `migrate-set-parameters`: only the `Some` fields are sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub struct MigrateSetParameters {
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
    pub tls_creds: Option<StrOrNull>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<StrOrNull>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<StrOrNull>,
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
command!(MigrateSetParameters, "migrate-set-parameters", Empty);

/// `query-migrate-parameters`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryMigrateParameters;
command!(
    QueryMigrateParameters,
    "query-migrate-parameters",
    MigrationParameters
);

/// `query-version`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryVersion;
command!(QueryVersion, "query-version", VersionInfo);

/// `query-status`: run state of the VM.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryStatus;
command!(QueryStatus, "query-status", StatusInfo);

/// `migrate_cancel`: cancel the outgoing migration (QMP spells it with an underscore).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateCancel;
command!(MigrateCancel, "migrate_cancel", Empty);

/// `migrate-start-postcopy`: switch a running migration to postcopy (needs `postcopy-ram`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateStartPostcopy;
command!(MigrateStartPostcopy, "migrate-start-postcopy", Empty);

/// `migrate-recover`: on a destination whose postcopy migration is paused
/// (`postcopy-paused`), listen again at `uri` for the source's `migrate` with `resume`. It
/// takes a URI only (no `channels`, QEMU 10).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateRecover {
    /// Where to listen (`unix:PATH`, `fd:NAME`, ...).
    pub uri: String,
}
command!(MigrateRecover, "migrate-recover", Empty);

/// `cont`: resume the vCPUs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cont;
command!(Cont, "cont", Empty);

/// `stop`: pause the vCPUs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stop;
command!(Stop, "stop", Empty);

/// `pmemsave`: dump guest physical memory to a file on QEMU's host. Slow for large sizes:
/// use [`crate::Qmp::execute_with_timeout`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pmemsave {
    /// Start physical address.
    pub val: u64,
    /// Bytes to dump.
    pub size: u64,
    /// Output file (path as seen by QEMU).
    pub filename: String,
}
command!(Pmemsave, "pmemsave", Empty);

/// `quit`: QEMU exits; the connection then ends.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Quit;
command!(Quit, "quit", Empty);

/// `query-qmp-schema`: the introspection schema (one ~120 KB line), see [`crate::probe`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryQmpSchema;
command!(QueryQmpSchema, "query-qmp-schema", Vec<serde_json::Value>);

/// `getfd`: name the file descriptor passed with it; send it with [`crate::Qmp::execute_with_fd`]
/// (with plain `execute` QEMU answers that no descriptor was supplied).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Getfd {
    /// The name for the fd.
    pub fdname: String,
}
command!(Getfd, "getfd", Empty);

/// `closefd`: close a descriptor QEMU got with [`Getfd`] and did not use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Closefd {
    /// The name given in `getfd`.
    pub fdname: String,
}
command!(Closefd, "closefd", Empty);

/// `query-yank`: the instances that have yank functions registered (QEMU 6.0+). A migration
/// holds one (`{"type": "migration"}`) from its start until QEMU has finished tearing it down,
/// which is the moment it is safe to change migration capabilities again: QEMU's cleanup
/// reads them (see `YankInstance`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryYank;
command!(QueryYank, "query-yank", Vec<YankInstance>);

/// One entry of [`QueryYank`]'s reply, or an instance to [`Yank`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct YankInstance {
    /// `block-node`, `chardev` or `migration`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The block node, for a `block-node` instance (an NBD client node).
    #[serde(rename = "node-name", default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

impl YankInstance {
    /// The network connection of block node `node` (an NBD client's).
    pub fn block_node(node: impl Into<String>) -> Self {
        YankInstance {
            kind: "block-node".into(),
            node_name: Some(node.into()),
        }
    }
}

/// `yank`: shuts down the network connections of `instances` at once (QEMU 6.0+), so that
/// what waits on a peer that hangs (an NBD request in flight) fails instead of waiting on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Yank {
    /// What to yank.
    pub instances: Vec<YankInstance>,
}
command!(Yank, "yank", Empty);
