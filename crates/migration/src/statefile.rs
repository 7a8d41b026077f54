//! Saved VM states on disk: checking a state file before QEMU is asked to load it, and writing
//! one so that a half-written file never looks valid.
//!
//! A state file is QEMU's migration stream, as `migrate` to `file:` writes it: the magic
//! `QEVM`, the stream version (3), then usually a configuration section with the machine type
//! and the capabilities that both sides must agree on (`mapped-ram`, `x-ignore-shared`). Reading
//! that header tells `receive` which capabilities the file needs before QEMU fails on it.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tracing::{debug, info, warn};

use crate::{MigrationPlan, PlanError};

/// QEMU's `QEMU_VM_FILE_MAGIC`: every migration stream starts with it.
const MAGIC: &[u8; 4] = b"QEVM";
/// `QEMU_VM_FILE_VERSION`: the only stream version QEMU loads since 2.x.
const VERSION: u32 = 3;
/// `QEMU_VM_CONFIGURATION`: the section with the machine type.
const SECTION_CONFIGURATION: u8 = 0x07;
/// `QEMU_VM_SUBSECTION`.
const SUBSECTION: u8 = 0x05;
/// Enough for the header and the configuration section of any QEMU.
const HEADER_BYTES: usize = 4096;
/// The block the O_DIRECT probes write and read: a page, the unit mapped-ram's channels use
/// (their file offsets are aligned to 1 MiB, their lengths to pages).
const DIRECT_IO_BLOCK: usize = 4096;

/// What the start of a state file says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateHeader {
    /// The machine type that saved it (`pc-q35-10.0`), when the configuration section is there.
    pub machine: Option<String>,
    /// The capabilities the stream was saved with and the loading QEMU must also have
    /// (`mapped-ram`, `x-ignore-shared`; QEMU records only those that must match).
    pub capabilities: Vec<String>,
}

impl StateHeader {
    /// True when the file was saved with `capability` on.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// A state file that looked loadable: its size and header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFile {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// What its header says.
    pub header: StateHeader,
}

/// Checks a state file before QEMU is asked to load it: it exists, is a regular file we can
/// read, is not empty, and has QEMU's stream header at `offset`. The errors say which check
/// failed, in the operator's terms.
pub fn inspect(path: &Path, offset: u64) -> crate::Result<StateFile> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            bail!("state file {shown} does not exist")
        }
        Err(err) => bail!("state file {shown}: {err}"),
        Ok(meta) => meta,
    };
    if !meta.is_file() {
        bail!("state file {shown} is not a regular file");
    }
    let size = meta.len();
    if size == 0 {
        bail!("state file {shown} is empty (a save that never completed?)");
    }
    if size <= offset {
        bail!("state file {shown} has {size} bytes, nothing after offset {offset}");
    }
    let mut file = File::open(path).with_context(|| format!("cannot read state file {shown}"))?;
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("cannot read state file {shown}"))?;
    let mut head = Vec::with_capacity(HEADER_BYTES);
    file.take(HEADER_BYTES as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read state file {shown}"))?;
    let header = parse_header(&head).with_context(|| {
        let at = if offset == 0 {
            String::new()
        } else {
            format!(" at offset {offset}")
        };
        format!("{shown} is not a QEMU state file{at}")
    })?;
    debug!(file = %shown, size, ?header, "state file checked");
    Ok(StateFile {
        path: path.to_path_buf(),
        size,
        header,
    })
}

/// Reads the stream header and what can be read of the configuration section. Fails only when
/// the magic or the version is wrong; a configuration section it does not understand (a newer
/// QEMU's) just ends what it reports.
pub fn parse_header(bytes: &[u8]) -> crate::Result<StateHeader> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4) != Some(MAGIC.as_slice()) {
        bail!("it does not start with QEMU's QEVM stream header");
    }
    match r.u32() {
        Some(VERSION) => {}
        Some(v) => bail!("its stream version is {v}, QEMU loads version {VERSION}"),
        None => bail!("it ends inside the stream header"),
    }
    let mut header = StateHeader::default();
    if r.u8() != Some(SECTION_CONFIGURATION) {
        return Ok(header);
    }
    let Some(machine) = r.u32().and_then(|len| r.take(len as usize)) else {
        return Ok(header);
    };
    header.machine = Some(String::from_utf8_lossy(machine).into_owned());
    // Subsections of `configuration`, in QEMU's order; each is named, so an unknown one ends
    // the walk (its length is not recorded) without making the file look bad.
    while r.u8() == Some(SUBSECTION) {
        let Some(name) = r.u8().and_then(|len| r.take(usize::from(len))) else {
            break;
        };
        let _version = r.u32();
        match name {
            b"configuration/target-page-bits" => {
                r.u32();
            }
            b"configuration/capabilities" => {
                let count = r.u32().unwrap_or(0);
                for _ in 0..count {
                    match r.u8().and_then(|len| r.take(usize::from(len))) {
                        Some(cap) => header
                            .capabilities
                            .push(String::from_utf8_lossy(cap).into_owned()),
                        None => break,
                    }
                }
            }
            b"configuration/uuid" => {
                r.take(16);
            }
            other => {
                debug!(
                    subsection = %String::from_utf8_lossy(other),
                    "unknown configuration subsection; header read stops here"
                );
                break;
            }
        }
    }
    Ok(header)
}

/// A cursor over the header bytes; every read is `None` past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }
}

/// A state file being saved: QEMU writes `PATH.partial`, which becomes `PATH` only when
/// [`Partial::commit`] finds it complete. Dropped without a commit (the save failed, was
/// cancelled, or we returned early), the partial file is removed, so a state file at `PATH` is
/// always a whole one. An earlier state at `PATH` stays untouched until the rename.
#[derive(Debug)]
pub struct Partial {
    path: PathBuf,
    partial: PathBuf,
    offset: u64,
    committed: bool,
}

impl Partial {
    /// Prepares to save to `path` (absolute): its directory must exist; a stale `PATH.partial`
    /// from an earlier run is removed.
    pub fn new(path: &Path, offset: u64) -> crate::Result<Self> {
        let shown = path.display();
        let Some(name) = path.file_name() else {
            bail!("state file {shown} has no file name");
        };
        let dir = path.parent().unwrap_or(Path::new("/"));
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => bail!(
                "cannot save to {shown}: {} is not a directory",
                dir.display()
            ),
            Err(err) => bail!("cannot save to {shown}: {}: {err}", dir.display()),
        }
        if path.is_dir() {
            bail!("cannot save to {shown}: it is a directory");
        }
        let mut partial_name = name.to_os_string();
        partial_name.push(".partial");
        let partial = dir.join(partial_name);
        remove_if_there(&partial)
            .with_context(|| format!("cannot remove the stale {}", partial.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            partial,
            offset,
            committed: false,
        })
    }

    /// Where QEMU writes.
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    /// The state file it becomes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After QEMU reported `completed`: checks that the partial file holds a stream, flushes it
    /// to disk (a state kept across a reboot must survive it), and renames it to the final
    /// name. Returns the file's size.
    pub fn commit(mut self) -> crate::Result<u64> {
        let written = inspect(&self.partial, self.offset)
            .context("QEMU reported the save completed, but its output is not usable")?;
        let file = File::open(&self.partial)
            .and_then(|f| f.sync_all().map(|()| f))
            .with_context(|| format!("cannot flush {} to disk", self.partial.display()))?;
        drop(file);
        std::fs::rename(&self.partial, &self.path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                self.partial.display(),
                self.path.display()
            )
        })?;
        self.committed = true;
        if let Some(dir) = self.path.parent() {
            // Makes the rename itself durable; a failure here leaves a complete file anyway.
            if let Err(err) = File::open(dir).and_then(|d| d.sync_all()) {
                warn!("cannot flush directory {}: {err}", dir.display());
            }
        }
        Ok(written.size)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        match remove_if_there(&self.partial) {
            Ok(true) => debug!(file = %self.partial.display(), "removed the partial state file"),
            Ok(false) => {}
            Err(err) => warn!(
                "cannot remove the partial state file {}: {err}",
                self.partial.display()
            ),
        }
    }
}

/// Whether QEMU's mapped-ram channels can write state files in `dir` with O_DIRECT (the
/// `direct-io` parameter): a page-aligned page is written with O_DIRECT to a temporary file
/// there. False, with the reason in the debug log, where the file system refuses O_DIRECT
/// (tmpfs before Linux 6.6, many FUSE file systems) or needs a larger alignment; QEMU would
/// fail the save there.
pub fn can_write_direct(dir: &Path) -> bool {
    let probe = || -> io::Result<()> {
        let file = tempfile::Builder::new()
            .prefix(".qmigrate-direct-io-")
            .tempfile_in(dir)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(file.path())?;
        let mut buf = vec![0u8; 2 * DIRECT_IO_BLOCK];
        direct.write_all_at(aligned_block(&mut buf)?, 0)
    };
    match probe() {
        Ok(()) => true,
        Err(err) => {
            debug!(dir = %dir.display(), %err, "no O_DIRECT writes here; direct-io stays off");
            false
        }
    }
}

/// Whether QEMU's mapped-ram channels can read the state file `path` with O_DIRECT (the
/// `direct-io` parameter): its first page is read with O_DIRECT. False, with the reason in the
/// debug log, where the file system refuses it.
pub fn can_read_direct(path: &Path) -> bool {
    let probe = || -> io::Result<()> {
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let mut buf = vec![0u8; 2 * DIRECT_IO_BLOCK];
        direct.read_at(aligned_block(&mut buf)?, 0).map(drop)
    };
    match probe() {
        Ok(()) => true,
        Err(err) => {
            debug!(file = %path.display(), %err, "no O_DIRECT reads here; direct-io stays off");
            false
        }
    }
}

/// The page-aligned [`DIRECT_IO_BLOCK`] inside `buf` (twice that long), as O_DIRECT wants.
fn aligned_block(buf: &mut [u8]) -> io::Result<&mut [u8]> {
    let at = buf.as_ptr().align_offset(DIRECT_IO_BLOCK);
    at.checked_add(DIRECT_IO_BLOCK)
        .and_then(|end| buf.get_mut(at..end))
        .ok_or_else(|| io::Error::other("no aligned block in the probe buffer"))
}

/// Removes a file; `Ok(false)` when there was none.
fn remove_if_there(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// Restoring: the capabilities a state file was saved with are set to match it, whatever the
/// flags said (QEMU cannot load a mapped-ram state without mapped-ram, and the other way round).
/// A header without the configuration section (very old machine types) says nothing about
/// capabilities; the plan stands then.
pub fn fit_plan_to_state(
    mut plan: MigrationPlan,
    state: &StateFile,
) -> Result<MigrationPlan, PlanError> {
    if state.header.machine.is_none() {
        return Ok(plan);
    }
    let shown = state.path.display();
    let asked_ignore_shared = plan.ignore_shared;
    plan.mapped_ram = state.header.has("mapped-ram");
    plan.ignore_shared = state.header.has("x-ignore-shared");
    match (plan.mapped_ram, plan.multifd) {
        (false, Some(_)) => return Err(PlanError::MultifdWithoutMappedRam(shown.to_string())),
        (true, None) => info!(
            "{shown} was saved with mapped-ram: loading it with one channel (N multifd \
             channels would load it in parallel)"
        ),
        _ => {}
    }
    if plan.ignore_shared && !asked_ignore_shared {
        info!("{shown} was saved with x-ignore-shared: setting it here too");
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of a file QEMU 10 saved with mapped-ram (from `xxd`).
    fn mapped_ram_header() -> Vec<u8> {
        let mut b = b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35-10.0".to_vec();
        b.push(0x05);
        b.push(26);
        b.extend_from_slice(b"configuration/capabilities");
        b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 10]);
        b.extend_from_slice(b"mapped-ram");
        b.extend_from_slice(&[0x01, 0, 0, 0, 1, 3]);
        b.extend_from_slice(b"ram");
        b
    }

    #[test]
    fn header_with_capabilities() {
        let h = parse_header(&mapped_ram_header()).expect("a valid header");
        assert_eq!(h.machine.as_deref(), Some("pc-q35-10.0"));
        assert_eq!(h.capabilities, vec!["mapped-ram".to_owned()]);
        assert!(h.has("mapped-ram"));
        assert!(!h.has("x-ignore-shared"));
    }

    #[test]
    fn header_without_capabilities() {
        let mut b = b"QEVM\0\0\0\x03\x07\0\0\0\x0bpc-q35-10.0".to_vec();
        b.extend_from_slice(&[0x01, 0, 0, 0, 1, 3]);
        let h = parse_header(&b).expect("a valid header");
        assert_eq!(h.machine.as_deref(), Some("pc-q35-10.0"));
        assert!(h.capabilities.is_empty());
        // Truncated inside the configuration: still a stream, QEMU will say what is missing.
        assert!(parse_header(&b[..12]).is_ok());
    }

    #[test]
    fn not_a_state_file() {
        let err = parse_header(b"\x1f\x8b\x08\0gzip").expect_err("gzip");
        assert!(err.to_string().contains("QEVM"), "{err}");
        let err = parse_header(b"QEVM\0\0\0\x02").expect_err("v2");
        assert!(err.to_string().contains("version is 2"), "{err}");
        assert!(parse_header(b"QEV").is_err());
    }

    #[test]
    fn inspect_explains_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.bin");
        let err = inspect(&missing, 0).expect_err("missing");
        assert!(err.to_string().ends_with("does not exist"), "{err}");
        let empty = dir.path().join("empty.bin");
        std::fs::write(&empty, b"").expect("write");
        assert!(format!("{:#}", inspect(&empty, 0).expect_err("empty")).contains("is empty"));
        let err = inspect(dir.path(), 0).expect_err("a directory");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let other = dir.path().join("other.bin");
        std::fs::write(&other, b"hello world").expect("write");
        let err = format!("{:#}", inspect(&other, 0).expect_err("not QEVM"));
        assert!(err.contains("is not a QEMU state file"), "{err}");
        let good = dir.path().join("good.bin");
        let mut bytes = vec![0u8; 100];
        bytes.extend_from_slice(&mapped_ram_header());
        std::fs::write(&good, &bytes).expect("write");
        let state = inspect(&good, 100).expect("valid at offset 100");
        assert!(state.header.has("mapped-ram"));
        assert_eq!(state.size, bytes.len() as u64);
        assert!(inspect(&good, 0).is_err());
    }

    #[test]
    fn partial_is_renamed_on_commit_and_removed_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.bin");
        std::fs::write(&path, b"an older state").expect("write");

        let partial = Partial::new(&path, 0).expect("new");
        assert_eq!(partial.partial(), dir.path().join("state.bin.partial"));
        std::fs::write(partial.partial(), b"half").expect("write");
        drop(partial);
        assert!(!dir.path().join("state.bin.partial").exists());
        assert_eq!(std::fs::read(&path).expect("read"), b"an older state");

        let partial = Partial::new(&path, 0).expect("new");
        std::fs::write(partial.partial(), b"not a stream").expect("write");
        assert!(partial.commit().is_err());
        assert!(!dir.path().join("state.bin.partial").exists());
        assert_eq!(std::fs::read(&path).expect("read"), b"an older state");

        let partial = Partial::new(&path, 0).expect("new");
        std::fs::write(partial.partial(), mapped_ram_header()).expect("write");
        let size = partial.commit().expect("commit");
        assert_eq!(size, mapped_ram_header().len() as u64);
        assert_eq!(std::fs::read(&path).expect("read"), mapped_ram_header());
        assert!(!dir.path().join("state.bin.partial").exists());

        let err = Partial::new(&dir.path().join("no/such/dir/state.bin"), 0).expect_err("no dir");
        assert!(err.to_string().contains("cannot save to"), "{err}");
    }

    #[test]
    fn direct_io_probes() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Whether the temporary directory's file system takes O_DIRECT depends on the machine;
        // either way the probe leaves nothing behind, and where it writes, it reads.
        let writes = can_write_direct(dir.path());
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
        let file = dir.path().join("state.bin");
        std::fs::write(&file, mapped_ram_header()).expect("write");
        assert!(!writes || can_read_direct(&file));
        assert!(!can_write_direct(&dir.path().join("no/such/dir")));
        assert!(!can_read_direct(&dir.path().join("missing.bin")));
    }
}
