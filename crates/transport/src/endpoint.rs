//! Tunnel addresses: `HOST:PORT`, `tcp://HOST:PORT`, `ws://HOST:PORT/PATH`, and the same over
//! TLS: `tls://HOST:PORT`, `wss://HOST:PORT/PATH`.

use std::fmt;
use std::net::SocketAddr;

use crate::error::{Error, Result};

/// The transport a tunnel address names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain TCP with qmigrate framing.
    Tcp,
    /// WebSocket (binary messages) over TCP.
    Ws,
    /// TLS over TCP, with qmigrate framing inside.
    Tls,
    /// WebSocket over TLS.
    Wss,
}

impl Scheme {
    /// The default port operators know from the old scripts: 9999 for TCP (with or without
    /// TLS), 8765 for WebSocket (with or without TLS).
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Tcp | Scheme::Tls => 9999,
            Scheme::Ws | Scheme::Wss => 8765,
        }
    }

    /// Whether the connection runs over TLS (`tls://`, `wss://`).
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Tls | Scheme::Wss)
    }

    /// Whether the connection is a WebSocket (`ws://`, `wss://`).
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }

    /// This scheme with TLS (`tcp` becomes `tls`, `ws` becomes `wss`).
    pub fn with_tls(self) -> Scheme {
        if self.is_websocket() {
            Scheme::Wss
        } else {
            Scheme::Tls
        }
    }

    /// The URL scheme: `tcp`, `ws`, `tls` or `wss`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Ws => "ws",
            Scheme::Tls => "tls",
            Scheme::Wss => "wss",
        }
    }
}

/// Where a tunnel server listens or a tunnel client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// TCP or WebSocket, with or without TLS.
    pub scheme: Scheme,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port (0 when listening: any free port).
    pub port: u16,
    /// The path, always starting with `/`: the WebSocket request path, and for both schemes
    /// the route ([`Endpoint::route`]).
    pub path: String,
}

impl Endpoint {
    /// Parses an address. A scheme in the address wins over `default`; without one, `HOST:PORT`
    /// (or just `HOST`, taking the scheme's default port) uses `default`.
    pub fn parse(addr: &str, default: Scheme) -> Result<Endpoint> {
        let bad = |why: &str| Error::InvalidAddress {
            addr: addr.to_owned(),
            why: why.to_owned(),
        };
        let (scheme, rest) = match addr.split_once("://") {
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("ws", rest)) => (Scheme::Ws, rest),
            Some(("tls", rest)) => (Scheme::Tls, rest),
            Some(("wss", rest)) => (Scheme::Wss, rest),
            Some((other, _)) => {
                return Err(bad(&format!(
                    "unknown scheme {other:?}: use tcp://HOST:PORT, ws://HOST:PORT/PATH, or \
                     with TLS tls://HOST:PORT or wss://HOST:PORT/PATH"
                )))
            }
            None => (default, addr),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("expected HOST:PORT"))?;
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number 0-65535"))?,
            None => scheme.default_port(),
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        Ok(Endpoint {
            scheme,
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The same endpoint at the address a listener actually bound (port 0 resolved).
    pub fn with_bound(&self, addr: SocketAddr) -> Endpoint {
        Endpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            ..self.clone()
        }
    }

    /// `HOST:PORT` with IPv6 brackets, as `TcpListener::bind` and `connect` take it.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    /// The route named by the path (`ws://dest:8765/vm1`, `tcp://dest:9999/vm1` and their TLS
    /// forms name `vm1`); `None` for `/`, the server's only destination.
    pub fn route(&self) -> Option<String> {
        let name = self.path.trim_matches('/');
        (!name.is_empty()).then(|| name.to_owned())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.scheme.name();
        // The path of a TCP address only names a route: `/` is left out.
        if !self.scheme.is_websocket() && self.path == "/" {
            write!(f, "{scheme}://{}", self.authority())
        } else {
            write!(f, "{scheme}://{}{}", self.authority(), self.path)
        }
    }
}

/// Splits `host:port`, `[v6]:port`, `host` or `[v6]`.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    match s.rsplit_once(':') {
        // A bare IPv6 address without brackets has more than one colon.
        Some((h, _)) if h.contains(':') => Some((s, None)),
        Some((h, p)) => Some((h, Some(p))),
        None => Some((s, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_accepted_forms() {
        let e = Endpoint::parse("10.0.0.2:9999", Scheme::Tcp).expect("plain");
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Tcp, "10.0.0.2", 9999)
        );
        assert_eq!(e.to_string(), "tcp://10.0.0.2:9999");

        let e = Endpoint::parse("ws://dest:8765/vm1", Scheme::Tcp).expect("ws url");
        assert_eq!(
            (e.scheme, e.port, e.path.as_str()),
            (Scheme::Ws, 8765, "/vm1")
        );
        assert_eq!(e.to_string(), "ws://dest:8765/vm1");

        let e = Endpoint::parse("dest", Scheme::Ws).expect("host only");
        assert_eq!((e.port, e.path.as_str()), (8765, "/"));

        let e = Endpoint::parse("tcp://[::1]:0", Scheme::Ws).expect("v6");
        assert_eq!((e.scheme, e.host.as_str(), e.port), (Scheme::Tcp, "::1", 0));
        assert_eq!(e.authority(), "[::1]:0");

        let e = Endpoint::parse("tls://dest:1234", Scheme::Ws).expect("tls url");
        assert_eq!(
            (e.scheme, e.port, e.path.as_str()),
            (Scheme::Tls, 1234, "/")
        );
        assert_eq!(e.to_string(), "tls://dest:1234");
        let e = Endpoint::parse("tls://dest/vm1", Scheme::Tcp).expect("tls default port");
        assert_eq!((e.port, e.route().as_deref()), (9999, Some("vm1")));
        assert_eq!(e.to_string(), "tls://dest:9999/vm1");

        let e = Endpoint::parse("wss://[::1]/vm2", Scheme::Tcp).expect("wss url");
        assert_eq!(
            (e.scheme, e.port, e.path.as_str()),
            (Scheme::Wss, 8765, "/vm2")
        );
        assert_eq!(e.to_string(), "wss://[::1]:8765/vm2");
        let e = Endpoint::parse("dest:1", Scheme::Wss).expect("wss default");
        assert_eq!(e.to_string(), "wss://dest:1/");
        assert!(e.scheme.is_tls() && e.scheme.is_websocket());
        assert_eq!(Scheme::Tcp.with_tls(), Scheme::Tls);
        assert_eq!(Scheme::Ws.with_tls(), Scheme::Wss);
    }

    #[test]
    fn rejects_nonsense_with_a_reason() {
        for (addr, why) in [
            ("http://x:1", "unknown scheme"),
            ("x:port", "not a number"),
            ("x:70000", "not a number"),
            (":9999", "empty"),
            ("https://x:1/", "wss://HOST:PORT/PATH"),
        ] {
            let err = Endpoint::parse(addr, Scheme::Tcp)
                .expect_err(addr)
                .to_string();
            assert!(err.contains(why), "{addr}: {err}");
        }
    }

    #[test]
    fn the_path_names_the_route() {
        let e = Endpoint::parse("tcp://dest:1/vm1", Scheme::Tcp).expect("tcp route");
        assert_eq!(e.route().as_deref(), Some("vm1"));
        assert_eq!(e.to_string(), "tcp://dest:1/vm1");
        let e = Endpoint::parse("ws://dest:1/vm2/", Scheme::Tcp).expect("ws route");
        assert_eq!(e.route().as_deref(), Some("vm2"));
        assert_eq!(
            Endpoint::parse("dest:1", Scheme::Ws)
                .expect("plain")
                .route(),
            None
        );
    }
}
