//! Copying local disks during a migration (`migrate --copy-storage`): QEMU's non-shared
//! storage migration, carried by the tunnel.
//!
//! The destination exports its pre-created images over NBD (writable, on a private Unix
//! socket); the source adds one NBD client node per disk (reaching that socket through
//! `nbd` tunnel connections) and mirrors each disk onto it (`blockdev-mirror sync=full`).
//! Once every mirror is ready they switch to write-blocking (guest writes reach both sides
//! before they complete), the RAM migrates with `pause-before-switchover`, and at
//! `pre-switchover` the mirrors are cancelled without force, which completes them: the
//! destination then holds a point-in-time copy taken with the vCPUs stopped. After the
//! migration the source removes its NBD nodes and the destination stops its NBD server before
//! it starts the guest. Whatever fails before that, the mirrors are cancelled (forced), the NBD
//! nodes removed, and the source VM keeps running on its own disks; the destination's images
//! are then incomplete.
//!
//! The sequence and the reasons for each step: /work/shared/notes/storage-recovery.md §1.3
//! (QEMU 10; `block-job-change` needs QEMU 8.2: on older ones, 7.2 here, the mirrors start in
//! write-blocking mode instead, §1.7).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use qmigrate_qmp::{
    BlockDeviceInfo, BlockDirtyBitmap, BlockDirtyBitmapAdd, BlockDirtyBitmapClear,
    BlockDirtyBitmapRemove, BlockExportAddNbd, BlockExportDel, BlockExportRemoveMode,
    BlockJobCancel, BlockJobChangeMirror, BlockJobInfo, BlockdevAddNbd, BlockdevDel,
    BlockdevMirror, JobDismiss, JobStatus, MirrorCopyMode, MirrorSyncMode, NbdServerStart,
    NbdServerStop, Qmp, QueryBlock, QueryBlockExports, QueryBlockJobs, QueryNamedBlockNodes,
    SocketAddress, SocketAddressLegacy, Yank, YankInstance,
};
use tracing::{debug, info, warn};

use crate::outcome::{DiskProgress, Outcome, Progress, Snapshot, Summary};
use crate::session::{Disk, Export};
use crate::source::{self, Latch};
use crate::{Error, ErrorKind, MigrationPlan, QemuTarget};

/// How often the mirrors are polled while they copy.
const POLL: Duration = Duration::from_millis(250);

/// How long the NBD client waits for a broken connection to come back before the mirror's
/// requests fail (a tunnel outage shorter than this does not stop the copy).
const RECONNECT_DELAY: u32 = 10;

/// How long the final sync (a non-forced cancel at `pre-switchover`) or a forced cancel may
/// take.
const CANCEL_LIMIT: Duration = Duration::from_secs(60);

/// How long a forced cancel may wait on the NBD requests in flight before their connections
/// are yanked (a hung peer would keep them, and the cancel, waiting).
const CANCEL_GRACE: Duration = Duration::from_secs(2);

/// How long the destination waits after the migration for the source's NBD clients to go
/// before it stops its NBD server anyway.
const RELEASE_LIMIT: Duration = Duration::from_secs(15);

/// How long the mirrors may take to be actively synced after the switch to write-blocking.
const SYNC_LIMIT: Duration = Duration::from_secs(120);

/// Which disks `--copy-storage` copies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Selection {
    /// None: the disks are shared (or the VM has none).
    #[default]
    None,
    /// Every writable disk (never read-only drives or CD-ROMs).
    All,
    /// These, by qdev id.
    Only(Vec<String>),
}

/// What `--copy-storage` or `--copy-storage-inc` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageCopy {
    /// Which disks.
    pub selection: Selection,
    /// Only each disk's top image (`blockdev-mirror sync=top`, `--copy-storage-inc`): the
    /// destination's images already have the same backing chain.
    pub incremental: bool,
}

impl StorageCopy {
    /// From the `--copy-storage[=DISK,...]` and `--copy-storage-inc[=DISK,...]` flags (one at
    /// most is given).
    pub fn parse(all: Option<&str>, incremental: Option<&str>) -> StorageCopy {
        StorageCopy {
            selection: Selection::parse(all.or(incremental)),
            incremental: incremental.is_some(),
        }
    }

    /// Whether any disk is to be copied.
    pub fn any(&self) -> bool {
        self.selection != Selection::None
    }
}

impl Selection {
    /// The selection of a `--copy-storage[=DISK,...]` flag: absent, bare (all) or a list.
    pub fn parse(flag: Option<&str>) -> Selection {
        match flag {
            None => Selection::None,
            Some("") => Selection::All,
            Some(list) => Selection::Only(
                list.split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
        }
    }
}

/// A source disk to copy: what the destination is told, and the node to mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDisk {
    /// What the destination is told.
    pub disk: Disk,
    /// The source's root node (the one the device is attached to).
    pub node: String,
}

/// The device's disk as `query-block` describes it: its qdev id, root node and image, or
/// `None` for an empty drive or a device without id.
fn describe(info: &qmigrate_qmp::BlockInfo) -> Option<(String, &BlockDeviceInfo, u64, String)> {
    let id = info.qdev_id()?.to_owned();
    let inserted = info.inserted.as_ref()?;
    let image = inserted.image.as_ref();
    let size = image.map(|i| i.virtual_size).unwrap_or(0);
    let format = image
        .map(|i| i.format.clone())
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| inserted.drv.clone());
    Some((id, inserted, size, format))
}

/// The source's disks that `selection` copies. All: every device with a writable medium that
/// is not removable (CD-ROMs, floppies). Named disks must exist and be writable.
pub async fn source_disks(qmp: &Qmp, copy: &StorageCopy) -> crate::Result<Vec<SourceDisk>> {
    select_disks(qmp, copy, "source").await
}

/// The disks of the VM behind `qmp` (the `side`'s, for messages) that `copy` names, as
/// [`source_disks`] picks them.
pub async fn select_disks(
    qmp: &Qmp,
    copy: &StorageCopy,
    side: &str,
) -> crate::Result<Vec<SourceDisk>> {
    let selection = &copy.selection;
    if *selection == Selection::None {
        return Ok(Vec::new());
    }
    let devices = qmp
        .execute(&QueryBlock)
        .await
        .with_context(|| format!("query-block failed on the {side}"))?;
    let mut disks = Vec::new();
    let mut known = BTreeMap::new();
    for info in &devices {
        let Some((id, inserted, size, format)) = describe(info) else {
            continue;
        };
        let copyable = !inserted.ro && !info.removable;
        known.insert(id.clone(), copyable);
        let wanted = match selection {
            Selection::All => copyable,
            Selection::Only(ids) => ids.contains(&id),
            Selection::None => false,
        };
        if !wanted {
            continue;
        }
        if !copyable {
            return Err(Error::new(
                ErrorKind::Usage,
                anyhow!(
                    "disk {id} is read-only or a removable medium (a CD-ROM): it is never copied; \
                     leave it out of the list"
                ),
            ));
        }
        disks.push(SourceDisk {
            disk: Disk {
                id,
                size,
                read_only: false,
                format,
                incremental: copy.incremental,
            },
            node: inserted.node_name.clone(),
        });
    }
    if let Selection::Only(ids) = selection {
        for id in ids {
            if !known.contains_key(id) {
                let names: Vec<&String> = known.keys().collect();
                return Err(Error::new(
                    ErrorKind::Usage,
                    anyhow!(
                        "the {side} VM has no disk with qdev id {id:?} (its disks: {names:?}); \
                         name disks by their -device id"
                    ),
                ));
            }
        }
    }
    if disks.is_empty() {
        return Err(Error::new(
            ErrorKind::Usage,
            anyhow!("the {side} VM has no writable disk to copy"),
        ));
    }
    Ok(disks)
}

/// The NBD export's name of a disk.
fn export_name(disk: &str) -> String {
    disk.to_owned()
}

/// The NBD export's id (for `block-export-del`).
fn export_id(disk: &str) -> String {
    format!("qmigrate-{disk}")
}

/// Destination: checks that the destination VM has each of `disks` (by qdev id), writable and
/// of the same size, then starts its NBD server on `socket` with a writable export of each.
/// Refuses a mismatch before touching anything, naming the disk, both sizes and the
/// `qemu-img create` that makes a fitting image.
pub async fn export_disks(qmp: &Qmp, disks: &[Disk], socket: &Path) -> anyhow::Result<Vec<Export>> {
    let devices = qmp
        .execute(&QueryBlock)
        .await
        .context("query-block failed on the destination")?;
    let mut nodes = Vec::new();
    for disk in disks {
        let found = devices
            .iter()
            .filter_map(describe)
            .find(|(id, ..)| *id == disk.id);
        let Some((_, inserted, size, format)) = found else {
            bail!(
                "the destination VM has no disk {:?} (qdev id): start it with the same devices \
                 as the source, each with its own image of the same size",
                disk.id
            );
        };
        if inserted.ro {
            bail!(
                "disk {} is read-only on the destination: the copy needs to write it",
                disk.id
            );
        }
        if disk.incremental && inserted.backing_file_depth == 0 {
            bail!(
                "disk {}: only the source's top image is copied (--copy-storage-inc), but the \
                 destination's image has no backing file: create it over a copy of the source's \
                 backing chain (`qemu-img create -f qcow2 -b BASE -F FORMAT IMAGE {}`), or copy \
                 the whole disk with --copy-storage",
                disk.id,
                disk.size
            );
        }
        if size != disk.size {
            let file = if inserted.file.is_empty() {
                "IMAGE".to_owned()
            } else {
                inserted.file.clone()
            };
            bail!(
                "disk {}: the destination's image is {} bytes, the source's {} bytes; the copy \
                 needs the same size: `qemu-img create -f {} {} {}` (on the destination, with its \
                 QEMU stopped)",
                disk.id,
                size,
                disk.size,
                format,
                file,
                disk.size
            );
        }
        nodes.push((disk.id.clone(), inserted.node_name.clone()));
    }
    qmp.execute(&NbdServerStart {
        addr: SocketAddressLegacy::Unix {
            path: socket.display().to_string(),
        },
        max_connections: None,
    })
    .await
    .context("the destination QEMU cannot start its NBD server (nbd-server-start)")?;
    let mut exports = Vec::new();
    for (id, node) in nodes {
        let added = qmp
            .execute(&BlockExportAddNbd {
                id: export_id(&id),
                node_name: node.clone(),
                writable: true,
                name: Some(export_name(&id)),
            })
            .await;
        if let Err(err) = added {
            stop_nbd_server(qmp).await;
            return Err(anyhow!(err).context(format!(
                "the destination QEMU cannot export disk {id} (node {node}) over NBD"
            )));
        }
        exports.push(Export {
            name: export_name(&id),
            disk: id,
        });
    }
    info!(socket = %socket.display(), ?exports, "NBD exports ready");
    Ok(exports)
}

/// Destination: stops the NBD server (removing every export), so that the guest's device can
/// take its image again; before `cont`. A failure is logged: it means there was none.
pub async fn stop_nbd_server(qmp: &Qmp) {
    match qmp.execute(&NbdServerStop).await {
        Ok(_) => info!("NBD server stopped"),
        Err(err) => warn!("nbd-server-stop: {err}"),
    }
}

/// The export names a destination gives `disks` (`receive --copy-storage` exports each disk
/// under its qdev id), for a source that has no control connection to be told them.
pub fn exports_of(disks: &[SourceDisk]) -> Vec<Export> {
    disks
        .iter()
        .map(|d| Export {
            disk: d.disk.id.clone(),
            name: export_name(&d.disk.id),
        })
        .collect()
}

/// Source: refuses an NBD node (`nodes[i]`, the export of `disks[i]`) whose size is not its
/// disk's, naming the disk, both sizes and the `qemu-img create` that makes a fitting image.
async fn check_sizes(qmp: &Qmp, disks: &[SourceDisk], nodes: &[String]) -> crate::Result<()> {
    let known = qmp
        .execute(&QueryNamedBlockNodes { flat: Some(true) })
        .await
        .context("query-named-block-nodes failed on the source")?;
    for (d, node) in disks.iter().zip(nodes) {
        let size = known
            .iter()
            .find(|n| n.node_name == *node)
            .and_then(|n| n.image.as_ref())
            .map(|i| i.virtual_size);
        match size {
            Some(size) if size != d.disk.size => {
                return Err(Error::new(
                    ErrorKind::Refused,
                    anyhow!(
                        "disk {}: the destination's image is {size} bytes, the source's {} bytes; \
                         the copy needs the same size: `qemu-img create -f {} IMAGE {}` on the \
                         destination (with its QEMU stopped), then start it on that image",
                        d.disk.id,
                        d.disk.size,
                        d.disk.format,
                        d.disk.size
                    ),
                ))
            }
            Some(_) => {}
            None => warn!(%node, "the NBD node's size is unknown; not checked"),
        }
    }
    Ok(())
}

/// Removes NBD client nodes that no mirror uses yet.
async fn remove_nodes(qmp: &Qmp, nodes: &[String]) {
    for node in nodes {
        if let Err(err) = qmp
            .execute(&BlockdevDel {
                node_name: node.clone(),
            })
            .await
        {
            warn!(%node, "blockdev-del: {err}");
        }
    }
}

/// Destination, after an incoming migration that copied disks: stops the NBD server (its
/// exports hold the images, so the guest must not start before), then with `start` sends
/// `cont` to a completed, paused destination, as [`crate::destination::follow_incoming`] does
/// for the others; `outcome` records it and the VM's state.
pub async fn finish_incoming(
    qmp: &Qmp,
    outcome: &mut crate::destination::IncomingOutcome,
    start: bool,
) -> anyhow::Result<()> {
    if outcome.status == qmigrate_qmp::MigrationStatus::Completed {
        release_exports(qmp).await;
    }
    stop_nbd_server(qmp).await;
    let state = crate::monitor::query_status(qmp).await?;
    if outcome.status == qmigrate_qmp::MigrationStatus::Completed && start && !state.running {
        qmp.execute(&qmigrate_qmp::Cont)
            .await
            .context("cont on the destination failed")?;
        outcome.started = true;
    }
    outcome.run_state = crate::monitor::query_status(qmp).await?.status;
    Ok(())
}

/// Destination, after a completed migration: removes each export once no NBD client uses it
/// (`block-export-del` in `safe` mode fails while one is connected), for up to
/// [`RELEASE_LIMIT`]. The source removes its NBD nodes just after the migration completes;
/// stopping the server before would make them reconnect until their reconnect delay ran out,
/// which holds up the source's `blockdev-del` for as long.
async fn release_exports(qmp: &Qmp) {
    let deadline = Instant::now() + RELEASE_LIMIT;
    loop {
        let exports = match qmp.execute(&QueryBlockExports).await {
            Ok(exports) => exports,
            Err(err) => {
                debug!("query-block-exports: {err}");
                return;
            }
        };
        let ours: Vec<_> = exports
            .iter()
            .filter(|e| e.id.starts_with("qmigrate-") && !e.shutting_down)
            .collect();
        if ours.is_empty() {
            return;
        }
        for e in ours {
            let del = BlockExportDel {
                id: e.id.clone(),
                mode: Some(BlockExportRemoveMode::Safe),
            };
            if let Err(err) = qmp.execute(&del).await {
                debug!(export = %e.id, "block-export-del: {err}");
            }
        }
        if Instant::now() > deadline {
            warn!(
                "the source's NBD clients were still connected {} s after the migration; \
                 stopping the NBD server anyway",
                RELEASE_LIMIT.as_secs()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The dirty bitmap the destination puts on each exported node to see the source's NBD writes
/// (the NBD server keeps no count of them, but every write marks a node's bitmaps).
const WRITES_BITMAP: &str = "qmigrate-writes";

/// How often the destination looks at its bitmaps while the disks are copied.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// Destination without a control connection (`receive --copy-storage`): QMP cannot tell a
/// source that died during the disk copy from a slow copy, so this watches the source's NBD
/// writes. A non-persistent dirty bitmap on each exported node, looked at and cleared every
/// second, shows whether any arrived; [`CopyWatch::stalled`] gives up when none has for the
/// stall timeout while the RAM migration has not begun (an idle guest's mirrors are ready and
/// the RAM migration starts within moments, so the watch ends before a false alarm). A QEMU
/// that cannot add a bitmap is not watched (a warning says so).
#[derive(Debug)]
pub struct CopyWatch {
    /// The exported nodes that carry the bitmap.
    nodes: Vec<String>,
    stall: Duration,
    /// The bitmaps are gone (removed, or the watch never started).
    removed: std::sync::atomic::AtomicBool,
}

impl CopyWatch {
    /// Adds the bitmap to each node of the NBD exports [`export_disks`] made; `stall` zero:
    /// no watch.
    pub async fn start(qmp: &Qmp, stall: Duration) -> CopyWatch {
        let mut nodes = Vec::new();
        if !stall.is_zero() {
            match qmp.execute(&QueryBlockExports).await {
                Ok(exports) => {
                    for e in exports.iter().filter(|e| e.id.starts_with("qmigrate-")) {
                        let added = qmp
                            .execute(&BlockDirtyBitmapAdd {
                                node: e.node_name.clone(),
                                name: WRITES_BITMAP.to_owned(),
                                persistent: Some(false),
                            })
                            .await;
                        if let Err(err) = added {
                            // A disk left out would look idle while only it is copied.
                            warn!(
                                node = %e.node_name,
                                "block-dirty-bitmap-add: {err}; the disk copy is not watched: a \
                                 source that stops sending is not noticed"
                            );
                            let watch = CopyWatch::new(nodes, stall);
                            watch.remove(qmp).await;
                            return watch;
                        }
                        nodes.push(e.node_name.clone());
                    }
                }
                Err(err) => warn!("query-block-exports: {err}; the disk copy is not watched"),
            }
        }
        CopyWatch::new(nodes, stall)
    }

    /// A watch of the bitmaps on `nodes` (none: no watch).
    fn new(nodes: Vec<String>, stall: Duration) -> CopyWatch {
        CopyWatch {
            removed: nodes.is_empty().into(),
            nodes,
            stall,
        }
    }

    /// Resolves when no disk data has arrived for the stall timeout while the RAM migration
    /// has not begun, with what to tell the operator. Once the RAM migration has begun it
    /// removes the bitmaps and never resolves (nor does it without bitmaps).
    pub async fn stalled(&self, qmp: &Qmp) -> anyhow::Error {
        let started = Instant::now();
        let mut last_write: Option<Instant> = None;
        let mut tick = tokio::time::interval(WATCH_POLL);
        while !self.removed.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            match crate::monitor::query_migrate(qmp).await {
                Ok(info) => {
                    let status = crate::monitor::status_of(&info);
                    if !matches!(
                        status,
                        qmigrate_qmp::MigrationStatus::None | qmigrate_qmp::MigrationStatus::Setup
                    ) {
                        debug!(%status, "the RAM migration began: the disk copy is not watched any more");
                        self.remove(qmp).await;
                        break;
                    }
                }
                Err(err) => debug!("query-migrate: {err:#}"),
            }
            if self.written(qmp).await {
                last_write = Some(Instant::now());
            }
            let quiet = last_write.unwrap_or(started).elapsed();
            if quiet >= self.stall {
                let secs = self.stall.as_secs_f64();
                return match last_write {
                    None => anyhow!(
                        "no disk data arrived within {secs:.0} s of the export (is `send \
                         --copy-storage` running, through a `tunnel-client --copy-storage`?)"
                    ),
                    Some(_) => anyhow!(
                        "the source stopped sending disk data: nothing arrived for {secs:.0} s \
                         while the disks were copied (`send` ended, or its host or the link is \
                         down)"
                    ),
                };
            }
        }
        std::future::pending().await
    }

    /// Whether any bitmap has marks; clears them.
    async fn written(&self, qmp: &Qmp) -> bool {
        let nodes = match qmp
            .execute(&QueryNamedBlockNodes { flat: Some(true) })
            .await
        {
            Ok(nodes) => nodes,
            Err(err) => {
                debug!("query-named-block-nodes: {err}");
                return false;
            }
        };
        let mut written = false;
        for n in nodes.iter().filter(|n| self.nodes.contains(&n.node_name)) {
            let marked = n
                .dirty_bitmaps
                .iter()
                .any(|b| b.name == WRITES_BITMAP && b.count > 0);
            if marked {
                written = true;
                let clear = BlockDirtyBitmapClear(self.bitmap(&n.node_name));
                if let Err(err) = qmp.execute(&clear).await {
                    debug!(node = %n.node_name, "block-dirty-bitmap-clear: {err}");
                }
            }
        }
        written
    }

    fn bitmap(&self, node: &str) -> BlockDirtyBitmap {
        BlockDirtyBitmap {
            node: node.to_owned(),
            name: WRITES_BITMAP.to_owned(),
        }
    }

    /// Removes the bitmaps (once; a failure is logged).
    pub async fn remove(&self, qmp: &Qmp) {
        if self
            .removed
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        for node in &self.nodes {
            if let Err(err) = qmp
                .execute(&BlockDirtyBitmapRemove(self.bitmap(node)))
                .await
            {
                debug!(%node, "block-dirty-bitmap-remove: {err}");
            }
        }
    }
}

/// One disk's mirror on the source.
#[derive(Debug, Clone)]
struct Mirror {
    disk: String,
    size: u64,
    job: String,
    node: String,
}

/// The source's mirrors of one migration, from [`Mirrors::start`] to [`Mirrors::remove`] or
/// [`Mirrors::abort`].
#[derive(Debug)]
pub struct Mirrors {
    mirrors: Vec<Mirror>,
    /// Started in write-blocking mode: the QEMU cannot switch a running mirror
    /// (`block-job-change` came in 8.2), so guest writes go through from the start.
    write_blocking: bool,
    /// The last progress seen of each (kept after the jobs are gone, for the summary).
    last: Mutex<Vec<DiskProgress>>,
}

impl Mirrors {
    /// Adds an NBD client node per disk (connecting through `socket`, the in-process
    /// listener whose connections become `nbd` tunnel connections), checks that each export
    /// has its disk's size, and starts the mirrors. On a failure, what was made is undone.
    /// `nbd_error` says why the last tunnel connection failed, if one did (a `blockdev-add`
    /// then fails without saying).
    pub async fn start(
        qmp: &Qmp,
        disks: &[SourceDisk],
        exports: &[Export],
        socket: &Path,
        nbd_error: impl Fn() -> Option<String>,
    ) -> crate::Result<Mirrors> {
        let v = &qmp.greeting().version.qemu;
        let write_blocking = (v.major, v.minor) < (8, 2);
        let mut made = Mirrors {
            mirrors: Vec::new(),
            write_blocking,
            last: Mutex::new(Vec::new()),
        };
        let mut nodes = Vec::new();
        for d in disks {
            let Some(export) = exports.iter().find(|e| e.disk == d.disk.id) else {
                remove_nodes(qmp, &nodes).await;
                bail!(
                    "the destination did not export disk {} (its exports: {:?})",
                    d.disk.id,
                    exports
                );
            };
            let node = format!("qmigrate-nbd-{}", d.disk.id);
            let added = qmp
                .execute(&BlockdevAddNbd {
                    node_name: node.clone(),
                    server: SocketAddress::Unix {
                        path: socket.display().to_string(),
                    },
                    export: export.name.clone(),
                    reconnect_delay: Some(RECONNECT_DELAY),
                    discard: Some("unmap".into()),
                })
                .await;
            if let Err(err) = added {
                remove_nodes(qmp, &nodes).await;
                let why = nbd_error()
                    .map(|e| format!(" (the tunnel: {e})"))
                    .unwrap_or_default();
                return Err(Error::new(
                    ErrorKind::Failed,
                    anyhow!(err).context(format!(
                        "the source QEMU cannot reach the destination's NBD export of disk {}{why}",
                        d.disk.id
                    )),
                ));
            }
            nodes.push(node);
        }
        // Before anything is written: each export must have its disk's size (the destination
        // checked its own when a control connection told it the sizes; `receive` could not).
        if let Err(err) = check_sizes(qmp, disks, &nodes).await {
            remove_nodes(qmp, &nodes).await;
            return Err(err);
        }
        for (d, node) in disks.iter().zip(nodes.iter()) {
            let job = format!("qmigrate-mirror-{}", d.disk.id);
            let started = qmp
                .execute(&BlockdevMirror {
                    job_id: job.clone(),
                    device: d.node.clone(),
                    target: node.clone(),
                    sync: if d.disk.incremental {
                        MirrorSyncMode::Top
                    } else {
                        MirrorSyncMode::Full
                    },
                    auto_dismiss: Some(false),
                    speed: None,
                    copy_mode: write_blocking.then_some(MirrorCopyMode::WriteBlocking),
                })
                .await;
            if let Err(err) = started {
                made.abort(qmp).await;
                let left: Vec<String> = nodes
                    .iter()
                    .filter(|n| !made.mirrors.iter().any(|m| m.node == **n))
                    .cloned()
                    .collect();
                remove_nodes(qmp, &left).await;
                return Err(anyhow!(err)
                    .context(format!("blockdev-mirror of disk {} failed", d.disk.id))
                    .into());
            }
            made.mirrors.push(Mirror {
                disk: d.disk.id.clone(),
                size: d.disk.size,
                job,
                node: node.clone(),
            });
        }
        info!(
            disks = made.mirrors.len(),
            write_blocking, "mirrors started"
        );
        Ok(made)
    }

    /// The disks' progress from a `query-block-jobs` reply (remembered for the summary).
    fn progress_of(&self, jobs: &[BlockJobInfo]) -> Vec<DiskProgress> {
        let Ok(mut last) = self.last.lock() else {
            return Vec::new();
        };
        let now: Vec<DiskProgress> = self
            .mirrors
            .iter()
            .map(|m| {
                let before = last.iter().find(|p| p.disk == m.disk);
                match jobs.iter().find(|j| j.device == m.job) {
                    Some(j) => DiskProgress {
                        disk: m.disk.clone(),
                        size: m.size,
                        copied: j.offset,
                        to_copy: j.len,
                        ready: j.ready || before.is_some_and(|b| b.ready),
                    },
                    None => before.cloned().unwrap_or(DiskProgress {
                        disk: m.disk.clone(),
                        size: m.size,
                        copied: 0,
                        to_copy: 0,
                        ready: false,
                    }),
                }
            })
            .collect();
        last.clone_from(&now);
        now
    }

    /// The disks' progress now (the last known for a job that has gone).
    pub async fn progress(&self, qmp: &Qmp) -> Vec<DiskProgress> {
        match qmp.execute(&QueryBlockJobs).await {
            Ok(jobs) => self.progress_of(&jobs),
            Err(err) => {
                debug!("query-block-jobs: {err}");
                self.last.lock().map(|l| l.clone()).unwrap_or_default()
            }
        }
    }

    /// The last progress seen: the bytes copied per disk, for the summary.
    pub fn last(&self) -> Vec<DiskProgress> {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// A job that ended (concluded, or gone) before it was asked to: its error.
    fn failed(&self, jobs: &[BlockJobInfo]) -> Option<String> {
        self.mirrors
            .iter()
            .find_map(|m| match jobs.iter().find(|j| j.device == m.job) {
                None => Some(format!("the mirror of disk {} disappeared", m.disk)),
                Some(j) if j.status == JobStatus::Concluded || j.status == JobStatus::Aborting => {
                    Some(format!(
                        "the copy of disk {} failed: {}",
                        m.disk,
                        j.error.as_deref().unwrap_or("the job ended")
                    ))
                }
                Some(_) => None,
            })
    }

    /// Waits until every mirror is ready (the first full copy is done), reporting progress,
    /// then switches each to write-blocking and waits until each is actively synced: from then
    /// on the guest cannot dirty a disk faster than it is copied (mirrors started in
    /// write-blocking mode, on QEMU before 8.2, are in sync once ready). Ends with `Cancelled` when
    /// `cancel` resolves; the caller then [`Mirrors::abort`]s.
    pub async fn converge(
        &self,
        qmp: &Qmp,
        progress: &mut dyn Progress,
        cancel: impl Future<Output = String>,
    ) -> crate::Result<()> {
        let mut cancel = pin!(cancel);
        let started = Instant::now();
        let mut switched = false;
        let mut switched_at = Instant::now();
        let mut tick = tokio::time::interval(POLL);
        loop {
            tokio::select! {
                reason = &mut cancel => {
                    return Err(Error::new(ErrorKind::Cancelled, anyhow!("{reason} while copying the disks")));
                }
                _ = tick.tick() => {}
            }
            let jobs = qmp
                .execute(&QueryBlockJobs)
                .await
                .context("query-block-jobs failed")?;
            let disks = self.progress_of(&jobs);
            progress.tick(&Snapshot {
                elapsed: started.elapsed(),
                disks,
                ..Snapshot::default()
            });
            if let Some(why) = self.failed(&jobs) {
                bail!("{why}");
            }
            let mine = || {
                jobs.iter()
                    .filter(|j| self.mirrors.iter().any(|m| m.job == j.device))
            };
            if !switched {
                if mine().all(|j| j.ready) {
                    // Write-blocking from the start (QEMU before 8.2): ready is in sync.
                    let to_switch = if self.write_blocking {
                        &[][..]
                    } else {
                        &self.mirrors[..]
                    };
                    for m in to_switch {
                        qmp.execute(&BlockJobChangeMirror {
                            id: m.job.clone(),
                            copy_mode: MirrorCopyMode::WriteBlocking,
                        })
                        .await
                        .with_context(|| {
                            format!(
                                "cannot switch the mirror of disk {} to write-blocking \
                                 (block-job-change needs QEMU 8.2)",
                                m.disk
                            )
                        })?;
                    }
                    switched = true;
                    switched_at = Instant::now();
                    progress.note(&format!(
                        "disks copied ({:.1} s); their mirrors now write through: migrating the RAM",
                        started.elapsed().as_secs_f64()
                    ));
                }
            } else if mine().all(|j| j.actively_synced.unwrap_or(true)) {
                return Ok(());
            } else if switched_at.elapsed() > SYNC_LIMIT {
                bail!(
                    "the disk mirrors were not in sync {} s after switching to write-blocking",
                    SYNC_LIMIT.as_secs()
                );
            }
        }
    }

    /// At `pre-switchover` (vCPUs stopped): cancels each mirror without force, which finishes
    /// its last sync and completes it, waits for all to conclude without error, and dismisses
    /// them. Also the way to finish them after a migration that completed without pausing.
    pub async fn complete(&self, qmp: &Qmp) -> crate::Result<()> {
        for m in &self.mirrors {
            qmp.execute(&BlockJobCancel {
                device: m.job.clone(),
                force: None,
            })
            .await
            .with_context(|| format!("cannot complete the mirror of disk {}", m.disk))?;
        }
        let jobs = self.wait_concluded(qmp, CANCEL_LIMIT).await?;
        let _ = self.progress_of(&jobs);
        let mut failure = None;
        for m in &self.mirrors {
            if let Some(j) = jobs.iter().find(|j| j.device == m.job) {
                if let Some(err) = &j.error {
                    failure.get_or_insert(format!("the copy of disk {} failed: {err}", m.disk));
                }
            }
        }
        self.dismiss(qmp).await;
        if let Some(why) = failure {
            bail!("{why}");
        }
        Ok(())
    }

    /// Waits until every job has concluded (or gone); the last `query-block-jobs` reply.
    async fn wait_concluded(&self, qmp: &Qmp, limit: Duration) -> crate::Result<Vec<BlockJobInfo>> {
        let deadline = Instant::now() + limit;
        loop {
            let jobs = qmp
                .execute(&QueryBlockJobs)
                .await
                .context("query-block-jobs failed")?;
            let done = self.mirrors.iter().all(|m| {
                jobs.iter()
                    .find(|j| j.device == m.job)
                    .is_none_or(|j| j.status == JobStatus::Concluded)
            });
            if done {
                return Ok(jobs);
            }
            if Instant::now() > deadline {
                bail!("the disk mirrors did not end within {} s", limit.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn dismiss(&self, qmp: &Qmp) {
        for m in &self.mirrors {
            if let Err(err) = qmp.execute(&JobDismiss { id: m.job.clone() }).await {
                debug!(job = %m.job, "job-dismiss: {err}");
            }
        }
    }

    /// Removes the NBD client nodes (closing their connections), after the mirrors ended.
    pub async fn remove(&self, qmp: &Qmp) {
        for m in &self.mirrors {
            if let Err(err) = qmp
                .execute(&BlockdevDel {
                    node_name: m.node.clone(),
                })
                .await
            {
                warn!(node = %m.node, "blockdev-del: {err}");
            }
        }
    }

    /// Abandons the copy: cancels every mirror with force, dismisses them and removes the
    /// NBD nodes. The source's disks are untouched; the destination's images are incomplete.
    pub async fn abort(&self, qmp: &Qmp) {
        for m in &self.mirrors {
            if let Err(err) = qmp
                .execute(&BlockJobCancel {
                    device: m.job.clone(),
                    force: Some(true),
                })
                .await
            {
                debug!(job = %m.job, "block-job-cancel: {err}");
            }
        }
        // A forced cancel still waits for the NBD requests in flight, which a peer that hangs
        // (a stopped tunnel-server) never answers: cut their connections, and QEMU fails the
        // requests within its reconnect delay.
        if self.wait_concluded(qmp, CANCEL_GRACE).await.is_err() {
            let instances = self
                .mirrors
                .iter()
                .map(|m| YankInstance::block_node(&m.node))
                .collect();
            info!("the disk mirrors wait on their NBD connections: yanking them");
            if let Err(err) = qmp.execute(&Yank { instances }).await {
                warn!("yank of the NBD connections: {err}");
            }
            if let Err(err) = self.wait_concluded(qmp, CANCEL_LIMIT).await {
                warn!("{err:#}");
            }
        }
        self.dismiss(qmp).await;
        self.remove(qmp).await;
    }
}

/// What a migration that copied disks and did not complete leaves behind.
pub const INCOMPLETE: &str =
    "the destination's disk images are incomplete (the source VM keeps its own disks)";

/// Where the source's NBD client nodes reach the destination's exports.
#[derive(Clone, Copy)]
pub struct NbdRoute<'a> {
    /// The destination's exports of the disks.
    pub exports: &'a [Export],
    /// The local Unix socket whose connections the tunnel carries to the destination's NBD
    /// server.
    pub socket: &'a Path,
    /// Why the last tunnel connection for NBD failed, if one did.
    pub nbd_error: &'a (dyn Fn() -> Option<String> + Send + Sync),
}

impl std::fmt::Debug for NbdRoute<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdRoute")
            .field("exports", &self.exports)
            .field("socket", &self.socket)
            .finish()
    }
}

/// A migration with its disks, on the source (`migrate --copy-storage` and `send
/// --copy-storage` alike): the disk phase (mirrors onto the destination's NBD exports until
/// every disk is copied and kept in sync), then the RAM ([`source::run_migration`] with
/// `pause-before-switchover`, the mirrors completed at `pre-switchover`), then the NBD nodes
/// removed. `cancel` (awaited in both phases) cancels.
///
/// Whatever fails or is cancelled, the mirrors are abandoned and the NBD nodes removed; the
/// error or the summary's outcome then says the destination's images are incomplete. The
/// summary has the bytes copied per disk.
#[allow(clippy::too_many_arguments)] // run_migration's own, and the disks
pub async fn run_with_disks<F: Future<Output = String>>(
    qmp: &Qmp,
    plan: &MigrationPlan,
    endpoint: &QemuTarget,
    state: &source::SourceState,
    follow: &source::FollowOptions,
    disks: &[SourceDisk],
    route: NbdRoute<'_>,
    progress: &mut dyn Progress,
    cancel: &mut Latch<F>,
) -> crate::Result<Summary> {
    let mirrors = Mirrors::start(qmp, disks, route.exports, route.socket, route.nbd_error)
        .await
        .map_err(incomplete)?;
    if let Err(err) = mirrors.converge(qmp, progress, cancel.wait()).await {
        mirrors.abort(qmp).await;
        return Err(incomplete(err));
    }
    let mirrors = Arc::new(mirrors);
    let plan = MigrationPlan {
        pause_before_switchover: true,
        ..plan.clone()
    };
    let follow = source::FollowOptions {
        storage: Some(mirrors.clone()),
        ..follow.clone()
    };
    let result = source::run_migration(
        qmp,
        &plan,
        endpoint,
        state,
        &follow,
        progress,
        cancel.wait(),
    )
    .await;
    match result {
        Ok(mut summary) => {
            finish(qmp, &mirrors, &mut summary).await;
            Ok(summary)
        }
        Err(err) => {
            mirrors.abort(qmp).await;
            Err(incomplete(err))
        }
    }
}

/// `err`, saying that the destination's images are incomplete (its kind kept).
fn incomplete(err: Error) -> Error {
    Error::from(err.into_anyhow().context(INCOMPLETE))
}

/// After the RAM migration: a completed one completes any mirror still running (a QEMU that
/// did not pause before switchover) and removes the NBD nodes; any other abandons the copy.
/// The summary gets the bytes copied per disk, and says the images are incomplete when they
/// are.
async fn finish(qmp: &Qmp, mirrors: &Mirrors, summary: &mut Summary) {
    if summary.outcome == Outcome::Completed {
        let running = qmp.execute(&QueryBlockJobs).await.is_ok_and(|jobs| {
            jobs.iter()
                .any(|j| mirrors.mirrors.iter().any(|m| m.job == j.device))
        });
        if running {
            if let Err(err) = mirrors.complete(qmp).await {
                warn!("completing the disk mirrors after the migration: {err:#}");
            }
        }
        mirrors.remove(qmp).await;
    } else {
        mirrors.abort(qmp).await;
        summary.outcome = match std::mem::replace(&mut summary.outcome, Outcome::Completed) {
            Outcome::Failed(r) => Outcome::Failed(format!("{r}; {INCOMPLETE}")),
            Outcome::Cancelled(r) => Outcome::Cancelled(format!("{r}; {INCOMPLETE}")),
            other => other,
        };
    }
    summary.disks = mirrors.last();
}
