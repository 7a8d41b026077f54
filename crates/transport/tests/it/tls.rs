//! TLS (`tls://`) and WebSocket over TLS (`wss://`): the server checked against a CA or a
//! pinned fingerprint, mutual TLS, and every way a TLS connection is refused: a wrong CA, a
//! wrong fingerprint, a plain client at a TLS server, a TLS client at a plain server, a
//! missing or foreign client certificate. A refused connection never reaches the destination
//! socket, and the server goes on serving. Certificates are made at test time (rcgen); no key
//! is kept in the repository. The data path over TLS (half-close, killed peers, order of
//! connections) runs in tunnel.rs (`tunnel::tls::*`, `tunnel::wss::*`).

use crate::common;

use std::time::Duration;

use common::*;
use qmigrate_testkit::per_scheme;
use qmigrate_transport::{
    open_data, ClientConfig, ClientTls, Endpoint, Error, Fingerprint, Scheme, Server, ServerCheck,
    ServerConfig, ServerTls, Token,
};
use tokio::net::UnixListener;

/// Limit for a whole test, on top of the limit on each step.
const TEST: Duration = Duration::from_secs(60);

per_scheme!(
    tls = Scheme::Tls, wss = Scheme::Wss; within TEST;
    ca_verified_transfer_is_byte_exact,
    self_signed_pair_as_its_own_ca,
    pinned_fingerprint_transfer_is_byte_exact,
    wrong_ca_is_refused,
    wrong_fingerprint_is_refused,
    plain_client_at_a_tls_server_is_told_to_use_tls,
    tls_client_at_a_plain_server_is_told_it_does_not_speak_tls,
    mutual_tls_with_and_without_a_client_certificate,
    token_and_tls_together,
);

/// One connection through `t`'s client: `up` bytes to the destination while `down` come back,
/// both byte for byte.
async fn exchange(t: &Tunnel, dest: &UnixListener, up: u64, down: u64, what: &str) {
    let source = t.source_connect().await;
    let (at_source, at_dest) = within(STEP, &format!("{what}: the transfer"), async {
        tokio::join!(
            duplex(source, Pattern::new(11), up, Pattern::new(12)),
            async { duplex(accept(dest).await, Pattern::new(12), down, Pattern::new(11)).await },
        )
    })
    .await;
    at_dest.assert_exact(up, &format!("{what}: at the destination"));
    at_source.assert_exact(down, &format!("{what}: at the source"));
}

/// A tunnel with the given TLS settings that carries 24 MiB up and 3 MiB down on each of
/// three connections (the later ones resume the first one's TLS session), then stops cleanly.
async fn transfer_with(scheme: Scheme, server: ServerTls, client: ClientTls, what: &str) {
    let mut t = Tunnel::start(
        scheme,
        Opts {
            once: false,
            server_tls: Some(server),
            client_tls: Some(client),
            ..Opts::default()
        },
    )
    .await;
    assert_eq!(t.url.scheme, scheme);
    let dest = t.dest_listener();
    let (up, down) = ((24 << 20) + 5, (3 << 20) + 7);
    for i in 0..3 {
        exchange(&t, &dest, up, down, &format!("{what} #{i}")).await;
    }
    tokio::time::sleep(QUIET).await;
    let (server, client) = t.stop().await;
    assert_eq!(
        (server.connections, server.failed, server.from_tunnel),
        (3, 0, 3 * up),
        "{what}: server report {server}"
    );
    assert_eq!(
        (client.connections, client.failed, client.from_tunnel),
        (3, 0, 3 * down),
        "{what}: client report {client}"
    );
}

async fn ca_verified_transfer_is_byte_exact(scheme: Scheme) {
    let ca = Ca::new("server");
    let cert = ca.issue(&["127.0.0.1"]);
    // The server reads its certificate and key from PEM files, as tunnel-server does.
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, &cert.cert_pem).expect("write cert");
    std::fs::write(&key_path, &cert.key_pem).expect("write key");
    let server = ServerTls::from_pem_files(&cert_path, &key_path, None).expect("PEM files");
    assert_eq!(server.fingerprint(), Fingerprint::of(&cert.cert));
    assert!(!server.requires_client_certificates());
    let client = client_tls(ServerCheck::Ca(vec![ca.der()]), None);
    transfer_with(scheme, server, client, "CA-verified").await;
}

/// The README's one-command pair (`openssl req -x509`, CA:TRUE) given to the client as its
/// CA file: trusted as itself, with its name still checked.
async fn self_signed_pair_as_its_own_ca(scheme: Scheme) {
    let cert = Ca::self_signed_ca(&["127.0.0.1"]);
    let server = server_tls(&cert, None);
    let client = client_tls(ServerCheck::Ca(vec![cert.cert.clone()]), None);
    let (t, dest) = tunnel(scheme, server, client).await;

    let elsewhere = Ca::self_signed_ca(&["dest.example"]);
    let (t2, dest2) = tunnel(
        scheme,
        server_tls(&elsewhere, None),
        client_tls(ServerCheck::Ca(vec![elsewhere.cert.clone()]), None),
    )
    .await;
    let err = refused(
        &t2.url,
        Some(client_tls(
            ServerCheck::Ca(vec![elsewhere.cert.clone()]),
            None,
        )),
        None,
        "a self-signed pair for another name",
    )
    .await;
    assert!(err.to_string().contains("dest.example"), "{err}");
    assert_no_connection(&dest2, "a self-signed pair for another name").await;
    drop(t2);
    still_serves(t, &dest, "a self-signed pair for another name").await;
}

async fn pinned_fingerprint_transfer_is_byte_exact(scheme: Scheme) {
    // Self-signed, and for another name than the address connected to: a pin checks the
    // certificate itself, not its name.
    let cert = Issued::self_signed(&["dest.example"]);
    let server = server_tls(&cert, None);
    // As an operator would copy it from `openssl x509 -noout -fingerprint -sha256`.
    let openssl_style = format!(
        "SHA256 Fingerprint={}",
        server
            .fingerprint()
            .to_string()
            .trim_start_matches("sha256:")
    );
    let pin = Fingerprint::parse(&openssl_style).expect("openssl's format");
    let client = client_tls(ServerCheck::Fingerprint(pin), None);
    transfer_with(scheme, server, client, "pinned").await;
}

/// A server on `scheme` with `server`'s settings and the client settings of a good client;
/// returns the tunnel (whose client is good) and its destination listener.
async fn tunnel(scheme: Scheme, server: ServerTls, good: ClientTls) -> (Tunnel, UnixListener) {
    let t = Tunnel::start(
        scheme,
        Opts {
            once: false,
            server_tls: Some(server),
            client_tls: Some(good),
            ..Opts::default()
        },
    )
    .await;
    let dest = t.dest_listener();
    (t, dest)
}

/// Opens one data connection to `url` as a separate client would and returns its error.
async fn refused(
    url: &Endpoint,
    tls: Option<ClientTls>,
    token: Option<Token>,
    what: &str,
) -> Error {
    let config = ClientConfig {
        tls,
        token,
        connect_timeout: STEP,
        reply_timeout: STEP,
        ..ClientConfig::new(url.clone())
    };
    match within(STEP, what, open_data(&config, "00000000000000aa", 0)).await {
        Ok(_) => panic!("{what}: the connection was accepted"),
        Err(e) => {
            eprintln!("{what}: {e}");
            e
        }
    }
}

/// After refused connections: nothing reached the destination, and a good client still gets
/// its data through the same server.
async fn still_serves(mut t: Tunnel, dest: &UnixListener, what: &str) {
    assert_no_connection(dest, what).await;
    assert!(t.server_running(), "the server stopped after {what}");
    exchange(&t, dest, 1 << 20, 4096, &format!("after {what}")).await;
    tokio::time::sleep(QUIET).await;
    let (server, _) = t.stop().await;
    assert_eq!(
        (server.connections, server.failed),
        (1, 0),
        "{what}: only the good connection counts: {server}"
    );
}

async fn wrong_ca_is_refused(scheme: Scheme) {
    let ca = Ca::new("right");
    let server = server_tls(&ca.issue(&["127.0.0.1"]), None);
    let good = client_tls(ServerCheck::Ca(vec![ca.der()]), None);
    let (t, dest) = tunnel(scheme, server, good).await;

    let other = Ca::new("wrong");
    let wrong = client_tls(ServerCheck::Ca(vec![other.der()]), None);
    let err = refused(&t.url, Some(wrong), None, "a client trusting another CA").await;
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Tls(qmigrate_transport::tls::TlsFailure::Certificate {
                of: qmigrate_transport::tls::Peer::Server,
                problem: qmigrate_transport::tls::CertProblem::UnknownCa,
            })
        ) && msg.contains("certificate verification failed"),
        "{msg}"
    );
    assert!(msg.contains("not signed by a trusted CA"), "{msg}");

    // The right CA, but a certificate for another name than the address.
    let elsewhere = Ca::new("names");
    let server = server_tls(&elsewhere.issue(&["dest.example"]), None);
    let (t2, dest2) = tunnel(
        scheme,
        server,
        client_tls(ServerCheck::Ca(vec![elsewhere.der()]), None),
    )
    .await;
    let err = refused(
        &t2.url,
        Some(client_tls(ServerCheck::Ca(vec![elsewhere.der()]), None)),
        None,
        "a certificate for another name",
    )
    .await;
    assert!(
        err.to_string().contains("certificate verification failed"),
        "{err}"
    );
    assert_no_connection(&dest2, "a certificate for another name").await;
    drop(t2);

    still_serves(t, &dest, "a client with the wrong CA").await;
}

async fn wrong_fingerprint_is_refused(scheme: Scheme) {
    let cert = Issued::self_signed(&["127.0.0.1"]);
    let server = server_tls(&cert, None);
    let good = client_tls(ServerCheck::Fingerprint(server.fingerprint()), None);
    let (t, dest) = tunnel(scheme, server.clone(), good).await;

    let another = Fingerprint::of(&Issued::self_signed(&["127.0.0.1"]).cert);
    let pinned = client_tls(ServerCheck::Fingerprint(another), None);
    let err = refused(
        &t.url,
        Some(pinned),
        None,
        "a client pinning another certificate",
    )
    .await;
    let msg = err.to_string();
    assert!(msg.contains("certificate verification failed"), "{msg}");
    assert!(
        msg.contains(&format!("not the pinned {another}"))
            && msg.contains(&server.fingerprint().to_string()),
        "names both fingerprints: {msg}"
    );
    // The system's CAs know nothing of a self-signed certificate.
    if let Ok(system) = ClientTls::new(ServerCheck::SystemRoots, None) {
        let err = refused(&t.url, Some(system), None, "a client with the system CAs").await;
        assert!(
            err.to_string().contains("certificate verification failed"),
            "{err}"
        );
    }
    still_serves(t, &dest, "a client pinning the wrong certificate").await;
}

async fn plain_client_at_a_tls_server_is_told_to_use_tls(scheme: Scheme) {
    let (server, good) = test_tls();
    let (t, dest) = tunnel(scheme, server, good).await;
    let plain = Endpoint {
        scheme: if scheme.is_websocket() {
            Scheme::Ws
        } else {
            Scheme::Tcp
        },
        ..t.url.clone()
    };
    let err = refused(&plain, None, None, "a plain client").await;
    let msg = err.to_string();
    match scheme {
        Scheme::Tls => assert!(
            matches!(err, Error::Rejected { .. }) && msg.contains("tls://"),
            "a tcp:// client gets a reject telling it to use tls://: {msg}"
        ),
        _ => assert!(
            matches!(err, Error::WebSocketRefused { .. }) && msg.contains("wss://"),
            "a ws:// client gets an HTTP error telling it to use wss://: {msg}"
        ),
    }
    // The other plain transport too, as an operator who mixed up the URLs would run it.
    let crossed = Endpoint {
        scheme: if scheme.is_websocket() {
            Scheme::Tcp
        } else {
            Scheme::Ws
        },
        ..t.url.clone()
    };
    let err = refused(&crossed, None, None, "the other plain client").await;
    assert!(
        err.to_string().contains("TLS") || err.to_string().contains("tls"),
        "{err}"
    );
    still_serves(t, &dest, "plain clients").await;
}

async fn tls_client_at_a_plain_server_is_told_it_does_not_speak_tls(scheme: Scheme) {
    let plain_scheme = if scheme.is_websocket() {
        Scheme::Ws
    } else {
        Scheme::Tcp
    };
    let t = Tunnel::start(
        plain_scheme,
        Opts {
            once: false,
            ..Opts::default()
        },
    )
    .await;
    let dest = t.dest_listener();
    let url = Endpoint {
        scheme,
        ..t.url.clone()
    };
    let (_, client) = test_tls();
    let err = refused(&url, Some(client), None, "a TLS client at a plain server").await;
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            Error::Tls(
                qmigrate_transport::tls::TlsFailure::ServerNotTls(_)
                    | qmigrate_transport::tls::TlsFailure::ServerClosed { .. }
            )
        ) && msg.contains("TLS handshake failed"),
        "{msg}"
    );
    assert_no_connection(&dest, "a TLS client at a plain server").await;
    assert!(t.server_running());
}

async fn mutual_tls_with_and_without_a_client_certificate(scheme: Scheme) {
    let server_ca = Ca::new("server");
    let client_ca = Ca::new("clients");
    let server = server_tls(&server_ca.issue(&["127.0.0.1"]), Some(&client_ca));
    assert!(server.requires_client_certificates());
    let check = || ServerCheck::Ca(vec![server_ca.der()]);
    let member = client_ca.issue(&["source.example"]);
    let good = client_tls(check(), Some(&member));
    let (t, dest) = tunnel(scheme, server, good).await;

    let err = refused(
        &t.url,
        Some(client_tls(check(), None)),
        None,
        "no client certificate",
    )
    .await;
    let msg = err.to_string();
    assert!(msg.contains("client certificate"), "{msg}");

    let stranger = Ca::new("strangers").issue(&["source.example"]);
    let err = refused(
        &t.url,
        Some(client_tls(check(), Some(&stranger))),
        None,
        "a client certificate from another CA",
    )
    .await;
    let msg = err.to_string();
    assert!(
        msg.contains("did not accept") && msg.contains("certificate"),
        "{msg}"
    );

    // The server's own CA does not vouch for clients.
    let wrong_ca = server_ca.issue(&["source.example"]);
    let err = refused(
        &t.url,
        Some(client_tls(check(), Some(&wrong_ca))),
        None,
        "a client certificate from the server's CA",
    )
    .await;
    assert!(err.to_string().contains("certificate"), "{err}");

    still_serves(t, &dest, "clients without a good certificate").await;
}

async fn token_and_tls_together(scheme: Scheme) {
    let token = Token::new("a token for the TLS tests, long enough", "test").expect("token");
    let (server, client) = test_tls();
    let mut t = Tunnel::start(
        scheme,
        Opts {
            once: false,
            server_tls: Some(server),
            client_tls: Some(client.clone()),
            server_token: Some(token.clone()),
            client_token: Some(token),
            ..Opts::default()
        },
    )
    .await;
    let dest = t.dest_listener();
    let wrong = Token::new("another token, just as long as it", "test").expect("token");
    let err = refused(
        &t.url,
        Some(client.clone()),
        Some(wrong),
        "a wrong token over TLS",
    )
    .await;
    assert!(
        matches!(err, Error::Rejected { .. }) && err.to_string().contains("auth"),
        "{err}"
    );
    let err = refused(&t.url, Some(client), None, "no token over TLS").await;
    assert!(matches!(err, Error::Auth(_)), "{err}");
    assert_no_connection(&dest, "bad tokens over TLS").await;
    exchange(&t, &dest, 3 << 20, 1, "token and TLS").await;
    tokio::time::sleep(QUIET).await;
    let (server, _) = t.stop().await;
    assert_eq!((server.connections, server.failed), (1, 0), "{server}");
}

/// Beyond loopback, a server needs client authentication: a token or client certificates.
/// A server certificate alone proves the server, not the clients.
#[tokio::test]
async fn tls_alone_is_not_client_authentication() {
    let (server, _) = test_tls();
    let ca = Ca::new("clients");
    let mtls = server_tls(&ca.issue(&["127.0.0.1"]), Some(&ca));
    for scheme in [Scheme::Tls, Scheme::Wss] {
        let everywhere = Endpoint::parse("0.0.0.0:0", scheme).expect("endpoint");
        let config = |tls: &ServerTls| ServerConfig {
            tls: Some(tls.clone()),
            ..ServerConfig::new("/nonexistent/dest.sock")
        };
        let err = Server::bind(&everywhere, config(&server))
            .await
            .expect_err("a server certificate without client authentication");
        assert!(matches!(err, Error::Unauthenticated { .. }), "{err}");
        assert!(err.to_string().contains("without authentication"), "{err}");

        let ok = Server::bind(&everywhere, config(&mtls))
            .await
            .expect("client certificates authenticate");
        assert_eq!(ok.local_endpoint().scheme, scheme);
        let token = Token::new("a token for the TLS tests, long enough", "test").expect("token");
        Server::bind(
            &everywhere,
            ServerConfig {
                token: Some(token),
                ..config(&server)
            },
        )
        .await
        .expect("a token authenticates");
    }
}

/// TLS addresses need TLS settings and plain ones refuse them: nothing is silently
/// unencrypted or unverified.
#[tokio::test]
async fn tls_settings_and_schemes_must_agree() {
    let (server, client) = test_tls();
    let tls_url = Endpoint::parse("tls://127.0.0.1:0", Scheme::Tcp).expect("tls");
    let tcp_url = Endpoint::parse("tcp://127.0.0.1:0", Scheme::Tcp).expect("tcp");
    let err = Server::bind(&tls_url, ServerConfig::new("/nonexistent"))
        .await
        .expect_err("tls:// without a certificate");
    assert!(
        matches!(
            err,
            Error::TlsSetup(qmigrate_transport::TlsError::Mismatch(
                qmigrate_transport::tls::Mismatch::ServerWithoutSettings
            ))
        ),
        "{err}"
    );
    let err = Server::bind(
        &tcp_url,
        ServerConfig {
            tls: Some(server),
            ..ServerConfig::new("/nonexistent")
        },
    )
    .await
    .expect_err("a certificate for tcp://");
    assert!(matches!(err, Error::TlsSetup(_)), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let err = qmigrate_transport::Client::bind(
        &dir.path().join("a.sock"),
        ClientConfig::new(tls_url.clone()),
    )
    .expect_err("tls:// without a way to check the server");
    assert!(
        matches!(
            err,
            Error::TlsSetup(qmigrate_transport::TlsError::Mismatch(
                qmigrate_transport::tls::Mismatch::ClientWithoutSettings
            ))
        ),
        "{err}"
    );
    let err = qmigrate_transport::Client::bind(
        &dir.path().join("b.sock"),
        ClientConfig {
            tls: Some(client),
            ..ClientConfig::new(tcp_url)
        },
    )
    .expect_err("TLS settings for tcp://");
    assert!(matches!(err, Error::TlsSetup(_)), "{err}");
}

/// Unreadable and mismatched PEM files are named in the error.
#[test]
fn bad_pem_files_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = Issued::self_signed(&["127.0.0.1"]);
    let other = Issued::self_signed(&["127.0.0.1"]);
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    let (c, k) = (
        write("cert.pem", &cert.cert_pem),
        write("key.pem", &cert.key_pem),
    );
    let other_key = write("other.pem", &other.key_pem);
    let junk = write("junk.pem", "not PEM at all\n");
    let missing = dir.path().join("missing.pem");

    let err = ServerTls::from_pem_files(&missing, &k, None).expect_err("missing");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    let err = ServerTls::from_pem_files(&junk, &k, None).expect_err("junk cert");
    assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
    let err = ServerTls::from_pem_files(&c, &junk, None).expect_err("junk key");
    assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
    let err = ServerTls::from_pem_files(&c, &c, None).expect_err("a cert as the key");
    assert!(err.to_string().contains("PRIVATE KEY"), "{err}");
    let err = ServerTls::from_pem_files(&c, &other_key, None).expect_err("another key");
    assert!(err.to_string().contains("certificate and key"), "{err}");
    ServerTls::from_pem_files(&c, &k, Some(&c)).expect("a self-signed cert as client CA");
}

/// How a [`raw_tls_client`]'s connection ended.
#[derive(Debug)]
enum Ended {
    /// rustls refused what came, or the server sent this alert.
    Alert(rustls::Error),
    /// The server's `close_notify`: a clean end.
    CloseNotify,
    /// The connection ended without either: a truncation, or a reset (shown by `Debug`).
    #[allow(dead_code)]
    Truncated(String),
}

/// A TLS client of rustls' own, driven by hand on a blocking socket to `addr`, trusting `ca`:
/// it finishes the handshake, then sends each of `records` as one application data record,
/// with the last bit of its tag flipped where it says `true`, and reads until the connection
/// ends. With `wait`, it reads the server's first answer (the `accept`) before it sends the
/// records after the first. Returns the plaintext it read and how the connection ended.
fn raw_tls_client(
    addr: String,
    ca: qmigrate_transport::tls::CertificateDer<'static>,
    records: Vec<(Vec<u8>, bool)>,
    wait: bool,
) -> Result<(Vec<u8>, Ended), String> {
    use std::io::{Read as _, Write as _};
    use std::sync::Arc;
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| s(&e))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| s(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").map_err(|e| s(&e))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| s(&e))?;
    let mut sock = std::net::TcpStream::connect(addr).map_err(|e| s(&e))?;
    sock.set_read_timeout(Some(STEP)).map_err(|e| s(&e))?;
    while conn.is_handshaking() || conn.wants_write() {
        conn.complete_io(&mut sock).map_err(|e| s(&e))?;
    }
    let mut plain = Vec::new();
    for (i, (record, corrupt)) in records.into_iter().enumerate() {
        if wait && i == 1 {
            while plain.is_empty() {
                conn.read_tls(&mut sock).map_err(|e| s(&e))?;
                conn.process_new_packets().map_err(|e| s(&e))?;
                let _ = conn.reader().read_to_end(&mut plain);
            }
        }
        conn.writer().write_all(&record).map_err(|e| s(&e))?;
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).map_err(|e| s(&e))?;
        if corrupt {
            let last = wire.len() - 1;
            wire[last] ^= 1;
        }
        // The server may hang up while the rest is on its way: what it answered counts.
        if sock.write_all(&wire).is_err() {
            break;
        }
    }
    let mut buf = [0u8; 4096];
    loop {
        let eof = match conn.read_tls(&mut sock) {
            Ok(n) => n == 0,
            Err(e) => return Ok((plain, Ended::Truncated(e.to_string()))),
        };
        if let Err(e) = conn.process_new_packets() {
            return Ok((plain, Ended::Alert(e)));
        }
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => return Ok((plain, Ended::CloseNotify)),
                Ok(n) => plain.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !eof => break,
                Err(e) => return Ok((plain, Ended::Truncated(e.to_string()))),
            }
        }
    }
}

/// A tunnel over `tls://` whose server certificate `raw_tls_client` checks against the
/// returned CA.
async fn tls_tunnel() -> (Tunnel, qmigrate_transport::tls::CertificateDer<'static>) {
    let ca = Ca::new("raw");
    let cert = ca.issue(&["127.0.0.1"]);
    let t = Tunnel::start(
        Scheme::Tls,
        Opts {
            server_tls: Some(server_tls(&cert, None)),
            client_tls: Some(client_tls(ServerCheck::Ca(vec![ca.der()]), None)),
            once: false,
            ..Opts::default()
        },
    )
    .await;
    (t, ca.der())
}

/// A record that fails to decrypt after the handshake is answered with a `bad_record_mac`
/// alert (RFC 8446, 5.2), not with a bare close or reset: in the tunnel handshake, and in the
/// data stream after the `accept`.
#[tokio::test]
async fn a_record_that_fails_to_decrypt_gets_bad_record_mac() {
    let (t, ca) = tls_tunnel().await;
    let _dest = t.dest_listener();
    let hello = qmigrate_transport::protocol::encode(&qmigrate_transport::protocol::Hello::data(
        "00000000000000e2",
        0,
    ));
    let frame = [0u8, 0, 0, 4, 1, 2, 3, 4];
    let mut streaming = vec![(hello.clone(), false), (frame.to_vec(), true)];
    streaming.extend((0..256).map(|_| (vec![7u8; 16 * 1024], false)));
    for (records, wait, what) in [
        (
            vec![(b"QMTUNL\r\n".to_vec(), true)],
            false,
            "in the tunnel handshake",
        ),
        (
            vec![(hello.clone(), false), (frame.to_vec(), true)],
            true,
            "in the data stream",
        ),
        (
            streaming.clone(),
            true,
            "in a data stream that goes on after the bad record",
        ),
        (
            streaming,
            false,
            "right behind the TLS handshake, with more after it",
        ),
    ] {
        let (addr, ca) = (t.url.authority(), ca.clone());
        let got = tokio::task::spawn_blocking(move || raw_tls_client(addr, ca, records, wait))
            .await
            .expect("the raw client");
        assert!(
            matches!(
                got,
                Ok((
                    _,
                    Ended::Alert(rustls::Error::AlertReceived(
                        rustls::AlertDescription::BadRecordMac
                    ))
                ))
            ),
            "{what}: {got:?}"
        );
    }
}

/// A client the server refuses after the TLS handshake gets the refusal and then
/// `close_notify`: a clean end of the TLS session, not what a truncation looks like.
#[tokio::test]
async fn a_refused_client_gets_close_notify() {
    let (t, ca) = tls_tunnel().await;
    let addr = t.url.authority();
    let hello = br#"{"min_version":99,"max_version":99,"software":"raw","session":"00000000000000e1","seq":0,"purpose":"data"}"#;
    let envelope = qmigrate_transport::protocol::envelope(hello);
    let got = tokio::task::spawn_blocking(move || {
        raw_tls_client(addr, ca, vec![(envelope, false)], false)
    })
    .await
    .expect("the raw client")
    .expect("a TLS session");
    let reply: serde_json::Value =
        qmigrate_transport::protocol::decode(&got.0).expect("the refusal");
    assert_eq!(reply["type"], "reject", "{reply}");
    assert!(matches!(got.1, Ended::CloseNotify), "{:?}", got.1);
}

/// The server picks the cipher suite by its own preference (AES-128-GCM), not the client's: a
/// client that lists AES-256-GCM and ChaCha20 first still gets AES-128-GCM.
#[tokio::test]
async fn the_server_prefers_aes_128_gcm_whatever_the_client_lists() {
    use rustls::CipherSuite::*;
    use std::sync::Arc;
    let (t, ca) = tls_tunnel().await;
    let addr = t.url.authority();
    let suite = tokio::task::spawn_blocking(move || {
        let mut provider = rustls::crypto::ring::default_provider();
        let rank = |s: rustls::CipherSuite| match s {
            TLS13_AES_256_GCM_SHA384 => 0,
            TLS13_CHACHA20_POLY1305_SHA256 => 1,
            _ => 2,
        };
        provider.cipher_suites.sort_by_key(|s| rank(s.suite()));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).expect("the CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut sock = std::net::TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(STEP)).expect("timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).expect("the handshake");
        }
        conn.negotiated_cipher_suite().map(|s| s.suite())
    })
    .await
    .expect("the raw client");
    assert_eq!(suite, Some(TLS13_AES_128_GCM_SHA256));
}
