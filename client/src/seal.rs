//! The client body format of `protocol.md` ("Client body format"), which
//! every client of the project writes and reads:
//!
//! ```text
//! 0x01 | nonce (24 bytes) | crypto_box_easy output (16-byte tag, ciphertext)
//! ```
//!
//! sealed from the sending device's secret key to one recipient device's
//! public key, around a UTF-8 JSON [`Plaintext`]. `crypto_box::SalsaBox` is
//! libsodium's `crypto_box_easy` (X25519, XSalsa20-Poly1305, tag first): the
//! tests below check it against NaCl's published `crypto_box` vector.

use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::group::Group;

/// The first byte of every body of this format.
pub(crate) const VERSION: u8 = 0x01;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Version, nonce and tag: a shorter body cannot be one of ours.
pub(crate) const MIN_LEN: usize = 1 + NONCE_LEN + TAG_LEN;
/// `text` is at most this many characters (`protocol.md`).
pub const MAX_TEXT_CHARS: usize = 16_384;

/// What a body holds once opened.
#[derive(Serialize, Deserialize)]
pub(crate) struct Plaintext {
    /// `"text"` or `"typing"`; readers drop types they do not know.
    #[serde(rename = "type")]
    pub kind: String,
    /// The client message id, the same in every copy and every retry.
    pub id: Uuid,
    /// Milliseconds since the Unix epoch, by the sender's clock.
    pub ts: i64,
    /// A `text`'s text; a `typing` has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// In a sync copy to the sender's own devices: the conversation's peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Uuid>,
    /// A `typing`'s `"stopped"`: the sender stopped without sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// In a group message: the group it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Group>,
}

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Shorter than version, nonce and tag.
    TooShort,
    /// A first byte other than `0x01` (or, for a copy with a `key`,
    /// `0x02`): a body of another format, such as a group message's shared
    /// body that came without its key.
    Version(u8),
    /// The box did not open with the sending device's key: sealed for
    /// another key, by another device, or altered on the way.
    DoesNotOpen,
    /// It opened, but holds no plaintext of this format.
    NotAMessage,
    /// The sending device is not in its account's directory (removed), or
    /// its key is not a `crypto_box` key.
    UnknownSender,
    /// A group message whose key was sealed for another shared body (the
    /// SHA-256 in the key differs): swapped or altered on the way.
    WrongBody,
}

/// Seals `plaintext` from `ours` to `theirs` with a fresh random nonce.
pub(crate) fn seal(plaintext: &[u8], ours: &SecretKey, theirs: &PublicKey) -> Vec<u8> {
    let nonce = SalsaBox::generate_nonce(&mut OsRng);
    seal_with_nonce(plaintext, ours, theirs, &nonce)
}

fn seal_with_nonce(
    plaintext: &[u8],
    ours: &SecretKey,
    theirs: &PublicKey,
    nonce: &Nonce,
) -> Vec<u8> {
    // XSalsa20-Poly1305 fails only past 2^38 bytes: never for a message.
    let boxed = SalsaBox::new(theirs, ours)
        .encrypt(nonce, plaintext)
        .expect("crypto_box seals any message-sized plaintext");
    let mut body = Vec::with_capacity(1 + NONCE_LEN + boxed.len());
    body.push(VERSION);
    body.extend_from_slice(nonce);
    body.extend_from_slice(&boxed);
    body
}

/// Opens a body sealed by `theirs` (the sending device) for `ours`.
pub(crate) fn open(
    body: &[u8],
    ours: &SecretKey,
    theirs: &PublicKey,
) -> Result<Vec<u8>, Unreadable> {
    if body.len() < MIN_LEN {
        return Err(Unreadable::TooShort);
    }
    if body[0] != VERSION {
        return Err(Unreadable::Version(body[0]));
    }
    let nonce: [u8; NONCE_LEN] = body[1..1 + NONCE_LEN]
        .try_into()
        .expect("the length was checked");
    SalsaBox::new(theirs, ours)
        .decrypt(&Nonce::from(nonce), &body[1 + NONCE_LEN..])
        .map_err(|_| Unreadable::DoesNotOpen)
}

#[cfg(test)]
mod tests {
    use super::*;

    // NaCl's `crypto_box` test (tests/box.c of NaCl, and libsodium's
    // test/default/box.c): Alice's secret key, Bob's key pair, the nonce,
    // the 131-byte message, and the box without NaCl's 16 zero bytes,
    // which is what `crypto_box_easy` writes.
    const ALICE_SK: [u8; 32] = [
        0x77, 0x07, 0x6d, 0x0a, 0x73, 0x18, 0xa5, 0x7d, 0x3c, 0x16, 0xc1, 0x72, 0x51, 0xb2, 0x66,
        0x45, 0xdf, 0x4c, 0x2f, 0x87, 0xeb, 0xc0, 0x99, 0x2a, 0xb1, 0x77, 0xfb, 0xa5, 0x1d, 0xb9,
        0x2c, 0x2a,
    ];
    const ALICE_PK: [u8; 32] = [
        0x85, 0x20, 0xf0, 0x09, 0x89, 0x30, 0xa7, 0x54, 0x74, 0x8b, 0x7d, 0xdc, 0xb4, 0x3e, 0xf7,
        0x5a, 0x0d, 0xbf, 0x3a, 0x0d, 0x26, 0x38, 0x1a, 0xf4, 0xeb, 0xa4, 0xa9, 0x8e, 0xaa, 0x9b,
        0x4e, 0x6a,
    ];
    const BOB_SK: [u8; 32] = [
        0x5d, 0xab, 0x08, 0x7e, 0x62, 0x4a, 0x8a, 0x4b, 0x79, 0xe1, 0x7f, 0x8b, 0x83, 0x80, 0x0e,
        0xe6, 0x6f, 0x3b, 0xb1, 0x29, 0x26, 0x18, 0xb6, 0xfd, 0x1c, 0x2f, 0x8b, 0x27, 0xff, 0x88,
        0xe0, 0xeb,
    ];
    const BOB_PK: [u8; 32] = [
        0xde, 0x9e, 0xdb, 0x7d, 0x7b, 0x7d, 0xc1, 0xb4, 0xd3, 0x5b, 0x61, 0xc2, 0xec, 0xe4, 0x35,
        0x37, 0x3f, 0x83, 0x43, 0xc8, 0x5b, 0x78, 0x67, 0x4d, 0xad, 0xfc, 0x7e, 0x14, 0x6f, 0x88,
        0x2b, 0x4f,
    ];
    const NONCE: [u8; 24] = [
        0x69, 0x69, 0x6e, 0xe9, 0x55, 0xb6, 0x2b, 0x73, 0xcd, 0x62, 0xbd, 0xa8, 0x75, 0xfc, 0x73,
        0xd6, 0x82, 0x19, 0xe0, 0x03, 0x6b, 0x7a, 0x0b, 0x37,
    ];
    const MESSAGE: [u8; 131] = [
        0xbe, 0x07, 0x5f, 0xc5, 0x3c, 0x81, 0xf2, 0xd5, 0xcf, 0x14, 0x13, 0x16, 0xeb, 0xeb, 0x0c,
        0x7b, 0x52, 0x28, 0xc5, 0x2a, 0x4c, 0x62, 0xcb, 0xd4, 0x4b, 0x66, 0x84, 0x9b, 0x64, 0x24,
        0x4f, 0xfc, 0xe5, 0xec, 0xba, 0xaf, 0x33, 0xbd, 0x75, 0x1a, 0x1a, 0xc7, 0x28, 0xd4, 0x5e,
        0x6c, 0x61, 0x29, 0x6c, 0xdc, 0x3c, 0x01, 0x23, 0x35, 0x61, 0xf4, 0x1d, 0xb6, 0x6c, 0xce,
        0x31, 0x4a, 0xdb, 0x31, 0x0e, 0x3b, 0xe8, 0x25, 0x0c, 0x46, 0xf0, 0x6d, 0xce, 0xea, 0x3a,
        0x7f, 0xa1, 0x34, 0x80, 0x57, 0xe2, 0xf6, 0x55, 0x6a, 0xd6, 0xb1, 0x31, 0x8a, 0x02, 0x4a,
        0x83, 0x8f, 0x21, 0xaf, 0x1f, 0xde, 0x04, 0x89, 0x77, 0xeb, 0x48, 0xf5, 0x9f, 0xfd, 0x49,
        0x24, 0xca, 0x1c, 0x60, 0x90, 0x2e, 0x52, 0xf0, 0xa0, 0x89, 0xbc, 0x76, 0x89, 0x70, 0x40,
        0xe0, 0x82, 0xf9, 0x37, 0x76, 0x38, 0x48, 0x64, 0x5e, 0x07, 0x05,
    ];
    const BOX_EASY: [u8; 147] = [
        0xf3, 0xff, 0xc7, 0x70, 0x3f, 0x94, 0x00, 0xe5, 0x2a, 0x7d, 0xfb, 0x4b, 0x3d, 0x33, 0x05,
        0xd9, 0x8e, 0x99, 0x3b, 0x9f, 0x48, 0x68, 0x12, 0x73, 0xc2, 0x96, 0x50, 0xba, 0x32, 0xfc,
        0x76, 0xce, 0x48, 0x33, 0x2e, 0xa7, 0x16, 0x4d, 0x96, 0xa4, 0x47, 0x6f, 0xb8, 0xc5, 0x31,
        0xa1, 0x18, 0x6a, 0xc0, 0xdf, 0xc1, 0x7c, 0x98, 0xdc, 0xe8, 0x7b, 0x4d, 0xa7, 0xf0, 0x11,
        0xec, 0x48, 0xc9, 0x72, 0x71, 0xd2, 0xc2, 0x0f, 0x9b, 0x92, 0x8f, 0xe2, 0x27, 0x0d, 0x6f,
        0xb8, 0x63, 0xd5, 0x17, 0x38, 0xb4, 0x8e, 0xee, 0xe3, 0x14, 0xa7, 0xcc, 0x8a, 0xb9, 0x32,
        0x16, 0x45, 0x48, 0xe5, 0x26, 0xae, 0x90, 0x22, 0x43, 0x68, 0x51, 0x7a, 0xcf, 0xea, 0xbd,
        0x6b, 0xb3, 0x73, 0x2b, 0xc0, 0xe9, 0xda, 0x99, 0x83, 0x2b, 0x61, 0xca, 0x01, 0xb6, 0xde,
        0x56, 0x24, 0x4a, 0x9e, 0x88, 0xd5, 0xf9, 0xb3, 0x79, 0x73, 0xf6, 0x22, 0xa4, 0x3d, 0x14,
        0xa6, 0x59, 0x9b, 0x1f, 0x65, 0x4c, 0xb4, 0x5a, 0x74, 0xe3, 0x55, 0xa5,
    ];

    #[test]
    fn keys_derive_as_in_nacl() {
        assert_eq!(SecretKey::from(ALICE_SK).public_key().as_bytes(), &ALICE_PK);
        assert_eq!(SecretKey::from(BOB_SK).public_key().as_bytes(), &BOB_PK);
    }

    #[test]
    fn seals_what_crypto_box_easy_writes() {
        let body = seal_with_nonce(
            &MESSAGE,
            &SecretKey::from(ALICE_SK),
            &PublicKey::from(BOB_PK),
            &Nonce::from(NONCE),
        );
        assert_eq!(body[0], VERSION);
        assert_eq!(&body[1..25], &NONCE);
        assert_eq!(&body[25..], &BOX_EASY[..]);
    }

    #[test]
    fn opens_what_crypto_box_easy_wrote() {
        let mut body = vec![VERSION];
        body.extend_from_slice(&NONCE);
        body.extend_from_slice(&BOX_EASY);
        let opened = open(&body, &SecretKey::from(BOB_SK), &PublicKey::from(ALICE_PK)).unwrap();
        assert_eq!(opened, MESSAGE);
    }

    #[test]
    fn refuses_what_is_not_a_body_of_this_format() {
        let bob = SecretKey::from(BOB_SK);
        let alice = PublicKey::from(ALICE_PK);
        let sealed = seal(b"hi", &SecretKey::from(ALICE_SK), &PublicKey::from(BOB_PK));
        assert_eq!(sealed.len(), MIN_LEN + 2);
        assert_eq!(open(&sealed, &bob, &alice).unwrap(), b"hi");

        assert_eq!(
            open(&sealed[..MIN_LEN - 1], &bob, &alice),
            Err(Unreadable::TooShort)
        );
        let mut other_version = sealed.clone();
        other_version[0] = 2;
        assert_eq!(
            open(&other_version, &bob, &alice),
            Err(Unreadable::Version(2))
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(open(&flipped, &bob, &alice), Err(Unreadable::DoesNotOpen));
        // Another sender's key: the box names its sender.
        let mallory = SecretKey::generate(&mut OsRng).public_key();
        assert_eq!(open(&sealed, &bob, &mallory), Err(Unreadable::DoesNotOpen));
    }

    #[test]
    fn every_seal_draws_a_fresh_nonce() {
        let (a, b) = (SecretKey::from(ALICE_SK), PublicKey::from(BOB_PK));
        assert_ne!(seal(b"same", &a, &b)[1..25], seal(b"same", &a, &b)[1..25]);
    }

    #[test]
    fn plaintext_has_the_documented_shape() {
        let id = Uuid::new_v4();
        let json = serde_json::to_value(Plaintext {
            kind: "text".into(),
            id,
            ts: 1_764_806_400_123,
            text: Some("hello".into()),
            to: None,
            state: None,
            group: None,
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "type": "text", "id": id, "ts": 1_764_806_400_123_i64, "text": "hello" })
        );
        // `typing`, as `protocol.md` shows it: no text.
        let typing = |state: Option<&str>| {
            serde_json::to_value(Plaintext {
                kind: "typing".into(),
                id,
                ts: 7,
                text: None,
                to: None,
                state: state.map(Into::into),
                group: None,
            })
            .unwrap()
        };
        assert_eq!(
            typing(None),
            serde_json::json!({ "type": "typing", "id": id, "ts": 7 })
        );
        assert_eq!(
            typing(Some("stopped")),
            serde_json::json!({ "type": "typing", "id": id, "ts": 7, "state": "stopped" })
        );
        // Unknown fields are ignored.
        let read: Plaintext = serde_json::from_str(&format!(
            r#"{{"type":"text","id":"{id}","ts":1,"text":"x","to":"{id}","future":true}}"#
        ))
        .unwrap();
        assert_eq!(read.to, Some(id));
    }
}
