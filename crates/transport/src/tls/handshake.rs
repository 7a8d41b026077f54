//! The TLS handshake, driven through rustls' unbuffered API so that it ends with the session's
//! traffic keys in our hands ([`rustls::kernel`]) rather than inside a rustls stream: the
//! record layer of [`super::record`] takes over from there.

use std::io;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, InsufficientSizeError, UnbufferedStatus};
use rustls::{ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Largest handshake flight we buffer (a certificate chain, mostly).
const MAX_HANDSHAKE_BUFFER: usize = 256 * 1024;

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// rustls refused something, or the peer sent an alert.
    Tls(rustls::Error),
    /// The socket failed or closed.
    Io(io::Error),
}

/// rustls' part of an established session: what it still does after the handshake (key
/// updates, session tickets). Client and server differ only in their type.
pub(crate) enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kernel::Client(_) => "Kernel::Client",
            Kernel::Server(_) => "Kernel::Server",
        })
    }
}

impl Kernel {
    /// The next sending key (after we sent a `key_update`).
    pub(crate) fn update_tx(
        &mut self,
    ) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
        }
    }

    /// The next receiving key (after the peer's `key_update`).
    pub(crate) fn update_rx(
        &mut self,
    ) -> Result<(u64, rustls::ConnectionTrafficSecrets), rustls::Error> {
        match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
        }
    }

    /// A session ticket from the server. qmigrate's own servers send none; another server's
    /// is stored where rustls keeps them.
    pub(crate) fn session_ticket(&mut self, body: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(body),
            Kernel::Server(_) => Err(rustls::Error::InappropriateHandshakeMessage {
                expect_types: vec![rustls::HandshakeType::KeyUpdate],
                got_type: rustls::HandshakeType::NewSessionTicket,
            }),
        }
    }
}

/// An established session, ready for the record layer.
pub(crate) struct Established {
    pub tcp: TcpStream,
    /// Application data rustls decrypted together with the end of the handshake (a client
    /// sends its first message right behind its Finished).
    pub plaintext: Vec<u8>,
    /// Bytes read past the records rustls processed: the start of the peer's next record.
    pub leftover: Vec<u8>,
    pub secrets: ExtractedSecrets,
    pub kernel: Kernel,
    pub suite: SupportedCipherSuite,
    pub version: ProtocolVersion,
}

/// What both unbuffered connection types offer the driver.
trait Unbuffered {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn handshaking(&self) -> bool;
    fn suite(&self) -> Option<SupportedCipherSuite>;
    fn version(&self) -> Option<ProtocolVersion>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

/// The two impls differ only in their types: rustls gives client and server the same
/// methods, not a common trait.
macro_rules! unbuffered {
    ($conn:ty, $data:ty, $kernel:ident) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn handshaking(&self) -> bool {
                self.is_handshaking()
            }
            fn suite(&self) -> Option<SupportedCipherSuite> {
                self.negotiated_cipher_suite()
            }
            fn version(&self) -> Option<ProtocolVersion> {
                self.protocol_version()
            }
            fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
                let (secrets, kernel) = self.dangerous_into_kernel_connection()?;
                Ok((secrets, Kernel::$kernel(kernel)))
            }
        }
    };
}

unbuffered!(UnbufferedClientConnection, ClientConnectionData, Client);
unbuffered!(UnbufferedServerConnection, ServerConnectionData, Server);

/// The client's handshake on a connected socket.
pub(crate) async fn client(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    tcp: TcpStream,
) -> Result<Established, (Failure, TcpStream)> {
    match UnbufferedClientConnection::new(config, name) {
        Ok(conn) => drive(conn, tcp).await,
        Err(e) => Err((Failure::Tls(e), tcp)),
    }
}

/// The server's handshake on an accepted socket.
pub(crate) async fn server(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<Established, (Failure, TcpStream)> {
    match UnbufferedServerConnection::new(config) {
        Ok(conn) => drive(conn, tcp).await,
        Err(e) => Err((Failure::Tls(e), tcp)),
    }
}

/// What the driver does next, decided while rustls holds the buffers.
enum Step {
    /// Read more of the peer's flight.
    Read,
    /// Send what was encoded.
    Send,
    /// Encoded something; ask rustls again.
    Again,
    /// rustls would let us send application data: the handshake is over unless a server
    /// still waits for the client's Finished.
    Traffic,
    Fail(rustls::Error),
}

async fn drive<C: Unbuffered>(
    mut conn: C,
    mut tcp: TcpStream,
) -> Result<Established, (Failure, TcpStream)> {
    let mut incoming = vec![0u8; 16 * 1024 + 1024];
    let mut filled = 0;
    let mut outgoing = Vec::with_capacity(4096);
    let mut plaintext = Vec::new();
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process(&mut incoming[..filled]);
        let step = match state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                match encode(&mut outgoing, |out| enc.encode(out)) {
                    Ok(()) => Step::Again,
                    Err(e) => Step::Fail(e),
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // Marked done before the write: a failed write ends the handshake anyway.
                t.done();
                Step::Send
            }
            Ok(ConnectionState::BlockedHandshake) => Step::Read,
            Ok(ConnectionState::WriteTraffic(_)) => Step::Traffic,
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                let mut step = Step::Again;
                while let Some(record) = records.next_record() {
                    match record {
                        Ok(record) => {
                            plaintext.extend_from_slice(record.payload);
                            discard += record.discard;
                        }
                        Err(e) => {
                            step = Step::Fail(e);
                            break;
                        }
                    }
                }
                step
            }
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                Step::Fail(rustls::Error::General(
                    "the peer closed the TLS session during the handshake".into(),
                ))
            }
            Ok(other) => Step::Fail(rustls::Error::General(format!(
                "unexpected TLS state during the handshake: {other:?}"
            ))),
            Err(e) => Step::Fail(e),
        };
        incoming.copy_within(discard..filled, 0);
        filled -= discard;
        match step {
            Step::Again => {}
            Step::Send => {
                if let Err(e) = tcp.write_all(&outgoing).await {
                    return Err((Failure::Io(e), tcp));
                }
                outgoing.clear();
            }
            Step::Read => {
                if let Err(e) = read_more(&mut tcp, &mut incoming, &mut filled).await {
                    return Err((e, tcp));
                }
            }
            // A TLS 1.3 server may send before the client's Finished has arrived; the
            // session is ours only once it has.
            Step::Traffic if conn.handshaking() => {
                if let Err(e) = read_more(&mut tcp, &mut incoming, &mut filled).await {
                    return Err((e, tcp));
                }
            }
            Step::Fail(e) => {
                // A record of application data right behind the peer's Finished that failed
                // (did not decrypt, say): rustls queued its alert but left the record in the
                // buffer, and shown it again it would refuse it again and queue a second alert
                // (which a debug assertion of rustls refuses). With the handshake over, no
                // handshake message of rustls' spans the buffer: show it none.
                let shown = if conn.handshaking() {
                    &mut incoming[..filled]
                } else {
                    &mut []
                };
                send_alert(&mut conn, shown, &mut tcp, &mut outgoing).await;
                return Err((Failure::Tls(e), tcp));
            }
            Step::Traffic => {
                let suite = conn.suite();
                let version = conn.version();
                let (secrets, kernel) = match conn.into_kernel() {
                    Ok(k) => k,
                    Err(e) => return Err((Failure::Tls(e), tcp)),
                };
                let (Some(suite), Some(version)) = (suite, version) else {
                    return Err((Failure::Tls(rustls::Error::HandshakeNotComplete), tcp));
                };
                incoming.truncate(filled);
                return Ok(Established {
                    tcp,
                    plaintext,
                    leftover: incoming,
                    secrets,
                    kernel,
                    suite,
                    version,
                });
            }
        }
    }
}

/// Reads more of the peer's handshake flight after the `filled` bytes of `incoming`.
async fn read_more(
    tcp: &mut TcpStream,
    incoming: &mut Vec<u8>,
    filled: &mut usize,
) -> Result<(), Failure> {
    if *filled == incoming.len() {
        if incoming.len() >= MAX_HANDSHAKE_BUFFER {
            return Err(Failure::Tls(rustls::Error::PeerSentOversizedRecord));
        }
        incoming.resize(incoming.len() * 2, 0);
    }
    match tcp.read(&mut incoming[*filled..]).await {
        Ok(0) => Err(Failure::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection",
        ))),
        Ok(n) => {
            *filled += n;
            Ok(())
        }
        Err(e) => Err(Failure::Io(e)),
    }
}

/// Encodes a handshake record (or alert) at the end of `out`, growing it as rustls asks.
fn encode(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 4096;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(start);
                return Ok(());
            }
        }
    }
}

/// After a failure rustls queues an alert for the peer: send it, so that the peer learns why
/// (a bad certificate, say) instead of seeing the connection drop. Best effort.
/// rustls must see the same buffer as before (its handshake deframer keeps offsets into it).
async fn send_alert<C: Unbuffered>(
    conn: &mut C,
    incoming: &mut [u8],
    tcp: &mut TcpStream,
    outgoing: &mut Vec<u8>,
) {
    outgoing.clear();
    for _ in 0..4 {
        let UnbufferedStatus { state, .. } = conn.process(incoming);
        match state {
            Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                if encode(outgoing, |out| enc.encode(out)).is_err() {
                    break;
                }
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                t.done();
                break;
            }
            _ => break,
        }
    }
    if !outgoing.is_empty() {
        let _ = tcp.write_all(outgoing).await;
    }
}
