//! The guest's kernel and initramfs, built from Debian packages and the workload's source, and
//! cached under `target/guest/<key>/`.
//!
//! The recipe (verified in the storage-recovery notes, section 3): the kernel of
//! `linux-image-cloud-amd64` (its ABI package resolved with `apt-cache depends`), and
//! `busybox-static`, each fetched with `apt-get download` and unpacked with `dpkg-deb -x` (never
//! installed on the host); the workload built with `gcc -O2 -static`; the initramfs an
//! uncompressed-module tree packed by busybox's `cpio -o -H newc`, then `gzip`.
//!
//! The key hashes the workload's source, the init script and the recipe's version, so a change
//! to either builds a new image; the kernel is whatever Debian has when the image is first built
//! (named in `manifest`). Building takes a file lock (`target/guest/build.lock`) and renames a
//! finished temp dir into place, so test binaries and threads that ask at the same time build it
//! once and never see half an image.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::flock;

/// The workload's C source, built into the initramfs.
pub const WORKLOAD_C: &str = include_str!("../../guest/workload.c");
/// The guest's `/init` (busybox sh).
pub const INIT: &str = include_str!("../../guest/init");
/// Bump when the recipe below changes in a way the sources above do not show.
const RECIPE: &str = "1";
/// The kernel modules the init loads, in dependency order (`depends=` of each `.ko`).
pub const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];
/// The longest wait for another process's build of the same image.
const BUILD_LOCK_WAIT: Duration = Duration::from_secs(600);

/// A built guest: what `-kernel` and `-initrd` take.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The cache directory (`target/guest/<key>`).
    pub dir: PathBuf,
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (`initrd.gz`).
    pub initrd: PathBuf,
    /// What it was built from (`manifest`: the Debian package versions).
    pub manifest: String,
}

/// Why there is no guest image.
#[derive(Debug, Clone)]
pub enum Unavailable {
    /// A prerequisite is absent (a tool, or the Debian archive): a skip locally, a failure
    /// under `CI=true`.
    Missing(String),
    /// The build itself failed: always a failure.
    Failed(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Missing(why) => write!(f, "prerequisite missing: {why}"),
            Unavailable::Failed(why) => write!(f, "build failed: {why}"),
        }
    }
}

/// The cache key of the current sources.
pub fn key() -> String {
    let mut h = Sha256::new();
    for part in [RECIPE, WORKLOAD_C, INIT] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `target/guest` of the workspace.
pub fn cache_root() -> PathBuf {
    crate::qemu::workspace_root().join("target/guest")
}

/// The guest image, built on first use in this checkout (see the module doc). Every caller in
/// the process gets the same answer; only the first waits.
pub fn image() -> Result<GuestImage, Unavailable> {
    static IMAGE: OnceLock<Result<GuestImage, Unavailable>> = OnceLock::new();
    IMAGE
        .get_or_init(|| build_cached(&cache_root(), &key()))
        .clone()
}

/// Turns an unavailable image into a skip (locally, when a prerequisite is missing) or a
/// failure (under `CI=true`, or when the build failed), like [`crate::qemu::require`].
pub fn require() -> Option<GuestImage> {
    match image() {
        Ok(img) => Some(img),
        Err(Unavailable::Missing(why)) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("skipping: no guest image: {why}");
            None
        }
        Err(err) => panic!("no guest image for the real-guest tests: {err}"),
    }
}

fn open_image(dir: &Path) -> Option<GuestImage> {
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initrd.gz"));
    let manifest = std::fs::read_to_string(dir.join("manifest")).ok()?;
    (kernel.is_file() && initrd.is_file()).then(|| GuestImage {
        dir: dir.to_path_buf(),
        kernel,
        initrd,
        manifest,
    })
}

fn build_cached(root: &Path, key: &str) -> Result<GuestImage, Unavailable> {
    let dir = root.join(key);
    if let Some(img) = open_image(&dir) {
        return Ok(img);
    }
    let failed = |what: &str, e: std::io::Error| Unavailable::Failed(format!("{what}: {e}"));
    std::fs::create_dir_all(root).map_err(|e| failed(&root.display().to_string(), e))?;
    let lock_path = root.join("build.lock");
    let lock = File::create(&lock_path).map_err(|e| failed("build.lock", e))?;
    flock::lock_exclusive(&lock, Instant::now() + BUILD_LOCK_WAIT)
        .map_err(|e| failed("waiting for another build of the guest image", e))?;
    // Another process may have finished it while this one waited.
    if let Some(img) = open_image(&dir) {
        return Ok(img);
    }
    let started = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(root)
        .map_err(|e| failed("temp dir", e))?;
    build(tmp.path())?;
    let out = tmp.keep();
    std::fs::rename(&out, &dir).map_err(|e| failed("renaming the finished image into place", e))?;
    eprintln!(
        "guest image built in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    open_image(&dir).ok_or_else(|| Unavailable::Failed(format!("{} is incomplete", dir.display())))
}

/// Runs a command to its end; `Missing` when the program is not there, `Failed` with its
/// output when it fails.
fn run(cmd: &mut Command) -> Result<String, Unavailable> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Unavailable::Missing(format!("{what}: not installed")),
            _ => Unavailable::Failed(format!("{what}: {e}")),
        })?;
    if !out.status.success() {
        return Err(Unavailable::Failed(format!(
            "{what} exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The ABI package behind `linux-image-cloud-amd64` (`linux-image-6.1.0-57-cloud-amd64`).
fn kernel_package() -> Result<String, Unavailable> {
    let out = run(Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| {
            Unavailable::Failed(format!(
                "apt-cache knows no linux-image-cloud-amd64 dependency: {out}"
            ))
        })
}

/// `apt-get download PACKAGES` into `dir`.
fn download(dir: &Path, packages: &[&str]) -> Result<(), Unavailable> {
    run(Command::new("apt-get")
        .arg("download")
        .arg("-q")
        .args(packages)
        .current_dir(dir))
    .map(drop)
}

/// Resolves the kernel's package and downloads it and busybox-static into `dir`; when that
/// fails (no package lists yet, or stale ones naming a kernel the mirror no longer has), runs
/// `apt-get update` once and tries again. Returns the kernel's package name.
fn fetch(dir: &Path) -> Result<String, Unavailable> {
    let attempt = || -> Result<String, Unavailable> {
        let kpkg = kernel_package()?;
        download(dir, &[&kpkg, "busybox-static"])?;
        Ok(kpkg)
    };
    match attempt() {
        Err(Unavailable::Failed(first)) => {
            eprintln!("fetching the guest's packages failed; running apt-get update once: {first}");
            run(Command::new("apt-get").args(["update", "-q"]))
                .map_err(|e| Unavailable::Missing(format!("apt-get update: {e}")))?;
            attempt().map_err(|e| Unavailable::Missing(format!("after apt-get update: {e}")))
        }
        other => other,
    }
}

/// The one `.deb` in `dir` whose name starts with `prefix_`.
fn deb(dir: &Path, prefix: &str) -> Result<PathBuf, Unavailable> {
    let want = format!("{prefix}_");
    std::fs::read_dir(dir)
        .map_err(|e| Unavailable::Failed(format!("{}: {e}", dir.display())))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&want) && n.ends_with(".deb"))
        })
        .ok_or_else(|| Unavailable::Failed(format!("apt-get download left no {want}*.deb")))
}

fn write(path: &Path, text: &str) -> Result<(), Unavailable> {
    std::fs::write(path, text).map_err(|e| Unavailable::Failed(format!("{}: {e}", path.display())))
}

fn copy(from: &Path, to: &Path) -> Result<(), Unavailable> {
    std::fs::copy(from, to).map(drop).map_err(|e| {
        Unavailable::Failed(format!("copy {} to {}: {e}", from.display(), to.display()))
    })
}

/// Builds `vmlinuz`, `initrd.gz` and `manifest` in `out` (a fresh directory).
fn build(out: &Path) -> Result<(), Unavailable> {
    use std::os::unix::fs::PermissionsExt as _;
    let failed =
        |what: String| move |e: std::io::Error| Unavailable::Failed(format!("{what}: {e}"));
    let work = out.join("work");
    let (debs, kroot, bb, root) = (
        work.join("debs"),
        work.join("kernel"),
        work.join("busybox"),
        work.join("initrd"),
    );
    for d in [&debs, &root.join("bin"), &root.join("lib/modules")] {
        std::fs::create_dir_all(d).map_err(failed(d.display().to_string()))?;
    }
    // apt downloads as the unprivileged `_apt` user, which must reach and write the download
    // dir (else it warns and downloads as root).
    for (d, mode) in [(out, 0o755), (&work, 0o755), (&debs, 0o777)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
            .map_err(failed(format!("chmod {}", d.display())))?;
    }

    let kpkg = fetch(&debs)?;
    let (kdeb, bdeb) = (deb(&debs, &kpkg)?, deb(&debs, "busybox-static")?);
    let version = |deb: &Path| run(Command::new("dpkg-deb").arg("-f").arg(deb).arg("Version"));
    let manifest = format!(
        "kernel: {kpkg} {}\nbusybox-static {}\nworkload: gcc -O2 -static (key {})\n",
        version(&kdeb)?.trim(),
        version(&bdeb)?.trim(),
        key()
    );
    run(Command::new("dpkg-deb").arg("-x").arg(&kdeb).arg(&kroot))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&bdeb).arg(&bb))?;

    // The kernel: boot/vmlinuz-<release>; its modules under lib/modules/<release>/.
    let boot = kroot.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(failed(boot.display().to_string()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| Unavailable::Failed(format!("no vmlinuz-* in {}", boot.display())))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let drivers = kroot.join(format!("lib/modules/{release}/kernel/drivers"));
    for m in MODULES {
        let sub = if m == "virtio_blk" { "block" } else { "virtio" };
        copy(
            &drivers.join(format!("{sub}/{m}.ko")),
            &root.join(format!("lib/modules/{m}.ko")),
        )?;
    }

    let src = work.join("workload.c");
    write(&src, WORKLOAD_C)?;
    run(Command::new("gcc")
        .args(["-O2", "-static", "-Wall", "-o"])
        .arg(root.join("bin/workload"))
        .arg(&src))
    .map_err(|e| match e {
        Unavailable::Failed(why) if why.contains("cannot find -lc") => {
            Unavailable::Missing(format!("static glibc (libc6-dev): {why}"))
        }
        other => other,
    })?;
    copy(&bb.join("bin/busybox"), &root.join("bin/busybox"))?;
    let init = root.join("init");
    write(&init, INIT)?;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755))
        .map_err(failed("chmod init".into()))?;

    // busybox's cpio takes the names on stdin, like GNU cpio.
    let busybox = bb.join("bin/busybox");
    let initrd = out.join("initrd.gz");
    run(Command::new("sh")
        .arg("-c")
        .arg(r#"find . | "$0" cpio -o -H newc | gzip -1 > "$1""#)
        .arg(&busybox)
        .arg(&initrd)
        .current_dir(&root))?;
    // sh has no pipefail: a cpio that failed leaves a near-empty archive.
    let size = std::fs::metadata(&initrd).map_or(0, |m| m.len());
    if size < 100_000 {
        return Err(Unavailable::Failed(format!(
            "the initramfs is only {size} bytes: busybox cpio failed?"
        )));
    }
    copy(&vmlinuz, &out.join("vmlinuz"))?;
    write(&out.join("manifest"), &manifest)?;
    std::fs::remove_dir_all(&work).map_err(failed("removing the build's work dir".into()))
}
