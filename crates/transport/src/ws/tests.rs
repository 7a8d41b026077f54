use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::frame::*;
use super::*;

/// A frame as a peer would send it, any header form: `len_form` 7, 16 or 64 picks the
/// length field (a longer one than needed is legal, if wasteful).
fn frame(first: u8, payload: &[u8], key: Option<[u8; 4]>, len_form: u8) -> Vec<u8> {
    let mask_bit = if key.is_some() { 0x80 } else { 0 };
    let mut f = vec![first];
    match len_form {
        7 => f.push(mask_bit | payload.len() as u8),
        16 => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        _ => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    let mut body = payload.to_vec();
    if let Some(key) = key {
        f.extend_from_slice(&key);
        for (i, b) in body.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    f.extend_from_slice(&body);
    f
}

fn seq(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A stream with every header length form, fragmentation, control frames between
/// fragments, an empty message and a close; masked when `masked`.
fn sample_stream(masked: bool) -> (Vec<u8>, Vec<Event>) {
    let mut keys = (1u8..).map(|i| [i, i.wrapping_mul(3), 0xa5, i ^ 0x5a]);
    let mut key = || masked.then(|| keys.next().unwrap_or([1, 2, 3, 4]));
    let (a, b, c, d) = (seq(100, 1), seq(300, 2), seq(7, 3), seq(5, 4));
    let mut stream = Vec::new();
    stream.extend(frame(0x82, &a, key(), 7));
    stream.extend(frame(0x82, &b, key(), 16));
    stream.extend(frame(0x02, &c[..3], key(), 64));
    stream.extend(frame(0x89, b"ping!", key(), 7));
    stream.extend(frame(0x00, &[], key(), 7));
    stream.extend(frame(0x8a, b"", key(), 7));
    stream.extend(frame(0x80, &c[3..], key(), 16));
    stream.extend(frame(0x82, &d, key(), 64));
    stream.extend(frame(0x82, &[], key(), 7));
    stream.extend(frame(0x88, b"\x03\xe8bye", key(), 7));
    let expect = vec![
        Event::Message(a),
        Event::Message(b),
        Event::Ping(b"ping!".to_vec()),
        Event::Pong,
        Event::Message(c),
        Event::Message(d),
        Event::Message(Vec::new()),
        Event::Close(b"\x03\xe8bye".to_vec()),
    ];
    (stream, expect)
}

#[test]
fn masking_matches_the_definition_at_every_length_and_offset() {
    let key = [0x12, 0x34, 0x56, 0x78];
    for len in 0..80 {
        let data = seq(len, 9);
        let mut fast = data.clone();
        apply_mask(&mut fast, key);
        let slow: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(fast, slow, "length {len}");
        for split in 0..=len {
            let mut parts = data.clone();
            let (x, y) = parts.split_at_mut(split);
            apply_mask(x, key);
            apply_mask(y, advance_key(key, split));
            assert_eq!(parts, slow, "length {len} in two pieces at {split}");
        }
    }
}

#[test]
fn headers_round_trip_in_every_length_form() {
    for len in [0, 1, 125, 126, 127, 0xffff, 0x10000, MAX_FRAME] {
        for (role, key) in [(Role::Server, Some([9, 8, 7, 6])), (Role::Client, None)] {
            let h = header_len(len, key.is_some());
            let mut buf = vec![0u8; h];
            put_header(&mut buf, OP_BINARY, len, key);
            let parsed = parse_header(&buf, role).expect("valid").expect("complete");
            assert_eq!((parsed.len, parsed.key, parsed.size), (len, key, h));
            assert!(parsed.fin);
            for cut in 0..h {
                assert!(
                    parse_header(&buf[..cut], role)
                        .expect("valid so far")
                        .is_none(),
                    "a header of {len} cut at {cut}"
                );
            }
        }
    }
}

#[test]
fn a_stream_parses_the_same_split_at_every_byte() {
    for (role, masked) in [(Role::Server, true), (Role::Client, false)] {
        let (stream, expect) = sample_stream(masked);
        assert_eq!(events(role, &[&stream]), expect);
        for cut in 0..=stream.len() {
            let (x, y) = stream.split_at(cut);
            assert_eq!(events(role, &[x, y]), expect, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(events(role, &bytes), expect, "a byte at a time");
    }
}

#[test]
fn large_frames_come_out_in_pieces_without_being_held() {
    let big = seq(MAX_FRAME, 5);
    let stream = frame(0x82, &big, Some([1, 2, 3, 4]), 64);
    for step in [1000, 4096, 65536, 333_333] {
        let chunks: Vec<&[u8]> = stream.chunks(step).collect();
        assert_eq!(
            events(Role::Server, &chunks),
            [Event::Message(big.clone())],
            "{step} at a time"
        );
    }
}

#[test]
fn masking_must_follow_the_role() {
    let masked = frame(0x82, b"x", Some([1, 2, 3, 4]), 7);
    let plain = frame(0x82, b"x", None, 7);
    assert_eq!(
        events(Role::Server, &[&plain]),
        [Event::Error(FrameError::Unmasked)]
    );
    assert_eq!(
        events(Role::Client, &[&masked]),
        [Event::Error(FrameError::Masked)]
    );
}

#[test]
fn limits_are_checked_from_the_header() {
    // Only the header: the error comes before any payload.
    let mut over = vec![0x82, 0xff];
    over.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
    over.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(
        events(Role::Server, &[&over[..10]]),
        [Event::Error(FrameError::FrameTooLarge(
            MAX_FRAME as u64 + 1
        ))]
    );
    let mut huge = vec![0x82, 0x7f];
    huge.extend_from_slice(&u64::MAX.to_be_bytes());
    assert_eq!(
        events(Role::Client, &[&huge]),
        [Event::Error(FrameError::FrameTooLarge(u64::MAX))]
    );
    // Exactly the limit is fine, one more byte over two frames is not.
    let half = seq(MAX_FRAME / 2, 1);
    let mut stream = frame(0x02, &half, None, 64);
    stream.extend(frame(0x80, &half, None, 64));
    assert_eq!(
        events(Role::Client, &[&stream]),
        [Event::Message([&half[..], &half[..]].concat())]
    );
    let mut stream = frame(0x02, &half, None, 64);
    stream.extend(frame(0x00, &half, None, 64));
    let header_only = frame(0x80, &[], None, 7);
    stream.extend_from_slice(&[header_only[0], 1]);
    assert_eq!(
        events(Role::Client, &[&stream]),
        [Event::Error(FrameError::MessageTooLarge {
            limit: MAX_FRAME
        })]
    );
    // A smaller limit (the handshake's).
    let mut p = Parser::new(Role::Client, 10);
    let mut f = frame(0x82, &seq(11, 0), None, 7);
    assert_eq!(
        p.parse(&mut f[..2]),
        Err(FrameError::MessageTooLarge { limit: 10 })
    );
}

#[test]
fn control_frames_are_short_and_whole() {
    let ping = |first: u8, len: usize| frame(first, &seq(len, 0), None, 7);
    assert_eq!(
        events(Role::Client, &[&ping(0x89, 125)]),
        [Event::Ping(seq(125, 0))]
    );
    assert_eq!(
        events(Role::Client, &[&ping(0x89, 126)[..2]]),
        [Event::Error(FrameError::ControlTooLong(126))]
    );
    assert_eq!(
        events(Role::Client, &[&ping(0x09, 3)[..2]]),
        [Event::Error(FrameError::FragmentedControl)]
    );
    assert_eq!(
        events(Role::Client, &[&frame(0x08, b"", None, 7)]),
        [Event::Error(FrameError::FragmentedControl)]
    );
}

#[test]
fn reserved_bits_opcodes_and_text_are_refused() {
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        assert_eq!(
            events(Role::Client, &[&[0x82 | rsv, 0]]),
            [Event::Error(FrameError::ReservedBits(rsv))]
        );
    }
    for op in (0x3..=0x7).chain(0xb..=0xf) {
        assert_eq!(
            events(Role::Client, &[&[0x80 | op, 0]]),
            [Event::Error(FrameError::ReservedOpcode(op))]
        );
    }
    assert_eq!(
        events(Role::Client, &[&[0x81, 0]]),
        [Event::Error(FrameError::Text)]
    );
}

#[test]
fn continuations_need_a_message_and_messages_need_an_end() {
    assert_eq!(
        events(Role::Client, &[&frame(0x80, b"x", None, 7)]),
        [Event::Error(FrameError::StrayContinuation)]
    );
    let mut stream = frame(0x02, b"x", None, 7);
    stream.extend(frame(0x82, b"y", None, 7));
    assert_eq!(
        events(Role::Client, &[&stream]),
        [Event::Error(FrameError::UnfinishedMessage)]
    );
    let mut stream = frame(0x02, b"x", None, 7);
    stream.extend(frame(0x01, b"y", None, 7));
    assert_eq!(
        events(Role::Client, &[&stream]),
        [Event::Error(FrameError::Text)]
    );
}

/// Our client's writer and our server's reader over an in-memory pipe: byte-exact, with
/// masking on the way, at sizes around every header form and the message size.
#[tokio::test]
async fn writer_to_reader_is_byte_exact() {
    for len in [
        0,
        1,
        125,
        126,
        65535,
        65537,
        WS_MESSAGE,
        WS_MESSAGE + 1,
        3 << 20,
    ] {
        let data = seq(len, 7);
        let (a, b) = tokio::io::duplex(1 << 20);
        let client = WsStream::new(a, Role::Client, Vec::new(), MAX_FRAME);
        let server = WsStream::new(b, Role::Server, Vec::new(), MAX_FRAME);
        let (_, mut wr) = client.split(tokio::io::split);
        let (mut rd, _) = server.split(tokio::io::split);
        let count = (AtomicU64::new(0), AtomicU64::new(0));
        let mut out = Vec::new();
        let send = async {
            wr.pump_from(&mut &data[..], &count.0).await?;
            wr.finish().await
        };
        let (sent, got) = tokio::join!(send, rd.pump_to(&mut out, &count.1));
        sent.expect("send");
        got.expect("receive");
        assert!(
            out == data,
            "{len} bytes arrived as {} other bytes",
            out.len()
        );
        assert_eq!(count.1.load(Relaxed), len as u64);
    }
}

/// The frames a client sends are masked, each with its own key.
#[tokio::test]
async fn a_client_masks_every_frame_with_a_fresh_key() {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let mut client = WsStream::new(a, Role::Client, Vec::new(), MAX_FRAME);
    let payload = vec![0u8; 64];
    for _ in 0..3 {
        client.send_message(&payload).await.expect("send");
    }
    let mut wire = vec![0u8; 3 * (6 + 64)];
    b.read_exact(&mut wire).await.expect("read");
    let keys: Vec<&[u8]> = wire.chunks(70).map(|f| &f[2..6]).collect();
    for f in wire.chunks(70) {
        assert_eq!(f[..2], [0x82, 0x80 | 64]);
        // A zero payload masked is the key repeated.
        assert_eq!(
            f[6..10],
            f[2..6],
            "the payload is masked with the frame's key"
        );
    }
    assert!(
        keys[0] != keys[1] && keys[1] != keys[2],
        "keys repeat: {keys:?}"
    );
}

/// A ping in the middle of the data gets its pong from the writer, even while the
/// writer's source is quiet; the reader never waits for it.
#[tokio::test]
async fn a_ping_mid_stream_gets_a_pong() {
    let (ours, mut peer) = tokio::io::duplex(1 << 20);
    let server = WsStream::new(ours, Role::Server, Vec::new(), MAX_FRAME);
    let (mut rd, mut wr) = server.split(tokio::io::split);
    // A source that never sends anything and never ends.
    let (_quiet_peer, mut quiet) = tokio::io::duplex(64);
    let key = Some([5, 6, 7, 8]);
    let mut input = frame(0x82, b"before", key, 7);
    input.extend(frame(0x89, b"are you there?", key, 7));
    input.extend(frame(0x82, b"after", key, 7));
    input.extend(frame(0x82, b"", key, 7));
    peer.write_all(&input).await.expect("write");
    let mut out = Vec::new();
    let counts = (AtomicU64::new(0), AtomicU64::new(0));
    let pump = wr.pump_from(&mut quiet, &counts.0);
    let check = async {
        rd.pump_to(&mut out, &counts.1).await.expect("receive");
        let mut pong = [0u8; 16];
        peer.read_exact(&mut pong).await.expect("the pong");
        pong
    };
    let pong = tokio::select! {
        pong = check => pong,
        r = pump => panic!("the quiet source ended: {r:?}"),
    };
    assert_eq!(out, b"beforeafter");
    assert_eq!(pong[..2], [0x8a, 14], "an unmasked final pong of 14 bytes");
    assert_eq!(&pong[2..], b"are you there?");
}

/// During the handshake a ping is answered from within the receive.
#[tokio::test]
async fn a_ping_during_the_handshake_gets_a_pong() {
    let (ours, mut peer) = tokio::io::duplex(1 << 16);
    let mut client = WsStream::new(ours, Role::Client, Vec::new(), MAX_FRAME);
    let mut input = frame(0x89, b"hi", None, 7);
    input.extend(frame(0x82, b"envelope", None, 7));
    peer.write_all(&input).await.expect("write");
    assert_eq!(client.recv_message().await.expect("message"), b"envelope");
    let mut pong = [0u8; 8];
    peer.read_exact(&mut pong).await.expect("the pong");
    assert_eq!(pong[..2], [0x8a, 0x82], "a masked pong of 2 bytes");
    let mut body = [pong[6], pong[7]];
    apply_mask(&mut body, [pong[2], pong[3], pong[4], pong[5]]);
    assert_eq!(&body, b"hi");
}

/// Bytes that arrived with the upgrade are the start of the frame stream, and whatever
/// the reader already buffered during the handshake survives the split.
#[tokio::test]
async fn buffered_bytes_survive_the_upgrade_and_the_split() {
    let key = Some([1, 1, 2, 3]);
    let mut early = frame(0x82, b"hello", key, 7);
    early.extend(frame(0x82, b"data", key, 7));
    early.extend(frame(0x02, b"da", key, 7)); // a fragment, finished later
    let (ours, mut peer) = tokio::io::duplex(1 << 16);
    let mut server = WsStream::new(ours, Role::Server, early, MAX_FRAME);
    assert_eq!(server.recv_message().await.expect("message"), b"hello");
    let (mut rd, _wr) = server.split(tokio::io::split);
    let mut rest = frame(0x80, b"ta", key, 7);
    rest.extend(frame(0x82, b"", key, 7));
    peer.write_all(&rest).await.expect("write");
    let mut out = Vec::new();
    rd.pump_to(&mut out, &AtomicU64::new(0))
        .await
        .expect("receive");
    assert_eq!(out, b"datadata");
}

/// Closing before the end of the stream is a lost connection with the peer's reason; so
/// is a connection that ends without a close.
#[tokio::test]
async fn an_early_close_is_a_lost_connection() {
    let (ours, mut peer) = tokio::io::duplex(1 << 16);
    let (mut rd, _wr) =
        WsStream::new(ours, Role::Client, Vec::new(), MAX_FRAME).split(tokio::io::split);
    let mut input = frame(0x82, b"some", None, 7);
    input.extend(frame(0x88, b"\x03\xe9going away", None, 7));
    peer.write_all(&input).await.expect("write");
    let err = rd
        .pump_to(&mut Vec::new(), &AtomicU64::new(0))
        .await
        .expect_err("a close is no end marker");
    let msg = err.to_string();
    assert!(
        matches!(err, Error::ConnectionLost(_)) && msg.contains("going away"),
        "{msg}"
    );

    let (ours, mut peer) = tokio::io::duplex(1 << 16);
    let (mut rd, _wr) =
        WsStream::new(ours, Role::Client, Vec::new(), MAX_FRAME).split(tokio::io::split);
    peer.write_all(&frame(0x82, b"some", None, 7))
        .await
        .expect("write");
    drop(peer);
    let err = rd
        .pump_to(&mut Vec::new(), &AtomicU64::new(0))
        .await
        .expect_err("EOF is no end marker");
    assert!(matches!(err, Error::ConnectionLost(_)), "{err}");
}
