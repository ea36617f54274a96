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
use crate::push::target::Kind;
use crate::store::DeviceId;
use crate::store::push::{Scheduled, WakeupUpdate, Wanted};

/// Dirty devices looked at at once: each may wait on the targets cache
/// (at most [`READS`] of them on the database) and a presence request to
/// the other nodes (a quarter of a second when nobody answers in time).
/// 32 keeps a round of thousands short when the broker is slow.
const CONCURRENCY: usize = 32;

/// Devices whose writes share one transaction. On SQLite a transaction
/// holds the one write connection that sends also commit on, so this also
/// bounds how long a send waits behind the scheduler: 64 devices are 64 to
/// 200 small indexed statements, a millisecond or two (256 measurably
/// lengthened the sends' tail during a burst of wake-ups).
const WRITE_BATCH: usize = 64;

/// Target look-ups at once. Most are answered by the cache, but the first
/// for an account reads the database, from the pool that sends use too (4
/// connections on a 2-core machine by default): a round of thousands of
/// new devices takes at most two of them, so that sends are not queued
/// behind the scheduler's reads.
pub(super) const READS: usize = 2;

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
    /// [`READS`] permits for the target look-ups of a round.
    pub reads: tokio::sync::Semaphore,
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

    /// Looks at every device of one round, [`CONCURRENCY`] at a time, and
    /// writes what they need, [`WRITE_BATCH`] devices per transaction.
    ///
    /// A batch's looks all finish before its write begins. A look that was
    /// left unpolled while the write ran (a stream of looks feeding the
    /// writes as they are ready) would keep the pool connection of its
    /// query; on PostgreSQL, where looks and writes share one pool, a
    /// round's 32 looks could then hold every connection the write and the
    /// sends wait for. The wake-up benchmark found exactly that: sends
    /// stalled, on PostgreSQL only.
    pub(super) async fn round(&self, marks: HashMap<(Uuid, DeviceId), Mark>) {
        let mut marks = marks.into_iter().peekable();
        while marks.peek().is_some() {
            let batch: Vec<_> = marks.by_ref().take(WRITE_BATCH).collect();
            let steps: Vec<Step> = futures_util::stream::iter(batch)
                .map(|((user, device), mark)| self.look(user, device, mark))
                .buffer_unordered(CONCURRENCY)
                .filter_map(std::future::ready)
                .collect()
                .await;
            self.write(steps).await;
        }
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What one dirty device needs written, if anything: the reads (its
    /// target, the memo, presence), none of the writes.
    async fn look(&self, user: Uuid, device: DeviceId, mark: Mark) -> Option<Step> {
        let parts = &self.parts;
        if mark.showed_up {
            self.memo().forget((user, device));
        }
        let live = {
            // Never closed.
            let _reading = self.reads.acquire().await;
            parts.targets.live(user, device).await
        };
        let kind = match live {
            Ok(Some(kind)) if parts.providers.get(kind).is_some() => kind,
            Ok(_) => return None,
            Err(err) => {
                tracing::warn!(user.id = %user, device, error = %err, "cannot read push targets; no wake-up considered");
                return None;
            }
        };
        let step = |wanted| {
            Some(Step {
                user,
                device,
                kind,
                mark,
                wanted,
            })
        };
        if !mark.committed && !mark.closed {
            return if mark.showed_up { step(None) } else { None };
        }
        if mark.committed
            && !mark.closed
            && self
                .memo()
                .covers((user, device), mark.urgent, Instant::now())
        {
            parts.metrics.push.coalesced(kind, mark.messages);
            return if mark.showed_up { step(None) } else { None };
        }
        // Not asked for a close: the closing socket marks its device before
        // it leaves the hub, and the other nodes stop counting it later
        // still (its presence subscription ends after that), so presence
        // could find that very socket and the wake-up would be lost. The
        // sender asks again when it is due, after the delay.
        if !mark.closed && parts.presence.present(user, device).await {
            return if mark.showed_up { step(None) } else { None };
        }
        let clock = parts.clock.now();
        // A commit wakes at once; a close alone after its delay.
        let due = if mark.committed {
            clock
        } else {
            clock + chrono::TimeDelta::from_std(self.timing.after_close).unwrap_or_default()
        };
        step(Some(Wanted {
            user,
            device,
            due,
            urgent: mark.urgent || mark.closed,
        }))
    }

    /// Writes a batch of steps: the cancels of devices that showed up, then
    /// the schedules (so that a device that showed up and was sent a message
    /// since is scheduled from a clean row).
    async fn write(&self, steps: Vec<Step>) {
        let parts = &self.parts;
        let cancels: Vec<_> = steps
            .iter()
            .filter(|s| s.mark.showed_up)
            .map(|s| (s.user, s.device, WakeupUpdate::Cancelled))
            .collect();
        if !cancels.is_empty()
            && let Err(err) = parts.store.update_wakeups(&cancels).await
        {
            tracing::warn!(devices = cancels.len(), error = %err, "cannot cancel pending wake-ups");
        }
        let steps: Vec<_> = steps.into_iter().filter(|s| s.wanted.is_some()).collect();
        if steps.is_empty() {
            return;
        }
        let wanted: Vec<Wanted> = steps.iter().filter_map(|s| s.wanted).collect();
        let clock = parts.clock.now();
        let done = match parts
            .store
            .schedule_many(&wanted, clock, self.timing.rules())
            .await
        {
            Ok(done) => done,
            Err(err) => {
                // Their messages stay queued; each device learns of them
                // when it next connects or is woken for a later one.
                tracing::warn!(devices = wanted.len(), error = %err, "cannot schedule wake-ups");
                return;
            }
        };
        let now = Instant::now();
        let mut rang = false;
        for (step, outcome) in steps.iter().zip(done) {
            let (key, mark) = ((step.user, step.device), step.mark);
            // Every message of the mark is covered by one wake-up: the one
            // scheduled now (which the first of them accounts for) or one
            // pending or cooling already.
            let covered = match outcome {
                Scheduled::Pending => mark.messages.saturating_sub(1),
                Scheduled::Coalesced => mark.messages,
                Scheduled::NoTarget => continue,
            };
            parts.metrics.push.coalesced(step.kind, covered);
            if mark.committed {
                let urgent = step.wanted.is_some_and(|w| w.urgent);
                let until = now + self.timing.memo_ttl(urgent);
                self.memo().set(key, urgent, until, mark.since);
                rang |= outcome == Scheduled::Pending;
            }
        }
        if rang {
            self.due.notify_one();
        }
    }
}

/// What one dirty device needs written.
struct Step {
    user: Uuid,
    device: DeviceId,
    kind: Kind,
    mark: Mark,
    /// The wake-up to schedule, if one is wanted.
    wanted: Option<Wanted>,
}
