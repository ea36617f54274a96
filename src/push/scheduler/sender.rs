//! The sender: takes due wake-ups from the database (any node's: the rows
//! are leased, so nodes never take one at once, and one whose node died
//! comes due again), sends them concurrently within bounds, and applies
//! each provider's answer.
//!
//! **Bounds.** At most [`MAX_SENDS`] sends on this node, at most
//! [`PER_PROVIDER`] to one provider, and `SEALPOST_PUSH_HOST_CONCURRENCY`
//! requests in flight to one endpoint host (a Web Push service; APNs and
//! FCM are one host each) with as many again waiting for their turn. A
//! wake-up whose provider or host has no room even to wait is put back a
//! second later: a hanging host holds at most twice its share of the
//! node's sends, never all of them, so every other host's wake-ups go on.
//! Each request is bounded by the provider's timeout
//! (`SEALPOST_PUSH_TIMEOUT`), so a wait is at most about one timeout: well
//! inside the lease. The slots are given back as soon as the provider has
//! answered, before the outcome is written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::memo::Memo;
use super::{Parts, Timing, backoff};
use crate::metrics::WakeupOutcome;
use crate::push::provider::{Outcome, Urgency};
use crate::push::target::{Kind, Target};
use crate::store::push::{DueWakeup, WakeupUpdate};

use super::outcomes::Outcomes;

/// Tries after the first before a wake-up is given up: 1, 2, 4, 8 and 16
/// s after the failures before them, some half a minute in all.
pub const MAX_RETRIES: u32 = 5;

/// Requests in flight on this node. A request is a few kilobytes of
/// state; a few hundred in flight send thousands of wake-ups a second to
/// services answering in tens of milliseconds.
pub const MAX_SENDS: usize = 256;

/// Of those, to one provider: half, so that a provider that hangs (every
/// request taking the whole timeout) leaves the other half to the others.
pub const PER_PROVIDER: usize = MAX_SENDS / 2;

/// Rows taken in one query.
const TAKE_BATCH: usize = 64;

/// How often the database is asked for due wake-ups when nothing rang:
/// those due later (retries, the delay after a close) and other nodes'
/// whose lease ran out. A query a second per node.
const POLL: Duration = Duration::from_secs(1);

/// How soon a wake-up whose provider or host had no room is tried again.
const DEFER: Duration = Duration::from_secs(1);

/// The longest `Retry-After` honoured: a service asking for more is asked
/// again then.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How often the targets gauge is refreshed.
const COUNT_EVERY: Duration = Duration::from_secs(60);

/// How long after a target changes the gauge is counted again: the changes
/// of a burst of registrations make one count.
const RECOUNT_AFTER: Duration = Duration::from_secs(1);

pub(super) struct Sender {
    inner: Arc<Inner>,
}

struct Inner {
    parts: Arc<Parts>,
    timing: Timing,
    memo: Arc<Mutex<Memo>>,
    /// Rung when a wake-up is due now (and when a send ends, freeing room).
    due: Arc<Notify>,
    /// Rung when a target was set or removed ([`super::Scheduler::targets_changed`]).
    recount: Arc<Notify>,
    /// Where each try's outcome is written, behind the sends.
    outcomes: Outcomes,
    global: Arc<Semaphore>,
    /// Indexed by [`kind_index`].
    providers: [Arc<Semaphore>; 3],
    /// The endpoint hosts sent to now; a host leaves the map with its last
    /// send, so it holds at most [`MAX_SENDS`] entries.
    hosts: Mutex<HashMap<String, Host>>,
}

/// One endpoint host's share.
struct Host {
    /// Requests in flight: `Timing::per_host` permits.
    slots: Arc<Semaphore>,
    /// Sends holding or waiting for a permit: at most twice the permits.
    users: usize,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::WebPush => 0,
        Kind::Apns => 1,
        Kind::Fcm => 2,
    }
}

/// The host a request for `target` goes to, for its share.
fn host_of(target: &Target) -> String {
    match target {
        Target::WebPush { endpoint, .. } => endpoint
            .parse::<axum::http::Uri>()
            .ok()
            .and_then(|uri| uri.authority().map(|a| a.as_str().to_ascii_lowercase()))
            .unwrap_or_default(),
        Target::Apns { environment, .. } => format!("apns {environment:?}"),
        Target::Fcm { .. } => "fcm".into(),
    }
}

/// A send's place in its host's share (in flight or waiting).
struct HostSlot<'a> {
    inner: &'a Inner,
    host: String,
    slots: Arc<Semaphore>,
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        let mut hosts = self
            .inner
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = hosts.get_mut(&self.host) {
            entry.users -= 1;
            if entry.users == 0 {
                hosts.remove(&self.host);
            }
        }
    }
}

impl Sender {
    pub fn new(
        parts: Arc<Parts>,
        timing: Timing,
        memo: Arc<Mutex<Memo>>,
        due: Arc<Notify>,
        recount: Arc<Notify>,
        outcomes: Outcomes,
    ) -> Self {
        let provider = || Arc::new(Semaphore::new(PER_PROVIDER));
        Self {
            inner: Arc::new(Inner {
                parts,
                timing,
                memo,
                due,
                recount,
                outcomes,
                global: Arc::new(Semaphore::new(MAX_SENDS)),
                providers: [provider(), provider(), provider()],
                hosts: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Until `stop`: takes what is due whenever rung, and every [`POLL`].
    /// At `stop` the requests in flight are abandoned: their rows are
    /// leased, and come due again (here after a restart, or on another
    /// node) once the lease passes.
    pub async fn run(self, stop: CancellationToken) {
        let mut sends = JoinSet::new();
        let mut count = tokio::time::interval(COUNT_EVERY);
        count.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When a change asked for a count sooner than the next tick.
        let mut recount: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.inner.due.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                () = self.inner.recount.notified(), if recount.is_none() => {
                    recount = Some(tokio::time::Instant::now() + RECOUNT_AFTER);
                    continue;
                }
                () = tokio::time::sleep_until(recount.unwrap_or_else(tokio::time::Instant::now)), if recount.is_some() => {
                    recount = None;
                    self.inner.count_targets().await;
                    continue;
                }
                _ = count.tick() => {
                    self.inner.count_targets().await;
                    continue;
                }
            }
            while sends.try_join_next().is_some() {}
            self.take(&mut sends).await;
        }
        sends.shutdown().await;
    }

    /// Takes due rows while there is room, and starts a send for each.
    async fn take(&self, sends: &mut JoinSet<()>) {
        let inner = &self.inner;
        loop {
            let free = inner.global.available_permits().min(TAKE_BATCH);
            if free == 0 {
                return;
            }
            let now = inner.parts.clock.now();
            let rows = match inner
                .parts
                .store
                .take_due(now, free as u32, inner.timing.lease())
                .await
            {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot take due wake-ups");
                    return;
                }
            };
            let taken = rows.len();
            for row in rows {
                // Only this loop takes permits, and `free` were there.
                let Ok(permit) = inner.global.clone().try_acquire_owned() else {
                    break;
                };
                let inner = inner.clone();
                sends.spawn(async move { inner.send(row, permit).await });
            }
            if taken < free {
                return;
            }
        }
    }
}

impl Inner {
    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        self.memo.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A place in `host`'s share, or `None` if as many sends as it has
    /// permits are already waiting.
    fn host_slot(&self, host: String) -> Option<HostSlot<'_>> {
        let per_host = self.timing.per_host;
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = hosts.entry(host.clone()).or_insert_with(|| Host {
            slots: Arc::new(Semaphore::new(per_host)),
            users: 0,
        });
        if entry.users >= 2 * per_host {
            return None;
        }
        entry.users += 1;
        let slots = entry.slots.clone();
        Some(HostSlot {
            inner: self,
            host,
            slots,
        })
    }

    async fn count_targets(&self) {
        let metrics = &self.parts.metrics;
        if !metrics.enabled() {
            return;
        }
        match self.parts.store.count_targets().await {
            Ok(counts) => metrics.push.set_targets(&counts),
            Err(err) => tracing::debug!(error = %err, "cannot count push targets"),
        }
    }

    /// Sends one taken wake-up and applies the answer.
    async fn send(self: Arc<Self>, row: DueWakeup, _permit: OwnedSemaphorePermit) {
        let parts = &self.parts;
        let (user, device, kind) = (row.user, row.device, row.target.kind);
        let key = (user, device);
        let _rung = RingOnDrop(&self.due);
        if parts.presence.present(user, device).await {
            // It came back: nothing to wake.
            self.memo().forget(key);
            self.outcomes
                .record(user, device, WakeupUpdate::Cancelled)
                .await;
            return;
        }
        let Some(provider) = parts.providers.get(kind).cloned() else {
            // Its provider was configured when it was scheduled, and is not
            // now.
            self.abandon(&row).await;
            return;
        };
        let Some(target) = parts.opener.open(user, device, &row.target) else {
            // Why was logged by the opener, without the content.
            parts.metrics.push.wakeup(kind, WakeupOutcome::Failed);
            self.abandon(&row).await;
            return;
        };
        let host = host_of(&target);
        let provider_slot = self.providers[kind_index(kind)].clone().try_acquire_owned();
        let host_slot = self.host_slot(host);
        let (Ok(provider_slot), Some(host_slot)) = (provider_slot, host_slot) else {
            let at = parts.clock.now() + delta(DEFER);
            let attempts = row.attempts;
            self.outcomes
                .record(user, device, WakeupUpdate::Retry { at, attempts })
                .await;
            return;
        };
        let urgency = if row.urgent {
            Urgency::High
        } else {
            Urgency::Low
        };
        // The provider bounds its own requests; this only guards against one
        // that would not.
        let limit = self.timing.push_timeout + Duration::from_secs(5);
        let outcome = {
            // Never closed, so this waits only for the host's turn.
            let _in_flight = host_slot.slots.acquire().await;
            tokio::time::timeout(limit, provider.wake(&target, urgency))
                .await
                .unwrap_or_else(|_| Outcome::Transient("timed out".into()))
        };
        // The next send to this provider and host need not wait for the
        // outcome's write.
        drop((host_slot, provider_slot, target));
        if let Some(since) = self.memo().take_since(key) {
            let took = SystemTime::now().duration_since(since).unwrap_or_default();
            parts.metrics.push.latency.record(took);
        }
        self.apply(&row, outcome).await;
    }

    async fn apply(&self, row: &DueWakeup, outcome: Outcome) {
        let parts = &self.parts;
        let (user, device, kind) = (row.user, row.device, row.target.kind);
        let key = (user, device);
        let now = parts.clock.now();
        let update = match outcome {
            Outcome::Sent => {
                parts.metrics.push.wakeup(kind, WakeupOutcome::Sent);
                let until = tokio::time::Instant::now() + self.timing.memo_ttl(row.urgent);
                self.memo().cool(key, row.urgent, until);
                WakeupUpdate::Sent {
                    urgent: row.urgent,
                    at: now,
                }
            }
            Outcome::Gone => {
                match parts
                    .store
                    .drop_target(user, device, row.target.updated_at)
                    .await
                {
                    Ok(true) => {
                        parts.metrics.push.wakeup(kind, WakeupOutcome::Gone);
                        parts.targets.changed(user);
                        self.recount.notify_one();
                        self.memo().forget(key);
                        WakeupUpdate::Abandoned
                    }
                    // Registered again since this one was taken: the new
                    // target is kept, and woken in its place.
                    Ok(false) => {
                        parts.metrics.push.wakeup(kind, WakeupOutcome::Retried);
                        WakeupUpdate::Retry {
                            at: now,
                            attempts: row.attempts + 1,
                        }
                    }
                    Err(err) => {
                        // The row stays leased, and the target is tried
                        // again (and found gone again) after the lease.
                        tracing::warn!(user.id = %user, device, error = %err, "cannot drop a gone push target");
                        return;
                    }
                }
            }
            Outcome::Throttled(after) => {
                self.retry(row, now, after.map(|a| a.min(MAX_RETRY_AFTER)))
            }
            Outcome::Transient(why) => {
                tracing::debug!(user.id = %user, device, kind = kind.as_str(), why, "a wake-up failed; retrying");
                self.retry(row, now, None)
            }
            Outcome::Config(why) => {
                tracing::warn!(
                    kind = kind.as_str(),
                    why,
                    "the push service refused a wake-up as misconfigured (our key, topic or project?); wake-up given up, target kept"
                );
                parts.metrics.push.wakeup(kind, WakeupOutcome::ConfigError);
                self.memo().forget(key);
                WakeupUpdate::Abandoned
            }
        };
        self.outcomes.record(user, device, update).await;
    }

    /// Another try `after` (or the backoff), or the wake-up is given up.
    fn retry(
        &self,
        row: &DueWakeup,
        now: chrono::DateTime<chrono::Utc>,
        after: Option<Duration>,
    ) -> WakeupUpdate {
        let (user, device, kind) = (row.user, row.device, row.target.kind);
        let failures = row.attempts + 1;
        match backoff(failures) {
            Some(wait) => {
                self.parts.metrics.push.wakeup(kind, WakeupOutcome::Retried);
                WakeupUpdate::Retry {
                    at: now + delta(after.unwrap_or(wait)),
                    attempts: failures,
                }
            }
            None => {
                self.parts.metrics.push.wakeup(kind, WakeupOutcome::Failed);
                tracing::info!(user.id = %user, device, kind = kind.as_str(), failures, "a wake-up failed every try; given up");
                self.memo().forget((user, device));
                WakeupUpdate::Abandoned
            }
        }
    }

    async fn abandon(&self, row: &DueWakeup) {
        self.memo().forget((row.user, row.device));
        self.outcomes
            .record(row.user, row.device, WakeupUpdate::Abandoned)
            .await;
    }
}

fn delta(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

/// Rings the sender when a send ends: there is room again.
struct RingOnDrop<'a>(&'a Notify);

impl Drop for RingOnDrop<'_> {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}
