//! The tunnel end to end, in-process: a fake source QEMU talks to a [`Client`], which carries
//! each connection over TCP or WebSocket to a [`Server`], which connects it to a fake
//! destination QEMU. Every scenario runs once per transport (`tcp::*` and `ws::*`).
//!
//! [`Client`]: qmigrate_transport::Client
//! [`Server`]: qmigrate_transport::Server

mod common;

use std::time::Duration;

use common::*;
use qmigrate_transport::{Report, Scheme};
use tokio::io::AsyncReadExt;

/// Limit for a whole test, on top of the limit on each step.
const TEST: Duration = Duration::from_secs(45);

/// Defines `mod tcp` and `mod ws`, each with one test per scenario function given (an
/// `async fn(Scheme)` in this file), run under the [`TEST`] limit.
macro_rules! per_scheme {
    ($($scenario:ident),* $(,)?) => {
        per_scheme!(@mod tcp, Tcp, $($scenario),*);
        per_scheme!(@mod ws, Ws, $($scenario),*);
    };
    (@mod $module:ident, $scheme:ident, $($scenario:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    let scheme = qmigrate_transport::Scheme::$scheme;
                    let what = concat!(stringify!($module), "::", stringify!($scenario));
                    crate::common::within(crate::TEST, what, crate::$scenario(scheme)).await;
                }
            )*
        }
    };
}

per_scheme!(
    small_transfers_are_byte_exact,
    big_transfer_with_return_traffic,
    concurrent_connections_keep_their_order_and_data,
    half_close_source_first,
    half_close_destination_first,
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

/// One tunnel, one connection: `up` bytes source -> destination while `down` bytes flow back,
/// each direction then half-closed. Both ends run with `once`, so both reports come back.
async fn transfer(scheme: Scheme, up: u64, down: u64) {
    let what = format!("{scheme:?}, {up} bytes up, {down} down");
    let mut t = Tunnel::start(scheme, Opts::default()).await;
    let dest = t.dest_listener();
    let source = t.source_connect().await;
    let src = tokio::spawn(duplex(source, Pattern::new(1), up, Pattern::new(2)));
    let dst = tokio::spawn(async move {
        duplex(accept(&dest).await, Pattern::new(2), down, Pattern::new(1)).await
    });
    let at_dest = within(STEP, "the destination side", dst)
        .await
        .expect("destination task");
    let at_source = within(STEP, "the source side", src)
        .await
        .expect("source task");
    at_dest.assert_exact(up, &format!("{what}: at the destination"));
    at_source.assert_exact(down, &format!("{what}: at the source"));

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
