//! For operators: `tunnel-server --config` (strict, every mistake named at its line),
//! `--metrics` scraped during and after real migrations (checked by value and by
//! `promtool check metrics`), and the drain on SIGTERM.

use crate::support;
use support::{path, qemu10, Pair};

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qmigrate_qmp::{MigrationStatus, RunState};
use support::proc::{run, Output, Proc};
use support::qemu::{self, QemuBinary};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const MEM_MIB: u64 = 128;
const RUN: Duration = Duration::from_secs(120);
const READY: Duration = Duration::from_secs(10);
const QUICK: Duration = Duration::from_secs(20);

/// A source VM and a destination waiting with `-incoming defer`, of [`MEM_MIB`].
fn pair(bin: &QemuBinary) -> Pair {
    support::pair(bin, MEM_MIB)
}

/// Writes a private file (0600) and returns its path.
fn private(dir: &Path, name: &str, text: &str) -> PathBuf {
    let file = dir.join(name);
    std::fs::write(&file, text).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    file
}

async fn check(config: &Path, flags: &[&str]) -> Output {
    let mut args = vec![
        "tunnel-server".to_owned(),
        "--config".into(),
        path(config),
        "--check-config".into(),
    ];
    args.extend(flags.iter().map(|s| s.to_string()));
    run(&args, QUICK).await
}

/// Every kind of mistake is refused with exit 2, the file, the line and what is allowed; a
/// good file is accepted, its keys shown, and flags win over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_is_checked_strictly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let token = private(d, "token", "correct horse battery staple\n");
    let good = private(
        d,
        "good.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ntransport = \"ws\"\ntoken-file = \"{}\"\nmetrics = \
             \"127.0.0.1:9187\"\n\n[routes]\nweb1 = \"/run/qemu/web1.qmp\"\n\n[timeouts]\n\
             handshake = \"5s\"\nshutdown = \"1m\"\n",
            path(&token)
        ),
    );
    let out = check(&good, &[]).await;
    out.expect_success();
    for want in [
        "configuration OK",
        "listen: ws://127.0.0.1:0/",
        "token: yes",
        "routes: /web1 -> /run/qemu/web1.qmp",
        "metrics: http://127.0.0.1:9187/metrics",
        "timeouts: connect 30.0s, handshake 5.0s, shutdown 1m00s",
    ] {
        assert!(out.stdout.contains(want), "{want:?} in\n{}", out.stdout);
    }
    let out = check(
        &good,
        &[
            "--listen",
            "127.0.0.1:5",
            "--handshake-timeout",
            "2s",
            "--qmp",
            "/run/q.qmp",
        ],
    )
    .await;
    out.expect_success();
    for want in [
        "listen: ws://127.0.0.1:5/",
        "routes: / -> /run/q.qmp\n",
        "handshake 2.0s, shutdown 1m00s",
    ] {
        assert!(out.stdout.contains(want), "{want:?} in\n{}", out.stdout);
    }

    let token_line = format!("token-file = \"{}\"\n", path(&token));
    let cases: [(&str, String, &[&str]); 5] = [
        (
            "unknown key",
            format!("listen = \"127.0.0.1:0\"\n{token_line}lisen = \"x\"\n"),
            &[
                ":3: unknown key `lisen`",
                "`listen`",
                "`metrics`",
                "`timeouts`",
            ],
        ),
        (
            "bad value type",
            format!("{token_line}\ninsecure = \"yes\"\n"),
            &[":3: invalid type: string \"yes\", expected a boolean"],
        ),
        (
            "bad address",
            format!("{token_line}listen = \"http://0.0.0.0:80\"\n"),
            &[
                ":2: invalid tunnel address",
                "tcp://HOST:PORT, ws://HOST:PORT/PATH",
            ],
        ),
        (
            "bad value",
            format!("{token_line}transport = \"quic\"\n"),
            &[":2: unknown variant `quic`, expected `tcp` or `ws`"],
        ),
        (
            "missing token file",
            "listen = \"127.0.0.1:0\"\n\ntoken-file = \"/nonexistent/token\"\n".to_owned(),
            &[":3: token-file: cannot read the token file /nonexistent/token"],
        ),
    ];
    for (what, text, wants) in cases {
        let file = private(d, "bad.toml", &text);
        let out = check(&file, &[]).await;
        out.expect_code(2);
        let line = out.error_line();
        assert!(
            line.contains(&format!("{}:", path(&file))),
            "{what}: the file is named: {line}"
        );
        for want in wants {
            assert!(line.contains(want), "{what}: {want:?} in {line}");
        }
    }

    // Without --check-config, a bad file stops the server before it listens.
    let bad = private(d, "bad.toml", "listen = \"127.0.0.1:0\"\nport = 1\n");
    let out = run(["tunnel-server", "--config", &path(&bad)], QUICK).await;
    out.expect_code(2);
    assert!(out.stdout.is_empty(), "no ready line: {}", out.stdout);
    assert!(
        out.error_line().contains(":2: unknown key `port`"),
        "{}",
        out.stderr
    );
}

/// One scrape of `http://ADDR/metrics`: the body.
async fn scrape(addr: &str) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to the metrics at {addr}: {e}"));
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("send the request");
    let mut response = String::new();
    tokio::time::timeout(QUICK, conn.read_to_string(&mut response))
        .await
        .expect("the metrics answer in time")
        .expect("read the metrics");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not HTTP: {response}"));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    body.to_owned()
}

/// The value of one series (`name{labels}`), 0 if absent is not accepted: every series the
/// test reads exists from the start.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap_or_else(|e| panic!("{series}: {e}"))
}

/// Scrapes until `pred` holds on the body; panics with the last body after `deadline`.
async fn scrape_until(
    addr: &str,
    deadline: Duration,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let text = scrape(addr).await;
        if pred(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what} not seen within {deadline:?}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The metrics address a server logged (`metrics on http://ADDR/metrics`).
async fn metrics_addr(server: &Proc) -> String {
    for _ in 0..100 {
        if let Some(addr) = server.stderr().lines().find_map(|l| {
            let rest = l.split("metrics on http://").nth(1)?;
            Some(rest.split('/').next()?.to_owned())
        }) {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "tunnel-server logged no metrics address:\n{}",
        server.stderr()
    );
}

/// promtool from PATH or unpacked by scripts/install-deps.sh into target/prometheus.
fn promtool() -> Option<PathBuf> {
    let unpacked = qemu::workspace_root().join("target/prometheus/usr/bin/promtool");
    if unpacked.is_file() {
        return Some(unpacked);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("promtool"))
            .find(|p| p.is_file())
    })
}

/// `promtool check metrics` accepts the exposition (the Prometheus naming conventions
/// included); skipped locally without promtool, a failure under CI=true.
fn promtool_accepts(text: &str) {
    let Some(promtool) = promtool() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("promtool missing under CI=true: run scripts/install-deps.sh");
        }
        eprintln!("skipping promtool: not found (run scripts/install-deps.sh)");
        return;
    };
    use std::io::Write as _;
    let mut child = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics complains:\n{}{}\n--- metrics\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn migrate(p: &Pair, to: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "migrate".to_owned(),
        "--qmp".into(),
        path(&p.src.qmp_path),
        "--to".into(),
        to.to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run(&args, RUN).await
}

/// A server from a config file (WebSocket, a token, two routes, metrics on port 0) and three
/// real migrations: refused by token (none, then a wrong one), completed (scraped while it
/// runs and after), cancelled by the source's --timeout. Each counter is checked by value,
/// and promtool accepts the exposition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_real_migrations() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (a, b) = (pair(&bin), pair(&bin));
    let token = private(d, "token", "correct horse battery staple\n");
    let wrong = private(d, "wrong", "incorrect horse battery staple\n");
    let config = private(
        d,
        "server.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ntransport = \"ws\"\ntoken-file = \"{}\"\nmetrics = \
             \"127.0.0.1:0\"\n[routes]\na = \"{}\"\nb = \"{}\"\n[timeouts]\nhandshake = \"1s\"\n",
            path(&token),
            path(&a.dst.qmp_path),
            path(&b.dst.qmp_path)
        ),
    );
    let mut server = Proc::spawn(
        "tunnel-server",
        d,
        ["tunnel-server", "--config", &path(&config)],
    );
    let line = server.next_line(READY).await;
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .trim()
        .to_owned();
    assert!(
        url.starts_with("ws://127.0.0.1:"),
        "transport = \"ws\": {url}"
    );
    let addr = metrics_addr(&server).await;
    let (to_a, to_b) = (format!("{url}a"), format!("{url}b"));

    let fresh = scrape(&addr).await;
    for series in [
        "qmigrate_migrations_started_total{route=\"a\"}",
        "qmigrate_migrations_completed_total{route=\"b\"}",
        "qmigrate_relayed_bytes_total{transport=\"ws\",direction=\"received\"}",
        "qmigrate_handshake_refusals_total{reason=\"timeout\"}",
        "qmigrate_migration_downtime_seconds_count",
    ] {
        assert_eq!(value(&fresh, series), 0.0, "{series} at start");
    }
    assert!(fresh.contains("qmigrate_build_info{version=\""), "{fresh}");
    promtool_accepts(&fresh);

    // Refused by the token: none, then a wrong one.
    migrate(&a, &to_a, &[]).await.expect_code(1);
    migrate(&a, &to_a, &["--token-file", &path(&wrong)])
        .await
        .expect_code(1);
    let text = scrape_until(&addr, QUICK, "two refusals", |t| {
        value(
            t,
            "qmigrate_handshake_refusals_total{reason=\"wrong_token\"}",
        ) == 1.0
    })
    .await;
    assert_eq!(
        value(
            &text,
            "qmigrate_handshake_refusals_total{reason=\"no_token\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&text, "qmigrate_migrations_started_total{route=\"a\"}"),
        0.0
    );

    // Garbage (SSH at the WebSocket port), and a peer that says nothing (the config's
    // handshake timeout of 1s).
    let server_addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    let mut ssh = tokio::net::TcpStream::connect(&server_addr)
        .await
        .expect("connect");
    ssh.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        .await
        .expect("write");
    let silent = tokio::net::TcpStream::connect(&server_addr)
        .await
        .expect("connect");
    let text = scrape_until(&addr, QUICK, "garbage and a timeout", |t| {
        value(t, "qmigrate_handshake_refusals_total{reason=\"garbage\"}") == 1.0
            && value(t, "qmigrate_handshake_refusals_total{reason=\"timeout\"}") == 1.0
    })
    .await;
    assert_eq!(
        value(&text, "qmigrate_handshake_refusals_total{reason=\"tls\"}"),
        0.0
    );
    drop((ssh, silent));

    // Completed, slowed down so that it can be watched.
    let tok = path(&token);
    let running = {
        let a = &a;
        let to = to_a.clone();
        let tok = tok.clone();
        async move {
            migrate(
                a,
                &to,
                &["--token-file", &tok, "--no-start", "--max-bandwidth", "32M"],
            )
            .await
        }
    };
    // Scraped while it runs: the highest values seen before it completed.
    let done = std::sync::atomic::AtomicBool::new(false);
    let running = async {
        let out = running.await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        out
    };
    let watch = async {
        let (mut in_progress, mut received, mut active) = (0.0f64, 0.0f64, 0.0f64);
        let mut during = String::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let t = scrape(&addr).await;
            if value(&t, "qmigrate_migrations_completed_total{route=\"a\"}") == 0.0 {
                in_progress =
                    in_progress.max(value(&t, "qmigrate_migrations_in_progress{route=\"a\"}"));
                received = received.max(value(
                    &t,
                    "qmigrate_relayed_bytes_total{transport=\"ws\",direction=\"received\"}",
                ));
                active = active.max(value(
                    &t,
                    "qmigrate_tunnel_connections_active{transport=\"ws\"}",
                ));
                during = t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (in_progress, received, active, during)
    };
    let (out, (in_progress, received, active, during)) = tokio::join!(running, watch);
    out.expect_success();
    assert_eq!(in_progress, 1.0, "in progress while it ran:\n{during}");
    assert!(received > 0.0, "bytes counted while it ran:\n{during}");
    assert!(
        active >= 2.0,
        "control and data connections open:\n{during}"
    );
    promtool_accepts(&during);
    let after = scrape_until(&addr, QUICK, "the completed migration", |t| {
        value(t, "qmigrate_migrations_completed_total{route=\"a\"}") == 1.0
            && value(t, "qmigrate_tunnel_connections_active{transport=\"ws\"}") == 0.0
    })
    .await;
    assert_eq!(
        value(&after, "qmigrate_migrations_started_total{route=\"a\"}"),
        1.0
    );
    assert_eq!(
        value(&after, "qmigrate_migrations_failed_total{route=\"a\"}"),
        0.0
    );
    assert_eq!(
        value(&after, "qmigrate_migrations_in_progress{route=\"a\"}"),
        0.0
    );
    let received = value(
        &after,
        "qmigrate_relayed_bytes_total{transport=\"ws\",direction=\"received\"}",
    );
    assert!(
        received >= (MEM_MIB << 20) as f64,
        "the random RAM crossed the tunnel: {received} bytes"
    );
    assert_eq!(
        value(&after, "qmigrate_migration_duration_seconds_count"),
        1.0
    );
    assert!(value(&after, "qmigrate_migration_duration_seconds_sum") >= 2.0);
    assert_eq!(
        value(&after, "qmigrate_migration_downtime_seconds_count"),
        1.0
    );
    let dst = support::qmp(&a.dst.qmp_path).await;
    assert_eq!(
        support::migration_status(&dst).await.0,
        MigrationStatus::Completed
    );
    drop(dst);

    // Cancelled by the source.
    let out = migrate(
        &b,
        &to_b,
        &[
            "--token-file",
            &tok,
            "--max-bandwidth",
            "8M",
            "--timeout",
            "2s",
        ],
    )
    .await;
    out.expect_code(4);
    let end = scrape_until(
        &addr,
        Duration::from_secs(40),
        "the cancelled migration",
        |t| value(t, "qmigrate_migrations_cancelled_total{route=\"b\"}") == 1.0,
    )
    .await;
    assert_eq!(
        value(&end, "qmigrate_migrations_started_total{route=\"b\"}"),
        1.0
    );
    assert_eq!(
        value(&end, "qmigrate_migrations_failed_total{route=\"b\"}"),
        0.0
    );
    assert_eq!(
        value(&end, "qmigrate_migrations_completed_total{route=\"b\"}"),
        0.0
    );
    assert_eq!(
        value(&end, "qmigrate_migrations_completed_total{route=\"a\"}"),
        1.0
    );
    assert_eq!(
        value(&end, "qmigrate_migration_duration_seconds_count"),
        2.0
    );
    assert_eq!(
        value(&end, "qmigrate_migration_downtime_seconds_count"),
        1.0,
        "no downtime for a cancelled migration"
    );
    promtool_accepts(&end);
    for secret in [
        path(&token),
        path(&a.dst.qmp_path),
        "correct horse".to_owned(),
    ] {
        assert!(!end.contains(&secret), "the metrics expose {secret}");
    }
    let src = support::qmp(&b.src.qmp_path).await;
    assert_eq!(support::vm_state(&src).await.0, RunState::Running);
    drop(src);

    // An idle server stops at once on SIGTERM. It exits 1 if a tunnel connection failed in
    // its life: the cancelled migration's may have (its relay ends with an error or cleanly,
    // depending on which side closes first).
    server.signal(libc::SIGTERM);
    let (status, _) = server.wait(QUICK).await;
    let log = server.stderr();
    assert!(log.contains("SIGTERM: shutting down"), "{log}");
    let failed = log.contains("tunnel connections failed");
    assert_eq!(status.code(), Some(i32::from(failed)), "{log}");
}

/// SIGTERM during a migration: the server starts no new one, says what it waits for, lets the
/// migration complete and then exits 0; with a short --shutdown-timeout it cuts the migration
/// off and says so, and the source VM keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_migration_under_way_end() {
    let Some(bin) = qemu10() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    for (grace, completes) in [("2m", true), ("1s", false)] {
        let p = pair(&bin);
        let mut server = Proc::spawn(
            &format!("tunnel-server-{grace}"),
            d,
            [
                "tunnel-server",
                "--listen",
                "127.0.0.1:0",
                "--ws",
                "--qmp",
                &path(&p.dst.qmp_path),
                "--metrics",
                "127.0.0.1:0",
                "--shutdown-timeout",
                grace,
            ],
        );
        let line = server.next_line(READY).await;
        let url = line
            .strip_prefix("listening on ")
            .expect("ready line")
            .trim()
            .to_owned();
        let addr = metrics_addr(&server).await;
        let running = migrate(&p, &url, &["--no-start", "--max-bandwidth", "32M"]);
        let stop = async {
            scrape_until(&addr, RUN, "the migration under way", |t| {
                value(t, "qmigrate_migrations_in_progress{route=\"/\"}") == 1.0
            })
            .await;
            server.signal(libc::SIGTERM);
        };
        let (out, ()) = tokio::join!(running, stop);
        let (status, _) = server.wait(QUICK).await;
        let log = server.stderr();
        assert!(
            log.contains("SIGTERM: starting no new migration; waiting up to")
                && log.contains("migrations under way: route / for"),
            "{log}"
        );
        if completes {
            out.expect_success();
            assert!(log.contains("all tunnel connections ended"), "{log}");
            assert_eq!(status.code(), Some(0), "{log}");
        } else {
            assert_eq!(out.code(), Some(1), "cut off: {}", out.stderr);
            assert!(
                log.contains("1.0s passed: cutting off")
                    && log.contains("migration cut short by the shutdown"),
                "{log}"
            );
            let src = support::qmp(&p.src.qmp_path).await;
            assert_eq!(support::vm_state(&src).await.0, RunState::Running);
        }
    }
}

/// `qmigrate completions SHELL` prints a script for each shell, and `qmigrate man --out DIR`
/// writes a page per visible subcommand with the flags of its `--help`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_pages_come_from_the_flags() {
    for (shell, marker) in [
        ("bash", "complete -F _qmigrate"),
        ("zsh", "#compdef qmigrate"),
        ("fish", "complete -c qmigrate"),
    ] {
        let out = run(["completions", shell], QUICK).await;
        out.expect_success();
        assert!(
            out.stdout.contains(marker),
            "{shell}: {marker:?} in\n{}",
            out.stdout
        );
        assert!(out.stdout.contains("tunnel-server"), "{shell}");
        assert!(out.stdout.contains("check-config"), "{shell}");
    }
    run(["completions", "tcsh"], QUICK).await.expect_code(2);

    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(["man", "--out", &path(dir.path())], QUICK).await;
    out.expect_success();
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .expect("the pages")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(
        pages,
        [
            "qmigrate-completions.1",
            "qmigrate-migrate.1",
            "qmigrate-receive.1",
            "qmigrate-recover.1",
            "qmigrate-send.1",
            "qmigrate-tunnel-client.1",
            "qmigrate-tunnel-server.1",
            "qmigrate.1",
        ],
        "the hidden `man` has no page"
    );
    let page = std::fs::read_to_string(dir.path().join("qmigrate-tunnel-server.1")).expect("page");
    let help = run(["tunnel-server", "--help"], QUICK).await;
    for flag in help
        .stdout
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
    {
        // roff escapes the dashes.
        let escaped = flag.replace('-', "\\-");
        assert!(page.contains(&escaped), "{flag} is not in the man page");
    }
}
