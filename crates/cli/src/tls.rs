//! The TLS flags: the server's certificate and key (and the CA of its clients' certificates),
//! and how a client checks the server (a CA or a pinned fingerprint) with, optionally, a
//! certificate of its own.

use std::path::PathBuf;

use anyhow::Context as _;
use qmigrate_transport::tls::{read_certificates, read_private_key};
use qmigrate_transport::{ClientTls, Fingerprint, Scheme, ServerCheck, ServerTls};

use crate::exit::Exit;

/// The TLS flags of `tunnel-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerTlsArgs {
    /// Serve TLS (tls://, or wss:// with --ws) with this certificate (PEM; the chain, the
    /// server's own certificate first). Make a self-signed one with `openssl req -x509 -newkey
    /// ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout key.pem -out cert.pem -days 365
    /// -subj /CN=dest -addext subjectAltName=DNS:dest,IP:10.0.0.2`.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM; keep it chmod 600).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require a client certificate signed by this CA (PEM) from every client (mutual TLS).
    /// Clients with one are authenticated, so the server may then listen beyond loopback
    /// without a token.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// Whether TLS was asked for.
    pub fn any(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The server's TLS settings, if any.
    pub fn load(&self) -> anyhow::Result<Option<ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        ServerTls::from_pem_files(cert, key, self.tls_client_ca.as_deref())
            .map(Some)
            .context(Exit::Usage)
    }
}

/// The TLS flags of `tunnel-client` and `migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientTlsArgs {
    /// Check the tls:// or wss:// server's certificate against this CA (PEM): it must be
    /// signed by it and name the host of the URL. Without this and --tls-fingerprint, the
    /// system's CA store is used.
    #[arg(long, value_name = "PEM", conflicts_with = "tls_fingerprint")]
    pub tls_ca: Option<PathBuf>,

    /// Accept exactly the server certificate with this SHA-256 fingerprint (`sha256:HEX`; the
    /// output of `openssl x509 -in cert.pem -noout -fingerprint -sha256` works as it is, and
    /// the server logs it at start). Name and dates in the certificate are then not checked.
    #[arg(long, value_name = "sha256:HEX", value_parser = parse_fingerprint)]
    pub tls_fingerprint: Option<Fingerprint>,

    /// Present this client certificate (PEM) to a server that requires one (--tls-client-ca
    /// there).
    #[arg(long = "tls-cert", value_name = "PEM", requires = "client_key")]
    pub client_cert: Option<PathBuf>,

    /// The private key of the client certificate (PEM).
    #[arg(long = "tls-key", value_name = "PEM", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

fn parse_fingerprint(value: &str) -> Result<Fingerprint, String> {
    Fingerprint::parse(value).map_err(|e| e.to_string())
}

impl ClientTlsArgs {
    /// Whether any TLS flag was given: an address without a scheme then means TLS.
    pub fn any(&self) -> bool {
        self.tls_ca.is_some() || self.tls_fingerprint.is_some() || self.client_cert.is_some()
    }

    /// The client's TLS settings for a server address with `scheme`: `None` for the plain
    /// schemes (where TLS flags are a usage error). Without --tls-ca or --tls-fingerprint the
    /// server is checked against the system's CAs; verification is never off.
    pub fn load(&self, scheme: Scheme) -> anyhow::Result<Option<ClientTls>> {
        if !scheme.is_tls() {
            if self.any() {
                return Err(anyhow::anyhow!(
                    "--tls-ca, --tls-fingerprint and --tls-cert need a tls:// or wss:// server \
                     address, not {}://",
                    scheme.name()
                ))
                .context(Exit::Usage);
            }
            return Ok(None);
        }
        let check = match (&self.tls_ca, self.tls_fingerprint) {
            (Some(ca), _) => ServerCheck::Ca(read_certificates(ca, "the CA").context(Exit::Usage)?),
            (None, Some(pin)) => ServerCheck::Fingerprint(pin),
            (None, None) => ServerCheck::SystemRoots,
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some((
                read_certificates(cert, "the client certificate").context(Exit::Usage)?,
                read_private_key(key).context(Exit::Usage)?,
            )),
            _ => None,
        };
        let tls = ClientTls::new(check, identity).context(Exit::Usage)?;
        tracing::debug!(check = tls.check(), "TLS client settings");
        Ok(Some(tls))
    }
}

/// The scheme an address without one gets: `plain` (TCP or WebSocket), with TLS when TLS flags
/// were given.
pub fn default_scheme(plain: Scheme, tls: bool) -> Scheme {
    if tls {
        plain.with_tls()
    } else {
        plain
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Client {
        #[command(flatten)]
        tls: ClientTlsArgs,
    }

    #[derive(Debug, Parser)]
    struct Server {
        #[command(flatten)]
        tls: ServerTlsArgs,
    }

    const PIN: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn client(args: &[&str]) -> Result<ClientTlsArgs, clap::Error> {
        Client::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|c| c.tls)
    }

    #[test]
    fn a_tls_flag_makes_an_address_without_scheme_tls() {
        let none = client(&[]).expect("no flags");
        assert!(!none.any());
        assert_eq!(default_scheme(Scheme::Tcp, none.any()), Scheme::Tcp);
        assert!(none.load(Scheme::Tcp).expect("plain").is_none());
        let pinned = client(&["--tls-fingerprint", PIN]).expect("pin");
        assert!(pinned.any());
        assert_eq!(default_scheme(Scheme::Tcp, pinned.any()), Scheme::Tls);
        assert_eq!(default_scheme(Scheme::Ws, pinned.any()), Scheme::Wss);
        assert!(pinned.load(Scheme::Wss).expect("wss").is_some());
    }

    #[test]
    fn tls_flags_with_a_plain_address_are_a_usage_error() {
        let pinned = client(&["--tls-fingerprint", PIN]).expect("pin");
        let err = pinned.load(Scheme::Ws).expect_err("ws:// with a pin");
        assert_eq!(crate::exit::code_of(&err), 2);
        assert!(format!("{err:#}").contains("wss://"), "{err:#}");
    }

    #[test]
    fn flags_that_do_not_go_together_are_refused_by_clap() {
        assert!(client(&["--tls-ca", "a.pem", "--tls-fingerprint", PIN]).is_err());
        assert!(
            client(&["--tls-cert", "c.pem"]).is_err(),
            "a certificate needs its key"
        );
        let err = client(&["--tls-fingerprint", "sha1:0123"]).expect_err("bad pin");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
        let server = |args: &[&str]| {
            Server::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
        };
        assert!(server(&["--tls-cert", "c.pem"]).is_err(), "needs --tls-key");
        assert!(
            server(&["--tls-client-ca", "ca.pem"]).is_err(),
            "needs --tls-cert"
        );
        let ok = server(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).expect("pair");
        assert!(ok.tls.any());
        let err = ok.tls.load().expect_err("files that do not exist");
        assert_eq!(crate::exit::code_of(&err), 2);
        assert!(format!("{err:#}").contains("c.pem"), "{err:#}");
    }
}
