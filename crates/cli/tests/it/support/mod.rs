//! Fixtures of the `qmigrate` binary's tests: the binary as processes (`proc`), the tunnel as
//! its processes (`tunnel`); real QEMU VMs and the QMP checks of the result come from
//! `qmigrate-testkit`, shared with the other crates' tests and the benchmark.

pub mod proc;
pub mod tunnel;

pub use qmigrate_testkit::check::{migration_status, qmp, try_qmp, vm_state, wait_for_migration};
pub use qmigrate_testkit::qemu;
pub use qmigrate_testkit::ram::ram_sha256;

/// A path as a command-line argument.
pub fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// QEMU 10 and the Linux guest image, or a skip (a failure under `CI=true`).
pub fn linux_guest() -> Option<(qemu::QemuBinary, qmigrate_testkit::guest::GuestImage)> {
    let bin = qemu::require(qemu::qemu10(), "QEMU 10")?;
    Some((bin, qmigrate_testkit::guest::require()?))
}

/// QEMU 10, or a skip (a failure under `CI=true`).
pub fn qemu10() -> Option<qemu::QemuBinary> {
    qemu::require(qemu::qemu10(), "QEMU 10")
}

/// A halting-firmware source VM with random RAM and a destination waiting with `-incoming
/// defer`, both of `mem_mib` MiB; killed on drop.
pub struct Pair {
    /// The source.
    pub src: qemu::Vm,
    /// The destination.
    pub dst: qemu::Vm,
}

/// Starts a [`Pair`].
pub fn pair(bin: &qemu::QemuBinary, mem_mib: u64) -> Pair {
    let src = qemu::Vm::start(
        bin,
        &qemu::VmConfig {
            mem_mib,
            ..qemu::VmConfig::default()
        },
    )
    .expect("start the source QEMU");
    let dst =
        qemu::Vm::start(bin, &qemu::destination_config(mem_mib)).expect("start the destination");
    Pair { src, dst }
}
