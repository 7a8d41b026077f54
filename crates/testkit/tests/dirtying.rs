//! The dirtying firmware boots, counts its passes and dirties RAM at about the rate it was
//! given, as its own chunk counter and QEMU's `calc-dirty-rate` measure it: under KVM (where
//! /dev/kvm is usable) and under TCG.

use std::time::{Duration, Instant};

use qmigrate_testkit::check::qmp;
use qmigrate_testkit::dirtying::{read_counters, DirtyConfig, CHUNK_PAGES};
use qmigrate_testkit::qemu::{qemu10, require, Vm, VmConfig};

/// MiB per chunk.
const CHUNK_MIB: f64 = CHUNK_PAGES as f64 * 4096.0 / 1048576.0;

/// Boots a 128 MiB guest dirtying 64 MiB at `rate` MiB/s under `accel` and measures for 2 s:
/// the rate its chunk counter shows and the one QEMU's `calc-dirty-rate` (dirty bitmap)
/// shows, in MiB/s; `None` without QEMU.
async fn measure(accel: &str, rate: f64) -> Option<(f64, f64)> {
    let bin = require(qemu10(), "QEMU 10")?;
    let vm = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: 128,
            random_ram: false,
            accel: Some(accel.to_owned()),
            dirtying: Some(DirtyConfig::new(64, rate)),
            ..VmConfig::default()
        },
    )
    .expect("QEMU starts");
    let q = qmp(&vm.qmp_path).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // One second without dirty logging, then two with (KVM write-protects logged pages, so
    // every first write to a page faults).
    let c0 = read_counters(&q).await.expect("counters");
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let c1 = read_counters(&q).await.expect("counters");
    let unlogged =
        f64::from(c1.chunks.wrapping_sub(c0.chunks)) * CHUNK_MIB / t.elapsed().as_secs_f64();
    let before = read_counters(&q).await.expect("counters");
    let t0 = Instant::now();
    assert!(
        before.started,
        "{accel}: the guest never reached protected mode: {}",
        vm.log()
    );
    q.execute_raw(
        "calc-dirty-rate",
        Some(if accel == "kvm" {
            serde_json::json!({"calc-time": 2, "mode": "dirty-bitmap"})
        } else {
            serde_json::json!({"calc-time": 2, "sample-pages": 4096})
        }),
    )
    .await
    .expect("calc-dirty-rate");
    let measured = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let info = q
            .execute_raw("query-dirty-rate", None)
            .await
            .expect("query-dirty-rate");
        if info["status"] == "measured" {
            break info["dirty-rate"].as_f64().expect("dirty-rate");
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{info}");
    };
    let after = read_counters(&q).await.expect("counters");
    let paced = f64::from(after.chunks.wrapping_sub(before.chunks)) * CHUNK_MIB
        / t0.elapsed().as_secs_f64();
    eprintln!(
        "{accel}: asked {rate} MiB/s; the guest wrote {unlogged:.1} MiB/s, then {paced:.1} \
         MiB/s while QEMU measured {measured} MiB/s"
    );
    Some((paced, measured))
}

async fn rate_is_paced(accel: &str) {
    for rate in [8.0, 32.0] {
        let Some((paced, measured)) = measure(accel, rate).await else {
            return;
        };
        // Loose bounds: the machine running the tests may be busy.
        assert!(
            paced > rate * 0.7 && paced < rate * 1.3,
            "{accel}: asked {rate} MiB/s, the guest wrote {paced}"
        );
        assert!(
            measured > rate / 2.0 && measured < rate * 2.0,
            "{accel}: asked {rate} MiB/s, QEMU measured {measured}"
        );
    }
}

#[tokio::test]
async fn paced_under_kvm() {
    if std::fs::File::open("/dev/kvm").is_err() {
        eprintln!("skipping: /dev/kvm not usable");
        return;
    }
    rate_is_paced("kvm").await;
}

#[tokio::test]
async fn paced_under_tcg() {
    rate_is_paced("tcg").await;
}

#[tokio::test]
async fn idle_guest_counts_passes() {
    let Some(bin) = require(qemu10(), "QEMU 10") else {
        return;
    };
    let vm = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: 32,
            random_ram: false,
            dirtying: Some(DirtyConfig::new(16, 0.0)),
            ..VmConfig::default()
        },
    )
    .expect("QEMU starts");
    let q = qmp(&vm.qmp_path).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = read_counters(&q).await.expect("counters");
    assert!(a.started, "{}", vm.log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = read_counters(&q).await.expect("counters");
    // About 1000 passes a second, one (empty) chunk each.
    assert!(
        b.passes > a.passes + 100 && b.passes < a.passes + 2000,
        "{a:?} -> {b:?}"
    );
    assert_eq!(
        b.chunks.wrapping_sub(a.chunks),
        b.passes.wrapping_sub(a.passes)
    );
}
