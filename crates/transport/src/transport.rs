//! The [`Transport`] trait and its TCP and WebSocket implementations, each with or without TLS.
//!
//! All transports listen on and connect over TCP; they differ in what happens on a fresh
//! socket (nothing, a TLS handshake, the WebSocket upgrade, or both) and in the data framing,
//! which lives in [`TunnelStream`]. The server accepts TCP connections itself and hands each to
//! [`Transport::accept`] in its own task, so a slow or hostile upgrade never blocks the
//! accept loop.

use std::future::Future;

use tokio::net::TcpStream;

use crate::endpoint::{Endpoint, Scheme};
use crate::error::{Error, Result};
use crate::keepalive::DeadPeer;
use crate::stream::TunnelStream;
use crate::tls::{self, ClientTls, Mismatch, ServerTls, TlsError};
use crate::ws::{ws_accept, ws_connect};

/// A way to carry tunnel connections.
pub trait Transport: Send + Sync {
    /// Which scheme this transport serves.
    fn scheme(&self) -> Scheme;

    /// Opens a tunnel connection to a server (TCP connect, then the upgrade if any).
    fn connect(&self, to: &Endpoint) -> impl Future<Output = Result<TunnelStream>> + Send;

    /// Turns a freshly accepted TCP connection into a tunnel connection (the server side of
    /// the upgrade, if any).
    fn accept(&self, tcp: TcpStream) -> impl Future<Output = Result<TunnelStream>> + Send;
}

/// Plain TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tcp {
    dead_peer: DeadPeer,
}

/// WebSocket over TCP: binary messages, no per-message compression.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebSocket {
    dead_peer: DeadPeer,
}

/// TLS over TCP (`tls://`) or, with `websocket`, WebSocket over TLS (`wss://`), for one end
/// of the connection: a client's settings connect, a server's accept.
#[derive(Debug, Clone)]
pub struct Tls {
    websocket: bool,
    role: Option<TlsRole>,
    dead_peer: DeadPeer,
}

#[derive(Debug, Clone)]
enum TlsRole {
    Client(ClientTls),
    Server(ServerTls),
}

impl Tls {
    /// The client end: connects and checks the server as `settings` say.
    pub fn client(websocket: bool, settings: ClientTls) -> Self {
        Tls {
            websocket,
            role: Some(TlsRole::Client(settings)),
            dead_peer: DeadPeer::default(),
        }
    }

    /// The server end: accepts with the certificate in `settings`.
    pub fn server(websocket: bool, settings: ServerTls) -> Self {
        Tls {
            websocket,
            role: Some(TlsRole::Server(settings)),
            dead_peer: DeadPeer::default(),
        }
    }
}

/// Any transport, chosen at run time from an address.
#[derive(Debug, Clone)]
pub enum AnyTransport {
    /// Plain TCP.
    Tcp(Tcp),
    /// WebSocket.
    Ws(WebSocket),
    /// TLS, or WebSocket over TLS.
    Tls(Tls),
}

impl AnyTransport {
    /// The transport for a scheme. `tls://` and `wss://` need settings: this gives a transport
    /// that refuses to connect or accept; use [`AnyTransport::client`] or
    /// [`AnyTransport::server`].
    pub fn for_scheme(scheme: Scheme) -> Self {
        match scheme {
            Scheme::Tcp => AnyTransport::Tcp(Tcp::default()),
            Scheme::Ws => AnyTransport::Ws(WebSocket::default()),
            Scheme::Tls | Scheme::Wss => AnyTransport::Tls(Tls {
                websocket: scheme == Scheme::Wss,
                role: None,
                dead_peer: DeadPeer::default(),
            }),
        }
    }

    /// The same transport, noticing dead peers as `dead_peer` says (default:
    /// [`crate::keepalive::DEFAULT_DEAD_PEER_TIMEOUT`]) on every socket it opens or accepts.
    pub fn with_dead_peer(mut self, dead_peer: DeadPeer) -> Self {
        match &mut self {
            AnyTransport::Tcp(t) => t.dead_peer = dead_peer,
            AnyTransport::Ws(t) => t.dead_peer = dead_peer,
            AnyTransport::Tls(t) => t.dead_peer = dead_peer,
        }
        self
    }

    /// A client's transport for `scheme`: TLS settings exactly when the scheme is TLS.
    pub fn client(scheme: Scheme, tls: Option<&ClientTls>) -> Result<Self> {
        match (scheme.is_tls(), tls) {
            (true, Some(tls)) => Ok(AnyTransport::Tls(Tls::client(
                scheme == Scheme::Wss,
                tls.clone(),
            ))),
            (false, None) => Ok(Self::for_scheme(scheme)),
            (true, None) => Err(TlsError::Mismatch(Mismatch::ClientWithoutSettings).into()),
            (false, Some(_)) => Err(TlsError::Mismatch(Mismatch::ClientWithoutTls).into()),
        }
    }

    /// A server's transport for `scheme`: TLS settings exactly when the scheme is TLS.
    pub fn server(scheme: Scheme, tls: Option<&ServerTls>) -> Result<Self> {
        match (scheme.is_tls(), tls) {
            (true, Some(tls)) => Ok(AnyTransport::Tls(Tls::server(
                scheme == Scheme::Wss,
                tls.clone(),
            ))),
            (false, None) => Ok(Self::for_scheme(scheme)),
            (true, None) => Err(TlsError::Mismatch(Mismatch::ServerWithoutSettings).into()),
            (false, Some(_)) => Err(TlsError::Mismatch(Mismatch::ServerWithoutTls).into()),
        }
    }
}

/// Socket options for every transport: migration streams are bulk data, but the handshake
/// and QEMU's return path are small messages that must not wait for Nagle; and a peer that
/// vanished without a word is noticed ([`DeadPeer`]).
fn tune(tcp: &TcpStream, dead_peer: &DeadPeer) -> Result<()> {
    tcp.set_nodelay(true)?;
    dead_peer.apply(tcp)?;
    Ok(())
}

async fn tcp_connect(to: &Endpoint, dead_peer: &DeadPeer) -> Result<TcpStream> {
    let tcp = TcpStream::connect(to.authority())
        .await
        .map_err(|source| Error::Connect {
            url: to.to_string(),
            source,
        })?;
    tune(&tcp, dead_peer)?;
    Ok(tcp)
}

impl Transport for Tcp {
    fn scheme(&self) -> Scheme {
        Scheme::Tcp
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        Ok(TunnelStream::Tcp(tcp_connect(to, &self.dead_peer).await?))
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        tune(&tcp, &self.dead_peer)?;
        Ok(TunnelStream::Tcp(tcp))
    }
}

impl Transport for WebSocket {
    fn scheme(&self) -> Scheme {
        Scheme::Ws
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        let tcp = tcp_connect(to, &self.dead_peer).await?;
        let ws = ws_connect(to, tcp).await?;
        Ok(TunnelStream::Ws(Box::new(
            ws.with_dead_peer(self.dead_peer.timeout),
        )))
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        tune(&tcp, &self.dead_peer)?;
        let ws = ws_accept(tcp).await?;
        Ok(TunnelStream::Ws(Box::new(
            ws.with_dead_peer(self.dead_peer.timeout),
        )))
    }
}

impl Transport for Tls {
    fn scheme(&self) -> Scheme {
        if self.websocket {
            Scheme::Wss
        } else {
            Scheme::Tls
        }
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        let Some(TlsRole::Client(settings)) = &self.role else {
            return Err(TlsError::Mismatch(Mismatch::NotAClient).into());
        };
        let tcp = tcp_connect(to, &self.dead_peer).await?;
        let tls = tls::connect(settings, to, tcp).await?;
        if self.websocket {
            let ws = ws_connect(to, tls).await?;
            Ok(TunnelStream::Wss(Box::new(
                ws.with_dead_peer(self.dead_peer.timeout),
            )))
        } else {
            Ok(TunnelStream::Tls(Box::new(tls)))
        }
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        let Some(TlsRole::Server(settings)) = &self.role else {
            return Err(TlsError::Mismatch(Mismatch::NotAServer).into());
        };
        tune(&tcp, &self.dead_peer)?;
        let tls = tls::accept(settings, tcp).await?;
        if self.websocket {
            let ws = ws_accept(tls).await?;
            Ok(TunnelStream::Wss(Box::new(
                ws.with_dead_peer(self.dead_peer.timeout),
            )))
        } else {
            Ok(TunnelStream::Tls(Box::new(tls)))
        }
    }
}

impl Transport for AnyTransport {
    fn scheme(&self) -> Scheme {
        match self {
            AnyTransport::Tcp(t) => t.scheme(),
            AnyTransport::Ws(t) => t.scheme(),
            AnyTransport::Tls(t) => t.scheme(),
        }
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        match self {
            AnyTransport::Tcp(t) => t.connect(to).await,
            AnyTransport::Ws(t) => t.connect(to).await,
            AnyTransport::Tls(t) => t.connect(to).await,
        }
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        match self {
            AnyTransport::Tcp(t) => t.accept(tcp).await,
            AnyTransport::Ws(t) => t.accept(tcp).await,
            AnyTransport::Tls(t) => t.accept(tcp).await,
        }
    }
}
