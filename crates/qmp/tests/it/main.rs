//! `qmigrate-qmp`'s integration tests, one test binary: the QAPI models against golden JSON
//! (`tests/golden/`), the client against a scripted peer, and against real QEMU.

mod fake_peer;
mod models;
mod real_qemu;
