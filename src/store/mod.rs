//! Durable storage behind one interface: accounts, refresh tokens and the
//! message queue.
//!
//! [`Store`] has two implementations, [`postgres::PgStore`] for production and
//! [`sqlite::SqliteStore`] as the embedded default, picked by the scheme of
//! `DATABASE_URL` in [`connect`]. Each backend owns its migrations
//! (`migrations/postgres`, `migrations/sqlite`). Every query is
//! parameterised. Timestamps are kept at millisecond precision on both
//! backends so that a value reads back exactly as it was written.
//!
//! The queue's write side is [`Store::write_batch`]: inserts and acks from
//! many callers in one transaction, as the committer gathers them.
//!
//! The queue holds [`SealedRow`]s: routing columns in the clear, sender and
//! body sealed by [`crate::seal`] above this layer, so each backend only binds
//! and reads columns. Rows written before sealed storage ([`StoredRow::Legacy`])
//! stay readable until the sweeper has sealed them; a later release drops
//! their plaintext `sender` and `body` columns.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

/// The current time at the precision the stores keep.
pub fn now() -> DateTime<Utc> {
    truncate_to_millis(Utc::now())
}

fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub public_key: Vec<u8>,
    pub key_updated_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

/// What login needs: the account id, its PHC-encoded argon2id hash, and
/// whether an operator disabled it.
#[derive(Clone)]
pub struct Credentials {
    pub user_id: Uuid,
    pub password_hash: String,
    pub disabled: bool,
}

/// A revoked session as recorded in `revoked_sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    pub session: Uuid,
    pub user_id: Uuid,
}

/// An account as operators see it in a listing (`sealpost user list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    pub id: Uuid,
    pub username: String,
    pub created_at: DateTime<Utc>,
    /// When an operator disabled it; `None` while it is active.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Messages waiting for it.
    pub queued: u64,
}

/// One account in detail (`sealpost user show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDetails {
    pub summary: AccountSummary,
    pub public_key_bytes: u64,
    pub key_updated_at: DateTime<Utc>,
    /// Sessions that can still refresh: one live refresh token each.
    pub live_sessions: u64,
    /// The id of its oldest queued message, whose time it encodes.
    pub oldest_queued: Option<Uuid>,
}

/// Counts over the whole database (`sealpost stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub users: u64,
    pub disabled_users: u64,
    /// Sessions that can still refresh.
    pub live_sessions: u64,
    /// Revocations kept until every access token they refuse has expired.
    pub revocations: u64,
    pub queued: u64,
    /// Accounts with at least one queued message.
    pub recipients: u64,
    /// The oldest queued message's id, whose time it encodes.
    pub oldest_queued: Option<Uuid>,
    /// Queued messages per storage key id; `None` counts legacy plaintext
    /// rows. In key id order, legacy first.
    pub by_key: Vec<(Option<KeyId>, u64)>,
}

/// A refresh token as stored: only its SHA-256 hash, never the token.
#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub hash: [u8; 32],
    pub user_id: Uuid,
    /// All tokens rotated from one login share a family; it is the session id
    /// carried in the access tokens of that session.
    pub family_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// The outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live; it is now spent and its successor stored.
    Rotated { user_id: Uuid, family_id: Uuid },
    /// The token had been spent before: a sign of theft. Every session of
    /// the user has been revoked; these are their ids.
    Reused { user_id: Uuid, revoked: Vec<Uuid> },
    /// Unknown or expired.
    Invalid,
}

/// A sealed envelope in the queue. The body is opaque ciphertext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: Uuid,
    pub recipient: Uuid,
    pub sender: Uuid,
    pub body: Vec<u8>,
    pub sent_at: DateTime<Utc>,
}

/// The id of a storage key (`SEALPOST_STORAGE_KEYS`): a small positive
/// integer, kept beside every sealed row.
pub type KeyId = i16;

/// A queued message as stored: routing columns in the clear, its sender and
/// body in `sealed` under storage key `key_id` (format in [`crate::seal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedRow {
    pub id: Uuid,
    pub recipient: Uuid,
    pub sent_at: DateTime<Utc>,
    pub key_id: KeyId,
    pub sealed: Vec<u8>,
}

/// A queued message as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredRow {
    Sealed(SealedRow),
    /// Written in plaintext by a release before sealed storage.
    Legacy(Message),
}

/// A queue row as both backends select it: `id, recipient, sent_at, key_id,
/// sealed, sender, body`, with `sent_at` in the backend's own representation
/// `T`.
type QueueColumns<T> = (
    Uuid,
    Uuid,
    T,
    Option<KeyId>,
    Option<Vec<u8>>,
    Option<Uuid>,
    Option<Vec<u8>>,
);

impl StoredRow {
    /// Builds a row from the queue's columns, in the order both backends
    /// select them: `id, recipient, sent_at, key_id, sealed, sender, body`
    /// (`sent_at` already converted from the backend's representation).
    fn from_columns(
        (id, recipient, sent_at, key_id, sealed, sender, body): QueueColumns<DateTime<Utc>>,
    ) -> StoreResult<Self> {
        match (key_id, sealed, sender, body) {
            (Some(key_id), Some(sealed), _, _) => Ok(StoredRow::Sealed(SealedRow {
                id,
                recipient,
                sent_at,
                key_id,
                sealed,
            })),
            (None, None, Some(sender), Some(body)) => Ok(StoredRow::Legacy(Message {
                id,
                recipient,
                sender,
                body,
                sent_at,
            })),
            // The schema's CHECK constraint rules this out.
            _ => Err(StoreError::Malformed(id)),
        }
    }

    pub fn id(&self) -> Uuid {
        match self {
            StoredRow::Sealed(row) => row.id,
            StoredRow::Legacy(message) => message.id,
        }
    }
}

/// The size of the queue, as [`Store::queue_depth`] samples it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Messages queued for all recipients.
    pub total: u64,
    /// Messages queued for the recipient with the most.
    pub max_per_recipient: u64,
}

/// One acknowledgement: delete `id` if it is addressed to `recipient`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ack {
    pub recipient: Uuid,
    pub id: Uuid,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("username is taken")]
    UsernameTaken,
    #[error("database unreachable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("message {0} is neither sealed nor a legacy plaintext row")]
    Malformed(Uuid),
    #[error("unsupported DATABASE_URL scheme (expected sqlite:// or postgres://)")]
    UnsupportedUrl,
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
fn is_outage(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
        // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes.
        let primary = sqlx::error::DatabaseError::code(sqlite)
            .and_then(|c| c.parse::<i32>().ok())
            .map(|c| c & 0xff);
        return matches!(primary, Some(5 | 6));
    }
    // PostgreSQL: connection exceptions (class 08), shutdown and recovery
    // (57P01-57P03), too many connections (53300).
    db.code().is_some_and(|code| {
        code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
    })
}

pub type StoreResult<T> = Result<T, StoreError>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies pending migrations of this backend.
    async fn migrate(&self) -> StoreResult<()>;

    /// A round trip to the database, for readiness checks.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates an account; [`StoreError::UsernameTaken`] if the name is in
    /// use in any letter case.
    async fn create_user(&self, user: &User, password_hash: &str) -> StoreResult<()>;

    async fn user(&self, id: Uuid) -> StoreResult<Option<User>>;

    /// Looks a user up by name, ignoring letter case.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>>;

    async fn user_exists(&self, id: Uuid) -> StoreResult<bool>;

    async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>>;

    /// Disables the account and revokes every session, in one transaction
    /// (an account disabled already keeps its first `disabled_at`). Returns
    /// the revoked session ids, or `None` if there was no such user.
    async fn disable_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>>;

    /// Lets a disabled account log in again; `false` if there was no such
    /// user.
    async fn enable_user(&self, user_id: Uuid) -> StoreResult<bool>;

    /// Up to `limit` accounts, in username order (ignoring letter case),
    /// after the username `after`.
    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<AccountSummary>>;

    /// One account in detail; sessions count as live until `now`.
    async fn account_details(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<AccountDetails>>;

    /// Counts over the whole database. Counting the queue reads all of it:
    /// an operator's command, not something to poll.
    async fn stats(&self, now: DateTime<Utc>) -> StoreResult<Stats>;

    /// The versions of this release's migrations that the database has not
    /// applied, so that operator commands can refuse an outdated schema
    /// rather than migrate it behind the operator's back.
    async fn pending_migrations(&self) -> StoreResult<Vec<i64>>;

    /// The password hash of the account `id`.
    async fn password_hash(&self, id: Uuid) -> StoreResult<Option<String>>;

    /// Replaces a user's public key; `None` if the user does not exist.
    async fn set_public_key(
        &self,
        id: Uuid,
        key: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<Option<User>>;

    /// Stores the first refresh token of a new session, unless the user is
    /// disabled or gone by now (checked in the same statement, so a login
    /// racing `disable_user` cannot slip a session past it). Returns whether
    /// it was stored.
    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<bool>;

    /// Spends the token with hash `presented` and stores `next` (whose
    /// `user_id` and `family_id` are taken from the spent one) in the same
    /// transaction. Presenting a spent token revokes all of the user's tokens.
    async fn rotate_refresh_token(
        &self,
        presented: &[u8; 32],
        next_hash: &[u8; 32],
        next_expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<Rotation>;

    /// Revokes the user's session `only`, or every session of the user:
    /// records them in `revoked_sessions` and deletes their refresh tokens,
    /// in one transaction. Returns the revoked session ids.
    async fn revoke_sessions(
        &self,
        user_id: Uuid,
        only: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>>;

    /// Sessions revoked at or after `since`, by any process: at start-up,
    /// the ones whose access tokens may still be unexpired; then, polled,
    /// the ones other processes revoked since the last look.
    async fn revoked_sessions(&self, since: DateTime<Utc>) -> StoreResult<Vec<Revoked>>;

    /// Forgets up to `limit` revocations made before `before`; returns how
    /// many.
    async fn purge_revoked_sessions(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64>;

    /// Replaces the user's password hash and revokes every session, in one
    /// transaction. Returns the revoked session ids.
    async fn set_password(
        &self,
        user_id: Uuid,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>>;

    /// Deletes the account with its key, refresh tokens and queued messages,
    /// revoking every session, in one transaction. Returns the revoked
    /// session ids, or `None` if there was no such user.
    async fn delete_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>>;

    /// How many messages wait for `recipient`.
    async fn queued_count(&self, recipient: Uuid) -> StoreResult<u64>;

    /// How many messages are queued in all, and for the busiest recipient,
    /// in one aggregate query: the sweeper samples it for the metrics. It
    /// reads the whole `(recipient, id)` index, so it runs once per sweep
    /// and only with metrics on.
    async fn queue_depth(&self) -> StoreResult<QueueDepth>;

    /// Deletes up to `limit` refresh tokens past their expiry; returns how
    /// many.
    async fn purge_refresh_tokens(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64>;

    /// Inserts `messages` and applies `acks` in one transaction. Returns the
    /// ids the acks deleted; an ack for an id that is unknown or addressed to
    /// someone else deletes nothing.
    async fn write_batch(&self, messages: Vec<SealedRow>, acks: &[Ack]) -> StoreResult<Vec<Uuid>>;

    /// Up to `limit` of `recipient`'s queued messages with ids after `after`,
    /// oldest first.
    async fn fetch(&self, recipient: Uuid, after: Uuid, limit: u32) -> StoreResult<Vec<StoredRow>>;

    /// Up to `limit` queued messages with ids after `after`, in id order, that
    /// are not sealed under `current`: legacy plaintext rows and rows of older
    /// keys, for the sweeper to seal again.
    async fn stale_rows(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<StoredRow>>;

    /// Replaces the content of each row by its new sealing, dropping any
    /// plaintext; rows deleted meanwhile are skipped. Returns how many were
    /// updated.
    async fn reseal(&self, rows: Vec<SealedRow>) -> StoreResult<u64>;

    /// The distinct key ids of the sealed rows in the queue, so that start-up
    /// can refuse a key list that could not open them.
    async fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>>;

    /// Up to `limit` of the oldest queued rows sealed under `key`, so that
    /// start-up can check that the key configured under that id opens them.
    async fn sealed_with(&self, key: KeyId, limit: u32) -> StoreResult<Vec<StoredRow>>;

    /// Deletes up to `limit` messages with ids below `before`; returns how
    /// many. The sweeper calls this until it returns less than `limit`, so no
    /// single statement holds locks for long.
    async fn delete_before(&self, before: Uuid, limit: u32) -> StoreResult<u64>;
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
