//! The sender's writes, behind it: what became of each wake-up it tried
//! (sent, to be retried, given up; cancelled because its device came back)
//! is queued here and written in batches, one transaction each, by one
//! task. On SQLite every wake-up's outcome would otherwise be one more
//! transaction on the single write connection that sends commit on, and a
//! burst of wake-ups would queue the sends behind them.
//!
//! Nothing waits on these writes: a row being tried is leased, so no node
//! takes it again before its outcome is written, and if the write fails or
//! the process dies first, the lease runs out and the wake-up is tried
//! again (a wake-up is sent at least once, never lost). The updates of one
//! device are written in the order they were queued.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::store::DeviceId;
use crate::store::push::{PushStore, WakeupUpdate};

/// Updates queued and not yet written. The sender has at most 256 tries in
/// flight, each queueing one update (and the writer takes them 64 at a
/// time), so this only fills when the database
/// stalls; the sender then waits for room, and takes nothing new.
const QUEUED: usize = 1024;

/// Updates written in one transaction: one statement each, so on SQLite a
/// send waits at most about a millisecond behind a batch.
const BATCH: usize = 64;

/// Where the sender queues its outcomes.
#[derive(Clone)]
pub(super) struct Outcomes {
    queue: mpsc::Sender<(Uuid, DeviceId, WakeupUpdate)>,
}

impl Outcomes {
    /// The queue, and its writer: it ends once every clone of the queue is
    /// dropped and what was queued is written.
    pub fn spawn(store: Arc<dyn PushStore>) -> (Self, JoinHandle<()>) {
        let (queue, mut queued) = mpsc::channel(QUEUED);
        let writer = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            while queued.recv_many(&mut batch, BATCH).await > 0 {
                if let Err(err) = store.update_wakeups(&batch).await {
                    // Their rows stay leased, and are tried again after it.
                    tracing::warn!(updates = batch.len(), error = %err, "cannot record wake-ups' outcomes");
                }
                batch.clear();
            }
        });
        (Self { queue }, writer)
    }

    pub async fn record(&self, user: Uuid, device: DeviceId, update: WakeupUpdate) {
        // Closed only once the scheduler is stopping and its writer gone:
        // the row's lease brings the wake-up back.
        let _ = self.queue.send((user, device, update)).await;
    }
}
