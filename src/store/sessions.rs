//! Sessions: refresh tokens and revocations.
//!
//! A session is one login of one device: a refresh-token family, whose id
//! every access token of the session carries as `sid`. Only the SHA-256 of
//! a refresh token is stored.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CredentialsVersion, DeviceId, StoreResult};

/// A refresh token as stored: only its SHA-256 hash, never the token.
#[derive(Debug, Clone)]
pub struct RefreshToken {
    pub hash: [u8; 32],
    pub user_id: Uuid,
    /// The device the session belongs to.
    pub device: DeviceId,
    /// All tokens rotated from one login share a family; it is the session id
    /// carried in the access tokens of that session.
    pub family_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// The first refresh token of a session whose device is being created with
/// it ([`super::Accounts::add_device`]): the device's number is not known
/// until then.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub hash: [u8; 32],
    pub family_id: Uuid,
    pub expires_at: DateTime<Utc>,
}

/// The outcome of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rotation {
    /// The token was live; it is now spent and its successor stored.
    Rotated {
        user_id: Uuid,
        device: DeviceId,
        family_id: Uuid,
    },
    /// The token was spent within the grace (at or after `grace_from`) and
    /// its successor, `next_hash`, is live and unspent: a client presenting
    /// it again lost the answer to its refresh. Nothing changed; the client
    /// is answered with the successor again.
    Replayed {
        user_id: Uuid,
        device: DeviceId,
        family_id: Uuid,
    },
    /// The token had been spent before (and is no replay within the grace):
    /// a sign of theft. Every session of the user has been revoked; these
    /// are their ids.
    Reused { user_id: Uuid, revoked: Vec<Uuid> },
    /// Unknown or expired.
    Invalid,
}

/// The outcome of storing a new session's first refresh token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStart {
    Started,
    /// The account is gone.
    NoAccount,
    /// An operator disabled the account.
    Disabled,
    /// The account has no such device (removed, or never added).
    NoDevice,
    /// The password changed since the one the login presented was checked.
    Stale,
}

/// A revoked session as recorded in `revoked_sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revoked {
    pub session: Uuid,
    pub user_id: Uuid,
}

#[async_trait]
pub trait Sessions: Send + Sync + 'static {
    /// Stores the first refresh token of a new session, unless the user is
    /// disabled or gone, the device removed, or the credentials no longer at
    /// version `credentials`, by now (checked in the same transaction, under
    /// the account's lock, so a login racing `disable_user`, `remove_device`
    /// or `set_password` cannot slip a session past it).
    async fn insert_refresh_token(
        &self,
        token: &RefreshToken,
        credentials: CredentialsVersion,
    ) -> StoreResult<SessionStart>;

    /// Spends the token with hash `presented` and stores `next` (whose user,
    /// device and family are taken from the spent one) in the same
    /// transaction. Presenting a spent token revokes all of the user's
    /// tokens, unless it was spent at or after `grace_from` and `next_hash`
    /// is its successor, still unspent: then nothing changes
    /// ([`Rotation::Replayed`]). `next_hash` must be derived from the
    /// presented token (`Tokens::successor`), so that the successor a
    /// replay finds is the one its rotation stored. The decision is made
    /// under the user's lock (or the single writer), so a replay and the
    /// successor's own rotation cannot both see it unspent.
    async fn rotate_refresh_token(
        &self,
        presented: &[u8; 32],
        next_hash: &[u8; 32],
        next_expires_at: DateTime<Utc>,
        grace_from: Option<DateTime<Utc>>,
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

    /// Deletes up to `limit` refresh tokens past their expiry; returns how
    /// many.
    async fn purge_refresh_tokens(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64>;
}
