//! Real QEMU processes: find the binaries, start a VM in its own temp dir with a QMP socket,
//! kill it on drop; the halting firmware and the random RAM the VMs boot with.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::dirtying::{write_dirtying_firmware, DirtyConfig};

/// A QEMU binary and what it needs to run.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    /// The `qemu-system-x86_64` executable.
    pub path: PathBuf,
    /// Firmware/data dir passed with `-L`, for an unpacked (not installed) QEMU.
    pub data_dir: Option<PathBuf>,
    /// Its version, from `--version`.
    pub version: (u32, u32, u32),
}

/// Runs `path --version` and parses "QEMU emulator version X.Y.Z"; `None` when it does not
/// run or says something else. `path` may be a bare name, looked up on PATH.
pub fn probe(path: PathBuf, data_dir: Option<PathBuf>) -> Option<QemuBinary> {
    let mut cmd = Command::new(&path);
    if let Some(d) = &data_dir {
        cmd.arg("-L").arg(d);
    }
    let out = cmd.arg("--version").stdin(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split("version ").nth(1)?.split_whitespace().next()?;
    let mut nums = v.split('.').map(|n| {
        n.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u32>()
            .unwrap_or(0)
    });
    let version = (
        nums.next()?,
        nums.next().unwrap_or(0),
        nums.next().unwrap_or(0),
    );
    Some(QemuBinary {
        path,
        data_dir,
        version,
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    })
}

/// The workspace root: the nearest ancestor of this crate whose Cargo.toml has `[workspace]`.
pub fn workspace_root() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for dir in start.ancestors() {
        if let Ok(toml) = std::fs::read_to_string(dir.join("Cargo.toml")) {
            if toml.contains("[workspace]") {
                return dir.to_path_buf();
            }
        }
    }
    start
}

/// The current QEMU: `$QMIGRATE_QEMU`, else `qemu-system-x86_64` on PATH.
pub fn qemu10() -> Option<QemuBinary> {
    let path = match std::env::var_os("QMIGRATE_QEMU") {
        Some(p) => PathBuf::from(p),
        None => on_path("qemu-system-x86_64")?,
    };
    probe(path, None)
}

/// The old QEMU 7.2 (no migration `channels`): `$QMIGRATE_QEMU72`, else the copy unpacked by
/// `scripts/install-deps.sh` under `target/qemu-7.2`.
pub fn qemu72() -> Option<QemuBinary> {
    if let Some(p) = std::env::var_os("QMIGRATE_QEMU72") {
        let p = PathBuf::from(p);
        // An unpacked tree keeps its data next to the binary: <root>/usr/bin/.. -> usr/share/qemu.
        let data = p
            .parent()
            .and_then(Path::parent)
            .map(|usr| usr.join("share/qemu"))
            .filter(|d| d.is_dir());
        return probe(p, data);
    }
    let root = workspace_root().join("target/qemu-7.2/usr");
    let bin = root.join("bin/qemu-system-x86_64");
    if !bin.is_file() {
        return None;
    }
    probe(bin, Some(root.join("share/qemu")))
}

/// Turns a missing binary into a skip (locally) or a failure (under `CI=true`).
pub fn require(bin: Option<QemuBinary>, what: &str) -> Option<QemuBinary> {
    if bin.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{what} missing under CI=true: run scripts/install-deps.sh");
        }
        eprintln!("skipping: {what} not found (run scripts/install-deps.sh)");
    }
    bin
}

/// What a test VM boots.
#[derive(Debug, Clone, Default)]
pub enum Boot {
    /// The halting firmware of [`write_firmware`], under KVM where it works, else TCG: the
    /// vCPU never runs guest code, so guest RAM stays as it was written.
    #[default]
    HaltingFirmware,
    /// A Linux kernel and initrd (`-kernel`, `-initrd`, `-append`), under TCG only: KVM on
    /// this kind of host (a nested VM without `vmx`) stops in the kernel's decompressor with
    /// an emulation failure. The serial console goes to `serial.log` in the VM's directory
    /// ([`Vm::serial_path`]) and a guest that panics or reboots ends QEMU (`-no-reboot`).
    Linux {
        /// The kernel image.
        kernel: PathBuf,
        /// The initramfs.
        initrd: PathBuf,
        /// The kernel command line.
        append: String,
    },
}

/// How to start a test VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Back RAM with a file of random bytes, so a migration moves real data.
    pub random_ram: bool,
    /// Start with `-incoming defer` (a migration destination).
    pub incoming_defer: bool,
    /// Machine type.
    pub machine: String,
    /// More QEMU arguments.
    pub extra_args: Vec<String>,
    /// With `random_ram`: the file of random bytes to back RAM with (shared, read only:
    /// `share=off`), instead of a fresh one written into the VM's directory.
    pub ram_file: Option<PathBuf>,
    /// Where the VM's own temp dir is made (default: the system's temp dir).
    pub temp_in: Option<PathBuf>,
    /// Where the QMP socket goes (default: `qmp.sock` in the VM's own directory). A fixed
    /// path outlives the VM: the next VM started there takes it over, as a tunnel-server's
    /// `--route` expects.
    pub qmp_path: Option<PathBuf>,
    /// What it boots (`random_ram` applies to the firmwares only).
    pub boot: Boot,
    /// With [`Boot::HaltingFirmware`]: boot the dirtying firmware ([`crate::dirtying`])
    /// instead of the halting one.
    pub dirtying: Option<DirtyConfig>,
    /// The accelerator of the firmwares (`kvm`, `tcg`); default: KVM where it works, else
    /// TCG. Linux guests always run under TCG (KVM cannot boot them here).
    pub accel: Option<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_mib: 128,
            random_ram: true,
            incoming_defer: false,
            machine: "q35".to_string(),
            extra_args: Vec::new(),
            ram_file: None,
            temp_in: None,
            qmp_path: None,
            boot: Boot::HaltingFirmware,
            dirtying: None,
            accel: None,
        }
    }
}

/// A running QEMU in its own temp dir; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Vm {
    /// The VM's private directory (firmware, RAM file, log, QMP socket).
    pub dir: PathBuf,
    /// The QMP Unix socket (not connected to by the fixture).
    pub qmp_path: PathBuf,
    child: Child,
    _tmp: tempfile::TempDir,
}

/// A 64 KiB firmware that halts forever (`hlt; jmp $-1` at the reset vector): the guest's CPU
/// never touches its RAM, so a migration has nothing to re-send and RAM can be compared.
pub fn write_firmware(path: &Path) -> std::io::Result<()> {
    let mut fw = vec![0u8; 64 * 1024];
    fw[0xFFF0..0xFFF3].copy_from_slice(&[0xF4, 0xEB, 0xFD]);
    std::fs::write(path, fw)
}

/// A seed for [`write_random`] that differs from run to run (time and pid).
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32)
}

/// Writes `mib` MiB of pseudo-random bytes (splitmix64 from `seed`): incompressible guest RAM.
pub fn write_random(path: &Path, mib: u64, seed: u64) -> std::io::Result<()> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut f = std::io::BufWriter::new(File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()
}

impl Vm {
    /// Starts a VM and waits (at most 10 s) for its QMP socket to appear. Errors carry
    /// QEMU's log when it exited early.
    pub fn start(bin: &QemuBinary, cfg: &VmConfig) -> std::io::Result<Vm> {
        let mut tmp = tempfile::Builder::new();
        tmp.prefix("qmigrate-vm-");
        let tmp = match &cfg.temp_in {
            Some(parent) => tmp.tempdir_in(parent)?,
            None => tmp.tempdir()?,
        };
        let dir = tmp.path().to_path_buf();
        let qmp_path = cfg.qmp_path.clone().unwrap_or_else(|| dir.join("qmp.sock"));
        let log_path = dir.join("qemu.log");
        let log = File::create(&log_path)?;

        let mut cmd = Command::new(&bin.path);
        if let Some(d) = &bin.data_dir {
            cmd.arg("-L").arg(d);
        }
        cmd.args(["-nodefaults", "-display", "none"]);
        match &cfg.boot {
            Boot::HaltingFirmware => {
                let fw = dir.join("fw.bin");
                match &cfg.dirtying {
                    Some(d) => write_dirtying_firmware(&fw, d)?,
                    None => write_firmware(&fw)?,
                }
                match &cfg.accel {
                    Some(accel) => cmd.arg("-accel").arg(accel),
                    None => cmd.args(["-accel", "kvm", "-accel", "tcg"]),
                };
                cmd.arg("-bios").arg(&fw);
            }
            Boot::Linux {
                kernel,
                initrd,
                append,
            } => {
                cmd.args(["-accel", "tcg", "-no-user-config", "-no-reboot"]);
                cmd.arg("-kernel").arg(kernel);
                cmd.arg("-initrd").arg(initrd);
                cmd.arg("-append").arg(append);
                cmd.arg("-serial")
                    .arg(format!("file:{}", dir.join("serial.log").display()));
            }
        }
        if cfg.random_ram && matches!(cfg.boot, Boot::HaltingFirmware) {
            let ram = match &cfg.ram_file {
                Some(file) => file.clone(),
                None => {
                    let ram = dir.join("ram.bin");
                    write_random(&ram, cfg.mem_mib, fresh_seed())?;
                    ram
                }
            };
            cmd.arg("-object").arg(format!(
                "memory-backend-file,id=m0,size={}M,mem-path={},share=off",
                cfg.mem_mib,
                ram.display()
            ));
            cmd.arg("-machine")
                .arg(format!("{},memory-backend=m0", cfg.machine));
            cmd.arg("-m").arg(format!("{}M", cfg.mem_mib));
        } else {
            cmd.arg("-machine").arg(&cfg.machine);
            cmd.arg("-m").arg(format!("{}M", cfg.mem_mib));
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if cfg.incoming_defer {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.args(&cfg.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        let mut vm = Vm {
            dir,
            qmp_path,
            child,
            _tmp: tmp,
        };

        let deadline = Instant::now() + Duration::from_secs(10);
        // QEMU creates the socket file at bind() and accepts only after listen(): wait for
        // both, without connecting (the monitor serves one client, the test's).
        while !unix_listening(&vm.qmp_path) {
            if let Some(status) = vm.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "QEMU exited ({status}) before creating its QMP socket: {}",
                    vm.log()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "QEMU's QMP socket was not listening within 10 s: {}",
                    vm.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(vm)
    }

    /// Where the serial console goes with [`Boot::Linux`] (`serial.log` in the VM's
    /// directory; QEMU creates it at start, and it stays empty until the guest prints).
    pub fn serial_path(&self) -> PathBuf {
        self.dir.join("serial.log")
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs QEMU and reaps it (idempotent).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while QEMU runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// QEMU's stdout + stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }
}

/// True when a Unix socket is bound at `path` and listening, judged from `/proc/net/unix`
/// (the `__SO_ACCEPTCON` flag) so no connection is made (QEMU's monitor serves one client at
/// a time, and a socket file that exists may not listen yet, or any more); where that file
/// cannot be read, the socket file's existence has to do.
pub fn unix_listening(path: &Path) -> bool {
    if !path.exists() {
        return false;
    }
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return true;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8 && cols[3] == "00010000" && cols[7..].join(" ") == want
    })
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Hex SHA-256 of a file (panics with the path when it cannot be read).
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A migration destination for a source started with `random_ram`: `-incoming defer`, paused
/// (`-S`) so that its RAM can be compared after the migration, and its RAM as in
/// [`incoming_config`].
pub fn destination_config(mem_mib: u64) -> VmConfig {
    let mut cfg = incoming_config(mem_mib);
    cfg.extra_args.insert(0, "-S".to_owned());
    cfg
}

/// A migration destination for a source started with `random_ram`, which runs once the
/// migration is over: `-incoming defer`, and its RAM anonymous (zeroed, which mapped-ram relies
/// on: it leaves zero pages out of the file) under the source's backend id `m0` (migration
/// matches RAM blocks by id; QEMU refuses postcopy on a destination whose RAM is a file outside
/// tmpfs).
pub fn incoming_config(mem_mib: u64) -> VmConfig {
    VmConfig {
        mem_mib,
        random_ram: false,
        incoming_defer: true,
        extra_args: vec![
            "-object".to_owned(),
            format!("memory-backend-ram,id=m0,size={mem_mib}M"),
            "-machine".to_owned(),
            "memory-backend=m0".to_owned(),
        ],
        ..VmConfig::default()
    }
}
