//! Pre-shared-token authentication of tunnel connections: the [`Token`], and the proofs each
//! side computes from it. `docs/PROTOCOL.md` ("Authentication") describes the exchange.
//!
//! The token never crosses the wire. A server with a token answers a client's hello with a
//! fresh random nonce; the client proves it knows the token with
//! `HMAC-SHA256(token, CLIENT_LABEL || nonce || hello)`, where `hello` is the exact JSON body
//! it sent, so the proof covers the session, the sequence number, the purpose, the route and
//! the client's own nonce. The server checks the proof in constant time and, in its accept,
//! proves the same with `SERVER_LABEL`: the client only sends migration data to a server that
//! knows the token. A recorded handshake is worthless on a new connection, since each side's
//! nonce is fresh.

use std::fmt;
use std::io::{self, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes in each side's nonce.
pub const NONCE_LEN: usize = 32;

/// A nonce: fresh random bytes for one connection.
pub type Nonce = [u8; NONCE_LEN];

/// The shortest token accepted. A sniffer of a plain-TCP handshake can test guesses of the
/// token offline against the proof it saw, so the token must be too long to guess.
pub const MIN_TOKEN_LEN: usize = 16;

/// The largest token file read: a token is a line, so anything larger is the wrong file.
const MAX_TOKEN_FILE: u64 = 4096;

/// What makes a client's proof differ from a server's for the same handshake, so that
/// neither can be passed off as the other.
const CLIENT_LABEL: &[u8] = b"qmigrate tunnel v1 auth: client\0";
const SERVER_LABEL: &[u8] = b"qmigrate tunnel v1 auth: server\0";

/// How to make a good token, for error messages.
pub const MAKE_TOKEN: &str = "head -c 32 /dev/urandom | base64 > token; chmod 600 token";

/// The pre-shared secret both tunnel ends hold. Its bytes are the key as written (surrounding
/// whitespace, such as a file's final newline, removed); `Debug` does not show them.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text. `origin` says where it came from (`QMIGRATE_TOKEN`, `the token
    /// file /etc/...`) for the error: empty or shorter than [`MIN_TOKEN_LEN`].
    pub fn new(secret: impl AsRef<[u8]>, origin: &str) -> Result<Token, TokenError> {
        let secret = secret.as_ref().trim_ascii();
        if secret.is_empty() {
            return Err(TokenError::Empty {
                origin: origin.to_owned(),
            });
        }
        if secret.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort {
                origin: origin.to_owned(),
                len: secret.len(),
            });
        }
        Ok(Token(secret.to_vec()))
    }

    /// Reads a token file, which must not be readable or writable by group or others (the
    /// mode is checked on the opened file, so a rename in between cannot fool the check).
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let read_err = |source: io::Error| TokenError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mode = file.metadata().map_err(read_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TokenError::Permissions {
                path: path.to_owned(),
                mode: mode & 0o7777,
            });
        }
        let mut secret = Vec::new();
        file.take(MAX_TOKEN_FILE + 1)
            .read_to_end(&mut secret)
            .map_err(read_err)?;
        if secret.len() as u64 > MAX_TOKEN_FILE {
            return Err(TokenError::TooLarge {
                path: path.to_owned(),
            });
        }
        Token::new(secret, &format!("the token file {}", path.display()))
    }

    fn mac(&self, label: &[u8], nonce: &Nonce, hello: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
        mac.update(label);
        mac.update(nonce);
        mac.update(hello);
        mac
    }

    /// The client's proof for `hello` (the JSON body it sent) and the server's `nonce`, hex.
    pub fn client_proof(&self, nonce: &Nonce, hello: &[u8]) -> String {
        hex(&self.mac(CLIENT_LABEL, nonce, hello).finalize().into_bytes())
    }

    /// Whether `proof` is the client's proof for `hello` and `nonce`, compared in constant
    /// time. Anything that is not 64 hex digits is wrong.
    pub fn check_client_proof(&self, nonce: &Nonce, hello: &[u8], proof: &str) -> bool {
        check(self.mac(CLIENT_LABEL, nonce, hello), proof)
    }

    /// The server's proof for the same handshake, hex.
    pub fn server_proof(&self, nonce: &Nonce, hello: &[u8]) -> String {
        hex(&self.mac(SERVER_LABEL, nonce, hello).finalize().into_bytes())
    }

    /// Whether `proof` is the server's proof for `hello` and `nonce` (constant time).
    pub fn check_server_proof(&self, nonce: &Nonce, hello: &[u8], proof: &str) -> bool {
        check(self.mac(SERVER_LABEL, nonce, hello), proof)
    }
}

fn check(mac: Hmac<Sha256>, proof: &str) -> bool {
    match unhex(proof) {
        Some(bytes) => mac.verify_slice(&bytes).is_ok(),
        None => false,
    }
}

/// What is wrong with a token or its file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be opened or read.
    #[error("cannot read the token file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The token file is readable or writable by other users.
    #[error(
        "the token file {} is accessible to other users (mode {mode:04o}): run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The token file is larger than a token can be.
    #[error("the token file {} is larger than {MAX_TOKEN_FILE} bytes: is it the right file?", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// No token in it.
    #[error("{origin} is empty: make a token with `{MAKE_TOKEN}`")]
    Empty {
        /// Where the token came from.
        origin: String,
    },
    /// A token too short to resist guessing.
    #[error("the token in {origin} is {len} bytes long, too short to resist guessing (at least {MIN_TOKEN_LEN}): make one with `{MAKE_TOKEN}`")]
    TooShort {
        /// Where the token came from.
        origin: String,
        /// Its length.
        len: usize,
    },
}

/// Why a client refused to go on with a server's handshake: the proofs of [`Token`] did not
/// work out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The server asked for a token and this client has none.
    #[error("the tunnel server requires a token and this client has none")]
    NoToken,
    /// The server accepted without a challenge: it has no token, and this client has one.
    #[error("the tunnel server ({software}) accepted without asking for a token: it runs without one. Give tunnel-server the same token (or, for a server meant to run without one on 127.0.0.1, give this client none)")]
    ServerHasNoToken {
        /// The server's software and version.
        software: String,
    },
    /// The server's proof did not match this client's token.
    #[error("the tunnel server ({software}) could not prove that it knows the token: its token differs from this client's, or something between the hosts altered the handshake")]
    BadServerProof {
        /// The server's software and version.
        software: String,
    },
}

/// A fresh nonce from the kernel's random number generator. There is no fallback: a
/// predictable nonce would let a recorded handshake be replayed.
pub fn nonce() -> io::Result<Nonce> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| {
        io::Error::other(format!("the kernel's random number generator failed: {e}"))
    })?;
    Ok(n)
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// Parses hex (either case); `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Parses a nonce sent as hex; `None` unless it is exactly [`NONCE_LEN`] bytes.
pub fn parse_nonce(s: &str) -> Option<Nonce> {
    unhex(s)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn token() -> Token {
        Token::new("0123456789abcdef0123", "test").expect("token")
    }

    #[test]
    fn proofs_check_and_differ_by_side_nonce_and_hello() {
        let t = token();
        let (n1, n2) = ([1u8; NONCE_LEN], [2u8; NONCE_LEN]);
        let p = t.client_proof(&n1, b"hello");
        assert_eq!(p.len(), 64);
        assert!(t.check_client_proof(&n1, b"hello", &p));
        assert!(t.check_client_proof(&n1, b"hello", &p.to_uppercase()));
        assert!(!t.check_client_proof(&n2, b"hello", &p), "another nonce");
        assert!(!t.check_client_proof(&n1, b"hellp", &p), "another hello");
        assert!(
            !t.check_server_proof(&n1, b"hello", &p),
            "the other side's proof"
        );
        assert!(!t.check_client_proof(&n1, b"hello", &p[..62]), "truncated");
        assert!(!t.check_client_proof(&n1, b"hello", ""), "empty");
        assert!(!t.check_client_proof(&n1, b"hello", &format!("{}zz", &p[..62])));
        let other = Token::new("0123456789abcdef0124", "test").expect("token");
        assert!(
            !other.check_client_proof(&n1, b"hello", &p),
            "another token"
        );
        let s = t.server_proof(&n1, b"hello");
        assert!(t.check_server_proof(&n1, b"hello", &s));
        assert_ne!(s, p);
    }

    #[test]
    fn proof_is_hmac_sha256_over_label_nonce_and_hello() {
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?"), with
        // the message split across label, nonce and hello the way `mac` feeds it.
        let t = Token(b"Jefe".to_vec());
        let msg = b"what do ya want for nothing?";
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&t.0).expect("key");
        mac.update(msg);
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let nonce = [7u8; NONCE_LEN];
        let mut whole = CLIENT_LABEL.to_vec();
        whole.extend_from_slice(&nonce);
        whole.extend_from_slice(b"{}");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&t.0).expect("key");
        mac.update(&whole);
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            t.client_proof(&nonce, b"{}")
        );
    }

    #[test]
    fn tokens_are_trimmed_and_must_be_long_enough() {
        assert_eq!(
            Token::new("  0123456789abcdef\n", "x").expect("token"),
            Token::new("0123456789abcdef", "x").expect("token")
        );
        assert!(matches!(
            Token::new(" \n", "QMIGRATE_TOKEN"),
            Err(TokenError::Empty { origin }) if origin == "QMIGRATE_TOKEN"
        ));
        let e = Token::new("short", "QMIGRATE_TOKEN").expect_err("too short");
        assert!(matches!(e, TokenError::TooShort { len: 5, .. }), "{e}");
        assert!(e.to_string().contains("head -c 32 /dev/urandom"), "{e}");
        assert_eq!(format!("{:?}", token()), "Token(<redacted>)");
    }

    fn token_file(dir: &Path, mode: u32, text: &[u8]) -> PathBuf {
        let path = dir.join(format!("token-{mode:o}"));
        let mut f = std::fs::File::create(&path).expect("create");
        f.write_all(text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn token_file_must_be_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = b"c2VjcmV0IHNlY3JldCBzZWNyZXQgc2VjcmV0Cg==\n";
        for mode in [0o600, 0o400, 0o700] {
            let path = token_file(dir.path(), mode, text);
            let t = Token::from_file(&path).unwrap_or_else(|e| panic!("mode {mode:o}: {e}"));
            assert_eq!(t, Token::new(&text[..], "x").expect("token"));
        }
        for mode in [0o640, 0o604, 0o644, 0o620, 0o602, 0o660, 0o666, 0o610] {
            let path = token_file(dir.path(), mode, text);
            let e = Token::from_file(&path).expect_err("accessible to others");
            assert!(
                matches!(&e, TokenError::Permissions { mode: m, .. } if *m == mode),
                "mode {mode:o}: {e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("chmod 600 {}", path.display())),
                "{msg}"
            );
            assert!(msg.contains(&format!("{mode:04o}")), "{msg}");
        }
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing");
        let e = Token::from_file(&missing).expect_err("missing");
        assert!(matches!(e, TokenError::Read { .. }), "{e}");
        assert!(e.to_string().contains(&missing.display().to_string()));

        let empty = token_file(dir.path(), 0o600, b"\n");
        let e = Token::from_file(&empty).expect_err("empty");
        assert!(e.to_string().contains(&empty.display().to_string()), "{e}");

        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; 5000]).expect("write");
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            Token::from_file(&big),
            Err(TokenError::TooLarge { .. })
        ));
    }

    #[test]
    fn hex_round_trips_and_rejects_junk() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abFF"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("+1"), None);
        let n = nonce().expect("nonce");
        assert_eq!(parse_nonce(&hex(&n)), Some(n));
        assert_ne!(nonce().expect("nonce"), n, "two nonces are the same");
        assert_eq!(parse_nonce("00"), None);
    }
}
