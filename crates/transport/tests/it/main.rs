//! `qmigrate-transport`'s integration tests, one test binary: the tunnel's data path over every
//! scheme, authentication, TLS, and WebSocket interoperability with tokio-tungstenite, all on
//! the in-process fixtures of `common`.

mod common;

mod auth;
mod heartbeat;
mod nbd;
mod tls;
mod tunnel;
mod ws_interop;
