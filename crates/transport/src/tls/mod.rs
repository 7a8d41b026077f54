//! TLS for `tls://` and `wss://`: the server's certificate and key ([`ServerTls`]), how a
//! client checks the server ([`ServerCheck`]: a CA, a pinned certificate [`Fingerprint`], or
//! the system's CA store) and, for mutual TLS, the client's certificate ([`ClientTls`]).
//!
//! rustls with the `ring` crypto provider runs the handshake, TLS 1.3 only; AES-GCM uses the
//! CPU's AES instructions. Verification is never off: a client either checks the chain up to a
//! CA or compares the certificate itself with a pinned fingerprint. After the handshake
//! qmigrate protects the records itself ([`TlsStream`], `record.rs`), in place, with the keys
//! rustls hands over and rustls' key schedule for key updates.
//!
//! Layout: `config.rs` holds the settings and PEM loading, `verify.rs` the two custom
//! certificate verifiers, `diagnose.rs` sorts failures into a [`TlsFailure`],
//! `handshake.rs` drives rustls, `record.rs` and `stream.rs` are the record layer after it.

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::endpoint::Endpoint;
use crate::error::{Error, Result};
use crate::protocol;
use crate::sniff;

pub(crate) mod config;
pub(crate) mod diagnose;
mod handshake;
mod record;
mod stream;
mod verify;

pub use crate::sniff::PlainClient;
pub use config::{
    read_certificates, read_private_key, CertificateDer, ClientTls, Fingerprint, Mismatch,
    PrivateKeyDer, ServerCheck, ServerTls, TlsError, MAKE_CERT,
};
use diagnose::{diagnose, diagnose_io};
pub use diagnose::{CertProblem, Peer, Side, TlsFailure};
/// The TLS alerts a [`TlsFailure`] names.
pub use rustls::AlertDescription;
pub use stream::{TlsReader, TlsStream, TlsWriter, VectoredRead};

/// The client side of the TLS handshake on a fresh TCP connection to `to`.
pub(crate) async fn connect(tls: &ClientTls, to: &Endpoint, tcp: TcpStream) -> Result<TlsStream> {
    let name = ServerName::try_from(to.host.clone())
        .map_err(|_| TlsFailure::BadServerName(to.host.clone()))?;
    match handshake::client(tls.config.clone(), name, tcp).await {
        Ok(est) => established(est),
        Err((failure, _tcp)) => Err(failed(failure, Side::Client)),
    }
}

/// The server side of the TLS handshake on a freshly accepted connection. A plain qmigrate
/// client (`tcp://`, `ws://`) is told in its own protocol to use TLS, since it cannot read a
/// TLS alert.
pub(crate) async fn accept(tls: &ServerTls, tcp: TcpStream) -> Result<TlsStream> {
    let mut first = [0u8; 8];
    let mut n = tcp.peek(&mut first).await.map_err(Error::lost_or_io)?;
    // 0x16: a TLS handshake record. Anything else is not a TLS client: wait a moment for
    // enough of its first bytes to tell what it speaks.
    for _ in 0..20 {
        if n == 0 || n == first.len() || first[0] == sniff::TLS_HANDSHAKE {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        n = tcp.peek(&mut first).await.map_err(Error::lost_or_io)?;
    }
    if n > 0 && first[0] != sniff::TLS_HANDSHAKE {
        return Err(refuse_plain(tcp, &first[..n]).await);
    }
    match handshake::server(tls.config.clone(), tcp).await {
        Ok(est) => established(est),
        Err((failure, tcp)) => {
            linger(tcp).await;
            Err(failed(failure, Side::Server))
        }
    }
}

fn established(est: handshake::Established) -> Result<TlsStream> {
    let version = est.version;
    let stream = TlsStream::new(est).map_err(|e| diagnose(&e, Side::Either))?;
    tracing::debug!(?version, suite = ?stream.cipher_suite(), "TLS established");
    Ok(stream)
}

fn failed(failure: handshake::Failure, side: Side) -> Error {
    match failure {
        handshake::Failure::Tls(e) => diagnose(&e, side).into(),
        handshake::Failure::Io(e) => match diagnose_io(&e, side) {
            Some(failure) => failure.into(),
            None => Error::lost_or_io(e),
        },
    }
}

/// Answers a client that does not speak TLS in its own protocol, then closes.
async fn refuse_plain(mut tcp: TcpStream, first: &[u8]) -> Error {
    let plain = PlainClient::of(first, protocol::MAGIC);
    let answer = match (plain, plain.told()) {
        (PlainClient::Tunnel, Some(message)) => {
            let reject = protocol::Reply::Reject {
                reason: protocol::RejectReason::BadRequest,
                message: message.into(),
                software: protocol::software(),
                versions: None,
            };
            protocol::envelope(&protocol::encode_body(&reject))
        }
        (_, Some(body)) => sniff::http_refusal(body),
        (_, None) => Vec::new(),
    };
    if !answer.is_empty() {
        let _ = tcp.write_all(&answer).await;
    }
    linger(tcp).await;
    TlsFailure::PlainClient(plain).into()
}

/// Ends a refused connection gently: FIN, then read (and drop) what the peer still sends for
/// a moment, so that the kernel does not answer its unread bytes with a reset that would
/// destroy the answer or alert before the peer reads it.
async fn linger<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let _ = s.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let mut sink = [0u8; 4096];
        let mut left: usize = 256 * 1024;
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
