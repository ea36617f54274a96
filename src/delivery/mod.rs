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

pub mod committer;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::hub::{Hub, Outbound};
use crate::store::{self, Message, Store};
use committer::Committer;

/// The most messages one page or one ack may carry.
pub const MAX_PAGE: u32 = 500;

pub struct Delivery {
    store: Arc<dyn Store>,
    committer: Committer,
    hub: Arc<Hub>,
    max_body_bytes: usize,
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

impl Delivery {
    pub fn new(
        store: Arc<dyn Store>,
        committer: Committer,
        hub: Arc<Hub>,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            store,
            committer,
            hub,
            max_body_bytes,
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

    /// Checks size and recipient before anything is assigned. A recipient
    /// with a connection on this node exists, so an online recipient costs
    /// no query.
    async fn admit(&self, to: Uuid, body: &[u8]) -> Result<()> {
        if body.len() > self.max_body_bytes {
            return Err(self.too_large());
        }
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
        self.admit(to, &body).await?;
        let slot = self.committer.reserve().await?;
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let message = Arc::new(new_message(from, to, body));
        let (id, sent_at) = (message.id, message.sent_at);
        let durable = Box::pin(slot.insert(message.clone()));
        self.hub.push(
            to,
            &Outbound {
                message,
                ephemeral: false,
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
        self.admit(to, &body).await?;
        let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        let message = Arc::new(new_message(from, to, body));
        let (id, sent_at) = (message.id, message.sent_at);
        let delivered = self.hub.push(
            to,
            &Outbound {
                message,
                ephemeral: true,
            },
        ) > 0;
        Ok(Ephemeral {
            id,
            sent_at,
            delivered,
        })
    }

    /// `user`'s queued messages after the cursor, oldest first.
    pub async fn fetch(&self, user: Uuid, after: Option<Uuid>, limit: u32) -> Result<Page> {
        let limit = limit.clamp(1, MAX_PAGE);
        // One row more than asked tells whether another page follows.
        let mut messages = self
            .store
            .fetch(user, after.unwrap_or(Uuid::nil()), limit + 1)
            .await?;
        let next = if messages.len() > limit as usize {
            messages.truncate(limit as usize);
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
        if ids.is_empty() {
            return Ok(0);
        }
        self.committer.ack(user, ids).await
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
