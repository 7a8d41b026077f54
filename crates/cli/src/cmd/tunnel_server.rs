//! `qmigrate tunnel-server`: the destination end of the tunnel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use qmigrate_migration::session::QmpController;
use qmigrate_transport::{Endpoint, Error, Scheme, Server, ServerConfig};
use tokio_util::sync::CancellationToken;

use super::common::{finish, ready};
use super::Given;
use crate::args::DeadPeerArgs;
use crate::config::{self, parse_metrics_addr};
use crate::exit::Exit;
use crate::hints;
use crate::metrics::Metrics;
use crate::signals::Interrupts;
use crate::tls::{default_scheme, ServerTlsArgs};
use crate::token::TokenArgs;
use crate::units::{format_duration, parse_duration};

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

    #[command(flatten)]
    pub dead_peer: DeadPeerArgs,

    /// Listen on a non-loopback address without a token or TLS client certificates: anyone
    /// who can reach the port can then write a migration stream into the destination VM.
    /// Only for a trusted network.
    #[arg(long)]
    pub insecure: bool,

    /// Read the settings from this TOML file (the service reads
    /// /etc/qmigrate/tunnel-server.toml); a flag given here wins over the file. Unknown keys
    /// and bad values are refused with the file's line.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Check the settings (the config file, the addresses, the token and TLS files) and exit:
    /// 0 if they are good, 2 if not. Binds nothing and touches no QEMU.
    #[arg(long)]
    pub check_config: bool,

    /// Serve Prometheus metrics on http://ADDR/metrics (IP:PORT, such as 127.0.0.1:9187).
    /// Off by default. The metrics hold no token, path or guest data.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics: Option<SocketAddr>,

    /// On SIGTERM or Ctrl-C, stop accepting connections and give the migrations under way
    /// this long to end before they are cut off (a second signal cuts them off at once).
    #[arg(long, value_name = "DUR", default_value = "2m", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl Args {
    /// Fills in what the command line did not give from the config file `loaded`; returns
    /// where the values read from files came from, for their errors.
    fn merge(&mut self, loaded: &config::Loaded, given: &Given) -> Origins {
        let file = &loaded.values;
        let mut origins = Origins::default();
        if self.listen.is_none() {
            self.listen = file.listen.as_ref().map(|a| a.0.clone());
        }
        if !self.ws {
            self.ws = file.transport == Some(config::TransportKind::Ws);
        }
        if !given.has("socket") {
            if let Some(socket) = &file.socket {
                self.socket = socket.clone();
            }
        }
        // The routing table is the command line's or the file's, never a mix of both.
        if self.qmp.is_none() && self.routes.is_empty() {
            self.qmp = file.qmp.clone();
            self.routes = file
                .routes
                .iter()
                .map(|(name, qmp)| (name.0.clone(), qmp.clone()))
                .collect();
        }
        if self.token.token_file.is_none() {
            if let Some(token) = &file.token_file {
                self.token.token_file = Some(token.get_ref().clone());
                origins.token = Some(loaded.origin(token.span()));
            }
        }
        if self.tls.tls_cert.is_none() {
            if let Some(tls) = &file.tls {
                let origin = loaded.origin(tls.span());
                let tls = tls.get_ref();
                self.tls.tls_cert = Some(tls.cert.clone());
                self.tls.tls_key = Some(tls.key.clone());
                self.tls.tls_client_ca = tls.client_ca.clone();
                origins.tls = Some(origin);
            }
        }
        self.insecure |= file.insecure == Some(true);
        if self.metrics.is_none() {
            self.metrics = file.metrics.map(|m| m.0);
        }
        let timeouts = &file.timeouts;
        for (id, value, field) in [
            (
                "connect_timeout",
                timeouts.connect,
                &mut self.connect_timeout,
            ),
            (
                "handshake_timeout",
                timeouts.handshake,
                &mut self.handshake_timeout,
            ),
            (
                "shutdown_timeout",
                timeouts.shutdown,
                &mut self.shutdown_timeout,
            ),
        ] {
            if let (false, Some(config::Dur(value))) = (given.has(id), value) {
                *field = value;
            }
        }
        if let (false, Some(config::DurOrOff(value))) =
            (given.has("dead_peer_timeout"), timeouts.dead_peer)
        {
            self.dead_peer.dead_peer_timeout = value;
        }
        origins
    }
}

/// Where the settings read from files came from: `FILE:LINE` of the config file.
#[derive(Debug, Default)]
struct Origins {
    token: Option<config::Origin>,
    tls: Option<config::Origin>,
}

/// Prefixes an error about a value from the config file with its place (and keeps its exit
/// code).
fn at<T>(
    result: anyhow::Result<T>,
    origin: &Option<config::Origin>,
    key: &str,
) -> anyhow::Result<T> {
    let (Err(e), Some(origin)) = (&result, origin) else {
        return result;
    };
    let code = crate::exit::code_of(e);
    let mut causes: Vec<String> = Vec::new();
    for cause in e.chain().map(ToString::to_string) {
        // The exit code's headline (`invalid usage`) stays the outermost; a source that its
        // error already quotes is not repeated.
        if cause != Exit::Usage.to_string() && !causes.last().is_some_and(|l| l.ends_with(&cause)) {
            causes.push(cause);
        }
    }
    let e = anyhow::anyhow!("{origin}: {key}: {}", causes.join(": "));
    Err(if code == Exit::Usage.code() {
        e.context(Exit::Usage)
    } else {
        e
    })
}

/// Runs `qmigrate tunnel-server`; `given` says which flags the command line gave (they win
/// over `--config`).
pub async fn run(mut args: Args, given: &Given) -> anyhow::Result<()> {
    let origins = match &args.config {
        Some(path) => {
            let loaded = config::load(path)?;
            args.merge(&loaded, given)
        }
        None => Origins::default(),
    };
    let plain = if args.ws { Scheme::Ws } else { Scheme::Tcp };
    let scheme = default_scheme(plain, args.tls.any());
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| format!("0.0.0.0:{}", scheme.default_port()));
    let listen = Endpoint::parse(&listen, scheme).context(Exit::Usage)?;
    let tls = at(args.tls.load(), &origins.tls, "[tls]")?;
    let token = at(args.token.load(), &origins.token, "token-file")?;
    if args.check_config {
        return check_config(&args, &listen, token.is_some(), tls.is_some());
    }
    // Logged once the server listens: the pin a client gives to trust this server.
    let pin = tls
        .as_ref()
        .map(|t| (t.fingerprint(), t.requires_client_certificates()));
    let config = ServerConfig {
        connect_timeout: args.connect_timeout,
        handshake_timeout: args.handshake_timeout,
        once: args.once,
        token,
        insecure: args.insecure,
        tls,
        refusal_text: hints::refusal,
        dead_peer: args.dead_peer.dead_peer(),
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
    let metrics = Metrics::new(server.local_endpoint().scheme, routes.keys().cloned());
    server = server.with_observer(metrics.clone());
    let controller = if routes.is_empty() {
        None
    } else {
        let controller = QmpController::observed(routes, Some(metrics.clone()))?
            .with_dead_peer(args.dead_peer.dead_peer_timeout);
        server = server.with_controller(Arc::new(controller.clone()));
        Some(controller)
    };
    let stop_metrics = CancellationToken::new();
    if let Some(addr) = args.metrics {
        let listener = crate::metrics::bind(addr).await?;
        let bound = listener.local_addr().unwrap_or(addr);
        tracing::info!("metrics on http://{bound}/metrics");
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            stop_metrics.clone(),
        ));
    }
    let interrupts = Interrupts::install().context("cannot install signal handlers")?;
    ready(&format!("listening on {}", server.local_endpoint()))?;
    match &controller {
        Some(c) => tracing::info!(
            "preparing destinations for `qmigrate migrate`: {}",
            c.describe()
        ),
        None => tracing::info!("forwarding tunnel connections to {}", args.socket.display()),
    }

    let (stop, shutdown) = (CancellationToken::new(), CancellationToken::new());
    tokio::spawn(drain_on_signal(
        interrupts,
        metrics,
        args.shutdown_timeout,
        stop.clone(),
        shutdown.clone(),
    ));
    let report = server.serve_until(stop, shutdown).await;
    stop_metrics.cancel();
    finish(args.once, "tunnel-server", &report)
}

/// `--check-config`: everything was read and checked; say what the server would do.
fn check_config(args: &Args, listen: &Endpoint, token: bool, tls: bool) -> anyhow::Result<()> {
    let mut routes: Vec<String> = args
        .routes
        .iter()
        .map(|(n, q)| format!("/{n} -> {q}"))
        .collect();
    if let Some(qmp) = &args.qmp {
        routes.insert(0, format!("/ -> {qmp}"));
    }
    let on = |yes: bool| if yes { "yes" } else { "no" };
    println!("configuration OK");
    println!("listen: {listen}");
    println!("token: {}", on(token));
    println!("tls: {}", on(tls));
    println!("insecure: {}", on(args.insecure));
    if routes.is_empty() {
        println!("forward to: {}", args.socket.display());
    } else {
        println!("routes: {}", routes.join(", "));
    }
    println!(
        "metrics: {}",
        args.metrics
            .map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics"))
    );
    println!(
        "timeouts: connect {}, handshake {}, shutdown {}",
        format_duration(args.connect_timeout),
        format_duration(args.handshake_timeout),
        format_duration(args.shutdown_timeout)
    );
    Ok(())
}

/// The first SIGTERM or Ctrl-C stops accepting connections and waits up to `grace` for the
/// open ones (the migrations under way) to end; the grace expiring or a second signal cuts
/// them off. Each step is logged, with the migrations it affects.
async fn drain_on_signal(
    mut interrupts: Interrupts,
    metrics: Arc<Metrics>,
    grace: Duration,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let signal = interrupts.recv().await;
    stop.cancel();
    let open = metrics.open_connections();
    if open == 0 {
        tracing::info!("{signal}: shutting down");
        shutdown.cancel();
        return;
    }
    let under_way = describe(&metrics.under_way());
    tracing::warn!(
        "{signal}: starting no new migration; waiting up to {} for {open} open tunnel \
         connection(s) to end ({under_way}); another SIGTERM or Ctrl-C cuts them off",
        format_duration(grace)
    );
    let cut = tokio::select! {
        _ = metrics.all_closed() => None,
        _ = tokio::time::sleep(grace) => Some(format!("{} passed", format_duration(grace))),
        again = interrupts.recv() => Some(format!("a second {again}")),
    };
    match cut {
        None => tracing::info!("all tunnel connections ended: shutting down"),
        Some(why) => {
            let under_way = metrics.under_way();
            tracing::error!(
                "{why}: cutting off {} open tunnel connection(s) ({}); a migration cut off \
                 fails on the destination, and the source VM keeps running",
                metrics.open_connections(),
                describe(&under_way)
            );
            for (route, running) in under_way {
                tracing::error!(
                    route = %route,
                    "migration cut short by the shutdown after {}",
                    format_duration(running)
                );
            }
        }
    }
    shutdown.cancel();
}

/// The migrations under way, for the shutdown's log.
fn describe(under_way: &[(String, Duration)]) -> String {
    if under_way.is_empty() {
        return "no migration under way on a route".to_owned();
    }
    let list: Vec<String> = under_way
        .iter()
        .map(|(route, t)| format!("route {route} for {}", format_duration(*t)))
        .collect();
    format!("migrations under way: {}", list.join(", "))
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    /// The arguments of `tunnel-server --config FILE FLAGS...`, merged with FILE's `text`.
    fn merged(text: &str, flags: &[&str]) -> (Args, Origins) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("server.toml");
        std::fs::write(&path, text).expect("write");
        let matches = Cli::command()
            .try_get_matches_from(std::iter::once("x").chain(flags.iter().copied()))
            .expect("flags");
        let mut args = Cli::from_arg_matches(&matches).expect("args").args;
        let loaded = config::load(&path).expect("valid file");
        let origins = args.merge(&loaded, &Given::of(&matches));
        (args, origins)
    }

    const FULL: &str = r#"
listen = "127.0.0.1:7000"
transport = "ws"
socket = "/run/dest.sock"
qmp = "/run/qemu/dest.qmp"
token-file = "/etc/qmigrate/token"
insecure = true
metrics = "127.0.0.1:9187"

[routes]
web1 = "/run/qemu/web1.qmp"

[tls]
cert = "/etc/qmigrate/cert.pem"
key = "/etc/qmigrate/key.pem"
client-ca = "/etc/qmigrate/ca.pem"

[timeouts]
connect = "1m"
handshake = "5s"
shutdown = "7m"
"#;

    #[test]
    fn every_key_of_the_file_is_honoured() {
        let (args, origins) = merged(FULL, &[]);
        assert_eq!(args.listen.as_deref(), Some("127.0.0.1:7000"));
        assert!(args.ws);
        assert_eq!(args.socket, PathBuf::from("/run/dest.sock"));
        assert_eq!(args.qmp.as_deref(), Some("/run/qemu/dest.qmp"));
        assert_eq!(
            args.routes,
            [("web1".to_owned(), "/run/qemu/web1.qmp".to_owned())]
        );
        assert_eq!(
            args.token.token_file,
            Some(PathBuf::from("/etc/qmigrate/token"))
        );
        assert!(args.insecure);
        assert_eq!(args.metrics, Some("127.0.0.1:9187".parse().expect("addr")));
        assert_eq!(
            args.tls.tls_cert,
            Some(PathBuf::from("/etc/qmigrate/cert.pem"))
        );
        assert_eq!(
            args.tls.tls_key,
            Some(PathBuf::from("/etc/qmigrate/key.pem"))
        );
        assert_eq!(
            args.tls.tls_client_ca,
            Some(PathBuf::from("/etc/qmigrate/ca.pem"))
        );
        assert_eq!(args.connect_timeout, Duration::from_secs(60));
        assert_eq!(args.handshake_timeout, Duration::from_secs(5));
        assert_eq!(args.shutdown_timeout, Duration::from_secs(420));
        assert_eq!(origins.token.map(|o| o.line), Some(6));
        assert_eq!(origins.tls.map(|o| o.line), Some(13));
    }

    #[test]
    fn flags_win_over_the_file() {
        let (args, origins) = merged(
            FULL,
            &[
                "--listen",
                "127.0.0.1:7001",
                "--socket",
                "/tmp/other.sock",
                "--route",
                "db=/run/qemu/db.qmp",
                "--token-file",
                "/tmp/token",
                "--metrics",
                "127.0.0.1:1",
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "k.pem",
                "--connect-timeout",
                "2s",
                "--handshake-timeout",
                "3s",
                "--shutdown-timeout",
                "4s",
            ],
        );
        assert_eq!(args.listen.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(args.socket, PathBuf::from("/tmp/other.sock"));
        assert_eq!(
            args.qmp, None,
            "the command line's routes replace the file's"
        );
        assert_eq!(
            args.routes,
            [("db".to_owned(), "/run/qemu/db.qmp".to_owned())]
        );
        assert_eq!(args.token.token_file, Some(PathBuf::from("/tmp/token")));
        assert!(origins.token.is_none() && origins.tls.is_none());
        assert_eq!(args.metrics, Some("127.0.0.1:1".parse().expect("addr")));
        assert_eq!(args.tls.tls_cert, Some(PathBuf::from("c.pem")));
        assert_eq!(args.tls.tls_client_ca, None, "TLS comes from one place");
        assert_eq!(args.connect_timeout, Duration::from_secs(2));
        assert_eq!(args.handshake_timeout, Duration::from_secs(3));
        assert_eq!(args.shutdown_timeout, Duration::from_secs(4));
        // A flag equal to the default still wins: it was given.
        let (args, _) = merged(FULL, &["--connect-timeout", "30s"]);
        assert_eq!(args.connect_timeout, Duration::from_secs(30));
        // Without the file's values, the defaults.
        let (args, _) = merged("", &[]);
        assert_eq!(args.connect_timeout, Duration::from_secs(30));
        assert_eq!(args.socket, PathBuf::from("/tmp/qemu_migration_dest.sock"));
        assert!(!args.ws && !args.insecure && args.metrics.is_none());
    }

    #[test]
    fn a_bad_file_named_by_the_config_is_reported_at_its_line() {
        let err = at::<()>(
            Err(anyhow::anyhow!("cannot read the token file /x: gone").context(Exit::Usage)),
            &Some(config::Origin {
                file: "/etc/qmigrate/tunnel-server.toml".into(),
                line: 4,
            }),
            "token-file",
        )
        .expect_err("an error");
        assert_eq!(crate::exit::code_of(&err), 2);
        assert_eq!(
            crate::hints::report(&err),
            "invalid usage: /etc/qmigrate/tunnel-server.toml:4: token-file: cannot read the \
             token file /x: gone"
        );
    }
}
