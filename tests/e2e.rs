//! End-to-end tests: real QEMU processes, the real `qmigrate` binary, real guest RAM.
