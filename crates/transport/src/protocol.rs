//! The tunnel handshake: what a tunnel client and server say to each other before any
//! migration byte flows. See `docs/PROTOCOL.md` for the wire format and its rationale.
//!
//! Messages are plain data (serde, JSON) inside a tiny binary envelope: an 8-byte magic, a
//! big-endian `u32` length and the JSON body. The magic lets the server reject a peer that
//! speaks something else (HTTP, TLS, random bytes) after reading eight bytes, and the length
//! bounds what it will buffer before it knows who it talks to.

use serde::{Deserialize, Serialize};

pub use crate::sniff::Sniffed;

/// First eight bytes of every handshake envelope.
pub const MAGIC: &[u8; 8] = b"QMTUNL\r\n";

/// Largest handshake body accepted: a hello is a few hundred bytes, so anything near this is
/// not our protocol.
pub const MAX_HANDSHAKE_LEN: u32 = 64 * 1024;

/// The oldest protocol version this build speaks.
pub const PROTOCOL_MIN: u32 = 1;
/// The newest protocol version this build speaks.
pub const PROTOCOL_MAX: u32 = 3;

/// The first version in which each side of a data connection acknowledges the peer's end of
/// stream before either calls the connection complete: on `tcp://` and `tls://` a second empty
/// frame after the end marker, on `ws://` and `wss://` a close frame that must arrive. Version
/// 1 ends without it (and a side there cannot tell a direction cut after its end marker left
/// from a complete one). Nothing else differs, so a version-1 peer still interoperates.
pub const ACKNOWLEDGED_END: u32 = 2;

/// The first version in which each side proves it is alive: on `ws://` and `wss://` data
/// connections a side sends a ping ([`PING_IDLE`]) whenever it has sent no frame for a second,
/// until its end marker, so that the other side can take a silence of its dead-peer timeout
/// for a hung peer; control connections carry heartbeats (the migration engine's messages).
/// A version-2 peer neither sends nor expects them, and nothing else differs.
pub const HEARTBEATS: u32 = 3;

/// From version [`HEARTBEATS`]: the longest a side stays silent on a WebSocket data
/// connection before its end marker (it sends a ping after this long without a frame), and
/// the interval of the control connection's heartbeats.
pub const PING_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest data frame on a TCP tunnel connection. Frames carry whatever one read from the
/// Unix socket returned, so this is also the relay's buffer size.
pub const MAX_FRAME: usize = 1024 * 1024;

/// Which kind of connection a hello opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    /// A migration connection: the server connects it to the destination socket.
    Data,
    /// The control connection of a migration session (`qmigrate migrate`): the migration
    /// engine's control messages prepare the destination QEMU before any data connection is
    /// opened. The transport carries them as envelopes and never reads them.
    Control,
    /// An NBD client connection of a migration session that copies disks (`migrate
    /// --copy-storage`): the server connects it to the NBD server the session's controller
    /// started for it. Outside the session's data connections and their order (`seq` is 0);
    /// one per disk, plus one per reconnect. A server older than this purpose refuses it as
    /// unknown.
    Nbd,
    /// Anything a newer peer may send that this build does not know.
    #[serde(other)]
    Other,
}

/// Client -> server, first message of every tunnel connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the client speaks.
    pub min_version: u32,
    /// Newest protocol version the client speaks.
    pub max_version: u32,
    /// The client's software and version, for error messages (`qmigrate 0.1.0`).
    pub software: String,
    /// Random id shared by all connections of one migration (hex).
    pub session: String,
    /// Position of this connection in the order the source QEMU opened them, from 0.
    pub seq: u64,
    /// What this connection is for.
    pub purpose: Purpose,
    /// The route (destination VM) asked for; `None` for the server's only destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    /// A client with a token sends a fresh random nonce (hex, [`auth::NONCE_LEN`] bytes),
    /// which the server's proof in [`Reply::Accept`] covers; a server without a token refuses
    /// such a client at once, before it touches the destination. [`Hello::data`] and
    /// [`Hello::control`] leave it empty; the client fills it in for each connection.
    ///
    /// [`auth::NONCE_LEN`]: crate::auth::NONCE_LEN
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

impl Hello {
    /// A hello for data connection `seq` of `session`, offering every version this build speaks.
    pub fn data(session: &str, seq: u64) -> Self {
        Hello {
            min_version: PROTOCOL_MIN,
            max_version: PROTOCOL_MAX,
            software: software(),
            session: session.to_owned(),
            seq,
            purpose: Purpose::Data,
            route: None,
            nonce: None,
        }
    }
}

impl Hello {
    /// A hello for the control connection of `session`, to `route` (`None`: the server's only
    /// destination).
    pub fn control(session: &str, route: Option<String>) -> Self {
        Hello {
            purpose: Purpose::Control,
            route,
            ..Hello::data(session, 0)
        }
    }
}

impl Hello {
    /// A hello for an NBD connection of `session`, to `route`.
    pub fn nbd(session: &str, route: Option<String>) -> Self {
        Hello {
            purpose: Purpose::Nbd,
            route,
            ..Hello::data(session, 0)
        }
    }
}

/// Server -> client, the answer to a [`Hello`] (and, after a [`Reply::Challenge`], to the
/// client's [`Auth`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Reply {
    /// The server has a token: the client must prove it knows it, in an [`Auth`] message.
    Challenge {
        /// The server's fresh random nonce for this connection (hex, 32 bytes).
        nonce: String,
    },
    /// The connection is accepted: the destination socket is connected and data may flow.
    Accept {
        /// The protocol version both sides now speak.
        version: u32,
        /// The server's software and version.
        software: String,
        /// After a challenge, the server's proof that it knows the token too (hex); see
        /// [`Token::server_proof`](crate::auth::Token::server_proof).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    /// The connection is refused; the server closes it after this message.
    Reject {
        /// Machine-readable reason.
        reason: RejectReason,
        /// What went wrong and what to do, for the operator.
        message: String,
        /// The server's software and version, so version mismatches name both sides.
        software: String,
        /// Versions the server speaks, on a version mismatch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        versions: Option<(u32, u32)>,
    },
}

/// Client -> server, the answer to a [`Reply::Challenge`]: `{"type": "auth", "mac": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "AuthMessage", into = "AuthMessage")]
pub struct Auth {
    /// The client's proof (hex), see
    /// [`Token::client_proof`](crate::auth::Token::client_proof); `None` from a client without
    /// a token, so that the server can say so.
    pub mac: Option<String>,
}

/// [`Auth`] on the wire. A tagged enum, because serde checks the tag of an enum but ignores
/// it on a struct: another message (a replayed hello) must not pass for an `auth`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
enum AuthMessage {
    Auth {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
}

impl From<AuthMessage> for Auth {
    fn from(AuthMessage::Auth { mac }: AuthMessage) -> Self {
        Auth { mac }
    }
}

impl From<Auth> for AuthMessage {
    fn from(Auth { mac }: Auth) -> Self {
        AuthMessage::Auth { mac }
    }
}

/// Why a server refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectReason {
    /// No protocol version in common.
    Version,
    /// The hello was malformed or asked for something this server does not do.
    BadRequest,
    /// The destination migration socket could not be connected.
    Destination,
    /// The server is shutting down.
    ShuttingDown,
    /// The client did not prove that it knows the server's token.
    Auth,
    /// A reason a newer server gives that this build does not know.
    #[serde(other)]
    Other,
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RejectReason::Version => "version mismatch",
            RejectReason::BadRequest => "bad request",
            RejectReason::Destination => "destination unavailable",
            RejectReason::ShuttingDown => "server shutting down",
            RejectReason::Auth => "authentication failed",
            RejectReason::Other => "refused",
        })
    }
}

/// `qmigrate <version>`: how each side names itself in handshakes.
pub fn software() -> String {
    format!("qmigrate {}", env!("CARGO_PKG_VERSION"))
}

/// The highest version both ranges contain, if any.
pub fn negotiate(min: u32, max: u32) -> Option<u32> {
    let hi = max.min(PROTOCOL_MAX);
    let lo = min.max(PROTOCOL_MIN);
    (lo <= hi).then_some(hi)
}

/// Encodes `msg` as one envelope: magic, big-endian length, JSON.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    envelope(&encode_body(msg))
}

/// Encodes `msg` as an envelope body (JSON): the bytes an authentication proof covers.
pub fn encode_body<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(msg).unwrap_or_default()
}

/// Wraps a body in an envelope.
pub fn envelope(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What is wrong with bytes that should have been an envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The first bytes are not our magic; what the peer seems to speak instead.
    #[error("the peer does not speak the qmigrate tunnel protocol ({0})")]
    NotOurProtocol(Sniffed),
    /// The length field is larger than [`MAX_HANDSHAKE_LEN`].
    #[error("handshake message of {0} bytes is larger than the {MAX_HANDSHAKE_LEN}-byte limit")]
    TooLarge(u32),
    /// Fewer bytes than the header or the length field promised.
    #[error("truncated handshake message")]
    Truncated,
    /// The body is not the JSON message expected.
    #[error("malformed handshake message: {0}")]
    Json(String),
}

/// Checks an envelope header (the first 12 bytes) and returns the body length.
pub fn parse_header(header: &[u8; 12]) -> Result<u32, EnvelopeError> {
    if &header[..8] != MAGIC {
        return Err(EnvelopeError::NotOurProtocol(Sniffed::of(header)));
    }
    let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    if len > MAX_HANDSHAKE_LEN {
        return Err(EnvelopeError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes one whole envelope (as carried in one WebSocket message).
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, EnvelopeError> {
    decode_body(unwrap_envelope(bytes)?)
}

/// Checks one whole envelope and returns its body.
pub fn unwrap_envelope(bytes: &[u8]) -> Result<&[u8], EnvelopeError> {
    let header: &[u8; 12] = bytes
        .get(..12)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| {
            if bytes.len() >= 8 && &bytes[..8] != MAGIC {
                let mut h = [0u8; 12];
                h[..bytes.len().min(12)].copy_from_slice(&bytes[..bytes.len().min(12)]);
                EnvelopeError::NotOurProtocol(Sniffed::of(&h))
            } else {
                EnvelopeError::Truncated
            }
        })?;
    let len = parse_header(header)? as usize;
    let body = &bytes[12..];
    if body.len() != len {
        return Err(EnvelopeError::Truncated);
    }
    Ok(body)
}

/// Decodes an envelope body.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, EnvelopeError> {
    serde_json::from_slice(body).map_err(|e| EnvelopeError::Json(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_through_an_envelope() {
        let hello = Hello::data("0123abcd", 7);
        let bytes = encode(&hello);
        assert_eq!(&bytes[..8], MAGIC);
        let back: Hello = decode(&bytes).expect("decode");
        assert_eq!(back, hello);
    }

    #[test]
    fn hello_json_is_stable() {
        let hello = Hello::data("s1", 2);
        let json: serde_json::Value = serde_json::to_value(&hello).expect("json");
        assert_eq!(json["min_version"], 1);
        assert_eq!(json["seq"], 2);
        assert_eq!(json["purpose"], "data");
        assert!(json.get("route").is_none());
    }

    #[test]
    fn unknown_reject_reason_and_purpose_decode_as_other() {
        let r: Reply = serde_json::from_str(
            r#"{"type":"reject","reason":"quota","message":"m","software":"qmigrate 9"}"#,
        )
        .expect("reply");
        assert!(matches!(
            r,
            Reply::Reject {
                reason: RejectReason::Other,
                ..
            }
        ));
        let p: Purpose = serde_json::from_str(r#""snapshot""#).expect("purpose");
        assert_eq!(p, Purpose::Other);
        let p: Purpose = serde_json::from_str(r#""control""#).expect("purpose");
        assert_eq!(p, Purpose::Control);
        let p: Purpose = serde_json::from_str(r#""nbd""#).expect("purpose");
        assert_eq!(p, Purpose::Nbd);
    }

    #[test]
    fn auth_messages_are_stable() {
        let challenge: serde_json::Value =
            serde_json::to_value(Reply::Challenge { nonce: "ab".into() }).expect("json");
        assert_eq!(
            challenge,
            serde_json::json!({"type": "challenge", "nonce": "ab"})
        );
        let auth = Auth {
            mac: Some("cd".into()),
        };
        assert_eq!(
            serde_json::to_value(&auth).expect("json"),
            serde_json::json!({"type": "auth", "mac": "cd"})
        );
        assert_eq!(
            decode::<Auth>(&encode(&auth)).expect("decode"),
            auth,
            "round trip"
        );
        let none: Auth = serde_json::from_str(r#"{"type":"auth"}"#).expect("no mac");
        assert_eq!(none.mac, None);
        assert!(
            serde_json::from_str::<Auth>(r#"{"type":"hello","mac":"cd"}"#).is_err(),
            "another message is not an auth"
        );
        assert!(decode::<Auth>(&encode(&Hello::data("s", 0))).is_err());
        // An accept without a proof (a server without a token) still decodes.
        let accept: Reply =
            serde_json::from_str(r#"{"type":"accept","version":1,"software":"qmigrate 0.1.0"}"#)
                .expect("accept");
        assert!(matches!(accept, Reply::Accept { mac: None, .. }));
        let r: RejectReason = serde_json::from_str(r#""auth""#).expect("reason");
        assert_eq!(r, RejectReason::Auth);
        let mut hello = Hello::data("s", 0);
        assert!(!String::from_utf8_lossy(&encode_body(&hello)).contains("nonce"));
        hello.nonce = Some("ef".into());
        assert_eq!(decode::<Hello>(&encode(&hello)).expect("decode"), hello);
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 1), Some(1), "a version-1 peer");
        assert_eq!(negotiate(1, 2), Some(2));
        assert_eq!(negotiate(2, 2), Some(2));
        assert_eq!(negotiate(1, 5), Some(PROTOCOL_MAX));
        assert_eq!(negotiate(PROTOCOL_MAX + 1, PROTOCOL_MAX + 3), None);
        assert_eq!(negotiate(0, 0), None);
    }

    #[test]
    fn garbage_is_named() {
        let mut h = [0u8; 12];
        h.copy_from_slice(b"GET / HTTP/1");
        assert!(matches!(
            parse_header(&h),
            Err(EnvelopeError::NotOurProtocol(Sniffed::Http))
        ));
        let mut big = [0u8; 12];
        big[..8].copy_from_slice(MAGIC);
        big[8..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_header(&big), Err(EnvelopeError::TooLarge(u32::MAX)));
        assert_eq!(
            decode::<Hello>(&encode(&Hello::data("x", 0))[..20]),
            Err(EnvelopeError::Truncated)
        );
        assert!(matches!(
            decode::<Hello>(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00"),
            Err(EnvelopeError::NotOurProtocol(Sniffed::Tls))
        ));
    }
}
