//! The [`Transport`] trait and its TCP and WebSocket implementations.
//!
//! Both transports listen on and connect over TCP; they differ in what happens on a fresh
//! socket (nothing, or the WebSocket upgrade) and in the data framing, which lives in
//! [`TunnelStream`]. The server accepts TCP connections itself and hands each to
//! [`Transport::accept`] in its own task, so a slow or hostile upgrade never blocks the
//! accept loop.

use std::future::Future;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::endpoint::{Endpoint, Scheme};
use crate::error::{Error, Result};
use crate::protocol::MAX_FRAME;
use crate::stream::TunnelStream;

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
pub struct Tcp;

/// WebSocket over TCP: binary messages, no per-message compression.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebSocket;

/// Either transport, chosen at run time from an address.
#[derive(Debug, Clone, Copy)]
pub enum AnyTransport {
    /// Plain TCP.
    Tcp(Tcp),
    /// WebSocket.
    Ws(WebSocket),
}

impl AnyTransport {
    /// The transport for a scheme.
    pub fn for_scheme(scheme: Scheme) -> Self {
        match scheme {
            Scheme::Tcp => AnyTransport::Tcp(Tcp),
            Scheme::Ws => AnyTransport::Ws(WebSocket),
        }
    }
}

/// Socket options for both transports: migration streams are bulk data, but the handshake
/// and QEMU's return path are small messages that must not wait for Nagle.
fn tune(tcp: &TcpStream) -> Result<()> {
    tcp.set_nodelay(true)?;
    Ok(())
}

async fn tcp_connect(to: &Endpoint) -> Result<TcpStream> {
    let tcp = TcpStream::connect(to.authority())
        .await
        .map_err(|source| Error::Connect {
            url: to.to_string(),
            source,
        })?;
    tune(&tcp)?;
    Ok(tcp)
}

impl Transport for Tcp {
    fn scheme(&self) -> Scheme {
        Scheme::Tcp
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        Ok(TunnelStream::Tcp(tcp_connect(to).await?))
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        tune(&tcp)?;
        Ok(TunnelStream::Tcp(tcp))
    }
}

/// Limits for WebSocket peers: our messages are at most 64 KiB, so anything above 1 MiB is
/// not a qmigrate peer and is refused before it is buffered.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        // tungstenite zero-fills up to this many bytes before every read attempt, also the
        // ones that find the socket empty; measured with `qmigrate-bench relay`, 16 KiB cut
        // the receiving relay's CPU per GB by a quarter against 256 KiB and was the fastest.
        .read_buffer_size(16 * 1024)
        .max_message_size(Some(MAX_FRAME))
        .max_frame_size(Some(MAX_FRAME))
}

impl Transport for WebSocket {
    fn scheme(&self) -> Scheme {
        Scheme::Ws
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        let tcp = tcp_connect(to).await?;
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(to.to_string(), tcp, Some(ws_config()))
                .await
                .map_err(|e| Error::WebSocketHandshake(Box::new(e)))?;
        Ok(TunnelStream::Ws(Box::new(ws)))
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        tune(&tcp)?;
        // The callback's error type is tungstenite's HTTP response, large by its design.
        #[allow(clippy::result_large_err)]
        let check = |req: &Request, resp: Response| {
            tracing::debug!(path = %req.uri().path(), "WebSocket upgrade");
            Ok(resp)
        };
        let ws = tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(ws_config()))
            .await
            .map_err(|e| Error::WebSocketHandshake(Box::new(e)))?;
        Ok(TunnelStream::Ws(Box::new(ws)))
    }
}

impl Transport for AnyTransport {
    fn scheme(&self) -> Scheme {
        match self {
            AnyTransport::Tcp(t) => t.scheme(),
            AnyTransport::Ws(t) => t.scheme(),
        }
    }

    async fn connect(&self, to: &Endpoint) -> Result<TunnelStream> {
        match self {
            AnyTransport::Tcp(t) => t.connect(to).await,
            AnyTransport::Ws(t) => t.connect(to).await,
        }
    }

    async fn accept(&self, tcp: TcpStream) -> Result<TunnelStream> {
        match self {
            AnyTransport::Tcp(t) => t.accept(tcp).await,
            AnyTransport::Ws(t) => t.accept(tcp).await,
        }
    }
}
