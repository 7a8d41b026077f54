//! Endurance: one guest migrated back and forth between the two routes of one long-running
//! `tunnel-server`, as `qmigrate-bench endurance` does at scale. Every hop must complete with
//! the guest's RAM intact, and the server must hold no more open descriptors after the last
//! hop than after the first: a server that keeps a socket, a file or a QMP connection per
//! migration fails here.

use crate::support;
use support::path;

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use qmigrate_qmp::{MigrationStatus, RunState};
use support::proc::{run, Proc};
use support::qemu::{self, Vm, VmConfig};

const MEM_MIB: u64 = 64;
const HOPS: usize = 6;
const RUN: Duration = Duration::from_secs(120);
const ROUTES: [&str; 2] = ["a", "b"];

/// The entries of `/proc/PID/fd`, once they have stopped changing: a session's connections may
/// close a moment after `migrate` has the destination's verdict.
fn settled_fds(pid: i32) -> usize {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = count();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = count();
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Six migrations a -> b -> a ... of a 64 MiB guest with random RAM through one server with
/// two routes, alternating the direct data path and `--relay`; each destination is a fresh
/// QEMU whose QMP socket is the route's path, each old source is stopped after its hop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_through_one_server_keeps_its_descriptors() {
    let Some(bin) = qemu::require(qemu::qemu10(), "QEMU 10") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "endurance test token\n").expect("token file");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let qmp = ROUTES.map(|r| dir.path().join(format!("{r}.qmp")));

    let first = Vm::start(
        &bin,
        &VmConfig {
            mem_mib: MEM_MIB,
            qmp_path: Some(qmp[0].clone()),
            ..VmConfig::default()
        },
    )
    .expect("start the first source");
    // The original RAM as the guest sees it, before any migration.
    let original = {
        let qmp = support::qmp(&qmp[0]).await;
        support::ram_sha256(&qmp, MEM_MIB, &dir.path().join("original.ram")).await
    };

    let mut args = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--token-file".into(),
        path(&token),
    ];
    for (route, qmp) in ROUTES.iter().zip(&qmp) {
        args.extend(["--route".into(), format!("{route}={}", path(qmp))]);
    }
    let mut server = Proc::spawn("tunnel-server", dir.path(), &args);
    let line = server.next_line(Duration::from_secs(10)).await;
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .trim()
        .trim_end_matches('/')
        .to_owned();

    let mut vms: [Option<Vm>; 2] = [Some(first), None];
    let mut fds = Vec::new();
    for hop in 0..HOPS {
        let (from, to) = (hop % 2, 1 - hop % 2);
        let relay = hop % 2 == 1;
        let dst = Vm::start(
            &bin,
            &VmConfig {
                qmp_path: Some(qmp[to].clone()),
                ..qemu::destination_config(MEM_MIB)
            },
        )
        .expect("start the destination");
        vms[to] = Some(dst);
        let mut args = vec![
            "migrate".to_owned(),
            "--qmp".into(),
            path(&qmp[from]),
            "--to".into(),
            format!("{url}/{}", ROUTES[to]),
            "--token-file".into(),
            path(&token),
        ];
        if relay {
            args.push("--relay".into());
        }
        let out = run(&args, RUN).await;
        assert_eq!(
            out.code(),
            Some(0),
            "hop {} ({} -> {}, {}) failed:\n{}\n--- tunnel-server stderr\n{}",
            hop + 1,
            ROUTES[from],
            ROUTES[to],
            if relay { "relay" } else { "direct" },
            out.stderr,
            server.stderr()
        );
        let path_taken = if relay { "relayed" } else { "direct data path" };
        assert!(out.stderr.contains(path_taken), "{}", out.stderr);

        let dst = support::qmp(&qmp[to]).await;
        assert_eq!(
            support::migration_status(&dst).await.0,
            MigrationStatus::Completed
        );
        assert_eq!(support::vm_state(&dst).await.0, RunState::Running);
        let ram = support::ram_sha256(&dst, MEM_MIB, &dir.path().join("hop.ram")).await;
        assert_eq!(
            ram,
            original,
            "after hop {} the guest's RAM is not the original",
            hop + 1
        );
        drop(dst);
        // The old source has done its part; its route's path is free for the next hop.
        vms[from] = None;
        fds.push(settled_fds(server.pid()));
    }

    assert!(
        fds.iter().all(|&n| n == fds[0]),
        "the tunnel-server's open descriptors changed over the hops: {fds:?}"
    );
    server.kill().await;
}
