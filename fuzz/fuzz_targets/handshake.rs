//! A tunnel peer's first bytes, as the server and the client read them: envelopes (magic,
//! length, JSON) carrying a hello, an auth, a reply or control messages, and the nonces and
//! proofs inside them. Any bytes must give messages or errors, and no body larger than the
//! envelope limit may be asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmigrate_migration::session::Control;
use qmigrate_transport::auth::{self, Token};
use qmigrate_transport::protocol::{self, Auth, Hello, Reply, MAX_HANDSHAKE_LEN};

/// Messages read off one TCP connection before the fuzzer's bytes are used up.
const MAX_MESSAGES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let token = Token::new("fuzzing token, long enough", "fuzz").expect("a valid token");
    let nonce = [7u8; auth::NONCE_LEN];

    // TCP and TLS: the envelopes one after the other, read by the connection's own reader.
    for body in qmigrate_transport::fuzzing::recv_bodies(data, MAX_MESSAGES) {
        match body {
            Ok(body) => {
                assert!(
                    body.len() <= MAX_HANDSHAKE_LEN as usize,
                    "read {} bytes",
                    body.len()
                );
                messages(&body, &token, &nonce);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }

    // WebSocket: the whole input is one binary message holding one envelope.
    match protocol::unwrap_envelope(data) {
        Ok(body) => {
            assert!(body.len() <= MAX_HANDSHAKE_LEN as usize);
            messages(body, &token, &nonce);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = protocol::decode::<Hello>(data).map_err(|e| e.to_string());
});

/// Decodes `body` as each message a peer may send, and checks what a server or client would.
fn messages(body: &[u8], token: &Token, nonce: &auth::Nonce) {
    // Server: the hello, then the answer to its challenge.
    if let Ok(hello) = protocol::decode_body::<Hello>(body) {
        let _ = protocol::negotiate(hello.min_version, hello.max_version);
        if let Some(n) = &hello.nonce {
            let _ = auth::parse_nonce(n);
        }
    }
    if let Ok(Auth { mac: Some(mac) }) = protocol::decode_body::<Auth>(body) {
        let _ = token.check_client_proof(nonce, body, &mac);
    }
    // Client: the server's challenge, accept or reject.
    match protocol::decode_body::<Reply>(body) {
        Ok(Reply::Challenge { nonce: n }) => {
            if let Some(n) = auth::parse_nonce(&n) {
                let _ = token.client_proof(&n, body);
            }
        }
        Ok(Reply::Accept { mac: Some(mac), .. }) => {
            let _ = token.check_server_proof(nonce, body, &mac);
        }
        Ok(Reply::Reject { reason, .. }) => {
            let _ = reason.to_string();
        }
        Ok(_) => {}
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // Both ends of a control connection.
    let _ = protocol::decode_body::<Control>(body).map(|c| format!("{c:?}"));
}
