//! The TLS settings of each end, checked before any connection is made: the server's
//! certificate and key ([`ServerTls`]), how a client checks the server ([`ServerCheck`]) and
//! its own certificate for mutual TLS ([`ClientTls`]), the PEM files they come from, and the
//! certificate [`Fingerprint`] a client may pin.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::RootCertStore;
use sha2::{Digest as _, Sha256};

use super::verify::{CaFile, Pinned};
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How to make a self-signed certificate and key, for error messages and the docs.
pub const MAKE_CERT: &str = "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
     -nodes -keyout key.pem -out cert.pem -days 365 -subj /CN=dest \
     -addext subjectAltName=DNS:dest,IP:10.0.0.2";

/// What can be wrong with TLS settings (files, keys, fingerprints), found before any
/// connection is made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing of the kind asked for.
    #[error("cannot use {} as {what}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What it should hold ("the certificate", "the private key", ...).
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A `--tls-fingerprint` value that is not a SHA-256 fingerprint.
    #[error("invalid certificate fingerprint {value:?}: expected sha256: and 64 hex digits, with or without colons (as `openssl x509 -in cert.pem -noout -fingerprint -sha256` prints it)")]
    Fingerprint {
        /// What was given.
        value: String,
    },
    /// rustls refused the settings (a key that does not match the certificate, an
    /// unsupported key type, a CA file without usable certificates, ...).
    #[error("{what}: {source}{}", rustls_hint(source))]
    Rustls {
        /// What was being set up.
        what: &'static str,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// The client has nothing to check the server's certificate against.
    #[error("no CA certificates found on this system ({why})")]
    NoSystemRoots {
        /// What the system store lookup said.
        why: String,
    },
    /// A TLS address (`tls://`, `wss://`) without TLS settings, or the other way round.
    #[error("{0}")]
    Mismatch(Mismatch),
}

/// TLS settings and an address that do not go together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// A client for a `tls://` or `wss://` address without a way to check the server.
    #[error("a tls:// or wss:// address needs TLS settings: how to check the server")]
    ClientWithoutSettings,
    /// Client TLS settings for an address without TLS.
    #[error("TLS settings need a tls:// or wss:// address")]
    ClientWithoutTls,
    /// A server on a `tls://` or `wss://` address without a certificate and key.
    #[error("listening on tls:// or wss:// needs the server's certificate and key")]
    ServerWithoutSettings,
    /// A server certificate for an address without TLS.
    #[error("a certificate needs a tls:// or wss:// address to listen on")]
    ServerWithoutTls,
    /// A server's TLS transport asked to connect.
    #[error("this transport has no client TLS settings (how to check the server)")]
    NotAClient,
    /// A client's TLS transport asked to accept.
    #[error("this transport has no server TLS settings (certificate and key)")]
    NotAServer,
    /// A server's certificate chain without a certificate.
    #[error("the server's certificate chain is empty")]
    EmptyChain,
}

fn rustls_hint(e: &rustls::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("UnsupportedCertVersion") {
        " (an X.509 v1 certificate, as `openssl x509 -req` makes without extensions: make a v3 \
         one, e.g. with `openssl req -x509 -CA ...` as the README shows)"
    } else if text.contains("CaUsedAsEndEntity") {
        " (a CA certificate, CA:TRUE, cannot be a client's certificate: add -addext \
         basicConstraints=critical,CA:FALSE)"
    } else {
        ""
    }
}

/// The SHA-256 of a certificate's DER encoding: what `--tls-fingerprint` pins, and what
/// `openssl x509 -noout -fingerprint -sha256` prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(Sha256::digest(cert.as_ref()).into())
    }

    /// The fingerprint whose SHA-256 is `bytes` (as the verifier keeps it).
    pub(super) fn from_bytes(bytes: [u8; 32]) -> Fingerprint {
        Fingerprint(bytes)
    }

    /// Parses `sha256:HEX`, where HEX is 64 hex digits in either case, with or without colons
    /// between the bytes. OpenSSL's own output (`sha256 Fingerprint=AB:CD:...`, any case) and a
    /// bare HEX are accepted too.
    pub fn parse(value: &str) -> Result<Fingerprint, TlsError> {
        let bad = || TlsError::Fingerprint {
            value: value.to_owned(),
        };
        let trimmed = value.trim();
        let lower = trimmed.to_ascii_lowercase();
        let hex = ["sha256 fingerprint=", "sha256:", "sha256="]
            .iter()
            .find_map(|prefix| lower.strip_prefix(prefix))
            .unwrap_or(&lower);
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 || hex.starts_with(':') || hex.ends_with(':') || hex.contains("::") {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    /// `sha256:AB:CD:...`, which [`Fingerprint::parse`] takes back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fingerprint::parse(s)
    }
}

/// Reads every certificate in a PEM file (a chain: the server's own certificate first).
pub fn read_certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::File {
        path: path.to_owned(),
        what,
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(pem_error(e)))?;
    if certs.is_empty() {
        return Err(bad(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(certs)
}

/// Reads the private key of a PEM file (PKCS#8, PKCS#1 or SEC1). A key file that other users
/// can read is used, with a warning.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad = |why: String| TlsError::File {
        path: path.to_owned(),
        what: "the private key",
        why,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the TLS private key {} is readable by other users (mode {mode:04o}): chmod 600 it",
                path.display()
            );
        }
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            bad("no PEM private key (-----BEGIN PRIVATE KEY-----) in it".into())
        }
        other => bad(pem_error(other)),
    })
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// ring's provider, AES-128-GCM first: 10 AES rounds instead of AES-256's 14 are a fifth less
/// CPU per byte, and 128-bit keys are ample for a migration stream.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

fn roots(
    certs: Vec<CertificateDer<'static>>,
    what: &'static str,
) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs {
        store
            .add(cert)
            .map_err(|source| TlsError::Rustls { what, source })?;
    }
    Ok(store)
}

/// A tunnel server's TLS settings: its certificate chain and key, and optionally the CA its
/// clients' certificates must be signed by (mutual TLS).
#[derive(Clone)]
pub struct ServerTls {
    pub(super) config: Arc<rustls::ServerConfig>,
    fingerprint: Fingerprint,
    client_auth: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &self.fingerprint)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Settings from a certificate chain (the server's own certificate first) and its key.
    /// With `client_ca`, every client must present a certificate signed by one of those CAs.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        client_ca: Option<Vec<CertificateDer<'static>>>,
    ) -> Result<ServerTls, TlsError> {
        let fingerprint = chain
            .first()
            .map(Fingerprint::of)
            .ok_or(TlsError::Mismatch(Mismatch::EmptyChain))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "TLS protocol versions",
                source,
            })?;
        let client_auth = client_ca.is_some();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(cas) => {
                let roots = Arc::new(roots(cas, "the client CA")?);
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider())
                        .build()
                        .map_err(|e| TlsError::Rustls {
                            what: "the client CA",
                            source: rustls::Error::General(e.to_string()),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config =
            builder
                .with_single_cert(chain, key)
                .map_err(|source| TlsError::Rustls {
                    what: "the server certificate and key",
                    source,
                })?;
        // The record layer is ours after the handshake (see `TlsStream`): rustls hands over
        // the keys. No session tickets: tunnel connections do not resume sessions, and a
        // ticket would be one more message after the handshake for every client to parse.
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        // Our suite order (AES-128-GCM first, see `provider`), not the client's: the
        // preference must hold whoever the client is.
        config.ignore_client_order = true;
        Ok(ServerTls {
            config: Arc::new(config),
            fingerprint,
            client_auth,
        })
    }

    /// Settings from PEM files: `cert` (the chain, own certificate first), `key`, and
    /// optionally the CA file clients' certificates must chain to.
    pub fn from_pem_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, TlsError> {
        let chain = read_certificates(cert, "the server certificate")?;
        let key = read_private_key(key)?;
        let client_ca = client_ca
            .map(|p| read_certificates(p, "the client CA"))
            .transpose()?;
        ServerTls::new(chain, key, client_ca)
    }

    /// The fingerprint of the server's certificate: what clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Whether clients must present a certificate (mutual TLS), which authenticates them.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_auth
    }
}

/// How a client decides that it talks to the right server.
#[derive(Debug, Clone)]
pub enum ServerCheck {
    /// The server's certificate must chain to one of these CAs and name the host in the URL.
    Ca(Vec<CertificateDer<'static>>),
    /// The server's certificate must be exactly this one (its SHA-256); the name in it and its
    /// dates do not matter, as with Proxmox's fingerprint pinning.
    Fingerprint(Fingerprint),
    /// As [`ServerCheck::Ca`], with the system's CA store (`/etc/ssl/certs`, or `SSL_CERT_FILE`
    /// / `SSL_CERT_DIR`).
    SystemRoots,
}

/// A tunnel client's TLS settings: how it checks the server, and optionally its own
/// certificate for a server that requires one.
#[derive(Clone)]
pub struct ClientTls {
    pub(super) config: Arc<rustls::ClientConfig>,
    check: &'static str,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Settings that check the server with `check` and, with `identity` (a certificate chain
    /// and its key), present a client certificate when the server asks for one.
    pub fn new(
        check: ServerCheck,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<ClientTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "TLS protocol versions",
                source,
            })?;
        let (builder, label) = match check {
            ServerCheck::Ca(cas) => {
                let store = Arc::new(roots(cas.clone(), "the CA")?);
                let webpki =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(store, provider())
                        .build()
                        .map_err(|e| TlsError::Rustls {
                            what: "the CA",
                            source: rustls::Error::General(e.to_string()),
                        })?;
                let verifier = CaFile {
                    webpki,
                    selves: cas,
                };
                (
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(verifier)),
                    "CA",
                )
            }
            ServerCheck::SystemRoots => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                let (added, _ignored) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    let why = match found.errors.first() {
                        Some(e) => e.to_string(),
                        None => "the store is empty".into(),
                    };
                    return Err(TlsError::NoSystemRoots { why });
                }
                (builder.with_root_certificates(store), "system CAs")
            }
            ServerCheck::Fingerprint(pin) => {
                let verifier = Pinned {
                    pin: pin.0,
                    algorithms: provider().signature_verification_algorithms,
                };
                (
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(verifier)),
                    "pinned fingerprint",
                )
            }
        };
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::Rustls {
                    what: "the client certificate and key",
                    source,
                })?,
        };
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(ClientTls {
            config: Arc::new(config),
            check: label,
        })
    }

    /// How the server is checked, for logs: `CA`, `system CAs` or `pinned fingerprint`.
    pub fn check(&self) -> &'static str {
        self.check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_every_usual_spelling() {
        let hex = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let want = Fingerprint::parse(&format!("sha256:{hex}")).expect("plain");
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|p| String::from_utf8_lossy(p).to_uppercase())
            .collect();
        let colons = colons.join(":");
        for spelling in [
            format!("sha256:{}", hex.to_uppercase()),
            format!("SHA256:{colons}"),
            format!("sha256 Fingerprint={colons}"),
            format!("SHA256 Fingerprint={colons}\n"),
            colons.clone(),
            hex.to_owned(),
        ] {
            assert_eq!(
                Fingerprint::parse(&spelling).expect(&spelling),
                want,
                "{spelling}"
            );
        }
        assert_eq!(
            Fingerprint::parse(&want.to_string()).expect("display"),
            want
        );
        assert!(want.to_string().starts_with("sha256:01:23:45:67:89:AB"));
        for bad in [
            "",
            "sha256:",
            "sha1:0123",
            &format!("sha256:{}", &hex[..62]),
            &format!("sha256:{hex}00"),
            &format!("sha256:{}zz", &hex[..62]),
            &format!("sha256::{hex}"),
            &format!("md5:{hex}"),
        ] {
            let err = Fingerprint::parse(bad).expect_err(bad).to_string();
            assert!(err.contains("64 hex digits"), "{bad}: {err}");
        }
    }
}
