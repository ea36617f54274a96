//! Group messages in the shared form (`protocol.md`, "Client body format",
//! "Group messages (shared form)"): one ciphertext for every member device,
//! and for each device a small key that opens it.
//!
//! ```text
//! shared body: 0x02 | nonce (24 bytes) | crypto_secretbox_easy(plaintext, nonce, K)
//! key:         a 0x01 body (crypto_box, as `seal`) around K || SHA-256(shared body)
//! ```
//!
//! The hash in the key binds it to that one body: a key sealed by the
//! sending device opens only the body it was sealed with, so neither the
//! server nor another member can slip a different body under it.
//!
//! A group is nothing on the server: [`Group`] travels in every message's
//! plaintext, and readers file the message under its id.

use crypto_box::{PublicKey, SecretKey};
use crypto_secretbox::aead::{Aead, AeadCore, KeyInit, OsRng};
use crypto_secretbox::{Key, Nonce, XSalsa20Poly1305};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::seal::{self, MIN_LEN, Unreadable};

/// The first byte of a shared body.
pub(crate) const SHARED_VERSION: u8 = 0x02;
const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;
const HASH_LEN: usize = 32;
/// A group's name is at most this many characters (`protocol.md`).
pub const MAX_GROUP_NAME_CHARS: usize = 64;

/// A group as its messages carry it: who made it up (its id, a random
/// UUID), what it is called, and its member accounts, the sender's
/// included. The latest message's `name` and `members` are the group's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub id: Uuid,
    pub name: String,
    pub members: Vec<Uuid>,
}

impl Group {
    /// A new group, with an id of its own: `members` as given, each once,
    /// in their first order. Its creator belongs in it too:
    /// [`Client::new_group`](crate::Client::new_group) adds it.
    pub fn new(name: impl Into<String>, members: impl IntoIterator<Item = Uuid>) -> Self {
        let mut group = Self {
            id: Uuid::new_v4(),
            name: name.into(),
            members: Vec::new(),
        };
        for member in members {
            group.add(member);
        }
        group
    }

    /// Adds `member` unless it is in already.
    pub(crate) fn add(&mut self, member: Uuid) {
        if !self.members.contains(&member) {
            self.members.push(member);
        }
    }
}

/// One message sealed in the shared form: its body, and what every
/// device's key holds.
pub(crate) struct SharedBody {
    /// `0x02 | nonce | secretbox`, as sent in `shared`.
    pub body: Vec<u8>,
    /// `K || SHA-256(body)`: sealed to each recipient device as its key.
    key_material: [u8; KEY_LEN + HASH_LEN],
}

impl SharedBody {
    /// Seals `plaintext` under a fresh content key and nonce.
    pub fn seal(plaintext: &[u8]) -> Self {
        let content_key = XSalsa20Poly1305::generate_key(&mut OsRng);
        let nonce = XSalsa20Poly1305::generate_nonce(&mut OsRng);
        Self::seal_with(plaintext, &content_key, &nonce)
    }

    fn seal_with(plaintext: &[u8], content_key: &Key, nonce: &Nonce) -> Self {
        // XSalsa20-Poly1305 fails only past 2^38 bytes: never for a message.
        let boxed = XSalsa20Poly1305::new(content_key)
            .encrypt(nonce, plaintext)
            .expect("secretbox seals any message-sized plaintext");
        let mut body = Vec::with_capacity(1 + nonce.len() + boxed.len());
        body.push(SHARED_VERSION);
        body.extend_from_slice(nonce);
        body.extend_from_slice(&boxed);
        let mut key_material = [0; KEY_LEN + HASH_LEN];
        key_material[..KEY_LEN].copy_from_slice(content_key);
        key_material[KEY_LEN..].copy_from_slice(&Sha256::digest(&body));
        Self { body, key_material }
    }

    /// The key of one recipient device: a `0x01` body from `ours` to
    /// `theirs` with a fresh nonce.
    pub fn key_for(&self, ours: &SecretKey, theirs: &PublicKey) -> Vec<u8> {
        seal::seal(&self.key_material, ours, theirs)
    }
}

/// Opens a shared `body` with this device's `key`, both sent by the device
/// whose public key is `theirs`: the key first (a `0x01` body), then its
/// hash checked against `body`, then `body` with the content key.
pub(crate) fn open(
    body: &[u8],
    key: &[u8],
    ours: &SecretKey,
    theirs: &PublicKey,
) -> Result<Vec<u8>, Unreadable> {
    if body.len() < MIN_LEN {
        return Err(Unreadable::TooShort);
    }
    if body[0] != SHARED_VERSION {
        return Err(Unreadable::Version(body[0]));
    }
    let material = seal::open(key, ours, theirs)?;
    if material.len() != KEY_LEN + HASH_LEN {
        return Err(Unreadable::NotAMessage);
    }
    let (content_key, hash) = material.split_at(KEY_LEN);
    if Sha256::digest(body)[..] != *hash {
        return Err(Unreadable::WrongBody);
    }
    let nonce: [u8; NONCE_LEN] = body[1..1 + NONCE_LEN]
        .try_into()
        .expect("the length was checked");
    let content_key: [u8; KEY_LEN] = content_key.try_into().expect("split at KEY_LEN");
    XSalsa20Poly1305::new(&Key::from(content_key))
        .decrypt(&Nonce::from(nonce), &body[1 + NONCE_LEN..])
        .map_err(|_| Unreadable::DoesNotOpen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::VERSION;

    fn pair() -> (SecretKey, PublicKey) {
        let secret = SecretKey::generate(&mut OsRng);
        let public = secret.public_key();
        (secret, public)
    }

    #[test]
    fn every_recipient_opens_the_one_body() {
        let (alice, alice_pk) = pair();
        let (bob, bob_pk) = pair();
        let (carol, carol_pk) = pair();
        let shared = SharedBody::seal(b"{\"type\":\"text\"}");
        assert_eq!(shared.body[0], SHARED_VERSION);
        assert_eq!(shared.body.len(), MIN_LEN + 15);
        let for_bob = shared.key_for(&alice, &bob_pk);
        let for_carol = shared.key_for(&alice, &carol_pk);
        // 1 + 24 + 16 + 64, as the protocol says.
        assert_eq!(for_bob.len(), 105);
        assert_eq!(
            open(&shared.body, &for_bob, &bob, &alice_pk).unwrap(),
            b"{\"type\":\"text\"}"
        );
        assert_eq!(
            open(&shared.body, &for_carol, &carol, &alice_pk).unwrap(),
            b"{\"type\":\"text\"}"
        );
        // Bob's key is not Carol's, and names its sender.
        assert_eq!(
            open(&shared.body, &for_bob, &carol, &alice_pk),
            Err(Unreadable::DoesNotOpen)
        );
        let (_, mallory_pk) = pair();
        assert_eq!(
            open(&shared.body, &for_bob, &bob, &mallory_pk),
            Err(Unreadable::DoesNotOpen)
        );
    }

    #[test]
    fn a_key_opens_only_its_own_body() {
        let (alice, alice_pk) = pair();
        let (bob, bob_pk) = pair();
        let first = SharedBody::seal(b"first");
        let second = SharedBody::seal(b"second");
        let key = first.key_for(&alice, &bob_pk);
        // Another body under this key: its hash differs.
        assert_eq!(
            open(&second.body, &key, &bob, &alice_pk),
            Err(Unreadable::WrongBody)
        );
        // One bit of the body changed: the same.
        let mut altered = first.body.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(
            open(&altered, &key, &bob, &alice_pk),
            Err(Unreadable::WrongBody)
        );
        assert_eq!(open(&first.body, &key, &bob, &alice_pk).unwrap(), b"first");
    }

    #[test]
    fn a_key_with_the_wrong_hash_or_size_is_refused() {
        let (alice, alice_pk) = pair();
        let (bob, bob_pk) = pair();
        let shared = SharedBody::seal(b"hello");
        // The right content key with a hash of something else: a sender
        // (or a member who learnt K) cannot reuse K for another body.
        let mut material = shared.key_material;
        material[KEY_LEN] ^= 1;
        let wrong_hash = seal::seal(&material, &alice, &bob_pk);
        assert_eq!(
            open(&shared.body, &wrong_hash, &bob, &alice_pk),
            Err(Unreadable::WrongBody)
        );
        // The content key alone, without the hash.
        let short = seal::seal(&shared.key_material[..KEY_LEN], &alice, &bob_pk);
        assert_eq!(
            open(&shared.body, &short, &bob, &alice_pk),
            Err(Unreadable::NotAMessage)
        );
        // A body whose hash the key holds but which the content key does
        // not open: sealed with another K, hash recomputed.
        let other = SharedBody::seal(b"hello");
        let mut mixed = other.key_material;
        mixed[..KEY_LEN].copy_from_slice(&shared.key_material[..KEY_LEN]);
        let mixed = seal::seal(&mixed, &alice, &bob_pk);
        assert_eq!(
            open(&other.body, &mixed, &bob, &alice_pk),
            Err(Unreadable::DoesNotOpen)
        );
    }

    #[test]
    fn an_old_reader_finds_a_body_not_of_its_format() {
        let (alice, alice_pk) = pair();
        let (bob, bob_pk) = pair();
        let shared = SharedBody::seal(b"hello");
        // What a reader of `0x01` bodies only does with a shared copy,
        // with or without looking at its key: not its version, unread.
        assert_eq!(
            seal::open(&shared.body, &bob, &alice_pk),
            Err(Unreadable::Version(SHARED_VERSION))
        );
        // And a `0x01` body is not a shared body.
        let single = seal::seal(b"hello", &alice, &bob_pk);
        assert_eq!(single[0], VERSION);
        let key = shared.key_for(&alice, &bob_pk);
        assert_eq!(
            open(&single, &key, &bob, &alice_pk),
            Err(Unreadable::Version(VERSION))
        );
        assert_eq!(
            open(&shared.body[..MIN_LEN - 1], &key, &bob, &alice_pk),
            Err(Unreadable::TooShort)
        );
    }

    #[test]
    fn seals_what_crypto_secretbox_easy_writes() {
        // libsodium's secretbox test (test/default/secretbox.c): the same
        // key-and-nonce layout and vector as NaCl's; the first bytes of
        // the `crypto_secretbox_easy` output (tag first).
        let key = Key::from([
            0x1b, 0x27, 0x55, 0x64, 0x73, 0xe9, 0x85, 0xd4, 0x62, 0xcd, 0x51, 0x19, 0x7a, 0x9a,
            0x46, 0xc7, 0x60, 0x09, 0x54, 0x9e, 0xac, 0x64, 0x74, 0xf2, 0x06, 0xc4, 0xee, 0x08,
            0x44, 0xf6, 0x83, 0x89,
        ]);
        let nonce = Nonce::from([
            0x69, 0x69, 0x6e, 0xe9, 0x55, 0xb6, 0x2b, 0x73, 0xcd, 0x62, 0xbd, 0xa8, 0x75, 0xfc,
            0x73, 0xd6, 0x82, 0x19, 0xe0, 0x03, 0x6b, 0x7a, 0x0b, 0x37,
        ]);
        let message = [
            0xbe, 0x07, 0x5f, 0xc5, 0x3c, 0x81, 0xf2, 0xd5, 0xcf, 0x14, 0x13, 0x16, 0xeb, 0xeb,
            0x0c, 0x7b, 0x52, 0x28, 0xc5, 0x2a, 0x4c, 0x62, 0xcb, 0xd4, 0x4b, 0x66, 0x84, 0x9b,
            0x64, 0x24, 0x4f, 0xfc, 0xe5, 0xec, 0xba, 0xaf, 0x33, 0xbd, 0x75, 0x1a, 0x1a, 0xc7,
            0x28, 0xd4, 0x5e, 0x6c, 0x61, 0x29, 0x6c, 0xdc, 0x3c, 0x01, 0x23, 0x35, 0x61, 0xf4,
            0x1d, 0xb6, 0x6c, 0xce, 0x31, 0x4a, 0xdb, 0x31, 0x0e, 0x3b, 0xe8, 0x25, 0x0c, 0x46,
            0xf0, 0x6d, 0xce, 0xea, 0x3a, 0x7f, 0xa1, 0x34, 0x80, 0x57, 0xe2, 0xf6, 0x55, 0x6a,
            0xd6, 0xb1, 0x31, 0x8a, 0x02, 0x4a, 0x83, 0x8f, 0x21, 0xaf, 0x1f, 0xde, 0x04, 0x89,
            0x77, 0xeb, 0x48, 0xf5, 0x9f, 0xfd, 0x49, 0x24, 0xca, 0x1c, 0x60, 0x90, 0x2e, 0x52,
            0xf0, 0xa0, 0x89, 0xbc, 0x76, 0x89, 0x70, 0x40, 0xe0, 0x82, 0xf9, 0x37, 0x76, 0x38,
            0x48, 0x64, 0x5e, 0x07, 0x05,
        ];
        let shared = SharedBody::seal_with(&message, &key, &nonce);
        assert_eq!(shared.body[1..25], nonce[..]);
        // The tag and the first ciphertext bytes of libsodium's `c`.
        assert_eq!(
            &shared.body[25..41],
            &[
                0xf3, 0xff, 0xc7, 0x70, 0x3f, 0x94, 0x00, 0xe5, 0x2a, 0x7d, 0xfb, 0x4b, 0x3d, 0x33,
                0x05, 0xd9
            ]
        );
        assert_eq!(&shared.body[41..45], &[0x8e, 0x99, 0x3b, 0x9f]);
        assert_eq!(shared.key_material[..KEY_LEN], key[..]);
        assert_eq!(
            shared.key_material[KEY_LEN..],
            Sha256::digest(&shared.body)[..]
        );
    }
}
