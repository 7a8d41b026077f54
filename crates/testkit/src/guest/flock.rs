//! `flock(2)` with a deadline: the image build's lock and the guest gate's slots. A lock
//! belongs to the open file, so two opens of the same path exclude each other in one process as
//! well as across processes, and it goes away with the file (or the process).

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::time::{Duration, Instant};

/// Takes an exclusive lock on `file` without waiting; `Ok(false)` when someone else holds it.
pub fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => Ok(false),
        _ => Err(err),
    }
}

/// Takes an exclusive lock on `file`, polling until `deadline` (then `TimedOut`).
pub fn lock_exclusive(file: &File, deadline: Instant) -> std::io::Result<()> {
    while !try_lock_exclusive(file)? {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the lock is still held by someone else",
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
