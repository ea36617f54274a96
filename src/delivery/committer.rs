//! The committer: one task that owns the queue's write side.
//!
//! Every insert and ack, from every connection, goes through one bounded
//! channel to this task, which writes whatever has gathered as one
//! transaction ([`Queue::write_batch`]) and then answers each caller. A batch
//! closes when it is full or when the channel is momentarily empty, so an idle
//! server commits each message at once and a busy one amortises a commit (and
//! its fsync) over hundreds of messages.
//!
//! Callers enqueue inserts in id order (the delivery core takes the id and
//! enqueues under one lock), so batches commit in id order and a reader
//! paging through a recipient's queue by id never sees a later id before an
//! earlier one is visible.
//!
//! One insert op carries every copy of one message (one row per recipient
//! device), so a message's copies commit together or not at all. An ack
//! names one device's copies; one that meets its own copy's insert in the
//! same batch cancels that copy: the row is never written, and it counts as
//! durable because it is already delivered. The device's other copies are
//! written as usual.
//!
//! Each ack learns, for every copy it settled, who sent it (read back from
//! the deleted row, or from the cancelled insert), so that the delivery
//! core can send the sender a receipt.
//!
//! Once a batch is written, the committer hands the copies it inserted to
//! the broker, one message at a time in commit order, before it answers
//! anyone: other nodes hear of a message only after it is durable, and in
//! this node's id order ([`crate::cluster`]). The broker never makes it
//! wait.
//!
//! The committer seals each batch ([`KeyRing::seal_all`]) just before writing
//! it: about a microsecond per message, spent here rather than under the
//! delivery core's lock, and never on a message whose insert was cancelled.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::cluster::{Broker, Push};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::seal::KeyRing;
use crate::store::{Ack, DeviceId, Message, Queue, StoreError};

/// Operations waiting for the committer. When it is full (the database is
/// slower than the arrival rate) senders wait for room: backpressure on the
/// producers instead of unbounded memory. 4096 is a few batches' worth, enough
/// to keep the next batch ready while one commits.
const CHANNEL_BOUND: usize = 4096;

/// Message bytes admitted but not yet written. Counting ops alone would let
/// 4096 maximal bodies (4 GiB) wait in memory; past this budget senders wait
/// like they do for a channel slot. 64 MiB is hundreds of batches of typical
/// chat envelopes.
const BYTE_BUDGET: usize = 64 * 1024 * 1024;

/// How long a sender waits for admission before it is told 503: a database
/// that has stopped answering should not hold requests forever.
const ADMISSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Operations in one transaction. Large enough to amortise a commit over many
/// messages, small enough that one transaction stays short (an ack op carries
/// at most 500 ids, so a batch touches at most ~128k rows).
const MAX_BATCH: usize = 256;

enum Op {
    Insert {
        /// Every copy of one message, one per recipient device.
        messages: Vec<Arc<Message>>,
        /// When it was accepted, for the other nodes' push latency.
        accepted: SystemTime,
        done: oneshot::Sender<Result<(), CommitFailed>>,
        /// Its share of the byte budget, returned when the op is dropped.
        _bytes: OwnedSemaphorePermit,
    },
    Ack {
        recipient: Uuid,
        device: DeviceId,
        ids: Vec<Uuid>,
        done: oneshot::Sender<Result<Vec<Settled>, CommitFailed>>,
    },
    /// Completes once everything enqueued before it has been written.
    Barrier { done: oneshot::Sender<()> },
}

/// One copy an ack settled: deleted from its device's queue, or its insert
/// cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub id: Uuid,
    /// Who sent it, when known: a deleted row that does not open (a storage
    /// key gone) is settled all the same, but its sender cannot be told.
    pub sender: Option<(Uuid, DeviceId)>,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Seal(crate::seal::SealError),
}

/// A batch that could not be written. The cause was logged by the committer.
#[derive(Debug, Clone, Copy)]
struct CommitFailed {
    unavailable: bool,
}

impl From<CommitFailed> for Error {
    fn from(failed: CommitFailed) -> Self {
        if failed.unavailable {
            Error::Unavailable
        } else {
            Error::Internal(anyhow::anyhow!("commit failed"))
        }
    }
}

/// The handle through which callers reach the committer task.
pub struct Committer {
    tx: mpsc::Sender<Op>,
    bytes: Arc<Semaphore>,
}

/// Room reserved in the committer's channel and byte budget: enqueuing
/// through it cannot wait, so it can happen under a lock.
pub struct Slot<'a> {
    permit: mpsc::Permit<'a, Op>,
    bytes: OwnedSemaphorePermit,
}

impl Slot<'_> {
    /// Enqueues the copies of one message. The returned future completes
    /// once all of them are durable: committed, or acked before their
    /// insert was written.
    pub fn insert(
        self,
        messages: Vec<Arc<Message>>,
        accepted: SystemTime,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let (done, result) = oneshot::channel();
        self.permit.send(Op::Insert {
            messages,
            accepted,
            done,
            _bytes: self.bytes,
        });
        async move { Ok(result.await.map_err(|_| Error::Unavailable)??) }
    }

    /// Enqueues a barrier: the returned future completes once every op
    /// enqueued before it has been written (or has failed).
    pub fn barrier(self) -> impl Future<Output = Result<()>> + Send + 'static {
        let (done, result) = oneshot::channel();
        self.permit.send(Op::Barrier { done });
        async move { result.await.map_err(|_| Error::Unavailable) }
    }
}

impl Committer {
    /// Starts the committer task. It ends once every handle is dropped and
    /// the channel is drained, so nothing enqueued is abandoned on shutdown.
    /// With `senders` off, acks do not open the rows they delete to learn
    /// their senders (delivery receipts are off).
    pub fn spawn(
        queue: Arc<dyn Queue>,
        keys: Arc<KeyRing>,
        metrics: Arc<Metrics>,
        senders: bool,
        broker: Arc<dyn Broker>,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(CHANNEL_BOUND);
        let writer = Writer {
            queue,
            keys,
            metrics,
            senders,
            broker,
        };
        let task = tokio::spawn(run(writer, rx));
        let bytes = Arc::new(Semaphore::new(BYTE_BUDGET));
        (Self { tx, bytes }, task)
    }

    /// Waits for room for an op carrying `bytes` of message body:
    /// backpressure when the database lags, 503 when it has stopped.
    pub async fn reserve(&self, bytes: usize) -> Result<Slot<'_>> {
        let admit = async {
            let weight = u32::try_from(bytes.min(BYTE_BUDGET)).unwrap_or(u32::MAX);
            let bytes = self.bytes.clone().acquire_many_owned(weight).await.ok()?;
            let permit = self.tx.reserve().await.ok()?;
            Some(Slot { permit, bytes })
        };
        match tokio::time::timeout(ADMISSION_TIMEOUT, admit).await {
            Ok(Some(slot)) => Ok(slot),
            _ => Err(Error::Unavailable),
        }
    }

    /// Deletes those of `ids` that are queued for `recipient`'s `device`;
    /// returns the copies it settled, each id once.
    pub async fn ack(
        &self,
        recipient: Uuid,
        device: DeviceId,
        ids: Vec<Uuid>,
    ) -> Result<Vec<Settled>> {
        let (done, result) = oneshot::channel();
        let op = Op::Ack {
            recipient,
            device,
            ids,
            done,
        };
        match tokio::time::timeout(ADMISSION_TIMEOUT, self.tx.send(op)).await {
            Ok(Ok(())) => Ok(result.await.map_err(|_| Error::Unavailable)??),
            _ => Err(Error::Unavailable),
        }
    }
}

/// What the committer task writes with.
struct Writer {
    queue: Arc<dyn Queue>,
    keys: Arc<KeyRing>,
    metrics: Arc<Metrics>,
    /// Whether acks learn the senders of what they delete.
    senders: bool,
    /// Told of every message written, for the other nodes.
    broker: Arc<dyn Broker>,
}

async fn run(writer: Writer, mut rx: mpsc::Receiver<Op>) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    // `recv_many` waits for one op, then takes whatever else is ready.
    while rx.recv_many(&mut ops, MAX_BATCH).await > 0 {
        writer.commit(std::mem::take(&mut ops)).await;
    }
    tracing::debug!("committer drained and stopped");
}

/// A copy's place: which device of which account, which message.
type CopyKey = (Uuid, DeviceId, Uuid);

impl Writer {
    async fn commit(&self, ops: Vec<Op>) {
        let mut messages = Vec::new();
        // Where each message's copies start in `messages`, and when it was
        // accepted: for the other nodes, so a node alone keeps none.
        let alone = self.broker.alone();
        let mut starts = Vec::new();
        let mut inserted = Vec::new();
        let mut ack_ops = Vec::new();
        let mut barriers = Vec::new();
        // Byte-budget permits, returned once the batch is written.
        let mut held = Vec::new();
        for op in ops {
            match op {
                Op::Insert {
                    messages: copies,
                    accepted,
                    done,
                    _bytes,
                } => {
                    held.push(_bytes);
                    if !alone {
                        starts.push((messages.len(), accepted));
                    }
                    messages.extend(copies);
                    inserted.push(done);
                }
                Op::Ack {
                    recipient,
                    device,
                    ids,
                    done,
                } => ack_ops.push((recipient, device, ids, done)),
                Op::Barrier { done } => barriers.push(done),
            }
        }

        // An ack for a copy inserted in this same batch cancels the insert.
        let pending: HashMap<CopyKey, (Uuid, DeviceId)> = messages
            .iter()
            .map(|m| ((m.recipient, m.device, m.id), (m.sender, m.sender_device)))
            .collect();
        let mut cancelled = HashMap::new();
        let mut acks = Vec::new();
        for (recipient, device, ids, _) in &ack_ops {
            for &id in ids {
                let key = (*recipient, *device, id);
                match pending.get(&key) {
                    Some(sender) => {
                        cancelled.insert(key, Some(*sender));
                    }
                    None => acks.push(Ack {
                        recipient: *recipient,
                        device: *device,
                        id,
                    }),
                }
            }
        }
        // Grouped by message before the cancelled copies go: the broker
        // gets each message's written copies together.
        let mut grouped: Vec<(Vec<Arc<Message>>, SystemTime)> = Vec::new();
        for (n, &(start, accepted)) in starts.iter().enumerate() {
            let end = starts.get(n + 1).map_or(messages.len(), |&(next, _)| next);
            let written: Vec<Arc<Message>> = messages[start..end]
                .iter()
                .filter(|m| !cancelled.contains_key(&(m.recipient, m.device, m.id)))
                .cloned()
                .collect();
            if !written.is_empty() {
                grouped.push((written, accepted));
            }
        }
        messages.retain(|m| !cancelled.contains_key(&(m.recipient, m.device, m.id)));

        // A batch of barriers (every connecting socket queues one) writes
        // nothing: skip the empty transaction.
        let written = if messages.is_empty() && acks.is_empty() {
            Ok(Vec::new())
        } else {
            self.metrics
                .db_write_batch
                .record((inserted.len() + ack_ops.len()) as f64);
            let written = match self.keys.seal_all(&messages) {
                Ok(rows) => {
                    let started = Instant::now();
                    let written = self.queue.write_batch(rows, &acks).await;
                    self.metrics.db_write.record(started.elapsed());
                    written.map_err(Failure::Store)
                }
                Err(err) => Err(Failure::Seal(err)),
            };
            if written.is_err() {
                self.metrics.db_write_errors.increment(1);
            }
            written
        };
        // Everything before a barrier is in this batch or an earlier one.
        for done in barriers {
            let _ = done.send(());
        }
        match written {
            Ok(deleted) => {
                for (copies, accepted) in grouped {
                    if let Some(push) = Push::of(&copies, accepted, false) {
                        self.broker.committed(push);
                    }
                }
                for done in inserted {
                    let _ = done.send(Ok(()));
                }
                // Each settled copy is counted once, for the first ack that
                // named it.
                let mut settled = cancelled;
                for row in deleted {
                    let key = match &row {
                        crate::store::StoredRow::Sealed(r) => (r.recipient, r.device, r.id),
                        crate::store::StoredRow::Legacy(m) => (m.recipient, m.device, m.id),
                    };
                    let sender = if self.senders {
                        self.keys
                            .open(row)
                            .ok()
                            .map(|m| (m.sender, m.sender_device))
                    } else {
                        None
                    };
                    settled.insert(key, sender);
                }
                for (recipient, device, ids, done) in ack_ops {
                    let mine = ids
                        .iter()
                        .filter_map(|&id| {
                            let sender = settled.remove(&(recipient, device, id))?;
                            Some(Settled { id, sender })
                        })
                        .collect();
                    let _ = done.send(Ok(mine));
                }
            }
            Err(err) => {
                let failed = CommitFailed {
                    unavailable: matches!(err, Failure::Store(StoreError::Unavailable(_))),
                };
                tracing::error!(
                    error = %err,
                    messages = messages.len(),
                    acks = acks.len(),
                    "write batch failed; its callers are told and nothing in it was accepted"
                );
                for done in inserted {
                    let _ = done.send(Err(failed));
                }
                for (_, _, _, done) in ack_ops {
                    let _ = done.send(Err(failed));
                }
            }
        }
        drop(held);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::delivery::fake::MemQueue;

    fn writer(queue: Arc<MemQueue>) -> Writer {
        writer_with(queue, Arc::new(crate::cluster::local::LocalBroker))
    }

    fn writer_with(queue: Arc<MemQueue>, broker: Arc<dyn Broker>) -> Writer {
        Writer {
            queue,
            keys: Arc::new(KeyRing::generate().unwrap()),
            metrics: Arc::new(Metrics::disabled()),
            senders: true,
            broker,
        }
    }

    fn copy(id: Uuid, recipient: Uuid, device: DeviceId, sender: Uuid) -> Arc<Message> {
        Arc::new(Message {
            id,
            recipient,
            device,
            sender,
            sender_device: 7,
            body: b"sealed".to_vec(),
            sent_at: crate::store::id_time(id),
        })
    }

    fn permit() -> OwnedSemaphorePermit {
        Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap()
    }

    fn insert(messages: Vec<Arc<Message>>) -> (Op, oneshot::Receiver<Result<(), CommitFailed>>) {
        let (done, rx) = oneshot::channel();
        let op = Op::Insert {
            messages,
            accepted: SystemTime::now(),
            done,
            _bytes: permit(),
        };
        (op, rx)
    }

    type AckReply = oneshot::Receiver<Result<Vec<Settled>, CommitFailed>>;

    fn ack(recipient: Uuid, device: DeviceId, ids: Vec<Uuid>) -> (Op, AckReply) {
        let (done, rx) = oneshot::channel();
        let op = Op::Ack {
            recipient,
            device,
            ids,
            done,
        };
        (op, rx)
    }

    /// An ack that meets its own copy's insert in one batch cancels that
    /// copy (never written) and names its sender; the other device's copy
    /// of the same message is written.
    #[tokio::test]
    async fn an_ack_cancels_its_pending_copy_only() {
        let queue = Arc::new(MemQueue::default());
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let (insert_op, inserted) = insert(vec![copy(id, bob, 1, alice), copy(id, bob, 2, alice)]);
        let (ack_op, acked) = ack(bob, 1, vec![id]);
        let later = Uuid::now_v7();
        let (later_op, _) = insert(vec![copy(later, bob, 1, alice)]);
        let broker = Arc::new(crate::cluster::local::Recorder::default());
        writer_with(queue.clone(), broker.clone())
            .commit(vec![insert_op, ack_op, later_op])
            .await;
        // The other nodes hear of what was written, message by message in
        // commit order, and not of the cancelled copy.
        let published: Vec<(Uuid, Vec<DeviceId>)> = broker
            .pushes
            .lock()
            .unwrap()
            .iter()
            .map(|p| (p.id, p.copies.iter().map(|c| c.device).collect()))
            .collect();
        assert_eq!(published, [(id, vec![2]), (later, vec![1])]);

        inserted.await.unwrap().unwrap();
        let settled = acked.await.unwrap().unwrap();
        assert_eq!(
            settled,
            [Settled {
                id,
                sender: Some((alice, 7))
            }]
        );
        let rows = queue.rows.lock().unwrap();
        assert_eq!(
            rows.iter().map(|r| (r.id, r.device)).collect::<Vec<_>>(),
            [(id, 2), (later, 1)]
        );
        // The written batch held two rows and no delete.
        assert_eq!(*queue.batches.lock().unwrap(), [(2, 0)]);
    }

    /// Two acks naming one copy in a batch count it once, for the first;
    /// an id queued for another device settles nothing.
    #[tokio::test]
    async fn each_settled_copy_is_counted_once() {
        let queue = Arc::new(MemQueue::default());
        let (bob, alice) = (Uuid::new_v4(), Uuid::new_v4());
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let (op, inserted) = insert(vec![copy(first, bob, 1, alice)]);
        let (op2, inserted2) = insert(vec![copy(second, bob, 2, alice)]);
        let writer = writer(queue.clone());
        writer.commit(vec![op, op2]).await;
        inserted.await.unwrap().unwrap();
        inserted2.await.unwrap().unwrap();

        let (a, a_rx) = ack(bob, 1, vec![first]);
        let (b, b_rx) = ack(bob, 1, vec![first, second]);
        writer.commit(vec![a, b]).await;
        let a = a_rx.await.unwrap().unwrap();
        let b = b_rx.await.unwrap().unwrap();
        assert_eq!(a.iter().map(|s| s.id).collect::<Vec<_>>(), [first]);
        assert_eq!(a[0].sender, Some((alice, 7)));
        // `first` was the first ack's; `second` is device 2's, not device 1's.
        assert!(b.is_empty(), "{b:?}");
        assert_eq!(queue.rows.lock().unwrap().len(), 1);
    }

    /// A batch that fails tells every insert and ack, and still lets its
    /// barriers through: whatever was before them is settled, one way or
    /// the other.
    #[tokio::test]
    async fn a_failed_batch_fails_its_callers_and_releases_its_barriers() {
        let queue = Arc::new(MemQueue::default());
        queue.failing.store(true, Ordering::Relaxed);
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let (insert_op, inserted) = insert(vec![copy(id, bob, 1, alice)]);
        let (ack_op, acked) = ack(bob, 1, vec![Uuid::now_v7()]);
        let (done, barrier) = oneshot::channel();
        writer(queue.clone())
            .commit(vec![insert_op, ack_op, Op::Barrier { done }])
            .await;
        barrier.await.unwrap();
        let err: Error = inserted.await.unwrap().unwrap_err().into();
        assert!(matches!(err, Error::Unavailable));
        assert!(acked.await.unwrap().unwrap_err().unavailable);
        assert!(queue.rows.lock().unwrap().is_empty());
    }

    /// A batch of barriers only writes nothing.
    #[tokio::test]
    async fn barriers_alone_write_nothing() {
        let queue = Arc::new(MemQueue::default());
        let (done, barrier) = oneshot::channel();
        writer(queue.clone())
            .commit(vec![Op::Barrier { done }])
            .await;
        barrier.await.unwrap();
        assert!(queue.batches.lock().unwrap().is_empty());
    }
}
