//! Accounts and their devices.
//!
//! An account holds 1 to `SEALPOST_MAX_DEVICES_PER_USER` devices, numbered
//! from 1 within the account by `users.next_device_id`, so a number is never
//! reused: a removed device's tokens and queued copies can never reach a
//! later device. Each device has its own public key. Adding a device checks
//! the cap and takes the next number in one transaction that holds the
//! account's row, so concurrent additions cannot overshoot the cap or share
//! a number.

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
}

/// The outcome of adding a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddDevice {
    Added(Device),
    /// The account holds as many devices as it may.
    TooMany,
    /// The account is gone or disabled.
    NoAccount,
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
    /// Creates an account with its first device (number 1),
    /// [`super::StoreError::UsernameTaken`] if the name is in use in any
    /// letter case.
    async fn create_user(
        &self,
        user: &User,
        password_hash: &str,
        device: &Device,
    ) -> StoreResult<()>;

    async fn user(&self, id: Uuid) -> StoreResult<Option<User>>;

    /// Looks a user up by name, ignoring letter case.
    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>>;

    async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>>;

    /// The password hash of the account `id`.
    async fn password_hash(&self, id: Uuid) -> StoreResult<Option<String>>;

    /// The account's devices in number order; empty if there is no such
    /// account (every account has at least one).
    async fn devices(&self, user: Uuid) -> StoreResult<Vec<Device>>;

    /// Adds a device with the next number and its first session, in one
    /// transaction, unless the account holds `max` already or is gone or
    /// disabled.
    async fn add_device(
        &self,
        user: Uuid,
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

    /// Replaces the user's password hash and revokes every session of every
    /// device, in one transaction. Returns the revoked session ids.
    async fn set_password(
        &self,
        user_id: Uuid,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>>;

    /// Deletes the account with its devices, refresh tokens and queued
    /// messages, revoking every session, in one transaction. Returns the
    /// revoked session ids, or `None` if there was no such user.
    async fn delete_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>>;
}
