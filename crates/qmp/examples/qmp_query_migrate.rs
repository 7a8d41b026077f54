//! Prints a QEMU's version, run state and migration status.
//!
//! Usage: `cargo run -p qmigrate-qmp --example qmp-query-migrate -- <qmp-socket | tcp:host:port>`

use std::process::ExitCode;

use qmigrate_qmp::{ConnectOptions, Qmp, QmpTarget, QueryMigrate, QueryStatus};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(target), None) = (args.next(), args.next()) else {
        eprintln!(
            "usage: qmp-query-migrate <QMP socket path | tcp:HOST:PORT>\n\
             e.g.   qmp-query-migrate /run/vm.qmp   (QEMU started with -qmp unix:/run/vm.qmp,server=on,wait=off)"
        );
        return ExitCode::from(2);
    };
    let target: QmpTarget = match target.parse() {
        Ok(t) => t,
        Err(never) => match never {},
    };
    match run(&target).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_unreachable() { 3 } else { 1 })
        }
    }
}

async fn run(target: &QmpTarget) -> Result<(), qmigrate_qmp::Error> {
    let qmp = Qmp::connect(target, &ConnectOptions::default()).await?;
    let v = &qmp.greeting().version;
    println!("QEMU {} {}", v.qemu, v.package);
    let status = qmp.execute(&QueryStatus).await?;
    println!("run state: {} (running: {})", status.status, status.running);
    let info = qmp.execute(&QueryMigrate).await?;
    let pretty = serde_json::to_string_pretty(&info).unwrap_or_else(|e| format!("<{e}>"));
    println!("query-migrate: {pretty}");
    qmp.close().await;
    Ok(())
}
