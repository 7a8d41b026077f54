//! The two ways a client checks the server's certificate besides the system's CA store: a CA
//! file that may hold the server's own self-signed certificate ([`CaFile`]), and a pinned
//! certificate fingerprint ([`Pinned`]).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use sha2::{Digest as _, Sha256};

/// A CA file: the server's certificate must chain to one of its certificates, or be one of
/// them itself. The latter is the self-signed pair of `openssl req -x509` ([`MAKE_CERT`]):
/// openssl marks it CA:TRUE, which webpki refuses as a server certificate, yet an operator
/// who hands it to the client as its CA means "this very certificate". Its name is still
/// checked against the URL's host, and the handshake signature against its key.
#[derive(Debug)]
pub(super) struct CaFile {
    pub(super) webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pub(super) selves: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for CaFile {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .selves
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_name(&parsed, server_name)?;
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A fingerprint pin: the server's certificate must be the pinned one. The handshake
/// signature is still checked against that certificate's key, so only the holder of the
/// certificate's private key passes.
#[derive(Debug)]
pub(super) struct Pinned {
    /// The SHA-256 of the pinned certificate (a [`Fingerprint`](super::Fingerprint)).
    pub(super) pin: [u8; 32],
    pub(super) algorithms: WebPkiSupportedAlgorithms,
}

/// The server presented another certificate than the pinned one.
#[derive(Debug)]
pub(super) struct FingerprintMismatch {
    pub(super) pinned: [u8; 32],
    pub(super) presented: [u8; 32],
}

/// Only for rustls' `OtherError`: `diagnose.rs` turns it into a `CertProblem::PinMismatch`,
/// which shows both fingerprints.
impl fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server's certificate is not the pinned one")
    }
}

impl std::error::Error for FingerprintMismatch {}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(FingerprintMismatch {
                    pinned: self.pin,
                    presented,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
