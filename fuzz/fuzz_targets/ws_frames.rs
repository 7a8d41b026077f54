//! What a WebSocket peer sends after the upgrade, as a tunnel server and a tunnel client read
//! it: frames of every header form, masked or not, fragmented, control frames, close, and
//! anything else. Any bytes must give messages or errors, the same whatever way they are cut
//! into reads, and no message above the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qmigrate_transport::fuzzing::ws_frames(data);
});
