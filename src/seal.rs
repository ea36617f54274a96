//! Sealed storage: the storage keys, and the sealing of a queued message's
//! sender and body so that a dump of the database alone reveals neither.
//!
//! A row's `sealed` column is `nonce (24) || ciphertext || tag (16)`: the
//! XChaCha20-Poly1305 encryption of `sender id (16) || sender device (4,
//! big-endian) || body` under the key its `key_id` column names. The
//! associated data is [`AD_LABEL`], the message id, the recipient id and the
//! recipient device, so a blob copied onto another row, recipient or device
//! fails to open; `sent_at` is derived from the id and bound with it.
//!
//! A row that needs more than that ([`AD_LABEL_V3`], written only for
//! them): a copy of a multi-recipient send's shared body, or one whose
//! send asked for no receipts, seals `sender id (16) || sender device (4)
//! || flags (1) || rest`, where flag [`FLAG_NO_RECEIPTS`] turns receipts
//! off and [`FLAG_SHARED`] says `rest` is the copy's key material and its
//! body is the message's shared body; otherwise `rest` is the body. Every
//! other row keeps the v2 format, so a release before v3 still reads them.
//!
//! A shared body (`shared_bodies.sealed`) is `nonce (24) || ciphertext ||
//! tag (16)` of the body, under the key its `key_id` names, with
//! [`AD_SHARED_BODY`] and the message id as associated data.
//!
//! Rows sealed before devices existed ([`AD_LABEL_V1`]: `sender || body`,
//! without either device) were all moved to device 1 and still open there,
//! with sender device 1; the label keeps the two formats apart, so a row of
//! one never opens as the other. Nonces are drawn from the OS RNG: 192 random bits cannot collide in
//! any number of rows one key will ever seal, so no counter has to survive
//! restarts or be shared between nodes.
//!
//! The [`KeyRing`] (`SEALPOST_STORAGE_KEYS`, `id:base64,...`) seals with its
//! first key and opens with any of them, which is how a key is rotated: put
//! the new key first, keep the old one after it until the sweeper has sealed
//! every old row again, then drop it.
//!
//! **Tags.** Each storage key also gives a tag key (HMAC-SHA256 of the
//! storage key over [`TAG_KEY_LABEL`]: a subkey no ciphertext is made with),
//! for what the store must find or count without holding it in the clear:
//! - [`KeyRing::sender_tag`]: a queued row's `sender_tag`, the keyed hash of
//!   its (sender, recipient) pair, so that a sender's share of a device's
//!   queue is counted from the store ([`crate::limits::queue`]) without the
//!   sender in the clear. It groups the rows one sender queued for one
//!   account, nothing across accounts.
//! - [`KeyRing::send_key_hashes`], [`KeyRing::account_tags`] and
//!   [`KeyRing::seal_key`]: a `send_keys` row is found by the keyed hash of
//!   (sender, device, `client_id`) and deleted with its account by the keyed
//!   hash of the sender; its answer (message id, digest) is sealed.
//!
//! A tag is made with the current key and looked up under every key of the
//! ring, so a rotation finds the rows tagged before it.
//!
//! Sealing happens off the delivery lock: the committer seals each batch just
//! before writing it, [`crate::delivery::Delivery::fetch`] opens what it
//! reads, and the sweeper re-seals legacy and old-key rows. The [`Message`]
//! the rest of the code handles stays plaintext in memory.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Key, KeyInit, Tag, XChaCha20Poly1305, XNonce};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::Sha256;
use uuid::Uuid;

use crate::keyfile::{self, Kind};
use crate::store::{
    DeviceId, KeyId, Message, SealedBody, SealedKey, SealedRow, SenderTag, SentKey, StoredRow,
};

/// Names the format and its version in every row's associated data, so a
/// later format can never be confused with this one.
const AD_LABEL: &[u8] = b"sealpost/queue/v2";
/// The format before devices: no device in the associated data nor in the
/// plaintext. Opened, never written.
const AD_LABEL_V1: &[u8] = b"sealpost/queue/v1";
/// The format with flags, for shared-body copies and receipt-less sends.
/// The same length as [`AD_LABEL`], so one associated-data layout serves
/// both.
const AD_LABEL_V3: &[u8] = b"sealpost/queue/v3";
/// A v3 row's flag: its ack sends no receipt.
const FLAG_NO_RECEIPTS: u8 = 1;
/// A v3 row's flag: what follows the flags is key material, and the body
/// is the message's shared body.
const FLAG_SHARED: u8 = 2;
const FLAGS_BYTES: usize = 1;
/// The associated data label of a shared body, followed by its message id.
const AD_SHARED_BODY: &[u8] = b"sealpost/shared-body/v1";
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;
const SENDER_BYTES: usize = 16;
const DEVICE_BYTES: usize = 4;
const KEY_BYTES: usize = 32;
/// The tag key is HMAC-SHA256(storage key, this label): a subkey of its
/// own, so no tag and no ciphertext share a key.
const TAG_KEY_LABEL: &[u8] = b"sealpost/tag-key/v1";
/// The associated data label of a sealed send-key answer.
const AD_SEND_KEY: &[u8] = b"sealpost/send-key/v1";
/// The associated data label of a sealed push target, followed by its
/// account and device: a target copied onto another device's row does not
/// open there.
const AD_PUSH_TARGET: &[u8] = b"sealpost/push-target/v1";
/// A sealed blob names the key that sealed it in its first two bytes
/// (big-endian), as a queued row does in its `key_id` column.
const KEY_ID_BYTES: usize = 2;
/// What sealing adds to a body: nonce, sender, sender device, tag. A copy
/// takes `body + SEAL_OVERHEAD` bytes in the store.
pub const SEAL_OVERHEAD: usize = NONCE_BYTES + SENDER_BYTES + DEVICE_BYTES + TAG_BYTES;

/// The stored size of a copy's row: `rest` (its body, or a shared copy's
/// key material) sealed in the v3 format (`flags`) or the v2 one.
pub fn row_bytes(rest: usize, flags: bool) -> u64 {
    (rest + SEAL_OVERHEAD + if flags { FLAGS_BYTES } else { 0 }) as u64
}

/// The stored size of `message`'s row, as [`KeyRing::seal`] writes it.
pub fn stored_bytes(message: &Message) -> u64 {
    row_bytes(
        message.key.as_ref().map_or(message.body.len(), Bytes::len),
        message.shared() || !message.receipts,
    )
}

type HmacSha256 = Hmac<Sha256>;

/// Why a row could not be sealed or opened. The row itself is never touched.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "message {id} is sealed with storage key {key_id}, which SEALPOST_STORAGE_KEYS does not hold"
    )]
    UnknownKey { id: Uuid, key_id: KeyId },
    #[error(
        "message {id} does not open under storage key {key_id}: altered, moved to another row, \
         or a different key configured under that id"
    )]
    Forged { id: Uuid, key_id: KeyId },
    #[error(
        "a sealed {what} does not open under storage key {key_id}: altered, moved to another \
         row, or its key not (or no longer) in SEALPOST_STORAGE_KEYS"
    )]
    Blob { what: &'static str, key_id: KeyId },
    #[error("the OS random number generator failed: {0}")]
    Rng(String),
}

/// The storage keys: the first seals, all open.
#[derive(Clone)]
pub struct KeyRing {
    /// Never empty; ids are distinct.
    keys: Vec<(KeyId, XChaCha20Poly1305)>,
    /// Each key's tag key, keyed and ready, in the order of `keys`.
    tags: Vec<HmacSha256>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .field("keys", &"***")
            .finish()
    }
}

impl KeyRing {
    /// Parses `id:base64-of-32-bytes[,id:base64...]`. Errors never quote a
    /// key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<(KeyId, XChaCha20Poly1305)> = Vec::new();
        let mut tags = Vec::new();
        for (n, entry) in text.split(',').enumerate() {
            let n = n + 1;
            let (id, key) = entry
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("entry {n} is not `id:base64-key`"))?;
            let id: KeyId =
                id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                    format!("entry {n}: the key id must be an integer 1 to 32767")
                })?;
            let bytes = STANDARD
                .decode(key.trim())
                .map_err(|_| format!("key {id} is not standard base64"))?;
            let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|bytes: Vec<u8>| {
                format!(
                    "key {id} must be {KEY_BYTES} bytes (e.g. `openssl rand -base64 32`), got {}",
                    bytes.len()
                )
            })?;
            if keys.iter().any(|(known, _)| *known == id) {
                return Err(format!("key id {id} appears twice"));
            }
            keys.push((id, XChaCha20Poly1305::new(&Key::from(bytes))));
            tags.push(tag_key(&bytes));
        }
        Ok(Self { keys, tags })
    }

    /// A fresh ring holding one random key with id 1.
    pub fn generate() -> Result<Self, SealError> {
        Ok(Self::parse(&generate_text()?).expect("a generated key list parses"))
    }

    /// The id of the key that seals.
    pub fn current(&self) -> KeyId {
        self.keys[0].0
    }

    pub fn ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|(id, _)| *id)
    }

    fn key(&self, id: KeyId) -> Option<&XChaCha20Poly1305> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, key)| key)
    }

    /// Seals a batch with the current key, drawing every nonce from one read
    /// of the OS RNG: each copy's row, and the shared body of every
    /// multi-recipient send among them once (its copies are contiguous, as
    /// the delivery core makes them).
    pub fn seal_all(
        &self,
        messages: &[Arc<Message>],
    ) -> Result<(Vec<SealedBody>, Vec<SealedRow>), SealError> {
        let mut shared: Vec<&Message> = Vec::new();
        for message in messages.iter().filter(|m| m.shared()) {
            if shared.last().is_none_or(|last| last.id != message.id) {
                shared.push(message);
            }
        }
        let mut nonces = vec![0u8; NONCE_BYTES * (messages.len() + shared.len())];
        fill_random(&mut nonces)?;
        let mut nonces = nonces
            .chunks_exact(NONCE_BYTES)
            .map(|nonce| nonce.try_into().expect("NONCE_BYTES"));
        let bodies = shared
            .into_iter()
            .zip(nonces.by_ref())
            .map(|(message, nonce)| self.seal_body_with(message, nonce))
            .collect();
        let rows = messages
            .iter()
            .zip(nonces)
            .map(|(message, nonce)| self.seal_with(message, nonce))
            .collect();
        Ok((bodies, rows))
    }

    /// Seals one message with the current key (its row only: a shared
    /// body is sealed by [`Self::seal_body`]).
    pub fn seal(&self, message: &Message) -> Result<SealedRow, SealError> {
        let mut nonce = [0u8; NONCE_BYTES];
        fill_random(&mut nonce)?;
        Ok(self.seal_with(message, &nonce))
    }

    fn seal_with(&self, message: &Message, nonce: &[u8; NONCE_BYTES]) -> SealedRow {
        let (key_id, key) = &self.keys[0];
        let v3 = message.shared() || !message.receipts;
        let rest: &[u8] = message.key.as_deref().unwrap_or(&message.body);
        let mut sealed = Vec::with_capacity(
            NONCE_BYTES + SENDER_BYTES + DEVICE_BYTES + FLAGS_BYTES + rest.len() + TAG_BYTES,
        );
        sealed.extend_from_slice(nonce);
        sealed.extend_from_slice(message.sender.as_bytes());
        sealed.extend_from_slice(&message.sender_device.to_be_bytes());
        let label = if v3 {
            let mut flags = 0;
            if message.shared() {
                flags |= FLAG_SHARED;
            }
            if !message.receipts {
                flags |= FLAG_NO_RECEIPTS;
            }
            sealed.push(flags);
            AD_LABEL_V3
        } else {
            AD_LABEL
        };
        sealed.extend_from_slice(rest);
        let tag = key
            .encrypt_in_place_detached(
                &XNonce::from(*nonce),
                &associated_data(label, message.id, message.recipient, message.device),
                &mut sealed[NONCE_BYTES..],
            )
            // Only a plaintext beyond 256 GiB fails; bodies are at most 1 MiB.
            .expect("a message body fits XChaCha20-Poly1305");
        sealed.extend_from_slice(&tag);
        SealedRow {
            id: message.id,
            recipient: message.recipient,
            device: message.device,
            sent_at: message.sent_at,
            key_id: *key_id,
            sealed,
            sender_tag: Some(self.sender_tag(message.sender, message.recipient)),
        }
    }

    /// Seals a shared body (of `message`, any copy of it) with the current
    /// key.
    pub fn seal_body(&self, message: &Message) -> Result<SealedBody, SealError> {
        let mut nonce = [0u8; NONCE_BYTES];
        fill_random(&mut nonce)?;
        Ok(self.seal_body_with(message, &nonce))
    }

    fn seal_body_with(&self, message: &Message, nonce: &[u8; NONCE_BYTES]) -> SealedBody {
        let (key_id, key) = &self.keys[0];
        let mut sealed = Vec::with_capacity(NONCE_BYTES + message.body.len() + TAG_BYTES);
        sealed.extend_from_slice(nonce);
        sealed.extend_from_slice(&message.body);
        let tag = key
            .encrypt_in_place_detached(
                &XNonce::from(*nonce),
                &[AD_SHARED_BODY, message.id.as_bytes()].concat(),
                &mut sealed[NONCE_BYTES..],
            )
            .expect("a message body fits XChaCha20-Poly1305");
        sealed.extend_from_slice(&tag);
        SealedBody {
            id: message.id,
            sent_at: message.sent_at,
            key_id: *key_id,
            sealed,
        }
    }

    /// Opens a shared body as read back.
    pub fn open_body(&self, body: SealedBody) -> Result<Bytes, SealError> {
        let SealedBody {
            id,
            key_id,
            mut sealed,
            ..
        } = body;
        let key = self
            .key(key_id)
            .ok_or(SealError::UnknownKey { id, key_id })?;
        let forged = SealError::Forged { id, key_id };
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(forged);
        }
        let tag: [u8; TAG_BYTES] = sealed[sealed.len() - TAG_BYTES..]
            .try_into()
            .expect("TAG_BYTES");
        let nonce: [u8; NONCE_BYTES] = sealed[..NONCE_BYTES].try_into().expect("NONCE_BYTES");
        sealed.truncate(sealed.len() - TAG_BYTES);
        key.decrypt_in_place_detached(
            &XNonce::from(nonce),
            &[AD_SHARED_BODY, id.as_bytes()].concat(),
            &mut sealed[NONCE_BYTES..],
            &Tag::from(tag),
        )
        .map_err(|_| forged)?;
        sealed.drain(..NONCE_BYTES);
        Ok(sealed.into())
    }

    /// Seals a shared body again under the current key.
    pub fn reseal_body(&self, body: SealedBody) -> Result<SealedBody, SealError> {
        let (id, sent_at) = (body.id, body.sent_at);
        let opened = self.open_body(body)?;
        let message = Message {
            id,
            recipient: Uuid::nil(),
            device: 0,
            sender: Uuid::nil(),
            sender_device: 0,
            body: opened,
            key: None,
            receipts: true,
            sent_at,
        };
        self.seal_body(&message)
    }

    /// Opens a row as read back; a legacy plaintext row is already open.
    pub fn open(&self, row: StoredRow) -> Result<Message, SealError> {
        let row = match row {
            StoredRow::Legacy(message) => return Ok(message),
            StoredRow::Sealed(row) => row,
        };
        let SealedRow {
            id,
            recipient,
            device,
            sent_at,
            key_id,
            mut sealed,
            ..
        } = row;
        let key = self
            .key(key_id)
            .ok_or(SealError::UnknownKey { id, key_id })?;
        let forged = SealError::Forged { id, key_id };
        if sealed.len() < NONCE_BYTES + SENDER_BYTES + TAG_BYTES {
            return Err(forged);
        }
        // Opened in place: the body ends up in the row's own buffer.
        let tag: [u8; TAG_BYTES] = sealed[sealed.len() - TAG_BYTES..]
            .try_into()
            .expect("TAG_BYTES");
        let nonce: [u8; NONCE_BYTES] = sealed[..NONCE_BYTES].try_into().expect("NONCE_BYTES");
        sealed.truncate(sealed.len() - TAG_BYTES);
        let (nonce, tag) = (XNonce::from(nonce), Tag::from(tag));
        // A failed decryption leaves the buffer as it was, so the other
        // formats can be tried on the same bytes: v2 first (most rows),
        // then v3, then v1 (only device 1 holds rows of that format).
        let try_open = |ad: &[u8], sealed: &mut Vec<u8>| {
            key.decrypt_in_place_detached(&nonce, ad, &mut sealed[NONCE_BYTES..], &tag)
                .is_ok()
        };
        let at = NONCE_BYTES + SENDER_BYTES;
        let take_device = |sealed: &mut Vec<u8>| {
            let device_bytes: [u8; DEVICE_BYTES] =
                sealed[at..at + DEVICE_BYTES].try_into().expect("4 bytes");
            sealed.drain(at..at + DEVICE_BYTES);
            u32::from_be_bytes(device_bytes)
        };
        let long_enough =
            |sealed: &Vec<u8>, extra: usize| sealed.len() >= at + DEVICE_BYTES + extra;
        let (sender_device, flags) = if try_open(
            &associated_data(AD_LABEL, id, recipient, device),
            &mut sealed,
        ) && long_enough(&sealed, 0)
        {
            (take_device(&mut sealed), 0)
        } else if try_open(
            &associated_data(AD_LABEL_V3, id, recipient, device),
            &mut sealed,
        ) && long_enough(&sealed, FLAGS_BYTES)
        {
            let sender_device = take_device(&mut sealed);
            let flags = sealed.remove(at);
            (sender_device, flags)
        } else if device == 1 && try_open(&associated_data_v1(id, recipient), &mut sealed) {
            (1, 0)
        } else {
            return Err(forged);
        };
        let sender =
            Uuid::from_slice(&sealed[NONCE_BYTES..NONCE_BYTES + SENDER_BYTES]).expect("16 bytes");
        sealed.drain(..NONCE_BYTES + SENDER_BYTES);
        let (body, key) = if flags & FLAG_SHARED != 0 {
            // The body is the shared one, which the reader fills in.
            (Bytes::new(), Some(Bytes::from(sealed)))
        } else {
            (Bytes::from(sealed), None)
        };
        Ok(Message {
            id,
            recipient,
            device,
            sender,
            sender_device,
            body,
            key,
            receipts: flags & FLAG_NO_RECEIPTS == 0,
            sent_at,
        })
    }

    /// Opens every row, or reports the first that does not open.
    pub fn open_all(&self, rows: Vec<StoredRow>) -> Result<Vec<Message>, SealError> {
        rows.into_iter().map(|row| self.open(row)).collect()
    }

    /// Seals a legacy or old-key row again under the current key (and tags
    /// it under the current key).
    pub fn reseal(&self, row: StoredRow) -> Result<SealedRow, SealError> {
        self.seal(&self.open(row)?)
    }

    /// The tag of the rows `sender` queues for `recipient`, under the
    /// current key: 128 bits of HMAC-SHA256, plenty to tell apart the
    /// senders of one account's queue.
    pub fn sender_tag(&self, sender: Uuid, recipient: Uuid) -> SenderTag {
        let mut mac = self.tags[0].clone();
        mac.update(b"sender-tag");
        mac.update(sender.as_bytes());
        mac.update(recipient.as_bytes());
        let full = mac.finalize().into_bytes();
        full[..16].try_into().expect("16 of 32 bytes")
    }

    /// The keyed hash a send key is stored under, under each key of the
    /// ring (the current one first): a write uses the first, a lookup all.
    pub fn send_key_hashes(&self, sender: Uuid, device: DeviceId, client_id: &str) -> Vec<Vec<u8>> {
        self.tags
            .iter()
            .map(|tag| {
                let mut mac = tag.clone();
                mac.update(b"send-key");
                mac.update(sender.as_bytes());
                mac.update(&device.to_be_bytes());
                // Last and of bounded length: no two keys share an encoding.
                mac.update(client_id.as_bytes());
                mac.finalize().into_bytes().to_vec()
            })
            .collect()
    }

    /// The keyed hash of an account that its send keys carry, so that
    /// deleting the account deletes them, under each key of the ring.
    pub fn account_tags(&self, user: Uuid) -> Vec<Vec<u8>> {
        self.tags
            .iter()
            .map(|tag| {
                let mut mac = tag.clone();
                mac.update(b"send-key-account");
                mac.update(user.as_bytes());
                mac.finalize().into_bytes().to_vec()
            })
            .collect()
    }

    /// A send key as the store keeps it: found by its keyed hash, deleted
    /// with its account by the account's, its answer (message id and
    /// digest) sealed and bound to that hash, kept until `expires_at`.
    pub fn seal_key(
        &self,
        record: &SentKey,
        expires_at: DateTime<Utc>,
    ) -> Result<SealedKey, SealError> {
        let key = &record.key;
        let hash = self
            .send_key_hashes(key.sender, key.device, &key.client_id)
            .swap_remove(0);
        let account = self.account_tags(key.sender).swap_remove(0);
        let mut nonce = [0u8; NONCE_BYTES];
        fill_random(&mut nonce)?;
        let (key_id, cipher) = &self.keys[0];
        let mut answer = Vec::with_capacity(NONCE_BYTES + 16 + record.digest.len() + TAG_BYTES);
        answer.extend_from_slice(&nonce);
        answer.extend_from_slice(record.message.as_bytes());
        answer.extend_from_slice(&record.digest);
        let tag = cipher
            .encrypt_in_place_detached(
                &XNonce::from(nonce),
                &[AD_SEND_KEY, &hash].concat(),
                &mut answer[NONCE_BYTES..],
            )
            .expect("a short answer fits XChaCha20-Poly1305");
        answer.extend_from_slice(&tag);
        Ok(SealedKey {
            hash,
            account,
            key_id: *key_id,
            answer,
            expires_at,
        })
    }

    /// Seals a push target (its JSON) for `user`'s `device` with the current
    /// key: `key id (2) || nonce (24) || ciphertext || tag (16)`, bound to
    /// the device by the associated data.
    pub fn seal_target(
        &self,
        user: Uuid,
        device: DeviceId,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        self.seal_blob(&target_ad(user, device), plaintext)
    }

    /// Opens what [`KeyRing::seal_target`] sealed for this device, under
    /// whichever key of the ring sealed it.
    pub fn open_target(
        &self,
        user: Uuid,
        device: DeviceId,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        self.open_blob("push target", &target_ad(user, device), sealed)
    }

    /// A target [`KeyRing::seal_target`] sealed under any key of the ring,
    /// sealed again under the current one.
    pub fn reseal_target(
        &self,
        user: Uuid,
        device: DeviceId,
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let plaintext = self.open_target(user, device, sealed)?;
        self.seal_target(user, device, &plaintext)
    }

    fn seal_blob(&self, ad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let (key_id, cipher) = &self.keys[0];
        let mut nonce = [0u8; NONCE_BYTES];
        fill_random(&mut nonce)?;
        let mut sealed =
            Vec::with_capacity(KEY_ID_BYTES + NONCE_BYTES + plaintext.len() + TAG_BYTES);
        sealed.extend_from_slice(&key_id.to_be_bytes());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(plaintext);
        let tag = cipher
            .encrypt_in_place_detached(
                &XNonce::from(nonce),
                ad,
                &mut sealed[KEY_ID_BYTES + NONCE_BYTES..],
            )
            // Only a plaintext beyond 256 GiB fails.
            .expect("a small blob fits XChaCha20-Poly1305");
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }

    fn open_blob(
        &self,
        what: &'static str,
        ad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        if sealed.len() < KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES {
            return Err(SealError::Blob { what, key_id: 0 });
        }
        let key_id = KeyId::from_be_bytes(sealed[..KEY_ID_BYTES].try_into().expect("2 bytes"));
        let unreadable = SealError::Blob { what, key_id };
        let cipher = self.key(key_id).ok_or(SealError::Blob { what, key_id })?;
        let body = &sealed[KEY_ID_BYTES..];
        let nonce: [u8; NONCE_BYTES] = body[..NONCE_BYTES].try_into().expect("NONCE_BYTES");
        let tag: [u8; TAG_BYTES] = body[body.len() - TAG_BYTES..]
            .try_into()
            .expect("TAG_BYTES");
        let mut plaintext = body[NONCE_BYTES..body.len() - TAG_BYTES].to_vec();
        cipher
            .decrypt_in_place_detached(&XNonce::from(nonce), ad, &mut plaintext, &Tag::from(tag))
            .map_err(|_| unreadable)?;
        Ok(plaintext)
    }

    /// Opens a send key's answer: the message id and the digest.
    pub fn open_key(&self, sealed: SealedKey) -> Result<(Uuid, Vec<u8>), SealError> {
        let SealedKey {
            hash,
            key_id,
            mut answer,
            ..
        } = sealed;
        // Named by nothing else: the nil id stands for "a send key".
        let forged = SealError::Forged {
            id: Uuid::nil(),
            key_id,
        };
        let cipher = self.key(key_id).ok_or(SealError::UnknownKey {
            id: Uuid::nil(),
            key_id,
        })?;
        if answer.len() < NONCE_BYTES + 16 + TAG_BYTES {
            return Err(forged);
        }
        let tag: [u8; TAG_BYTES] = answer[answer.len() - TAG_BYTES..]
            .try_into()
            .expect("TAG_BYTES");
        let nonce: [u8; NONCE_BYTES] = answer[..NONCE_BYTES].try_into().expect("NONCE_BYTES");
        answer.truncate(answer.len() - TAG_BYTES);
        cipher
            .decrypt_in_place_detached(
                &XNonce::from(nonce),
                &[AD_SEND_KEY, &hash].concat(),
                &mut answer[NONCE_BYTES..],
                &Tag::from(tag),
            )
            .map_err(|_| forged)?;
        let message = Uuid::from_slice(&answer[NONCE_BYTES..NONCE_BYTES + 16]).expect("16 bytes");
        Ok((message, answer[NONCE_BYTES + 16..].to_vec()))
    }
}

/// The tag key of a storage key.
fn tag_key(storage_key: &[u8; KEY_BYTES]) -> HmacSha256 {
    let mut derive =
        <HmacSha256 as Mac>::new_from_slice(storage_key).expect("HMAC takes any key length");
    derive.update(TAG_KEY_LABEL);
    let subkey = derive.finalize().into_bytes();
    <HmacSha256 as Mac>::new_from_slice(&subkey).expect("HMAC takes any key length")
}

/// A row's associated data under `label` ([`AD_LABEL`] or [`AD_LABEL_V3`],
/// of one length).
fn associated_data(
    label: &[u8],
    id: Uuid,
    recipient: Uuid,
    device: DeviceId,
) -> [u8; AD_LABEL.len() + 32 + DEVICE_BYTES] {
    const _: () = assert!(AD_LABEL.len() == AD_LABEL_V3.len());
    let mut ad = [0u8; AD_LABEL.len() + 32 + DEVICE_BYTES];
    let at = AD_LABEL.len();
    ad[..at].copy_from_slice(label);
    ad[at..at + 16].copy_from_slice(id.as_bytes());
    ad[at + 16..at + 32].copy_from_slice(recipient.as_bytes());
    ad[at + 32..].copy_from_slice(&device.to_be_bytes());
    ad
}

/// The associated data of a push target: the label, the account and the
/// device.
fn target_ad(user: Uuid, device: DeviceId) -> Vec<u8> {
    [AD_PUSH_TARGET, user.as_bytes(), &device.to_be_bytes()].concat()
}

/// The associated data of the format before devices.
fn associated_data_v1(id: Uuid, recipient: Uuid) -> [u8; AD_LABEL_V1.len() + 32] {
    let mut ad = [0u8; AD_LABEL_V1.len() + 32];
    ad[..AD_LABEL_V1.len()].copy_from_slice(AD_LABEL_V1);
    ad[AD_LABEL_V1.len()..AD_LABEL_V1.len() + 16].copy_from_slice(id.as_bytes());
    ad[AD_LABEL_V1.len() + 16..].copy_from_slice(recipient.as_bytes());
    ad
}

fn fill_random(bytes: &mut [u8]) -> Result<(), SealError> {
    OsRng
        .try_fill_bytes(bytes)
        .map_err(|e| SealError::Rng(e.to_string()))
}

/// A new key list of one random key, id 1, in `SEALPOST_STORAGE_KEYS` form.
fn generate_text() -> Result<String, SealError> {
    let mut key = [0u8; KEY_BYTES];
    fill_random(&mut key)?;
    Ok(format!("1:{}", STANDARD.encode(key)))
}

const KIND: Kind = Kind {
    setting: "SEALPOST_STORAGE_KEYS",
    suffix: ".storage-key",
    hint: "`id:base64-of-32-bytes`, the same on every node; e.g. `1:$(openssl rand -base64 32)`",
    ephemeral: "queued messages do not outlive the process anyway",
};

/// The storage keys for `database_url`: configured, or (SQLite only) read
/// from or generated into `sealpost.db.storage-key`, as [`crate::keyfile`]
/// describes. Losing that file loses every queued message, so it is kept
/// and backed up with the database.
pub fn resolve(configured: Option<&KeyRing>, database_url: &str) -> anyhow::Result<KeyRing> {
    if let Some(keys) = configured {
        return Ok(keys.clone());
    }
    let mut failure = None;
    let generate = || {
        generate_text().unwrap_or_else(|e| {
            failure = Some(e);
            String::new()
        })
    };
    let keys = keyfile::resolve(&KIND, database_url, generate, KeyRing::parse);
    match failure {
        Some(err) => Err(err.into()),
        None => keys,
    }
}

/// Where the storage keys for `database_url` come from, found out without
/// creating anything (`sealpost check-config`); `Err` says why start-up
/// would fail. Names key ids, never keys.
pub fn check(configured: Option<&KeyRing>, database_url: &str) -> Result<String, String> {
    match configured {
        Some(keys) => Ok(format!(
            "key id(s) {:?}; key {} seals new messages",
            keys.ids().collect::<Vec<_>>(),
            keys.current()
        )),
        None => keyfile::check(&KIND, database_url, KeyRing::parse),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store;

    const OLD: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const NEW: &str = "2:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn ring(text: &str) -> KeyRing {
        KeyRing::parse(text).unwrap()
    }

    fn message(body: &[u8]) -> Message {
        let id = Uuid::now_v7();
        Message {
            id,
            recipient: Uuid::new_v4(),
            device: 2,
            sender: Uuid::new_v4(),
            sender_device: 3,
            body: (body.to_vec()).into(),
            key: None,
            receipts: true,
            sent_at: store::id_time(id),
        }
    }

    fn sealed(row: SealedRow) -> StoredRow {
        StoredRow::Sealed(row)
    }

    #[test]
    fn shared_copies_and_receipt_less_rows_round_trip_in_v3() {
        let keys = ring(OLD);
        let mut first = message(b"the shared body");
        first.key = Some(Bytes::from_static(b"key for device 2"));
        first.receipts = false;
        let mut second = first.clone();
        second.device = 5;
        second.key = Some(Bytes::from_static(b"key for device 5"));
        let plain = message(b"a plain body");
        let mut quiet = message(b"no receipts");
        quiet.receipts = false;
        let batch: Vec<Arc<Message>> =
            [first.clone(), second.clone(), plain.clone(), quiet.clone()]
                .into_iter()
                .map(Arc::new)
                .collect();
        let (bodies, rows) = keys.seal_all(&batch).unwrap();
        // The shared body once for its two copies; its rows hold the keys.
        assert_eq!(bodies.len(), 1);
        assert_eq!(keys.open_body(bodies[0].clone()).unwrap(), first.body);
        for (row, original) in rows.iter().zip(&batch) {
            assert_eq!(row.sealed.len() as u64, stored_bytes(original));
        }
        let opened: Vec<Message> = rows
            .into_iter()
            .map(|row| keys.open(sealed(row)).unwrap())
            .collect();
        // A shared copy opens to its key, without the body (read apart).
        assert_eq!(opened[0].key, first.key);
        assert!(opened[0].body.is_empty() && !opened[0].receipts);
        assert_eq!(opened[1].key, second.key);
        assert_eq!(opened[2], plain);
        assert_eq!(opened[3], quiet);
        // A body bound to another message id does not open.
        let mut moved = bodies[0].clone();
        moved.id = Uuid::now_v7();
        assert!(matches!(
            keys.open_body(moved),
            Err(SealError::Forged { .. })
        ));
    }

    #[test]
    fn round_trip() {
        let keys = ring(OLD);
        let original = message(b"attack at dawn");
        let row = keys.seal(&original).unwrap();
        assert_eq!(row.key_id, 1);
        assert_eq!(
            row.sealed.len(),
            NONCE_BYTES + SENDER_BYTES + DEVICE_BYTES + original.body.len() + TAG_BYTES
        );
        assert_eq!(keys.open(sealed(row)).unwrap(), original);
    }

    #[test]
    fn a_target_opens_on_its_own_device_only_and_across_a_rotation() {
        let old = ring(OLD);
        let user = Uuid::new_v4();
        let plaintext = br#"{"kind":"fcm","token":"abc"}"#;
        let sealed = old.seal_target(user, 2, plaintext).unwrap();
        assert!(
            !sealed.windows(3).any(|w| w == b"abc"),
            "the token is not in the clear"
        );
        assert_eq!(old.open_target(user, 2, &sealed).unwrap(), plaintext);
        // Moved to another device or account: refused.
        assert!(old.open_target(user, 3, &sealed).is_err());
        assert!(old.open_target(Uuid::new_v4(), 2, &sealed).is_err());
        // Altered anywhere, or cut short: refused.
        for at in [0, 2, 30, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert!(old.open_target(user, 2, &bad).is_err(), "byte {at}");
        }
        assert!(old.open_target(user, 2, &sealed[..20]).is_err());
        // After a rotation the old key still opens it; without it, nothing.
        let rotated = ring(&format!("{NEW},{OLD}"));
        assert_eq!(rotated.open_target(user, 2, &sealed).unwrap(), plaintext);
        let resealed = rotated.seal_target(user, 2, plaintext).unwrap();
        assert_eq!(&resealed[..2], &2u16.to_be_bytes());
        let err = ring(NEW).open_target(user, 2, &sealed).unwrap_err();
        assert!(matches!(err, SealError::Blob { key_id: 1, .. }), "{err}");
    }

    #[test]
    fn a_batch_gets_distinct_nonces() {
        let keys = ring(OLD);
        let batch: Vec<_> = (0..3).map(|_| Arc::new(message(b"same"))).collect();
        let (bodies, rows) = keys.seal_all(&batch).unwrap();
        assert!(bodies.is_empty());
        let nonces: std::collections::HashSet<_> = rows
            .iter()
            .map(|r| r.sealed[..NONCE_BYTES].to_vec())
            .collect();
        assert_eq!(nonces.len(), 3);
        for (row, original) in rows.into_iter().zip(&batch) {
            assert_eq!(&keys.open(sealed(row)).unwrap(), original.as_ref());
        }
    }

    #[test]
    fn a_tampered_blob_does_not_open() {
        let keys = ring(OLD);
        let row = keys.seal(&message(b"attack at dawn")).unwrap();
        for at in [
            0,
            NONCE_BYTES,
            NONCE_BYTES + SENDER_BYTES,
            row.sealed.len() - 1,
        ] {
            let mut bad = row.clone();
            bad.sealed[at] ^= 1;
            assert!(matches!(
                keys.open(sealed(bad)),
                Err(SealError::Forged { key_id: 1, .. })
            ));
        }
        let mut short = row.clone();
        short.sealed.truncate(NONCE_BYTES + TAG_BYTES);
        assert!(matches!(
            keys.open(sealed(short)),
            Err(SealError::Forged { .. })
        ));
    }

    #[test]
    fn a_blob_moved_to_another_row_or_recipient_does_not_open() {
        let keys = ring(OLD);
        let row = keys.seal(&message(b"attack at dawn")).unwrap();
        let other_recipient = SealedRow {
            recipient: Uuid::new_v4(),
            ..row.clone()
        };
        assert!(matches!(
            keys.open(sealed(other_recipient)),
            Err(SealError::Forged { .. })
        ));
        let other_device = SealedRow {
            device: 1,
            ..row.clone()
        };
        assert!(matches!(
            keys.open(sealed(other_device)),
            Err(SealError::Forged { .. })
        ));
        let other_id = SealedRow {
            id: Uuid::now_v7(),
            ..row
        };
        assert!(matches!(
            keys.open(sealed(other_id)),
            Err(SealError::Forged { .. })
        ));
    }

    #[test]
    fn an_unknown_key_id_is_reported_and_a_wrong_key_does_not_open() {
        let row = ring(OLD).seal(&message(b"x")).unwrap();
        let id = row.id;
        match ring(NEW).open(sealed(row.clone())) {
            Err(SealError::UnknownKey { id: at, key_id: 1 }) => assert_eq!(at, id),
            other => panic!("{other:?}"),
        }
        // Another key configured under the same id.
        let impostor = ring("1:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=");
        assert!(matches!(
            impostor.open(sealed(row)),
            Err(SealError::Forged { .. })
        ));
    }

    /// A row sealed before devices (`sender || body` under the v1 label),
    /// as the migration left it on device 1.
    fn sealed_v1(keys: &KeyRing, message: &Message) -> SealedRow {
        let (key_id, key) = &keys.keys[0];
        let nonce = [7u8; NONCE_BYTES];
        let mut text = message.sender.as_bytes().to_vec();
        text.extend_from_slice(&message.body);
        let tag = key
            .encrypt_in_place_detached(
                &XNonce::from(nonce),
                &associated_data_v1(message.id, message.recipient),
                &mut text,
            )
            .unwrap();
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&text);
        sealed.extend_from_slice(&tag);
        SealedRow {
            id: message.id,
            recipient: message.recipient,
            device: 1,
            sent_at: message.sent_at,
            key_id: *key_id,
            sealed,
            sender_tag: None,
        }
    }

    #[test]
    fn rows_sealed_before_devices_open_on_device_1_only() {
        let keys = ring(OLD);
        let original = message(b"queued before the upgrade");
        let row = sealed_v1(&keys, &original);
        let opened = keys.open(sealed(row.clone())).unwrap();
        assert_eq!(
            (opened.device, opened.sender_device, opened.sender),
            (1, 1, original.sender)
        );
        assert_eq!(opened.body, original.body);
        let elsewhere = SealedRow { device: 2, ..row };
        assert!(matches!(
            keys.open(sealed(elsewhere)),
            Err(SealError::Forged { .. })
        ));
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_all() {
        let old = ring(OLD);
        let rotated = ring(&format!("{NEW},{OLD}"));
        assert_eq!(rotated.current(), 2);
        let original = message(b"kept");
        let old_row = old.seal(&original).unwrap();
        assert_eq!(rotated.open(sealed(old_row.clone())).unwrap(), original);
        let resealed = rotated.reseal(sealed(old_row)).unwrap();
        assert_eq!(resealed.key_id, 2);
        assert_eq!(ring(NEW).open(sealed(resealed)).unwrap(), original);
    }

    #[test]
    fn a_legacy_row_opens_as_it_is() {
        let original = message(b"plain");
        let keys = ring(NEW);
        assert_eq!(
            keys.open(StoredRow::Legacy(original.clone())).unwrap(),
            original
        );
        assert_eq!(
            keys.reseal(StoredRow::Legacy(original.clone()))
                .unwrap()
                .key_id,
            2
        );
    }

    #[test]
    fn bad_key_lists_are_refused_without_quoting_a_key() {
        let secret = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        for bad in [
            "",
            secret,
            &format!("0:{secret}"),
            &format!("x:{secret}"),
            &format!("40000:{secret}"),
            "1:AAECAwQ=",
            "1:not base64!",
            &format!("1:{secret},1:{secret}"),
            &format!("1:{secret},"),
        ] {
            let err = KeyRing::parse(bad).unwrap_err();
            assert!(!err.contains("AAECAwQ"), "{bad:?} quoted: {err}");
        }
        let keys = ring(&format!(" 2:{secret} , 1:{secret} "));
        assert_eq!(keys.ids().collect::<Vec<_>>(), [2, 1]);
    }

    #[test]
    fn keys_do_not_print() {
        let printed = format!("{:?}", ring(&format!("{NEW},{OLD}")));
        assert!(
            !printed.contains("ICEi") && !printed.contains("AAEC"),
            "{printed}"
        );
        assert!(printed.contains("[2, 1]"), "{printed}");
    }

    #[test]
    fn a_generated_key_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("x.db").display());
        let original = message(b"survives a restart");
        let row = resolve(None, &url).unwrap().seal(&original).unwrap();
        let again = resolve(None, &url).unwrap();
        assert_eq!(again.open(sealed(row)).unwrap(), original);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("x.db.storage-key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn postgres_without_keys_is_refused() {
        let err = resolve(None, "postgres://localhost/x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SEALPOST_STORAGE_KEYS is not set"), "{err}");
    }

    fn sent_key(client_id: &str) -> SentKey {
        SentKey {
            key: crate::store::SendKey {
                sender: Uuid::new_v4(),
                device: 2,
                client_id: client_id.into(),
            },
            message: Uuid::now_v7(),
            digest: vec![9; 32],
        }
    }

    #[test]
    fn a_send_key_is_stored_as_keyed_hashes_and_a_sealed_answer() {
        let keys = ring(OLD);
        let record = sent_key("k1");
        let sealed = keys.seal_key(&record, chrono::Utc::now()).unwrap();
        let (sender, message) = (record.key.sender, record.message);
        for column in [&sealed.hash, &sealed.account, &sealed.answer] {
            for id in [sender.as_bytes(), message.as_bytes()] {
                assert!(!column.windows(16).any(|w| w == id), "in the clear");
            }
        }
        assert_eq!(sealed.account, keys.account_tags(sender)[0]);
        assert_eq!(
            keys.open_key(sealed.clone()).unwrap(),
            (message, record.digest.clone())
        );
        // The answer is bound to its hash: moved to another key, it fails.
        let moved = SealedKey {
            hash: keys.send_key_hashes(sender, 2, "k2").swap_remove(0),
            ..sealed
        };
        assert!(keys.open_key(moved).is_err());
    }

    #[test]
    fn tags_and_hashes_are_keyed_and_found_across_a_rotation() {
        let (old, rotated) = (ring(OLD), ring(&format!("{NEW},{OLD}")));
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        // Another key, other tags; the same key, the same tags.
        assert_ne!(old.sender_tag(alice, bob), ring(NEW).sender_tag(alice, bob));
        assert_eq!(old.sender_tag(alice, bob), ring(OLD).sender_tag(alice, bob));
        assert_ne!(old.sender_tag(alice, bob), old.sender_tag(bob, alice));
        // A key written before the rotation is found (under the old key,
        // second in the ring) and opened after it.
        let record = sent_key("k");
        let sealed = old.seal_key(&record, chrono::Utc::now()).unwrap();
        let hashes = rotated.send_key_hashes(record.key.sender, 2, "k");
        assert_eq!(hashes.len(), 2);
        assert_ne!(hashes[0], sealed.hash);
        assert_eq!(hashes[1], sealed.hash);
        assert_eq!(rotated.open_key(sealed).unwrap().0, record.message);
        assert!(
            rotated
                .account_tags(record.key.sender)
                .contains(&old.account_tags(record.key.sender)[0])
        );
    }
}
