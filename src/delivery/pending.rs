//! Copies on their way to the store: accepted, maybe pushed, not yet
//! written, and still cancellable by an ack.
//!
//! Every copy of every accepted message is entered here before it is
//! pushed, and leaves exactly once, by one of two doors:
//!
//! - [`Pending::cancel`]: its device acknowledged it before it was written.
//!   It is delivered and settled; it is never written, so no later read of
//!   the queue can return it (elision: no insert, no delete).
//! - [`Pending::claim`]: the committer takes it into a batch it is about to
//!   write. From then on an ack of it is a delete in a later batch, behind
//!   the insert.
//!
//! Whoever removes the entry owns the copy, so an ack and a write can race
//! without a copy being both cancelled and written (a copy acked and then
//! read back from the queue) or neither (a copy lost).
//!
//! A message is durable for its sender once each of its copies is either
//! written or cancelled, and its send key (if it has one, see
//! [`super::idempotency`]) is written: [`Insert::settle`] counts them down
//! and answers the sender at zero, from whichever side settles the last
//! one. A key is never cancelled: only the committer settles it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::sync::{Notify, OwnedSemaphorePermit, oneshot};
use uuid::Uuid;

use super::idempotency::Keyed;
use crate::store::{DeviceId, Message, SentKey};

/// A copy's place: which device of which account, which message.
pub type CopyKey = (Uuid, DeviceId, Uuid);

/// Why a batch was not written; the cause was logged by the committer.
#[derive(Debug, Clone, Copy)]
pub struct CommitFailed {
    pub unavailable: bool,
}

/// A message not stored: why, and which devices' copies were not written
/// (the others were acked before the write, and so were settled).
#[derive(Debug, Clone)]
pub struct NotStored {
    pub failed: CommitFailed,
    /// The copies not written, as (recipient, device).
    pub devices: Vec<(Uuid, DeviceId)>,
}

/// One accepted message on its way to the store: all its copies, and its
/// sender's answer.
pub struct Insert {
    /// Every copy, one per recipient device, in device order.
    pub copies: Vec<Arc<Message>>,
    /// When it was accepted, for the other nodes' push latency.
    pub accepted: SystemTime,
    /// The send's `"urgent"`, for the post-commit listeners (wake-ups).
    pub urgent: bool,
    /// The client's key for the send, written with it.
    pub key: Option<SentKey>,
    /// Copies neither written nor cancelled yet, plus the key until it is
    /// written.
    unsettled: AtomicUsize,
    done: Mutex<Option<Answer>>,
    /// Its share of the committer's admission budget, returned once the
    /// last reference (the committer's, or an entry's) is gone.
    _admitted: Admitted,
}

/// Who hears how an insert ended: its sender, and the sends waiting on its
/// key.
struct Answer {
    sender: oneshot::Sender<Result<(), NotStored>>,
    /// Told the id once the message is durable; dropped (telling them to
    /// retry) if it is not.
    claim: Option<Keyed>,
}

/// The admission an insert holds until it is settled: one op and its body
/// bytes.
pub struct Admitted {
    pub _op: OwnedSemaphorePermit,
    pub _bytes: OwnedSemaphorePermit,
}

impl Insert {
    pub fn new(
        copies: Vec<Arc<Message>>,
        accepted: SystemTime,
        urgent: bool,
        key: Option<Keyed>,
        admitted: Admitted,
    ) -> (Arc<Self>, oneshot::Receiver<Result<(), NotStored>>) {
        let (sender, result) = oneshot::channel();
        let unsettled = copies.len() + usize::from(key.is_some());
        let (record, claim) = match key {
            Some(key) => (Some(key.record.clone()), Some(key)),
            None => (None, None),
        };
        // No copies (envelopes to yourself from your only device) and no
        // key: nothing to write, durable at once.
        let done = if unsettled == 0 {
            let _ = sender.send(Ok(()));
            None
        } else {
            Some(Answer { sender, claim })
        };
        let insert = Arc::new(Self {
            unsettled: AtomicUsize::new(unsettled),
            copies,
            accepted,
            urgent,
            key: record,
            done: Mutex::new(done),
            _admitted: admitted,
        });
        (insert, result)
    }

    /// `n` more copies are durable (written, or cancelled by an ack); at
    /// the last one the sender hears that the message is. Returns whether
    /// that was the last.
    pub fn settle(&self, n: usize) -> bool {
        if n == 0 {
            return false;
        }
        let last = self.unsettled.fetch_sub(n, Ordering::AcqRel) == n;
        if last {
            self.answer(Ok(()));
        }
        last
    }

    /// Whether every copy is settled: acked before any was written, so
    /// there is no reason to wait for its window (only its key, if any, is
    /// left to write).
    pub fn settled(&self) -> bool {
        self.unsettled.load(Ordering::Acquire) == usize::from(self.key.is_some())
    }

    /// The copies claimed for a batch, those of `devices`, were not
    /// written: the sender hears that the message was not accepted (even
    /// if another of its copies was acked: a retry is safe, the refusal of
    /// a stored message is not).
    pub fn fail(&self, failed: CommitFailed, devices: Vec<(Uuid, DeviceId)>) {
        self.answer(Err(NotStored { failed, devices }));
    }

    fn answer(&self, result: Result<(), NotStored>) {
        let done = self
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Answer { sender, claim }) = done {
            if let (Ok(()), Some(claim)) = (&result, claim) {
                claim.sent();
            }
            let _ = sender.send(result);
        }
    }
}

/// The copies accepted and not yet written, by their place.
#[derive(Default)]
pub struct Pending {
    copies: DashMap<CopyKey, Arc<Insert>>,
    /// Woken when an ack settles a whole message: the committer may be
    /// waiting out that message's window with others queued behind it.
    settled: Notify,
}

impl Pending {
    /// Enters every copy of `insert`. Call before it is pushed: an ack can
    /// only name what its device was sent.
    pub fn add(&self, insert: &Arc<Insert>) {
        for copy in &insert.copies {
            self.copies
                .insert((copy.recipient, copy.device, copy.id), insert.clone());
        }
    }

    /// An ack: if the copy is still here, it leaves without being written
    /// and is settled. Returns the copy.
    pub fn cancel(&self, key: CopyKey) -> Option<Arc<Message>> {
        let (_, insert) = self.copies.remove(&key)?;
        let copy = insert
            .copies
            .iter()
            .find(|c| c.recipient == key.0 && c.device == key.1)?
            .clone();
        insert.settle(1);
        if insert.settled() {
            self.settled.notify_one();
        }
        Some(copy)
    }

    /// Completes when an ack has settled a whole message since the last
    /// call (or now, if one did before it).
    pub async fn wholly_settled(&self) {
        self.settled.notified().await;
    }

    /// The committer takes the copy into a batch: true if it is still here
    /// (not cancelled), and now the committer's to write.
    pub fn claim(&self, copy: &Message) -> bool {
        self.copies
            .remove(&(copy.recipient, copy.device, copy.id))
            .is_some()
    }

    /// Copies waiting; for the tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.copies.len()
    }
}
