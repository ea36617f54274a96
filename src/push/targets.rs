//! [`Targets`]: which of an account's devices have a push target, cached
//! per account, so that deciding whether to wake a device (after every
//! commit) and listing devices ask the database nothing on the hot path.
//!
//! The cache is kept exact the way [`crate::devices::Directory`] is: every
//! change this process makes (a target set, deleted or dropped, a device
//! removed, an account deleted) calls [`Targets::changed`] after it
//! commits, and a load racing a change cannot put a stale list back: a
//! load is kept only if no change was announced since it began (the
//! `epoch`), checked under the shard lock that `changed` takes to remove
//! the entry. Changes made by other nodes arrive as
//! [`crate::cluster::Announce::PushTargets`] (and, for removed devices and
//! deleted accounts, [`crate::cluster::Announce::Directory`]) within the
//! broker's latency; [`Targets::changed_everywhere`] does both halves. A
//! node that misses an announcement wakes a device whose target has
//! changed at most with a stale view of *whether* it has one: the target
//! itself is always read from the store when a wake-up is sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use uuid::Uuid;

use super::target::Kind;
use crate::cluster::{Announce, Broker};
use crate::error::Result;
use crate::store::{DeviceId, PushStore, TargetSummary};

/// A device's push target as far as waking it and listing it go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// It never registered one, or deleted it.
    None,
    /// It can be woken.
    Live {
        kind: Kind,
        /// The target's version (when it was last set).
        updated_at: DateTime<Utc>,
    },
    /// Its provider said it is gone: the device is told so on its next
    /// `ready` frame, until it registers again or deletes it.
    Dropped,
}

impl TargetState {
    fn of(summary: &TargetSummary) -> Self {
        match summary.kind {
            Some(kind) => TargetState::Live {
                kind,
                updated_at: summary.updated_at,
            },
            // A row whose target was dropped, or of a kind this build does
            // not know (then it cannot wake it either).
            None if summary.dropped => TargetState::Dropped,
            None => TargetState::None,
        }
    }
}

/// An account's devices that have a target row, ascending by device.
pub type AccountTargets = Arc<[(DeviceId, TargetState)]>;

/// Accounts whose targets are kept. An entry is an id and a few bytes per
/// device with a target, under 200 bytes: 100,000 entries are about
/// 20 MiB. Past the bound the whole cache is dropped and refilled on
/// demand, one indexed query per account next looked at, as the device
/// directory does.
const CACHE_BOUND: usize = 100_000;

pub struct Targets {
    store: Arc<dyn PushStore>,
    /// Account → its devices' target states.
    cache: DashMap<Uuid, AccountTargets>,
    /// Bumped by every [`Targets::changed`], before the entry is removed.
    epoch: AtomicU64,
}

impl Targets {
    pub fn new(store: Arc<dyn PushStore>) -> Self {
        Self {
            store,
            cache: DashMap::new(),
            epoch: AtomicU64::new(0),
        }
    }

    /// The account's devices that have a target row, ascending.
    pub async fn account(&self, user: Uuid) -> Result<AccountTargets> {
        if let Some(cached) = self.cache.get(&user) {
            return Ok(cached.clone());
        }
        let began = self.epoch.load(Ordering::Acquire);
        let loaded: AccountTargets = self
            .store
            .target_summaries(user)
            .await?
            .iter()
            .map(|s| (s.device, TargetState::of(s)))
            .collect();
        // Accounts without targets are cached too (an empty list): most
        // accounts are, and each send to one would otherwise ask.
        if self.cache.len() >= CACHE_BOUND {
            self.cache.clear();
        }
        let entry = self.cache.entry(user);
        if self.epoch.load(Ordering::Acquire) == began {
            entry.insert(loaded.clone());
        }
        Ok(loaded)
    }

    /// One device's target state.
    pub async fn state(&self, user: Uuid, device: DeviceId) -> Result<TargetState> {
        let account = self.account(user).await?;
        Ok(account
            .binary_search_by_key(&device, |(d, _)| *d)
            .map_or(TargetState::None, |i| account[i].1))
    }

    /// The account's targets changed here (committed): forget them.
    pub fn changed(&self, user: Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(&user);
    }

    /// [`Targets::changed`], and the same on every other node.
    pub fn changed_everywhere(&self, user: Uuid, broker: &dyn Broker) {
        self.changed(user);
        broker.announce(Announce::PushTargets { user });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{StoreOptions, connect};

    /// A change forgets the cached list; a state read after it sees the
    /// store.
    #[tokio::test]
    async fn a_change_is_seen_and_a_dropped_target_reads_as_dropped() {
        let store = connect(&StoreOptions {
            url: "sqlite::memory:".into(),
            pool_size: 1,
        })
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let user = crate::store::User {
            id: Uuid::new_v4(),
            username: "targets".into(),
            created_at: crate::store::now(),
        };
        let device = crate::store::Device {
            id: 1,
            public_key: vec![1; 32],
            key_updated_at: user.created_at,
            name: None,
            created_at: user.created_at,
            last_seen_at: user.created_at,
        };
        let session = crate::store::NewSession {
            hash: [9; 32],
            family_id: Uuid::new_v4(),
            expires_at: user.created_at,
        };
        store
            .create_user(&user, "hash", &device, &session)
            .await
            .unwrap();
        let targets = Targets::new(store.clone());
        assert_eq!(targets.state(user.id, 1).await.unwrap(), TargetState::None);
        let version = store
            .set_target(user.id, 1, Kind::Fcm, b"sealed", crate::store::now())
            .await
            .unwrap()
            .unwrap();
        // Cached until told.
        assert_eq!(targets.state(user.id, 1).await.unwrap(), TargetState::None);
        targets.changed(user.id);
        assert_eq!(
            targets.state(user.id, 1).await.unwrap(),
            TargetState::Live {
                kind: Kind::Fcm,
                updated_at: version
            }
        );
        assert!(store.drop_target(user.id, 1, version).await.unwrap());
        targets.changed(user.id);
        assert_eq!(
            targets.state(user.id, 1).await.unwrap(),
            TargetState::Dropped
        );
        assert_eq!(targets.state(user.id, 2).await.unwrap(), TargetState::None);
    }
}
