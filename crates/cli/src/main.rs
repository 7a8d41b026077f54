//! `qmigrate`: live-migrate QEMU virtual machines between hosts.
//!
//! The binary's edge: parse arguments, install logging, run one subcommand, print the error
//! chain once and turn it into a documented exit code.

mod args;
mod cmd;
mod config;
mod exit;
mod hints;
mod logging;
mod metrics;
mod output;
mod signals;
mod tls;
mod token;
mod units;

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Subcommand};

/// Live-migrate QEMU virtual machines between hosts.
///
/// In one command per host: `tunnel-server --qmp` on the destination, `migrate` on the source.
/// Or step by step: `tunnel-server` and `receive` on the destination, `tunnel-client` and
/// `send` on the source.
#[derive(Debug, clap::Parser)]
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
    /// Source: resume a postcopy migration left paused by a broken network, against the
    /// destination's `tunnel-server --qmp`.
    Recover(cmd::recover::Args),
    /// Print the shell completion script for SHELL (bash: `source <(qmigrate completions bash)`).
    Completions(cmd::docs::CompletionsArgs),
    /// Write the man pages (qmigrate.1, qmigrate-SUBCOMMAND.1) into a directory.
    #[command(hide = true)]
    Man(cmd::docs::ManArgs),
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli =
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    // Which flags were given on the command line: they win over a config file.
    let given = matches
        .subcommand()
        .map(|(_, sub)| cmd::Given::of(sub))
        .unwrap_or_default();
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
    match runtime.block_on(run(cli, given)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qmigrate: error: {}", hints::report(&err));
            ExitCode::from(exit::code_of(&err))
        }
    }
}

async fn run(cli: Cli, given: cmd::Given) -> anyhow::Result<()> {
    match cli.command {
        Command::TunnelServer(args) => cmd::tunnel_server::run(args, &given).await,
        Command::TunnelClient(args) => cmd::tunnel_client::run(args).await,
        Command::Receive(args) => cmd::receive::run(args).await,
        Command::Send(args) => cmd::send::run(args).await,
        Command::Migrate(args) => cmd::migrate::run(args).await,
        Command::Recover(args) => cmd::recover::run(args).await,
        Command::Completions(args) => cmd::docs::completions(&args, Cli::command()),
        Command::Man(args) => cmd::docs::man(&args, Cli::command()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

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
