//! Operator advice that names this command line's flags, added to the transport's errors
//! where the error is reported.
//!
//! The transport library says what went wrong in its own terms (a typed error); which flag
//! fixes it is this binary's business, so the advice lives here, keyed on the error's
//! variant. [`report`] prints an error chain as `{:#}` does, with each transport error in
//! the words that carry the advice.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::io;

use qmigrate_migration::monitor::MissingSocket;
use qmigrate_migration::source::PostcopyPaused;
use qmigrate_migration::PlanError;
use qmigrate_transport::auth::MAKE_TOKEN;
use qmigrate_transport::protocol::{EnvelopeError, Sniffed};
use qmigrate_transport::tls::{CertProblem, Mismatch, Peer, Side, TlsError, TlsFailure};
use qmigrate_transport::{AuthFailure, Error, SetupRefusal};

/// `err` as `{err:#}` prints it (each cause after a `: `), with the advice for the
/// transport's errors in the chain.
pub fn report(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for (i, cause) in err.chain().enumerate() {
        if i > 0 {
            out.push_str(": ");
        }
        match advised(cause) {
            Some(text) => out.push_str(&text),
            None => {
                let _ = write!(out, "{cause}");
            }
        }
    }
    out
}

/// The text of one error of the chain with its advice, when it has some.
fn advised(cause: &(dyn StdError + 'static)) -> Option<String> {
    // The engine's error shows its head's message and hides the head's type behind its own:
    // advise on the head itself.
    if let Some(e) = cause.downcast_ref::<qmigrate_migration::Error>() {
        return advised(e.head());
    }
    if let Some(e) = cause.downcast_ref::<MissingSocket>() {
        return Some(missing_socket(e));
    }
    if let Some(e) = cause.downcast_ref::<PostcopyPaused>() {
        return Some(format!(
            "postcopy paused: {}; the guest's memory is split between both hosts, so neither \
             can run it alone: both QEMUs are left paused (not killed). Once the network is \
             back, resume it with `qmigrate recover --qmp SRC --to URL` (the tunnel-server \
             --qmp's URL), or step by step with `qmigrate recover --incoming --qmp DST --socket \
             PATH` on the destination (not needed while `receive --wait` runs there), then \
             `qmigrate recover --qmp SRC --socket PATH` here",
            e.0
        ));
    }
    if let Some(e) = cause.downcast_ref::<PlanError>() {
        return Some(plan(e));
    }
    if let Some(e) = cause.downcast_ref::<Error>() {
        return transport(e);
    }
    if let Some(e) = cause.downcast_ref::<TlsError>() {
        return tls_setup(e);
    }
    None
}

/// A migration socket nobody listens on, with the command that would listen there.
fn missing_socket(e: &MissingSocket) -> String {
    let shown = e.0.display();
    format!("migration socket {shown} does not exist: start `qmigrate tunnel-client --socket {shown}` first")
}

/// The tunnel-server's refusals that say how it was started, in the words of its flags (what
/// a client's operator reads, so they name what to change on the server).
pub fn refusal(r: SetupRefusal) -> String {
    match r {
        SetupRefusal::NoController => "this tunnel-server has no --qmp, so it cannot prepare the \
                                  destination QEMU: start it with --qmp PATH (or --route \
                                  NAME=PATH), or run `qmigrate receive` on the destination and \
                                  `qmigrate send` here"
            .into(),
        SetupRefusal::UnpreparedSession => {
            "with --qmp, migrations start with `qmigrate migrate`".into()
        }
        other => other.default_text(),
    }
}

/// A plan error in the words of this command line's flags.
fn plan(e: &PlanError) -> String {
    match e {
        PlanError::MultifdChannels(n) => format!("--multifd must be between 1 and 255, not {n}"),
        PlanError::CompressionWithoutMultifd => {
            "--compress needs --multifd N: QEMU compresses multifd channels only".into()
        }
        PlanError::DowntimeLimit(ms) => {
            format!("--downtime-limit must be between 0 and 2000000 ms, not {ms}")
        }
        PlanError::MultifdWithPipe => "--multifd cannot be used with exec: multifd channels to \
             or from a file use mapped-ram, which puts every page at its own offset in a seekable \
             file, and a command's stdin or stdout is a pipe; use file:PATH for parallel \
             channels, or drop --multifd"
            .into(),
        PlanError::CompressionToFile => "--compress cannot be used with file: multifd channels \
             to a file use mapped-ram, which stores raw pages at fixed offsets; compress with \
             exec:'zstd -q -o PATH' instead"
            .into(),
        PlanError::PostcopyToFile => "--postcopy needs a running destination QEMU that asks for \
             pages; a save to file: or exec: is precopy only"
            .into(),
        PlanError::CprRebootLive => "--mode cpr-reboot restarts QEMU on this host from a saved \
             state: use it with file:PATH (or exec:), not with a live migration"
            .into(),
        PlanError::MultifdWithoutMappedRam(file) => format!(
            "{file} was saved without mapped-ram (without --multifd): restore it without --multifd"
        ),
        // A newer engine's plan error, in its own words.
        #[allow(unreachable_patterns)]
        other => other.to_string(),
    }
}

fn transport(e: &Error) -> Option<String> {
    Some(match e {
        Error::Unauthenticated { .. } => format!(
            "{e}. Give the server a token (--token-file PATH or QMIGRATE_TOKEN; make one with \
             `{MAKE_TOKEN}`) or, with TLS, require client certificates (--tls-client-ca), listen \
             on 127.0.0.1, or pass --insecure if the network is trusted"
        ),
        Error::Destination { path, why } => format!(
            "destination migration socket {}: {why} (is the destination QEMU started with \
             `-incoming defer`, and has `qmigrate receive --socket {}` run?)",
            path.display(),
            path.display()
        ),
        Error::Bind { addr, source } if source.kind() == io::ErrorKind::AddrInUse => format!(
            "cannot listen on {addr}: {source} (another process listens there: stop it, or pick \
             another port with --listen)"
        ),
        Error::TlsSetup(setup) => return tls_setup(setup),
        Error::Tls(failure) => return tls_failure(failure),
        Error::Auth(AuthFailure::NoToken) => {
            format!("{e}: give it the server's token with --token-file PATH or QMIGRATE_TOKEN")
        }
        Error::Envelope(EnvelopeError::NotOurProtocol(sniffed)) => format!(
            "the peer does not speak the qmigrate tunnel protocol ({})",
            sniffed_hint(*sniffed)?
        ),
        _ => return None,
    })
}

fn tls_setup(e: &TlsError) -> Option<String> {
    Some(match e {
        TlsError::NoSystemRoots { .. } => format!(
            "{e}: pass the CA that signed the server's certificate with --tls-ca PATH, or pin \
             the server's certificate with --tls-fingerprint sha256:HEX"
        ),
        TlsError::Mismatch(Mismatch::ClientWithoutSettings) => "a tls:// or wss:// address \
             needs TLS settings: how to check the server (--tls-ca or --tls-fingerprint)"
            .into(),
        TlsError::Mismatch(Mismatch::ClientWithoutTls) => "TLS settings (--tls-ca, \
             --tls-fingerprint, --tls-cert) need a tls:// or wss:// address"
            .into(),
        TlsError::Mismatch(Mismatch::ServerWithoutSettings) => "listening on tls:// or wss:// \
             needs the server's certificate and key (--tls-cert, --tls-key)"
            .into(),
        TlsError::Mismatch(Mismatch::ServerWithoutTls) => {
            "a certificate (--tls-cert) needs a tls:// or wss:// address to listen on".into()
        }
        _ => return None,
    })
}

/// What to do about a plain server, for a client that expected TLS.
const PLAIN_SERVER: &str =
    "is it a plain tcp:// or ws:// tunnel-server? TLS needs tunnel-server --tls-cert and --tls-key";

fn tls_failure(f: &TlsFailure) -> Option<String> {
    Some(match f {
        TlsFailure::Certificate { of, problem } => {
            let problem = match problem {
                CertProblem::CaAsEndEntity { detail } => format!(
                    "it is a CA certificate (CA:TRUE), which is no server certificate unless it \
                     is itself the --tls-ca file ({detail})"
                ),
                other => other.to_string(),
            };
            let advice = match of {
                Peer::Client => {
                    "the client's certificate must be signed by this server's \
                                 --tls-client-ca"
                }
                Peer::Server => {
                    "pass the CA that signed the server's certificate with \
                                 --tls-ca, or pin the certificate with --tls-fingerprint (the \
                                 server logs its fingerprint at start)"
                }
            };
            format!("the {of} certificate verification failed: {problem}: {advice}")
        }
        TlsFailure::NoClientCertificate => "TLS handshake failed: the client presented no \
             certificate, and this server requires one (--tls-client-ca): give the client \
             --tls-cert and --tls-key"
            .into(),
        TlsFailure::ClientCertificateRequired => format!(
            "{f}; give this client --tls-cert and --tls-key, signed by the CA of the server's \
             --tls-client-ca"
        ),
        TlsFailure::CertificateRefused { by, .. } => match by {
            Side::Server => format!(
                "{f}: give the client the CA that signed it (--tls-ca), or its fingerprint \
                 (--tls-fingerprint; logged at this server's start)"
            ),
            Side::Client => {
                format!("{f}: it must be signed by the CA of the server's --tls-client-ca")
            }
            Side::Either => format!(
                "{f}: a server with --tls-client-ca accepts only client certificates signed by \
                 that CA"
            ),
        },
        TlsFailure::ServerNotTls(_) | TlsFailure::ServerClosed { .. } => {
            format!("{f}: {PLAIN_SERVER}")
        }
        _ => return None,
    })
}

fn sniffed_hint(sniffed: Sniffed) -> Option<String> {
    Some(match sniffed {
        Sniffed::Http => {
            format!("{sniffed}: a WebSocket client must talk to a server started with --ws")
        }
        Sniffed::QemuMigration => {
            format!("{sniffed}: point QEMU at tunnel-client, not tunnel-server")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use qmigrate_transport::tls::{AlertDescription, Fingerprint};
    use qmigrate_transport::DestinationFailure;

    use super::*;

    fn said(e: impl Into<anyhow::Error>) -> String {
        report(&e.into())
    }

    /// A missing migration socket names the command that listens there, whether the engine's
    /// error is the head of the report or wrapped in context.
    #[test]
    fn a_missing_socket_names_the_tunnel_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mig.sock");
        let err = qmigrate_migration::monitor::check_migration_socket(&path)
            .expect_err("no socket there");
        let want = format!(
            "migration socket {0} does not exist: start `qmigrate tunnel-client --socket {0}` \
             first",
            path.display()
        );
        let bare = anyhow::Error::from(err);
        assert_eq!(report(&bare), want);
        assert_eq!(report(&bare.context("send")), format!("send: {want}"));
    }

    /// The tunnel-server's refusals name its flags; the library's name none.
    #[test]
    fn refusals_name_flags_here_and_not_in_the_library() {
        for r in [SetupRefusal::NoController, SetupRefusal::UnpreparedSession] {
            assert!(refusal(r).contains("--qmp"), "{r:?}: {}", refusal(r));
            assert!(
                !r.default_text().contains("--"),
                "{r:?}: {}",
                r.default_text()
            );
        }
    }

    /// The advice is where the library's messages had it, word for word.
    #[test]
    fn transport_errors_carry_the_flags_that_fix_them() {
        let unauth = Error::Unauthenticated {
            addr: "0.0.0.0:9999".into(),
        };
        assert_eq!(
            said(unauth),
            format!(
                "refusing to listen on 0.0.0.0:9999 without authentication: anyone who can reach \
                 it could write a migration stream into the destination VM, and run code there. \
                 Give the server a token (--token-file PATH or QMIGRATE_TOKEN; make one with \
                 `{MAKE_TOKEN}`) or, with TLS, require client certificates (--tls-client-ca), \
                 listen on 127.0.0.1, or pass --insecure if the network is trusted"
            )
        );
        let dest = Error::Destination {
            path: PathBuf::from("/run/dest.sock"),
            why: DestinationFailure::NeverAppeared(std::time::Duration::from_secs(10)),
        };
        assert_eq!(
            said(dest),
            "destination migration socket /run/dest.sock: did not appear within 10s (is the \
             destination QEMU started with `-incoming defer`, and has `qmigrate receive --socket \
             /run/dest.sock` run?)"
        );
        let bind = Error::Bind {
            addr: "0.0.0.0:1".into(),
            source: io::ErrorKind::AddrInUse.into(),
        };
        assert_eq!(
            said(bind),
            "cannot listen on 0.0.0.0:1: address in use (another process listens there: stop \
             it, or pick another port with --listen): address in use"
        );
        assert_eq!(
            said(Error::Auth(AuthFailure::NoToken)),
            "authentication failed: the tunnel server requires a token and this client has none: \
             give it the server's token with --token-file PATH or QMIGRATE_TOKEN"
        );
        assert_eq!(
            said(Error::Envelope(EnvelopeError::NotOurProtocol(
                Sniffed::Http
            ))),
            "the peer does not speak the qmigrate tunnel protocol (it sent HTTP: a WebSocket \
             client must talk to a server started with --ws)"
        );
        assert_eq!(
            said(Error::Envelope(EnvelopeError::NotOurProtocol(
                Sniffed::QemuMigration
            ))),
            "the peer does not speak the qmigrate tunnel protocol (it sent a raw QEMU migration \
             stream: point QEMU at tunnel-client, not tunnel-server)"
        );
    }

    #[test]
    fn tls_setup_errors_carry_the_flags_that_fix_them() {
        let roots = TlsError::NoSystemRoots {
            why: "the store is empty".into(),
        };
        assert_eq!(
            said(anyhow::Error::from(roots).context("setting up TLS")),
            "setting up TLS: no CA certificates found on this system (the store is empty): pass \
             the CA that signed the server's certificate with --tls-ca PATH, or pin the server's \
             certificate with --tls-fingerprint sha256:HEX"
        );
        for (mismatch, text) in [
            (
                Mismatch::ClientWithoutSettings,
                "a tls:// or wss:// address needs TLS settings: how to check the server \
                 (--tls-ca or --tls-fingerprint)",
            ),
            (
                Mismatch::ClientWithoutTls,
                "TLS settings (--tls-ca, --tls-fingerprint, --tls-cert) need a tls:// or wss:// \
                 address",
            ),
            (
                Mismatch::ServerWithoutSettings,
                "listening on tls:// or wss:// needs the server's certificate and key \
                 (--tls-cert, --tls-key)",
            ),
            (
                Mismatch::ServerWithoutTls,
                "a certificate (--tls-cert) needs a tls:// or wss:// address to listen on",
            ),
        ] {
            assert_eq!(said(Error::TlsSetup(TlsError::Mismatch(mismatch))), text);
        }
    }

    #[test]
    fn tls_failures_carry_the_flags_that_fix_them() {
        let cert = |of, problem| Error::Tls(TlsFailure::Certificate { of, problem });
        assert_eq!(
            said(cert(Peer::Server, CertProblem::UnknownCa)),
            "the server's certificate verification failed: it is not signed by a trusted CA \
             (UnknownIssuer): pass the CA that signed the server's certificate with --tls-ca, or \
             pin the certificate with --tls-fingerprint (the server logs its fingerprint at \
             start)"
        );
        let fp = |hex: &str| Fingerprint::parse(&hex.repeat(32)).expect("fingerprint");
        let pin = CertProblem::PinMismatch {
            pinned: fp("01"),
            presented: fp("02"),
        };
        assert_eq!(
            said(cert(Peer::Server, pin)),
            format!(
                "the server's certificate verification failed: the server's certificate has the \
                 fingerprint {}, not the pinned {}: pass the CA that signed the server's \
                 certificate with --tls-ca, or pin the certificate with --tls-fingerprint (the \
                 server logs its fingerprint at start)",
                fp("02"),
                fp("01")
            )
        );
        assert_eq!(
            said(cert(
                Peer::Server,
                CertProblem::CaAsEndEntity {
                    detail: "CaUsedAsEndEntity".into()
                }
            )),
            "the server's certificate verification failed: it is a CA certificate (CA:TRUE), \
             which is no server certificate unless it is itself the --tls-ca file \
             (CaUsedAsEndEntity): pass the CA that signed the server's certificate with \
             --tls-ca, or pin the certificate with --tls-fingerprint (the server logs its \
             fingerprint at start)"
        );
        assert_eq!(
            said(cert(Peer::Client, CertProblem::UnknownCa)),
            "the client's certificate verification failed: it is not signed by a trusted CA \
             (UnknownIssuer): the client's certificate must be signed by this server's \
             --tls-client-ca"
        );
        let tls = |f| said(Error::Tls(f));
        assert_eq!(
            tls(TlsFailure::NoClientCertificate),
            "TLS handshake failed: the client presented no certificate, and this server \
             requires one (--tls-client-ca): give the client --tls-cert and --tls-key"
        );
        assert_eq!(
            tls(TlsFailure::ClientCertificateRequired),
            "TLS handshake failed: the peer refused the connection (TLS alert \
             CertificateRequired): the server requires a client certificate; give this client \
             --tls-cert and --tls-key, signed by the CA of the server's --tls-client-ca"
        );
        let refused = |by| TlsFailure::CertificateRefused {
            by,
            alert: AlertDescription::UnknownCA,
        };
        assert_eq!(
            tls(refused(Side::Server)),
            "TLS handshake failed: the client did not accept this server's certificate (TLS \
             alert UnknownCA): give the client the CA that signed it (--tls-ca), or its \
             fingerprint (--tls-fingerprint; logged at this server's start)"
        );
        assert_eq!(
            tls(refused(Side::Client)),
            "TLS handshake failed: the server did not accept this client's certificate (TLS \
             alert UnknownCA): it must be signed by the CA of the server's --tls-client-ca"
        );
        assert_eq!(
            tls(refused(Side::Either)),
            "TLS handshake failed: the peer did not accept this side's certificate (TLS alert \
             UnknownCA): a server with --tls-client-ca accepts only client certificates signed \
             by that CA"
        );
        assert_eq!(
            tls(TlsFailure::ServerClosed {
                detail: "early eof".into()
            }),
            "TLS handshake failed: the server closed the connection during the TLS handshake \
             (early eof): is it a plain tcp:// or ws:// tunnel-server? TLS needs tunnel-server \
             --tls-cert and --tls-key"
        );
    }

    /// Errors without advice print as `{:#}` does.
    #[test]
    fn other_errors_are_printed_as_they_are() {
        let err = anyhow::Error::from(Error::ConnectionLost("reset".into())).context("sending");
        assert_eq!(report(&err), format!("{err:#}"));
    }

    /// Plan errors read in flags, wherever the engine wrapped them: checked before the session
    /// starts (`migrate`) or by the CLI itself (`send`, `receive`).
    #[test]
    fn plan_errors_name_the_flags() {
        let from_engine = anyhow::Error::from(qmigrate_migration::Error::from(
            PlanError::DowntimeLimit(3_000_000),
        ));
        assert_eq!(
            report(&from_engine),
            "invalid usage: --downtime-limit must be between 0 and 2000000 ms, not 3000000"
        );
        let from_cli = anyhow::Error::from(PlanError::CompressionWithoutMultifd)
            .context(crate::exit::Exit::Usage);
        assert_eq!(
            report(&from_cli),
            "invalid usage: --compress needs --multifd N: QEMU compresses multifd channels only"
        );
        assert_eq!(
            said(PlanError::MultifdWithoutMappedRam("/s".into())),
            "/s was saved without mapped-ram (without --multifd): restore it without --multifd"
        );
    }
}
