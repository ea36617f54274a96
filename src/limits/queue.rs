//! The cap on messages queued for one recipient
//! (`SEALPOST_MAX_QUEUED_PER_USER`): a flood aimed at one user, or a user
//! who never comes back, cannot grow the queue without bound.
//!
//! Counting rows per send would cost a query each time, so depths are kept
//! in memory: loaded from the store the first time a recipient is seen,
//! raised when a message is accepted, lowered when acks delete messages or
//! a write fails. Expiry deletes rows behind the counters' back, so after a
//! sweep that deleted anything the counters are dropped and reloaded on
//! next use. The cap is therefore exact on one node up to the messages in
//! flight at a reload, which is what a safety cap needs.

use dashmap::DashMap;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::Store;

pub struct QueueCaps {
    /// 0: no cap, and nothing is counted.
    cap: u32,
    depth: DashMap<Uuid, u32>,
}

impl QueueCaps {
    pub fn new(cap: u32) -> Self {
        Self {
            cap,
            depth: DashMap::new(),
        }
    }

    /// Takes room for one message to `recipient`, or refuses with
    /// `queue_full`. Give it back with [`QueueCaps::release`] if the message
    /// is not stored after all.
    pub async fn reserve(&self, store: &dyn Store, recipient: Uuid) -> Result<()> {
        if self.cap == 0 {
            return Ok(());
        }
        if !self.depth.contains_key(&recipient) {
            // No shard lock is held across the query; if two senders load
            // at once, the first insert wins and both count from it.
            let stored = store.queued_count(recipient).await?;
            let stored = u32::try_from(stored).unwrap_or(u32::MAX);
            self.depth.entry(recipient).or_insert(stored);
        }
        let mut depth = self.depth.entry(recipient).or_insert(0);
        if *depth >= self.cap {
            return Err(Error::QueueFull);
        }
        *depth += 1;
        Ok(())
    }

    /// `count` messages to `recipient` left the queue (acked) or never
    /// entered it (a failed write).
    pub fn release(&self, recipient: Uuid, count: u64) {
        if self.cap == 0 || count == 0 {
            return;
        }
        if let Some(mut depth) = self.depth.get_mut(&recipient) {
            *depth = depth.saturating_sub(u32::try_from(count).unwrap_or(u32::MAX));
        }
    }

    /// Drops every counter, to be reloaded from the store on next use:
    /// after the sweeper deleted rows, or an account's queue was deleted.
    pub fn reset(&self) {
        self.depth.clear();
        self.depth.shrink_to_fit();
    }

    pub fn forget(&self, recipient: Uuid) {
        self.depth.remove(&recipient);
    }
}
