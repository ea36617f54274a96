//! The delivery core: accepting, pushing, listing and acknowledging sealed
//! envelopes.
//!
//! REST handlers and the WebSocket protocol only translate their wire
//! formats into calls here; validation, id assignment, push, durability and
//! acks live in this one place.
//!
//! Accepting a message takes its id, enqueues its insert with the
//! [`committer`] and pushes it to the recipient's online connections, all
//! under one short lock: a recipient's connections see pushes in id order,
//! and the insert is always ahead of any ack the recipient can send for it.
//! The push does not wait for the commit; the sender's confirmation does.
//!
//! Rows are sealed at rest ([`crate::seal`]): the committer seals what it
//! writes and [`Delivery::fetch`] opens what it reads. A row that does not
//! open (its key is missing from `SEALPOST_STORAGE_KEYS`, or it was altered)
//! stays in the store untouched; the read fails with `unavailable` (503, or
//! a WebSocket close asking to reconnect) and the cause is logged with the
//! message id, so a recipient's queue waits, complete and in order, until an
//! operator restores the key.

pub mod committer;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::hub::{Hub, Outbound, Registration};
use crate::limits::queue::QueueCaps;
use crate::limits::rate::SendBudget;
use crate::metrics::{Kind, Limited, Metrics};
use crate::seal::KeyRing;
use crate::store::{self, Message, Store};
use committer::Committer;

/// The most messages one page or one ack may carry.
pub const MAX_PAGE: u32 = 500;

/// The most body bytes one page carries: 500 maximal messages would be
/// hundreds of megabytes in one reply. A page always has at least one
/// message, and `next` says where to go on.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

pub struct Delivery {
    store: Arc<dyn Store>,
    committer: Committer,
    hub: Arc<Hub>,
    /// Opens the rows that `fetch` reads.
    keys: Arc<KeyRing>,
    max_body_bytes: usize,
    /// Sends per user, REST and WebSocket together.
    budget: SendBudget,
    /// Messages queued per recipient.
    queues: Arc<QueueCaps>,
    metrics: Arc<Metrics>,
    /// Held while a message gets its id, is enqueued and is pushed, so that
    /// id order, commit order and push order agree. Nothing under it waits.
    order: Mutex<()>,
}

/// One page of a recipient's queue.
pub struct Page {
    pub messages: Vec<Message>,
    /// The cursor for the next page, if there is one.
    pub next: Option<Uuid>,
}

/// A message that has its id and has been pushed, on its way to durability.
pub struct Accepted {
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
    /// Completes once the message is durable.
    pub durable: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
}

/// An ephemeral message: pushed to whoever is online now, never stored.
pub struct Ephemeral {
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
    /// Whether at least one connection of the recipient took it.
    pub delivered: bool,
}

/// The limits the delivery core enforces; 0 turns one off.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub send_rate_per_second: u32,
    pub send_rate_burst: u32,
    pub max_queued_per_user: u32,
}

impl Delivery {
    pub fn new(
        store: Arc<dyn Store>,
        committer: Committer,
        hub: Arc<Hub>,
        keys: Arc<KeyRing>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            committer,
            hub,
            keys,
            max_body_bytes: limits.max_body_bytes,
            budget: SendBudget::new(limits.send_rate_per_second, limits.send_rate_burst),
            queues: Arc::new(QueueCaps::new(limits.max_queued_per_user)),
            metrics,
            order: Mutex::new(()),
        }
    }

    /// Decodes a base64 body, refusing one over the size limit before
    /// decoding it.
    pub fn decode_body(&self, field: &'static str, encoded: &str) -> Result<Vec<u8>> {
        // Padded base64 of n bytes is exactly 4 * ceil(n / 3) characters.
        if encoded.len() > self.max_body_bytes.div_ceil(3) * 4 {
            return Err(self.too_large());
        }
        let body = STANDARD
            .decode(encoded)
            .map_err(|_| Error::field(field, "must be standard base64 (RFC 4648, with padding)"))?;
        if body.len() > self.max_body_bytes {
            return Err(self.too_large());
        }
        if body.is_empty() {
            return Err(Error::field(field, "must not be empty"));
        }
        Ok(body)
    }

    fn too_large(&self) -> Error {
        Error::TooLarge(format!("body exceeds {} bytes", self.max_body_bytes).into())
    }

    /// Checks the sender's budget, size and recipient before anything is
    /// assigned. A recipient with a connection on this node exists, so an
    /// online recipient costs no query.
    async fn admit(&self, from: Uuid, to: Uuid, body: &[u8]) -> Result<()> {
        if body.len() > self.max_body_bytes {
            return Err(self.too_large());
        }
        self.budget
            .check(from)
            .inspect_err(|_| self.metrics.rate_limited(Limited::Send))?;
        if !self.hub.is_online(to) && !self.store.user_exists(to).await? {
            return Err(Error::NotFound("recipient"));
        }
        Ok(())
    }

    /// Accepts a message and returns once it is durable.
    pub async fn send(&self, from: Uuid, to: Uuid, body: Vec<u8>) -> Result<Accepted> {
        let mut accepted = self.accept(from, to, body).await?;
        (&mut accepted.durable).await?;
        Ok(accepted)
    }

    /// Accepts a message: assigns its id, enqueues it for the store and
    /// pushes it to the recipient's online connections. Returns without
    /// waiting for durability; await [`Accepted::durable`] for that.
    pub async fn accept(&self, from: Uuid, to: Uuid, body: Vec<u8>) -> Result<Accepted> {
        self.admit(from, to, &body).await?;
        self.queues.reserve(self.store.as_ref(), to).await?;
        let slot = match self.committer.reserve(body.len()).await {
            Ok(slot) => slot,
            Err(err) => {
                self.queues.release(to, 1);
                return Err(err);
            }
        };
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let message = Arc::new(new_message(from, to, body));
        let (id, sent_at) = (message.id, message.sent_at);
        let insert = slot.insert(message.clone());
        let (queues, metrics) = (self.queues.clone(), self.metrics.clone());
        let durable = Box::pin(async move {
            let stored = insert.await;
            match stored {
                Ok(()) => metrics.accepted(Kind::Stored),
                // Not stored: it takes no room in the recipient's queue.
                Err(_) => queues.release(to, 1),
            }
            stored
        });
        self.hub.push(
            to,
            &Outbound {
                message,
                ephemeral: false,
                accepted: Instant::now(),
            },
        );
        Ok(Accepted {
            id,
            sent_at,
            durable,
        })
    }

    /// Pushes a message to the recipient's connections that are online now,
    /// without storing it.
    pub async fn send_ephemeral(&self, from: Uuid, to: Uuid, body: Vec<u8>) -> Result<Ephemeral> {
        self.admit(from, to, &body).await?;
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let message = Arc::new(new_message(from, to, body));
        let (id, sent_at) = (message.id, message.sent_at);
        let delivered = self.hub.push(
            to,
            &Outbound {
                message,
                ephemeral: true,
                accepted: Instant::now(),
            },
        ) > 0;
        self.metrics.accepted(Kind::Ephemeral);
        Ok(Ephemeral {
            id,
            sent_at,
            delivered,
        })
    }

    /// Registers a connection of `user` in the hub, to be followed by a
    /// backlog read. Await the returned future before reading the backlog.
    ///
    /// A message accepted just before registering was pushed to no one, and
    /// its insert may still be in the committer's queue. Registering under
    /// the order lock and then waiting for a committer barrier closes that
    /// gap: every message accepted before registration is committed by the
    /// time the barrier passes (and is in the backlog), and every one
    /// accepted after it is pushed to the new connection.
    pub async fn subscribe(
        &self,
        user: Uuid,
        session: Uuid,
    ) -> Result<(
        Registration,
        impl Future<Output = Result<()>> + Send + 'static,
    )> {
        let slot = self.committer.reserve(0).await?;
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let registration = self.hub.register(user, session)?;
        Ok((registration, slot.barrier()))
    }

    /// `user`'s queued messages after the cursor, oldest first.
    pub async fn fetch(&self, user: Uuid, after: Option<Uuid>, limit: u32) -> Result<Page> {
        let limit = limit.clamp(1, MAX_PAGE);
        // One row more than asked tells whether another page follows.
        let rows = self
            .store
            .fetch(user, after.unwrap_or(Uuid::nil()), limit + 1)
            .await?;
        let mut messages = self.keys.open_all(rows).map_err(|err| {
            tracing::error!(user.id = %user, error = %err, "a queued message does not open; it is kept");
            Error::Unavailable
        })?;
        let mut bytes = 0;
        let within_budget = messages
            .iter()
            .take(limit as usize)
            .take_while(|m| {
                bytes += m.body.len();
                bytes <= MAX_PAGE_BYTES
            })
            .count()
            .max(1);
        let next = if messages.len() > within_budget {
            messages.truncate(within_budget);
            messages.last().map(|m| m.id)
        } else {
            None
        };
        Ok(Page { messages, next })
    }

    /// Settles `ids` for `user`: they are deleted and never sent again. Ids
    /// that are unknown or addressed to someone else are left alone and not
    /// counted.
    pub async fn ack(&self, user: Uuid, ids: Vec<Uuid>) -> Result<u64> {
        if ids.len() > MAX_PAGE as usize {
            return Err(Error::field(
                "ids",
                format!("at most {MAX_PAGE} ids per ack"),
            ));
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let acked = self.committer.ack(user, ids).await?;
        self.queues.release(user, acked);
        self.metrics.acked.increment(acked);
        Ok(acked)
    }

    /// The account's queue was deleted: forget its count.
    pub fn forget_queue(&self, user: Uuid) {
        self.queues.forget(user);
    }

    /// Rows were deleted behind the queue counters (expiry): recount them
    /// from the store as recipients are next sent to.
    pub fn recount_queues(&self) {
        self.queues.reset();
    }

    /// Forgets senders whose send budget is full again.
    pub fn prune_send_budgets(&self) {
        self.budget.prune();
    }
}

/// A message with a fresh time-ordered id. Call under the order lock.
fn new_message(sender: Uuid, recipient: Uuid, body: Vec<u8>) -> Message {
    let id = Uuid::now_v7();
    Message {
        id,
        recipient,
        sender,
        body,
        sent_at: store::id_time(id),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::{DateTime, Utc};

    use super::*;
    use crate::store::{
        AccountDetails, AccountSummary, Ack, Credentials, KeyId, RefreshToken, Revoked, Rotation,
        SealedRow, Stats, StoreResult, StoredRow, User,
    };

    /// A queue in memory whose commits take a while, so that a message can
    /// be accepted and still uncommitted when a connection subscribes.
    #[derive(Default)]
    struct SlowStore {
        messages: Mutex<Vec<SealedRow>>,
    }

    const COMMIT_DELAY: Duration = Duration::from_millis(200);

    #[async_trait]
    impl Store for SlowStore {
        async fn write_batch(
            &self,
            messages: Vec<SealedRow>,
            acks: &[Ack],
        ) -> StoreResult<Vec<Uuid>> {
            tokio::time::sleep(COMMIT_DELAY).await;
            let mut stored = self.messages.lock().unwrap();
            stored.extend(messages);
            stored.retain(|m| !acks.iter().any(|a| a.id == m.id));
            Ok(acks.iter().map(|a| a.id).collect())
        }
        async fn fetch(
            &self,
            recipient: Uuid,
            after: Uuid,
            limit: u32,
        ) -> StoreResult<Vec<StoredRow>> {
            let stored = self.messages.lock().unwrap();
            let mut page: Vec<SealedRow> = stored
                .iter()
                .filter(|m| m.recipient == recipient && m.id > after)
                .cloned()
                .collect();
            page.sort_by_key(|m| m.id);
            page.truncate(limit as usize);
            Ok(page.into_iter().map(StoredRow::Sealed).collect())
        }
        async fn stale_rows(&self, _: KeyId, _: Uuid, _: u32) -> StoreResult<Vec<StoredRow>> {
            unreachable!()
        }
        async fn reseal(&self, _: Vec<SealedRow>) -> StoreResult<u64> {
            unreachable!()
        }
        async fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>> {
            unreachable!()
        }
        async fn sealed_with(&self, _: KeyId, _: u32) -> StoreResult<Vec<StoredRow>> {
            unreachable!()
        }
        async fn user_exists(&self, _: Uuid) -> StoreResult<bool> {
            Ok(true)
        }
        async fn migrate(&self) -> StoreResult<()> {
            unreachable!()
        }
        async fn ping(&self) -> StoreResult<()> {
            unreachable!()
        }
        async fn create_user(&self, _: &User, _: &str) -> StoreResult<()> {
            unreachable!()
        }
        async fn user(&self, _: Uuid) -> StoreResult<Option<User>> {
            unreachable!()
        }
        async fn user_by_name(&self, _: &str) -> StoreResult<Option<User>> {
            unreachable!()
        }
        async fn credentials(&self, _: &str) -> StoreResult<Option<Credentials>> {
            unreachable!()
        }
        async fn set_public_key(
            &self,
            _: Uuid,
            _: &[u8],
            _: DateTime<Utc>,
        ) -> StoreResult<Option<User>> {
            unreachable!()
        }
        async fn insert_refresh_token(&self, _: &RefreshToken) -> StoreResult<bool> {
            unreachable!()
        }
        async fn rotate_refresh_token(
            &self,
            _: &[u8; 32],
            _: &[u8; 32],
            _: DateTime<Utc>,
            _: DateTime<Utc>,
        ) -> StoreResult<Rotation> {
            unreachable!()
        }
        async fn purge_refresh_tokens(&self, _: DateTime<Utc>, _: u32) -> StoreResult<u64> {
            unreachable!()
        }
        async fn delete_before(&self, _: Uuid, _: u32) -> StoreResult<u64> {
            unreachable!()
        }
        async fn password_hash(&self, _: Uuid) -> StoreResult<Option<String>> {
            unreachable!()
        }
        async fn revoke_sessions(
            &self,
            _: Uuid,
            _: Option<Uuid>,
            _: DateTime<Utc>,
        ) -> StoreResult<Vec<Uuid>> {
            unreachable!()
        }
        async fn revoked_sessions(&self, _: DateTime<Utc>) -> StoreResult<Vec<Revoked>> {
            unreachable!()
        }
        async fn disable_user(&self, _: Uuid, _: DateTime<Utc>) -> StoreResult<Option<Vec<Uuid>>> {
            unreachable!()
        }
        async fn enable_user(&self, _: Uuid) -> StoreResult<bool> {
            unreachable!()
        }
        async fn list_accounts(&self, _: Option<&str>, _: u32) -> StoreResult<Vec<AccountSummary>> {
            unreachable!()
        }
        async fn account_details(
            &self,
            _: Uuid,
            _: DateTime<Utc>,
        ) -> StoreResult<Option<AccountDetails>> {
            unreachable!()
        }
        async fn stats(&self, _: DateTime<Utc>) -> StoreResult<Stats> {
            unreachable!()
        }
        async fn pending_migrations(&self) -> StoreResult<Vec<i64>> {
            unreachable!()
        }
        async fn purge_revoked_sessions(&self, _: DateTime<Utc>, _: u32) -> StoreResult<u64> {
            unreachable!()
        }
        async fn set_password(&self, _: Uuid, _: &str, _: DateTime<Utc>) -> StoreResult<Vec<Uuid>> {
            unreachable!()
        }
        async fn delete_user(&self, _: Uuid, _: DateTime<Utc>) -> StoreResult<Option<Vec<Uuid>>> {
            unreachable!()
        }
        async fn queued_count(&self, _: Uuid) -> StoreResult<u64> {
            Ok(0)
        }
        async fn queue_depth(&self) -> StoreResult<crate::store::QueueDepth> {
            unreachable!()
        }
    }

    fn delivery() -> Delivery {
        let store: Arc<dyn Store> = Arc::new(SlowStore::default());
        let keys = Arc::new(KeyRing::generate().unwrap());
        let metrics = Arc::new(Metrics::disabled());
        let (committer, _task) = Committer::spawn(store.clone(), keys.clone(), metrics.clone());
        let limits = Limits {
            max_body_bytes: 1024,
            send_rate_per_second: 0,
            send_rate_burst: 1,
            max_queued_per_user: 0,
        };
        let hub = Hub::new(16, 0, metrics.clone());
        Delivery::new(store, committer, hub, keys, limits, metrics)
    }

    /// A message accepted before a connection subscribes, and still being
    /// committed when it does, reaches that connection through its backlog.
    #[tokio::test]
    async fn a_message_in_commit_while_subscribing_is_in_the_backlog() {
        let delivery = delivery();
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let accepted = delivery
            .accept(alice, bob, b"early".to_vec())
            .await
            .unwrap();

        let (mut registration, barrier) = delivery.subscribe(bob, Uuid::new_v4()).await.unwrap();
        // Not pushed: bob was not registered when it was accepted.
        assert!(registration.rx.try_recv().is_err());
        barrier.await.unwrap();
        let backlog = delivery.fetch(bob, None, 10).await.unwrap();
        assert_eq!(
            backlog.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            [accepted.id]
        );

        // And one accepted after subscribing is pushed.
        let later = delivery
            .accept(alice, bob, b"later".to_vec())
            .await
            .unwrap();
        assert_eq!(registration.rx.recv().await.unwrap().message.id, later.id);
    }
}
