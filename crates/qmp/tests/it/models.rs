//! Serde round trips against QEMU's own examples (qapi/migration.json `qmp-example`s) and
//! replies captured from QEMU 10, kept as golden JSON in `tests/golden/`; legacy URI parsing
//! and printing; the channels probe on captured schemas.
#![allow(clippy::unwrap_used)]

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use qmigrate_qmp::probe::schema_supports_channels;
use qmigrate_qmp::*;

fn golden(name: &str) -> Value {
    let path = format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Decodes `name` as `T`, encodes it again and demands the same JSON back.
fn round_trip<T: DeserializeOwned + Serialize>(name: &str) -> T {
    let v = golden(name);
    let typed: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(serde_json::to_value(&typed).unwrap(), v, "{name}");
    typed
}

#[test]
fn query_migrate_replies() {
    let none: MigrationInfo = round_trip("query-migrate-none.json");
    assert_eq!(none, MigrationInfo::default());

    let done: MigrationInfo = round_trip("query-migrate-completed.json");
    assert_eq!(done.status, Some(MigrationStatus::Completed));
    assert!(done.status.unwrap().is_terminal());
    let ram = done.ram.unwrap();
    assert_eq!(ram.normal_bytes, Some(123456));
    assert_eq!(ram.dirty_sync_count, Some(15));

    let failed: MigrationInfo = round_trip("query-migrate-failed.json");
    assert_eq!(failed.status, Some(MigrationStatus::Failed));

    let active: MigrationInfo = round_trip("query-migrate-active-xbzrle.json");
    assert_eq!(active.expected_downtime, Some(12345));
    assert!(!active.status.unwrap().is_terminal());
    let x = active.xbzrle_cache.unwrap();
    assert_eq!(x.cache_miss_rate, Some(0.123));
    assert_eq!(x.overflow, Some(34434));

    let q10: MigrationInfo = round_trip("query-migrate-qemu10-completed.json");
    let ram = q10.ram.unwrap();
    assert_eq!(ram.mbps, Some(1995.33));
    assert_eq!(ram.downtime_bytes, Some(41779481));
    assert_eq!(ram.pages_per_second, Some(54473));
    assert_eq!(ram.dirty_sync_missed_zero_copy, Some(0));
    assert_eq!(q10.downtime, Some(156));

    let setup: MigrationInfo = round_trip("query-migrate-qemu10-incoming-setup.json");
    assert_eq!(
        setup.socket_address,
        Some(vec![SocketAddress::Unix {
            path: "/tmp/in.sock".into()
        }])
    );
}

#[test]
fn unknown_fields_and_values_decode() {
    let info: MigrationInfo = serde_json::from_value(json!({
        "status": "teleporting", "new-field": {"x": 1},
        "socket-address": [{"type": "carrier-pigeon"}]
    }))
    .unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Other));
    assert_eq!(info.socket_address, Some(vec![SocketAddress::Other]));
    let caps: Vec<MigrationCapabilityStatus> =
        serde_json::from_value(json!([{"capability": "warp-drive", "state": true}])).unwrap();
    assert_eq!(caps[0].capability, MigrationCapability::Other);
    let st: StatusInfo = serde_json::from_value(
        json!({"running": false, "status": "inmigrate", "singlestep": false}),
    )
    .unwrap();
    assert_eq!(st.status, RunState::InMigrate);
    assert_eq!(RunState::FinishMigrate.to_string(), "finish-migrate");
    assert_eq!(RunState::Postmigrate.to_string(), "postmigrate");
    assert_eq!(
        MigrationStatus::PostcopyRecoverSetup.to_string(),
        "postcopy-recover-setup"
    );
    assert_eq!(
        MigrationCapability::XIgnoreShared.to_string(),
        "x-ignore-shared"
    );
}

#[test]
fn capabilities_and_parameters() {
    let caps: Vec<MigrationCapabilityStatus> = round_trip("query-migrate-capabilities.json");
    assert_eq!(caps.len(), 22);
    assert!(caps
        .iter()
        .all(|c| c.capability != MigrationCapability::Other));
    assert!(caps.contains(&MigrationCapabilityStatus {
        capability: MigrationCapability::Events,
        state: true
    }));

    let set: MigrateSetCapabilities = round_trip("migrate-set-capabilities.json");
    assert_eq!(set.capabilities[0].capability, MigrationCapability::Xbzrle);

    let p: MigrationParameters = round_trip("query-migrate-parameters-qemu10.json");
    assert_eq!(p.max_bandwidth, Some(134217728));
    assert_eq!(p.zero_page_detection, Some(ZeroPageDetection::Multifd));
    assert_eq!(p.mode, Some(MigMode::Normal));
    assert_eq!(p.tls_creds.as_deref(), Some(""));

    let set = MigrateSetParameters {
        downtime_limit: Some(500),
        tls_creds: Some(StrOrNull::Null),
        tls_hostname: Some(StrOrNull::Str("dst".into())),
        multifd_compression: Some(MultiFdCompression::Zstd),
        ..Default::default()
    };
    assert_eq!(
        serde_json::to_value(&set).unwrap(),
        json!({"downtime-limit": 500, "tls-creds": null, "tls-hostname": "dst", "multifd-compression": "zstd"})
    );
    assert_eq!(
        serde_json::to_value(MigrateSetParameters::default()).unwrap(),
        json!({})
    );
}

#[test]
fn migrate_incoming_arguments() {
    let uri: MigrateIncoming = round_trip("migrate-incoming-uri.json");
    assert_eq!(
        uri,
        MigrateIncoming::new(MigrationTarget::Uri("tcp:0:4446".into()))
    );

    let inet: MigrateIncoming = round_trip("migrate-incoming-channels-inet.json");
    let addr: MigrationAddress = "tcp:10.12.34.9:1050".parse().unwrap();
    assert_eq!(
        inet,
        MigrateIncoming::new(MigrationTarget::from_address(addr, true))
    );

    let exec: MigrateIncoming = round_trip("migrate-incoming-channels-exec.json");
    let MigrationTarget::Channels(ch) = &exec.target else {
        panic!("{exec:?}")
    };
    assert_eq!(ch[0].channel_type, MigrationChannelType::Main);
    assert_eq!(
        ch[0].addr,
        MigrationAddress::Exec {
            args: vec![
                "/bin/nc".into(),
                "-p".into(),
                "6000".into(),
                "/some/sock".into()
            ]
        }
    );

    let rdma: MigrateIncoming = round_trip("migrate-incoming-channels-rdma.json");
    let addr: MigrationAddress = "rdma:10.12.34.9:1050".parse().unwrap();
    assert_eq!(
        rdma,
        MigrateIncoming::new(MigrationTarget::from_address(addr, true))
    );

    assert_eq!(
        serde_json::to_value(
            MigrateIncoming::new(MigrationTarget::Uri("defer".into())).exit_on_error(false)
        )
        .unwrap(),
        json!({"uri": "defer", "exit-on-error": false})
    );
}

#[test]
fn migrate_arguments() {
    let file: Migrate = round_trip("migrate-channels-file.json");
    let addr: MigrationAddress = "file:/tmp/migfile,offset=0x1000".parse().unwrap();
    assert_eq!(
        file,
        Migrate::new(MigrationTarget::from_address(addr.clone(), true))
    );
    // Without channels the same address becomes the legacy URI, in decimal.
    assert_eq!(
        serde_json::to_value(Migrate::new(MigrationTarget::from_address(addr, false)).resume(true))
            .unwrap(),
        json!({"uri": "file:/tmp/migfile,offset=4096", "resume": true})
    );
    let unix: MigrationAddress = "unix:/run/m.sock".parse().unwrap();
    assert_eq!(
        serde_json::to_value(Migrate::new(MigrationTarget::from_address(unix, true))).unwrap(),
        json!({"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": "/run/m.sock"}}]})
    );
    // Both or neither of uri/channels is refused on decode too.
    assert!(serde_json::from_value::<Migrate>(json!({})).is_err());
}

#[test]
fn events() {
    let ev: Event = serde_json::from_value(json!({
        "event": "MIGRATION", "data": {"status": "completed"},
        "timestamp": {"seconds": 1432121972, "microseconds": 744001}
    }))
    .unwrap();
    assert_eq!(ev.migration_status(), Some(MigrationStatus::Completed));
    assert_eq!(ev.migration_pass(), None);
    assert_eq!(ev.timestamp.seconds, 1432121972);
    let ev: Event = serde_json::from_value(json!({
        "event": "MIGRATION_PASS", "data": {"pass": 2},
        "timestamp": {"seconds": 1449669631, "microseconds": 239225}
    }))
    .unwrap();
    assert_eq!(ev.migration_pass(), Some(2));
    assert_eq!(ev.migration_status(), None);
}

#[test]
fn version_compare() {
    let v = VersionTriple {
        major: 8,
        minor: 2,
        micro: 2,
    };
    assert!(v.at_least(8, 2, 2));
    assert!(v.at_least(8, 1, 9));
    assert!(v.at_least(7, 99, 99));
    assert!(!v.at_least(8, 2, 3));
    assert!(!v.at_least(9, 0, 0));
    assert_eq!(v.to_string(), "8.2.2");
}

#[test]
fn channels_probe_on_captured_schemas() {
    let v10 = golden("qemu-10.0-schema-migrate.json");
    assert_eq!(
        schema_supports_channels(v10.as_array().unwrap()),
        Some(true)
    );
    let v72 = golden("qemu-7.2-schema-migrate.json");
    assert_eq!(
        schema_supports_channels(v72.as_array().unwrap()),
        Some(false)
    );
    assert_eq!(schema_supports_channels(&[]), None);
    // A migrate command whose argument type is missing tells nothing.
    let broken = vec![json!({"name": "migrate", "meta-type": "command", "arg-type": "9"})];
    assert_eq!(schema_supports_channels(&broken), None);
}

// ---- legacy URIs ----

fn uri(s: &str) -> MigrationAddress {
    MigrationAddress::parse_uri(s).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn uri_parse_and_print() {
    let cases: Vec<(&str, MigrationAddress)> = vec![
        (
            "unix:/tmp/m.sock",
            MigrationAddress::Socket(SocketAddress::Unix {
                path: "/tmp/m.sock".into(),
            }),
        ),
        (
            "tcp:10.0.0.1:4444",
            MigrationAddress::Socket(SocketAddress::Inet(InetSocketAddress::new(
                "10.0.0.1", "4444",
            ))),
        ),
        (
            "tcp:[::1]:4444",
            MigrationAddress::Socket(SocketAddress::Inet(InetSocketAddress::new("::1", "4444"))),
        ),
        (
            "tcp::4444",
            MigrationAddress::Socket(SocketAddress::Inet(InetSocketAddress::new("", "4444"))),
        ),
        (
            "exec:cat > /tmp/x",
            MigrationAddress::Exec {
                args: vec!["/bin/sh".into(), "-c".into(), "cat > /tmp/x".into()],
            },
        ),
        (
            "file:/tmp/img",
            MigrationAddress::File {
                filename: "/tmp/img".into(),
                offset: 0,
            },
        ),
        (
            "file:/tmp/img,offset=4096",
            MigrationAddress::File {
                filename: "/tmp/img".into(),
                offset: 4096,
            },
        ),
        (
            "rdma:h:1",
            MigrationAddress::Rdma(InetSocketAddress::new("h", "1")),
        ),
        (
            "vsock:3:4444",
            MigrationAddress::Socket(SocketAddress::Vsock {
                cid: "3".into(),
                port: "4444".into(),
            }),
        ),
        (
            "fd:migfd",
            MigrationAddress::Socket(SocketAddress::Fd {
                str: "migfd".into(),
            }),
        ),
    ];
    for (text, addr) in cases {
        assert_eq!(uri(text), addr, "{text}");
        assert_eq!(addr.to_uri(), text, "{text}");
        assert_eq!(addr.to_string(), text);
    }
    // Hex offsets are accepted like QEMU does, printed back in decimal.
    assert_eq!(uri("file:/a,offset=0x1000").to_uri(), "file:/a,offset=4096");
    let with_opts = uri("tcp:[::]:4444,ipv6,to=4450");
    let MigrationAddress::Socket(SocketAddress::Inet(a)) = &with_opts else {
        panic!("{with_opts:?}")
    };
    assert_eq!((a.ipv6, a.to), (Some(true), Some(4450)));
    assert_eq!(with_opts.to_uri(), "tcp:[::]:4444,to=4450,ipv6=on");
    assert_eq!(uri(&with_opts.to_uri()), with_opts);
    // Non-shell exec args are joined.
    let exec = MigrationAddress::Exec {
        args: vec!["nc".into(), "h".into(), "1".into()],
    };
    assert_eq!(exec.to_uri(), "exec:nc h 1");
}

#[test]
fn uri_errors_name_input_and_problem() {
    for (bad, why) in [
        ("/tmp/m.sock", "expected scheme:address"),
        ("udp:h:1", "unknown scheme \"udp\""),
        ("unix:", "missing socket path"),
        ("tcp:host", "expected host:port"),
        ("tcp:host:", "missing port"),
        ("tcp:::1:4444", "brackets"),
        ("tcp:[::1:4444", "missing ']'"),
        ("tcp:h:1,bogus", "unknown option"),
        ("tcp:h:1,to=x", "not a port"),
        ("file:/a,offset=abc", "not a number"),
        ("file:/a,size=1", "unknown file option"),
        ("file:", "missing file name"),
        ("exec:", "missing command"),
        ("vsock:3", "vsock:cid:port"),
    ] {
        let err = MigrationAddress::parse_uri(bad).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(why), "{bad}: {msg}");
        assert!(msg.contains(&format!("{bad:?}")), "{bad}: {msg}");
        assert!(bad.parse::<MigrationAddress>().is_err());
    }
}

#[test]
fn error_messages() {
    let busy = Error::Busy {
        target: "/run/vm.qmp".into(),
        after: std::time::Duration::from_secs(5),
    };
    assert_eq!(
        busy.to_string(),
        "QMP socket busy: /run/vm.qmp sent no greeting within 5s (is another client, e.g. libvirt \
         or a script, connected? QMP serves one client at a time)"
    );
    assert!(busy.is_unreachable());
    assert!(!Error::Disconnected.is_unreachable());
    let q = Error::Qmp {
        command: "migrate".into(),
        class: "GenericError".into(),
        desc: "no".into(),
    };
    assert_eq!(
        q.to_string(),
        "QMP command migrate failed: GenericError: no"
    );
    assert!(!q.is_unreachable());
}
