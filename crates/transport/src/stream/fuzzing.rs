//! The entry point of the `handshake` fuzz target (`fuzz/`), not part of the API: what a
//! tunnel end reads of a peer's first bytes, without a socket.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::recv_envelope;
use crate::error::Result;

/// Reads envelopes from `data` the way a TCP or TLS tunnel connection reads its handshake,
/// at most `max`: each body, up to and including the error that ended the reading.
pub fn recv_bodies(data: &[u8], max: usize) -> Vec<Result<Vec<u8>>> {
    let mut reader = data;
    let mut bodies = Vec::new();
    while bodies.len() < max {
        let body = ready(recv_envelope(&mut reader));
        let end = body.is_err();
        bodies.push(body);
        if end {
            break;
        }
    }
    bodies
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
    use super::recv_bodies;
    use crate::error::Error;
    use crate::protocol::{self, EnvelopeError, Hello, MAGIC};

    /// The fuzz target's seeds read as envelopes, and a length past the limit is refused
    /// before anything is allocated for it.
    #[test]
    fn seeds_read_and_the_length_limit_holds() {
        let seed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds/handshake/hello.bin");
        let bodies = recv_bodies(&std::fs::read(&seed).expect("seed"), 8);
        let hello: Hello =
            protocol::decode_body(bodies[0].as_ref().expect("an envelope")).expect("a hello");
        assert_eq!(hello.seq, 0);
        assert!(matches!(bodies[1], Err(Error::ConnectionLost(_))));

        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            recv_bodies(&huge, 8)[..],
            [Err(Error::Envelope(EnvelopeError::TooLarge(u32::MAX)))]
        ));
        assert_eq!(recv_bodies(b"", 8).len(), 1);
    }
}
