//! In-memory fakes of the store traits, for unit tests of the parts built on
//! them: they keep the contract each trait documents, in a mutex, with none
//! of a backend's SQL.
//!
//! - [`MemPush`]: [`PushStore`], targets and wake-ups, as
//!   [`super::push`] describes them (insert-if-absent, coalescing by the
//!   rules, leases).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::push::{
    self, Coalescing, Decision, DueWakeup, PushStore, Scheduled, StoredTarget, TargetSummary,
    WakeupUpdate, Wanted, decide,
};
use super::{DeviceId, KeyId, StoreResult, add};
use crate::push::target::Kind;

/// One device's `push_targets` row.
#[derive(Debug, Clone)]
struct TargetRow {
    kind: Option<Kind>,
    sealed: Vec<u8>,
    updated_at: DateTime<Utc>,
    dropped: bool,
}

/// One device's `wakeups` row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WakeupRow {
    pub due_at: Option<DateTime<Utc>>,
    pub urgent: bool,
    pub attempts: u32,
    pub sent_at: Option<DateTime<Utc>>,
    pub quiet_sent_at: Option<DateTime<Utc>>,
}

/// The times the coalescing rules look at.
impl From<&WakeupRow> for push::WakeupRow {
    fn from(row: &WakeupRow) -> Self {
        Self {
            due_at: row.due_at,
            sent_at: row.sent_at,
            quiet_sent_at: row.quiet_sent_at,
        }
    }
}

#[derive(Default)]
struct Tables {
    targets: HashMap<(Uuid, DeviceId), TargetRow>,
    wakeups: HashMap<(Uuid, DeviceId), WakeupRow>,
}

/// [`PushStore`] in memory.
#[derive(Default)]
pub struct MemPush {
    tables: Mutex<Tables>,
}

impl MemPush {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap()
    }

    /// The device's wake-up row, if it has one.
    pub fn wakeup(&self, user: Uuid, device: DeviceId) -> Option<WakeupRow> {
        self.tables().wakeups.get(&(user, device)).cloned()
    }

    /// The device's live target's version, if it has one.
    pub fn live(&self, user: Uuid, device: DeviceId) -> Option<(Kind, DateTime<Utc>)> {
        let tables = self.tables();
        let row = tables.targets.get(&(user, device))?;
        Some((row.kind?, row.updated_at))
    }
}

#[async_trait]
impl PushStore for MemPush {
    async fn set_target(
        &self,
        user: Uuid,
        device: DeviceId,
        kind: Kind,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let mut tables = self.tables();
        let version = match tables.targets.get(&(user, device)) {
            Some(row) if row.updated_at >= now => {
                row.updated_at + chrono::TimeDelta::milliseconds(1)
            }
            _ => now,
        };
        tables.targets.insert(
            (user, device),
            TargetRow {
                kind: Some(kind),
                sealed: sealed.to_vec(),
                updated_at: version,
                dropped: false,
            },
        );
        Ok(Some(version))
    }

    async fn delete_target(&self, user: Uuid, device: DeviceId) -> StoreResult<bool> {
        let mut tables = self.tables();
        tables.wakeups.remove(&(user, device));
        Ok(tables.targets.remove(&(user, device)).is_some())
    }

    async fn drop_target(
        &self,
        user: Uuid,
        device: DeviceId,
        version: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tables = self.tables();
        match tables.targets.get_mut(&(user, device)) {
            Some(row) if row.kind.is_some() && row.updated_at == version => {
                row.kind = None;
                row.sealed.clear();
                row.dropped = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn target_summaries(&self, user: Uuid) -> StoreResult<Vec<TargetSummary>> {
        let tables = self.tables();
        let mut summaries: Vec<TargetSummary> = tables
            .targets
            .iter()
            .filter(|((u, _), _)| *u == user)
            .map(|((_, device), row)| TargetSummary {
                device: *device,
                kind: row.kind,
                updated_at: row.updated_at,
                dropped: row.dropped,
            })
            .collect();
        summaries.sort_by_key(|s| s.device);
        Ok(summaries)
    }

    async fn count_targets(&self) -> StoreResult<Vec<(Kind, u64)>> {
        let tables = self.tables();
        let mut counts: HashMap<Kind, u64> = HashMap::new();
        for row in tables.targets.values() {
            if let Some(kind) = row.kind {
                *counts.entry(kind).or_default() += 1;
            }
        }
        Ok(counts.into_iter().collect())
    }

    async fn schedule_many(
        &self,
        wanted: &[Wanted],
        now: DateTime<Utc>,
        rules: Coalescing,
    ) -> StoreResult<Vec<Scheduled>> {
        let mut tables = self.tables();
        let Tables { targets, wakeups } = &mut *tables;
        Ok(wanted
            .iter()
            .map(|w| {
                let key = (w.user, w.device);
                if targets.get(&key).is_none_or(|row| row.kind.is_none()) {
                    return Scheduled::NoTarget;
                }
                let state = wakeups.get(&key).map(push::WakeupRow::from);
                let row = wakeups.entry(key).or_default();
                match decide(state.as_ref(), w.urgent, now, rules) {
                    Decision::Insert | Decision::Revive => {
                        row.due_at = Some(w.due);
                        row.urgent = w.urgent;
                        row.attempts = 0;
                        Scheduled::Pending
                    }
                    Decision::Upgrade => {
                        row.urgent = true;
                        row.due_at = row.due_at.map(|pending| pending.min(w.due));
                        Scheduled::Coalesced
                    }
                    Decision::Coalesce => Scheduled::Coalesced,
                }
            })
            .collect())
    }

    async fn take_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<DueWakeup>> {
        let mut tables = self.tables();
        let Tables { targets, wakeups } = &mut *tables;
        let mut due: Vec<((Uuid, DeviceId), DateTime<Utc>)> = wakeups
            .iter()
            .filter_map(|(key, row)| Some((*key, row.due_at.filter(|d| *d <= now)?)))
            .filter(|(key, _)| targets.get(key).is_some_and(|t| t.kind.is_some()))
            .collect();
        due.sort_by_key(|(_, at)| *at);
        due.truncate(limit as usize);
        Ok(due
            .into_iter()
            .map(|(key, _)| {
                let row = wakeups.get_mut(&key).expect("listed");
                row.due_at = Some(add(now, lease));
                let target = &targets[&key];
                DueWakeup {
                    user: key.0,
                    device: key.1,
                    urgent: row.urgent,
                    attempts: row.attempts,
                    target: StoredTarget {
                        kind: target.kind.expect("live"),
                        sealed: target.sealed.clone(),
                        updated_at: target.updated_at,
                    },
                }
            })
            .collect())
    }

    async fn stale_targets(
        &self,
        current: KeyId,
        after: (Uuid, DeviceId),
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, DeviceId, Vec<u8>)>> {
        let tables = self.tables();
        let mut stale: Vec<_> = tables
            .targets
            .iter()
            .filter(|(key, row)| {
                **key > after
                    && row.kind.is_some()
                    && !row.sealed.starts_with(&current.to_be_bytes())
            })
            .map(|(key, row)| (key.0, key.1, row.sealed.clone()))
            .collect();
        stale.sort_by_key(|(user, device, _)| (*user, *device));
        stale.truncate(limit as usize);
        Ok(stale)
    }

    async fn reseal_target(
        &self,
        user: Uuid,
        device: DeviceId,
        sealed: &[u8],
        resealed: &[u8],
    ) -> StoreResult<bool> {
        let mut tables = self.tables();
        match tables.targets.get_mut(&(user, device)) {
            Some(row) if row.kind.is_some() && row.sealed == sealed => {
                row.sealed = resealed.to_vec();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn update_wakeups(&self, updates: &[(Uuid, DeviceId, WakeupUpdate)]) -> StoreResult<()> {
        let mut tables = self.tables();
        for &(user, device, update) in updates {
            let Some(row) = tables.wakeups.get_mut(&(user, device)) else {
                continue;
            };
            match update {
                WakeupUpdate::Sent { urgent, at } => {
                    row.due_at = None;
                    row.attempts = 0;
                    row.sent_at = Some(at);
                    if !urgent {
                        row.quiet_sent_at = Some(at);
                    }
                }
                WakeupUpdate::Retry { at, attempts } => {
                    row.due_at = Some(at);
                    row.attempts = attempts;
                }
                WakeupUpdate::Abandoned | WakeupUpdate::Cancelled => {
                    row.due_at = None;
                    row.sent_at = None;
                    row.attempts = 0;
                }
            }
        }
        Ok(())
    }
}
