//! The TLS 1.3 record layer (RFC 8446 section 5) for the application-data phase, run by
//! qmigrate itself once rustls has finished the handshake.
//!
//! Why not leave the records to rustls: its buffered API copies every byte twice on the
//! receiving side (out of the socket buffer into its own plaintext queue, then into ours) and
//! once on the sending side, and hands out one 16 KiB record per read. On this workload
//! (gigabytes through a relay) those copies cost more than the cipher itself. Here a record is
//! sealed and opened in place, in the buffer the socket reads into and writes from, so a TLS
//! tunnel makes the same copies as a plain one plus the AES-GCM pass. rustls still owns the
//! handshake, the certificates and the key schedule: key updates come from its
//! [`rustls::kernel::KernelConnection`], the interface it offers for kernel TLS.

use ring::aead;
use rustls::{AlertDescription, ConnectionTrafficSecrets, Error as RustlsError};

/// Record header: content type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// AEAD tag of every suite rustls offers for TLS 1.3.
pub(crate) const TAG: usize = 16;
/// Largest plaintext in one record (2^14).
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// Largest encrypted body a peer may send (2^14 + 256, RFC 8446 section 5.2).
pub(crate) const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;
/// Wire size of a record that carries `MAX_PLAINTEXT` bytes: header, content, the inner
/// content type byte, tag.
pub(crate) const FULL_RECORD: usize = HEADER + MAX_PLAINTEXT + 1 + TAG;

/// Inner content types (RFC 8446 section 5.1).
pub(crate) const ALERT: u8 = 21;
pub(crate) const HANDSHAKE: u8 = 22;
pub(crate) const APPLICATION_DATA: u8 = 23;

/// Handshake message types that may follow the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// One direction's AEAD key, IV and record sequence number.
pub(crate) struct RecordKey {
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl std::fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordKey")
            .field("algorithm", self.key.algorithm())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl RecordKey {
    /// The key for `secrets`, starting at record number `seq`.
    pub(crate) fn new(
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> Result<RecordKey, RustlsError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            #[allow(unreachable_patterns)] // rustls may add suites
            _ => return Err(RustlsError::General("unsupported TLS cipher suite".into())),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| RustlsError::General("bad TLS traffic key".into()))?;
        let iv = iv
            .as_ref()
            .try_into()
            .map_err(|_| RustlsError::General("bad TLS traffic IV".into()))?;
        Ok(RecordKey {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Records protected with this key so far (the next record's number).
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// The per-record nonce: the IV XOR the sequence number (RFC 8446 section 5.3).
    fn next_nonce(&mut self) -> Result<aead::Nonce, RustlsError> {
        let mut nonce = self.iv;
        for (n, s) in nonce[aead::NONCE_LEN - 8..]
            .iter_mut()
            .zip(self.seq.to_be_bytes())
        {
            *n ^= s;
        }
        // A sequence number may never wrap (section 5.3); key updates come long before.
        self.seq = self.seq.checked_add(1).ok_or(RustlsError::EncryptError)?;
        Ok(aead::Nonce::assume_unique_for_key(nonce))
    }

    /// Seals one record in place. `record` holds, from its start: room for the header, the
    /// `len` content bytes, and room for the type byte and the tag (`sealed_len(len)` bytes in
    /// all). Writes the header, type byte and tag around the content and encrypts it.
    pub(crate) fn seal(
        &mut self,
        record: &mut [u8],
        len: usize,
        typ: u8,
    ) -> Result<(), RustlsError> {
        debug_assert!(len <= MAX_PLAINTEXT && record.len() >= sealed_len(len));
        let header = header(len + 1 + TAG);
        record[..HEADER].copy_from_slice(&header);
        record[HEADER + len] = typ;
        let nonce = self.next_nonce()?;
        let body = &mut record[HEADER..HEADER + len + 1 + TAG];
        let (inner, tag_room) = body.split_at_mut(len + 1);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), inner)
            .map_err(|_| RustlsError::EncryptError)?;
        tag_room.copy_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens one record in place: `body` is the record after its `header`, tag included.
    /// Returns the inner content type and the content's length (at the start of `body`).
    pub(crate) fn open(
        &mut self,
        header: [u8; HEADER],
        body: &mut [u8],
    ) -> Result<Opened, RustlsError> {
        let nonce = self.next_nonce()?;
        let plain = self
            .key
            .open_in_place(nonce, aead::Aad::from(header), body)
            .map_err(|_| RustlsError::DecryptError)?;
        // TLSInnerPlaintext: content, the real content type, then zero padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RustlsError::PeerMisbehaved(
                rustls::PeerMisbehaved::IllegalTlsInnerPlaintext,
            ));
        };
        if end > MAX_PLAINTEXT {
            return Err(RustlsError::PeerSentOversizedRecord);
        }
        Ok(Opened {
            typ: plain[end],
            len: end,
        })
    }
}

/// What [`RecordKey::open`] found in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    /// The inner content type.
    pub typ: u8,
    /// Bytes of content at the start of the body.
    pub len: usize,
}

/// Wire size of a record carrying `len` content bytes.
pub(crate) const fn sealed_len(len: usize) -> usize {
    HEADER + len + 1 + TAG
}

/// The outer header of an encrypted record whose body is `body_len` bytes.
fn header(body_len: usize) -> [u8; HEADER] {
    let [hi, lo] = (body_len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, hi, lo]
}

/// Checks an incoming record's outer header; returns its body length.
pub(crate) fn parse_header(h: &[u8; HEADER]) -> Result<usize, RustlsError> {
    let len = u16::from_be_bytes([h[3], h[4]]) as usize;
    if h[0] != APPLICATION_DATA {
        // After the handshake everything is an encrypted record with the outer type
        // application_data; a plaintext alert here is the peer failing before it had keys.
        return Err(match (h[0], len) {
            (ALERT, 2) => RustlsError::General("the peer sent an unencrypted alert".into()),
            _ => RustlsError::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        });
    }
    if h[1] != 3 {
        return Err(RustlsError::InvalidMessage(
            rustls::InvalidMessage::UnknownProtocolVersion,
        ));
    }
    if len > MAX_CIPHERTEXT {
        return Err(RustlsError::PeerSentOversizedRecord);
    }
    if len < 1 + TAG {
        return Err(RustlsError::DecryptError);
    }
    Ok(len)
}

/// An alert record's meaning to the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alert {
    /// `close_notify`: the peer sends nothing more; a clean end of this direction.
    CloseNotify,
    /// Any other alert ends the connection (TLS 1.3 has no warnings besides the two closes).
    Fatal(AlertDescription),
}

/// Parses the content of an alert record.
pub(crate) fn parse_alert(content: &[u8]) -> Result<Alert, RustlsError> {
    match content {
        [_, 0] => Ok(Alert::CloseNotify),
        // user_canceled is followed by a close_notify; treat it as the end it announces.
        [_, 90] => Ok(Alert::CloseNotify),
        [_, desc] => Ok(Alert::Fatal(AlertDescription::from(*desc))),
        _ => Err(RustlsError::InvalidMessage(
            rustls::InvalidMessage::MessageTooShort,
        )),
    }
}

/// A handshake message after the handshake, as the reader must act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PostHandshake {
    /// The peer switched its sending key; `requested`: it asks us to switch ours too.
    KeyUpdate { requested: bool },
    /// A session ticket (its body): stored with rustls, or ignored on a server.
    NewSessionTicket(Vec<u8>),
}

/// Splits the content of a handshake record into messages. A message split across records is
/// refused: the only post-handshake messages qmigrate expects are a few bytes long.
pub(crate) fn parse_handshake(mut content: &[u8]) -> Result<Vec<PostHandshake>, RustlsError> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let &[typ, a, b, c, ref rest @ ..] = content else {
            return Err(RustlsError::InvalidMessage(
                rustls::InvalidMessage::MessageTooShort,
            ));
        };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        if rest.len() < len {
            return Err(RustlsError::InvalidMessage(
                rustls::InvalidMessage::MessageTooShort,
            ));
        }
        let (body, next) = rest.split_at(len);
        out.push(match (typ, body) {
            (KEY_UPDATE, [0]) => PostHandshake::KeyUpdate { requested: false },
            (KEY_UPDATE, [1]) => PostHandshake::KeyUpdate { requested: true },
            (KEY_UPDATE, _) => {
                return Err(RustlsError::InvalidMessage(
                    rustls::InvalidMessage::InvalidKeyUpdate,
                ))
            }
            (NEW_SESSION_TICKET, body) => PostHandshake::NewSessionTicket(body.to_vec()),
            (other, _) => {
                return Err(RustlsError::InappropriateHandshakeMessage {
                    expect_types: vec![
                        rustls::HandshakeType::KeyUpdate,
                        rustls::HandshakeType::NewSessionTicket,
                    ],
                    got_type: rustls::HandshakeType::from(other),
                })
            }
        });
        content = next;
    }
    Ok(out)
}

/// The content of a `key_update` message (not requesting one back).
pub(crate) const KEY_UPDATE_MESSAGE: [u8; 5] = [KEY_UPDATE, 0, 0, 1, 0];

/// The content of a `close_notify` alert (level warning, description 0).
pub(crate) const CLOSE_NOTIFY: [u8; 2] = [1, 0];

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn secrets(k: u8) -> ConnectionTrafficSecrets {
        // AeadKey is 32 bytes when made from outside rustls: AES-256-GCM.
        ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([k; 32]),
            iv: Iv::from([k ^ 0x55; 12]),
        }
    }

    fn pair() -> (RecordKey, RecordKey) {
        (
            RecordKey::new(0, &secrets(7)).expect("key"),
            RecordKey::new(0, &secrets(7)).expect("key"),
        )
    }

    fn sealed(key: &mut RecordKey, content: &[u8], typ: u8) -> Vec<u8> {
        let mut rec = vec![0u8; sealed_len(content.len())];
        rec[HEADER..HEADER + content.len()].copy_from_slice(content);
        key.seal(&mut rec, content.len(), typ).expect("seal");
        rec
    }

    #[test]
    fn sealed_records_open_in_order_and_only_in_order() {
        let (mut tx, mut rx) = pair();
        let a = sealed(&mut tx, b"first", APPLICATION_DATA);
        let b = sealed(&mut tx, &[9u8; MAX_PLAINTEXT], APPLICATION_DATA);
        assert_eq!(a.len(), sealed_len(5));
        assert_eq!(b.len(), FULL_RECORD);
        assert_eq!(&a[..3], &[23, 3, 3]);

        // Out of order: the nonce (sequence number) differs, so the tag does not match.
        let mut wrong = b.clone();
        let h: [u8; HEADER] = wrong[..HEADER].try_into().expect("header");
        let mut rx2 = RecordKey::new(0, &secrets(7)).expect("key");
        assert_eq!(
            rx2.open(h, &mut wrong[HEADER..]),
            Err(RustlsError::DecryptError)
        );

        for (rec, want) in [(a, &b"first"[..]), (b, &[9u8; MAX_PLAINTEXT][..])] {
            let mut rec = rec;
            let h: [u8; HEADER] = rec[..HEADER].try_into().expect("header");
            assert_eq!(parse_header(&h), Ok(rec.len() - HEADER));
            let opened = rx.open(h, &mut rec[HEADER..]).expect("open");
            assert_eq!(opened.typ, APPLICATION_DATA);
            assert_eq!(&rec[HEADER..HEADER + opened.len], want);
        }
        assert_eq!(rx.seq(), 2);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let (mut tx, _) = pair();
        let rec = sealed(&mut tx, b"some content", APPLICATION_DATA);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            let h: [u8; HEADER] = bad[..HEADER].try_into().expect("header");
            let mut rx = RecordKey::new(0, &secrets(7)).expect("key");
            let result = parse_header(&h).and_then(|_| rx.open(h, &mut bad[HEADER..]));
            assert!(result.is_err(), "byte {i} flipped and still accepted");
        }
    }

    #[test]
    fn padding_is_stripped_and_all_zero_plaintext_refused() {
        let (mut tx, mut rx) = pair();
        // Content "ab", type 23, three zero bytes of padding: seal it as 6 bytes of "content"
        // whose last byte is the type the layer appends, i.e. by hand.
        let mut rec = sealed(&mut tx, &[b'a', b'b', APPLICATION_DATA, 0, 0], 0);
        let h: [u8; HEADER] = rec[..HEADER].try_into().expect("header");
        let opened = rx.open(h, &mut rec[HEADER..]).expect("open");
        assert_eq!(
            opened,
            Opened {
                typ: APPLICATION_DATA,
                len: 2
            }
        );

        let mut zeros = sealed(&mut tx, &[0, 0, 0], 0);
        let h: [u8; HEADER] = zeros[..HEADER].try_into().expect("header");
        assert!(rx.open(h, &mut zeros[HEADER..]).is_err());
    }

    #[test]
    fn headers_alerts_and_post_handshake_messages_parse() {
        assert!(parse_header(&[22, 3, 3, 0, 40]).is_err());
        assert!(parse_header(&[23, 3, 3, 0x41, 0x01]).is_err()); // 2^14 + 257
        assert!(parse_header(&[23, 3, 3, 0, 16]).is_err()); // no room for the type byte
        assert_eq!(parse_header(&[23, 3, 3, 0x41, 0x00]), Ok(MAX_CIPHERTEXT));

        assert_eq!(parse_alert(&CLOSE_NOTIFY), Ok(Alert::CloseNotify));
        assert_eq!(
            parse_alert(&[2, 20]),
            Ok(Alert::Fatal(AlertDescription::BadRecordMac))
        );
        assert!(parse_alert(&[1]).is_err());

        let mut two = KEY_UPDATE_MESSAGE.to_vec();
        two.extend_from_slice(&[KEY_UPDATE, 0, 0, 1, 1]);
        assert_eq!(
            parse_handshake(&two),
            Ok(vec![
                PostHandshake::KeyUpdate { requested: false },
                PostHandshake::KeyUpdate { requested: true }
            ])
        );
        assert!(parse_handshake(&[KEY_UPDATE, 0, 0, 1, 2]).is_err());
        assert!(parse_handshake(&[KEY_UPDATE, 0, 0, 2, 0]).is_err());
        assert!(parse_handshake(&[1, 0, 0, 0]).is_err()); // a ClientHello
        assert_eq!(
            parse_handshake(&[NEW_SESSION_TICKET, 0, 0, 2, 7, 8]),
            Ok(vec![PostHandshake::NewSessionTicket(vec![7, 8])])
        );
    }
}
