//! What went wrong in a TLS handshake, as a [`TlsFailure`] a caller can act on: rustls'
//! errors and the handshake's I/O errors sorted into the cases an operator can tell apart
//! (an unknown CA, another certificate than the pinned one, a peer that does not speak TLS,
//! ...).

use std::fmt;
use std::io;

use rustls::{AlertDescription, CertificateError};

use super::config::Fingerprint;
use super::verify::FingerprintMismatch;
use crate::sniff::PlainClient;

/// Which end of a TLS connection saw an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The tunnel client, during the handshake.
    Client,
    /// The tunnel server, during the handshake.
    Server,
    /// Either end, after the handshake.
    Either,
}

/// One end of a TLS connection, named by its role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The tunnel server.
    Server,
    /// The tunnel client.
    Client,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Server => "server's",
            Peer::Client => "client's",
        })
    }
}

/// Why a peer's certificate did not pass this side's check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertProblem {
    /// Not signed by a CA this side trusts (rustls' `UnknownIssuer`).
    UnknownCa,
    /// A CA certificate (CA:TRUE) presented as the peer's own; `detail` is rustls' words.
    CaAsEndEntity {
        /// rustls' description.
        detail: String,
    },
    /// The server presented another certificate than the pinned one.
    PinMismatch {
        /// The fingerprint this client pinned.
        pinned: Fingerprint,
        /// The fingerprint of the certificate the server presented.
        presented: Fingerprint,
    },
    /// The certificate names other hosts than the one in the URL.
    WrongName {
        /// The names in the certificate.
        presented: Vec<String>,
        /// The host of the URL.
        expected: String,
    },
    /// The certificate does not name the host of the URL (no names to show).
    NotForHost,
    /// The certificate has expired; `detail` has the dates.
    Expired {
        /// rustls' description, with the dates.
        detail: String,
    },
    /// The certificate is not valid yet (a clock is off); `detail` has the dates.
    NotValidYet {
        /// rustls' description, with the dates.
        detail: String,
    },
    /// Anything else rustls or webpki refused.
    Other {
        /// rustls' description.
        detail: String,
    },
}

/// Why a TLS handshake failed, or why the peer ended an established TLS session.
#[derive(Debug, Clone, PartialEq)]
pub enum TlsFailure {
    /// The peer's certificate did not pass this side's check.
    Certificate {
        /// Whose certificate it was.
        of: Peer,
        /// What was wrong with it.
        problem: CertProblem,
    },
    /// This server requires a client certificate, and the client presented none.
    NoClientCertificate,
    /// The server refused this client for want of a client certificate (TLS alert
    /// `CertificateRequired`).
    ClientCertificateRequired,
    /// The peer refused this side's certificate with `alert`; `by` is the side that saw the
    /// alert (the server: the client refused the server's certificate).
    CertificateRefused {
        /// The side that received the alert.
        by: Side,
        /// The alert.
        alert: AlertDescription,
    },
    /// The peer ended the handshake with another alert.
    Alert(AlertDescription),
    /// The server answered the client's hello with something that is not TLS.
    ServerNotTls(rustls::Error),
    /// The server closed the connection during the handshake (a plain server, most likely).
    ServerClosed {
        /// The I/O error's words.
        detail: String,
    },
    /// The client closed the connection during the handshake.
    ClientClosed {
        /// The I/O error's words.
        detail: String,
    },
    /// A client that does not speak TLS connected to this TLS server.
    PlainClient(PlainClient),
    /// The URL's host cannot be a TLS server name.
    BadServerName(String),
    /// Anything else rustls reported.
    Other(rustls::Error),
}

impl TlsFailure {
    /// Whether the failure is about the peer's certificate (rather than the handshake).
    pub fn is_certificate(&self) -> bool {
        matches!(self, TlsFailure::Certificate { .. })
    }

    /// The failure an I/O error of a TLS stream carries, if it carries one.
    pub fn in_io(e: &io::Error) -> Option<&TlsFailure> {
        e.get_ref()?.downcast_ref::<TlsFailure>()
    }

    /// An I/O error carrying `self`, for a TLS stream's `AsyncRead`; [`TlsFailure::in_io`]
    /// finds it again.
    pub(crate) fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, self)
    }
}

impl std::error::Error for TlsFailure {}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use TlsFailure as F;
        if let F::Certificate { of, problem } = self {
            return write!(f, "the {of} certificate verification failed: {problem}");
        }
        f.write_str("TLS handshake failed: ")?;
        match self {
            F::Certificate { .. } => Ok(()),
            F::NoClientCertificate => {
                f.write_str("the client presented no certificate, and this server requires one")
            }
            F::ClientCertificateRequired => write!(
                f,
                "the peer refused the connection (TLS alert {:?}): the server requires a client \
                 certificate",
                AlertDescription::CertificateRequired
            ),
            F::CertificateRefused { by, alert } => match by {
                Side::Server => write!(
                    f,
                    "the client did not accept this server's certificate (TLS alert {alert:?})"
                ),
                Side::Client => write!(
                    f,
                    "the server did not accept this client's certificate (TLS alert {alert:?})"
                ),
                Side::Either => write!(
                    f,
                    "the peer did not accept this side's certificate (TLS alert {alert:?})"
                ),
            },
            F::Alert(alert) => write!(f, "the peer ended the handshake (TLS alert {alert:?})"),
            F::ServerNotTls(e) => write!(f, "the server does not speak TLS ({e})"),
            F::ServerClosed { detail } => write!(
                f,
                "the server closed the connection during the TLS handshake ({detail})"
            ),
            F::ClientClosed { detail } => write!(
                f,
                "the client closed the connection during the TLS handshake ({detail})"
            ),
            F::PlainClient(what) => write!(f, "the client does not speak TLS, it sent {what}"),
            F::BadServerName(host) => {
                write!(f, "{host:?} is neither a host name nor an IP address")
            }
            F::Other(e) => write!(f, "{e}"),
        }
    }
}

impl fmt::Display for CertProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertProblem::UnknownCa => {
                f.write_str("it is not signed by a trusted CA (UnknownIssuer)")
            }
            CertProblem::CaAsEndEntity { detail } => write!(
                f,
                "it is a CA certificate (CA:TRUE), which is no server certificate unless it is \
                 itself the client's CA file ({detail})"
            ),
            CertProblem::PinMismatch { pinned, presented } => write!(
                f,
                "the server's certificate has the fingerprint {presented}, not the pinned {pinned}"
            ),
            CertProblem::WrongName {
                presented,
                expected,
            } => write!(f, "it is for {}, not for {expected}", presented.join(", ")),
            CertProblem::NotForHost => f.write_str("it does not name the host of the URL"),
            CertProblem::Expired { detail } => write!(f, "it has expired ({detail})"),
            CertProblem::NotValidYet { detail } => {
                write!(
                    f,
                    "it is not valid yet; check both hosts' clocks ({detail})"
                )
            }
            CertProblem::Other { detail } => f.write_str(detail),
        }
    }
}

/// Sorts a rustls error that `side` met into a [`TlsFailure`].
pub(crate) fn diagnose(e: &rustls::Error, side: Side) -> TlsFailure {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::InvalidCertificate(cert) => TlsFailure::Certificate {
            of: match side {
                Side::Server => Peer::Client,
                Side::Client | Side::Either => Peer::Server,
            },
            problem: cert_problem(cert),
        },
        rustls::Error::NoCertificatesPresented => TlsFailure::NoClientCertificate,
        rustls::Error::AlertReceived(A::CertificateRequired) => {
            TlsFailure::ClientCertificateRequired
        }
        rustls::Error::AlertReceived(
            alert @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::DecryptError),
        ) => TlsFailure::CertificateRefused {
            by: side,
            alert: *alert,
        },
        rustls::Error::AlertReceived(alert) => TlsFailure::Alert(*alert),
        rustls::Error::InvalidMessage(_) if side == Side::Client => {
            TlsFailure::ServerNotTls(e.clone())
        }
        other => TlsFailure::Other(other.clone()),
    }
}

fn cert_problem(cert: &CertificateError) -> CertProblem {
    match cert {
        CertificateError::Other(other) => {
            if let Some(pin) = other.0.downcast_ref::<FingerprintMismatch>() {
                return CertProblem::PinMismatch {
                    pinned: Fingerprint::from_bytes(pin.pinned),
                    presented: Fingerprint::from_bytes(pin.presented),
                };
            }
            match other.to_string() {
                detail if detail.contains("CaUsedAsEndEntity") => {
                    CertProblem::CaAsEndEntity { detail }
                }
                detail => CertProblem::Other { detail },
            }
        }
        CertificateError::UnknownIssuer => CertProblem::UnknownCa,
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => CertProblem::WrongName {
            presented: presented.clone(),
            expected: expected.to_str().into_owned(),
        },
        CertificateError::NotValidForName => CertProblem::NotForHost,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            CertProblem::Expired {
                detail: format!("{cert:?}"),
            }
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            CertProblem::NotValidYet {
                detail: format!("{cert:?}"),
            }
        }
        other => CertProblem::Other {
            detail: format!("{other:?}"),
        },
    }
}

/// The failure of a handshake that ended in an I/O error, if the error says something about
/// TLS (the peer closed the connection during the handshake); `None` for plain I/O errors.
pub(crate) fn diagnose_io(e: &io::Error, side: Side) -> Option<TlsFailure> {
    if let Some(failure) = TlsFailure::in_io(e) {
        return Some(failure.clone());
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => Some(match side {
            Side::Client => TlsFailure::ServerClosed {
                detail: e.to_string(),
            },
            _ => TlsFailure::ClientClosed {
                detail: e.to_string(),
            },
        }),
        _ => None,
    }
}
