//! [`PushStore`]: devices' push targets and their pending wake-ups.
//!
//! **Targets** (`push_targets`): one row per device with a target. The
//! target is sealed above this layer (like a queued message's body); the
//! store keeps the kind in the clear for listings and counts. `updated_at`
//! is the target's version: it strictly grows with every replacement, so a
//! provider's "gone" removes a target only if it is the one that wake-up
//! was sent to ([`PushStore::drop_target`]). A dropped target leaves its
//! row with no target and `dropped` set, so that the device learns of it
//! (its `ready` frame) until it registers again or deletes it. Rows go with
//! their device and account (`ON DELETE CASCADE`).
//!
//! **Wake-ups** (`wakeups`): at most one row per device, written
//! insert-if-absent, so any node may schedule and any node may send, and a
//! wake-up due when a process dies is sent after a restart. A row is
//! *pending* (`due_at` set: to be sent then), or *cooling* (`due_at` unset:
//! one was sent at `sent_at`, and none is scheduled again until the
//! cool-down passes or the device shows up). Taking due rows leases them
//! (`due_at` moves a lease ahead), so a process that dies while sending
//! leaves them due again once the lease passes; PostgreSQL takes them `FOR
//! UPDATE SKIP LOCKED`, so nodes never take the same row at once.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::queue::KeyId;
use super::{DeviceId, StoreResult, add};
use crate::push::target::Kind;

/// A device's target as stored.
#[derive(Debug, Clone)]
pub struct StoredTarget {
    pub kind: Kind,
    /// The sealed JSON of [`crate::push::target::Target`].
    pub sealed: Vec<u8>,
    /// Its version: set by [`PushStore::set_target`], strictly growing
    /// per device.
    pub updated_at: DateTime<Utc>,
}

/// A device's push state, for listings and the `ready` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSummary {
    pub device: DeviceId,
    /// `None` when the provider dropped it.
    pub kind: Option<Kind>,
    pub updated_at: DateTime<Utc>,
    /// The provider dropped the target; cleared by the next
    /// [`PushStore::set_target`] (or removed with
    /// [`PushStore::delete_target`]).
    pub dropped: bool,
}

/// The rules a schedule is checked against (`SEALPOST_WAKEUP_COOLDOWN`,
/// `SEALPOST_WAKEUP_QUIET_INTERVAL`).
#[derive(Debug, Clone, Copy)]
pub struct Coalescing {
    /// After a wake-up is sent, none again until this has passed (or the
    /// device shows up).
    pub cooldown: Duration,
    /// Non-urgent wake-ups: at most one per this interval per device.
    pub quiet: Duration,
}

/// What [`PushStore::schedule_many`] did for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// A wake-up is now pending (a new row, or a cooling one made pending).
    Pending,
    /// One was already pending (an urgent schedule upgrades it to urgent and
    /// moves it no later than `due`), or the device is cooling down, or a
    /// non-urgent one was sent within the quiet interval: nothing new.
    Coalesced,
    /// The device has no live target: nothing to do.
    NoTarget,
}

/// A wake-up wanted for a device, due at `due` (see
/// [`PushStore::schedule_many`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub user: Uuid,
    pub device: DeviceId,
    pub due: DateTime<Utc>,
    pub urgent: bool,
}

/// What becomes of a device's wake-up row after a try, or when the device
/// shows up (see [`PushStore::update_wakeups`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeupUpdate {
    /// Sent at `at`: the row cools from then (and, when not urgent, starts
    /// the quiet interval).
    Sent { urgent: bool, at: DateTime<Utc> },
    /// A try failed (or could not be made): another at `at`, the
    /// `attempts`-th failure so far.
    Retry { at: DateTime<Utc>, attempts: u32 },
    /// Nothing more is to be sent (given up, or the target was dropped):
    /// neither pending nor cooling.
    Abandoned,
    /// The device showed up (connected, polled, acked): its pending wake-up
    /// and its cool-down are cancelled (the quiet interval stays). A row
    /// with nothing to cancel is not written.
    Cancelled,
}

/// A pending wake-up taken by [`PushStore::take_due`], with what is needed
/// to send it.
#[derive(Debug, Clone)]
pub struct DueWakeup {
    pub user: Uuid,
    pub device: DeviceId,
    pub urgent: bool,
    /// Tries already made and failed (0 for the first).
    pub attempts: u32,
    pub target: StoredTarget,
}

#[async_trait]
pub trait PushStore: Send + Sync {
    /// Replaces the device's target (clearing `dropped`) and returns its
    /// new version: `now`, or a millisecond past the previous version if
    /// that is not earlier. `Ok(None)` if the device does not exist.
    async fn set_target(
        &self,
        user: Uuid,
        device: DeviceId,
        kind: Kind,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>>;

    /// Removes the device's target row (and its wake-up); whether there
    /// was one.
    async fn delete_target(&self, user: Uuid, device: DeviceId) -> StoreResult<bool>;

    /// The provider said the target is gone: clears it and sets `dropped`,
    /// only if its version is still `version`; whether it did.
    async fn drop_target(
        &self,
        user: Uuid,
        device: DeviceId,
        version: DateTime<Utc>,
    ) -> StoreResult<bool>;

    /// The account's devices that have a target row, ascending.
    async fn target_summaries(&self, user: Uuid) -> StoreResult<Vec<TargetSummary>>;

    /// Live targets by kind, for the metrics gauge.
    async fn count_targets(&self) -> StoreResult<Vec<(Kind, u64)>>;

    /// Schedules wake-ups, in one transaction: for each device with a
    /// live target, insert-if-absent, else coalesced by the rules (see
    /// [`Scheduled`]); one answer per `wanted`, in order. `now` decides
    /// whether a cool-down or quiet interval has passed. Backends take the
    /// rows in (user, device) order, so that two nodes' batches cannot
    /// deadlock.
    async fn schedule_many(
        &self,
        wanted: &[Wanted],
        now: DateTime<Utc>,
        rules: Coalescing,
    ) -> StoreResult<Vec<Scheduled>>;

    /// Takes up to `limit` pending wake-ups due at `now` (oldest first)
    /// whose device has a live target, and leases them: their `due_at`
    /// becomes `now + lease`.
    async fn take_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<DueWakeup>>;

    /// Applies `updates` in one transaction; those of one device in the
    /// order given.
    async fn update_wakeups(&self, updates: &[(Uuid, DeviceId, WakeupUpdate)]) -> StoreResult<()>;

    /// Up to `limit` live targets after `after` in (user, device) order
    /// whose sealing is not under the key `current` (the first two bytes of
    /// a sealed target are its key id), for the sweeper to seal again.
    async fn stale_targets(
        &self,
        current: KeyId,
        after: (Uuid, DeviceId),
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, DeviceId, Vec<u8>)>>;

    /// Replaces the device's sealed target by `resealed` if it is still
    /// `sealed` (not replaced, deleted or dropped since it was read); its
    /// version stays, as it is the same target. Whether it did.
    async fn reseal_target(
        &self,
        user: Uuid,
        device: DeviceId,
        sealed: &[u8],
        resealed: &[u8],
    ) -> StoreResult<bool>;

    /// [`PushStore::schedule_many`] for one device.
    async fn schedule(
        &self,
        user: Uuid,
        device: DeviceId,
        due: DateTime<Utc>,
        urgent: bool,
        now: DateTime<Utc>,
        rules: Coalescing,
    ) -> StoreResult<Scheduled> {
        let wanted = Wanted {
            user,
            device,
            due,
            urgent,
        };
        let mut done = self.schedule_many(&[wanted], now, rules).await?;
        Ok(done.pop().unwrap_or(Scheduled::NoTarget))
    }

    /// [`WakeupUpdate::Sent`] for one device.
    async fn wakeup_sent(
        &self,
        user: Uuid,
        device: DeviceId,
        urgent: bool,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let sent = WakeupUpdate::Sent { urgent, at: now };
        self.update_wakeups(&[(user, device, sent)]).await
    }

    /// [`WakeupUpdate::Retry`] for one device.
    async fn wakeup_retry(
        &self,
        user: Uuid,
        device: DeviceId,
        at: DateTime<Utc>,
        attempts: u32,
    ) -> StoreResult<()> {
        let retry = WakeupUpdate::Retry { at, attempts };
        self.update_wakeups(&[(user, device, retry)]).await
    }

    /// [`WakeupUpdate::Abandoned`] for one device.
    async fn wakeup_abandoned(&self, user: Uuid, device: DeviceId) -> StoreResult<()> {
        self.update_wakeups(&[(user, device, WakeupUpdate::Abandoned)])
            .await
    }

    /// [`WakeupUpdate::Cancelled`] for one device.
    async fn cancel_wakeups(&self, user: Uuid, device: DeviceId) -> StoreResult<()> {
        self.update_wakeups(&[(user, device, WakeupUpdate::Cancelled)])
            .await
    }
}

/// `items`' indices in (user, device) order, stable: the order in which a
/// backend takes their rows' locks.
pub(super) fn lock_order<T>(items: &[T], key: impl Fn(&T) -> (Uuid, DeviceId)) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| key(&items[i]));
    order
}

/// A backend's column value read back as the store's type: a device id
/// (PostgreSQL `integer`, SQLite `INTEGER`), a time (PostgreSQL
/// `timestamptz`, SQLite milliseconds). Each backend implements it for
/// its own column types, so that the rows below map to the store's types
/// once, for both.
pub(super) trait Column<T> {
    fn read(self) -> T;
}

impl Column<DateTime<Utc>> for DateTime<Utc> {
    fn read(self) -> DateTime<Utc> {
        self
    }
}

/// A push target row's kind as read back: `None` for a dropped target, and
/// for a kind this build does not know (a later release's), which is then
/// treated as no target.
fn push_kind(kind: Option<String>) -> Option<Kind> {
    kind.as_deref().and_then(Kind::parse)
}

/// A `push_targets` row as [`PushStore::target_summaries`] reads it:
/// `device_id, kind, updated_at, dropped`.
pub(super) type TargetSummaryRow<D, T> = (D, Option<String>, T, bool);

impl<D: Column<DeviceId>, T: Column<DateTime<Utc>>> From<TargetSummaryRow<D, T>> for TargetSummary {
    fn from((device, kind, updated_at, dropped): TargetSummaryRow<D, T>) -> Self {
        Self {
            device: device.read(),
            kind: push_kind(kind),
            updated_at: updated_at.read(),
            dropped,
        }
    }
}

/// A row of [`PushStore::count_targets`]: `kind, count(*)`; `None` for a
/// kind this build does not know.
pub(super) fn kind_count((kind, n): (String, i64)) -> Option<(Kind, u64)> {
    Some((Kind::parse(&kind)?, n.max(0) as u64))
}

/// A wake-up joined with its target as [`PushStore::take_due`] reads it:
/// `w.user_id, w.device_id, w.urgent, w.attempts, t.kind, t.target,
/// t.updated_at`.
pub(super) type DueRow<D, N, T> = (Uuid, D, bool, N, String, Vec<u8>, T);

/// A due row whose target is of a kind this build does not know (a later
/// release's): it stays leased, and is taken again by a node that knows
/// it.
#[derive(Debug)]
pub struct UnknownKind;

impl<D, N, T> TryFrom<DueRow<D, N, T>> for DueWakeup
where
    D: Column<DeviceId>,
    N: Into<i64>,
    T: Column<DateTime<Utc>>,
{
    type Error = UnknownKind;

    fn try_from(
        (user, device, urgent, attempts, kind, sealed, updated_at): DueRow<D, N, T>,
    ) -> Result<Self, UnknownKind> {
        Ok(Self {
            user,
            device: device.read(),
            urgent,
            attempts: attempts.into().max(0) as u32,
            target: StoredTarget {
                kind: Kind::parse(&kind).ok_or(UnknownKind)?,
                sealed,
                updated_at: updated_at.read(),
            },
        })
    }
}

/// A wake-up row's times as [`PushStore::schedule_many`] reads them: `due_at,
/// sent_at, quiet_sent_at`.
pub(super) type TimesRow<T> = (Option<T>, Option<T>, Option<T>);

impl<T: Column<DateTime<Utc>>> From<TimesRow<T>> for WakeupRow {
    fn from((due_at, sent_at, quiet_sent_at): TimesRow<T>) -> Self {
        Self {
            due_at: due_at.map(T::read),
            sent_at: sent_at.map(T::read),
            quiet_sent_at: quiet_sent_at.map(T::read),
        }
    }
}

/// A wake-up row as [`PushStore::schedule_many`] reads it, to [`decide`] on.
#[derive(Debug, Clone, Copy)]
pub(super) struct WakeupRow {
    pub due_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub quiet_sent_at: Option<DateTime<Utc>>,
}

/// What a schedule does to the device's wake-up row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Decision {
    /// No row: insert a pending one.
    Insert,
    /// An idle row (nothing pending, the cool-down over): make it pending.
    Revive,
    /// Pending already, and this one is urgent: make it urgent, due no
    /// later than this one.
    Upgrade,
    /// Nothing to write.
    Coalesce,
}

/// The coalescing rules, once for both backends: each reads the row (under
/// its lock) and writes what this decides.
pub(super) fn decide(
    row: Option<&WakeupRow>,
    urgent: bool,
    now: DateTime<Utc>,
    rules: Coalescing,
) -> Decision {
    let Some(row) = row else {
        return Decision::Insert;
    };
    if row.due_at.is_some() {
        return if urgent {
            Decision::Upgrade
        } else {
            Decision::Coalesce
        };
    }
    let within = |at: Option<DateTime<Utc>>, interval: Duration| {
        at.is_some_and(|at| add(at, interval) > now)
    };
    if !urgent && within(row.quiet_sent_at, rules.quiet) {
        return Decision::Coalesce;
    }
    if within(row.sent_at, rules.cooldown) {
        return Decision::Coalesce;
    }
    Decision::Revive
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    const RULES: Coalescing = Coalescing {
        cooldown: Duration::from_secs(30),
        quiet: Duration::from_secs(1200),
    };

    fn row(
        due: Option<i64>,
        sent: Option<i64>,
        quiet: Option<i64>,
        now: DateTime<Utc>,
    ) -> WakeupRow {
        let ago = |s: i64| now - TimeDelta::seconds(s);
        WakeupRow {
            due_at: due.map(ago),
            sent_at: sent.map(ago),
            quiet_sent_at: quiet.map(ago),
        }
    }

    #[test]
    fn the_rules() {
        let now = crate::store::now();
        let d = |r: Option<WakeupRow>, urgent| decide(r.as_ref(), urgent, now, RULES);
        assert_eq!(d(None, true), Decision::Insert);
        assert_eq!(d(None, false), Decision::Insert);
        // Pending: an urgent one upgrades it, a non-urgent one adds nothing.
        assert_eq!(
            d(Some(row(Some(1), None, None, now)), true),
            Decision::Upgrade
        );
        assert_eq!(
            d(Some(row(Some(1), None, None, now)), false),
            Decision::Coalesce
        );
        // Cooling, then cooled.
        assert_eq!(
            d(Some(row(None, Some(10), None, now)), true),
            Decision::Coalesce
        );
        assert_eq!(
            d(Some(row(None, Some(31), None, now)), true),
            Decision::Revive
        );
        // The quiet interval holds back non-urgent ones only.
        let quiet = Some(row(None, Some(600), Some(600), now));
        assert_eq!(d(quiet, false), Decision::Coalesce);
        assert_eq!(d(quiet, true), Decision::Revive);
        assert_eq!(
            d(Some(row(None, Some(1300), Some(1300), now)), false),
            Decision::Revive
        );
        // Idle (cancelled or abandoned).
        assert_eq!(d(Some(row(None, None, None, now)), false), Decision::Revive);
    }
}
