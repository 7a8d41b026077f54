//! `qmigrate tunnel-server`: the destination end of the tunnel.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use qmigrate_migration::session::QmpController;
use qmigrate_transport::{Endpoint, Error, Scheme, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

use super::common::{finish, ready};
use crate::exit::Exit;
use crate::hints;
use crate::signals::Interrupts;
use crate::tls::{default_scheme, ServerTlsArgs};
use crate::token::TokenArgs;
use crate::units::parse_duration;

/// Arguments of `qmigrate tunnel-server`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prints `listening on tcp://IP:PORT` (or `ws://IP:PORT/PATH`, `tls://IP:PORT`, \
`wss://IP:PORT/PATH`) on stdout once it listens. \
Each tunnel connection is connected to --socket only after its handshake, in the order the \
source opened them; the socket is never probed, since QEMU takes any connection as migration data.

Every connection must prove it knows the token (--token-file or QMIGRATE_TOKEN) before \
anything else happens. Without a token the server listens only on a loopback address \
(127.0.0.1, ::1), unless it requires TLS client certificates (--tls-client-ca) or --insecure \
is given.

With --tls-cert and --tls-key the server speaks TLS (an address without a scheme becomes \
tls://, or wss:// with --ws) and logs its certificate's fingerprint, which clients can pin \
with --tls-fingerprint. TLS never takes the direct data path: the stream stays encrypted \
through qmigrate.

On tcp:// and ws:// nothing protects the bytes themselves: the token authenticates the \
connection, not the data, and the stream (the guest's memory) travels in the clear, so a bit \
flipped on the wire (faulty hardware, or anyone on the path) reaches the destination QEMU \
unnoticed. Across a network you do not trust, use tls:// or wss://: TLS encrypts every byte and \
refuses any that was altered.")]
pub struct Args {
    /// Use WebSocket instead of plain TCP (and default to port 8765).
    #[arg(long)]
    pub ws: bool,

    /// Where to listen: HOST:PORT, tcp://HOST:PORT, ws://HOST:PORT/PATH, tls://HOST:PORT or
    /// wss://HOST:PORT/PATH (a scheme overrides --ws). Port 0 picks a free port.
    /// [default: 0.0.0.0:9999, with --ws 0.0.0.0:8765]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// The destination QEMU's migration socket (where `qmigrate receive --socket` makes QEMU
    /// listen).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/tmp/qemu_migration_dest.sock"
    )]
    pub socket: PathBuf,

    /// Also play `receive` for `qmigrate migrate`: the destination QEMU's QMP socket (route
    /// `/`). The source then sends the settings, this server prepares QEMU on a private socket
    /// for each migration (--socket is not used) and starts the VM afterwards.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<String>,

    /// Several destination VMs through one server: NAME=QMP_PATH, repeatable. The source names
    /// the route in its URL path (ws://HOST:PORT/NAME); unknown names are refused.
    #[arg(long = "route", value_name = "NAME=PATH", value_parser = parse_route)]
    pub routes: Vec<(String, String)>,

    /// Exit after the first migration's connections have all closed (0 if all went well).
    #[arg(long)]
    pub once: bool,

    /// How long a connection waits for the destination socket to appear.
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// How long a new connection may take to send its handshake (and prove it knows the
    /// token).
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    #[command(flatten)]
    pub token: TokenArgs,

    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// Listen on a non-loopback address without a token or TLS client certificates: anyone
    /// who can reach the port can then write a migration stream into the destination VM.
    /// Only for a trusted network.
    #[arg(long)]
    pub insecure: bool,
}

/// Runs `qmigrate tunnel-server`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let plain = if args.ws { Scheme::Ws } else { Scheme::Tcp };
    let scheme = default_scheme(plain, args.tls.any());
    let listen = args
        .listen
        .unwrap_or_else(|| format!("0.0.0.0:{}", scheme.default_port()));
    let listen = Endpoint::parse(&listen, scheme).context(Exit::Usage)?;
    let tls = args.tls.load()?;
    // Logged once the server listens: the pin a client gives to trust this server.
    let pin = tls
        .as_ref()
        .map(|t| (t.fingerprint(), t.requires_client_certificates()));
    let config = ServerConfig {
        connect_timeout: args.connect_timeout,
        handshake_timeout: args.handshake_timeout,
        once: args.once,
        token: args.token.load()?,
        insecure: args.insecure,
        tls,
        refusal_text: hints::refusal,
        ..ServerConfig::new(&args.socket)
    };
    let mut server = match Server::bind(&listen, config).await {
        Err(e @ (Error::Unauthenticated { .. } | Error::TlsSetup(_))) => {
            return Err(e).context(Exit::Usage)
        }
        other => other?,
    };
    if let Some((fingerprint, client_certificates)) = pin {
        tracing::info!(
            client_certificates,
            "TLS: clients can pin this certificate with --tls-fingerprint {fingerprint}"
        );
    }
    let mut routes: BTreeMap<Option<String>, String> = args
        .routes
        .iter()
        .map(|(name, qmp)| (Some(name.clone()), qmp.clone()))
        .collect();
    if let Some(qmp) = &args.qmp {
        routes.insert(None, qmp.clone());
    }
    let controller = if routes.is_empty() {
        None
    } else {
        let controller = QmpController::new(routes)?;
        server = server.with_controller(Arc::new(controller.clone()));
        Some(controller)
    };
    let mut interrupts = Interrupts::install().context("cannot install signal handlers")?;
    ready(&format!("listening on {}", server.local_endpoint()))?;
    match &controller {
        Some(c) => tracing::info!(
            "preparing destinations for `qmigrate migrate`: {}",
            c.describe()
        ),
        None => tracing::info!("forwarding tunnel connections to {}", args.socket.display()),
    }

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let signal = interrupts.recv().await;
        tracing::info!("{signal}: shutting down");
        stop.cancel();
    });
    let report = server.serve(shutdown).await;
    finish(args.once, "tunnel-server", &report)
}

/// `NAME=PATH` of `--route`.
fn parse_route(value: &str) -> Result<(String, String), String> {
    let (name, path) = value
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=QMP_PATH, got {value:?}"))?;
    let name = name.trim_matches('/');
    if name.is_empty() || name.contains('/') || path.is_empty() {
        return Err(format!(
            "expected NAME=QMP_PATH with a NAME without slashes, got {value:?}"
        ));
    }
    Ok((name.to_owned(), path.to_owned()))
}
