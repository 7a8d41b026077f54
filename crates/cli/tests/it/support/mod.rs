//! Fixtures of the `qmigrate` binary's tests: the binary as processes (`proc`), the tunnel as
//! its processes (`tunnel`); real QEMU VMs and the QMP checks of the result come from
//! `qmigrate-testkit`, shared with the other crates' tests and the benchmark.

pub mod proc;
pub mod tunnel;

pub use qmigrate_testkit::check::{migration_status, qmp, try_qmp, vm_state, wait_for_migration};
pub use qmigrate_testkit::qemu;
pub use qmigrate_testkit::ram::ram_sha256;
