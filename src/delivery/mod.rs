//! The delivery core: accepting, listing and acknowledging sealed envelopes.
//!
//! REST handlers (and the WebSocket protocol) only translate their wire
//! formats into calls here; validation, id assignment, durability and acks
//! live in this one place. Writes go through the [`committer`], reads straight
//! to the store.

pub mod committer;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{Message, Store};
use committer::{Committed, Committer};

/// The most messages one page or one ack may carry.
pub const MAX_PAGE: u32 = 500;

pub struct Delivery {
    store: Arc<dyn Store>,
    committer: Committer,
    max_body_bytes: usize,
}

/// One page of a recipient's queue.
pub struct Page {
    pub messages: Vec<Message>,
    /// The cursor for the next page, if there is one.
    pub next: Option<Uuid>,
}

impl Delivery {
    pub fn new(store: Arc<dyn Store>, committer: Committer, max_body_bytes: usize) -> Self {
        Self {
            store,
            committer,
            max_body_bytes,
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

    /// Accepts a message from `from` to `to`. Returns once it is durable.
    pub async fn send(&self, from: Uuid, to: Uuid, body: Vec<u8>) -> Result<Committed> {
        if body.len() > self.max_body_bytes {
            return Err(self.too_large());
        }
        if !self.store.user_exists(to).await? {
            return Err(Error::NotFound("recipient"));
        }
        self.committer.insert(to, from, body).await
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
