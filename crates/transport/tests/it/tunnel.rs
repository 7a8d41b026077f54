//! The tunnel end to end, in-process: a fake source QEMU talks to a [`Client`], which carries
//! each connection over TCP or WebSocket to a [`Server`], which connects it to a fake
//! destination QEMU. Every scenario runs once per transport (`tcp::*` and `ws::*`), and the
//! data-path ones also over TLS (`tls::*`, `wss::*`).
//!
//! [`Client`]: qmigrate_transport::Client
//! [`Server`]: qmigrate_transport::Server

use crate::common;

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use qmigrate_testkit::per_scheme;
use qmigrate_transport::protocol::{
    self, Hello, RejectReason, Reply, MAGIC, PROTOCOL_MAX, PROTOCOL_MIN,
};
use qmigrate_transport::{
    AnyTransport, Client, ClientConfig, Endpoint, Error, Report, Scheme, Transport, TunnelStream,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// Limit for a whole test, on top of the limit on each step: a bound for a hang, wide enough
/// for the 200 MiB transfer of a debug build on two shared cores.
const TEST: Duration = Duration::from_secs(150);

per_scheme!(
    tcp = Scheme::Tcp, ws = Scheme::Ws; within TEST;
    small_transfers_are_byte_exact,
    big_transfer_with_return_traffic,
    concurrent_connections_keep_their_order_and_data,
    half_close_source_first,
    half_close_destination_first,
    destination_socket_appears_late,
    destination_socket_never_appears,
    garbage_does_not_reach_the_destination,
    server_killed_while_flowing,
    server_killed_with_source_bytes_unread,
    version_mismatch_is_rejected,
    client_socket_rules,
    once_returns_after_the_first_session,
    without_once_serves_until_cancelled,
    a_cut_upstream_fails_at_both_ends,
    a_cut_downstream_fails_at_both_ends,
    a_version_1_client_ends_as_before,
    a_version_1_server_ends_as_before,
    a_hello_without_a_required_field_is_a_bad_request,
);

// The same data-path scenarios over TLS (`tls::*`) and WebSocket over TLS (`wss::*`), with a
// test CA made at test time; TLS's own failures are in tls.rs.
per_scheme!(
    tls = Scheme::Tls, wss = Scheme::Wss; within TEST;
    small_transfers_are_byte_exact,
    big_transfer_with_return_traffic,
    concurrent_connections_keep_their_order_and_data,
    half_close_source_first,
    half_close_destination_first,
    destination_socket_appears_late,
    destination_socket_never_appears,
    server_killed_while_flowing,
    server_killed_with_source_bytes_unread,
    once_returns_after_the_first_session,
    without_once_serves_until_cancelled,
    a_cut_upstream_fails_at_both_ends,
    a_cut_downstream_fails_at_both_ends
);

/// Checks a report's connection and byte counts. `sent` is what went into the tunnel from the
/// report owner's Unix side, `received` what came out of it.
#[track_caller]
fn assert_report(
    report: &Report,
    what: &str,
    connections: u64,
    failed: u64,
    sent: u64,
    received: u64,
) {
    assert_eq!(
        (
            report.connections,
            report.failed,
            report.to_tunnel,
            report.from_tunnel
        ),
        (connections, failed, sent, received),
        "{what} report (connections, failed, sent, received): {report}"
    );
}

/// One connection through `t`: `up` bytes source -> destination while `down` bytes flow back,
/// each direction then half-closed; both must arrive byte for byte.
async fn exchange(t: &Tunnel, dest: &UnixListener, up: u64, down: u64) {
    let what = format!("{:?}, {up} bytes up, {down} down", t.scheme);
    let source = t.source_connect().await;
    // A bound for a hang, not a speed test: a debug build moves 200 MiB through ws/wss in
    // 11-15 s of CPU, and the tests share two cores; 1 s more per 2 MiB carried.
    let limit = STEP + Duration::from_secs((up + down) >> 21);
    let (at_source, at_dest) = within(limit, &format!("{what}: the transfer"), async {
        tokio::join!(
            duplex(source, Pattern::new(1), up, Pattern::new(2)),
            async { duplex(accept(dest).await, Pattern::new(2), down, Pattern::new(1)).await },
        )
    })
    .await;
    at_dest.assert_exact(up, &format!("{what}: at the destination"));
    at_source.assert_exact(down, &format!("{what}: at the source"));
}

/// A tunnel with `once` carrying one [`exchange`]; checks both reports and that the client
/// removed its socket when it returned.
async fn transfer(scheme: Scheme, up: u64, down: u64) {
    let what = format!("{scheme:?}, {up} bytes up, {down} down");
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    exchange(&t, &dest, up, down).await;
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, &format!("{what}: client"), 1, 0, up, down);
    assert_report(&server, &format!("{what}: server"), 1, 0, down, up);
    assert!(
        !t.source.exists(),
        "{what}: the client removes its socket when it returns"
    );
}

async fn small_transfers_are_byte_exact(scheme: Scheme) {
    for (up, down) in [(0, 0), (1, 0), (0, 1), (1, 1), (65537, 65537), (65537, 3)] {
        transfer(scheme, up, down).await;
    }
}

async fn big_transfer_with_return_traffic(scheme: Scheme) {
    transfer(scheme, 200 << 20, 3 << 20).await;
}

/// Eight connections of one migration, open at once, each with its own data both ways. The
/// destination must get them as eight connections in the order the source opened them, each
/// with its own bytes.
async fn concurrent_connections_keep_their_order_and_data(scheme: Scheme) {
    const N: u64 = 8;
    let up = |i: u64| (1 << 20) + i * 4099;
    let down = |i: u64| (64 << 10) + i * 7;
    let up_pattern = |i: u64| Pattern::new(100 + i);
    let down_pattern = |i: u64| Pattern::new(200 + i);
    // Enough to tell the streams apart.
    const ID: usize = 64;

    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    // Connect one after the other: the order the client accepts them is the order QEMU opened
    // them in, and the order the destination must see.
    let mut sources = Vec::new();
    for _ in 0..N {
        sources.push(t.source_connect().await);
    }
    let sources: Vec<_> = sources
        .into_iter()
        .zip(0..)
        .map(|(s, i)| tokio::spawn(duplex(s, up_pattern(i), up(i), down_pattern(i))))
        .collect();

    let mut order = Vec::new();
    let mut dests = Vec::new();
    for k in 0..N {
        let mut conn = accept(&dest).await;
        let mut first = [0u8; ID];
        within(
            STEP,
            "the first bytes of a destination connection",
            conn.read_exact(&mut first),
        )
        .await
        .expect("read the first bytes at the destination");
        let Some(i) = (0..N).find(|&i| up_pattern(i).bytes(0, ID) == first) else {
            panic!("destination connection #{k} carries none of the source streams: {first:02x?}");
        };
        order.push(i);
        dests.push(tokio::spawn(async move {
            let (mut rd, mut wr) = conn.into_split();
            let (expect, reply) = (up_pattern(i), down_pattern(i));
            let (got, sent) = tokio::join!(
                recv_from(&mut rd, &expect, ID as u64, u64::MAX),
                send(&mut wr, &reply, down(i)),
            );
            if let Err((at, e)) = sent {
                panic!("destination connection of stream {i}: send failed at byte {at}: {e}");
            }
            (i, got)
        }));
    }
    assert_eq!(
        order,
        (0..N).collect::<Vec<_>>(),
        "the destination got the streams in this order, not the source's"
    );
    for d in dests {
        let (i, got) = within(STEP, "a destination connection", d)
            .await
            .expect("destination task");
        got.assert_exact(up(i), &format!("stream {i} at the destination"));
    }
    for (i, s) in (0..).zip(sources) {
        let got = within(STEP, "a source connection", s)
            .await
            .expect("source task");
        got.assert_exact(down(i), &format!("stream {i} at the source"));
    }

    let (server, client) = (t.server_report().await, t.client_report().await);
    let (total_up, total_down) = ((0..N).map(up).sum(), (0..N).map(down).sum());
    assert_report(&client, "client", N, 0, total_up, total_down);
    assert_report(&server, "server", N, 0, total_down, total_up);
}

/// The source ends its stream first: the destination sees EOF at once, then sends for a while
/// (QEMU's return path after the source is done) and the source gets every byte.
async fn half_close_source_first(scheme: Scheme) {
    let (up, down) = (300_001, 500_003);
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let (mut src_rd, mut src_wr) = t.source_connect().await.into_split();
    let (mut dst_rd, mut dst_wr) = accept(&dest).await.into_split();

    within(
        STEP,
        "the source to send",
        send(&mut src_wr, &Pattern::new(1), up),
    )
    .await
    .expect("source send");
    let got = within(
        STEP,
        "EOF at the destination",
        recv(&mut dst_rd, &Pattern::new(1)),
    )
    .await;
    got.assert_exact(up, "source -> destination, before anything went back");

    // No timer may end the connection once one direction is over.
    tokio::time::sleep(Duration::from_millis(500)).await;
    within(
        STEP,
        "the destination to send",
        write_range(&mut dst_wr, &Pattern::new(2), 0, down / 2),
    )
    .await
    .expect("destination send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    within(
        STEP,
        "the destination to send",
        send_range(&mut dst_wr, &Pattern::new(2), down / 2, down),
    )
    .await
    .expect("destination send");
    let got = within(
        STEP,
        "EOF at the source",
        recv(&mut src_rd, &Pattern::new(2)),
    )
    .await;
    got.assert_exact(down, "destination -> source, after the source's half-close");

    drop((src_rd, src_wr, dst_rd, dst_wr));
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, "client", 1, 0, up, down);
    assert_report(&server, "server", 1, 0, down, up);
}

/// The mirror image: the destination ends first, the source keeps sending.
async fn half_close_destination_first(scheme: Scheme) {
    let (up, down) = (700_001, 90_001);
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let (mut src_rd, mut src_wr) = t.source_connect().await.into_split();
    let (mut dst_rd, mut dst_wr) = accept(&dest).await.into_split();

    within(
        STEP,
        "the destination to send",
        send(&mut dst_wr, &Pattern::new(2), down),
    )
    .await
    .expect("destination send");
    let got = within(
        STEP,
        "EOF at the source",
        recv(&mut src_rd, &Pattern::new(2)),
    )
    .await;
    got.assert_exact(
        down,
        "destination -> source, before anything went the other way",
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    within(
        STEP,
        "the source to send",
        send(&mut src_wr, &Pattern::new(1), up),
    )
    .await
    .expect("source send");
    let got = within(
        STEP,
        "EOF at the destination",
        recv(&mut dst_rd, &Pattern::new(1)),
    )
    .await;
    got.assert_exact(
        up,
        "source -> destination, after the destination's half-close",
    );

    drop((src_rd, src_wr, dst_rd, dst_wr));
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, "client", 1, 0, up, down);
    assert_report(&server, "server", 1, 0, down, up);
}

/// `migrate-incoming` may run after the tunnel is up: the server retries until the destination
/// socket exists, and the source's first bytes wait meanwhile.
async fn destination_socket_appears_late(scheme: Scheme) {
    let (up, down) = ((1 << 20) + 5, 1001);
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let source = t.source_connect().await;
    let src = tokio::spawn(duplex(source, Pattern::new(1), up, Pattern::new(2)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !src.is_finished(),
        "the source connection ended before the destination existed"
    );
    let dest = t.dest_listener();
    let at_dest = within(STEP, "the destination side", async {
        duplex(accept(&dest).await, Pattern::new(2), down, Pattern::new(1)).await
    })
    .await;
    let at_source = within(STEP, "the source side", src)
        .await
        .expect("source task");
    at_dest.assert_exact(up, "source -> late destination");
    at_source.assert_exact(down, "late destination -> source");
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, "client", 1, 0, up, down);
    assert_report(&server, "server", 1, 0, down, up);
}

/// No destination within the server's connect timeout (no socket file, then a stale one that
/// nobody listens on): the source connection is closed with its bytes unread, which the source
/// sees as a reset rather than a clean end, and both reports count a failed connection.
async fn destination_socket_never_appears(scheme: Scheme) {
    let opts = Opts {
        connect_timeout: Duration::from_secs(1),
        ..Opts::default()
    };
    for stale in [false, true] {
        let what = if stale {
            "a stale destination socket"
        } else {
            "no destination socket"
        };
        let mut t = Tunnel::start(scheme, opts.clone()).await;
        if stale {
            drop(std::os::unix::net::UnixListener::bind(&t.dest).expect("bind"));
        }
        let (mut rd, mut wr) = t.source_connect().await.into_split();
        within(
            STEP,
            "the source to send",
            send(&mut wr, &Pattern::new(1), 1000),
        )
        .await
        .expect("source send");
        let (n, err) = read_until_closed(&mut rd, "the source connection to be closed").await;
        assert_eq!(n, 0, "{what}: the source got bytes from nowhere");
        let kind = err.as_ref().map(std::io::Error::kind);
        assert_eq!(
            kind,
            Some(std::io::ErrorKind::ConnectionReset),
            "{what}: the source must see its connection reset (its bytes were never taken), got {err:?}"
        );
        let (server, client) = (t.server_report().await, t.client_report().await);
        assert_report(&client, &format!("{what}: client"), 1, 1, 0, 0);
        assert_report(&server, &format!("{what}: server"), 1, 1, 0, 0);
        assert_eq!(
            t.dest.exists(),
            stale,
            "{what}: the server created the socket file"
        );
    }
}

/// The network loses the client-to-server direction after the server has ended its own
/// stream (and, on tcp:// and tls://, its write side): the source's last bytes and its end
/// marker never arrive, and the destination holds a prefix. Neither end may call that
/// connection complete, the client included, although everything it sent left it and
/// everything it expected arrived.
async fn a_cut_upstream_fails_at_both_ends(scheme: Scheme) {
    cut_after_the_far_end(scheme, Direction::Up).await;
}

/// The mirror image: the server-to-client direction is lost after the client has ended its
/// stream, while the destination's last bytes (QEMU's return path) are on their way.
async fn a_cut_downstream_fails_at_both_ends(scheme: Scheme) {
    cut_after_the_far_end(scheme, Direction::Down).await;
}

/// One connection through a [`CutProxy`]: the side that does not lose its direction ends
/// its stream first and that end arrives; then `way` is cut and its sender sends more and
/// ends. Both reports must count the connection failed, and the receiver behind the cut must
/// hold a correct prefix and nothing after the cut.
async fn cut_after_the_far_end(scheme: Scheme, way: Direction) {
    let what = format!("{scheme:?}, {way:?} cut");
    let mut t = Tunnel::start(
        scheme,
        Opts {
            proxy: true,
            ..Opts::default()
        },
    )
    .await;
    let dest = t.dest_listener();
    let source = t.source_connect().await;
    let destination = accept(&dest).await;
    // The side whose direction is cut (`cut_*`) and the other one (`far_*`).
    let ((mut cut_rd, mut cut_wr), (mut far_rd, mut far_wr), cut_pattern, far_pattern) = match way {
        Direction::Up => (
            source.into_split(),
            destination.into_split(),
            Pattern::new(1),
            Pattern::new(2),
        ),
        Direction::Down => (
            destination.into_split(),
            source.into_split(),
            Pattern::new(2),
            Pattern::new(1),
        ),
    };
    let (before, after, far_len) = (100_003u64, 70_001u64, 50_001u64);
    within(STEP, &format!("{what}: before the cut"), async {
        let (sent, ended, got) = tokio::join!(
            write_range(&mut cut_wr, &cut_pattern, 0, before),
            send(&mut far_wr, &far_pattern, far_len),
            recv_from(&mut far_rd, &cut_pattern, 0, before),
        );
        sent.expect("the first bytes");
        ended.expect("the far side's stream");
        got.assert_exact(before, &format!("{what}: before the cut"));
        // The far side's end arrived: its direction is over.
        recv(&mut cut_rd, &far_pattern)
            .await
            .assert_exact(far_len, &format!("{what}: the far side's stream"));
    })
    .await;

    t.proxy.as_ref().expect("a proxy").cut(way);
    // The proxy takes these; they go no further.
    let _ = send_range(&mut cut_wr, &cut_pattern, before, before + after).await;
    let rest = within(
        STEP,
        &format!("{what}: the far side's connection to end"),
        recv_from(&mut far_rd, &cut_pattern, before, u64::MAX),
    )
    .await;
    rest.assert_prefix(&what);
    assert_eq!(rest.len, before, "{what}: bytes after the cut arrived");

    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_eq!(
        (client.connections, client.failed),
        (1, 1),
        "{what}: the client called a cut stream complete: {client}"
    );
    assert_eq!(
        (server.connections, server.failed),
        (1, 1),
        "{what}: the server called a cut stream complete: {server}"
    );
}

/// What a version-1 peer sends as its stream: `data` in one frame or message, then the end
/// marker and (TCP) the FIN right after it, as qmigrate did before the acknowledged end.
async fn v1_send(peer: &mut Peer, data: &[u8]) {
    let mut wire = Vec::new();
    match peer {
        Peer::Tcp(tcp) => {
            wire.extend_from_slice(&(data.len() as u32).to_be_bytes());
            wire.extend_from_slice(data);
            wire.extend_from_slice(&[0; 4]);
            tcp.write_all(&wire).await.expect("a version-1 stream");
            tcp.shutdown().await.expect("a version-1 FIN");
        }
        Peer::Ws(_) => {
            peer.send_raw(data.to_vec()).await.expect("data");
            peer.send_raw(Vec::new()).await.expect("the end marker");
        }
    }
}

/// What a version-1 peer reads: the stream up to the end marker, and no further.
async fn v1_recv(peer: &mut Peer) -> Vec<u8> {
    let mut data = Vec::new();
    within(STEP, "a version-1 stream", async {
        match peer {
            Peer::Tcp(tcp) => loop {
                let mut header = [0u8; 4];
                tcp.read_exact(&mut header).await.expect("a frame header");
                let len = u32::from_be_bytes(header) as usize;
                if len == 0 {
                    break;
                }
                let at = data.len();
                data.resize(at + len, 0);
                tcp.read_exact(&mut data[at..]).await.expect("a frame");
            },
            Peer::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(msg)) if msg.is_binary() && msg.is_empty() => break,
                    Some(Ok(msg)) if msg.is_binary() => data.extend_from_slice(&msg.into_data()),
                    other => panic!("before the end marker: {other:?}"),
                }
            },
        }
    })
    .await;
    data
}

/// After both end markers, what a version-1 peer sees: the end of the connection (TCP) or a
/// close frame (WebSocket, answered by tungstenite), never an acknowledgement, which it would
/// take for bytes after the end.
async fn v1_after_end(peer: &mut Peer) {
    within(STEP, "the end of a version-1 connection", async {
        match peer {
            Peer::Tcp(tcp) => {
                let mut rest = Vec::new();
                let _ = tcp.read_to_end(&mut rest).await;
                assert!(rest.is_empty(), "bytes after the end marker: {rest:?}");
            }
            Peer::Ws(ws) => {
                while let Some(msg) = ws.next().await {
                    match msg {
                        Ok(msg) if msg.is_close() => {}
                        Err(_) => break,
                        Ok(other) => panic!("after the end marker: {other:?}"),
                    }
                }
            }
        }
    })
    .await;
}

/// A client that offers only version 1 (an older qmigrate) at this server: `accept` names
/// version 1, and the server ends the connection as version 1 did (no acknowledgement, which
/// the old client would take for bytes after the end) and calls it complete.
async fn a_version_1_client_ends_as_before(scheme: Scheme) {
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let mut peer = Peer::connect(&t.url).await;
    let hello = Hello {
        max_version: 1,
        ..Hello::data("00000000000000d1", 0)
    };
    peer.send_msg(&hello).await.expect("hello");
    let reply: Reply = within(STEP, "the accept", peer.recv_msg())
        .await
        .expect("the accept");
    assert!(
        matches!(reply, Reply::Accept { version: 1, .. }),
        "{reply:?}"
    );
    let (up, down) = (
        Pattern::new(1).bytes(0, 70_001),
        Pattern::new(2).bytes(0, 50_001),
    );
    let (mut dst_rd, mut dst_wr) = accept(&dest).await.into_split();
    let (p1, p2) = (Pattern::new(1), Pattern::new(2));
    let old_client = async {
        v1_send(&mut peer, &up).await;
        let got = v1_recv(&mut peer).await;
        v1_after_end(&mut peer).await;
        got
    };
    let (got, at_dest, sent) = tokio::join!(
        old_client,
        recv(&mut dst_rd, &p1),
        send(&mut dst_wr, &p2, down.len() as u64),
    );
    sent.expect("the destination's stream");
    at_dest.assert_exact(up.len() as u64, "at the destination");
    assert!(got == down, "the version-1 client got other bytes");
    let server = t.server_report().await;
    assert_report(&server, "server", 1, 0, down.len() as u64, up.len() as u64);
}

/// This client at a server that speaks only version 1: it ends the connection as version 1
/// did and calls it complete.
async fn a_version_1_server_ends_as_before(scheme: Scheme) {
    capture_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = Endpoint::parse(
        &format!(
            "{}://{}/",
            scheme.name(),
            listener.local_addr().expect("addr")
        ),
        scheme,
    )
    .expect("url");
    let source = dir.path().join("source.sock");
    let client = Client::bind(
        &source,
        ClientConfig {
            once: true,
            ..ClientConfig::new(url)
        },
    )
    .expect("client");
    let client = tokio::spawn(client.serve(tokio_util::sync::CancellationToken::new()));
    let (up, down) = (
        Pattern::new(1).bytes(0, 70_001),
        Pattern::new(2).bytes(0, 50_001),
    );
    let old_server = async {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut peer = Peer::accept(tcp, scheme).await.expect("the upgrade");
        let hello: Hello = peer.recv_msg().await.expect("hello");
        assert_eq!(hello.min_version, 1, "{hello:?}");
        peer.send_msg(&Reply::Accept {
            version: 1,
            software: "qmigrate 0.0.1".into(),
            mac: None,
        })
        .await
        .expect("accept");
        let got = v1_recv(&mut peer).await;
        assert!(got == up, "the version-1 server got other bytes");
        v1_send(&mut peer, &down).await;
        v1_after_end(&mut peer).await;
    };
    let at_source = async {
        let s = UnixStream::connect(&source).await.expect("connect");
        duplex(s, Pattern::new(1), up.len() as u64, Pattern::new(2)).await
    };
    let ((), at_source) = within(STEP, "a version-1 server", async {
        tokio::join!(old_server, at_source)
    })
    .await;
    at_source.assert_exact(down.len() as u64, "at the source");
    let client = within(STEP, "the client to return", client)
        .await
        .expect("client");
    assert_report(&client, "client", 1, 0, up.len() as u64, down.len() as u64);
}

/// Sends `bytes` on a plain TCP connection to the server, half-closes, and waits for the
/// server to hang up.
async fn send_garbage(url: &Endpoint, bytes: &[u8], what: &str) {
    let mut tcp = within(STEP, what, TcpStream::connect(url.authority()))
        .await
        .expect("connect to the server");
    // The server may hang up before it read everything: a failed write is fine.
    let _ = tcp.write_all(bytes).await;
    let _ = tcp.shutdown().await;
    read_until_closed(&mut tcp, &format!("the server to hang up on {what}")).await;
}

/// Waits until the server closes a WebSocket connection.
async fn ws_closed(peer: Peer, what: &str) {
    let Peer::Ws(mut ws) = peer else {
        panic!("{what}: not a WebSocket")
    };
    within(STEP, &format!("the server to hang up on {what}"), async {
        while let Some(Ok(msg)) = ws.next().await {
            assert!(
                msg.is_close() || msg.is_ping() || msg.is_pong(),
                "{what}: the server answered {msg:?}"
            );
        }
    })
    .await;
}

/// Opens a tunnel connection to the server with `url`'s transport (without a hello).
async fn open(url: &Endpoint) -> Result<TunnelStream, qmigrate_transport::Error> {
    within(
        STEP,
        "connect to the server",
        AnyTransport::for_scheme(url.scheme).connect(url),
    )
    .await
}

/// Random bytes, HTTP, a foreign envelope, the other transport: the server hangs up on each,
/// touches nothing, and still serves a good connection afterwards.
async fn garbage_does_not_reach_the_destination(scheme: Scheme) {
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let url = t.url.clone();

    send_garbage(&url, &Pattern::new(9).bytes(0, 4096), "random bytes").await;
    send_garbage(&url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "an HTTP GET").await;
    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    send_garbage(&url, &huge, "an envelope of 4 GiB").await;
    let mut bad_json = MAGIC.to_vec();
    bad_json.extend_from_slice(&5u32.to_be_bytes());
    bad_json.extend_from_slice(b"{\"a\":");
    send_garbage(&url, &bad_json, "an envelope of broken JSON").await;
    let hello = protocol::encode(&Hello::data("00000000000000aa", 0));
    send_garbage(&url, &hello[..hello.len() - 3], "a truncated hello").await;

    // The other transport's client, as an operator who mixed up the URLs would run it.
    let other = Endpoint {
        scheme: match scheme {
            Scheme::Tcp => Scheme::Ws,
            Scheme::Ws => Scheme::Tcp,
            other => unreachable!("a plain scheme only: {other:?}"),
        },
        ..url.clone()
    };
    let answer = async {
        let mut s = open(&other).await?;
        s.send_msg(&Hello::data("00000000000000bb", 0)).await?;
        s.recv_msg::<Reply>().await
    };
    let answer = within(STEP, "the wrong transport's handshake", answer).await;
    assert!(
        answer.is_err(),
        "a {other} client got an answer from a {url} server: {answer:?}"
    );

    if scheme == Scheme::Ws {
        let mut s = Peer::connect(&url).await;
        s.send_text("hello").await.expect("send a text message");
        ws_closed(s, "a text message").await;

        let mut s = Peer::connect(&url).await;
        let junk = Pattern::new(10).bytes(0, 100);
        s.send_raw(junk).await.expect("send a binary message");
        ws_closed(s, "a binary message of random bytes").await;

        let mut s = Peer::connect(&url).await;
        let mut big = hello.clone();
        big.resize(2 << 20, b' ');
        // The server may close before the whole message is sent.
        let _ = s.send_raw(big).await;
        ws_closed(s, "a 2 MiB message").await;
    }

    assert_no_connection(&dest, "after garbage").await;
    assert!(t.server_running(), "the server stopped after garbage");
    exchange(&t, &dest, 100_003, 50_001).await;
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, "client", 1, 0, 100_003, 50_001);
    assert_report(&server, "server", 1, 0, 50_001, 100_003);
}

/// The server goes away (its serve loop cancelled, its listener and connections dropped) in
/// the middle of an endless stream each way. The client sees its tunnel connection lost
/// without an end marker (a failed connection in its report) and drops the source
/// connection: the source's writes fail and what it read is a correct prefix. (A reader of a
/// Unix socket closed with nothing unread can only see EOF; QEMU's failed writes are then the
/// signal. See [`server_killed_with_source_bytes_unread`] for when a reset is owed.)
async fn server_killed_while_flowing(scheme: Scheme) {
    const ENDLESS: u64 = 1 << 40;
    const BEFORE: u64 = 8 << 20;
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let (mut src_rd, mut src_wr) = t.source_connect().await.into_split();
    let (mut dst_rd, mut dst_wr) = accept(&dest).await.into_split();
    let src_send = tokio::spawn(async move { send(&mut src_wr, &Pattern::new(1), ENDLESS).await });
    let src_recv = tokio::spawn(async move { recv(&mut src_rd, &Pattern::new(2)).await });
    let dst_send = tokio::spawn(async move { send(&mut dst_wr, &Pattern::new(2), ENDLESS).await });

    let got = within(
        STEP,
        "the first bytes at the destination",
        recv_from(&mut dst_rd, &Pattern::new(1), 0, BEFORE),
    )
    .await;
    got.assert_exact(BEFORE, "source -> destination before the server went away");
    let dst_recv =
        tokio::spawn(
            async move { recv_from(&mut dst_rd, &Pattern::new(1), BEFORE, u64::MAX).await },
        );
    t.server_stop.cancel();
    let server = t.server_report().await;
    assert_eq!(server.connections, 1, "server: {server}");

    let sent = within(STEP, "the source's send to fail", src_send)
        .await
        .expect("task");
    let Err((at, e)) = sent else {
        panic!("the source's endless send completed")
    };
    assert!(
        matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset),
        "the source's send failed at byte {at} with {e}"
    );
    let got = within(STEP, "the source's receive to end", src_recv)
        .await
        .expect("task");
    got.assert_prefix("destination -> source");
    let sent = within(STEP, "the destination's send to fail", dst_send)
        .await
        .expect("task");
    assert!(sent.is_err(), "the destination's endless send completed");
    let got = within(STEP, "the destination's receive to end", dst_recv)
        .await
        .expect("task");
    got.assert_prefix("source -> destination");

    let client = t.client_report().await;
    assert_eq!(
        (client.connections, client.failed),
        (1, 1),
        "client: {client}"
    );
}

/// The server goes away while the client holds source bytes it could not forward (the
/// destination stopped reading, so every buffer on the way filled up and the source's writes
/// stalled) and the destination's stream to the source is under way but idle. The client
/// must close the source connection with those bytes unread, which the kernel reports to the
/// source's reader as a reset: the source must never see a clean EOF of the destination's
/// unfinished stream. The source is as QEMU is: blocking reads on a thread of their own,
/// which wake the moment anything (a half-close, say) happens to the socket. Its writer has
/// given up before, since a blocked writer would take the one reset the kernel reports.
async fn server_killed_with_source_bytes_unread(scheme: Scheme) {
    const ENDLESS: u64 = 1 << 40;
    const BEFORE: u64 = 8 << 20;
    const DOWN: u64 = 1 << 20;
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let source = std::os::unix::net::UnixStream::connect(&t.source).expect("connect");
    source.set_read_timeout(Some(STEP)).expect("timeout");
    source.set_write_timeout(Some(QUIET)).expect("timeout");
    let (mut src_rd, mut src_wr) = (source.try_clone().expect("dup"), source);
    let src_send = on_thread(move || send_blocking(&mut src_wr, &Pattern::new(1), ENDLESS));
    let src_recv = on_thread(move || recv_blocking(&mut src_rd, &Pattern::new(2)));
    let (mut dst_rd, mut dst_wr) = accept(&dest).await.into_split();
    within(
        STEP,
        "the destination to send",
        write_range(&mut dst_wr, &Pattern::new(2), 0, DOWN),
    )
    .await
    .expect("destination send");
    let got = within(
        STEP,
        "the first bytes at the destination",
        recv_from(&mut dst_rd, &Pattern::new(1), 0, BEFORE),
    )
    .await;
    got.assert_exact(BEFORE, "source -> destination before the server went away");
    let sent = within(STEP, "the source's send to stall", src_send)
        .await
        .expect("thread");
    let Err((at, e)) = sent else {
        panic!("the source's endless send completed")
    };
    assert_eq!(
        e.kind(),
        ErrorKind::WouldBlock,
        "the source's send failed at byte {at} with {e}"
    );
    tokio::time::sleep(QUIET).await;
    t.server_stop.cancel();
    t.server_report().await;

    let got = within(STEP, "the source's receive to end", src_recv)
        .await
        .expect("thread");
    got.assert_prefix("destination -> source");
    assert_eq!(
        got.error.as_ref().map(std::io::Error::kind),
        Some(ErrorKind::ConnectionReset),
        "the source read {} bytes of a stream the server cut short, then {:?} instead of a \
         reset",
        got.len,
        got.error,
    );
    let client = t.client_report().await;
    assert_eq!(
        (client.connections, client.failed),
        (1, 1),
        "client: {client}"
    );
    drop((dst_rd, dst_wr));
}

/// Sends `json` in a hand-built envelope and returns the server's answer as JSON, after
/// checking that the server hangs up after it.
async fn raw_handshake(url: &Endpoint, json: &str) -> serde_json::Value {
    let mut envelope = b"QMTUNL\r\n".to_vec();
    envelope.extend_from_slice(&(json.len() as u32).to_be_bytes());
    envelope.extend_from_slice(json.as_bytes());
    let mut s = Peer::connect(url).await;
    s.send_raw(envelope).await.expect("send the hello");
    let reply: serde_json::Value = within(STEP, "the server's answer", s.recv_msg())
        .await
        .expect("the server's answer");
    let after = within(
        STEP,
        "the server to hang up",
        s.recv_msg::<serde_json::Value>(),
    )
    .await;
    assert!(
        after.is_err(),
        "the server sent more after {reply}: {after:?}"
    );
    reply
}

/// A client that speaks only version 99 is refused with the reason `version` and both sides'
/// versions; hellos this server cannot serve are `bad-request`. None touches the destination.
async fn version_mismatch_is_rejected(scheme: Scheme) {
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let hello = |extra: &str| {
        format!(
            r#"{{"min_version":99,"max_version":99,"software":"qmigrate 99.0.0","session":"00000000000000cc","seq":0,"purpose":"data"{extra}}}"#
        )
    };
    let reply = raw_handshake(&t.url, &hello("")).await;
    assert_eq!(reply["type"], "reject", "{reply}");
    assert_eq!(reply["reason"], "version", "{reply}");
    assert_eq!(
        reply["versions"],
        serde_json::json!([PROTOCOL_MIN, PROTOCOL_MAX]),
        "{reply}"
    );
    assert_eq!(reply["software"], protocol::software().as_str(), "{reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("99") && message.contains("qmigrate 99.0.0"),
        "the message names the client's versions: {reply}"
    );
    // The same through the library's types.
    let typed: Reply = serde_json::from_value(reply.clone()).expect("a Reply");
    assert!(
        matches!(
            typed,
            Reply::Reject {
                reason: RejectReason::Version,
                ..
            }
        ),
        "{typed:?}"
    );

    let v1 = |extra: &str| {
        hello(extra).replace(
            "\"min_version\":99,\"max_version\":99",
            "\"min_version\":1,\"max_version\":1",
        )
    };
    for (json, what) in [
        (
            v1("").replace("\"data\"", "\"control\""),
            "a control connection",
        ),
        (v1(r#","route":"vm2""#), "a route"),
    ] {
        let reply = raw_handshake(&t.url, &json).await;
        assert_eq!(
            (&reply["type"], &reply["reason"]),
            (&"reject".into(), &"bad-request".into()),
            "{what}: {reply}"
        );
    }

    assert_no_connection(&dest, "after refused hellos").await;
    exchange(&t, &dest, 1000, 1000).await;
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, "client", 1, 0, 1000, 1000);
    assert_report(&server, "server", 1, 0, 1000, 1000);
}

/// Where the client may create its socket: it replaces a stale socket, refuses a live one or
/// a file that is not a socket, and removes its socket when dropped.
async fn client_socket_rules(scheme: Scheme) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Never contacted: these tests only bind.
    let config = ClientConfig::new(Endpoint::parse("127.0.0.1:9", scheme).expect("endpoint"));
    let bind = |path: &std::path::Path| Client::bind(path, config.clone());

    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let e = std::os::unix::net::UnixStream::connect(&stale).expect_err("nobody listens");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused);
    let client = bind(&stale).expect("a stale socket is replaced");
    let meta = std::fs::symlink_metadata(&stale).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "the socket is private"
    );
    let _conn = UnixStream::connect(&stale)
        .await
        .expect("the new socket listens");
    drop(client);
    assert!(
        !stale.exists(),
        "the socket is removed when the client is dropped"
    );

    let live = dir.path().join("live.sock");
    let listener = UnixListener::bind(&live).expect("bind");
    let err = bind(&live).expect_err("a live socket is refused");
    assert!(
        matches!(
            &err,
            Error::UnixSocket {
                why: qmigrate_transport::UnixSocketFailure::InUse,
                ..
            }
        ),
        "{err}"
    );
    let _conn = UnixStream::connect(&live)
        .await
        .expect("the live socket is left alone");
    within(
        STEP,
        "the live socket's owner to get a connection",
        listener.accept(),
    )
    .await
    .expect("accept");

    let file = dir.path().join("file");
    std::fs::write(&file, "keep me").expect("write");
    let err = bind(&file).expect_err("a regular file is refused");
    assert!(
        matches!(
            &err,
            Error::UnixSocket {
                why: qmigrate_transport::UnixSocketFailure::NotASocket,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "keep me");

    let missing = dir.path().join("no-such-dir").join("x.sock");
    let err = bind(&missing).expect_err("a missing directory is an error");
    assert!(
        matches!(
            &err,
            Error::UnixSocket {
                why: qmigrate_transport::UnixSocketFailure::NoDirectory,
                ..
            }
        ),
        "{err}"
    );
}

/// With `once`, both ends keep serving while any connection of the first migration is open,
/// and return when the last one closes.
async fn once_returns_after_the_first_session(scheme: Scheme) {
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let a = t.source_connect().await;
    let b = t.source_connect().await;
    let (da, db) = (accept(&dest).await, accept(&dest).await);
    let both = |s, d, up, down| async move {
        let (at_source, at_dest) = tokio::join!(
            duplex(s, Pattern::new(1), up, Pattern::new(2)),
            duplex(d, Pattern::new(2), down, Pattern::new(1)),
        );
        at_source.assert_exact(down, "at the source");
        at_dest.assert_exact(up, "at the destination");
    };
    within(STEP, "the first connection", both(a, da, 5000, 7000)).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        t.server_running() && t.client_running(),
        "a tunnel end returned while the migration's second connection was open"
    );
    within(STEP, "the second connection", both(b, db, 3000, 1000)).await;
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_report(&client, "client", 2, 0, 8000, 8000);
    assert_report(&server, "server", 2, 0, 8000, 8000);
    assert!(
        !t.source.exists(),
        "the client removes its socket when it returns"
    );
}

/// Without `once`, both ends serve one migration after the other until cancelled.
async fn without_once_serves_until_cancelled(scheme: Scheme) {
    let opts = Opts {
        once: false,
        ..Opts::default()
    };
    let mut t = Tunnel::start(scheme, opts).await;
    let dest = t.dest_listener();
    exchange(&t, &dest, 4000, 2000).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        t.server_running() && t.client_running(),
        "a tunnel end without once returned after the first migration"
    );
    exchange(&t, &dest, 3000, 1000).await;
    // A connection still ending (the WebSocket close handshake) when the serve loop is
    // cancelled is dropped uncounted.
    tokio::time::sleep(QUIET).await;
    let (server, client) = t.stop().await;
    assert_report(&client, "client", 2, 0, 7000, 3000);
    assert_report(&server, "server", 2, 0, 3000, 7000);
    assert!(
        !t.source.exists(),
        "the client removes its socket when it returns"
    );
}

/// A hello without one of its required fields gets a `reject` with `bad-request` that names
/// the field, not a bare close; nothing touches the destination.
async fn a_hello_without_a_required_field_is_a_bad_request(scheme: Scheme) {
    let t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    for field in [
        "min_version",
        "max_version",
        "software",
        "session",
        "seq",
        "purpose",
    ] {
        let mut hello = serde_json::to_value(Hello::data("00000000000000f1", 0)).expect("json");
        hello.as_object_mut().expect("an object").remove(field);
        let reply = raw_handshake(&t.url, &hello.to_string()).await;
        assert_eq!(
            (&reply["type"], &reply["reason"]),
            (&"reject".into(), &"bad-request".into()),
            "without {field}: {reply}"
        );
        let message = reply["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "without {field}: {reply}");
    }
    assert_no_connection(&dest, "after hellos without a required field").await;
}

/// Reads what the server sends a tungstenite client until it closes: the binary messages,
/// and the status of its close frame (`None`: the connection ended without one).
async fn ws_until_close(peer: &mut Peer, what: &str) -> (Vec<Vec<u8>>, Option<u16>) {
    let Peer::Ws(ws) = peer else {
        panic!("{what}: not a WebSocket")
    };
    within(STEP, &format!("the server to close on {what}"), async {
        let mut messages = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => {
                    return (messages, frame.map(|f| u16::from(f.code)))
                }
                Some(Ok(msg)) if msg.is_binary() => messages.push(msg.into_data().to_vec()),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (messages, None),
            }
        }
    })
    .await
}

/// A WebSocket connection the server drops for a reason ends with a close frame whose status
/// says which: 1003 for a text message (before and after the `accept`), 1009 for a message
/// above the limit, 1008 after a `reject`.
#[tokio::test]
async fn ws_connections_dropped_for_a_reason_get_a_close_status() {
    let t = Tunnel::start(Scheme::Ws, Opts::default()).await;
    let dest = t.dest_listener();

    let mut s = Peer::connect(&t.url).await;
    s.send_text("hello").await.expect("send a text message");
    let (_, code) = ws_until_close(&mut s, "a text message").await;
    assert_eq!(code, Some(1003), "a text message");

    let mut s = Peer::connect(&t.url).await;
    let mut big = protocol::encode(&Hello::data("00000000000000f2", 0));
    big.resize(2 << 20, b' ');
    let _ = s.send_raw(big).await;
    let (_, code) = ws_until_close(&mut s, "a 2 MiB message").await;
    assert_eq!(code, Some(1009), "a 2 MiB message");

    let mut s = Peer::connect(&t.url).await;
    let hello = Hello {
        min_version: 99,
        max_version: 99,
        ..Hello::data("00000000000000f3", 0)
    };
    s.send_msg(&hello).await.expect("hello");
    let (messages, code) = ws_until_close(&mut s, "a refused hello").await;
    assert_eq!(messages.len(), 1, "the reject, then the close");
    let reply: Reply = protocol::decode(&messages[0]).expect("a reply");
    assert!(matches!(reply, Reply::Reject { .. }), "{reply:?}");
    assert_eq!(code, Some(1008), "after a reject");
    assert_no_connection(&dest, "after refused connections").await;

    let mut s = Peer::connect(&t.url).await;
    s.send_msg(&Hello::data("00000000000000f4", 0))
        .await
        .expect("hello");
    let _conn = accept(&dest).await;
    let reply: Reply = within(STEP, "the accept", s.recv_msg())
        .await
        .expect("the accept");
    assert!(matches!(reply, Reply::Accept { .. }), "{reply:?}");
    s.send_text("data?").await.expect("send a text message");
    let (_, code) = ws_until_close(&mut s, "a text message in the data stream").await;
    assert_eq!(code, Some(1003), "a text message in the data stream");
}

/// A version-2 client by hand, as one written from PROTOCOL.md would be: its stream, the end
/// marker and its acknowledgement in one write (it may send them together), and no FIN yet.
/// The server answers with its stream, its end, its acknowledgement and its FIN, byte for
/// byte as documented, and calls the connection complete at once: the client's FIN is not
/// what it waits for.
#[tokio::test]
async fn a_version_2_client_by_hand() {
    let mut t = Tunnel::start(Scheme::Tcp, Opts::default()).await;
    let dest = t.dest_listener();
    let mut peer = Peer::connect_at_version(&t.url, "00000000000000d9", 2).await;
    let (up, down) = (
        Pattern::new(1).bytes(0, 70_001),
        Pattern::new(2).bytes(0, 50_001),
    );
    let frames = |data: &[u8]| {
        let mut wire = (data.len() as u32).to_be_bytes().to_vec();
        wire.extend_from_slice(data);
        wire.extend_from_slice(&[0; 8]);
        wire
    };
    let Peer::Tcp(tcp) = &mut peer else {
        unreachable!("tcp")
    };
    tcp.write_all(&frames(&up))
        .await
        .expect("the client's stream");
    let (mut dst_rd, mut dst_wr) = accept(&dest).await.into_split();
    let (p1, p2) = (Pattern::new(1), Pattern::new(2));
    let (at_dest, sent) = tokio::join!(
        recv(&mut dst_rd, &p1),
        send(&mut dst_wr, &p2, down.len() as u64),
    );
    sent.expect("the destination's stream");
    at_dest.assert_exact(up.len() as u64, "at the destination");
    let mut wire = Vec::new();
    within(STEP, "the server's end", tcp.read_to_end(&mut wire))
        .await
        .expect("the server's stream and its end");
    assert!(
        wire == frames(&down),
        "the server's stream, end marker, acknowledgement and FIN"
    );
    let started = std::time::Instant::now();
    let server = t.server_report().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the server waited {:?} for the client's FIN",
        started.elapsed()
    );
    assert_report(&server, "server", 1, 0, down.len() as u64, up.len() as u64);
    drop(peer);
}
