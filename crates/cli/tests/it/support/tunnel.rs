//! The tunnel as real processes of the built binary: `tunnel-server` on `127.0.0.1:0` and
//! `tunnel-client` connected to it, both killed when the [`Tunnel`] is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proc::Proc;

/// How long a tunnel process may take to print its ready line.
const READY: Duration = Duration::from_secs(20);

/// Which transport the tunnel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP.
    Tcp,
    /// WebSocket.
    Ws,
}

/// A running tunnel: QEMU on the source connects to `source_socket`, QEMU on the destination
/// listens on `dest_socket`.
#[derive(Debug)]
pub struct Tunnel {
    /// The `tunnel-server` process.
    pub server: Proc,
    /// The `tunnel-client` process.
    pub client: Proc,
    /// The URL the server printed (`tcp://127.0.0.1:PORT`, `ws://...`, `tls://...`, `wss://...`).
    pub url: String,
    /// The Unix socket the destination QEMU must listen on (`receive --socket`).
    pub dest_socket: PathBuf,
    /// The Unix socket the source QEMU connects to (`send --socket`).
    pub source_socket: PathBuf,
}

impl Tunnel {
    /// Starts server and client in `dir` and waits for both ready lines.
    pub async fn start(dir: &Path, transport: Transport) -> Tunnel {
        Tunnel::start_with(dir, transport, &[], &[]).await
    }

    /// [`Tunnel::start`] with more arguments for the server and the client (`--token-file
    /// PATH`, ...).
    pub async fn start_with(
        dir: &Path,
        transport: Transport,
        server_extra: &[String],
        client_extra: &[String],
    ) -> Tunnel {
        let dest_socket = dir.join("dest.sock");
        let source_socket = dir.join("source.sock");
        let ws: &[&str] = match transport {
            Transport::Tcp => &[],
            Transport::Ws => &["--ws"],
        };

        let mut server_args: Vec<String> = vec!["tunnel-server".into()];
        server_args.extend(ws.iter().map(|s| s.to_string()));
        server_args.extend([
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--socket".into(),
            dest_socket.display().to_string(),
        ]);
        server_args.extend(server_extra.iter().cloned());
        let mut server = Proc::spawn("tunnel-server", dir, &server_args);
        let line = server.next_line(READY).await;
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected tunnel-server ready line: {line:?}"))
            .trim()
            .to_owned();
        // With --tls-cert in `server_extra`, the TLS form of the scheme.
        let schemes = match transport {
            Transport::Tcp => ["tcp://", "tls://"],
            Transport::Ws => ["ws://", "wss://"],
        };
        assert!(
            schemes.iter().any(|s| url.starts_with(s)),
            "server URL {url:?} is not {schemes:?}"
        );

        let client = start_client(dir, "tunnel-client", &url, &source_socket, client_extra).await;
        Tunnel {
            server,
            client,
            url,
            dest_socket,
            source_socket,
        }
    }

    /// Another `tunnel-client` (named `name`, for its log) to this tunnel's server, on its own
    /// socket in `dir`, with `extra` arguments; returns it with its socket.
    pub async fn another_client(
        &self,
        dir: &Path,
        name: &str,
        extra: &[String],
    ) -> (Proc, PathBuf) {
        let socket = dir.join(format!("{name}.sock"));
        let client = start_client(dir, name, &self.url, &socket, extra).await;
        (client, socket)
    }

    /// Both processes' stderr, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- tunnel-server stderr\n{}\n--- tunnel-client stderr\n{}",
            self.server.stderr(),
            self.client.stderr()
        )
    }
}

/// Starts `tunnel-client --connect URL --socket SOCKET EXTRA...` and waits for its ready line.
async fn start_client(dir: &Path, name: &str, url: &str, socket: &Path, extra: &[String]) -> Proc {
    let mut args: Vec<String> = vec![
        "tunnel-client".into(),
        "--connect".into(),
        url.to_owned(),
        "--socket".into(),
        socket.display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    let mut client = Proc::spawn(name, dir, &args);
    let line = client.next_line(READY).await;
    let expected = format!("listening on unix:{} -> ", socket.display());
    assert!(
        line.starts_with(&expected),
        "unexpected {name} ready line: {line:?} (expected {expected:?}...)"
    );
    client
}

/// Starts `tunnel-server --listen 127.0.0.1:0 ARGS` (`--qmp PATH` or `--route`s: the server of
/// `qmigrate migrate`) and returns it with the URL of its ready line.
pub async fn server(dir: &Path, args: &[String]) -> (Proc, String) {
    let mut all = vec![
        "tunnel-server".to_owned(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    all.extend(args.iter().cloned());
    let mut server = Proc::spawn("tunnel-server", dir, &all);
    let line = server.next_line(READY).await;
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected tunnel-server ready line {line:?}"))
        .trim()
        .to_owned();
    (server, url)
}

/// A self-signed certificate for the destination (made now, never kept) in `dir`: the paths
/// of cert.pem and key.pem (0600), and the certificate's fingerprint as `openssl x509
/// -fingerprint -sha256` prints it.
pub fn self_signed_cert(dir: &Path) -> (String, String, String) {
    use sha2::Digest as _;
    use std::os::unix::fs::PermissionsExt as _;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["dest".to_owned()])
        .expect("names")
        .self_signed(&key)
        .expect("certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert.pem");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key.pem");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let digest = sha2::Sha256::digest(cert.der().as_ref());
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    (
        cert_path.display().to_string(),
        key_path.display().to_string(),
        format!("sha256 Fingerprint={}", hex.join(":")),
    )
}
