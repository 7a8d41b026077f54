//! What QEMU sends on a QMP socket: the greeting, then replies and events, one JSON object a
//! line, decoded into the typed replies qmigrate reads. Any bytes must give values or errors.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmigrate_qmp::fuzzing::parse(data);
});
