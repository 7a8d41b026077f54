//! The entry point of the `qmp_reply` fuzz target (`fuzz/`), not part of the API: it runs
//! what QEMU's bytes go through on a real connection, without a socket.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::{broadcast, oneshot};

use super::{
    decode_reply, handshake_line, parse_greeting, read_line, read_loop, Pending, Reply, Shared,
};
use crate::commands::{
    Command, QueryMigrate, QueryMigrateCapabilities, QueryMigrateParameters, QueryQmpSchema,
    QueryStatus, QueryVersion, QueryYank,
};

/// Feeds `data` to the client as if QEMU had sent it: the first line as the greeting, the
/// rest through the connection's reader, which routes replies to calls waiting with ids 0 to
/// 7 and events to a subscriber; each reply is then decoded as one typed command's reply.
/// Everything must end in a value or an error, never a panic.
pub fn parse(data: &[u8]) {
    let mut reader = data;
    let mut line = Vec::new();
    let got = ready(read_line(&mut reader, &mut line));
    if let Ok(greeting) = handshake_line(got, &line, "fuzz", "greeting") {
        let _ = parse_greeting(&greeting, "fuzz").map_err(|e| e.to_string());
    }

    let (events, mut rx) = broadcast::channel(super::EVENT_BUFFER);
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        events: Mutex::new(Some(events)),
    });
    let replies: Vec<oneshot::Receiver<Reply>> = (0..8u64)
        .map(|id| {
            let (tx, rx) = oneshot::channel();
            shared
                .pending()
                .waiting
                .insert(id, (format!("command-{id}"), tx));
            rx
        })
        .collect();
    ready(read_loop(reader, shared));

    for (id, mut rx) in replies.into_iter().enumerate() {
        match rx.try_recv() {
            Ok(Ok(value)) => decode_as(id, value),
            Ok(Err(e)) => drop(e.to_string()),
            Err(_) => {}
        }
    }
    loop {
        match rx.try_recv() {
            Ok(event) => {
                let _ = (event.migration_status(), event.migration_pass());
            }
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => break,
        }
    }
}

/// Decodes the reply to call `id` as one of the commands whose replies qmigrate reads.
fn decode_as(id: usize, value: serde_json::Value) {
    fn decode<C: Command>(value: serde_json::Value)
    where
        C::Reply: std::fmt::Debug,
    {
        match decode_reply::<C>(value) {
            Ok(reply) => drop(format!("{reply:?}")),
            Err(e) => drop(e.to_string()),
        }
    }
    match id {
        0 => decode::<QueryMigrate>(value),
        1 => decode::<QueryStatus>(value),
        2 => decode::<QueryVersion>(value),
        3 => decode::<QueryMigrateCapabilities>(value),
        4 => decode::<QueryMigrateParameters>(value),
        5 => decode::<QueryYank>(value),
        6 => decode::<QueryQmpSchema>(value),
        _ => {
            if let Ok(reply) = decode_reply::<QueryMigrate>(value) {
                // What `send`/`receive` print for a migration status.
                let _ = reply.status.map(|s| (s.to_string(), s.is_terminal()));
            }
        }
    }
}

/// Runs a future that cannot wait: the reader is a byte slice, always ready.
fn ready<F: Future>(f: F) -> F::Output {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("reading from a byte slice does not wait"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    /// The fuzz target's seeds and a few hostile inputs go through the entry point (the fuzz
    /// crate itself is not built by `cargo test`, this keeps its entry point working).
    #[test]
    fn seeds_and_hostile_input_end_in_values_or_errors() {
        let seeds =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/qmp_reply");
        let mut n = 0;
        for entry in std::fs::read_dir(&seeds).expect("fuzz/seeds/qmp_reply") {
            parse(&std::fs::read(entry.expect("entry").path()).expect("seed"));
            n += 1;
        }
        assert!(n > 0, "no seeds in {}", seeds.display());
        let deep = format!(
            "{}\n{}",
            "[".repeat(10_000),
            "{\"id\":0,\"return\":".repeat(10_000)
        );
        for input in [
            &b""[..],
            b"\n\r\n  \n",
            b"\xff\xfe\n\x00",
            b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":-1,\"minor\":0,\"micro\":0}}}}",
            b"{}\n{\"id\":1,\"return\":{\"running\":true,\"status\":\"new-state\"}}",
            b"{}\n{\"id\":18446744073709551616,\"return\":{}}\n{\"id\":-1,\"error\":7}",
            b"{}\n{\"event\":\"MIGRATION\",\"data\":{\"status\":[]},\"timestamp\":{}}",
            deep.as_bytes(),
        ] {
            parse(input);
        }
    }
}
