//! Authentication and hostile input, in-process: a server with a token, the tunnel client
//! with the same token, and peers that do everything else (no token, a wrong token, a replayed
//! handshake, garbage, HTTP, oversized frames, silence, a flood of idle connections, a server
//! that cannot prove it knows the token). After each, nothing reached the destination socket,
//! the server logged why with the peer's address, and a good client still gets through. Every
//! scenario runs once per transport (`tcp::*` and `ws::*`).

use crate::common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use qmigrate_testkit::per_scheme;
use qmigrate_transport::protocol::{self, Auth, Hello, RejectReason, Reply, MAGIC};
use qmigrate_transport::{
    auth, Client, ClientConfig, Endpoint, Error, Report, Scheme, Server, ServerConfig, Token,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Limit for a whole test, on top of the limit on each step.
const TEST: Duration = Duration::from_secs(90);

/// The token both tunnel ends share.
const TOKEN: &str = "dGhlIHRlc3QgdG9rZW4sIGxvbmcgZW5vdWdo";
/// A token of the right form that is not the server's.
const WRONG: &str = "YW5vdGhlciB0b2tlbiwgYWxzbyBsb25nIGVub3VnaA";

per_scheme!(
    tcp = Scheme::Tcp, ws = Scheme::Ws; within TEST, after capture_logs;
    no_token_is_refused,
    wrong_token_is_refused,
    replayed_handshake_is_refused,
    garbage_before_authentication,
    http_request_without_upgrade,
    oversized_messages_are_refused,
    silent_clients_time_out,
    flood_of_idle_connections_does_not_lock_out_a_good_client,
    client_with_a_token_refuses_a_server_without_one,
    client_refuses_a_server_that_cannot_prove_the_token,
    a_nonce_of_another_length_is_a_bad_request,
);

fn token(s: &str) -> Token {
    Token::new(s, "the test").expect("a test token")
}

// ---------------------------------------------------------------------------------------
/// Waits until the server logged a line about the connection from `peer` that contains
/// `what`, and returns it.
async fn assert_logged(peer: SocketAddr, what: &str) -> String {
    let needle = format!("peer={peer}");
    let until = Instant::now() + STEP;
    loop {
        let text = log_text();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains(&needle) && l.contains(what))
        {
            return line.to_owned();
        }
        if Instant::now() >= until {
            let mine: Vec<&str> = text.lines().filter(|l| l.contains(&needle)).collect();
            panic!(
                "the server logged no line with {what:?} for {peer}; its lines for it:\n{}",
                mine.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Raw peers.

/// A tunnel connection to `url` made by hand (TCP connect, and the WebSocket upgrade for
/// `ws://` by tokio-tungstenite), with the local address the server sees as the peer.
async fn raw_connect(url: &Endpoint) -> (Peer, SocketAddr) {
    Peer::connect_from(url).await
}

/// A hello's body as a client with a token sends it (with a nonce).
fn hello_body(session: &str) -> Vec<u8> {
    let mut hello = Hello::data(session, 0);
    hello.nonce = Some(auth::hex(&auth::nonce().expect("nonce")));
    protocol::encode_body(&hello)
}

/// Sends a hello and returns the server's challenge nonce.
async fn hello_and_challenge(s: &mut Peer, body: &[u8]) -> auth::Nonce {
    s.send_body(body).await.expect("send the hello");
    let reply: Reply = within(STEP, "the challenge", s.recv_msg())
        .await
        .expect("the challenge");
    let Reply::Challenge { nonce } = reply else {
        panic!("a server with a token answered a hello with {reply:?}, not a challenge")
    };
    auth::parse_nonce(&nonce).expect("a 32-byte hex nonce")
}

/// Receives the server's answer, which must be an authentication reject, and checks that the
/// server hangs up after it. Returns the reject's message.
async fn expect_auth_reject(s: &mut Peer, what: &str) -> String {
    let reply: Reply = within(STEP, "the server's answer", s.recv_msg())
        .await
        .unwrap_or_else(|e| panic!("{what}: no answer from the server: {e}"));
    let Reply::Reject {
        reason, message, ..
    } = reply
    else {
        panic!("{what}: the server answered {reply:?}")
    };
    assert_eq!(reason, RejectReason::Auth, "{what}: {message}");
    let after = within(STEP, "the server to hang up", s.recv_msg::<Reply>()).await;
    assert!(after.is_err(), "{what}: the server sent more: {after:?}");
    message
}

/// Sends `bytes` on a plain TCP connection to the server, half-closes, and returns what the
/// server sent before it hung up, with the local address.
async fn send_raw(url: &Endpoint, bytes: &[u8], what: &str) -> (Vec<u8>, SocketAddr) {
    let mut tcp = within(STEP, what, TcpStream::connect(url.authority()))
        .await
        .expect("connect to the server");
    let local = tcp.local_addr().expect("local address");
    // The server may hang up before it read everything: a failed write is fine.
    let _ = tcp.write_all(bytes).await;
    let _ = tcp.shutdown().await;
    let mut answer = Vec::new();
    let _ = within(
        STEP,
        &format!("the server to hang up on {what}"),
        tcp.read_to_end(&mut answer),
    )
    .await;
    (answer, local)
}

/// The payloads of the binary messages in what a WebSocket server sent after its upgrade
/// response (server frames are not masked).
fn ws_binary_messages(bytes: &[u8]) -> Vec<Vec<u8>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut rest = &bytes[end + 4..];
    let mut out = Vec::new();
    while rest.len() >= 2 {
        let opcode = rest[0] & 0x0f;
        let (len, header) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        let Some(payload) = rest.get(header..header + len) else {
            break;
        };
        if opcode == 2 {
            out.push(payload.to_vec());
        }
        rest = &rest[header + len..];
    }
    out
}

/// The handshake messages a server sent on a raw connection, decoded.
fn server_replies(scheme: Scheme, bytes: &[u8]) -> Vec<Reply> {
    match scheme {
        Scheme::Tcp => {
            let mut out = Vec::new();
            let mut rest = bytes;
            while rest.len() >= 12 {
                let Ok(header) = <[u8; 12]>::try_from(&rest[..12]) else {
                    break;
                };
                let Ok(len) = protocol::parse_header(&header) else {
                    break;
                };
                let Some(body) = rest.get(12..12 + len as usize) else {
                    break;
                };
                out.push(protocol::decode_body(body).expect("a reply"));
                rest = &rest[12 + len as usize..];
            }
            out
        }
        Scheme::Ws => ws_binary_messages(bytes)
            .iter()
            .map(|m| protocol::decode(m).expect("a reply"))
            .collect(),
        other => unreachable!("a plain scheme only: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Good clients.

/// One good connection through `t`'s client: bytes both ways, byte for byte.
async fn good_transfer(t: &Tunnel, dest: &UnixListener, what: &str) {
    let (up, down) = (300_007, 100_003);
    let source = t.source_connect().await;
    let (at_source, at_dest) = within(STEP, &format!("{what}: the good transfer"), async {
        tokio::join!(
            duplex(source, Pattern::new(1), up, Pattern::new(2)),
            async { duplex(accept(dest).await, Pattern::new(2), down, Pattern::new(1)).await },
        )
    })
    .await;
    at_dest.assert_exact(up, &format!("{what}: at the destination"));
    at_source.assert_exact(down, &format!("{what}: at the source"));
}

/// Another tunnel client, on a socket of its own in `t`'s directory, pointed at `url` with
/// `token`, serving one migration.
struct SideClient {
    socket: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<Report>,
}

impl SideClient {
    fn start(t: &Tunnel, name: &str, url: &Endpoint, token: Option<Token>) -> SideClient {
        let socket = t.dir.path().join(format!("{name}.sock"));
        let config = ClientConfig {
            once: true,
            token,
            ..ClientConfig::new(url.clone())
        };
        let client = Client::bind(&socket, config).expect("bind a side client");
        let stop = CancellationToken::new();
        let task = tokio::spawn(client.serve(stop.clone()));
        SideClient { socket, stop, task }
    }

    /// A source connection through this client that the tunnel refuses: the source sends a
    /// little, its connection is closed with nothing coming back, and the client reports one
    /// failed connection.
    async fn refused(mut self, what: &str) {
        let source = within(
            STEP,
            "connect to the side client",
            tokio::net::UnixStream::connect(&self.socket),
        )
        .await
        .expect("connect to the side client");
        let (mut rd, mut wr) = source.into_split();
        // The client may close before it read everything.
        let _ = wr.write_all(b"QEVM\0\0\0\x03").await;
        let (n, _) = read_until_closed(&mut rd, &format!("{what}: the source to be cut")).await;
        assert_eq!(n, 0, "{what}: the source got bytes back");
        let report = within(STEP, "the side client to return", &mut self.task)
            .await
            .expect("side client task");
        assert_eq!(
            (report.connections, report.failed, report.to_tunnel),
            (1, 1, 0),
            "{what}: the side client's report: {report}"
        );
    }
}

impl Drop for SideClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Checks that nothing from the hostile peers reached the destination, that the server still
/// runs, and that a good client still gets through; then stops the tunnel and checks that the
/// server counted exactly `good + 1` authenticated connections, all clean.
async fn still_serves_good_clients(mut t: Tunnel, dest: &UnixListener, good: u64, what: &str) {
    assert_no_connection(dest, what).await;
    assert!(t.server_running(), "the server stopped after {what}");
    good_transfer(&t, dest, what).await;
    // The last connection may still be closing (WebSocket close handshake).
    tokio::time::sleep(QUIET).await;
    let (server, _) = t.stop().await;
    assert_eq!(
        (server.connections, server.failed),
        (good + 1, 0),
        "{what}: the server's report: {server}"
    );
}

fn opts() -> Opts {
    Opts {
        once: false,
        ..Opts::with_token(TOKEN)
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios.

/// A client without a token: refused with the reason `auth`, logged with its address; the
/// tunnel client says what to do.
async fn no_token_is_refused(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();

    let (mut s, peer) = raw_connect(&t.url).await;
    let hello = Hello::data("00000000000000a1", 0);
    hello_and_challenge(&mut s, &protocol::encode_body(&hello)).await;
    s.send_msg(&Auth { mac: None }).await.expect("send auth");
    let message = expect_auth_reject(&mut s, "no token").await;
    assert!(message.contains("no token"), "{message}");
    assert_logged(
        peer,
        "refused (authentication failed): the client has no token",
    )
    .await;

    SideClient::start(&t, "no-token", &t.url, None)
        .refused("a tunnel client without a token")
        .await;
    still_serves_good_clients(t, &dest, 0, "clients without a token").await;
}

/// A client with another token: refused, logged; the same through the tunnel client.
async fn wrong_token_is_refused(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();

    let (mut s, peer) = raw_connect(&t.url).await;
    let body = hello_body("00000000000000a2");
    let nonce = hello_and_challenge(&mut s, &body).await;
    let mac = token(WRONG).client_proof(&nonce, &body);
    s.send_msg(&Auth { mac: Some(mac) })
        .await
        .expect("send auth");
    let message = expect_auth_reject(&mut s, "a wrong token").await;
    assert!(message.contains("does not match"), "{message}");
    assert_logged(peer, "authentication failed").await;

    // The right token's proof, for another hello than the one sent (another seq): refused.
    let (mut s, _) = raw_connect(&t.url).await;
    let body = hello_body("00000000000000a3");
    let nonce = hello_and_challenge(&mut s, &body).await;
    let other = protocol::encode_body(&Hello::data("00000000000000a3", 7));
    let mac = token(TOKEN).client_proof(&nonce, &other);
    s.send_msg(&Auth { mac: Some(mac) })
        .await
        .expect("send auth");
    expect_auth_reject(&mut s, "a proof for another hello").await;

    SideClient::start(&t, "wrong-token", &t.url, Some(token(WRONG)))
        .refused("a tunnel client with a wrong token")
        .await;
    still_serves_good_clients(t, &dest, 0, "clients with a wrong token").await;
}

/// A TCP proxy that records what the client sends through it (one connection).
async fn recording_proxy(server: &Endpoint) -> (Endpoint, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = Endpoint {
        port: listener.local_addr().expect("addr").port(),
        ..server.clone()
    };
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    let server = server.authority();
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let Ok(upstream) = TcpStream::connect(server).await else {
            return;
        };
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = upstream.into_split();
        let up = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Ok(mut r) = rec.lock() {
                            r.extend_from_slice(&buf[..n]);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sw.shutdown().await;
        };
        let down = async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
            let _ = cw.shutdown().await;
        };
        tokio::join!(up, down);
    });
    (url, recorded)
}

/// Sends `recorded` to the server as the recorded client did: a WebSocket server takes no
/// bytes after the upgrade request until it has answered it, so those wait for the `101`.
/// Returns everything the server sent, and the local address.
async fn replay(url: &Endpoint, recorded: &[u8]) -> (Vec<u8>, SocketAddr) {
    if url.scheme == Scheme::Tcp {
        return send_raw(url, recorded, "a replayed connection").await;
    }
    let end = recorded
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the recorded upgrade request")
        + 4;
    let mut tcp = within(STEP, "connect", TcpStream::connect(url.authority()))
        .await
        .expect("connect to the server");
    let local = tcp.local_addr().expect("local address");
    tcp.write_all(&recorded[..end]).await.expect("the request");
    let mut answer = Vec::new();
    within(STEP, "the upgrade response", async {
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 1];
            match tcp.read(&mut buf).await {
                Ok(1) => answer.push(buf[0]),
                other => panic!("the upgrade response ended early: {other:?}"),
            }
        }
    })
    .await;
    assert!(
        answer.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let _ = tcp.write_all(&recorded[end..]).await;
    let _ = tcp.shutdown().await;
    let _ = within(
        STEP,
        "the server to hang up on a replay",
        tcp.read_to_end(&mut answer),
    )
    .await;
    (answer, local)
}

/// Everything a good client sent for a whole connection (upgrade, hello, proof, data),
/// recorded on the wire and replayed byte for byte on a new connection: the server's fresh
/// nonce makes the old proof worthless.
async fn replayed_handshake_is_refused(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();

    let (proxy, recorded) = recording_proxy(&t.url).await;
    let mut side = SideClient::start(&t, "recorded", &proxy, Some(token(TOKEN)));
    let source = within(
        STEP,
        "connect to the recorded client",
        tokio::net::UnixStream::connect(&side.socket),
    )
    .await
    .expect("connect");
    let (at_source, at_dest) = within(STEP, "the recorded transfer", async {
        tokio::join!(
            duplex(source, Pattern::new(5), 70_001, Pattern::new(6)),
            async {
                duplex(
                    accept(&dest).await,
                    Pattern::new(6),
                    30_001,
                    Pattern::new(5),
                )
                .await
            },
        )
    })
    .await;
    at_dest.assert_exact(70_001, "recorded transfer, at the destination");
    at_source.assert_exact(30_001, "recorded transfer, at the source");
    let report = within(STEP, "the recorded client to return", &mut side.task)
        .await
        .expect("task");
    assert_eq!((report.connections, report.failed), (1, 0), "{report}");
    let recorded = recorded.lock().map(|r| r.clone()).unwrap_or_default();
    assert!(recorded.len() > 70_001, "recorded {} bytes", recorded.len());

    for attempt in 0..2 {
        let (answer, peer) = replay(&t.url, &recorded).await;
        let replies = server_replies(scheme, &answer);
        assert!(
            matches!(
                replies.as_slice(),
                [
                    Reply::Challenge { .. },
                    Reply::Reject {
                        reason: RejectReason::Auth,
                        ..
                    }
                ]
            ),
            "replay #{attempt}: the server answered {replies:?}"
        );
        assert_logged(peer, "authentication failed").await;
    }
    still_serves_good_clients(t, &dest, 1, "replayed handshakes").await;
}

/// Bytes that are not a proper handshake, before the client authenticated: each is refused
/// and logged, none reaches the destination.
async fn garbage_before_authentication(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();

    // Whole connections of garbage.
    let (_, peer) = send_raw(&t.url, &Pattern::new(9).bytes(0, 4096), "random bytes").await;
    assert_logged(peer, "refused a connection").await;
    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    send_raw(&t.url, &huge, "an envelope of 4 GiB").await;

    // A proper hello, then something else than the proof.
    let mut bad_json = MAGIC.to_vec();
    bad_json.extend_from_slice(&5u32.to_be_bytes());
    bad_json.extend_from_slice(b"{\"a\":");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a second hello", protocol::encode(&Hello::data("x", 1))),
        (
            "a challenge",
            protocol::encode(&Reply::Challenge {
                nonce: "00".repeat(32),
            }),
        ),
        (
            "a proof that is not hex",
            protocol::encode(&Auth {
                mac: Some("zz".repeat(32)),
            }),
        ),
        (
            "a proof of 10 000 digits",
            protocol::encode(&Auth {
                mac: Some("ab".repeat(5000)),
            }),
        ),
        ("broken JSON", bad_json),
        ("random bytes", Pattern::new(11).bytes(0, 1000)),
        ("an envelope of 4 GiB", huge),
    ];
    for (what, bytes) in cases {
        let (mut s, peer) = raw_connect(&t.url).await;
        hello_and_challenge(&mut s, &hello_body("00000000000000b1")).await;
        let _ = s.send_raw(bytes).await;
        let after = within(STEP, what, s.recv_msg::<Reply>()).await;
        match after {
            // A well-formed auth message with a bad proof gets a reject.
            Ok(Reply::Reject {
                reason: RejectReason::Auth,
                ..
            }) => {
                let end = within(STEP, "the server to hang up", s.recv_msg::<Reply>()).await;
                assert!(end.is_err(), "{what}: the server sent more: {end:?}");
            }
            Ok(other) => panic!("{what}: the server answered {other:?}"),
            Err(_) => {}
        }
        assert_logged(peer, "refused").await;
    }
    if scheme == Scheme::Ws {
        let (mut s, peer) = raw_connect(&t.url).await;
        hello_and_challenge(&mut s, &hello_body("00000000000000b2")).await;
        let _ = s.send_text("{\"type\":\"auth\"}").await;
        let after = within(STEP, "a text message", s.recv_msg::<Reply>()).await;
        assert!(after.is_err(), "a text message: {after:?}");
        assert_logged(peer, "text message").await;
    }
    still_serves_good_clients(t, &dest, 0, "garbage").await;
}

/// Plain HTTP requests (no WebSocket upgrade) on the server's port: refused with a log line;
/// a WebSocket server never answers them with `101`.
async fn http_request_without_upgrade(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();
    for request in [
        &b"GET / HTTP/1.1\r\nHost: dest\r\n\r\n"[..],
        b"POST /upload HTTP/1.1\r\nHost: dest\r\nContent-Length: 5\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: dest\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ] {
        let (answer, peer) = send_raw(&t.url, request, "an HTTP request").await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            !answer.contains(" 101 "),
            "the server upgraded a request without a key: {answer}"
        );
        assert_logged(peer, "refused a connection").await;
    }
    still_serves_good_clients(t, &dest, 0, "HTTP requests").await;
}

/// A WebSocket frame that claims 1 GiB, a 2 MiB message, and (TCP) an envelope above the
/// handshake limit: refused before they are buffered.
async fn oversized_messages_are_refused(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();

    // Before the hello.
    let (mut s, peer) = raw_connect(&t.url).await;
    match &mut s {
        Peer::Tcp(tcp) => {
            let mut header = MAGIC.to_vec();
            header.extend_from_slice(&(protocol::MAX_HANDSHAKE_LEN + 1).to_be_bytes());
            let _ = tcp.write_all(&header).await;
        }
        Peer::Ws(ws) => {
            // FIN + binary, masked, 64-bit length of 1 GiB, a mask, then a little payload.
            let mut frame = vec![0x82, 0xff];
            frame.extend_from_slice(&(1u64 << 30).to_be_bytes());
            frame.extend_from_slice(&[1, 2, 3, 4]);
            frame.extend_from_slice(&[0u8; 4096]);
            let _ = ws.get_mut().write_all(&frame).await;
        }
    }
    let started = Instant::now();
    let after = within(STEP, "an oversized frame", s.recv_msg::<Reply>()).await;
    assert!(after.is_err(), "an oversized frame: {after:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the server waited {:?} for the rest of an oversized frame",
        started.elapsed()
    );
    assert_logged(peer, "refused a connection").await;

    // As the proof, after a good hello.
    let (mut s, peer) = raw_connect(&t.url).await;
    hello_and_challenge(&mut s, &hello_body("00000000000000c1")).await;
    let big = protocol::encode(&Auth {
        mac: Some("a".repeat(2 << 20)),
    });
    let _ = s.send_raw(big).await;
    let after = within(STEP, "a 2 MiB proof", s.recv_msg::<Reply>()).await;
    assert!(after.is_err(), "a 2 MiB proof: {after:?}");
    assert_logged(peer, "refused a connection").await;
    still_serves_good_clients(t, &dest, 0, "oversized messages").await;
}

/// Peers that connect and then say nothing (before the upgrade, before the hello, before the
/// proof) are dropped at the handshake timeout.
async fn silent_clients_time_out(scheme: Scheme) {
    let timeout = Duration::from_secs(1);
    let t = Tunnel::start(
        scheme,
        Opts {
            handshake_timeout: timeout,
            ..opts()
        },
    )
    .await;
    let dest = t.dest_listener();

    let wait_closed = |mut tcp: TcpStream, what: &'static str| async move {
        let started = Instant::now();
        let mut buf = Vec::new();
        let _ = within(STEP, what, tcp.read_to_end(&mut buf)).await;
        let took = started.elapsed();
        assert!(
            took >= timeout - Duration::from_millis(200),
            "{what}: dropped after {took:?}, before the handshake timeout"
        );
    };
    let tcp = TcpStream::connect(t.url.authority())
        .await
        .expect("connect");
    let peer = tcp.local_addr().expect("addr");
    wait_closed(tcp, "a silent TCP connection").await;
    assert_logged(peer, "no finished handshake within 1s").await;

    // Upgraded (WebSocket) but no hello; a hello but no proof.
    let (s, peer) = raw_connect(&t.url).await;
    let started = Instant::now();
    let mut s = s;
    let after = within(STEP, "silence after connecting", s.recv_msg::<Reply>()).await;
    assert!(after.is_err(), "{after:?}");
    assert!(started.elapsed() >= timeout - Duration::from_millis(200));
    assert_logged(peer, "no finished handshake").await;

    let (mut s, peer) = raw_connect(&t.url).await;
    hello_and_challenge(&mut s, &hello_body("00000000000000d1")).await;
    let after = within(STEP, "silence after the challenge", s.recv_msg::<Reply>()).await;
    assert!(after.is_err(), "{after:?}");
    assert_logged(peer, "no finished handshake").await;

    still_serves_good_clients(t, &dest, 0, "silent clients").await;
}

/// 200 connections that never finish their handshake (a long handshake timeout, so only the
/// limit on unauthenticated connections frees their places), and a good client gets through
/// while all of them are still open.
async fn flood_of_idle_connections_does_not_lock_out_a_good_client(scheme: Scheme) {
    const FLOOD: usize = 200;
    let limit = ServerConfig::new("unused").max_unauthenticated;
    let t = Tunnel::start(
        scheme,
        Opts {
            handshake_timeout: Duration::from_secs(120),
            ..opts()
        },
    )
    .await;
    let dest = t.dest_listener();

    let mut idle = Vec::new();
    for i in 0..FLOOD {
        let tcp = within(STEP, "connect", TcpStream::connect(t.url.authority()))
            .await
            .expect("connect");
        let peer = tcp.local_addr().expect("addr");
        // Half of them get as far as the hello on a WebSocket server (after the upgrade).
        if scheme == Scheme::Ws && i % 2 == 1 {
            let (mut ws, _) = within(
                STEP,
                "an idle WebSocket upgrade",
                tokio_tungstenite::client_async(t.url.to_string(), tcp),
            )
            .await
            .expect("upgrade");
            ws.send(Message::binary(protocol::encode(&Hello::data("f", 0))))
                .await
                .expect("hello");
            idle.push((None, Some(ws), peer));
        } else {
            idle.push((Some(tcp), None, peer));
        }
    }
    good_transfer(&t, &dest, "during the flood").await;

    // The oldest were dropped; at most `limit` are still waiting.
    let mut dropped = 0;
    let mut first_dropped = None;
    for (tcp, ws, peer) in &mut idle {
        let closed = if let Some(tcp) = tcp {
            let mut b = [0u8; 1];
            matches!(
                tokio::time::timeout(Duration::from_millis(20), tcp.read(&mut b)).await,
                Ok(Ok(0) | Err(_))
            )
        } else if let Some(ws) = ws {
            let mut closed = false;
            while let Ok(next) = tokio::time::timeout(Duration::from_millis(20), ws.next()).await {
                match next {
                    Some(Ok(Message::Binary(_))) => continue, // the challenge
                    _ => {
                        closed = true;
                        break;
                    }
                }
            }
            closed
        } else {
            false
        };
        if closed {
            dropped += 1;
            first_dropped.get_or_insert(*peer);
        }
    }
    assert!(
        dropped >= FLOOD - limit,
        "only {dropped} of {FLOOD} idle connections were dropped (limit {limit})"
    );
    let peer = first_dropped.expect("a dropped connection");
    assert_logged(peer, "connections were waiting to authenticate").await;
    drop(idle);
    still_serves_good_clients(t, &dest, 1, "a flood of idle connections").await;
}

/// A client with a token and a server without one: refused at once, before the server
/// touches the destination.
async fn client_with_a_token_refuses_a_server_without_one(scheme: Scheme) {
    let t = Tunnel::start(
        scheme,
        Opts {
            once: false,
            client_token: Some(token(TOKEN)),
            ..Opts::default()
        },
    )
    .await;
    let dest = t.dest_listener();
    let source = t.source_connect().await;
    let (mut rd, mut wr) = source.into_split();
    let _ = wr.write_all(b"QEVM").await;
    let (n, _) = read_until_closed(&mut rd, "the source to be cut").await;
    assert_eq!(n, 0);
    assert_no_connection(&dest, "a client with a token").await;

    let (mut s, peer) = raw_connect(&t.url).await;
    s.send_body(&hello_body("00000000000000e1"))
        .await
        .expect("hello");
    let message = expect_auth_reject(&mut s, "a hello with a nonce").await;
    assert!(message.contains("has none"), "{message}");
    assert_logged(peer, "authentication failed").await;
    assert_no_connection(&dest, "a client with a token").await;
}

/// A fake server on `url`'s transport that challenges (or not) and then accepts with `mac`,
/// for one connection; returns its URL.
async fn fake_server(scheme: Scheme, challenge: bool, mac: Option<String>) -> Endpoint {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url =
        Endpoint::parse(&listener.local_addr().expect("addr").to_string(), scheme).expect("url");
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        // tokio-tungstenite's server for `ws://`: our client against another implementation.
        let Some(mut s) = Peer::accept(tcp, scheme).await else {
            return;
        };
        if s.recv_msg::<Hello>().await.is_err() {
            return;
        }
        if challenge {
            let nonce = auth::hex(&auth::nonce().expect("nonce"));
            if s.send_msg(&Reply::Challenge { nonce }).await.is_err()
                || s.recv_msg::<Auth>().await.is_err()
            {
                return;
            }
        }
        let accept = Reply::Accept {
            version: 1,
            software: "impostor 1.0".into(),
            mac,
        };
        let _ = s.send_msg(&accept).await;
        // Hold the connection until the client hangs up.
        let _ = s.recv_msg::<Reply>().await;
    });
    url
}

/// A client with a token gives the guest's memory only to a server that proves it knows the
/// token: one that accepts without a challenge, or with a wrong proof, is refused.
async fn client_refuses_a_server_that_cannot_prove_the_token(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    for (what, challenge, mac) in [
        ("no challenge", false, None),
        ("no proof", true, None),
        ("a wrong proof", true, Some("00".repeat(32))),
        ("garbage for a proof", true, Some("not hex".into())),
    ] {
        let url = fake_server(scheme, challenge, mac).await;
        SideClient::start(&t, &what.replace(' ', "-"), &url, Some(token(TOKEN)))
            .refused(&format!("a server with {what}"))
            .await;
    }
}

/// Without a token the server listens only on loopback addresses, unless told `insecure`.
#[tokio::test]
async fn no_token_means_loopback_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = ServerConfig::new(dir.path().join("dest.sock"));
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let listen = Endpoint::parse(addr, Scheme::Tcp).expect("endpoint");
        let err = Server::bind(&listen, config.clone())
            .await
            .expect_err("no token, all interfaces");
        assert!(
            matches!(err, Error::Unauthenticated { .. }),
            "{addr}: {err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("without authentication"), "{msg}");
    }
    for addr in ["127.0.0.1:0", "127.0.0.2:0", "localhost:0"] {
        let listen = Endpoint::parse(addr, Scheme::Tcp).expect("endpoint");
        Server::bind(&listen, config.clone())
            .await
            .unwrap_or_else(|e| panic!("{addr} without a token: {e}"));
    }
    let listen = Endpoint::parse("0.0.0.0:0", Scheme::Ws).expect("endpoint");
    Server::bind(
        &listen,
        ServerConfig {
            token: Some(token(TOKEN)),
            ..config.clone()
        },
    )
    .await
    .expect("with a token");
    capture_logs();
    Server::bind(
        &listen,
        ServerConfig {
            insecure: true,
            ..config.clone()
        },
    )
    .await
    .expect("insecure");
    assert!(
        log_text().contains("WITHOUT AUTHENTICATION"),
        "no warning for --insecure:\n{}",
        log_text()
    );
}

/// The client's nonce is 32 bytes in hex (64 digits, either case), as PROTOCOL.md says: a
/// hello with a shorter or longer one, or one that is not hex, is a `bad-request` before any
/// challenge; one in capitals is fine.
async fn a_nonce_of_another_length_is_a_bad_request(scheme: Scheme) {
    let t = Tunnel::start(scheme, opts()).await;
    let dest = t.dest_listener();
    let good = auth::hex(&auth::nonce().expect("nonce"));
    for (nonce, what) in [
        (good[..62].to_owned(), "31 bytes"),
        (format!("{good}00"), "33 bytes"),
        (String::new(), "empty"),
        (good.replace(|c: char| c.is_ascii_digit(), "x"), "not hex"),
    ] {
        let mut hello = Hello::data("00000000000000a7", 0);
        hello.nonce = Some(nonce);
        let (mut s, _) = raw_connect(&t.url).await;
        s.send_body(&protocol::encode_body(&hello))
            .await
            .expect("send the hello");
        let reply: Reply = within(STEP, "the server's answer", s.recv_msg())
            .await
            .expect("an answer");
        assert!(
            matches!(
                reply,
                Reply::Reject {
                    reason: RejectReason::BadRequest,
                    ..
                }
            ),
            "a nonce of {what}: {reply:?}"
        );
    }
    let mut hello = Hello::data("00000000000000a8", 0);
    hello.nonce = Some(good.to_uppercase());
    let (mut s, _) = raw_connect(&t.url).await;
    hello_and_challenge(&mut s, &protocol::encode_body(&hello)).await;
    assert_no_connection(&dest, "after hellos with bad nonces").await;
}
