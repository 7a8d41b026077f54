//! The block layer's commands and models used to copy local disks during a migration (QEMU's
//! non-shared storage migration): an NBD server with writable exports on the destination, NBD
//! client nodes and `blockdev-mirror` jobs on the source.
//!
//! Names and shapes as in QEMU 10's `query-qmp-schema`; replies accept unknown fields and the
//! enums QEMU may grow have an `Other` case.

use serde::{Deserialize, Serialize};

use crate::commands::Command;
use crate::models::{Empty, SocketAddress};

macro_rules! command {
    ($t:ty, $name:literal, $reply:ty) => {
        impl Command for $t {
            const NAME: &'static str = $name;
            type Reply = $reply;
        }
    };
}

/// `SocketAddressLegacy` (`nbd-server-start` still takes it): the address nested in `data`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum SocketAddressLegacy {
    /// A Unix socket.
    Unix {
        /// Its path.
        path: String,
    },
}

/// `nbd-server-start`: start QEMU's one NBD server (fails if it already runs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStart {
    /// Where it listens.
    pub addr: SocketAddressLegacy,
    /// How many clients at once (QEMU's default: 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}
command!(NbdServerStart, "nbd-server-start", Empty);

/// `nbd-server-stop`: stop the NBD server and remove every NBD export.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NbdServerStop;
command!(NbdServerStop, "nbd-server-stop", Empty);

/// `block-export-add` of `type: nbd`. Activates an inactive node (a destination's during
/// `inmigrate`) unless `allow-inactive` (QEMU 10) says otherwise.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename = "nbd", rename_all = "kebab-case")]
pub struct BlockExportAddNbd {
    /// The export's id (for `block-export-del`).
    pub id: String,
    /// The node exported (a node name; a `-drive` id is refused).
    pub node_name: String,
    /// Clients may write.
    pub writable: bool,
    /// The export's name that NBD clients ask for (default: the node name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}
command!(BlockExportAddNbd, "block-export-add", Empty);

/// How [`BlockExportDel`] treats connected clients.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlockExportRemoveMode {
    /// Fail while clients are connected.
    Safe,
    /// Disconnect them.
    Hard,
}

/// `block-export-del`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockExportDel {
    /// The export's id.
    pub id: String,
    /// `safe` (QEMU's default) or `hard`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BlockExportRemoveMode>,
}
command!(BlockExportDel, "block-export-del", Empty);

/// `query-block-exports`: the block exports (NBD and others).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryBlockExports;
command!(
    QueryBlockExports,
    "query-block-exports",
    Vec<BlockExportInfo>
);

/// One export of [`QueryBlockExports`]'s reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// The export's id.
    pub id: String,
    /// The exported node.
    #[serde(default)]
    pub node_name: String,
    /// Removed (`block-export-del`), waiting for its clients to go.
    #[serde(default)]
    pub shutting_down: bool,
}

/// `blockdev-add` of an NBD client node (`driver: nbd`): it connects at once and stays
/// connected until `blockdev-del`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "driver", rename = "nbd", rename_all = "kebab-case")]
pub struct BlockdevAddNbd {
    /// The new node's name.
    pub node_name: String,
    /// The NBD server (flat `SocketAddress`).
    pub server: SocketAddress,
    /// The export's name.
    pub export: String,
    /// Seconds during which requests wait for a reconnect before they fail (0: fail at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_delay: Option<u32>,
    /// `unmap` lets discards and zeroes through as such (keeps the target sparse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard: Option<String>,
}
command!(BlockdevAddNbd, "blockdev-add", Empty);

/// `blockdev-del`: remove a node added with `blockdev-add` (an NBD node disconnects).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node.
    pub node_name: String,
}
command!(BlockdevDel, "blockdev-del", Empty);

/// `MirrorSyncMode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum MirrorSyncMode {
    Top,
    Full,
    None,
    Incremental,
    Bitmap,
}

/// `MirrorCopyMode`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorCopyMode {
    /// Guest writes dirty a bitmap that the job copies in the background.
    Background,
    /// Guest writes go to both sides before they complete ("active" mirroring): the two stay
    /// in sync once the job is ready.
    WriteBlocking,
    /// A mode this crate does not know.
    #[serde(other)]
    Other,
}

/// `blockdev-mirror`: copy `device` to the node `target`, then keep it in sync until the job
/// is cancelled (a non-forced cancel after `BLOCK_JOB_READY` completes the copy) or completed
/// (which pivots the device onto the target: not what a migration wants).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    /// The job's id.
    pub job_id: String,
    /// The source's root node (or `-drive` id).
    pub device: String,
    /// The target node.
    pub target: String,
    /// What to copy.
    pub sync: MirrorSyncMode,
    /// Leave the job `concluded` until `job-dismiss` (so its error can be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_dismiss: Option<bool>,
    /// Bytes per second (0: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// How guest writes reach the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_mode: Option<MirrorCopyMode>,
}
command!(BlockdevMirror, "blockdev-mirror", Empty);

/// `block-job-change` of a mirror job (QEMU 8.2+): switch it from background to
/// write-blocking.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename = "mirror", rename_all = "kebab-case")]
pub struct BlockJobChangeMirror {
    /// The job's id.
    pub id: String,
    /// The new mode (only `write-blocking` is accepted).
    pub copy_mode: MirrorCopyMode,
}
command!(BlockJobChangeMirror, "block-job-change", Empty);

/// `block-job-cancel`. Not forced, a ready mirror first copies what is left and ends
/// `COMPLETED` (a point-in-time copy); forced, it stops at once and ends `CANCELLED`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockJobCancel {
    /// The job's id.
    pub device: String,
    /// Abandon the copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}
command!(BlockJobCancel, "block-job-cancel", Empty);

/// `job-dismiss`: remove a `concluded` job (one started with `auto-dismiss: false`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobDismiss {
    /// The job's id.
    pub id: String,
}
command!(JobDismiss, "job-dismiss", Empty);

/// `migrate-continue`: let a migration paused at `pre-switchover` go on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MigrateContinue {
    /// The state it waits in: `pre-switchover`.
    pub state: String,
}
command!(MigrateContinue, "migrate-continue", Empty);

/// `query-block`: the VM's block devices.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryBlock;
command!(QueryBlock, "query-block", Vec<BlockInfo>);

/// One device of [`QueryBlock`]'s reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockInfo {
    /// The `-drive` id (empty with `-blockdev`).
    #[serde(default)]
    pub device: String,
    /// The device's QOM path (`/machine/peripheral/vblk0/virtio-backend`) or qdev id.
    #[serde(default)]
    pub qdev: Option<String>,
    /// A CD-ROM or floppy.
    #[serde(default)]
    pub removable: bool,
    /// The medium, if any.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

impl BlockInfo {
    /// The device's qdev id (`vblk0` of `/machine/peripheral/vblk0/virtio-backend`), `None`
    /// for a device created without an id.
    pub fn qdev_id(&self) -> Option<&str> {
        let qdev = self.qdev.as_deref()?;
        match qdev.strip_prefix("/machine/peripheral/") {
            Some(rest) => rest.split('/').next().filter(|s| !s.is_empty()),
            None if !qdev.starts_with('/') && !qdev.is_empty() => Some(qdev),
            None => None,
        }
    }
}

/// `BlockDeviceInfo`: the medium of a device.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// The root node's name.
    #[serde(default)]
    pub node_name: String,
    /// Read-only.
    #[serde(default)]
    pub ro: bool,
    /// The format driver (`qcow2`, `raw`).
    #[serde(default)]
    pub drv: String,
    /// The image's file name.
    #[serde(default)]
    pub file: String,
    /// How many backing images the image has (0: none). QEMU spells it with underscores.
    #[serde(default, rename = "backing_file_depth")]
    pub backing_file_depth: u64,
    /// The image.
    #[serde(default)]
    pub image: Option<ImageInfo>,
    /// The node's dirty bitmaps (`query-named-block-nodes`; `query-block` has them too).
    #[serde(default)]
    pub dirty_bitmaps: Vec<BlockDirtyInfo>,
}

/// `BlockDirtyInfo`: one dirty bitmap of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDirtyInfo {
    /// The bitmap's name.
    #[serde(default)]
    pub name: String,
    /// Bytes marked dirty (whole granules).
    #[serde(default)]
    pub count: u64,
}

/// `block-dirty-bitmap-add`: a bitmap on `node` that every write to the node marks, whoever
/// writes (the guest, a block job, an NBD client).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockDirtyBitmapAdd {
    /// The node (or device) name.
    pub node: String,
    /// The bitmap's name, unique on the node.
    pub name: String,
    /// Kept in the image (qcow2) after QEMU ends; `false` for one that only lives in memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
}
command!(BlockDirtyBitmapAdd, "block-dirty-bitmap-add", Empty);

/// `block-dirty-bitmap-clear` and `block-dirty-bitmap-remove`: a bitmap of a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockDirtyBitmap {
    /// The node (or device) name.
    pub node: String,
    /// The bitmap's name.
    pub name: String,
}

/// `block-dirty-bitmap-clear`: unmarks every bit of a bitmap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct BlockDirtyBitmapClear(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapClear, "block-dirty-bitmap-clear", Empty);

/// `block-dirty-bitmap-remove`: deletes a bitmap.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct BlockDirtyBitmapRemove(pub BlockDirtyBitmap);
command!(BlockDirtyBitmapRemove, "block-dirty-bitmap-remove", Empty);

/// `ImageInfo`, what this crate reads of it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The guest-visible size in bytes.
    #[serde(default)]
    pub virtual_size: u64,
    /// The format.
    #[serde(default)]
    pub format: String,
    /// Bytes the image takes on its host.
    #[serde(default)]
    pub actual_size: Option<u64>,
}

/// `query-named-block-nodes` (with `flat`: without each node's backing chain).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryNamedBlockNodes {
    /// Leave out the backing chains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flat: Option<bool>,
}
command!(
    QueryNamedBlockNodes,
    "query-named-block-nodes",
    Vec<BlockDeviceInfo>
);

/// `query-block-jobs`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueryBlockJobs;
command!(QueryBlockJobs, "query-block-jobs", Vec<BlockJobInfo>);

/// `JobStatus`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
    /// A status this crate does not know.
    #[serde(other)]
    Other,
}

/// One job of [`QueryBlockJobs`]'s reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job's id.
    pub device: String,
    /// `mirror`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Progress: `offset` of `len` (only their ratio means anything; `len` grows with writes).
    pub len: u64,
    /// See `len`.
    pub offset: u64,
    /// The job's status.
    pub status: JobStatus,
    /// Ready to be completed (in sync).
    #[serde(default)]
    pub ready: bool,
    /// The job's error, once it ended with one.
    #[serde(default)]
    pub error: Option<String>,
    /// Mirror in write-blocking mode with nothing left to copy (QEMU 8.2+).
    #[serde(default)]
    pub actively_synced: Option<bool>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn args<C: Command>(cmd: &C) -> serde_json::Value {
        serde_json::to_value(cmd).expect("serializes")
    }

    /// The arguments as QEMU 10's QMP reference (and the storage notes' runs) spell them.
    #[test]
    fn arguments_match_qemu() {
        assert_eq!(
            args(&NbdServerStart {
                addr: SocketAddressLegacy::Unix {
                    path: "/run/d.sock".into()
                },
                max_connections: None,
            }),
            json!({"addr": {"type": "unix", "data": {"path": "/run/d.sock"}}})
        );
        assert_eq!(
            args(&BlockExportAddNbd {
                id: "exp-disk0".into(),
                node_name: "disk0".into(),
                writable: true,
                name: Some("vblk0".into()),
            }),
            json!({"type": "nbd", "id": "exp-disk0", "node-name": "disk0", "writable": true, "name": "vblk0"})
        );
        assert_eq!(
            args(&BlockdevAddNbd {
                node_name: "mig-disk0".into(),
                server: SocketAddress::Unix {
                    path: "/run/s.sock".into()
                },
                export: "disk0".into(),
                reconnect_delay: Some(10),
                discard: Some("unmap".into()),
            }),
            json!({"driver": "nbd", "node-name": "mig-disk0", "server": {"type": "unix", "path": "/run/s.sock"},
                   "export": "disk0", "reconnect-delay": 10, "discard": "unmap"})
        );
        assert_eq!(
            args(&BlockdevMirror {
                job_id: "mirror-disk0".into(),
                device: "disk0".into(),
                target: "mig-disk0".into(),
                sync: MirrorSyncMode::Full,
                auto_dismiss: Some(false),
                speed: None,
                copy_mode: None,
            }),
            json!({"job-id": "mirror-disk0", "device": "disk0", "target": "mig-disk0", "sync": "full", "auto-dismiss": false})
        );
        assert_eq!(
            args(&BlockJobChangeMirror {
                id: "mirror-disk0".into(),
                copy_mode: MirrorCopyMode::WriteBlocking,
            }),
            json!({"type": "mirror", "id": "mirror-disk0", "copy-mode": "write-blocking"})
        );
        assert_eq!(
            args(&BlockJobCancel {
                device: "mirror-disk0".into(),
                force: None
            }),
            json!({"device": "mirror-disk0"})
        );
        assert_eq!(
            args(&MigrateContinue {
                state: "pre-switchover".into()
            }),
            json!({"state": "pre-switchover"})
        );
        assert_eq!(
            args(&BlockDirtyBitmapAdd {
                node: "disk0".into(),
                name: "qmigrate-writes".into(),
                persistent: Some(false),
            }),
            json!({"node": "disk0", "name": "qmigrate-writes", "persistent": false})
        );
        let bitmap = BlockDirtyBitmap {
            node: "disk0".into(),
            name: "qmigrate-writes".into(),
        };
        let expected = json!({"node": "disk0", "name": "qmigrate-writes"});
        assert_eq!(args(&BlockDirtyBitmapClear(bitmap.clone())), expected);
        assert_eq!(args(&BlockDirtyBitmapRemove(bitmap)), expected);
    }

    /// Replies as QEMU 10 gave them (`query-block` of a `-blockdev` disk, `query-block-jobs`
    /// of a ready mirror).
    #[test]
    fn replies_decode() {
        let block: Vec<BlockInfo> = serde_json::from_value(json!([{
            "io-status": "ok", "device": "", "locked": false, "removable": false,
            "inserted": {"iops_rd": 0, "detect_zeroes": "off", "image": {"virtual-size": 16777216,
                "filename": "/tmp/disk.qcow2", "cluster-size": 65536, "format": "qcow2",
                "actual-size": 200704, "dirty-flag": false}, "iops_wr": 0, "ro": false,
                "node-name": "disk0", "backing_file_depth": 0, "drv": "qcow2", "iops": 0,
                "bps_wr": 0, "write_threshold": 0, "encrypted": false, "bps": 0, "bps_rd": 0,
                "cache": {"no-flush": false, "direct": false, "writeback": true},
                "file": "/tmp/disk.qcow2"},
            "qdev": "/machine/peripheral/vblk0/virtio-backend", "type": "unknown"}]))
        .expect("query-block");
        assert_eq!(block[0].qdev_id(), Some("vblk0"));
        let inserted = block[0].inserted.as_ref().expect("inserted");
        assert_eq!(inserted.node_name, "disk0");
        // An overlay: QEMU spells this member with underscores.
        let overlay: BlockDeviceInfo = serde_json::from_value(json!({
            "node-name": "disk0", "backing_file_depth": 1, "ro": false, "drv": "qcow2",
            "file": "/tmp/top.qcow2", "backing_file": "/tmp/base.qcow2"}))
        .expect("an overlay's BlockDeviceInfo");
        assert_eq!(overlay.backing_file_depth, 1);
        // A destination's exported node with the bitmap that watches the NBD writes (QEMU 10).
        let watched: BlockDeviceInfo = serde_json::from_value(json!({
            "node-name": "disk0", "ro": false, "drv": "qcow2", "file": "/tmp/dst.qcow2",
            "dirty-bitmaps": [{"name": "qmigrate-writes", "recording": true,
                "persistent": false, "busy": false, "granularity": 65536, "count": 1048576}]}))
        .expect("a BlockDeviceInfo with a dirty bitmap");
        assert_eq!(watched.dirty_bitmaps[0].count, 1048576);
        assert_eq!(
            inserted.image.as_ref().map(|i| i.virtual_size),
            Some(16777216)
        );
        let jobs: Vec<BlockJobInfo> = serde_json::from_value(json!([{
            "auto-finalize": true, "io-status": "ok", "device": "mirror-disk0",
            "auto-dismiss": false, "busy": false, "len": 41943040, "offset": 41943040,
            "status": "ready", "paused": false, "speed": 0, "ready": true, "type": "mirror",
            "actively-synced": true}]))
        .expect("query-block-jobs");
        assert_eq!(jobs[0].status, JobStatus::Ready);
        assert_eq!(jobs[0].actively_synced, Some(true));
    }
}
