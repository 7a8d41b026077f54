//! Our WebSocket framing against tokio-tungstenite's, both ways round: their client and our
//! server, our client and their server. tungstenite is what older qmigrate versions speak on
//! the wire, and an independent reading of RFC 6455: the handshake envelopes must arrive
//! byte for byte, the data streams byte-exact in both directions at once (their messages of
//! every size up to the limit, ours as our writer cuts them), a ping in the middle of the data
//! must get its pong, and the close handshake must finish without waiting for a timeout.

use crate::common;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use qmigrate_transport::protocol::{self, Hello, Reply, MAX_FRAME};
use qmigrate_transport::{Endpoint, Scheme, Transport, TunnelStream, WebSocket};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Limit for a whole exchange.
const TEST: Duration = Duration::from_secs(120);

/// The large transfer: a few hundred MiB each way.
const BIG: u64 = 300 << 20;

/// What tungstenite's side sends in the middle of the data, expecting it back in a pong.
const PING: &[u8] = b"still there?";

/// Their side's message sizes: the edges of every header length form and of the limit first,
/// then pseudo-random ones up to the limit.
fn their_sizes() -> impl Iterator<Item = usize> {
    let edges = [
        1,
        125,
        126,
        127,
        65535,
        65536,
        65537,
        MAX_FRAME,
        MAX_FRAME - 1,
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let random = std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Mostly small and medium messages, now and then a large one.
        let limit = [200, 70_000, MAX_FRAME][(x % 3) as usize];
        1 + (x >> 8) as usize % limit
    });
    edges.into_iter().chain(random)
}

/// Runs the handshake and then both data streams at once between our end (`ours`) and
/// tungstenite's (`theirs`): `up` bytes from ours to theirs, `down` bytes back. Then both close.
async fn exchange(ours: TunnelStream, theirs: WebSocketStream<TcpStream>, up: u64, down: u64) {
    let mut ours = ours;
    let (mut their_tx, mut their_rx) = theirs.split();

    // The handshake: one envelope a binary message, byte for byte.
    let hello = Hello::data("00000000000000f1", 3);
    their_tx
        .send(Message::binary(protocol::encode(&hello)))
        .await
        .expect("their hello");
    let got: Hello = ours
        .recv_msg()
        .await
        .expect("our side reads their envelope");
    assert_eq!(protocol::encode(&got), protocol::encode(&hello));
    let reply = Reply::Accept {
        version: 1,
        software: "qmigrate test".into(),
        mac: None,
    };
    ours.send_msg(&reply).await.expect("our reply");
    match their_rx.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &protocol::encode(&reply)[..]),
        other => panic!("tungstenite got {other:?} instead of our envelope"),
    }

    // The data, both ways at once.
    let (up_pattern, down_pattern) = (Pattern::new(21), Pattern::new(22));
    let (mut rd, mut wr) = ours.into_split();
    let counts = (AtomicU64::new(0), AtomicU64::new(0));
    let our_send = async {
        // A Unix socket pair, as the relay reads QEMU's socket.
        let (mut src_wr, mut src_rd) = UnixStream::pair().expect("socket pair");
        let feed = async {
            send(&mut src_wr, &up_pattern, up)
                .await
                .map_err(|(at, e)| format!("feeding our writer at {at}: {e}"))
        };
        let (fed, sent) = tokio::join!(feed, wr.pump_from(&mut src_rd, &counts.0));
        fed.expect("feed");
        sent.expect("our side sends");
    };
    let our_recv = async {
        let (mut sink_wr, mut sink_rd) = tokio::io::duplex(1 << 20);
        let (pumped, got) = tokio::join!(
            rd.pump_to(&mut sink_wr, &counts.1),
            recv(&mut sink_rd, &down_pattern)
        );
        pumped.expect("our side receives");
        got.assert_exact(down, "tungstenite -> ours");
    };
    let their_send = async {
        let mut pos = 0u64;
        let mut pinged = false;
        for size in their_sizes() {
            if pos >= down {
                break;
            }
            if !pinged && pos >= down / 2 {
                their_tx
                    .send(Message::Ping(PING.to_vec().into()))
                    .await
                    .expect("their ping");
                pinged = true;
            }
            let n = size.min((down - pos) as usize);
            their_tx
                .send(Message::binary(down_pattern.bytes(pos, n)))
                .await
                .expect("their data");
            pos += n as u64;
        }
        if !pinged {
            their_tx
                .send(Message::Ping(PING.to_vec().into()))
                .await
                .expect("their ping");
        }
        their_tx
            .send(Message::binary(Vec::new()))
            .await
            .expect("their end marker");
        their_tx
    };
    let their_recv = async {
        let mut pos = 0u64;
        let mut pong = false;
        loop {
            match their_rx.next().await {
                Some(Ok(Message::Binary(b))) if b.is_empty() => break,
                Some(Ok(Message::Binary(b))) => {
                    assert!(b.len() <= MAX_FRAME, "a message of {} bytes", b.len());
                    assert!(
                        b[..] == up_pattern.bytes(pos, b.len())[..],
                        "ours -> tungstenite: wrong bytes in the message at {pos}"
                    );
                    pos += b.len() as u64;
                }
                Some(Ok(Message::Pong(p))) => {
                    assert_eq!(&p[..], PING);
                    pong = true;
                }
                other => panic!("tungstenite got {other:?} at {pos} of {up}"),
            }
        }
        assert_eq!(pos, up, "ours -> tungstenite: the stream's length");
        (their_rx, pong)
    };
    let ((), (), their_tx, (their_rx, mut pong)) =
        tokio::join!(our_send, our_recv, their_send, their_recv);

    // The close handshake, both at once: our finish ends well before its timeout.
    let started = Instant::now();
    let their_close = async {
        let mut ws = their_tx.reunite(their_rx).expect("the same stream");
        ws.close(None).await.expect("their close");
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Pong(p)) if &p[..] == PING => pong = true,
                Ok(Message::Close(_) | Message::Pong(_)) => {}
                Ok(other) => panic!("after the end, tungstenite got {other:?}"),
                Err(e) => panic!("tungstenite's close failed: {e}"),
            }
        }
    };
    // Their close frame is the acknowledgement that protocol version 2 requires.
    let (ours, ()) = tokio::join!(
        TunnelStream::finish(rd, wr, protocol::PROTOCOL_MAX),
        their_close
    );
    ours.expect("tungstenite's close frame counts as the acknowledgement");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the close handshake took {:?}: one side waited for the other's close frame",
        started.elapsed()
    );
    assert!(pong, "no pong came back for the ping");
}

/// Their client, our server.
async fn their_client_our_server(up: u64, down: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let url = Endpoint::parse(&format!("ws://{addr}/interop"), Scheme::Ws).expect("url");
    let ours = async {
        let (tcp, _) = listener.accept().await.expect("accept");
        WebSocket::default().accept(tcp).await.expect("our upgrade")
    };
    let theirs = async {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        let (ws, _) = tokio_tungstenite::client_async(url.to_string(), tcp)
            .await
            .expect("their upgrade");
        ws
    };
    let (ours, theirs) = tokio::join!(ours, theirs);
    within(TEST, "the exchange", exchange(ours, theirs, up, down)).await;
}

/// Our client, their server.
async fn our_client_their_server(up: u64, down: u64) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let url = Endpoint::parse(&format!("ws://{addr}/interop"), Scheme::Ws).expect("url");
    let theirs = async {
        let (tcp, _) = listener.accept().await.expect("accept");
        tcp.set_nodelay(true).expect("nodelay");
        tokio_tungstenite::accept_async(tcp)
            .await
            .expect("their upgrade")
    };
    let ws = WebSocket::default();
    let (ours, theirs) = tokio::join!(ws.connect(&url), theirs);
    let ours = ours.expect("our upgrade");
    within(TEST, "the exchange", exchange(ours, theirs, up, down)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_our_server_small() {
    for (up, down) in [
        (0, 0),
        (1, 0),
        (0, 1),
        (65537, 1),
        (1, 65537),
        (65537, 65537),
    ] {
        their_client_our_server(up, down).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_their_server_small() {
    for (up, down) in [
        (0, 0),
        (1, 0),
        (0, 1),
        (65537, 1),
        (1, 65537),
        (65537, 65537),
    ] {
        our_client_their_server(up, down).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn their_client_our_server_big() {
    their_client_our_server(BIG, BIG + 12345).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_client_their_server_big() {
    our_client_their_server(BIG + 12345, BIG).await;
}
