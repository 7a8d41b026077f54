//! A tiny Unix-to-WebSocket forwarder built from the transport crate's pieces: every
//! connection made to a Unix socket is carried over its own WebSocket connection to a
//! `qmigrate tunnel-server --ws`, which connects it to its destination socket.
//!
//! ```text
//! # destination (or another terminal):
//! qmigrate tunnel-server --ws --listen 127.0.0.1:8765 --socket /tmp/dest.sock
//! socat -u UNIX-LISTEN:/tmp/dest.sock -            # stands in for the destination QEMU
//! # here:
//! cargo run -p qmigrate-transport --example unix-to-ws -- /tmp/fwd.sock ws://127.0.0.1:8765/
//! echo hello | socat -u - UNIX-CONNECT:/tmp/fwd.sock
//! ```
//!
//! `qmigrate tunnel-client` is this plus authentication (a server with a token refuses this
//! example), sessions, ordering, `--once` and tidy shutdown (`qmigrate_transport::Client`).

use std::error::Error;

use qmigrate_transport::protocol::{Hello, Reply};
use qmigrate_transport::{relay, Endpoint, Scheme, Transport, WebSocket};
use tokio::net::UnixListener;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(server)) = (args.next(), args.next()) else {
        eprintln!("usage: unix-to-ws SOCKET ws://HOST:PORT/PATH");
        std::process::exit(2);
    };
    let server = Endpoint::parse(&server, Scheme::Ws)?;
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    println!("forwarding unix:{socket} -> {server}");

    // All connections of one run form one session, numbered in accept order: the server
    // connects them to its destination in that order.
    let session = format!("{:016x}", std::process::id());
    for seq in 0.. {
        let (unix, _) = listener.accept().await?;
        let server = server.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let result = async {
                let mut tunnel = WebSocket::default().connect(&server).await?;
                tunnel.send_msg(&Hello::data(&session, seq)).await?;
                let version = match tunnel.recv_msg::<Reply>().await? {
                    Reply::Accept { version, .. } => version,
                    Reply::Reject { message, .. } => return Err(message.into()),
                    // Authentication is left out here; `qmigrate tunnel-client` does it.
                    Reply::Challenge { .. } => {
                        return Err("the server requires a token; use qmigrate tunnel-client".into())
                    }
                };
                let (stats, result) = relay(unix, tunnel, version).await;
                println!(
                    "connection {seq}: {} bytes out, {} bytes back",
                    stats.to_tunnel, stats.from_tunnel
                );
                result.map_err(Into::into)
            }
            .await;
            if let Err(e) = result {
                let e: Box<dyn Error + Send + Sync> = e;
                eprintln!("connection {seq}: {e}");
            }
        });
    }
    Ok(())
}
