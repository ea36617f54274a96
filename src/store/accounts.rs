//! Accounts and their devices.
//!
//! An account holds 1 to `SEALPOST_MAX_DEVICES_PER_USER` devices, numbered
//! from 1 within the account by `users.next_device_id`, so a number is never
//! reused: a removed device's tokens and queued copies can never reach a
//! later device. Each device has its own public key. Adding a device checks
//! the cap and takes the next number in one transaction that holds the
//! account's row, so concurrent additions cannot overshoot the cap or share
//! a number.
//!
//! Credentials carry a version, bumped by every password change. A request
//! that checked the password reads the version with the hash
//! ([`Credentials`]) and may start a session only while the account is still
//! at that version ([`Verified`]): the check and the insert are two steps,
//! and a login that checked the old password just before a change must not
//! land its session just after the change revoked every other.
//!
//! Usernames are unique in any letter case and by look: each account keeps
//! the [`username_skeleton`] of its name under a unique index.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{DeviceId, NewSession, StoreResult};

/// An account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub username: String,
    pub created_at: DateTime<Utc>,
}

/// One device of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub public_key: Vec<u8>,
    pub key_updated_at: DateTime<Utc>,
    /// Seen only by the account itself.
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Its last login or token refresh (stamped in the same transaction,
    /// so it costs no write of its own).
    pub last_seen_at: DateTime<Utc>,
}

/// What login needs: the account id, its PHC-encoded argon2id hash, and
/// whether an operator disabled it.
#[derive(Clone)]
pub struct Credentials {
    pub user_id: Uuid,
    pub password_hash: String,
    pub disabled: bool,
    /// The version of the credentials this hash is, read with it.
    pub version: CredentialsVersion,
}

/// Counts an account's password changes: a session may start only on the
/// strength of a password checked at the account's current version.
pub type CredentialsVersion = i64;

/// An account whose password a request has just checked, at which version
/// of its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub user_id: Uuid,
    pub credentials: CredentialsVersion,
}

/// The key under which usernames must be unique: two names with the same
/// skeleton look alike (`alice`, `aIice`, `al1ce`, `ALICE`), and the second
/// is refused as taken.
///
/// The Unicode TR39 skeleton maps each character to the prototype of its
/// confusables (`1`, `I` and `|` to `l`, `0` to `O`, `m` to `rn`), but case
/// is not a confusable there: `i` and `I` keep apart, yet names are also
/// unique in any letter case, so `i` ~ `I` ~ `l`. Taking the skeleton of the
/// upper-cased name merges what looks alike in capitals (`I` and `l`),
/// and the skeleton of its lower-cased result what looks alike in small
/// letters (`rn` and `m`).
pub fn username_skeleton(name: &str) -> String {
    let upper: String = unicode_security::skeleton(&name.to_uppercase()).collect();
    unicode_security::skeleton(&upper.to_lowercase()).collect()
}

/// Accounts per batch of the skeleton fill at start-up (each backend's
/// `migrate`): one short read, then one indexed update each.
pub(super) const SKELETON_BATCH: i64 = 500;

/// Said by the skeleton fill of an account created before skeletons were
/// kept whose name looks like an earlier account's: the unique index
/// refuses its skeleton, so it keeps none (and is named again at every
/// start). Both accounts stay; new look-alikes of either are refused.
pub(super) fn warn_look_alike(id: Uuid) {
    tracing::warn!(user.id = %id, "this account's name looks like an earlier account's; both stay, new look-alikes are refused");
}

/// The outcome of adding a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddDevice {
    Added(Device),
    /// The account holds as many devices as it may.
    TooMany,
    /// The account is gone or disabled.
    NoAccount,
    /// The password changed since the request's was checked.
    Stale,
}

/// The outcome of removing a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveDevice {
    /// Removed with its key and queue; these sessions of it were revoked.
    Removed { revoked: Vec<Uuid> },
    /// The account has no such device.
    NotFound,
    /// It is the account's only device: delete the account instead.
    Last,
}

/// The one read of [`Accounts`] that every send makes, on its own so that
/// the device directory (and its test fakes) need nothing else.
#[async_trait]
pub trait DeviceIds: Send + Sync + 'static {
    /// The account's device numbers in order; empty if there is no such
    /// account. What the delivery core checks a send's envelopes against.
    async fn device_ids(&self, user: Uuid) -> StoreResult<Vec<DeviceId>>;
}

#[async_trait]
pub trait Accounts: DeviceIds {
    /// Creates an account with its first device (number 1) and that
    /// device's first session, in one transaction (a client whose reply is
    /// lost finds no account left behind without a session),
    /// [`super::StoreError::UsernameTaken`] if the name is in use in any
    /// letter case, or one with the same [`username_skeleton`] is.
    async fn create_user(
        &self,
        user: &User,
        password_hash: &str,
        device: &Device,
        session: &NewSession,
    ) -> StoreResult<()>;

    async fn user(&self, id: Uuid) -> StoreResult<Option<User>>;

    /// Looks a user up by name, ignoring letter case.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>>;

    /// Whether an account has this name, or one that looks like it (the
    /// same [`username_skeleton`]).
    async fn name_taken(&self, username: &str) -> StoreResult<bool>;

    async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>>;

    /// The password hash of the account `id`.
    async fn password_hash(&self, id: Uuid) -> StoreResult<Option<String>>;

    /// The account's devices in number order; empty if there is no such
    /// account (every account has at least one).
    async fn devices(&self, user: Uuid) -> StoreResult<Vec<Device>>;

    /// Adds a device with the next number and its first session, in one
    /// transaction, unless the account holds `max` already, is gone or
    /// disabled, or its password changed since `account` was verified.
    async fn add_device(
        &self,
        account: Verified,
        public_key: &[u8],
        name: Option<&str>,
        max: u32,
        session: &NewSession,
        now: DateTime<Utc>,
    ) -> StoreResult<AddDevice>;

    /// Renames one of the account's devices; `None` if it has no such
    /// device.
    async fn rename_device(
        &self,
        user: Uuid,
        device: DeviceId,
        name: Option<&str>,
    ) -> StoreResult<Option<Device>>;

    /// Replaces a device's public key; `None` if there is no such device.
    async fn set_device_key(
        &self,
        user: Uuid,
        device: DeviceId,
        key: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<Option<Device>>;

    /// Removes a device with its key, sessions and queued copies, in one
    /// transaction, unless it is the account's last.
    async fn remove_device(
        &self,
        user: Uuid,
        device: DeviceId,
        now: DateTime<Utc>,
    ) -> StoreResult<RemoveDevice>;

    /// Replaces the user's password hash, bumps its credentials version and
    /// revokes every session of every device, in one transaction. Returns
    /// the revoked session ids and the new version, or `None` if there is no
    /// such user.
    async fn set_password(
        &self,
        user_id: Uuid,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Vec<Uuid>, CredentialsVersion)>>;

    /// Deletes the account with its devices, refresh tokens and queued
    /// messages, revoking every session, in one transaction. Returns the
    /// revoked session ids, or `None` if there was no such user.
    async fn delete_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_alike_names_share_a_skeleton() {
        let alice = username_skeleton("alice");
        for twin in [
            "al1ce", "aI1ce", "aIice", "ALICE", "AL1CE", "a1ice", "Alice",
        ] {
            assert_eq!(username_skeleton(twin), alice, "{twin}");
        }
        assert_eq!(username_skeleton("b0b"), username_skeleton("bob"));
        assert_eq!(username_skeleton("B0B"), username_skeleton("bob"));
        assert_eq!(username_skeleton("rnallory"), username_skeleton("mallory"));
        for other in ["alicia", "bob", "carol", "alice2", "a.lice"] {
            assert_ne!(username_skeleton(other), alice, "{other}");
        }
    }
}
