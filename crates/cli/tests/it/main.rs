//! The `qmigrate` binary's integration tests, one test binary (ripgrep's `tests/tests.rs`): real
//! QEMU processes, the built binary run through `CARGO_BIN_EXE_qmigrate`, guest RAM compared;
//! `ops`: the config file, the metrics and the shutdown of `tunnel-server`.

mod support;

mod converge;
mod e2e;
mod endurance;
mod file;
mod network;
mod one_command;
mod ops;
mod running_guest;
mod storage;
