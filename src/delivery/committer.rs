//! The committer: one task that owns the queue's write side.
//!
//! Every accepted message, every ack that must delete a written row, and
//! every barrier goes through one channel to this task, which writes what
//! is ready as one transaction ([`Queue::write_batch`]) and then answers
//! each caller.
//!
//! **Batches grow with the load.** A batch takes every op that is ready,
//! bounded by rows and bytes, and the row bound follows the database: it is
//! what the last full commits wrote in [`COMMIT_BUDGET`] (between
//! [`MIN_BATCH_ROWS`] and [`MAX_BATCH_ROWS`]). While one batch commits the
//! next gathers, so an idle server commits each message at once and a busy
//! one amortises a commit (and its fsync) over thousands of rows, each
//! commit staying short enough that the `sent` of the first message in it
//! does not wait behind an unbounded transaction.
//!
//! **Acks before writes cost nothing** (but a send's `client_id`, which is
//! written all the same: see [`super::idempotency`]). Every copy is entered in
//! [`Pending`] before it is pushed, and an ack that finds its copy there
//! cancels it in memory (see [`super::pending`]): never written, never
//! deleted. A copy whose device is online here is *held* for the ack window
//! (`SEALPOST_ACK_WINDOW`) before it is written, so that an ack racing
//! the round trip usually wins; only what is not acked in time is written.
//! An ack of a written copy is a delete, batched with the others as
//! multi-row statements.
//!
//! **Order.** Ops are written in arrival order, and the delivery core
//! enqueues inserts in id order under its lock, so copies commit in id
//! order: a held insert holds back the ops behind it (for at most the
//! window), which is what keeps "a push not in the backlog has a larger id
//! than everything in it" true for every device. A barrier passes once
//! every insert enqueued before it, and every delete of its own device, is
//! written, cancelled or failed ([`pass_barriers`]): what a barrier
//! guards is which messages a backlog read finds, and acks of other
//! devices do not change that. So a socket connecting behind a backlog of
//! other devices' acks (a drain, a reconnect storm) reads its queue at
//! once instead of after all of them are written.
//!
//! **Admission.** Ops wait for room in a budget of [`MAX_OPS`] ops and
//! [`BYTE_BUDGET`] body bytes, held until each is settled. The budget is
//! large: a send is pushed as it is accepted, and a lagging database slows
//! the sender's `sent`, not the recipient's push, until the budget is full
//! and accepting waits too (the alternative is unbounded memory).
//!
//! **Deadlines.** Each caller brings its deadline (`SEALPOST_DB_TIMEOUT`
//! after its request began): admission waits until then at most, and so
//! does a barrier. The wait for a write is bounded by the caller (see
//! [`super::Delivery`]); the write itself by the store's deadline
//! ([`crate::store::deadline`]), so a stalled database fails a batch, and
//! the batches behind it, each within that time.
//!
//! Once a batch is written, the committer tells its post-commit
//! listeners ([`super::listeners`]) of the copies it inserted, one message
//! at a time in commit order, before it answers anyone. The broker is one
//! (when there are other nodes): other nodes hear of a message only after
//! it is durable, and in this node's id order ([`crate::cluster`]). The
//! wake-up scheduler is another. No listener makes it wait. A copy pushed
//! to another node's socket is therefore always written: elision is
//! node-local, for the recipients connected to the node that accepted the
//! message.
//!
//! The committer seals each batch ([`KeyRing::seal_all`]) just before writing
//! it: about a microsecond per message, spent here rather than under the
//! delivery core's lock, and never on a copy whose insert was cancelled.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::idempotency::Keyed;
use super::listeners::{CommitListener, Committed};
use super::pending::{Admitted, CommitFailed, Insert, NotStored, Pending};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::seal::KeyRing;
use crate::store::{
    Ack, DeviceId, Message, Queue, SealedKey, SenderTag, SentKey, StoreError, StoredRow,
};

/// Ops admitted and not yet settled. Past it, accepting waits: a database
/// that lags for seconds under a heavy load fills it (65,536 messages is
/// three seconds at 20,000 a second), and an op is a few hundred bytes
/// besides its body.
const MAX_OPS: usize = 65_536;

/// Message bytes admitted but not yet written. Counting ops alone would let
/// 65,536 maximal bodies (4 GiB) wait in memory; past this budget senders
/// wait like they do for an op. 64 MiB is hundreds of batches of typical
/// chat envelopes.
const BYTE_BUDGET: usize = 64 * 1024 * 1024;

/// What one commit aims to take: long enough to amortise its fixed cost
/// (the fsync, the round trips), short enough that the first `sent` of a
/// batch and a connecting socket's barrier do not wait long behind it.
const COMMIT_BUDGET: Duration = Duration::from_millis(20);

/// The row bound of a batch never shrinks below this (a cold start, a
/// slow commit) nor grows past that: a transaction of 16k rows holds its
/// locks for tens of milliseconds at most.
const MIN_BATCH_ROWS: usize = 512;
const MAX_BATCH_ROWS: usize = 16_384;

/// Body bytes in one batch: 16 MiB is 256 maximal bodies, or thousands of
/// chat envelopes.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

enum Op {
    Insert {
        insert: Arc<Insert>,
        /// Not written before this: the end of its ack window, or its
        /// enqueueing.
        due: Instant,
    },
    Delete {
        recipient: Uuid,
        device: DeviceId,
        ids: Vec<Uuid>,
        done: oneshot::Sender<Result<Vec<Settled>, CommitFailed>>,
        _admitted: OwnedSemaphorePermit,
    },
    /// Completes once every insert enqueued before it has been written,
    /// and every delete of `scope`'s device (all of them: `None`).
    Barrier {
        scope: Option<(Uuid, DeviceId)>,
        done: oneshot::Sender<()>,
        _admitted: OwnedSemaphorePermit,
    },
}

impl Op {
    /// The end of its ack window, if it is an insert still waiting for
    /// acks: not once the committer is closing, nor once every copy is
    /// acked (there is nothing left to write).
    fn held_until(&self, open: bool) -> Option<Instant> {
        match self {
            Op::Insert { insert, due } if open && *due > Instant::now() && !insert.settled() => {
                Some(*due)
            }
            _ => None,
        }
    }

    /// Rows and body bytes it adds to a batch.
    fn weight(&self) -> (usize, usize) {
        match self {
            Op::Insert { insert, .. } => (
                insert.copies.len() + usize::from(insert.key.is_some()),
                super::body_bytes(&insert.copies),
            ),
            Op::Delete { ids, .. } => (ids.len(), 0),
            Op::Barrier { .. } => (0, 0),
        }
    }
}

/// One copy an ack settled: deleted from its device's queue, or its insert
/// cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub id: Uuid,
    /// Who sent it, when known: a deleted row that does not open (a storage
    /// key gone) is settled all the same, but its sender cannot be told.
    pub sender: Option<(Uuid, DeviceId)>,
    /// The copy's sender tag and stored bytes, that the queue caps give
    /// back ([`crate::limits::queue`]); no tag for a row written before
    /// tags.
    pub tag: Option<SenderTag>,
    pub bytes: u64,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Seal(crate::seal::SealError),
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
    tx: mpsc::UnboundedSender<Op>,
    ops: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    pending: Arc<Pending>,
    /// How long a copy pushed to an online device waits for its ack.
    window: Duration,
    metrics: Arc<Metrics>,
    /// Tags the copies an ack cancels, as the store tags those it writes.
    keys: Arc<KeyRing>,
}

/// Room reserved in the committer's budget: what is done with it cannot
/// wait, so it can happen under a lock.
pub struct Slot<'a> {
    committer: &'a Committer,
    op: OwnedSemaphorePermit,
    bytes: OwnedSemaphorePermit,
    /// The caller's deadline, which bounds its barrier.
    expires: Instant,
}

/// A message whose copies are in [`Pending`], to be pushed and then
/// enqueued with [`Staged::enqueue`].
pub struct Staged<'a> {
    committer: &'a Committer,
    insert: Arc<Insert>,
    result: oneshot::Receiver<Result<(), NotStored>>,
}

/// Why an enqueued message was not stored, and the devices whose copies
/// were not written: `None` when the committer is gone and cannot tell
/// (take it as all of them).
#[derive(Debug)]
pub struct Unstored {
    pub error: Error,
    pub devices: Option<Vec<(Uuid, DeviceId)>>,
}

impl<'a> Slot<'a> {
    /// Enters the copies of one message in [`Pending`], where an ack can
    /// find them from now on. Push them next, then enqueue. The client's
    /// `key` for the send, if any, is written with them; `urgent` is told
    /// to the listeners once they are written.
    pub fn stage(
        self,
        messages: Vec<Arc<Message>>,
        accepted: SystemTime,
        urgent: bool,
        key: Option<Keyed>,
    ) -> Staged<'a> {
        let admitted = Admitted {
            _op: self.op,
            _bytes: self.bytes,
        };
        let (insert, result) = Insert::new(messages, accepted, urgent, key, admitted);
        self.committer.pending.add(&insert);
        Staged {
            committer: self.committer,
            insert,
            result,
        }
    }

    /// Enqueues a barrier: the returned future completes once every insert
    /// enqueued before it has been written (or has failed), and every
    /// delete of `scope`'s device; `None`: every delete. Fails with 503 if
    /// that has not happened by the slot's deadline.
    pub fn barrier(
        self,
        scope: Option<(Uuid, DeviceId)>,
    ) -> impl Future<Output = Result<()>> + Send + 'static {
        let (done, result) = oneshot::channel();
        let _ = self.committer.tx.send(Op::Barrier {
            scope,
            done,
            _admitted: self.op,
        });
        let expires = self.expires;
        async move {
            match tokio::time::timeout_at(expires, result).await {
                Ok(Ok(())) => Ok(()),
                _ => Err(Error::Unavailable),
            }
        }
    }
}

impl Staged<'_> {
    /// Hands the message to the committer: `held` (pushed to a socket of a
    /// recipient device here) waits out the ack window first. The returned
    /// future completes once every copy is durable: written, or acked
    /// before it was; or fails naming the devices whose copies were not
    /// written.
    pub fn enqueue(
        self,
        held: bool,
    ) -> impl Future<Output = std::result::Result<(), Unstored>> + Send + 'static {
        let now = Instant::now();
        let due = if held {
            now + self.committer.window
        } else {
            now
        };
        let _ = self.committer.tx.send(Op::Insert {
            insert: self.insert,
            due,
        });
        let result = self.result;
        async move {
            match result.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(NotStored { failed, devices })) => Err(Unstored {
                    error: failed.into(),
                    devices: Some(devices),
                }),
                Err(_) => Err(Unstored {
                    error: Error::Unavailable,
                    devices: None,
                }),
            }
        }
    }
}

impl Committer {
    /// Starts the committer task. It ends once every handle is dropped and
    /// everything enqueued is written (held copies at once), so nothing
    /// accepted is abandoned on shutdown. With `senders` off, acks do not
    /// open the rows they delete to learn their senders (delivery receipts
    /// are off). `listeners` are told of every message written, in this
    /// order ([`super::listeners::with_broker`] makes the usual list).
    /// `window` is the ack window of held copies.
    pub fn spawn(
        queue: Arc<dyn Queue>,
        keys: Arc<KeyRing>,
        metrics: Arc<Metrics>,
        senders: bool,
        listeners: Vec<Arc<dyn CommitListener>>,
        window: Duration,
    ) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Pending::default());
        let writer = Writer {
            queue,
            keys: keys.clone(),
            metrics: metrics.clone(),
            senders,
            listeners,
            pending: pending.clone(),
        };
        let task = tokio::spawn(run(writer, rx));
        let committer = Self {
            tx,
            ops: Arc::new(Semaphore::new(MAX_OPS)),
            bytes: Arc::new(Semaphore::new(BYTE_BUDGET)),
            pending,
            window,
            metrics,
            keys,
        };
        (committer, task)
    }

    /// Waits for room for an op carrying `bytes` of message body:
    /// backpressure when the database lags far behind, 503 when there is
    /// none by `expires` (the database has stopped, or is far too slow).
    pub async fn reserve(&self, bytes: usize, expires: Instant) -> Result<Slot<'_>> {
        let admit = async {
            let weight = u32::try_from(bytes.min(BYTE_BUDGET)).unwrap_or(u32::MAX);
            let bytes = self.bytes.clone().acquire_many_owned(weight).await.ok()?;
            let op = self.ops.clone().acquire_owned().await.ok()?;
            Some(Slot {
                committer: self,
                op,
                bytes,
                expires,
            })
        };
        match tokio::time::timeout_at(expires, admit).await {
            Ok(Some(slot)) => Ok(slot),
            _ => Err(Error::Unavailable),
        }
    }

    /// Settles those of `ids` that are queued for `recipient`'s `device`:
    /// cancels the copies not written yet (at once, before the returned
    /// future is polled), deletes the others; the future returns the
    /// copies it settled, each id once. Admission for the deletes waits
    /// until `expires` at most; the delete itself, once admitted, is
    /// awaited however long its batch takes (the store bounds that), so the
    /// future can finish in the background after its caller gave up.
    pub fn ack(
        &self,
        recipient: Uuid,
        device: DeviceId,
        mut ids: Vec<Uuid>,
        expires: Instant,
    ) -> impl Future<Output = Result<Vec<Settled>>> + Send + 'static {
        let mut settled = Vec::new();
        ids.retain(|&id| match self.pending.cancel((recipient, device, id)) {
            Some(copy) => {
                settled.push(Settled {
                    id,
                    sender: copy.receipts.then_some((copy.sender, copy.sender_device)),
                    tag: Some(self.keys.sender_tag(copy.sender, recipient)),
                    bytes: crate::seal::stored_bytes(&copy),
                });
                false
            }
            None => true,
        });
        self.metrics.copies_elided.increment(settled.len() as u64);
        // Named twice in one ack: the second is no longer pending, and is
        // not written either.
        ids.retain(|id| !settled.iter().any(|s| s.id == *id));
        let (ops, tx) = (self.ops.clone(), self.tx.clone());
        async move {
            if ids.is_empty() {
                return Ok(settled);
            }
            let admitted = match tokio::time::timeout_at(expires, ops.acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                _ => return Err(Error::Unavailable),
            };
            let (done, result) = oneshot::channel();
            let op = Op::Delete {
                recipient,
                device,
                ids,
                done,
                _admitted: admitted,
            };
            tx.send(op).map_err(|_| Error::Unavailable)?;
            // Not held while waiting: the committer stops once every
            // handle is gone.
            drop(tx);
            settled.extend(result.await.map_err(|_| Error::Unavailable)??);
            Ok(settled)
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
    /// Told of every message written: the other nodes, wake-ups.
    listeners: Vec<Arc<dyn CommitListener>>,
    /// Where the copies of each insert are claimed before they are written.
    pending: Arc<Pending>,
}

/// The row bound of the next batch, from what the last full ones achieved.
struct Budget {
    rows: usize,
}

impl Budget {
    fn new() -> Self {
        Self {
            rows: MIN_BATCH_ROWS,
        }
    }

    /// A batch of `rows` took `took`: batches well below the bound say
    /// more about a commit's fixed cost than about the database's rate,
    /// and are not counted.
    fn observe(&mut self, rows: usize, took: Duration) {
        if rows < self.rows / 2 || took.is_zero() {
            return;
        }
        let fits = rows as f64 * COMMIT_BUDGET.as_secs_f64() / took.as_secs_f64();
        // Halfway towards what fits: one slow commit (a checkpoint, a
        // vacuum) does not halve the next batch.
        let next = (self.rows as f64 + fits) / 2.0;
        self.rows = (next as usize).clamp(MIN_BATCH_ROWS, MAX_BATCH_ROWS);
    }
}

async fn run(writer: Writer, mut rx: mpsc::UnboundedReceiver<Op>) {
    let mut waiting: VecDeque<Op> = VecDeque::new();
    let mut budget = Budget::new();
    // Until every handle is gone; then held copies are written at once.
    let mut open = true;
    loop {
        loop {
            match rx.try_recv() {
                Ok(op) => waiting.push_back(op),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        pass_barriers(&mut waiting);
        let Some(head) = waiting.front() else {
            if !open {
                break;
            }
            match rx.recv().await {
                Some(op) => waiting.push_back(op),
                None => open = false,
            }
            continue;
        };
        if let Some(due) = head.held_until(open) {
            // The ack window of the oldest op: what arrives meanwhile
            // queues behind it, unless acks settle it first.
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = writer.pending.wholly_settled() => {}
                op = rx.recv() => match op {
                    Some(op) => waiting.push_back(op),
                    None => open = false,
                },
            }
            continue;
        }
        let batch = take(&mut waiting, budget.rows, open);
        let started = Instant::now();
        let rows = writer.commit(batch).await;
        budget.observe(rows, started.elapsed());
    }
    tracing::debug!("committer drained and stopped");
}

/// Answers, and takes out of `waiting`, each barrier with no insert before
/// it and no delete of its own device: nothing it waits for is left. Only
/// the run of ops before the first insert can hold one; everything before
/// `waiting` is written already (the committer writes one batch at a
/// time).
fn pass_barriers(waiting: &mut VecDeque<Op>) {
    let run = waiting
        .iter()
        .position(|op| matches!(op, Op::Insert { .. }))
        .unwrap_or(waiting.len());
    if !waiting
        .iter()
        .take(run)
        .any(|op| matches!(op, Op::Barrier { .. }))
    {
        return;
    }
    let mut deleting: HashSet<(Uuid, DeviceId)> = HashSet::new();
    let mut kept = Vec::with_capacity(run);
    for op in waiting.drain(..run) {
        match op {
            Op::Delete {
                recipient, device, ..
            } => {
                deleting.insert((recipient, device));
                kept.push(op);
            }
            Op::Barrier { scope, done, .. }
                if scope.map_or(deleting.is_empty(), |s| !deleting.contains(&s)) =>
            {
                let _ = done.send(());
            }
            op => kept.push(op),
        }
    }
    for op in kept.into_iter().rev() {
        waiting.push_front(op);
    }
}

/// The ops at the head of `waiting` that are due (all of them once the
/// committer is closing), within the row bound and [`MAX_BATCH_BYTES`];
/// always at least one.
fn take(waiting: &mut VecDeque<Op>, max_rows: usize, open: bool) -> Vec<Op> {
    let (mut rows, mut bytes) = (0, 0);
    let mut batch = Vec::new();
    while let Some(op) = waiting.front() {
        if op.held_until(open).is_some() {
            break;
        }
        let (r, b) = op.weight();
        if !batch.is_empty() && (rows + r > max_rows || bytes + b > MAX_BATCH_BYTES) {
            break;
        }
        rows += r;
        bytes += b;
        batch.extend(waiting.pop_front());
    }
    batch
}

impl Writer {
    /// Writes one batch and answers its callers; returns the rows it
    /// wrote or deleted.
    async fn commit(&self, ops: Vec<Op>) -> usize {
        // The copies each insert still has (not cancelled): claimed for
        // this batch, a contiguous run of `messages` per insert.
        let mut messages: Vec<Arc<Message>> = Vec::new();
        let mut keys: Vec<SentKey> = Vec::new();
        let mut inserts: Vec<(Arc<Insert>, usize, usize)> = Vec::new();
        let mut deletes = Vec::new();
        let mut acks = Vec::new();
        let mut barriers = Vec::new();
        let n_ops = ops.len();
        for op in ops {
            match op {
                Op::Insert { insert, .. } => {
                    let start = messages.len();
                    messages.extend(
                        insert
                            .copies
                            .iter()
                            .filter(|copy| self.pending.claim(copy))
                            .cloned(),
                    );
                    let claimed = messages.len() - start;
                    // A key is written even when every copy was acked:
                    // a retry must still find it.
                    keys.extend(insert.key.clone());
                    if claimed > 0 || insert.key.is_some() {
                        inserts.push((insert, start, claimed));
                    }
                }
                Op::Delete {
                    recipient,
                    device,
                    ids,
                    done,
                    _admitted,
                } => {
                    acks.extend(ids.iter().map(|&id| Ack {
                        recipient,
                        device,
                        id,
                    }));
                    deletes.push((recipient, device, ids, done, _admitted));
                }
                Op::Barrier { done, .. } => barriers.push(done),
            }
        }

        // A batch of barriers (every connecting socket queues one), or of
        // inserts all acked in their window, writes nothing: skip the
        // empty transaction.
        let written = if messages.is_empty() && keys.is_empty() && acks.is_empty() {
            Ok(Vec::new())
        } else {
            self.metrics.db_write_batch.record(n_ops as f64);
            let expires_at = super::idempotency::expires_at(crate::store::now());
            let sealed = self.keys.seal_all(&messages).and_then(|(bodies, rows)| {
                let keys = keys
                    .iter()
                    .map(|key| self.keys.seal_key(key, expires_at))
                    .collect::<Result<Vec<SealedKey>, _>>()?;
                Ok((bodies, rows, keys))
            });
            let written = match sealed {
                Ok((bodies, rows, keys)) => {
                    let started = std::time::Instant::now();
                    let written = self.queue.write_batch(bodies, rows, &keys, &acks).await;
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
                self.metrics.copies_written.increment(messages.len() as u64);
                if !self.listeners.is_empty() {
                    for (insert, start, claimed) in &inserts {
                        let copies = &messages[*start..start + claimed];
                        if copies.is_empty() {
                            continue;
                        }
                        let meta = Committed {
                            accepted: insert.accepted,
                            urgent: insert.urgent,
                        };
                        // Each recipient's copies on their own: a listener
                        // hears of one message for one account at a time.
                        for copies in copies.chunk_by(|a, b| a.recipient == b.recipient) {
                            for listener in &self.listeners {
                                listener.committed(copies, &meta);
                            }
                        }
                    }
                }
                for (insert, _, claimed) in &inserts {
                    insert.settle(claimed + usize::from(insert.key.is_some()));
                }
                self.answer_deletes(deletes, deleted);
            }
            Err(err) => {
                let failed = CommitFailed {
                    unavailable: matches!(&err, Failure::Store(err) if err.is_unavailable()),
                };
                tracing::error!(
                    error = %err,
                    messages = messages.len(),
                    acks = acks.len(),
                    "write batch failed; its callers are told and nothing in it was accepted"
                );
                for (insert, start, claimed) in &inserts {
                    let devices = messages[*start..start + claimed]
                        .iter()
                        .map(|copy| (copy.recipient, copy.device))
                        .collect();
                    insert.fail(failed, devices);
                }
                for (_, _, _, done, _) in deletes {
                    let _ = done.send(Err(failed));
                }
            }
        }
        messages.len() + keys.len() + acks.len()
    }

    /// Tells each delete which of its ids it settled: each deleted row
    /// once, for the first delete that named it.
    fn answer_deletes(&self, deletes: Vec<DeleteReply>, deleted: Vec<StoredRow>) {
        let mut settled: HashMap<(Uuid, DeviceId, Uuid), SettledRow> = deleted
            .into_iter()
            .map(|row| {
                let key = match &row {
                    StoredRow::Sealed(r) => (r.recipient, r.device, r.id),
                    StoredRow::Legacy(m) => (m.recipient, m.device, m.id),
                };
                let charge = (row.sender_tag(), row.stored_bytes());
                let sender = if self.senders {
                    self.keys
                        .open(row)
                        .ok()
                        .filter(|m| m.receipts)
                        .map(|m| (m.sender, m.sender_device))
                } else {
                    None
                };
                (key, (sender, charge))
            })
            .collect();
        for (recipient, device, ids, done, _) in deletes {
            let mine = ids
                .iter()
                .filter_map(|&id| {
                    let (sender, (tag, bytes)) = settled.remove(&(recipient, device, id))?;
                    Some(Settled {
                        id,
                        sender,
                        tag,
                        bytes,
                    })
                })
                .collect();
            let _ = done.send(Ok(mine));
        }
    }
}

/// A deleted row as its delete is told of it: its sender, if known, and
/// its sender tag and stored bytes.
type SettledRow = (Option<(Uuid, DeviceId)>, (Option<SenderTag>, u64));

/// A delete op as the batch keeps it until its rows are known.
type DeleteReply = (
    Uuid,
    DeviceId,
    Vec<Uuid>,
    oneshot::Sender<Result<Vec<Settled>, CommitFailed>>,
    OwnedSemaphorePermit,
);

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cluster::Broker;
    use crate::cluster::local::Recorder;
    use crate::delivery::fake::MemQueue;
    use crate::delivery::listeners::with_broker;
    use futures_util::TryFutureExt;

    const WINDOW: Duration = Duration::from_millis(50);

    /// A deadline no test reaches.
    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn committer(queue: Arc<MemQueue>, broker: Arc<dyn Broker>) -> Committer {
        let keys = Arc::new(KeyRing::generate().unwrap());
        let metrics = Arc::new(Metrics::disabled());
        let listeners = with_broker(&broker, []);
        Committer::spawn(queue, keys, metrics, true, listeners, WINDOW).0
    }

    fn local(queue: Arc<MemQueue>) -> Committer {
        committer(queue, Arc::new(crate::cluster::local::LocalBroker))
    }

    fn copy(id: Uuid, recipient: Uuid, device: DeviceId, sender: Uuid) -> Arc<Message> {
        Arc::new(Message {
            id,
            recipient,
            device,
            sender,
            sender_device: 7,
            body: (b"sealed".to_vec()).into(),
            key: None,
            receipts: true,
            sent_at: crate::store::id_time(id),
        })
    }

    /// Stages and enqueues one message, as the delivery core does.
    async fn insert(
        committer: &Committer,
        copies: Vec<Arc<Message>>,
        held: bool,
    ) -> futures_util::future::BoxFuture<'static, Result<()>> {
        let slot = committer.reserve(6 * copies.len(), soon()).await.unwrap();
        Box::pin(
            slot.stage(copies, SystemTime::now(), true, None)
                .enqueue(held)
                .map_err(|unstored| unstored.error),
        )
    }

    /// Waits for a barrier behind everything enqueued so far.
    async fn everything_before(committer: &Committer) {
        committer
            .reserve(0, soon())
            .await
            .unwrap()
            .barrier(None)
            .await
            .unwrap();
    }

    fn rows(queue: &MemQueue) -> Vec<(Uuid, DeviceId)> {
        let rows = queue.rows.lock().unwrap();
        rows.iter().map(|r| (r.id, r.device)).collect()
    }

    /// A held copy acked within its window is settled in memory: its sender
    /// hears `sent` at once, and nothing is ever written or deleted for it.
    #[tokio::test(start_paused = true)]
    async fn a_copy_acked_in_its_window_is_never_written() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let durable = insert(&committer, vec![copy(id, bob, 1, alice)], true).await;
        let settled = committer.ack(bob, 1, vec![id], soon()).await.unwrap();
        assert_eq!(
            settled,
            [Settled {
                id,
                sender: Some((alice, 7)),
                // Tagged and sized as the store would have it.
                tag: Some(committer.keys.sender_tag(alice, bob)),
                bytes: (b"sealed".len() + crate::seal::SEAL_OVERHEAD) as u64,
            }]
        );
        durable.await.unwrap();
        // Long past the window, and behind a barrier: nothing was written.
        tokio::time::sleep(WINDOW * 4).await;
        everything_before(&committer).await;
        assert!(queue.batches.lock().unwrap().is_empty());
        assert!(committer.pending.len() == 0);
        // Acked again (a client retrying): nothing left to settle.
        assert!(
            committer
                .ack(bob, 1, vec![id], soon())
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A held copy not acked in its window is written when it ends, and an
    /// ack then is a delete that names its sender.
    #[tokio::test(start_paused = true)]
    async fn a_copy_not_acked_in_its_window_is_written_then_deleted() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let started = Instant::now();
        insert(&committer, vec![copy(id, bob, 1, alice)], true)
            .await
            .await
            .unwrap();
        assert!(started.elapsed() >= WINDOW, "{:?}", started.elapsed());
        assert_eq!(rows(&queue), [(id, 1)]);
        let settled = committer.ack(bob, 1, vec![id], soon()).await.unwrap();
        assert_eq!(settled[0].sender, Some((alice, 7)));
        assert!(rows(&queue).is_empty());
        assert_eq!(*queue.batches.lock().unwrap(), [(1, 0), (0, 1)]);
    }

    /// An ack cancels its own device's copy only; the other device's copy
    /// of the same message is written, and the other nodes hear of exactly
    /// what was written, message by message in commit order.
    #[tokio::test(start_paused = true)]
    async fn an_ack_cancels_its_own_copy_only() {
        let queue = Arc::new(MemQueue::default());
        let broker = Arc::new(Recorder::default());
        let committer = committer(queue.clone(), broker.clone());
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let first = insert(
            &committer,
            vec![copy(id, bob, 1, alice), copy(id, bob, 2, alice)],
            true,
        )
        .await;
        let later = Uuid::now_v7();
        let second = insert(&committer, vec![copy(later, bob, 1, alice)], false).await;
        assert_eq!(
            committer.ack(bob, 1, vec![id], soon()).await.unwrap().len(),
            1
        );
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(rows(&queue), [(id, 2), (later, 1)]);
        let published: Vec<(Uuid, Vec<DeviceId>)> = broker
            .pushes
            .lock()
            .unwrap()
            .iter()
            .map(|p| (p.id, p.copies.iter().map(|c| c.device).collect()))
            .collect();
        assert_eq!(published, [(id, vec![2]), (later, vec![1])]);
    }

    /// Every listener hears of each written message, in commit order, with
    /// the send's urgency; a message whose copies were all acked in their
    /// window was not written, and no listener hears of it.
    #[tokio::test(start_paused = true)]
    async fn listeners_hear_of_written_copies_only() {
        #[derive(Default)]
        struct Heard(std::sync::Mutex<Vec<(Uuid, Vec<DeviceId>, bool)>>);
        impl CommitListener for Heard {
            fn committed(&self, copies: &[Arc<Message>], meta: &Committed) {
                let devices = copies.iter().map(|c| c.device).collect();
                self.0
                    .lock()
                    .unwrap()
                    .push((copies[0].id, devices, meta.urgent));
            }
        }
        let queue = Arc::new(MemQueue::default());
        let (first, second) = (Arc::new(Heard::default()), Arc::new(Heard::default()));
        let keys = Arc::new(KeyRing::generate().unwrap());
        let listeners: Vec<Arc<dyn CommitListener>> = vec![first.clone(), second.clone()];
        let (committer, _task) = Committer::spawn(
            queue,
            keys,
            Arc::new(Metrics::disabled()),
            true,
            listeners,
            WINDOW,
        );
        let (bob, alice) = (Uuid::new_v4(), Uuid::new_v4());
        let (acked, quiet, loud) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let held = insert(&committer, vec![copy(acked, bob, 1, alice)], true).await;
        committer.ack(bob, 1, vec![acked], soon()).await.unwrap();
        let slot = committer.reserve(12, soon()).await.unwrap();
        let copies = vec![copy(quiet, bob, 1, alice), copy(quiet, bob, 2, alice)];
        let not_urgent = slot
            .stage(copies, SystemTime::now(), false, None)
            .enqueue(false);
        let urgent = insert(&committer, vec![copy(loud, bob, 2, alice)], false).await;
        held.await.unwrap();
        not_urgent.await.map_err(|u| u.error).unwrap();
        urgent.await.unwrap();
        let want = vec![(quiet, vec![1, 2], false), (loud, vec![2], true)];
        assert_eq!(*first.0.lock().unwrap(), want);
        assert_eq!(*second.0.lock().unwrap(), want);
    }

    /// A held insert holds back what was enqueued behind it, even what is
    /// not held: copies commit in id order.
    #[tokio::test(start_paused = true)]
    async fn a_held_insert_keeps_its_place() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        let (bob, carol, alice) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (held, offline) = (Uuid::now_v7(), Uuid::now_v7());
        let first = insert(&committer, vec![copy(held, bob, 1, alice)], true).await;
        let second = insert(&committer, vec![copy(offline, carol, 1, alice)], false).await;
        second.await.unwrap();
        first.await.unwrap();
        assert_eq!(rows(&queue), [(held, 1), (offline, 1)]);
        assert_eq!(*queue.batches.lock().unwrap(), [(2, 0)]);
    }

    /// A message acked on all its copies stops holding the line: what is
    /// queued behind it does not wait out its window.
    #[tokio::test]
    async fn an_acked_message_does_not_hold_back_the_queue() {
        let queue = Arc::new(MemQueue::default());
        let keys = Arc::new(KeyRing::generate().unwrap());
        let metrics = Arc::new(Metrics::disabled());
        let window = Duration::from_secs(3600);
        let (committer, _task) =
            Committer::spawn(queue.clone(), keys, metrics, true, Vec::new(), window);
        let (bob, carol, alice) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let (held, offline) = (Uuid::now_v7(), Uuid::now_v7());
        let first = insert(&committer, vec![copy(held, bob, 1, alice)], true).await;
        let second = insert(&committer, vec![copy(offline, carol, 1, alice)], false).await;
        // Let the committer start waiting out the first one's window.
        tokio::task::yield_now().await;
        committer.ack(bob, 1, vec![held], soon()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("not held back by an acked message")
            .unwrap();
        first.await.unwrap();
        assert_eq!(rows(&queue), [(offline, 1)]);
    }

    /// Two acks naming one written copy count it once, for the first; an id
    /// queued for another device settles nothing.
    #[tokio::test]
    async fn each_settled_copy_is_counted_once() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        let (bob, alice) = (Uuid::new_v4(), Uuid::new_v4());
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        insert(&committer, vec![copy(first, bob, 1, alice)], false)
            .await
            .await
            .unwrap();
        insert(&committer, vec![copy(second, bob, 2, alice)], false)
            .await
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            committer.ack(bob, 1, vec![first], soon()),
            committer.ack(bob, 1, vec![first, second, first], soon()),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut ids: Vec<Uuid> = a.iter().chain(&b).map(|s| s.id).collect();
        ids.sort();
        // `second` is device 2's, not device 1's.
        assert_eq!(ids, [first]);
        assert_eq!(rows(&queue), [(second, 2)]);
    }

    /// A batch that fails tells every insert and ack, and still lets its
    /// barriers through: whatever was before them is settled, one way or
    /// the other.
    #[tokio::test]
    async fn a_failed_batch_fails_its_callers_and_releases_its_barriers() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        queue.failing.store(true, Ordering::Relaxed);
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let inserted = insert(&committer, vec![copy(id, bob, 1, alice)], false).await;
        let barrier = committer.reserve(0, soon()).await.unwrap().barrier(None);
        let acked = committer.ack(bob, 1, vec![Uuid::now_v7()], soon());
        barrier.await.unwrap();
        assert!(matches!(inserted.await, Err(Error::Unavailable)));
        assert!(matches!(acked.await, Err(Error::Unavailable)));
        assert!(queue.rows.lock().unwrap().is_empty());
    }

    /// A message one of whose copies was acked in its window, and whose
    /// other copy then failed to be written, names only the unwritten
    /// device: the acked one gave its queue room back with its ack, and
    /// must not give it back twice.
    #[tokio::test(start_paused = true)]
    async fn a_failed_write_names_only_the_copies_it_did_not_write() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let slot = committer.reserve(12, soon()).await.unwrap();
        let copies = vec![copy(id, bob, 1, alice), copy(id, bob, 2, alice)];
        let durable = slot
            .stage(copies, SystemTime::now(), true, None)
            .enqueue(true);
        committer.ack(bob, 1, vec![id], soon()).await.unwrap();
        queue.failing.store(true, Ordering::Relaxed);
        let unstored = durable.await.expect_err("the write failed");
        assert!(matches!(unstored.error, Error::Unavailable));
        assert_eq!(
            unstored
                .devices
                .map(|d| d.into_iter().map(|(_, d)| d).collect::<Vec<_>>()),
            Some(vec![2])
        );
        assert!(queue.rows.lock().unwrap().is_empty());
    }

    /// A connecting socket's barrier waits for its own device's acks ahead
    /// of it (or its backlog would carry what it acked), not for other
    /// devices' acks: behind a backlog of those it passes at once.
    #[tokio::test(start_paused = true)]
    async fn a_barrier_waits_for_its_own_devices_acks_only() {
        use futures_util::FutureExt;
        let queue = Arc::new(MemQueue {
            delay: Duration::from_millis(100),
            ..MemQueue::default()
        });
        let committer = Arc::new(local(queue.clone()));
        let (bob, carol, dave) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        // Being written while the rest queue up behind it.
        let first = tokio::spawn({
            let committer = committer.clone();
            async move { committer.ack(bob, 1, vec![Uuid::now_v7()], soon()).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let carols_ack = tokio::spawn({
            let committer = committer.clone();
            async move { committer.ack(carol, 1, vec![Uuid::now_v7()], soon()).await }
        });
        tokio::task::yield_now().await;
        let daves = committer
            .reserve(0, soon())
            .await
            .unwrap()
            .barrier(Some((dave, 1)));
        let carols = committer
            .reserve(0, soon())
            .await
            .unwrap()
            .barrier(Some((carol, 1)));
        let mut carols = Box::pin(carols);
        daves.await.unwrap();
        assert!(first.is_finished(), "the batch before it was written first");
        assert!(
            !carols_ack.is_finished(),
            "dave's barrier waited for carol's ack"
        );
        assert!((&mut carols).now_or_never().is_none());
        carols.await.unwrap();
        assert!(carols_ack.await.unwrap().is_ok());
        assert_eq!(queue.batches.lock().unwrap().len(), 2);
    }

    /// A batch of barriers only writes nothing.
    #[tokio::test]
    async fn barriers_alone_write_nothing() {
        let queue = Arc::new(MemQueue::default());
        let committer = local(queue.clone());
        everything_before(&committer).await;
        assert!(queue.batches.lock().unwrap().is_empty());
    }

    /// A committer whose handles are gone writes its held copies at once
    /// and stops: nothing accepted is abandoned at shutdown.
    #[tokio::test(start_paused = true)]
    async fn held_copies_are_written_at_shutdown() {
        let queue = Arc::new(MemQueue::default());
        let keys = Arc::new(KeyRing::generate().unwrap());
        let metrics = Arc::new(Metrics::disabled());
        let window = Duration::from_secs(1);
        let (committer, task) =
            Committer::spawn(queue.clone(), keys, metrics, true, Vec::new(), window);
        let (bob, alice, id) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::now_v7());
        let durable = insert(&committer, vec![copy(id, bob, 1, alice)], true).await;
        let started = Instant::now();
        drop(committer);
        task.await.unwrap();
        durable.await.unwrap();
        assert!(started.elapsed() < window);
        assert_eq!(rows(&queue), [(id, 1)]);
    }

    /// The row bound follows what full commits achieved, within its limits,
    /// and ignores small batches.
    #[test]
    fn the_batch_bound_follows_the_database() {
        let mut budget = Budget::new();
        // 512 rows in 2 ms: 5,120 fit in 20 ms; halfway there.
        budget.observe(512, Duration::from_millis(2));
        assert_eq!(budget.rows, (512 + 5_120) / 2);
        for _ in 0..20 {
            budget.observe(budget.rows, Duration::from_millis(1));
        }
        assert_eq!(budget.rows, MAX_BATCH_ROWS);
        // A small batch says nothing about the rate.
        budget.observe(10, Duration::from_secs(1));
        assert_eq!(budget.rows, MAX_BATCH_ROWS);
        for _ in 0..20 {
            budget.observe(budget.rows, Duration::from_secs(1));
        }
        assert_eq!(budget.rows, MIN_BATCH_ROWS);
    }
}
