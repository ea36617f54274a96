//! When a device is woken: the post-commit listener, the presence check,
//! the pending wake-ups in the database (one per device, durable, taken by
//! any node), coalescing and cool-downs, retries.
//!
//! Three things tell the scheduler about a device, and none of them waits:
//!
//! - [`Scheduler::committed`]: copies of a stored message were written (a
//!   post-commit listener of the committer). Never an ephemeral send, a
//!   receipt or a `devices_changed` notice (none is committed), nor a copy
//!   acked inside its ack window (never written), nor the sender's own
//!   sending device.
//! - [`Scheduler::showed_up`]: the device connected, polled or acked: its
//!   pending wake-up and cool-down are cancelled.
//! - [`Scheduler::closed`]: a socket closed with copies unacked: a wake-up
//!   after `SEALPOST_WAKEUP_AFTER_CLOSE`, unless the device comes back.
//!
//! Each marks the device *dirty* in a bounded map ([`MAX_DIRTY`]), many
//! messages to one device making one entry, and wakes the [`worker`]. The
//! worker looks at each dirty device off the send path: no live target
//! (the [`TargetDirectory`], cached) or, after a commit, a socket on any
//! node ([`Presence`]: this node's hub, then the broker) means nothing to
//! do (after a close presence is asked when the wake-up is due: the
//! closing socket may still count at first); a wake-up this node knows is
//! pending or cooling ([`memo`]) means nothing to write; otherwise it is
//! written to the database with [`PushStore::schedule`], insert-if-absent,
//! where the rules of cool-down and quiet interval are applied again
//! across nodes.
//!
//! The [`sender`] (one per node) takes due wake-ups from the database under
//! a lease, checks presence again (a device that came back is not woken),
//! opens the sealed target and calls its provider, concurrently within
//! bounds so that one slow provider or endpoint delays no other, and
//! applies the answer: sent (the row cools), gone (the target is dropped if
//! unchanged), throttled or failed (tried again later, a few times), our
//! configuration's fault (logged, counted, given up).
//!
//! Times written to the database come from a [`Clock`]; waits are tokio's,
//! so the unit tests run on a paused clock and never sleep.

mod memo;
mod outcomes;
mod sender;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::provider::Providers;
use super::target::{Kind, Target};
use super::targets::{TargetState, Targets};
use crate::clock::Clock;
use crate::cluster::Broker;
use crate::delivery::listeners::{CommitListener, Committed};
use crate::error::Result;
use crate::hub::Hub;
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::seal::KeyRing;
use crate::store::push::{Coalescing, PushStore, StoredTarget};
use crate::store::{DeviceId, Message};

/// Devices marked and not yet looked at by the worker. The worker takes
/// them all at once, so the map holds what arrives while it works through
/// one round: at 10,000 messages a second to distinct offline devices and
/// rounds of a few hundred milliseconds, a few thousand. 65,536 entries of
/// about 64 bytes are 4 MiB. When it is full (the database has stalled and
/// the worker with it) a new device's mark is dropped and counted
/// (`sealpost_wakeups_dropped_total`): its messages stay queued, and it
/// learns of them when it next connects or is woken for a later one.
pub const MAX_DIRTY: usize = 65_536;

/// Who has a push target, without asking the database on every message:
/// [`NodeTargets`] in production.
#[async_trait]
pub trait TargetDirectory: Send + Sync {
    /// The kind of the device's live target, if it has one (not none, not
    /// dropped).
    async fn live(&self, user: Uuid, device: DeviceId) -> Result<Option<Kind>>;

    /// The account's targets changed here (one was dropped): forget them,
    /// and tell the other nodes.
    fn changed(&self, user: Uuid);
}

/// Whether a device holds a socket anywhere.
#[async_trait]
pub trait Presence: Send + Sync {
    async fn present(&self, user: Uuid, device: DeviceId) -> bool;
}

/// Opens a stored target (sealed at rest, bound to its device).
pub trait OpenTarget: Send + Sync {
    /// `None` when it does not open (a key gone, a row altered).
    fn open(&self, user: Uuid, device: DeviceId, stored: &StoredTarget) -> Option<Target>;
}

/// The storage keys open targets as they sealed them
/// ([`Target::open`], which logs a failure without the content).
impl OpenTarget for KeyRing {
    fn open(&self, user: Uuid, device: DeviceId, stored: &StoredTarget) -> Option<Target> {
        Target::open(self, user, device, stored)
    }
}

/// The node's [`Targets`] cache; a drop is announced to the other nodes.
pub struct NodeTargets {
    pub targets: Arc<Targets>,
    pub broker: Arc<dyn Broker>,
}

#[async_trait]
impl TargetDirectory for NodeTargets {
    async fn live(&self, user: Uuid, device: DeviceId) -> Result<Option<Kind>> {
        Ok(match self.targets.state(user, device).await? {
            TargetState::Live { kind, .. } => Some(kind),
            TargetState::None | TargetState::Dropped => None,
        })
    }

    fn changed(&self, user: Uuid) {
        self.targets.changed_everywhere(user, self.broker.as_ref());
    }
}

/// The node's presence: its own hub first (no network), then the broker
/// (a request that only a node holding a socket of the device answers).
pub struct NodePresence {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
}

#[async_trait]
impl Presence for NodePresence {
    async fn present(&self, user: Uuid, device: DeviceId) -> bool {
        self.hub.has_device(user, device) || self.broker.present(user, device).await
    }
}

/// The timing settings (`SEALPOST_WAKEUP_*`, `SEALPOST_PUSH_TIMEOUT`).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub after_close: Duration,
    pub cooldown: Duration,
    pub quiet: Duration,
    /// The most one provider request takes (`SEALPOST_PUSH_TIMEOUT`).
    pub push_timeout: Duration,
    /// Whether other nodes share the database: then the memo is kept
    /// briefly (see [`Timing::memo_ttl`]).
    pub clustered: bool,
    /// Requests in flight to one endpoint host
    /// (`SEALPOST_PUSH_HOST_CONCURRENCY`; see [`sender`]).
    pub per_host: usize,
}

/// How long a cluster node trusts its memo: a device that shows up on
/// another node cancels its wake-up in the database, which this node does
/// not hear of. For this long after a wake-up, a message committed here
/// may find the memo still saying "cooling" and wake no one; a few seconds
/// bounds that, and still makes a burst one write.
const CLUSTER_MEMO: Duration = Duration::from_secs(5);

impl Timing {
    fn rules(&self) -> Coalescing {
        Coalescing {
            cooldown: self.cooldown,
            quiet: self.quiet,
        }
    }

    /// How long the memo spares the database for a wake-up of this
    /// urgency: its cool-down or quiet interval on one node (every show-up
    /// is seen here and clears it), at most [`CLUSTER_MEMO`] in a cluster.
    fn memo_ttl(&self, urgent: bool) -> Duration {
        let ttl = if urgent { self.cooldown } else { self.quiet };
        if self.clustered {
            ttl.min(CLUSTER_MEMO)
        } else {
            ttl
        }
    }

    /// How long a taken wake-up is leased: its send (at most the provider's
    /// timeout) and the write of its outcome, with room to spare. A node
    /// that dies while sending leaves it due again after this.
    fn lease(&self) -> Duration {
        self.push_timeout * 2 + Duration::from_secs(10)
    }
}

/// What the scheduler works with.
pub struct Parts {
    pub store: Arc<dyn PushStore>,
    pub targets: Arc<dyn TargetDirectory>,
    pub presence: Arc<dyn Presence>,
    pub opener: Arc<dyn OpenTarget>,
    pub providers: Providers,
    pub metrics: Arc<Metrics>,
    pub clock: Arc<dyn Clock>,
}

/// What is known of one dirty device since the worker last looked.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    /// It showed up (connect, poll, ack): cancel what is pending. Anything
    /// marked after it still counts.
    showed_up: bool,
    /// Copies were committed for it: wake it now.
    committed: bool,
    /// How many copies those were: all but the one that wakes it (if one
    /// does) are counted as coalesced.
    messages: u32,
    /// One of those was urgent.
    urgent: bool,
    /// The first of those commits, for the commit-to-answer latency.
    since: Option<SystemTime>,
    /// A socket of it closed with copies unacked: wake it after the delay.
    closed: bool,
}

/// The marks, and the worker's bell.
struct Dirty {
    marks: Mutex<HashMap<(Uuid, DeviceId), Mark>>,
    bell: Notify,
    dropped: Throttle,
}

pub struct Scheduler {
    dirty: Arc<Dirty>,
    /// Whether any provider is configured: otherwise nothing is ever
    /// marked, and no task runs.
    enabled: bool,
    metrics: Arc<Metrics>,
    /// Rung when a target was set or removed: the targets gauge is counted
    /// again soon after.
    recount: Arc<Notify>,
}

/// The scheduler's tasks; they stop on the token they were spawned with.
pub struct Tasks {
    pub worker: JoinHandle<()>,
    pub sender: JoinHandle<()>,
    /// Writes the sender's outcomes; ends after the sender, once what it
    /// queued is written.
    pub writer: JoinHandle<()>,
}

impl Tasks {
    pub async fn join(self) {
        let _ = self.worker.await;
        let _ = self.sender.await;
        let _ = self.writer.await;
    }
}

impl Scheduler {
    /// Starts the worker and the sender, which run until `stop` is
    /// cancelled. With no provider configured, nothing runs and every call
    /// is a no-op.
    pub fn spawn(parts: Parts, timing: Timing, stop: CancellationToken) -> (Arc<Self>, Tasks) {
        let enabled = parts.providers.any();
        let dirty = Arc::new(Dirty {
            marks: Mutex::new(HashMap::new()),
            bell: Notify::new(),
            dropped: Throttle::new(Duration::from_secs(10)),
        });
        let recount = Arc::new(Notify::new());
        let scheduler = Arc::new(Self {
            dirty: dirty.clone(),
            enabled,
            metrics: parts.metrics.clone(),
            recount: recount.clone(),
        });
        if !enabled {
            let idle = || tokio::spawn(async {});
            return (
                scheduler,
                Tasks {
                    worker: idle(),
                    sender: idle(),
                    writer: idle(),
                },
            );
        }
        let parts = Arc::new(parts);
        let memo = Arc::new(Mutex::new(memo::Memo::default()));
        let due = Arc::new(Notify::new());
        let worker = tokio::spawn(
            worker::Worker {
                parts: parts.clone(),
                timing,
                dirty,
                memo: memo.clone(),
                due: due.clone(),
                reads: tokio::sync::Semaphore::new(worker::READS),
            }
            .run(stop.clone()),
        );
        let (outcomes, writer) = outcomes::Outcomes::spawn(parts.store.clone());
        let sender = tokio::spawn(
            sender::Sender::new(parts, timing, memo, due, recount, outcomes).run(stop),
        );
        (
            scheduler,
            Tasks {
                worker,
                sender,
                writer,
            },
        )
    }

    /// A scheduler that does nothing: no provider is configured.
    pub fn off(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            dirty: Arc::new(Dirty {
                marks: Mutex::new(HashMap::new()),
                bell: Notify::new(),
                dropped: Throttle::new(Duration::from_secs(10)),
            }),
            enabled: false,
            metrics,
            recount: Arc::new(Notify::new()),
        })
    }

    /// A device's target was set or removed: the targets gauge
    /// (`sealpost_push_targets`) is counted again within a second or so,
    /// rather than at its next minute.
    pub fn targets_changed(&self) {
        if self.enabled {
            self.recount.notify_one();
        }
    }

    /// Copies of a stored message were written (all for one recipient):
    /// mark each device but the sender's own sending device. Never waits.
    pub fn committed(&self, copies: &[Arc<Message>], urgent: bool) {
        self.mark_committed(copies, urgent, None);
    }

    fn mark_committed(&self, copies: &[Arc<Message>], urgent: bool, since: Option<SystemTime>) {
        if !self.enabled {
            return;
        }
        let mut rang = false;
        for copy in copies {
            if copy.recipient == copy.sender && copy.device == copy.sender_device {
                continue;
            }
            rang |= self.mark(copy.recipient, copy.device, |m| {
                m.committed = true;
                m.messages = m.messages.saturating_add(1);
                m.urgent |= urgent;
                m.since = match (m.since, since) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            });
        }
        if rang {
            self.dirty.bell.notify_one();
        }
    }

    /// The device connected (after authenticating), polled or acked: its
    /// pending wake-up and cool-down are cancelled.
    pub fn showed_up(&self, user: Uuid, device: DeviceId) {
        if self.enabled
            && self.mark(user, device, |m| {
                *m = Mark {
                    showed_up: true,
                    ..Mark::default()
                }
            })
        {
            self.dirty.bell.notify_one();
        }
    }

    /// A socket of the device closed with copies unacked: wake it after
    /// `SEALPOST_WAKEUP_AFTER_CLOSE` unless it comes back.
    pub fn closed(&self, user: Uuid, device: DeviceId) {
        if self.enabled && self.mark(user, device, |m| m.closed = true) {
            self.dirty.bell.notify_one();
        }
    }

    /// Applies `change` to the device's mark; false if the map is full and
    /// the device not in it (dropped and counted).
    fn mark(&self, user: Uuid, device: DeviceId, change: impl FnOnce(&mut Mark)) -> bool {
        let mut marks = self
            .dirty
            .marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let full = marks.len() >= MAX_DIRTY;
        match marks.get_mut(&(user, device)) {
            Some(mark) => change(mark),
            None if full => {
                drop(marks);
                self.metrics.push.dropped.increment(1);
                if let Some(held_back) = self.dirty.dropped.admit() {
                    tracing::warn!(
                        held_back,
                        "wake-up scheduler behind (the database is slow?): a device was not considered for a wake-up"
                    );
                }
                return false;
            }
            None => change(marks.entry((user, device)).or_default()),
        }
        true
    }
}

impl CommitListener for Scheduler {
    fn committed(&self, copies: &[Arc<Message>], meta: &Committed) {
        self.mark_committed(copies, meta.urgent, Some(meta.accepted));
    }
}

/// `2^(n-1)` seconds after the `n`-th failed try (1, 2, 4, 8, 16 s); `None`
/// past [`sender::MAX_RETRIES`]: give up.
pub fn backoff(failures: u32) -> Option<Duration> {
    (1..=sender::MAX_RETRIES)
        .contains(&failures)
        .then(|| Duration::from_secs(1 << (failures - 1)))
}
