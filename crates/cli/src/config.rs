//! `tunnel-server --config FILE`: the server's settings in a TOML file, for a service manager.
//!
//! Every key has a flag of the same name, and a flag given on the command line wins over the
//! file. The file is read strictly: an unknown key, a value of the wrong type or a value that
//! does not parse (an address, a duration) is refused before the server starts, with the file,
//! the line and what is allowed there. Files the config names (the token, TLS certificates) are
//! read when the server starts, and a problem with one is reported at the line that named it.
//!
//! ```toml
//! listen = "0.0.0.0:9999"          # --listen
//! transport = "tcp"                # tcp | ws (--ws); a scheme in `listen` wins
//! socket = "/tmp/qemu_migration_dest.sock"
//! qmp = "/run/qemu/dest.qmp"       # the route `/`
//! token-file = "/etc/qmigrate/token"
//! insecure = false
//! metrics = "127.0.0.1:9187"       # --metrics
//!
//! [routes]                         # --route NAME=PATH
//! web1 = "/run/qemu/web1.qmp"
//!
//! [tls]                            # --tls-cert, --tls-key, --tls-client-ca
//! cert = "/etc/qmigrate/cert.pem"
//! key = "/etc/qmigrate/key.pem"
//! client-ca = "/etc/qmigrate/clients-ca.pem"
//!
//! [timeouts]                       # --connect-timeout, --handshake-timeout, --shutdown-timeout,
//! connect = "30s"                  # --dead-peer-timeout
//! handshake = "10s"
//! shutdown = "5m"
//! dead-peer = "30s"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use qmigrate_transport::{Endpoint, Scheme};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::exit::Exit;
use crate::units::parse_duration;

/// The contents of a tunnel-server config file, checked for types and syntax.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerFile {
    /// `--listen`: checked for syntax here, resolved with the transport at start.
    pub listen: Option<Address>,
    /// `--ws` when `ws`.
    pub transport: Option<TransportKind>,
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--qmp`: the route `/`.
    pub qmp: Option<String>,
    /// `--route NAME=PATH`, as a table.
    #[serde(default)]
    pub routes: BTreeMap<RouteName, String>,
    /// `--token-file`.
    pub token_file: Option<Spanned<PathBuf>>,
    /// `--insecure`.
    pub insecure: Option<bool>,
    /// `--metrics`.
    pub metrics: Option<MetricsAddr>,
    /// `--tls-cert`, `--tls-key`, `--tls-client-ca`.
    pub tls: Option<Spanned<TlsSection>>,
    /// `--connect-timeout`, `--handshake-timeout`, `--shutdown-timeout`.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// The `[tls]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TlsSection {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA of the clients' certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// The `[timeouts]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// `--connect-timeout`.
    pub connect: Option<Dur>,
    /// `--handshake-timeout`.
    pub handshake: Option<Dur>,
    /// `--shutdown-timeout`.
    pub shutdown: Option<Dur>,
    /// `--dead-peer-timeout` (`off` allowed).
    #[serde(rename = "dead-peer")]
    pub dead_peer: Option<DurOrOff>,
}

/// A duration, or `off` (zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurOrOff(pub Duration);

impl<'de> Deserialize<'de> for DurOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        crate::units::parse_duration_or_off(&text)
            .map(DurOrOff)
            .map_err(|e| {
                serde::de::Error::custom(format!("{e} (a duration such as 30s, 10m, or off)"))
            })
    }
}

/// `transport = "tcp" | "ws"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Plain TCP (or TLS with `[tls]`).
    Tcp,
    /// WebSocket (or wss:// with `[tls]`).
    Ws,
}

/// A duration such as `30s`, `10m`, `1h`, parsed while the file is read (so a bad one is
/// reported at its line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("{e} (a duration such as 30s, 10m, 1h)")))
    }
}

/// A listen address as `--listen` takes it, checked for syntax while the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address(pub String);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        // The scheme an address without one gets is decided later; the syntax is the same.
        Endpoint::parse(&text, Scheme::Tcp).map_err(|e| {
            serde::de::Error::custom(format!(
                "{e} (HOST:PORT, tcp://HOST:PORT, ws://HOST:PORT/PATH, tls://HOST:PORT or \
                 wss://HOST:PORT/PATH)"
            ))
        })?;
        Ok(Address(text))
    }
}

/// The metrics listener's address: `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for MetricsAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_metrics_addr(&text)
            .map(MetricsAddr)
            .map_err(serde::de::Error::custom)
    }
}

/// `--metrics ADDR`: an `IP:PORT` to serve `/metrics` on.
pub fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        format!("invalid metrics address {text:?}: expected IP:PORT, such as 127.0.0.1:9187 or [::1]:9187")
    })
}

/// A route's name: no slashes, not empty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteName(pub String);

impl<'de> Deserialize<'de> for RouteName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name.is_empty() || name.contains('/') {
            return Err(serde::de::Error::custom(format!(
                "invalid route name {name:?}: a route's name is not empty and has no slashes \
                 (the source names it in its URL path, ws://HOST:PORT/NAME)"
            )));
        }
        Ok(RouteName(name))
    }
}

/// Where a value came from in a config file, for messages: `FILE:LINE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A config file as read: its values and its text (for the lines of later errors).
#[derive(Debug)]
pub struct Loaded {
    /// The file's path.
    pub path: PathBuf,
    /// Its text.
    text: String,
    /// Its values.
    pub values: ServerFile,
}

impl Loaded {
    /// Where the value at byte `span` is.
    pub fn origin(&self, span: std::ops::Range<usize>) -> Origin {
        Origin {
            file: self.path.clone(),
            line: line_of(&self.text, span.start),
        }
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads and checks `path`; an unreadable file or a bad value is a usage error naming
/// `FILE:LINE` and what is allowed.
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))
        .context(Exit::Usage)?;
    let values = parse(&text).map_err(|(line, message)| {
        anyhow::anyhow!("{}:{line}: {message}", path.display()).context(Exit::Usage)
    })?;
    Ok(Loaded {
        path: path.to_owned(),
        text,
        values,
    })
}

/// Parses a config file's text; an error is its line and message.
fn parse(text: &str) -> Result<ServerFile, (usize, String)> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |span| line_of(text, span.start));
        (line, describe(e.message()))
    })
}

/// serde's message, with the table names our users know (`[tls]`) where serde says `field`.
fn describe(message: &str) -> String {
    let message = message.trim_end();
    // serde says "unknown field `x`, expected one of `a`, `b`": that is the list of keys.
    if let Some(rest) = message.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("missing key {rest}");
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, String) {
        parse(text).expect_err(text)
    }

    #[test]
    fn every_key_is_read() {
        let file = parse(
            r#"
listen = "ws://0.0.0.0:8765/"
transport = "ws"
socket = "/run/dest.sock"
qmp = "/run/qemu/dest.qmp"
token-file = "/etc/qmigrate/token"
insecure = true
metrics = "127.0.0.1:9187"

[routes]
web1 = "/run/qemu/web1.qmp"
db = "/run/qemu/db.qmp"

[tls]
cert = "/etc/qmigrate/cert.pem"
key = "/etc/qmigrate/key.pem"
client-ca = "/etc/qmigrate/ca.pem"

[timeouts]
connect = "1m"
handshake = "5s"
shutdown = "2m"
dead-peer = "off"
"#,
        )
        .expect("valid");
        assert_eq!(file.listen, Some(Address("ws://0.0.0.0:8765/".into())));
        assert_eq!(file.transport, Some(TransportKind::Ws));
        assert_eq!(file.socket, Some(PathBuf::from("/run/dest.sock")));
        assert_eq!(file.qmp.as_deref(), Some("/run/qemu/dest.qmp"));
        assert_eq!(
            file.token_file.as_ref().map(|t| t.get_ref().clone()),
            Some(PathBuf::from("/etc/qmigrate/token"))
        );
        assert_eq!(file.insecure, Some(true));
        assert_eq!(
            file.metrics,
            Some(MetricsAddr("127.0.0.1:9187".parse().expect("addr")))
        );
        let routes: Vec<(&str, &str)> = file
            .routes
            .iter()
            .map(|(k, v)| (k.0.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            routes,
            [("db", "/run/qemu/db.qmp"), ("web1", "/run/qemu/web1.qmp")]
        );
        let tls = file.tls.expect("tls").into_inner();
        assert_eq!(tls.cert, PathBuf::from("/etc/qmigrate/cert.pem"));
        assert_eq!(tls.key, PathBuf::from("/etc/qmigrate/key.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/etc/qmigrate/ca.pem")));
        assert_eq!(file.timeouts.connect, Some(Dur(Duration::from_secs(60))));
        assert_eq!(file.timeouts.handshake, Some(Dur(Duration::from_secs(5))));
        assert_eq!(file.timeouts.shutdown, Some(Dur(Duration::from_secs(120))));
        assert_eq!(file.timeouts.dead_peer, Some(DurOrOff(Duration::ZERO)));
        let empty = parse("").expect("an empty file is valid");
        assert!(empty.listen.is_none() && empty.routes.is_empty());
    }

    #[test]
    fn an_unknown_key_names_its_line_and_the_allowed_keys() {
        let (line, msg) = err("listen = \"127.0.0.1:1\"\n\nlisten-address = \"x\"\n");
        assert_eq!(line, 3, "{msg}");
        assert!(msg.starts_with("unknown key `listen-address`"), "{msg}");
        for key in [
            "listen",
            "transport",
            "token-file",
            "routes",
            "tls",
            "timeouts",
        ] {
            assert!(msg.contains(&format!("`{key}`")), "{key} missing: {msg}");
        }
        let (line, msg) = err("[tls]\ncert = \"c\"\nkey = \"k\"\nca = \"x\"\n");
        assert_eq!(line, 4, "{msg}");
        assert!(msg.contains("`client-ca`"), "{msg}");
        let (line, msg) = err("\n[timeouts]\nidle = \"1s\"\n");
        assert_eq!(line, 3);
        assert!(
            msg.contains("`handshake`") && msg.contains("`shutdown`"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_value_names_its_line_and_what_is_allowed() {
        let (line, msg) = err("socket = \"/x\"\ninsecure = \"yes\"\n");
        assert_eq!(line, 2);
        assert!(msg.contains("expected a boolean"), "{msg}");
        let (line, msg) = err("transport = \"quic\"\n");
        assert_eq!(line, 1);
        assert!(msg.contains("`tcp`") && msg.contains("`ws`"), "{msg}");
        let (line, msg) = err("\n\n[timeouts]\nconnect = 30\n");
        assert_eq!(line, 4);
        assert!(msg.contains("expected a string"), "{msg}");
        let (line, msg) = err("[timeouts]\nhandshake = \"ten seconds\"\n");
        assert_eq!(line, 2);
        assert!(msg.contains("30s, 10m, 1h"), "{msg}");
        let (line, msg) = err("\nlisten = \"http://0.0.0.0:80\"\n");
        assert_eq!(line, 2);
        assert!(msg.contains("tcp://HOST:PORT"), "{msg}");
        let (line, msg) = err("metrics = \"localhost\"\n");
        assert_eq!(line, 1);
        assert!(msg.contains("IP:PORT"), "{msg}");
        let (line, msg) = err("[routes]\n\"a/b\" = \"/q\"\n");
        assert_eq!(line, 2);
        assert!(msg.contains("no slashes"), "{msg}");
        let (line, msg) = err("[tls]\ncert = \"c\"\n");
        assert_eq!(line, 1);
        assert!(msg.contains("missing key `key`"), "{msg}");
        let (_, msg) = err("listen = \n");
        assert!(!msg.is_empty());
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("server.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:0\"\nport = 1\n").expect("write");
        let err = load(&path).expect_err("unknown key");
        assert_eq!(crate::exit::code_of(&err), 2);
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("{}:2: unknown key `port`", path.display())),
            "{msg}"
        );
        let err = load(&dir.path().join("missing.toml")).expect_err("no file");
        assert_eq!(crate::exit::code_of(&err), 2);
        assert!(format!("{err:#}").contains("missing.toml"), "{err:#}");
    }
}
