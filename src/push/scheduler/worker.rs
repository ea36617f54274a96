//! The worker: looks at the dirty devices, off the send path, and writes
//! the wake-ups that are needed to the database.

use std::collections::HashMap;
use std::mem;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::memo::Memo;
use super::{Dirty, Mark, Parts, Timing};
use crate::store::DeviceId;
use crate::store::push::Scheduled;

/// Dirty devices looked at at once: each may wait on the targets cache, a
/// presence request to the other nodes (a quarter of a second when nobody
/// answers in time) and a write. 32 keeps a round of thousands short
/// without holding more than a few of the pool's connections.
const CONCURRENCY: usize = 32;

/// How long the round at shutdown may take: the server waits for it.
const LAST_ROUND: std::time::Duration = std::time::Duration::from_secs(3);

/// How often the memo's expired entries are dropped.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

pub(super) struct Worker {
    pub parts: Arc<Parts>,
    pub timing: Timing,
    pub dirty: Arc<Dirty>,
    pub memo: Arc<Mutex<Memo>>,
    /// The sender's bell: a wake-up is due now.
    pub due: Arc<Notify>,
}

impl Worker {
    pub async fn run(self, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    // The last commits' devices: scheduled in the database,
                    // where any node (or this one restarted) sends them.
                    let marks = self.take();
                    let _ = tokio::time::timeout(LAST_ROUND, self.round(marks)).await;
                    break;
                }
                () = self.dirty.bell.notified() => {}
                _ = sweep.tick() => {
                    self.memo().sweep(Instant::now());
                    continue;
                }
            }
            let marks = self.take();
            self.round(marks).await;
        }
    }

    fn take(&self) -> HashMap<(Uuid, DeviceId), Mark> {
        mem::take(
            &mut *self
                .dirty
                .marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Looks at every device of one round, [`CONCURRENCY`] at a time.
    pub(super) async fn round(&self, marks: HashMap<(Uuid, DeviceId), Mark>) {
        futures_util::stream::iter(marks)
            .for_each_concurrent(CONCURRENCY, |((user, device), mark)| {
                self.consider(user, device, mark)
            })
            .await;
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn consider(&self, user: Uuid, device: DeviceId, mark: Mark) {
        let parts = &self.parts;
        if mark.showed_up {
            self.memo().forget((user, device));
        }
        let kind = match parts.targets.live(user, device).await {
            Ok(Some(kind)) if parts.providers.get(kind).is_some() => kind,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(user.id = %user, device, error = %err, "cannot read push targets; no wake-up considered");
                return;
            }
        };
        if mark.showed_up
            && let Err(err) = parts.store.cancel_wakeups(user, device).await
        {
            tracing::warn!(user.id = %user, device, error = %err, "cannot cancel a pending wake-up");
        }
        if !mark.committed && !mark.closed {
            return;
        }
        let now = Instant::now();
        if mark.committed && !mark.closed && self.memo().covers((user, device), mark.urgent, now) {
            parts.metrics.push.coalesced(kind, mark.messages);
            return;
        }
        // Not asked for a close: the closing socket marks its device before
        // it leaves the hub, and the other nodes stop counting it later
        // still (its presence subscription ends after that), so presence
        // could find that very socket and the wake-up would be lost. The
        // sender asks again when it is due, after the delay.
        if !mark.closed && parts.presence.present(user, device).await {
            return;
        }
        let clock = parts.clock.now();
        // A commit wakes at once; a close alone after its delay.
        let due = if mark.committed {
            clock
        } else {
            clock + chrono::TimeDelta::from_std(self.timing.after_close).unwrap_or_default()
        };
        let urgent = mark.urgent || mark.closed;
        match parts
            .store
            .schedule(user, device, due, urgent, clock, self.timing.rules())
            .await
        {
            Ok(outcome @ (Scheduled::Pending | Scheduled::Coalesced)) => {
                // Every message of the mark is covered by one wake-up: the
                // one scheduled now (which the first of them accounts for)
                // or one pending or cooling already.
                let covered = match outcome {
                    Scheduled::Pending => mark.messages.saturating_sub(1),
                    _ => mark.messages,
                };
                parts.metrics.push.coalesced(kind, covered);
                if mark.committed {
                    let until = now + self.timing.memo_ttl(urgent);
                    self.memo().set((user, device), urgent, until, mark.since);
                    if outcome == Scheduled::Pending {
                        self.due.notify_one();
                    }
                }
            }
            Ok(Scheduled::NoTarget) => {}
            Err(err) => {
                tracing::warn!(user.id = %user, device, error = %err, "cannot schedule a wake-up");
            }
        }
    }
}
