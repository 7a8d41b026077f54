//! The guest's RAM, dumped with QMP `pmemsave` and compared: by SHA-256 (the tests) or byte for
//! byte between two guests (the benchmark).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use qmigrate_qmp::{ConnectOptions, Pmemsave, Qmp};

use crate::qemu::sha256_file;

/// SHA-256 of the guest's first `mem_mib` MiB of physical memory, dumped with `pmemsave` to
/// `dump`.
pub async fn ram_sha256(qmp: &Qmp, mem_mib: u64, dump: &Path) -> String {
    qmp.execute_with_timeout(
        &Pmemsave {
            val: 0,
            size: mem_mib << 20,
            filename: dump.display().to_string(),
        },
        Duration::from_secs(60),
    )
    .await
    .expect("pmemsave");
    let digest = sha256_file(dump);
    // The dumps are as large as the guest; do not keep them around.
    let _ = std::fs::remove_file(dump);
    digest
}

/// The guest-physical ranges of a q35 guest's RAM: below 4 GiB up to 2 GiB (or all of it when
/// it fits below the PCI hole at 2.75 GiB), the rest from 4 GiB.
pub fn ram_ranges(mib: u64) -> Vec<(u64, u64)> {
    let bytes = mib << 20;
    if bytes < 0xB000_0000 {
        vec![(0, bytes)]
    } else {
        vec![(0, 0x8000_0000), (1 << 32, bytes - 0x8000_0000)]
    }
}

/// Dumps both guests' RAM (in tmpfs when there is one) and compares them byte for byte.
pub async fn same_ram(src: &Path, dst: &Path, mib: u64) -> anyhow::Result<bool> {
    let shm = Path::new("/dev/shm");
    let dumps = tempfile::Builder::new()
        .prefix("qmigrate-bench-ram-")
        .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") })?;
    let opts = ConnectOptions::default();
    let src = Qmp::connect_unix(src, &opts)
        .await
        .context("QMP of the source")?;
    let dst = Qmp::connect_unix(dst, &opts)
        .await
        .context("QMP of the destination")?;
    for (n, (start, len)) in ram_ranges(mib).into_iter().enumerate() {
        let a = dumps.path().join(format!("source-{n}.bin"));
        let b = dumps.path().join(format!("destination-{n}.bin"));
        for (qmp, file) in [(&src, &a), (&dst, &b)] {
            qmp.execute_with_timeout(
                &Pmemsave {
                    val: start,
                    size: len,
                    filename: file.display().to_string(),
                },
                Duration::from_secs(120),
            )
            .await
            .context("pmemsave")?;
        }
        let same = files_equal(&a, &b)?;
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        if !same {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether two files hold the same bytes.
pub fn files_equal(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; returns how much it read.
pub fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q35_ram_layout() {
        assert_eq!(ram_ranges(1024), vec![(0, 1 << 30)]);
        assert_eq!(
            ram_ranges(4096),
            vec![(0, 0x8000_0000), (1 << 32, 0x8000_0000)]
        );
    }
}
