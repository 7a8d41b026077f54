//! `qmigrate`: live-migrate QEMU virtual machines between hosts.
//!
//! The binary's edge: parse arguments, install logging, run one subcommand, print the error
//! chain once and turn it into a documented exit code.

mod args;
mod cmd;
mod exit;
mod hints;
mod logging;
mod output;
mod signals;
mod tls;
mod token;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live-migrate QEMU virtual machines between hosts.
///
/// In one command per host: `tunnel-server --qmp` on the destination, `migrate` on the source.
/// Or step by step: `tunnel-server` and `receive` on the destination, `tunnel-client` and
/// `send` on the source.
#[derive(Debug, Parser)]
#[command(name = "qmigrate", version, about, long_about = None, after_help = exit::EXIT_CODES_HELP)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug incl. every QMP command, -vvv: trace).
    /// RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Destination: accept tunnel connections and forward each to QEMU's migration socket.
    TunnelServer(cmd::tunnel_server::Args),
    /// Source: accept QEMU's migration connections on a Unix socket and tunnel each to the server.
    TunnelClient(cmd::tunnel_client::Args),
    /// Destination: prepare QEMU (started with `-incoming defer`) to receive a migration.
    Receive(cmd::receive::Args),
    /// Source: start the migration and follow it to the end.
    Send(cmd::send::Args),
    /// Source, in one command: tunnel to a `tunnel-server --qmp`, which prepares the
    /// destination, then migrate and follow it to the end on both sides.
    Migrate(cmd::migrate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("qmigrate: error: cannot start the async runtime: {err}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qmigrate: error: {}", hints::report(&err));
            ExitCode::from(exit::code_of(&err))
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::TunnelServer(args) => cmd::tunnel_server::run(args).await,
        Command::TunnelClient(args) => cmd::tunnel_client::run(args).await,
        Command::Receive(args) => cmd::receive::run(args).await,
        Command::Send(args) => cmd::send::run(args).await,
        Command::Migrate(args) => cmd::migrate::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// What the token does not do must be said where the transports are chosen: on tcp://
    /// and ws:// nothing checks the bytes, so the help of every command that opens a tunnel,
    /// and the README, say so next to the advice to use TLS.
    #[test]
    fn help_says_plain_transports_do_not_protect_the_bytes() {
        let mut cli = Cli::command();
        for name in ["tunnel-server", "tunnel-client", "migrate"] {
            let help = cli
                .find_subcommand_mut(name)
                .expect("the subcommand")
                .render_long_help()
                .to_string();
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            for words in ["a bit flipped on the wire", "use tls:// or wss://"] {
                assert!(
                    help.contains(words),
                    "{name} --help lacks {words:?}:\n{help}"
                );
            }
        }
        let readme = include_str!("../../../README.md");
        let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
        for words in ["a bit flipped on the wire", "use `tls://` or `wss://`"] {
            assert!(readme.contains(words), "the README lacks {words:?}");
        }
    }
}
