//! The caps on what waits for a recipient: messages per device queue
//! (`SEALPOST_MAX_QUEUED_PER_DEVICE`, which counts each device's queue on
//! its own), a sender's share of one device's queue
//! (`SEALPOST_MAX_QUEUED_PER_SENDER`), and stored bytes per account
//! (`SEALPOST_MAX_QUEUED_BYTES_PER_USER`). A flood aimed at one user, or a
//! device that never comes back, cannot grow the queue without bound; and
//! no one sender can fill a queue for everyone else.
//!
//! **Shares.** A device's queue is a pool every sender draws on; a cap on
//! the pool alone lets one sender (or ten free accounts) fill it, after
//! which everyone writing to the account gets `queue_full`. So:
//! - a sender may hold at most `per_sender` copies in one device's queue,
//!   and a tenth of the account's byte quota ([`SENDER_BYTES_SHARE`]);
//! - once a device's queue (or the account's bytes) is full, a sender that
//!   holds little there (under [`small_share`] copies) may still queue into
//!   a headroom of a tenth more ([`HEADROOM`]): someone writing to a person
//!   who is away still gets through while a flood holds the rest.
//!
//! A share no smaller than the device cap is no share: then (and with
//! `per_sender` 0) there are neither shares nor headroom, and the device
//! cap and byte quota are the recipient's, whoever sends.
//!
//! Filling a queue so that a sender holding nothing is refused then takes
//! `per_device / per_sender` accounts for the queue and another
//! `headroom / small_share` for the headroom: 10 + 100 at the defaults.
//!
//! **Counting.** Counting rows per send would cost a query each time, so
//! each account's queues are kept in memory: loaded from the store in one
//! query ([`Queue::queue_shares`]) the first time a recipient is seen,
//! raised when a message is accepted, lowered when acks delete copies or a
//! write fails. A sender is known by its tag ([`crate::seal::KeyRing::
//! sender_tag`], the keyed hash of sender and recipient a queued row
//! carries), so its share survives a restart and a reload without its
//! identity in the clear. Expiry deletes rows behind the counters' back, so
//! after a sweep that deleted anything the counters are dropped and
//! reloaded on next use. The caps are therefore exact on one node up to the
//! messages in flight at a reload, which is what a safety cap needs. Rows
//! written before tags count towards the queue and no sender; a rotation
//! of the storage key starts new tags, so until the sweeper has sealed the
//! old rows again (and tagged them anew) a sender's older rows count for no
//! one.
//!
//! In a cluster each node counts only its own sends and the acks it
//! handles, so a node's counter drifts from the shared queue (a device
//! acking through another node would look full here for ever). There each
//! account is read from the store again once its count is
//! [`CLUSTER_RECOUNT`] old: the caps hold cluster-wide to within what the
//! other nodes accept for that account in that time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{DeviceId, Queue, QueueShare, SenderTag};

/// How old a clustered node's counter may get before it is read again: a
/// query per busy account every few seconds, per node.
pub const CLUSTER_RECOUNT: Duration = Duration::from_secs(5);

/// The headroom past a full queue (rows or bytes) that senders holding
/// little may still use: a tenth.
pub const HEADROOM: u64 = 10;

/// A sender's share of an account's byte quota: a tenth, as the default
/// sender share of a device's queue.
pub const SENDER_BYTES_SHARE: u64 = 10;

/// The caps; 0 turns one off.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueLimits {
    /// Copies queued per device.
    pub per_device: u32,
    /// Copies one sender may hold in one device's queue.
    pub per_sender: u32,
    /// Stored bytes queued per account, all its devices together.
    pub bytes_per_user: u64,
}

/// Copies a sender may hold in a device's queue and still use the
/// headroom of a full one: a hundredth of its share (at least 1), i.e. 10
/// at the default 1,000. A person writing to someone away for days holds
/// a few; a flood holds its whole share.
pub fn small_share(per_sender: u32) -> u32 {
    (per_sender / 100).max(1)
}

/// One account's queues, as counted here.
struct Account {
    /// When it was read from the store.
    read_at: Instant,
    /// Stored bytes of every device's queue.
    bytes: u64,
    /// Stored bytes per sender, every device together.
    sender_bytes: HashMap<SenderTag, u64>,
    devices: HashMap<DeviceId, DeviceQueue>,
}

#[derive(Default)]
struct DeviceQueue {
    rows: u32,
    /// Copies per sender; only senders holding some (bounded by the rows
    /// queued, themselves capped).
    senders: HashMap<SenderTag, u32>,
}

impl Account {
    fn of(shares: Vec<QueueShare>) -> Self {
        let mut account = Account {
            read_at: Instant::now(),
            bytes: 0,
            sender_bytes: HashMap::new(),
            devices: HashMap::new(),
        };
        for share in shares {
            let rows = u32::try_from(share.rows).unwrap_or(u32::MAX);
            account.bytes = account.bytes.saturating_add(share.bytes);
            let queue = account.devices.entry(share.device).or_default();
            queue.rows = queue.rows.saturating_add(rows);
            if let Some(tag) = share.sender_tag {
                *queue.senders.entry(tag).or_default() += rows;
                *account.sender_bytes.entry(tag).or_default() += share.bytes;
            }
        }
        account
    }
}

/// One copy a send queues or an ack took away: its device and stored
/// bytes, and its sender's tag (`None` for a row written before tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub device: DeviceId,
    pub tag: Option<SenderTag>,
    pub bytes: u64,
}

pub struct QueueCaps {
    limits: QueueLimits,
    /// Whether senders have shares (and the headroom is open to small
    /// ones): a share under the device cap is set.
    shares: bool,
    /// Bounded by the accounts that exist (an account unknown to the store
    /// is refused before it is counted); each entry by its queued rows.
    accounts: DashMap<Uuid, Account>,
    /// How old a count may get; `None` on one node, where it is exact.
    recount: Option<Duration>,
}

impl QueueCaps {
    pub fn new(limits: QueueLimits, clustered: bool) -> Self {
        let shares = limits.per_sender > 0
            && (limits.per_device == 0 || limits.per_sender < limits.per_device);
        Self {
            limits,
            shares,
            accounts: DashMap::new(),
            recount: clustered.then_some(CLUSTER_RECOUNT),
        }
    }

    /// Whether nothing is capped, and so nothing counted.
    fn off(&self) -> bool {
        self.limits.per_device == 0
            && self.limits.per_sender == 0
            && self.limits.bytes_per_user == 0
    }

    /// Takes room for one message from the sender tagged `tag` in each of
    /// `recipient`'s queues `copies` name (device, stored bytes), or
    /// refuses with `queue_full` and takes none. Give it back with
    /// [`QueueCaps::release`] if the message is not stored after all.
    pub async fn reserve(
        &self,
        queue: &dyn Queue,
        recipient: Uuid,
        tag: SenderTag,
        copies: &[(DeviceId, u64)],
    ) -> Result<()> {
        if self.off() {
            return Ok(());
        }
        let stale = match self.accounts.get(&recipient) {
            None => true,
            Some(account) => self
                .recount
                .is_some_and(|age| account.read_at.elapsed() >= age),
        };
        if stale {
            // No shard lock is held across the query; if two senders load
            // at once, both count from the later read.
            let shares = queue.queue_shares(recipient).await?;
            self.accounts.insert(recipient, Account::of(shares));
        }
        let mut account = self
            .accounts
            .entry(recipient)
            .or_insert_with(|| Account::of(Vec::new()));
        let limits = self.limits;
        let small = small_share(limits.per_sender);
        // Whether the sender holds little in every queue it adds to: then
        // a full queue's headroom is open to it.
        let is_small = self.shares
            && copies.iter().all(|(device, _)| {
                account
                    .devices
                    .get(device)
                    .and_then(|q| q.senders.get(&tag))
                    .is_none_or(|held| *held < small)
            });
        for (device, _) in copies {
            let (rows, held) = account.devices.get(device).map_or((0, 0), |q| {
                (q.rows, q.senders.get(&tag).copied().unwrap_or(0))
            });
            if self.shares && held >= limits.per_sender {
                return Err(Error::QueueFull);
            }
            if !within(u64::from(rows) + 1, u64::from(limits.per_device), is_small) {
                return Err(Error::QueueFull);
            }
        }
        let added: u64 = copies.iter().map(|(_, bytes)| bytes).sum();
        if limits.bytes_per_user > 0 {
            let mine = account.sender_bytes.get(&tag).copied().unwrap_or(0);
            let share = (limits.bytes_per_user / SENDER_BYTES_SHARE).max(1);
            if (self.shares && mine.saturating_add(added) > share)
                || !within(
                    account.bytes.saturating_add(added),
                    limits.bytes_per_user,
                    is_small,
                )
            {
                return Err(Error::QueueFull);
            }
        }
        account.bytes = account.bytes.saturating_add(added);
        *account.sender_bytes.entry(tag).or_default() += added;
        for (device, _) in copies {
            let queue = account.devices.entry(*device).or_default();
            queue.rows = queue.rows.saturating_add(1);
            *queue.senders.entry(tag).or_default() += 1;
        }
        Ok(())
    }

    /// Copies of `recipient`'s queues left them (acked) or never entered
    /// them (a failed write).
    pub fn release(&self, recipient: Uuid, charges: impl IntoIterator<Item = Charge>) {
        if self.off() {
            return;
        }
        let Some(mut account) = self.accounts.get_mut(&recipient) else {
            return;
        };
        for charge in charges {
            account.bytes = account.bytes.saturating_sub(charge.bytes);
            if let Some(tag) = charge.tag
                && let Some(bytes) = account.sender_bytes.get_mut(&tag)
            {
                *bytes = bytes.saturating_sub(charge.bytes);
                if *bytes == 0 {
                    account.sender_bytes.remove(&tag);
                }
            }
            if let Some(queue) = account.devices.get_mut(&charge.device) {
                queue.rows = queue.rows.saturating_sub(1);
                if let Some(tag) = charge.tag
                    && let Some(held) = queue.senders.get_mut(&tag)
                {
                    *held = held.saturating_sub(1);
                    if *held == 0 {
                        queue.senders.remove(&tag);
                    }
                }
            }
        }
    }

    /// Drops every counter, to be reloaded from the store on next use:
    /// after the sweeper deleted rows.
    pub fn reset(&self) {
        self.accounts.clear();
        self.accounts.shrink_to_fit();
    }

    /// One device's queue was deleted, or with `None` every queue of the
    /// account: its counts are read again on next use.
    pub fn forget(&self, recipient: Uuid, _device: Option<DeviceId>) {
        self.accounts.remove(&recipient);
    }
}

/// Whether `total` (after the addition) fits under `cap` (0: no cap), or,
/// for a sender holding little, under the cap and its [`HEADROOM`].
fn within(total: u64, cap: u64, small: bool) -> bool {
    cap == 0 || total <= cap || (small && total <= cap.saturating_add((cap / HEADROOM).max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::fake::MemQueue;

    fn caps(per_device: u32, per_sender: u32, bytes_per_user: u64) -> QueueCaps {
        QueueCaps::new(
            QueueLimits {
                per_device,
                per_sender,
                bytes_per_user,
            },
            false,
        )
    }

    fn tag(n: u8) -> SenderTag {
        [n; 16]
    }

    #[tokio::test]
    async fn a_sender_is_refused_past_its_share_and_others_are_not() {
        let (queue, bob) = (MemQueue::default(), Uuid::new_v4());
        let caps = caps(100, 10, 0);
        for _ in 0..10 {
            caps.reserve(&queue, bob, tag(1), &[(1, 10)]).await.unwrap();
        }
        let refused = caps.reserve(&queue, bob, tag(1), &[(1, 10)]).await;
        assert_eq!(refused.unwrap_err().code(), "queue_full");
        caps.reserve(&queue, bob, tag(2), &[(1, 10)]).await.unwrap();
        // An ack gives the share back.
        let ack = Charge {
            device: 1,
            tag: Some(tag(1)),
            bytes: 10,
        };
        caps.release(bob, [ack]);
        caps.reserve(&queue, bob, tag(1), &[(1, 10)]).await.unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_keeps_headroom_for_senders_holding_little() {
        let (queue, bob) = (MemQueue::default(), Uuid::new_v4());
        // 100 a device, 50 a sender: small is 1 (under one copy held).
        let caps = caps(100, 50, 0);
        for sender in [1, 2] {
            for _ in 0..50 {
                caps.reserve(&queue, bob, tag(sender), &[(1, 1)])
                    .await
                    .unwrap();
            }
        }
        // Full: the big senders are refused, a new one gets the headroom
        // (10), one copy each.
        assert!(caps.reserve(&queue, bob, tag(3), &[(1, 1)]).await.is_ok());
        assert_eq!(
            caps.reserve(&queue, bob, tag(3), &[(1, 1)])
                .await
                .unwrap_err()
                .code(),
            "queue_full"
        );
        for sender in 4..13 {
            caps.reserve(&queue, bob, tag(sender), &[(1, 1)])
                .await
                .unwrap();
        }
        // Headroom used up: everyone is refused.
        assert!(caps.reserve(&queue, bob, tag(99), &[(1, 1)]).await.is_err());
    }

    #[tokio::test]
    async fn a_share_as_large_as_the_queue_is_no_share() {
        let (queue, bob) = (MemQueue::default(), Uuid::new_v4());
        let caps = caps(3, 1000, 0);
        for _ in 0..3 {
            caps.reserve(&queue, bob, tag(1), &[(1, 1)]).await.unwrap();
        }
        // Full for everyone: no headroom.
        assert!(caps.reserve(&queue, bob, tag(2), &[(1, 1)]).await.is_err());
    }

    #[tokio::test]
    async fn the_byte_quota_counts_every_copy_and_frees_on_release() {
        let (queue, bob) = (MemQueue::default(), Uuid::new_v4());
        // 1,000 bytes an account; a sender's share is 100.
        let caps = caps(0, 10, 1000);
        caps.reserve(&queue, bob, tag(1), &[(1, 50), (2, 50)])
            .await
            .unwrap();
        // Over the sender's share of bytes.
        assert!(caps.reserve(&queue, bob, tag(1), &[(1, 1)]).await.is_err());
        for sender in 2..11 {
            caps.reserve(&queue, bob, tag(sender), &[(1, 100)])
                .await
                .unwrap();
        }
        // 1,000 queued: a sender at its share is refused...
        assert!(caps.reserve(&queue, bob, tag(2), &[(1, 1)]).await.is_err());
        // ...and, past the headroom, for everyone.
        caps.reserve(&queue, bob, tag(11), &[(1, 100)])
            .await
            .unwrap();
        assert!(caps.reserve(&queue, bob, tag(12), &[(1, 1)]).await.is_err());
        caps.release(
            bob,
            [Charge {
                device: 1,
                tag: Some(tag(11)),
                bytes: 100,
            }],
        );
        caps.reserve(&queue, bob, tag(12), &[(1, 1)]).await.unwrap();
    }
}
