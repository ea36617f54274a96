//! Deadlines on database calls: [`Deadlined`] wraps the store the server
//! runs on, so that no call waits for a database that has stopped
//! answering.
//!
//! A database that is down refuses connections and every call fails at
//! once. One that is stalled (a PostgreSQL paused by SIGSTOP or a
//! hypervisor, a partitioned network, a disk that blocks) answers nothing:
//! a query sent on an open connection waits for as long as TCP keeps the
//! connection, which is minutes. PostgreSQL's `statement_timeout` cannot
//! help, as the server is not running it; the pools' `acquire_timeout`
//! bounds only the wait for a connection, not a query on one. So each call
//! gets a deadline here, on the client's side, and a call past it fails as
//! [`StoreError::Deadline`], which callers treat as `unavailable` (503).
//!
//! One wrapper around the whole [`Store`], rather than a timeout at each
//! call site, because every caller (handlers, the committer, the sweeper,
//! the revocation poll, WebSocket drains) must be bounded and none may
//! forget. A deadline drops the call's future: sqlx then rolls back an
//! open transaction, or closes the connection if it cannot tell its state.
//! A commit whose deadline passed may still have committed; its callers
//! are told `unavailable` and may retry (see `protocol.md`, "Errors").
//!
//! Three bounds, by what waits on the call:
//! - **request** (`SEALPOST_DB_TIMEOUT`): everything a client's request or
//!   the committer waits on: the queue, accounts and devices, sessions,
//!   `ping`.
//! - **maintenance** ([`MAINTENANCE_DEADLINE`]): the sweeper's and
//!   start-up's calls, each a bounded batch or one sample per sweep, that
//!   may take longer on a large queue than a request may wait.
//! - **none**: migrations, which may rewrite a large table and must not be
//!   cut off half-way at start-up, and the operator's commands, which run
//!   in a terminal where the operator can interrupt them and whose counts
//!   read the whole queue.
//!
//! Adding a method to a store trait means adding one line to its list
//! below, with its bound.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use metrics::Counter;
use uuid::Uuid;

use crate::push::target::Kind;

use super::push::{
    Coalescing, DueWakeup, PushStore, Scheduled, TargetSummary, WakeupUpdate, Wanted,
};
use super::{
    AccountDetails, AccountSummary, Accounts, Ack, AddDevice, Credentials, CredentialsVersion,
    Device, DeviceId, DeviceIds, KeyId, NewSession, Operator, Queue, QueueDepth, QueueMaintenance,
    QueueShare, RefreshToken, RemoveDevice, Revoked, Rotation, SealedBody, SealedKey, SealedRow,
    SessionStart, Sessions, Stats, Store, StoreError, StoreResult, StoredRow, User, Verified,
};

/// The bound of the sweeper's and start-up's calls. Each deletes or seals
/// at most a batch (1,000 rows) or samples the queue once per sweep, which
/// a healthy database does in well under a second; a minute past that means
/// the database is stalled, and the sweeper retries at its next interval
/// instead of waiting on a dead connection.
pub const MAINTENANCE_DEADLINE: Duration = Duration::from_secs(60);

/// The store with a deadline on each call.
pub struct Deadlined {
    inner: Arc<dyn Store>,
    /// The bound of calls that a request or the committer waits on.
    request: Duration,
    /// Counts calls that passed their deadline (`sealpost_db_timeouts_total`).
    timeouts: Counter,
}

impl Deadlined {
    /// Wraps `inner`: calls a request waits on get `request` each.
    pub fn new(inner: Arc<dyn Store>, request: Duration, timeouts: Counter) -> Self {
        Self {
            inner,
            request,
            timeouts,
        }
    }

    async fn within<T>(
        &self,
        limit: Duration,
        call: &'static str,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        match tokio::time::timeout(limit, work).await {
            Ok(done) => done,
            Err(_) => {
                self.timeouts.increment(1);
                // Not a warning per call: during a stall every request
                // passes here. The committer and `/readyz` log the outage;
                // the counter says how much of it there was.
                tracing::debug!(call, deadline = ?limit, "database call passed its deadline");
                Err(StoreError::Deadline(limit))
            }
        }
    }

    async fn request<T>(
        &self,
        call: &'static str,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.within(self.request, call, work).await
    }

    async fn maintenance<T>(
        &self,
        call: &'static str,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        self.within(MAINTENANCE_DEADLINE, call, work).await
    }

    async fn none<T>(
        &self,
        _call: &'static str,
        work: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        work.await
    }
}

/// Implements `$trait` for [`Deadlined`]: each listed method forwards to
/// the inner store under the bound named before it (`request`,
/// `maintenance` or `none`).
macro_rules! deadlined {
    ($trait:ident { $(
        $bound:ident fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) -> $ret:ty;
    )* }) => {
        #[async_trait]
        impl $trait for Deadlined {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.$bound(stringify!($name), self.inner.$name($($arg),*)).await
                }
            )*
        }
    };
}

deadlined!(Store {
    none fn migrate(&self) -> StoreResult<()>;
    request fn ping(&self) -> StoreResult<()>;
});

deadlined!(Queue {
    request fn write_batch(&self, bodies: Vec<SealedBody>, messages: Vec<SealedRow>, keys: &[SealedKey], acks: &[Ack]) -> StoreResult<Vec<StoredRow>>;
    request fn shared_bodies(&self, ids: &[Uuid]) -> StoreResult<Vec<SealedBody>>;
    request fn sent_key(&self, hashes: &[Vec<u8>], now: DateTime<Utc>) -> StoreResult<Option<SealedKey>>;
    request fn forget_sender_keys(&self, accounts: &[Vec<u8>]) -> StoreResult<u64>;
    request fn queued_sizes(&self, recipient: Uuid, device: DeviceId, after: Uuid, limit: u32) -> StoreResult<Vec<(Uuid, u64)>>;
    request fn fetch_through(&self, recipient: Uuid, device: DeviceId, after: Uuid, through: Uuid, limit: u32) -> StoreResult<Vec<StoredRow>>;
    request fn queued_ids(&self, recipient: Uuid, device: DeviceId, after: Uuid, limit: u32) -> StoreResult<Vec<Uuid>>;
    request fn queue_shares(&self, recipient: Uuid) -> StoreResult<Vec<QueueShare>>;
    request fn purge(&self, recipient: Uuid, device: Option<DeviceId>) -> StoreResult<u64>;
});

deadlined!(QueueMaintenance {
    maintenance fn queue_depth(&self) -> StoreResult<QueueDepth>;
    maintenance fn stale_rows(&self, current: KeyId, after: Uuid, limit: u32) -> StoreResult<Vec<StoredRow>>;
    maintenance fn reseal(&self, rows: Vec<SealedRow>) -> StoreResult<u64>;
    maintenance fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>>;
    maintenance fn sealed_with(&self, key: KeyId, limit: u32) -> StoreResult<Vec<StoredRow>>;
    maintenance fn delete_before(&self, before: Uuid, limit: u32) -> StoreResult<u64>;
    maintenance fn delete_orphan_bodies(&self, limit: u32) -> StoreResult<u64>;
    maintenance fn stale_bodies(&self, current: KeyId, after: Uuid, limit: u32) -> StoreResult<Vec<SealedBody>>;
    maintenance fn reseal_bodies(&self, bodies: Vec<SealedBody>) -> StoreResult<u64>;
    maintenance fn forget_expired_keys(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
});

deadlined!(DeviceIds {
    request fn device_ids(&self, user: Uuid) -> StoreResult<Vec<DeviceId>>;
});

deadlined!(Accounts {
    request fn create_user(&self, user: &User, password_hash: &str, device: &Device, session: &NewSession) -> StoreResult<()>;
    request fn user(&self, id: Uuid) -> StoreResult<Option<User>>;
    request fn user_by_name(&self, username: &str) -> StoreResult<Option<User>>;
    request fn name_taken(&self, username: &str) -> StoreResult<bool>;
    request fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>>;
    request fn password_hash(&self, id: Uuid) -> StoreResult<Option<String>>;
    request fn devices(&self, user: Uuid) -> StoreResult<Vec<Device>>;
    request fn add_device(
        &self,
        account: Verified,
        public_key: &[u8],
        name: Option<&str>,
        max: u32,
        session: &NewSession,
        now: DateTime<Utc>,
    ) -> StoreResult<AddDevice>;
    request fn rename_device(&self, user: Uuid, device: DeviceId, name: Option<&str>) -> StoreResult<Option<Device>>;
    request fn set_device_key(&self, user: Uuid, device: DeviceId, key: &[u8], at: DateTime<Utc>) -> StoreResult<Option<Device>>;
    request fn remove_device(&self, user: Uuid, device: DeviceId, now: DateTime<Utc>) -> StoreResult<RemoveDevice>;
    request fn set_password(&self, user_id: Uuid, password_hash: &str, now: DateTime<Utc>) -> StoreResult<Option<(Vec<Uuid>, CredentialsVersion)>>;
    request fn delete_user(&self, user_id: Uuid, now: DateTime<Utc>) -> StoreResult<Option<Vec<Uuid>>>;
});

deadlined!(Sessions {
    request fn insert_refresh_token(&self, token: &RefreshToken, credentials: CredentialsVersion) -> StoreResult<SessionStart>;
    request fn rotate_refresh_token(
        &self,
        presented: &[u8; 32],
        next_hash: &[u8; 32],
        next_expires_at: DateTime<Utc>,
        grace_from: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Rotation>;
    request fn revoke_sessions(&self, user_id: Uuid, only: Option<Uuid>, now: DateTime<Utc>) -> StoreResult<Vec<Uuid>>;
    request fn revoked_sessions(&self, since: DateTime<Utc>) -> StoreResult<Vec<Revoked>>;
    maintenance fn purge_revoked_sessions(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
    maintenance fn purge_refresh_tokens(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
});

deadlined!(Operator {
    none fn disable_user(&self, user_id: Uuid, now: DateTime<Utc>) -> StoreResult<Option<Vec<Uuid>>>;
    none fn enable_user(&self, user_id: Uuid) -> StoreResult<bool>;
    none fn list_accounts(&self, after: Option<&str>, limit: u32) -> StoreResult<Vec<AccountSummary>>;
    none fn account_details(&self, id: Uuid, now: DateTime<Utc>) -> StoreResult<Option<AccountDetails>>;
    none fn stats(&self, now: DateTime<Utc>) -> StoreResult<Stats>;
    none fn pending_migrations(&self) -> StoreResult<Vec<i64>>;
});

// Wake-ups are sent in the background, but a schedule is made after a
// commit and a cancel when a device shows up: all are short, indexed
// statements, bounded like a request's. The gauge's count reads the whole
// table, like the sweeper's samples.
deadlined!(PushStore {
    request fn set_target(&self, user: Uuid, device: DeviceId, kind: Kind, sealed: &[u8], now: DateTime<Utc>) -> StoreResult<Option<DateTime<Utc>>>;
    request fn delete_target(&self, user: Uuid, device: DeviceId) -> StoreResult<bool>;
    request fn drop_target(&self, user: Uuid, device: DeviceId, version: DateTime<Utc>) -> StoreResult<bool>;
    request fn target_summaries(&self, user: Uuid) -> StoreResult<Vec<TargetSummary>>;
    maintenance fn count_targets(&self) -> StoreResult<Vec<(Kind, u64)>>;
    request fn schedule_many(&self, wanted: &[Wanted], now: DateTime<Utc>, rules: Coalescing) -> StoreResult<Vec<Scheduled>>;
    request fn take_due(&self, now: DateTime<Utc>, limit: u32, lease: Duration) -> StoreResult<Vec<DueWakeup>>;
    request fn update_wakeups(&self, updates: &[(Uuid, DeviceId, WakeupUpdate)]) -> StoreResult<()>;
    maintenance fn stale_targets(&self, current: KeyId, after: (Uuid, DeviceId), limit: u32) -> StoreResult<Vec<(Uuid, DeviceId, Vec<u8>)>>;
    maintenance fn reseal_target(&self, user: Uuid, device: DeviceId, sealed: &[u8], resealed: &[u8]) -> StoreResult<bool>;
});

#[cfg(test)]
mod tests {
    use super::*;

    use crate::store::{StoreOptions, connect};

    /// A call that never answers fails at its deadline as `Deadline`, which
    /// the API answers as `unavailable`; the store serves on afterwards.
    #[tokio::test]
    async fn a_call_past_its_deadline_fails_as_unavailable() {
        let inner = connect(&StoreOptions {
            url: "sqlite::memory:".into(),
            pool_size: 1,
        })
        .await
        .unwrap();
        inner.migrate().await.unwrap();
        let store = Deadlined::new(inner, Duration::from_secs(5), Counter::noop());
        let limit = Duration::from_millis(20);
        let stalled = store
            .within(limit, "stalled", std::future::pending::<StoreResult<()>>())
            .await;
        let err = stalled.unwrap_err();
        assert!(matches!(err, StoreError::Deadline(d) if d == limit));
        assert!(err.is_unavailable());
        assert!(matches!(
            crate::error::Error::from(err),
            crate::error::Error::Unavailable
        ));
        store.ping().await.unwrap();
    }
}
