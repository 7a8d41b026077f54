//! The tracing subscriber: human-readable, to stderr, so stdout stays for the ready line,
//! `--json` and summaries.

use tracing_subscriber::EnvFilter;

/// Installs the subscriber; `RUST_LOG` wins over `-v`.
pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "warn,qmigrate=info,qmigrate_transport=info",
        1 => "info",
        2 => "info,qmigrate=debug,qmigrate_qmp=debug,qmigrate_transport=debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or a test's capture stays greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(verbose >= 2)
        .try_init();
}
