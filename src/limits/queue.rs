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
//!
//! In a cluster each node counts only its own sends and the acks it
//! handles, so a node's counter drifts from the shared queue (a device
//! acking through another node would look full here for ever). There each
//! counter is read from the store again once it is [`CLUSTER_RECOUNT`]
//! old: the cap holds cluster-wide to within what the other nodes accept
//! for that device in that time.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{DeviceId, Queue};

/// A device's queue: its account and number.
type QueueKey = (Uuid, DeviceId);

/// How old a clustered node's counter may get before it is read again: a
/// count query per busy device every few seconds, per node.
pub const CLUSTER_RECOUNT: Duration = Duration::from_secs(5);

pub struct QueueCaps {
    /// 0: no cap, and nothing is counted.
    cap: u32,
    /// Depth, and when it was read from the store.
    depth: DashMap<QueueKey, (u32, Instant)>,
    /// How old a counter may get; `None` on one node, where it is exact.
    recount: Option<Duration>,
}

impl QueueCaps {
    pub fn new(cap: u32, clustered: bool) -> Self {
        Self {
            cap,
            depth: DashMap::new(),
            recount: clustered.then_some(CLUSTER_RECOUNT),
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
        let stale = match self.depth.get(&key) {
            None => true,
            Some(entry) => self.recount.is_some_and(|age| entry.1.elapsed() >= age),
        };
        if stale {
            // No shard lock is held across the query; if two senders load
            // at once, both count from the later read.
            let stored = queue.queued_count(key.0, key.1).await?;
            let stored = u32::try_from(stored).unwrap_or(u32::MAX);
            self.depth.insert(key, (stored, Instant::now()));
        }
        let mut depth = self.depth.entry(key).or_insert((0, Instant::now()));
        if depth.0 >= self.cap {
            return Err(Error::QueueFull);
        }
        depth.0 += 1;
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
                depth.0 = depth
                    .0
                    .saturating_sub(u32::try_from(count).unwrap_or(u32::MAX));
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
