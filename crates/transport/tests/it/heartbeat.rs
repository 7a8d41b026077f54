//! Protocol version 3 on `ws://` and `wss://`: each side pings while its direction is quiet,
//! and a side whose peer sends nothing for the dead-peer timeout drops the connection. A peer
//! that hangs after the upgrade (the TCP connection up, every byte acknowledged by its
//! kernel, so that keepalive and `TCP_USER_TIMEOUT` see nothing wrong) is noticed within the
//! timeout at both ends; a connection that is quiet, or busy one way only, lives on.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use qmigrate_transport::Scheme;
use tokio::io::AsyncWriteExt;

/// The tests' dead-peer timeout: the shortest the pings allow (three of their intervals).
const TIMEOUT: Duration = Duration::from_secs(3);

/// Opts for a tunnel with [`TIMEOUT`] at both ends.
fn opts(proxy: bool) -> Opts {
    Opts {
        proxy,
        dead_peer: Some(TIMEOUT),
        ..Opts::default()
    }
}

/// Reads until the connection ends and says how long that took from `since`.
async fn ended_after<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    since: Instant,
    what: &str,
) -> Duration {
    read_until_closed(r, what).await;
    since.elapsed()
}

async fn hung_peer_is_dropped(scheme: Scheme) {
    let mut t = Tunnel::start(scheme, opts(true)).await;
    let listener = t.dest_listener();
    let (mut src_rd, mut src_wr) = t.source_connect().await.into_split();
    let (mut dst_rd, mut dst_wr) = accept(&listener).await.into_split();
    let (up, down) = (Pattern::new(31), Pattern::new(32));
    const FIRST: u64 = 1 << 20;
    within(STEP, "the first MiB each way", async {
        write_range(&mut src_wr, &up, 0, FIRST)
            .await
            .expect("send up");
        write_range(&mut dst_wr, &down, 0, FIRST)
            .await
            .expect("send down");
        recv_from(&mut dst_rd, &up, 0, FIRST)
            .await
            .assert_exact(FIRST, "up");
        recv_from(&mut src_rd, &down, 0, FIRST)
            .await
            .assert_exact(FIRST, "down");
    })
    .await;

    t.proxy.as_ref().expect("the proxy").swallow();
    let cut = Instant::now();
    let (dst_ended, src_ended) = tokio::join!(
        ended_after(&mut dst_rd, cut, "the server to drop the hung connection"),
        ended_after(&mut src_rd, cut, "the client to drop the hung connection"),
    );
    for (side, took) in [("server", dst_ended), ("client", src_ended)] {
        eprintln!("{scheme:?}: the {side} dropped the hung peer {took:?} after it hung");
        // Its last frame may have come up to a ping interval before the hang.
        assert!(
            took >= TIMEOUT - Duration::from_millis(1500)
                && took <= TIMEOUT + Duration::from_secs(3),
            "the {side} dropped the connection {took:?} after the peer hung, timeout {TIMEOUT:?}"
        );
    }
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_eq!(
        (server.failed, client.failed),
        (1, 1),
        "{server:?} {client:?}"
    );
    let logs = log_text();
    assert!(
        logs.contains("the peer did not answer WebSocket pings for 3s"),
        "the error names the silence: {logs}"
    );
}

#[tokio::test]
async fn a_hung_peer_is_dropped_over_ws() {
    hung_peer_is_dropped(Scheme::Ws).await;
}

#[tokio::test]
async fn a_hung_peer_is_dropped_over_wss() {
    hung_peer_is_dropped(Scheme::Wss).await;
}

/// Longer than [`TIMEOUT`]: one way only, then nothing at all, then the other way. Each
/// side's pings keep the connection alive; both streams arrive whole and nothing fails.
#[tokio::test]
async fn a_quiet_or_one_way_connection_lives_on() {
    let mut t = Tunnel::start(Scheme::Ws, opts(false)).await;
    let listener = t.dest_listener();
    let (mut src_rd, mut src_wr) = t.source_connect().await.into_split();
    let (mut dst_rd, mut dst_wr) = accept(&listener).await.into_split();
    let (up, down) = (Pattern::new(41), Pattern::new(42));
    const PIECE: u64 = 64 * 1024;
    const ONE_WAY: Duration = Duration::from_secs(5);
    const QUIET_FOR: Duration = Duration::from_secs(5);
    const DOWN: u64 = 1 << 20;

    let source = async {
        // Up only, a piece every 100 ms: the client's reader sees nothing but pings.
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed() < ONE_WAY {
            write_range(&mut src_wr, &up, sent, sent + PIECE)
                .await
                .expect("send up");
            sent += PIECE;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Then nothing either way, then the destination's stream.
        tokio::time::sleep(QUIET_FOR).await;
        src_wr.shutdown().await.expect("end up");
        let got = recv_from(&mut src_rd, &down, 0, u64::MAX).await;
        (sent, got)
    };
    let destination = async {
        let start = Instant::now();
        let got = recv_from(&mut dst_rd, &up, 0, u64::MAX).await;
        assert!(
            start.elapsed() >= ONE_WAY + QUIET_FOR - Duration::from_secs(1),
            "the up stream ended early ({:?}): {got:?}",
            start.elapsed()
        );
        write_range(&mut dst_wr, &down, 0, DOWN)
            .await
            .expect("send down");
        dst_wr.shutdown().await.expect("end down");
        got
    };
    let ((sent, down_got), up_got) = within(ONE_WAY + QUIET_FOR + STEP, "both streams", async {
        tokio::join!(source, destination)
    })
    .await;
    up_got.assert_exact(sent, "up");
    down_got.assert_exact(DOWN, "down");
    let (server, client) = (t.server_report().await, t.client_report().await);
    assert_eq!(
        (server.failed, client.failed),
        (0, 0),
        "{server:?} {client:?}"
    );
    assert_eq!(server.from_tunnel, sent);
}

/// A version-2 peer (tungstenite's framing, as an older qmigrate) neither pings nor expects
/// pings: the server sends it none and does not drop it for a silence longer than its
/// timeout.
#[tokio::test]
async fn a_version_2_peer_is_neither_pinged_nor_dropped() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let t = Tunnel::start(Scheme::Ws, opts(false)).await;
    let listener = t.dest_listener();
    let peer = Peer::connect_at_version(&t.url, "00000000000000e3", 2).await;
    let Peer::Ws(mut ws) = peer else {
        unreachable!("a ws:// peer");
    };
    let (mut dst_rd, mut dst_wr) = accept(&listener).await.into_split();
    // Silent both ways for longer than the server's timeout, watching what arrives.
    let quiet = TIMEOUT + Duration::from_secs(2);
    let early = tokio::time::timeout(quiet, ws.next()).await;
    assert!(
        early.is_err(),
        "the server sent something to a version-2 peer: {early:?}"
    );

    let (up, down) = (Pattern::new(51), Pattern::new(52));
    const LEN: usize = 100_000;
    ws.send(Message::binary(up.bytes(0, LEN)))
        .await
        .expect("send up");
    ws.send(Message::binary(Vec::new())).await.expect("end up");
    within(STEP, "the up stream", async {
        recv_from(&mut dst_rd, &up, 0, u64::MAX)
            .await
            .assert_exact(LEN as u64, "up");
        write_range(&mut dst_wr, &down, 0, LEN as u64)
            .await
            .expect("send down");
        dst_wr.shutdown().await.expect("end down");
    })
    .await;
    let got = within(STEP, "the down stream", async {
        let mut got = Vec::new();
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) if b.is_empty() => return got,
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                other => panic!("the down stream: {other:?}"),
            }
        }
    })
    .await;
    assert!(got == down.bytes(0, LEN), "the down stream arrived whole");
}
