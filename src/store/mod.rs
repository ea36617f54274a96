//! Durable storage: accounts and their devices, sessions, the message queue
//! and the operator's queries, one trait per concern.
//!
//! - [`queue`]: [`Queue`], the hot path of the delivery core and the
//!   committer (batched writes, page reads, counts), and
//!   [`QueueMaintenance`], what the sweeper and start-up do to the queue.
//! - [`accounts`]: [`Accounts`], users and their devices.
//! - [`sessions`]: [`Sessions`], refresh tokens and revocations.
//! - [`admin`]: [`Operator`], the operator commands' listings and counts.
//! - [`push`]: [`PushStore`], devices' push targets and pending wake-ups.
//!
//! [`Store`] joins them; it has two implementations, [`postgres::PgStore`] for production and
//! [`sqlite::SqliteStore`] as the embedded default, picked by the scheme of
//! `DATABASE_URL` in [`connect`]. Each backend owns its migrations
//! (`migrations/postgres`, `migrations/sqlite`). Every query is
//! parameterised. Timestamps are kept at millisecond precision on both
//! backends so that a value reads back exactly as it was written.
//!
//! The server runs on the store wrapped in [`deadline::Deadlined`]: every
//! call a request waits on has a deadline, so a stalled database answers
//! `unavailable` instead of holding requests.
//!
//! The queue's write side is [`Queue::write_batch`]: inserts and acks from
//! many callers in one transaction, as the committer gathers them.
//!
//! The queue holds [`SealedRow`]s: routing columns in the clear, sender and
//! body sealed by [`crate::seal`] above this layer, so each backend only binds
//! and reads columns. Rows written before sealed storage ([`StoredRow::Legacy`])
//! stay readable until the sweeper has sealed them; a later release drops
//! their plaintext `sender` and `body` columns.

pub mod accounts;
pub mod admin;
pub mod deadline;
#[cfg(test)]
pub mod memory;
pub mod postgres;
pub mod push;
pub mod queue;
pub mod sessions;
pub mod sqlite;

pub use accounts::{
    Accounts, AddDevice, Credentials, CredentialsVersion, Device, DeviceIds, RemoveDevice, User,
    Verified, username_skeleton,
};
pub use admin::{AccountDetails, AccountSummary, DeviceSummary, Operator, Stats};
pub use push::{
    Coalescing, DueWakeup, PushStore, Scheduled, StoredTarget, TargetSummary, WakeupUpdate, Wanted,
};
pub use queue::{
    Ack, KeyId, Message, Queue, QueueDepth, QueueMaintenance, QueueShare, SealedBody, SealedKey,
    SealedRow, SendKey, SenderTag, SentKey, StoredRow,
};
pub use sessions::{NewSession, RefreshToken, Revoked, Rotation, SessionStart, Sessions};

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

/// The current time at the precision the stores keep.
pub fn now() -> DateTime<Utc> {
    truncate_to_millis(Utc::now())
}

pub(crate) fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

/// The acceptance time encoded in a UUIDv7 message id: its top 48 bits are
/// Unix milliseconds (RFC 9562 §5.7).
pub fn id_time(id: Uuid) -> DateTime<Utc> {
    let millis = (id.as_u128() >> 80) as i64;
    DateTime::from_timestamp_millis(millis).unwrap_or_default()
}

/// The smallest UUIDv7 of the given millisecond: every message accepted
/// before `t` has a smaller id. Message ids are time-ordered, so the sweeper
/// expires messages by primary-key range and needs no index on `sent_at`.
pub fn first_id_at(t: DateTime<Utc>) -> Uuid {
    let millis = u128::from(t.timestamp_millis().max(0) as u64);
    Uuid::from_u128(millis << 80)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("username is taken")]
    UsernameTaken,
    #[error("database unreachable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database did not answer within the call's deadline
    /// ([`deadline`]): stalled, or too slow to serve. A write may still
    /// have committed.
    #[error("database did not answer within {0:?}")]
    Deadline(std::time::Duration),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("message {0} is neither sealed nor a legacy plaintext row")]
    Malformed(Uuid),
    #[error("unsupported DATABASE_URL scheme (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
}

impl StoreError {
    /// Whether it means "not now" (503, retry) rather than a bug (500).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Deadline(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        let unavailable = match &err {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
            sqlx::Error::Database(db) => is_outage(db.as_ref()),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(err)
        } else {
            StoreError::Database(err)
        }
    }
}

/// Whether a database error means "not now" rather than "never": the client
/// should get 503 and retry, not 500.
///
/// A full disk is one: nothing is wrong with the request, the same one
/// succeeds once an operator has made room, and nothing was written (the
/// transaction is rolled back). 507 Insufficient Storage would be WebDAV's
/// word for it, but a client can do nothing different from a 503, so it
/// keeps the one `unavailable` code; the log and the error counters tell
/// the operator which it is.
fn is_outage(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        // SQLITE_BUSY (5), SQLITE_LOCKED (6) and SQLITE_FULL (13), with
        // their extended codes.
        let primary = sqlx::error::DatabaseError::code(sqlite)
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        return matches!(primary, Some(5 | 6 | 13));
    }
    // PostgreSQL: connection exceptions (class 08), shutdown and recovery
    // (57P01-57P03), too many connections (53300), disk full (53100); and a
    // transaction chosen as a deadlock's victim (40P01) or failed to
    // serialise (40001): rolled back whole, and the same request succeeds
    // when retried.
    db.code().is_some_and(|code| {
        code.starts_with("08")
            || matches!(
                &*code,
                "57P01" | "57P02" | "57P03" | "53300" | "53100" | "40P01" | "40001"
            )
    })
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A device's number within its account: 1, 2, 3... never reused. Kept as
/// a 32-bit signed integer by both backends, so at most `i32::MAX`.
pub type DeviceId = u32;

/// The largest device id a database column holds.
pub const MAX_DEVICE_ID: DeviceId = i32::MAX as DeviceId;

/// The whole store, as [`connect`] opens it: every concern's trait, plus
/// what start-up and readiness need. Each consumer takes only the part it
/// uses: the delivery core and the committer a [`Queue`], the sweeper the
/// [`QueueMaintenance`] too, handlers [`Accounts`] and [`Sessions`], the
/// operator commands [`Operator`].
#[async_trait]
pub trait Store: Queue + QueueMaintenance + Accounts + Sessions + Operator + PushStore {
    /// Applies pending migrations of this backend.
    async fn migrate(&self) -> StoreResult<()>;

    /// A round trip to the database, for readiness checks.
    async fn ping(&self) -> StoreResult<()>;
}

/// How to open the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub url: String,
    pub pool_size: u32,
}

/// Opens the store `url` names, without migrating it.
pub async fn connect(options: &StoreOptions) -> StoreResult<Arc<dyn Store>> {
    let url = options.url.as_str();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(
            postgres::PgStore::connect(url, options.pool_size).await?,
        ))
    } else if url.starts_with("sqlite:") {
        Ok(Arc::new(
            sqlite::SqliteStore::connect(url, options.pool_size).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl)
    }
}

/// The versions of `migrator`'s migrations missing from `applied`.
fn pending(migrator: &sqlx::migrate::Migrator, applied: &[i64]) -> Vec<i64> {
    migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .map(|m| m.version)
        .collect()
}

/// Whether `url` names a PostgreSQL database.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Time arithmetic that cannot overflow on absurd configuration values.
pub fn add(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

pub fn sub(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| t.checked_sub_signed(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_time_round_trips_through_first_id() {
        let id = Uuid::now_v7();
        let t = id_time(id);
        assert!(first_id_at(t) <= id);
        assert!(first_id_at(t + TimeDelta::milliseconds(1)) > id);
        assert_eq!(id_time(first_id_at(t)), t);
    }

    #[test]
    fn truncation_keeps_milliseconds() {
        let t = now();
        assert_eq!(t.timestamp_subsec_nanos() % 1_000_000, 0);
    }
}
