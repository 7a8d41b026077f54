//! Against a real QEMU 10 (and 7.2 when unpacked): handshake, typed commands, the channels
//! probe, an incoming migration set up with `channels`, and typed refusals.
#![allow(clippy::unwrap_used)]

use qmigrate_qmp::probe::supports_channels;
use qmigrate_qmp::*;
use qmigrate_testkit::qemu::{self, QemuBinary, Vm, VmConfig};

fn small(incoming: bool) -> VmConfig {
    VmConfig {
        mem_mib: 32,
        random_ram: false,
        incoming_defer: incoming,
        ..VmConfig::default()
    }
}

async fn start(bin: &QemuBinary, cfg: &VmConfig) -> (Vm, Qmp) {
    let vm = Vm::start(bin, cfg).expect("start QEMU");
    let qmp = Qmp::connect_unix(&vm.qmp_path, &ConnectOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", vm.log()));
    (vm, qmp)
}

#[tokio::test]
async fn negotiates_and_queries_version_and_status() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let (_vm, qmp) = start(&bin, &small(false)).await;
    assert!(
        qmp.greeting().version.qemu.major >= 10,
        "{:?}",
        qmp.greeting()
    );
    let v = qmp.execute(&QueryVersion).await.unwrap();
    assert!(v.qemu.at_least(10, 0, 0), "{v:?}");
    assert_eq!(v.qemu, qmp.greeting().version.qemu);
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(st.status, RunState::Running);
    assert!(st.running);
    let info = qmp.execute(&QueryMigrate).await.unwrap();
    assert_eq!(info.status, None, "{info:?}");
    let caps = qmp.execute(&QueryMigrateCapabilities).await.unwrap();
    assert!(caps
        .iter()
        .all(|c| c.capability != MigrationCapability::Other));
    let params = qmp.execute(&QueryMigrateParameters).await.unwrap();
    assert_eq!(params.mode, Some(MigMode::Normal));
    assert_eq!(params.multifd_compression, Some(MultiFdCompression::None));
    qmp.execute(&MigrateSetParameters {
        max_bandwidth: Some(1 << 30),
        tls_creds: Some(StrOrNull::Str(String::new())),
        ..Default::default()
    })
    .await
    .unwrap();
    let params = qmp.execute(&QueryMigrateParameters).await.unwrap();
    assert_eq!(params.max_bandwidth, Some(1 << 30));
    qmp.execute(&MigrateSetCapabilities {
        capabilities: vec![MigrationCapabilityStatus {
            capability: MigrationCapability::Events,
            state: true,
        }],
    })
    .await
    .unwrap();
    qmp.execute(&Stop).await.unwrap();
    assert_eq!(
        qmp.execute(&QueryStatus).await.unwrap().status,
        RunState::Paused
    );
    qmp.execute(&Cont).await.unwrap();
}

#[tokio::test]
async fn channels_probe_true_on_qemu10() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let (_vm, qmp) = start(&bin, &small(false)).await;
    assert!(supports_channels(&qmp).await.unwrap());
}

#[tokio::test]
async fn channels_probe_false_on_qemu72() {
    let Some(bin) = qemu::require(qemu::qemu72(), "QEMU 7.2 (target/qemu-7.2)") else {
        return;
    };
    assert_eq!((bin.version.0, bin.version.1), (7, 2));
    // Also checks that the fixture's file-backed random RAM works on 7.2.
    let cfg = VmConfig {
        mem_mib: 16,
        random_ram: true,
        ..small(true)
    };
    let (_vm, qmp) = start(&bin, &cfg).await;
    assert_eq!(qmp.greeting().version.qemu.major, 7);
    assert!(!supports_channels(&qmp).await.unwrap());
    assert_eq!(
        qmp.execute(&QueryStatus).await.unwrap().status,
        RunState::InMigrate
    );
}

#[tokio::test]
async fn incoming_with_channels_reaches_setup() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let (vm, qmp) = start(&bin, &small(true)).await;
    let st = qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(st.status, RunState::InMigrate);
    assert!(!st.running);

    let sock = vm.dir.join("incoming.sock");
    let addr = MigrationAddress::Socket(SocketAddress::Unix {
        path: sock.display().to_string(),
    });
    let mut events = qmp.events();
    qmp.execute(&MigrateSetCapabilities {
        capabilities: vec![MigrationCapabilityStatus {
            capability: MigrationCapability::Events,
            state: true,
        }],
    })
    .await
    .unwrap();
    qmp.execute(&MigrateIncoming::new(MigrationTarget::from_address(
        addr, true,
    )))
    .await
    .unwrap();
    let info = qmp.execute(&QueryMigrate).await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Setup), "{info:?}");
    assert_eq!(
        info.socket_address,
        Some(vec![SocketAddress::Unix {
            path: sock.display().to_string()
        }])
    );
    assert!(sock.exists());
    let ev = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
        .await
        .expect("MIGRATION event in time")
        .unwrap();
    assert_eq!(
        ev.migration_status(),
        Some(MigrationStatus::Setup),
        "{ev:?}"
    );
}

#[tokio::test]
async fn refused_commands_are_typed_errors() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let (vm, qmp) = start(&bin, &small(false)).await;
    let addr = MigrationAddress::parse_uri(&format!("unix:{}/x.sock", vm.dir.display())).unwrap();
    let err = qmp
        .execute(&MigrateIncoming::new(MigrationTarget::from_address(
            addr, true,
        )))
        .await
        .unwrap_err();
    match &err {
        Error::Qmp {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "migrate-incoming");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("incoming"), "{desc}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    let err = qmp.execute_raw("no-such-command", None).await.unwrap_err();
    assert!(
        matches!(&err, Error::Qmp { class, .. } if class == "CommandNotFound"),
        "{err:?}"
    );
    // The connection is still fine.
    qmp.execute(&QueryVersion).await.unwrap();
}

#[tokio::test]
async fn busy_socket_and_quit() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let (mut vm, qmp) = start(&bin, &small(false)).await;
    let opts = ConnectOptions {
        greeting_timeout: std::time::Duration::from_millis(300),
        ..ConnectOptions::default()
    };
    let err = Qmp::connect_unix(&vm.qmp_path, &opts).await.unwrap_err();
    assert!(matches!(err, Error::Busy { .. }), "{err:?}");
    assert!(err.is_unreachable());
    assert!(err.to_string().contains("QMP socket busy"), "{err}");

    let mut events = qmp.events();
    qmp.execute(&Quit).await.unwrap();
    // SHUTDOWN arrives, then the connection ends.
    loop {
        match events.recv().await {
            Ok(_) => continue,
            Err(Error::Disconnected) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(matches!(
        qmp.execute(&QueryStatus).await,
        Err(Error::Disconnected)
    ));
    for _ in 0..100 {
        if !vm.is_alive() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("QEMU did not quit");
}

#[test]
fn fixture_random_ram_vm_starts_and_pmemsave_hashes() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = VmConfig {
            mem_mib: 16,
            ..VmConfig::default()
        };
        let (vm, qmp) = start(&bin, &cfg).await;
        let dump = vm.dir.join("dump.bin");
        qmp.execute(&Pmemsave {
            val: 0,
            size: 1 << 20,
            filename: dump.display().to_string(),
        })
        .await
        .unwrap();
        let ram = std::fs::read(vm.dir.join("ram.bin")).unwrap();
        let dumped = std::fs::read(&dump).unwrap();
        assert_eq!(dumped.len(), 1 << 20);
        // Low RAM below 640 KiB is plain RAM backed by our random file.
        assert_eq!(&dumped[..0x9_0000], &ram[..0x9_0000]);
        assert_eq!(qemu::sha256_file(&dump).len(), 64);
    });
}

#[test]
fn sha256_known_value() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("abc");
    std::fs::write(&p, b"abc").unwrap();
    assert_eq!(
        qemu::sha256_file(&p),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[tokio::test]
async fn local_migration_with_channels_and_events() {
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let cfg = VmConfig {
        mem_mib: 32,
        ..VmConfig::default()
    };
    let (src_vm, src) = start(&bin, &cfg).await;
    let (dst_vm, dst) = start(
        &bin,
        &VmConfig {
            incoming_defer: true,
            ..cfg.clone()
        },
    )
    .await;
    let events_on = MigrateSetCapabilities {
        capabilities: vec![MigrationCapabilityStatus {
            capability: MigrationCapability::Events,
            state: true,
        }],
    };
    src.execute(&events_on).await.unwrap();
    dst.execute(&events_on).await.unwrap();
    let addr: MigrationAddress = format!("unix:{}/mig.sock", dst_vm.dir.display())
        .parse()
        .unwrap();
    dst.execute(&MigrateIncoming::new(MigrationTarget::from_address(
        addr.clone(),
        true,
    )))
    .await
    .unwrap();
    let mut events = src.events();
    src.execute(&Migrate::new(MigrationTarget::from_address(addr, true)))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = std::time::Duration::from_secs(30);
    loop {
        let ev = tokio::time::timeout(deadline, events.recv())
            .await
            .expect("migration finishes in time")
            .unwrap();
        if let Some(status) = ev.migration_status() {
            seen.push(status);
            if status.is_terminal() {
                break;
            }
        }
    }
    assert_eq!(seen.first(), Some(&MigrationStatus::Setup), "{seen:?}");
    assert_eq!(seen.last(), Some(&MigrationStatus::Completed), "{seen:?}");
    let info = src.execute(&QueryMigrate).await.unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Completed));
    assert!(info.ram.unwrap().transferred.unwrap() > 0);
    // QEMU emits `completed` a moment before the source's run state leaves finish-migrate.
    let mut src_state = None;
    for _ in 0..100 {
        src_state = Some(src.execute(&QueryStatus).await.unwrap().status);
        if src_state != Some(RunState::FinishMigrate) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(src_state, Some(RunState::Postmigrate));
    // The destination finishes loading shortly after the source reports completed.
    let mut dst_status = None;
    for _ in 0..100 {
        dst_status = dst.execute(&QueryMigrate).await.unwrap().status;
        if dst_status == Some(MigrationStatus::Completed) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(dst_status, Some(MigrationStatus::Completed));

    let hash = |qmp: Qmp, dump: std::path::PathBuf| async move {
        qmp.execute(&Pmemsave {
            val: 0,
            size: 32 << 20,
            filename: dump.display().to_string(),
        })
        .await
        .unwrap();
        qemu::sha256_file(&dump)
    };
    let a = hash(src, src_vm.dir.join("dump")).await;
    let b = hash(dst, dst_vm.dir.join("dump")).await;
    assert_eq!(a, b, "guest RAM differs after migration");
}

#[tokio::test]
async fn getfd_passes_a_descriptor() {
    use std::os::fd::AsFd;
    let Some(bin) = qemu::require(qemu::qemu10(), "qemu-system-x86_64") else {
        return;
    };
    let (_vm, qmp) = start(&bin, &small(false)).await;
    // Without a descriptor QEMU refuses getfd.
    let err = qmp
        .execute(&Getfd {
            fdname: "mig".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Qmp { .. }), "{err:?}");
    let (_r, w) = std::io::pipe().unwrap();
    qmp.execute_with_fd(
        &Getfd {
            fdname: "mig".into(),
        },
        w.as_fd(),
    )
    .await
    .unwrap();
    // QEMU now holds it under that name: closefd succeeds once, then the name is gone.
    qmp.execute(&Closefd {
        fdname: "mig".into(),
    })
    .await
    .unwrap();
    let err = qmp
        .execute(&Closefd {
            fdname: "mig".into(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Qmp { .. }), "{err:?}");
}
