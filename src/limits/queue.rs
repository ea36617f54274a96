//! The cap on messages queued for one device
//! (`SEALPOST_MAX_QUEUED_PER_USER`, which counts each device's queue on its
//! own): a flood aimed at one user, or a device that never comes back,
//! cannot grow the queue without bound.
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
use crate::store::{DeviceId, Queue};

/// A device's queue: its account and number.
type QueueKey = (Uuid, DeviceId);

pub struct QueueCaps {
    /// 0: no cap, and nothing is counted.
    cap: u32,
    depth: DashMap<QueueKey, u32>,
}

impl QueueCaps {
    pub fn new(cap: u32) -> Self {
        Self {
            cap,
            depth: DashMap::new(),
        }
    }

    /// Takes room for one message in each of `devices`' queues of
    /// `recipient`, or refuses with `queue_full` and takes none. Give it
    /// back with [`QueueCaps::release`] if the message is not stored after
    /// all.
    pub async fn reserve(
        &self,
        queue: &dyn Queue,
        recipient: Uuid,
        devices: &[DeviceId],
    ) -> Result<()> {
        if self.cap == 0 {
            return Ok(());
        }
        for (n, &device) in devices.iter().enumerate() {
            if let Err(err) = self.reserve_one(queue, (recipient, device)).await {
                self.release(recipient, &devices[..n], 1);
                return Err(err);
            }
        }
        Ok(())
    }

    async fn reserve_one(&self, queue: &dyn Queue, key: QueueKey) -> Result<()> {
        if !self.depth.contains_key(&key) {
            // No shard lock is held across the query; if two senders load
            // at once, the first insert wins and both count from it.
            let stored = queue.queued_count(key.0, key.1).await?;
            let stored = u32::try_from(stored).unwrap_or(u32::MAX);
            self.depth.entry(key).or_insert(stored);
        }
        let mut depth = self.depth.entry(key).or_insert(0);
        if *depth >= self.cap {
            return Err(Error::QueueFull);
        }
        *depth += 1;
        Ok(())
    }

    /// `count` messages to each of `recipient`'s `devices` left their
    /// queues (acked) or never entered them (a failed write).
    pub fn release(&self, recipient: Uuid, devices: &[DeviceId], count: u64) {
        if self.cap == 0 || count == 0 {
            return;
        }
        for &device in devices {
            if let Some(mut depth) = self.depth.get_mut(&(recipient, device)) {
                *depth = depth.saturating_sub(u32::try_from(count).unwrap_or(u32::MAX));
            }
        }
    }

    /// Drops every counter, to be reloaded from the store on next use:
    /// after the sweeper deleted rows, or an account's queue was deleted.
    pub fn reset(&self) {
        self.depth.clear();
        self.depth.shrink_to_fit();
    }

    /// One device's queue was deleted, or with `None` every queue of the
    /// account (a scan of every counter: account deletions are rare).
    pub fn forget(&self, recipient: Uuid, device: Option<DeviceId>) {
        match device {
            Some(device) => {
                self.depth.remove(&(recipient, device));
            }
            None => self.depth.retain(|(user, _), _| *user != recipient),
        }
    }
}
