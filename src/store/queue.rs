//! The message queue: one queue per device, rows sealed at rest.
//!
//! A message is one row per recipient device, all under the message's one
//! id: `(id, recipient, device)` is a row's key (a multi-recipient send
//! gives every account's copies the same id), and each device acknowledges
//! (deletes) its own copy. A message is gone once every copy is
//! acknowledged or expired.
//!
//! **Shared bodies.** A multi-recipient send in the shared form stores its
//! one ciphertext once, in `shared_bodies` under the message id
//! ([`SealedBody`]); each device's row carries only its small key material.
//! All the rows of such a message are written in the same transaction as
//! its body (a message is one insert for the committer), and never later,
//! so a body is present whenever one of its rows is. The body goes with
//! its last row: an ack's transaction deletes the bodies of the ids it
//! acked that have no row left, and the sweeper deletes bodies no row
//! refers to (left by two acks committed at once on two nodes, each seeing
//! the other's row) and bodies as old as the rows it expires.
//!
//! [`Queue`] is the hot path, the only part the delivery core and the
//! committer see: batched writes, page reads, counts. [`QueueMaintenance`]
//! is what the sweeper and start-up do to the queue as a whole.

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{DeviceId, StoreError, StoreResult};

/// A sealed envelope for one device, in plaintext in memory. The body is
/// opaque ciphertext of the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: Uuid,
    pub recipient: Uuid,
    /// The recipient's device whose queue holds this copy.
    pub device: DeviceId,
    pub sender: Uuid,
    /// The device that sent it, so that the recipient picks its key.
    pub sender_device: DeviceId,
    /// This device's envelope, or the shared body of a multi-recipient
    /// send: one allocation for every copy of it.
    pub body: Bytes,
    /// A shared-body copy's own key material ([`Self::shared`]).
    pub key: Option<Bytes>,
    /// Whether an ack of this copy sends its sender a receipt (a send's
    /// `"receipts"`).
    pub receipts: bool,
    pub sent_at: DateTime<Utc>,
}

impl Message {
    /// Whether the body is a multi-recipient send's shared body, stored
    /// once in `shared_bodies` rather than in this copy's row.
    pub fn shared(&self) -> bool {
        self.key.is_some()
    }
}

/// A multi-recipient send's shared body as stored: `sealed` under storage
/// key `key_id` (format in [`crate::seal`]), keyed by the message id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBody {
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
    pub key_id: KeyId,
    pub sealed: Vec<u8>,
}

/// The id of a storage key (`SEALPOST_STORAGE_KEYS`): a small positive
/// integer, kept beside every sealed row.
pub type KeyId = i16;

/// The keyed hash of a (sender, recipient) pair a queued row carries
/// ([`crate::seal::KeyRing::sender_tag`]).
pub type SenderTag = [u8; 16];

/// A queued message as stored: routing columns in the clear, its sender and
/// body in `sealed` under storage key `key_id` (format in [`crate::seal`]),
/// and the keyed hash of its sender and recipient, that a sender's share of
/// the queue is counted by (`None` in rows written before it existed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRow {
    pub id: Uuid,
    pub recipient: Uuid,
    pub device: DeviceId,
    pub sent_at: DateTime<Utc>,
    pub key_id: KeyId,
    pub sealed: Vec<u8>,
    pub sender_tag: Option<SenderTag>,
}

/// A queued message as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredRow {
    Sealed(SealedRow),
    /// Written in plaintext by a release before sealed storage (and so
    /// before devices: its sender device is 1).
    Legacy(Message),
}

/// A queue row as both backends select it: `id, recipient, device_id,
/// sent_at, key_id, sealed, sender, body, sender_tag`, with `sent_at` in the
/// backend's own representation `T` and the device id as the backend's
/// integer.
pub(super) type QueueColumns<T, D> = (
    Uuid,
    Uuid,
    D,
    T,
    Option<KeyId>,
    Option<Vec<u8>>,
    Option<Uuid>,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

/// The columns every queue read selects, in [`QueueColumns`] order.
pub(super) const QUEUE_COLUMNS: &str =
    "id, recipient, device_id, sent_at, key_id, sealed, sender, body, sender_tag";

impl StoredRow {
    /// Builds a row from the queue's columns (`sent_at` and the device id
    /// already converted from the backend's representation).
    pub(super) fn from_columns(
        (id, recipient, device, sent_at, key_id, sealed, sender, body, tag): QueueColumns<
            DateTime<Utc>,
            DeviceId,
        >,
    ) -> StoreResult<Self> {
        match (key_id, sealed, sender, body) {
            (Some(key_id), Some(sealed), _, _) => Ok(StoredRow::Sealed(SealedRow {
                id,
                recipient,
                device,
                sent_at,
                key_id,
                sealed,
                sender_tag: tag.and_then(|t| t.try_into().ok()),
            })),
            (None, None, Some(sender), Some(body)) => Ok(StoredRow::Legacy(Message {
                id,
                recipient,
                device,
                sender,
                sender_device: 1,
                body: body.into(),
                key: None,
                receipts: true,
                sent_at,
            })),
            // The schema's CHECK constraint rules this out.
            _ => Err(StoreError::Malformed(id)),
        }
    }

    pub fn id(&self) -> Uuid {
        match self {
            StoredRow::Sealed(row) => row.id,
            StoredRow::Legacy(message) => message.id,
        }
    }

    /// The bytes it takes in the store: what the queue's byte quota counts.
    pub fn stored_bytes(&self) -> u64 {
        match self {
            StoredRow::Sealed(row) => row.sealed.len() as u64,
            StoredRow::Legacy(message) => message.body.len() as u64,
        }
    }

    /// Its sender tag, if it has one.
    pub fn sender_tag(&self) -> Option<SenderTag> {
        match self {
            StoredRow::Sealed(row) => row.sender_tag,
            StoredRow::Legacy(_) => None,
        }
    }
}

/// What one sender (by tag; `None` for rows written before tags) holds in
/// one device's queue, as [`Queue::queue_shares`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueShare {
    pub device: DeviceId,
    pub sender_tag: Option<SenderTag>,
    pub rows: u64,
    /// Stored bytes (sealed, or a legacy row's body).
    pub bytes: u64,
}

/// The size of the queue, as [`QueueMaintenance::queue_depth`] samples it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Rows queued for all devices.
    pub total: u64,
    /// Rows queued for the device with the most.
    pub max_per_device: u64,
    /// Devices in the database, sampled with the queue for the metrics.
    pub devices: u64,
}

/// One acknowledgement: delete the copy of `id` queued for `recipient`'s
/// `device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ack {
    pub recipient: Uuid,
    pub device: DeviceId,
    pub id: Uuid,
}

/// The key a client gave a send (`client_id`), scoped to its sending
/// device: the same key from another device is another key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SendKey {
    pub sender: Uuid,
    pub device: DeviceId,
    pub client_id: String,
}

/// A send key as written with its message: the id the message got, and a
/// digest of what was sent, that a retry must match. In memory only: the
/// store holds it as a [`SealedKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentKey {
    pub key: SendKey,
    pub message: Uuid,
    pub digest: Vec<u8>,
}

/// A send key as stored ([`crate::seal::KeyRing::seal_key`]): nothing in it
/// names the sender, its device, the `client_id` or the message in the
/// clear, so a dump cannot join it to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedKey {
    /// Keyed hash of (sender, device, `client_id`): the row's key.
    pub hash: Vec<u8>,
    /// Keyed hash of the sender: what deleting the account deletes by.
    pub account: Vec<u8>,
    /// The storage key that sealed `answer`.
    pub key_id: KeyId,
    /// The message id and digest, sealed and bound to `hash`.
    pub answer: Vec<u8>,
    /// When the sweeper deletes it: a coarse time, rounded up to the hour,
    /// so that it tells little about when its message was sent.
    pub expires_at: DateTime<Utc>,
}

/// The queue's hot path.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Inserts `bodies` (a body already stored is kept) and `messages`,
    /// records `keys` and applies `acks` in one transaction, then deletes
    /// the shared bodies of the acked ids that no row refers to any more.
    /// Returns the rows the acks deleted, as they were stored (so that the
    /// committer can tell each sender of its delivery); an ack for a copy
    /// that is unknown or queued for another device deletes nothing. A key
    /// already recorded is replaced: the delivery core only writes one it
    /// found nowhere, or expired.
    async fn write_batch(
        &self,
        bodies: Vec<SealedBody>,
        messages: Vec<SealedRow>,
        keys: &[SealedKey],
        acks: &[Ack],
    ) -> StoreResult<Vec<StoredRow>>;

    /// The shared bodies stored under `ids` (those that exist).
    async fn shared_bodies(&self, ids: &[Uuid]) -> StoreResult<Vec<SealedBody>>;

    /// The send key stored under one of `hashes` (one per storage key) that
    /// has not expired at `now`, if any.
    async fn sent_key(
        &self,
        hashes: &[Vec<u8>],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SealedKey>>;

    /// Deletes the send keys of an account (by its tag under each storage
    /// key); returns how many.
    async fn forget_sender_keys(&self, accounts: &[Vec<u8>]) -> StoreResult<u64>;

    /// The ids and stored sizes (sealed bytes, or a legacy row's body) of
    /// up to `limit` copies queued for `recipient`'s `device` after `after`,
    /// oldest first, read without their contents: what a page is cut by
    /// before any body is read (see [`crate::delivery::Delivery::fetch`]).
    async fn queued_sizes(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, u64)>>;

    /// Up to `limit` of the copies queued for `recipient`'s `device` with
    /// ids after `after` and up to `through`, oldest first.
    async fn fetch_through(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        through: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<StoredRow>>;

    /// The ids of up to `limit` copies queued for `recipient`'s `device`
    /// after `after`, oldest first, read in one statement: one snapshot, in
    /// which each node's messages are a prefix of its commits (a clustered
    /// drain sends exactly these, see [`crate::cluster`]).
    async fn queued_ids(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<Uuid>>;

    /// What each sender holds in each of `recipient`'s device queues, rows
    /// and bytes, in one statement: what the queue caps are loaded from.
    async fn queue_shares(&self, recipient: Uuid) -> StoreResult<Vec<QueueShare>>;

    /// Deletes every copy queued for `recipient`'s `device`, or for all of
    /// the account's devices with `None`; returns how many. For copies a
    /// send had in flight while the device or account went.
    async fn purge(&self, recipient: Uuid, device: Option<DeviceId>) -> StoreResult<u64>;
}

/// The queue as a whole: expiry, sealing again, and start-up's key check.
#[async_trait]
pub trait QueueMaintenance: Send + Sync + 'static {
    /// How many rows are queued in all and for the busiest device, and how
    /// many devices exist, in aggregate queries: the sweeper samples it for
    /// the metrics. It reads the whole `(recipient, device_id, id)` index, so
    /// it runs once per sweep and only with metrics on.
    async fn queue_depth(&self) -> StoreResult<QueueDepth>;

    /// Up to `limit` queued rows with ids after `after`, in id order, that
    /// are not sealed under `current`: legacy plaintext rows and rows of
    /// older keys, for the sweeper to seal again. All copies of one id come
    /// in one call, so paging by id misses none.
    async fn stale_rows(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<StoredRow>>;

    /// Replaces the content of each row by its new sealing, dropping any
    /// plaintext; rows deleted meanwhile are skipped. Returns how many were
    /// updated.
    async fn reseal(&self, rows: Vec<SealedRow>) -> StoreResult<u64>;

    /// The distinct key ids of the sealed rows and shared bodies in the
    /// queue, so that start-up can refuse a key list that could not open
    /// them.
    async fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>>;

    /// Up to `limit` of the oldest queued rows sealed under `key`, so that
    /// start-up can check that the key configured under that id opens them.
    async fn sealed_with(&self, key: KeyId, limit: u32) -> StoreResult<Vec<StoredRow>>;

    /// Deletes up to `limit` rows with ids below `before`, and up to `limit`
    /// shared bodies with ids below it; returns how many of each, together.
    /// The sweeper calls this until it returns less than `limit`, so no
    /// single statement holds locks for long.
    async fn delete_before(&self, before: Uuid, limit: u32) -> StoreResult<u64>;

    /// Deletes up to `limit` shared bodies that no queued row refers to;
    /// returns how many.
    async fn delete_orphan_bodies(&self, limit: u32) -> StoreResult<u64>;

    /// Up to `limit` shared bodies with ids after `after`, in id order, not
    /// sealed under `current`, for the sweeper to seal again.
    async fn stale_bodies(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<SealedBody>>;

    /// Replaces each body's sealing; bodies deleted meanwhile are skipped.
    /// Returns how many were updated.
    async fn reseal_bodies(&self, bodies: Vec<SealedBody>) -> StoreResult<u64>;

    /// Deletes up to `limit` send keys that expired by `now`; returns how
    /// many. In batches, as [`Self::delete_before`].
    async fn forget_expired_keys(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
}
