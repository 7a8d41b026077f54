//! NBD connections (`purpose: nbd`): the server connects them to the NBD socket its controller
//! registered for the session, outside the session's data connections, and refuses them for a
//! session without one.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use qmigrate_transport::protocol::Hello;
use qmigrate_transport::{
    open_control, open_nbd, relay, ClientConfig, Controller, Endpoint, Scheme, Server,
    ServerConfig, SessionMap, TunnelStream,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Registers `socket` as the session's NBD socket, says `ok`, and keeps the registration until
/// the control connection ends.
#[derive(Debug)]
struct NbdController {
    socket: PathBuf,
}

impl Controller for NbdController {
    fn serve(
        &self,
        hello: Hello,
        mut stream: TunnelStream,
        sessions: SessionMap,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let socket = self.socket.clone();
        Box::pin(async move {
            sessions.insert_nbd(&hello.session, socket);
            let _ = stream.send_msg(&"ok").await;
            let _ = stream.recv_msg::<String>().await;
            sessions.remove_nbd(&hello.session);
        })
    }
}

#[tokio::test]
async fn nbd_connections_reach_the_sessions_nbd_socket() {
    for scheme in [Scheme::Tcp, Scheme::Ws] {
        let dir = tempfile::tempdir().expect("tempdir");
        let nbd_socket = dir.path().join("nbd.sock");
        let nbd = UnixListener::bind(&nbd_socket).expect("bind the NBD socket");
        let config = ServerConfig::new(dir.path().join("dest.sock"));
        let listen = Endpoint::parse("127.0.0.1:0", scheme).expect("endpoint");
        let server = Server::bind(&listen, config)
            .await
            .expect("bind")
            .with_controller(Arc::new(NbdController {
                socket: nbd_socket.clone(),
            }));
        let client = ClientConfig::new(server.local_endpoint().clone());
        let stop = CancellationToken::new();
        let serving = tokio::spawn(server.serve(stop.clone()));

        // No session prepared: refused, with the reason.
        let refused = open_nbd(&client, "abcdef").await;
        let Err(err) = refused else {
            panic!("an NBD connection of an unknown session was accepted")
        };
        assert!(err.to_string().contains("no disk copy"), "{err}");

        let (mut control, session, _) = open_control(&client).await.expect("control");
        assert_eq!(control.recv_msg::<String>().await.expect("ok"), "ok");
        // Two connections at once (two disks), each to the NBD socket, both ways.
        for n in 0..2u8 {
            let (tunnel, version) = open_nbd(&client, &session).await.expect("nbd connection");
            let (mut qemu_side, relayed) = UnixStream::pair().expect("pair");
            tokio::spawn(relay(relayed, tunnel, version));
            let (mut server_side, _) = tokio::time::timeout(Duration::from_secs(5), nbd.accept())
                .await
                .expect("the server connected the NBD socket")
                .expect("accept");
            qemu_side.write_all(&[n; 1000]).await.expect("write");
            let mut buf = [0u8; 1000];
            server_side.read_exact(&mut buf).await.expect("read");
            assert_eq!(buf, [n; 1000]);
            server_side.write_all(b"reply").await.expect("write back");
            let mut back = [0u8; 5];
            qemu_side.read_exact(&mut back).await.expect("read back");
            assert_eq!(&back, b"reply");
        }
        drop(control);
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), serving).await;
    }
}
