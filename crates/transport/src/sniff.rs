//! What a peer speaks, judged from its first bytes, and what a server answers a client that
//! speaks the wrong protocol: a plain server names what a non-qmigrate peer sent
//! ([`Sniffed`]), and a TLS server tells a plain qmigrate client, in the client's own
//! protocol, to use TLS ([`PlainClient`]), since it cannot read a TLS alert.
//!
//! No I/O, and nothing from the rest of the crate: the tunnel protocol's magic is passed in,
//! so that `protocol.rs` can name what it sniffed in its errors.

use std::fmt;

/// What a peer that did not send the tunnel protocol's magic seems to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// An HTTP request or response: a WebSocket client at a plain TCP server, say.
    Http,
    /// A TLS handshake: a TLS client at a server without TLS.
    Tls,
    /// A raw QEMU migration stream: QEMU pointed at the server instead of the client.
    QemuMigration,
    /// An SSH client or server.
    Ssh,
    /// A WebSocket text message where the handshake's binary message belongs.
    WebSocketText,
    /// Nothing we recognise.
    Unknown,
}

impl Sniffed {
    /// A guess from the first bytes of a connection.
    pub fn of(first: &[u8]) -> Sniffed {
        const HTTP: [&[u8]; 6] = [b"GET ", b"POST", b"PUT ", b"HEAD", b"OPTI", b"HTTP"];
        if HTTP.iter().any(|m| first.starts_with(m)) {
            Sniffed::Http
        } else if first.first() == Some(&TLS_HANDSHAKE) {
            Sniffed::Tls
        } else if first.starts_with(b"QEVM") {
            Sniffed::QemuMigration
        } else if first.starts_with(b"SSH-") {
            Sniffed::Ssh
        } else {
            Sniffed::Unknown
        }
    }
}

impl fmt::Display for Sniffed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sniffed::Http => "it sent HTTP",
            Sniffed::Tls => "it sent a TLS handshake: this server does not use TLS",
            Sniffed::QemuMigration => "it sent a raw QEMU migration stream",
            Sniffed::Ssh => "it sent SSH",
            Sniffed::WebSocketText => "it sent a WebSocket text message",
            Sniffed::Unknown => "unknown bytes",
        })
    }
}

/// The first byte of a TLS handshake record.
pub(crate) const TLS_HANDSHAKE: u8 = 0x16;

/// What a client that does not speak TLS sent a TLS server, and so what it was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainClient {
    /// A plain `tcp://` qmigrate client: it was told, in the tunnel protocol, to use `tls://`.
    Tunnel,
    /// Plain HTTP, a `ws://` client most likely: it was told, in HTTP, to use `wss://`.
    Http,
    /// Neither TLS nor anything qmigrate speaks: it was told nothing.
    Unknown,
}

impl PlainClient {
    /// Classifies the first bytes of a client that did not start a TLS handshake; `magic` is
    /// the tunnel protocol's (`protocol::MAGIC`).
    pub(crate) fn of(first: &[u8], magic: &[u8]) -> PlainClient {
        if magic.starts_with(first) || first.starts_with(magic) {
            PlainClient::Tunnel
        } else if looks_like_http(first) {
            PlainClient::Http
        } else {
            PlainClient::Unknown
        }
    }

    /// The explanation a TLS server gives this client: for [`PlainClient::Tunnel`] the
    /// message of a `Reject`, for [`PlainClient::Http`] the body of an HTTP 400.
    pub(crate) fn told(self) -> Option<&'static str> {
        match self {
            PlainClient::Tunnel => Some(
                "this tunnel-server speaks TLS: connect with tls://HOST:PORT, checking its \
                 certificate",
            ),
            PlainClient::Http => {
                Some("this tunnel-server speaks TLS: connect with wss://HOST:PORT/PATH\n")
            }
            PlainClient::Unknown => None,
        }
    }
}

impl fmt::Display for PlainClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlainClient::Tunnel => "a plain tcp:// client: it was told to use tls://",
            PlainClient::Http => "plain HTTP (a ws:// client?): it was told to use wss://",
            PlainClient::Unknown => "bytes that are neither TLS nor qmigrate",
        })
    }
}

/// An HTTP 400 response with `body` as plain text, closing the connection.
pub(crate) fn http_refusal(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Whether the first bytes are an HTTP request line's start: a method (`GET`), then a space.
fn looks_like_http(first: &[u8]) -> bool {
    let method = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    (3..first.len()).contains(&method) && first[method] == b' '
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_are_named() {
        assert_eq!(Sniffed::of(b"GET / HTTP/1"), Sniffed::Http);
        assert_eq!(Sniffed::of(b"\x16\x03\x01\x02"), Sniffed::Tls);
        assert_eq!(Sniffed::of(b"QEVM\0\0\0\x03"), Sniffed::QemuMigration);
        assert_eq!(Sniffed::of(b"SSH-2.0-"), Sniffed::Ssh);
        assert_eq!(Sniffed::of(b"\0\0"), Sniffed::Unknown);
        let magic = b"QMTUNL\r\n";
        assert_eq!(PlainClient::of(b"QMT", magic), PlainClient::Tunnel);
        assert_eq!(
            PlainClient::of(b"QMTUNL\r\n\0\0", magic),
            PlainClient::Tunnel
        );
        assert_eq!(PlainClient::of(b"GET / HT", magic), PlainClient::Http);
        assert_eq!(PlainClient::of(b"GE", magic), PlainClient::Unknown);
        assert_eq!(PlainClient::of(b"\x01\x02", magic), PlainClient::Unknown);
    }
}
