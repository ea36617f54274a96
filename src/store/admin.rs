//! The operator's queries (`sealpost user`, `sealpost stats`): listings and
//! counts over the whole database, and disabling accounts. Never on a
//! request's path.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{DeviceId, KeyId, StoreResult};

/// An account as operators see it in a listing (`sealpost user list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    pub id: Uuid,
    pub username: String,
    pub created_at: DateTime<Utc>,
    /// When an operator disabled it; `None` while it is active.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Copies waiting for its devices.
    pub queued: u64,
}

/// One device as operators see it (no key, no name: names are the
/// account's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub id: DeviceId,
    pub public_key_bytes: u64,
    pub key_updated_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Copies waiting for it.
    pub queued: u64,
}

/// One account in detail (`sealpost user show`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDetails {
    pub summary: AccountSummary,
    /// In number order.
    pub devices: Vec<DeviceSummary>,
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
    pub devices: u64,
    /// Sessions that can still refresh.
    pub live_sessions: u64,
    /// Revocations kept until every access token they refuse has expired.
    pub revocations: u64,
    /// Queued copies (a message to three devices counts three).
    pub queued: u64,
    /// Accounts with at least one queued message.
    pub recipients: u64,
    /// The oldest queued message's id, whose time it encodes.
    pub oldest_queued: Option<Uuid>,
    /// Queued copies per storage key id; `None` counts legacy plaintext
    /// rows. In key id order, legacy first.
    pub by_key: Vec<(Option<KeyId>, u64)>,
}

#[async_trait]
pub trait Operator: Send + Sync + 'static {
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
}
