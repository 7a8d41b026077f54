//! `qmigrate tunnel-client`: the source end of the tunnel.

use std::path::PathBuf;

use anyhow::Context as _;
use qmigrate_transport::{Client, ClientConfig, Scheme};
use tokio_util::sync::CancellationToken;

use super::common::{finish, ready};
use crate::args::TunnelClientArgs;
use crate::signals::Interrupts;
use crate::tls::default_scheme;

/// Arguments of `qmigrate tunnel-client`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Prints `listening on unix:PATH -> URL` on stdout once the socket exists. Point the source \
QEMU's migration at PATH (`qmigrate send --socket PATH`); each connection QEMU opens becomes \
one tunnel connection.

With a token (--token-file or QMIGRATE_TOKEN), each connection proves it knows it, and the \
client accepts only a server that proves the same.

With tls:// or wss:// the client checks the server's certificate against --tls-ca, or pins it \
with --tls-fingerprint (else the system's CAs); verification is never off. An address without \
a scheme means TLS when a TLS flag is given.

On tcp:// and ws:// nothing protects the bytes themselves: the token authenticates the \
connection, not the data, and the stream (the guest's memory) travels in the clear, so a bit \
flipped on the wire (faulty hardware, or anyone on the path) reaches the destination QEMU \
unnoticed. Across a network you do not trust, use tls:// or wss://: TLS encrypts every byte and \
refuses any that was altered.")]
pub struct Args {
    /// Use WebSocket instead of plain TCP (and default to port 8765).
    #[arg(long)]
    pub ws: bool,

    /// The tunnel server: HOST:PORT, tcp://HOST:PORT, ws://HOST:PORT/PATH, tls://HOST:PORT or
    /// wss://HOST:PORT/PATH (a scheme overrides --ws). [default: 127.0.0.1:9999, with --ws
    /// 127.0.0.1:8765]
    #[arg(long, value_name = "ADDR")]
    pub connect: Option<String>,

    /// The Unix socket the source QEMU connects to (created 0600; a stale socket is replaced,
    /// and it is removed on exit).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/tmp/qemu_migration_source.sock"
    )]
    pub socket: PathBuf,

    /// Exit after the first migration's connections have all closed (0 if all went well).
    #[arg(long)]
    pub once: bool,

    /// Also carry the NBD connections of a disk copy (`send --copy-storage`): listen on the
    /// socket's path with the extension .nbd.sock as well (/tmp/s.sock: /tmp/s.nbd.sock).
    #[arg(long)]
    pub copy_storage: bool,

    #[command(flatten)]
    pub tunnel: TunnelClientArgs,
}

/// Runs `qmigrate tunnel-client`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let plain = if args.ws { Scheme::Ws } else { Scheme::Tcp };
    let scheme = default_scheme(plain, args.tunnel.tls.any());
    let connect = args
        .connect
        .unwrap_or_else(|| format!("127.0.0.1:{}", scheme.default_port()));
    let server = args.tunnel.server(&connect, plain)?;
    let config = ClientConfig {
        once: args.once,
        ..args.tunnel.client_config(server.clone())?
    };
    let mut client = Client::bind(&args.socket, config)?;
    if args.copy_storage {
        client = client.with_nbd()?;
        if let Some(nbd) = client.nbd_socket_path() {
            tracing::info!("NBD connections of the disk copy on unix:{}", nbd.display());
        }
    }
    let mut interrupts = Interrupts::install().context("cannot install signal handlers")?;
    ready(&format!(
        "listening on unix:{} -> {server}",
        client.socket_path().display()
    ))?;

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let signal = interrupts.recv().await;
        tracing::info!("{signal}: shutting down");
        stop.cancel();
    });
    let report = client.serve(shutdown).await;
    finish(args.once, "tunnel-client", &report)
}
