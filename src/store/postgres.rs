//! The PostgreSQL store, for production.
//!
//! Two pools: one sized to the machine for requests, the sweeper and
//! account writes, and the committer's own two connections. The queue's
//! write side arrives in batches from the committer and goes out as
//! multi-row statements in one transaction: `INSERT ... SELECT FROM
//! UNNEST(...)` for new messages (and their send keys), and `DELETE ...
//! USING UNNEST(...) RETURNING` the deleted rows for acks, a statement per
//! [`ACKS_PER_STATEMENT`].

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::push::target::Kind;

use sqlx::AssertSqlSafe;

use super::accounts::{SKELETON_BATCH, warn_look_alike};
use super::push::{
    Coalescing, Column, Decision, DueRow, DueWakeup, PushStore, Scheduled, TargetSummary,
    TargetSummaryRow, TimesRow, WakeupRow, WakeupUpdate, Wanted, decide, kind_count, lock_order,
};
use super::queue::QUEUE_COLUMNS;
use super::{
    AccountDetails, AccountSummary, Accounts, Ack, AddDevice, Credentials, CredentialsVersion,
    Device, DeviceId, DeviceIds, DeviceSummary, KeyId, NewSession, Operator, Queue, QueueDepth,
    QueueMaintenance, QueueShare, RefreshToken, RemoveDevice, Revoked, Rotation, SealedBody,
    SealedKey, SealedRow, SessionStart, Sessions, Stats, Store, StoreError, StoreResult, StoredRow,
    User, Verified, username_skeleton,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a request waits for a pooled connection before it fails with 503
/// rather than queueing without bound behind a dead database.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PgStore {
    /// Requests, the sweeper and account writes.
    pool: PgPool,
    /// The committer's own connections, so that a burst of reads can never
    /// make a write batch wait for a connection (and fail every send in it).
    writer: PgPool,
}

/// The committer runs one batch at a time; the second connection covers a
/// reconnect without waiting for the first to be reaped.
const WRITER_CONNECTIONS: u32 = 2;

/// Acks per delete statement. Given one array of a whole batch's acks
/// (thousands in a backlog drain), the planner chose to hash the entire
/// queue table and join, a full scan per commit (65 ms a batch on a 100k-row
/// queue, the drain at 25k msgs/s instead of 100k); at a few hundred ids it
/// looks each up in the index.
const ACKS_PER_STATEMENT: usize = 500;

type UserRow = (Uuid, String, DateTime<Utc>);

fn user_from_row((id, username, created_at): UserRow) -> User {
    User {
        id,
        username,
        created_at,
    }
}

/// `device_id, public_key, key_updated_at, name, created_at, last_seen_at`.
type DeviceRow = (
    i32,
    Vec<u8>,
    DateTime<Utc>,
    Option<String>,
    DateTime<Utc>,
    DateTime<Utc>,
);

const DEVICE_COLUMNS: &str =
    "device_id, public_key, key_updated_at, name, created_at, last_seen_at";

fn device_from_row(
    (id, public_key, key_updated_at, name, created_at, last_seen_at): DeviceRow,
) -> Device {
    Device {
        id: id as DeviceId,
        public_key,
        key_updated_at,
        name,
        created_at,
        last_seen_at,
    }
}

/// A device id as PostgreSQL's `integer` binds it. Ids are at most
/// [`super::MAX_DEVICE_ID`], so the conversion is exact.
fn pg_device(device: DeviceId) -> i32 {
    device.min(super::MAX_DEVICE_ID) as i32
}

type QueueRow = super::queue::QueueColumns<DateTime<Utc>, i32>;

/// `id, username, created_at, disabled_at, queued`, as the account queries
/// select them.
type SummaryRow = (Uuid, String, DateTime<Utc>, Option<DateTime<Utc>>, i64);

fn summary_from_row((id, username, created_at, disabled_at, queued): SummaryRow) -> AccountSummary {
    AccountSummary {
        id,
        username,
        created_at,
        disabled_at,
        queued: queued as u64,
    }
}

fn stored_rows(rows: Vec<QueueRow>) -> StoreResult<Vec<StoredRow>> {
    rows.into_iter()
        .map(
            |(id, recipient, device, sent_at, key_id, sealed, sender, body, tag)| {
                StoredRow::from_columns((
                    id,
                    recipient,
                    device as DeviceId,
                    sent_at,
                    key_id,
                    sealed,
                    sender,
                    body,
                    tag,
                ))
            },
        )
        .collect()
}

/// Splits sealed rows into the column arrays that `UNNEST` binds.
#[derive(Default)]
struct Columns {
    ids: Vec<Uuid>,
    recipients: Vec<Uuid>,
    devices: Vec<i32>,
    sent_at: Vec<DateTime<Utc>>,
    key_ids: Vec<KeyId>,
    sealed: Vec<Vec<u8>>,
    sender_tags: Vec<Option<Vec<u8>>>,
}

impl Columns {
    fn of(rows: Vec<SealedRow>) -> Self {
        let mut columns = Columns::default();
        for row in rows {
            columns.ids.push(row.id);
            columns.recipients.push(row.recipient);
            columns.devices.push(pg_device(row.device));
            columns.sent_at.push(row.sent_at);
            columns.key_ids.push(row.key_id);
            columns.sealed.push(row.sealed);
            columns.sender_tags.push(row.sender_tag.map(|t| t.to_vec()));
        }
        columns
    }
}

impl PgStore {
    pub async fn connect(url: &str, pool_size: u32) -> StoreResult<Self> {
        let options: PgConnectOptions = url.parse().map_err(StoreError::Database)?;
        let options = options
            .application_name("sealpost")
            // A queue table swings between empty and full. A generic plan
            // made while it was empty (the first few reads of a quiet
            // server) was a sequential scan, then kept for every later read
            // of a full queue: the backlog drain ran 4x slower. A plan made
            // for each execution, with its values, costs a few microseconds.
            .options([("plan_cache_mode", "force_custom_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let writer = PgPoolOptions::new()
            .max_connections(WRITER_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        Ok(Self { pool, writer })
    }

    /// Fills in the skeleton of every account created before skeletons
    /// were kept, a batch at a time in id order. An account whose name
    /// looks like an earlier one's keeps none (the unique index refuses
    /// it): it stays, and a warning names it.
    async fn fill_skeletons(&self) -> StoreResult<()> {
        let mut after = Uuid::nil();
        loop {
            let batch: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT id, username FROM users
                 WHERE username_skeleton IS NULL AND id > $1 ORDER BY id LIMIT $2",
            )
            .bind(after)
            .bind(SKELETON_BATCH)
            .fetch_all(&self.pool)
            .await?;
            let Some((last, _)) = batch.last() else {
                return Ok(());
            };
            after = *last;
            for (id, username) in batch {
                let done = sqlx::query(
                    "UPDATE users SET username_skeleton = $2
                     WHERE id = $1 AND username_skeleton IS NULL",
                )
                .bind(id)
                .bind(username_skeleton(&username))
                .execute(&self.pool)
                .await;
                match done {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e))
                        if e.constraint() == Some("users_username_skeleton") =>
                    {
                        warn_look_alike(id)
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        // sqlx takes an advisory lock, so several servers starting at once
        // migrate one after another.
        MIGRATOR.run(&self.pool).await?;
        self.fill_skeletons().await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[async_trait]
impl DeviceIds for PgStore {
    async fn device_ids(&self, user: Uuid) -> StoreResult<Vec<DeviceId>> {
        let ids: Vec<i32> = sqlx::query_scalar(
            "SELECT device_id FROM devices WHERE user_id = $1 ORDER BY device_id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(|id| id as DeviceId).collect())
    }
}

#[async_trait]
impl Accounts for PgStore {
    async fn create_user(
        &self,
        user: &User,
        password_hash: &str,
        device: &Device,
        session: &NewSession,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        let result = sqlx::query(
            "INSERT INTO users (id, username, password_hash, created_at, username_skeleton)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(user.id)
        .bind(user.username.clone())
        .bind(password_hash.to_owned())
        .bind(user.created_at)
        .bind(username_skeleton(&user.username))
        .execute(&mut *tx)
        .await;
        match result {
            Ok(_) => {}
            Err(sqlx::Error::Database(e))
                if matches!(
                    e.constraint(),
                    Some("users_username_lower" | "users_username_skeleton")
                ) =>
            {
                return Err(StoreError::UsernameTaken);
            }
            Err(e) => return Err(e.into()),
        }
        insert_device(&mut tx, user.id, device).await?;
        insert_session(&mut tx, user.id, device.id, session, user.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn user(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row: Option<UserRow> =
            sqlx::query_as("SELECT id, username, created_at FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(user_from_row))
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, username, created_at FROM users WHERE lower(username) = lower($1)",
        )
        .bind(username.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(user_from_row))
    }

    async fn name_taken(&self, username: &str) -> StoreResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM users
                 WHERE lower(username) = lower($1) OR username_skeleton = $2)",
        )
        .bind(username.to_owned())
        .bind(username_skeleton(username))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn password_hash(&self, id: Uuid) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>> {
        let row: Option<(Uuid, String, bool, i64)> = sqlx::query_as(
            "SELECT id, password_hash, disabled_at IS NOT NULL, credentials_version FROM users
             WHERE lower(username) = lower($1)",
        )
        .bind(username.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(user_id, password_hash, disabled, version)| Credentials {
                user_id,
                password_hash,
                disabled,
                version,
            }),
        )
    }

    async fn devices(&self, user: Uuid) -> StoreResult<Vec<Device>> {
        let rows: Vec<DeviceRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = $1 ORDER BY device_id"
        )))
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(device_from_row).collect())
    }

    async fn add_device(
        &self,
        account: Verified,
        public_key: &[u8],
        name: Option<&str>,
        max: u32,
        session: &NewSession,
        now: DateTime<Utc>,
    ) -> StoreResult<AddDevice> {
        let user = account.user_id;
        let mut tx = self.pool.begin().await?;
        // The account's row lock serialises additions: the count and the
        // number taken cannot race another addition, nor a disable, nor a
        // password change.
        let row: Option<(i32, i64)> = sqlx::query_as(
            "SELECT next_device_id, credentials_version FROM users
             WHERE id = $1 AND disabled_at IS NULL FOR UPDATE",
        )
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((next, version)) = row else {
            return Ok(AddDevice::NoAccount);
        };
        if version != account.credentials {
            return Ok(AddDevice::Stale);
        }
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE user_id = $1")
            .bind(user)
            .fetch_one(&mut *tx)
            .await?;
        if count >= i64::from(max) || next == i32::MAX {
            return Ok(AddDevice::TooMany);
        }
        sqlx::query("UPDATE users SET next_device_id = next_device_id + 1 WHERE id = $1")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        let device = Device {
            id: next as DeviceId,
            public_key: public_key.to_vec(),
            key_updated_at: now,
            name: name.map(str::to_owned),
            created_at: now,
            last_seen_at: now,
        };
        insert_device(&mut tx, user, &device).await?;
        insert_session(&mut tx, user, device.id, session, now).await?;
        tx.commit().await?;
        Ok(AddDevice::Added(device))
    }

    async fn rename_device(
        &self,
        user: Uuid,
        device: DeviceId,
        name: Option<&str>,
    ) -> StoreResult<Option<Device>> {
        let row: Option<DeviceRow> = sqlx::query_as(AssertSqlSafe(format!(
            "UPDATE devices SET name = $3 WHERE user_id = $1 AND device_id = $2
             RETURNING {DEVICE_COLUMNS}"
        )))
        .bind(user)
        .bind(pg_device(device))
        .bind(name.map(str::to_owned))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(device_from_row))
    }

    async fn set_device_key(
        &self,
        user: Uuid,
        device: DeviceId,
        key: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<Option<Device>> {
        let row: Option<DeviceRow> = sqlx::query_as(AssertSqlSafe(format!(
            "UPDATE devices SET public_key = $3, key_updated_at = $4
             WHERE user_id = $1 AND device_id = $2
             RETURNING {DEVICE_COLUMNS}"
        )))
        .bind(user)
        .bind(pg_device(device))
        .bind(key.to_vec())
        .bind(at)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(device_from_row))
    }

    async fn remove_device(
        &self,
        user: Uuid,
        device: DeviceId,
        now: DateTime<Utc>,
    ) -> StoreResult<RemoveDevice> {
        let mut tx = self.pool.begin().await?;
        // The row lock orders this against additions, logins and rotations
        // of the account.
        if !lock_user(&mut tx, user).await? {
            return Ok(RemoveDevice::NotFound);
        }
        let (exists, count): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2),
                    (SELECT count(*) FROM devices WHERE user_id = $1)",
        )
        .bind(user)
        .bind(pg_device(device))
        .fetch_one(&mut *tx)
        .await?;
        if !exists {
            return Ok(RemoveDevice::NotFound);
        }
        if count <= 1 {
            return Ok(RemoveDevice::Last);
        }
        let revoked = revoke_in(&mut tx, user, Revoke::Device(device), now).await?;
        mark_changed(&mut tx, user, now).await?;
        for statement in [
            "DELETE FROM devices WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM messages WHERE recipient = $1 AND device_id = $2",
        ] {
            sqlx::query(statement)
                .bind(user)
                .bind(pg_device(device))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(RemoveDevice::Removed { revoked })
    }

    async fn set_password(
        &self,
        user_id: Uuid,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<(Vec<Uuid>, CredentialsVersion)>> {
        let mut tx = self.pool.begin().await?;
        // The UPDATE takes the row lock first, as every writer of the
        // account does, then the revocation sees every session committed
        // before it; a login checked against the old version that commits
        // after it is refused (`insert_refresh_token`).
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE users SET password_hash = $2, credentials_version = credentials_version + 1
             WHERE id = $1 RETURNING credentials_version",
        )
        .bind(user_id)
        .bind(password_hash)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(version) = version else {
            return Ok(None);
        };
        let revoked = revoke_in(&mut tx, user_id, Revoke::All, now).await?;
        tx.commit().await?;
        Ok(Some((revoked, version)))
    }

    async fn delete_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        let mut tx = self.pool.begin().await?;
        if !lock_user(&mut tx, user_id).await? {
            return Ok(None);
        }
        let revoked = revoke_in(&mut tx, user_id, Revoke::All, now).await?;
        mark_changed(&mut tx, user_id, now).await?;
        sqlx::query("DELETE FROM messages WHERE recipient = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(revoked))
    }
}

#[async_trait]
impl Sessions for PgStore {
    async fn insert_refresh_token(
        &self,
        token: &RefreshToken,
        credentials: CredentialsVersion,
    ) -> StoreResult<SessionStart> {
        // The account's row lock first, as every writer of the account
        // takes it (`set_password`, `disable_user`, `delete_user`,
        // `remove_device`, rotations): this waits for one holding it, and
        // the statements after the lock see what it committed (each
        // statement of a READ COMMITTED transaction reads afresh), so no
        // session lands just after a revocation deleted the others. One
        // order of locks for all (the user's row, then the device's) and
        // no lock taken shared then raised: two logins of one device that
        // each held its row FOR SHARE, then both wanted to update it
        // (`seen`), deadlocked.
        let mut tx = self.pool.begin().await?;
        let account: Option<(i64, bool)> = sqlx::query_as(
            "SELECT credentials_version, disabled_at IS NOT NULL FROM users
             WHERE id = $1 FOR UPDATE",
        )
        .bind(token.user_id)
        .fetch_optional(&mut *tx)
        .await?;
        match account {
            None => return Ok(SessionStart::NoAccount),
            Some((_, true)) => return Ok(SessionStart::Disabled),
            Some((version, false)) if version != credentials => return Ok(SessionStart::Stale),
            Some(_) => {}
        }
        let done = sqlx::query(
            "INSERT INTO refresh_tokens
                 (token_hash, user_id, device_id, family_id, expires_at, created_at)
             SELECT $1, user_id, device_id, $3, $4, now() FROM devices
             WHERE user_id = $2 AND device_id = $5",
        )
        .bind(token.hash.to_vec())
        .bind(token.user_id)
        .bind(token.family_id)
        .bind(token.expires_at)
        .bind(pg_device(token.device))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(SessionStart::NoDevice);
        }
        seen(&mut tx, token.user_id, token.device, super::now()).await?;
        tx.commit().await?;
        Ok(SessionStart::Started)
    }

    async fn rotate_refresh_token(
        &self,
        presented: &[u8; 32],
        next_hash: &[u8; 32],
        next_expires_at: DateTime<Utc>,
        grace_from: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<Rotation> {
        let mut tx = self.pool.begin().await?;
        // Serialise every rotation and revocation of one user on the user's
        // row. Without it, under READ COMMITTED, a revoking DELETE whose
        // snapshot predates a concurrent rotation would miss the token that
        // rotation inserts, and a thief refreshing in a loop would keep one.
        let owner: Option<Uuid> = sqlx::query_scalar(
            "SELECT u.id FROM refresh_tokens t JOIN users u ON u.id = t.user_id
             WHERE t.token_hash = $1 FOR UPDATE OF u",
        )
        .bind(presented.to_vec())
        .fetch_optional(&mut *tx)
        .await?;
        if owner.is_none() {
            return Ok(Rotation::Invalid);
        }
        // Spending is one conditional UPDATE: of two presentations of the
        // same token, exactly one sees `used_at IS NULL`.
        let spent: Option<(Uuid, i32, Uuid)> = sqlx::query_as(
            "UPDATE refresh_tokens SET used_at = $2
             WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2
             RETURNING user_id, device_id, family_id",
        )
        .bind(presented.to_vec())
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let rotation = match spent {
            Some((user_id, device, family_id)) => {
                sqlx::query(
                    "INSERT INTO refresh_tokens
                         (token_hash, user_id, device_id, family_id, expires_at, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(next_hash.to_vec())
                .bind(user_id)
                .bind(device)
                .bind(family_id)
                .bind(next_expires_at)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                seen(&mut tx, user_id, device as DeviceId, now).await?;
                Rotation::Rotated {
                    user_id,
                    device: device as DeviceId,
                    family_id,
                }
            }
            None => {
                let previous: Option<(Uuid, i32, Uuid, Option<DateTime<Utc>>)> = sqlx::query_as(
                    "SELECT user_id, device_id, family_id, used_at FROM refresh_tokens
                     WHERE token_hash = $1",
                )
                .bind(presented.to_vec())
                .fetch_optional(&mut *tx)
                .await?;
                match previous {
                    Some((user_id, device, family_id, Some(used_at))) => {
                        let in_grace = grace_from.is_some_and(|from| used_at >= from);
                        // The successor this token's rotation stored, if it
                        // is still there and unspent. The user's row lock
                        // above keeps its own rotation from interleaving.
                        let successor_live = in_grace
                            && sqlx::query_scalar::<_, bool>(
                                "SELECT used_at IS NULL AND expires_at > $3 FROM refresh_tokens
                                 WHERE token_hash = $1 AND family_id = $2",
                            )
                            .bind(next_hash.to_vec())
                            .bind(family_id)
                            .bind(now)
                            .fetch_optional(&mut *tx)
                            .await?
                            .unwrap_or(false);
                        if successor_live {
                            seen(&mut tx, user_id, device as DeviceId, now).await?;
                            Rotation::Replayed {
                                user_id,
                                device: device as DeviceId,
                                family_id,
                            }
                        } else {
                            let revoked = revoke_in(&mut tx, user_id, Revoke::All, now).await?;
                            Rotation::Reused { user_id, revoked }
                        }
                    }
                    _ => Rotation::Invalid,
                }
            }
        };
        tx.commit().await?;
        Ok(rotation)
    }

    async fn revoke_sessions(
        &self,
        user_id: Uuid,
        only: Option<Uuid>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.pool.begin().await?;
        lock_user(&mut tx, user_id).await?;
        let scope = only.map_or(Revoke::All, Revoke::Session);
        let revoked = revoke_in(&mut tx, user_id, scope, now).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn revoked_sessions(&self, since: DateTime<Utc>) -> StoreResult<Vec<Revoked>> {
        let rows: Vec<(Uuid, Uuid)> =
            sqlx::query_as("SELECT id, user_id FROM revoked_sessions WHERE revoked_at >= $1")
                .bind(since)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(session, user_id)| Revoked { session, user_id })
            .collect())
    }

    async fn purge_revoked_sessions(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM revoked_sessions WHERE id IN
             (SELECT id FROM revoked_sessions WHERE revoked_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn purge_refresh_tokens(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM refresh_tokens WHERE token_hash IN
             (SELECT token_hash FROM refresh_tokens WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Operator for PgStore {
    async fn disable_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        let mut tx = self.pool.begin().await?;
        // The row lock orders this against logins inserting a session (see
        // `insert_refresh_token`) and against rotations.
        if !lock_user(&mut tx, user_id).await? {
            return Ok(None);
        }
        sqlx::query("UPDATE users SET disabled_at = COALESCE(disabled_at, $2) WHERE id = $1")
            .bind(user_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let revoked = revoke_in(&mut tx, user_id, Revoke::All, now).await?;
        tx.commit().await?;
        Ok(Some(revoked))
    }

    async fn enable_user(&self, user_id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE users SET disabled_at = NULL WHERE id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<AccountSummary>> {
        let rows: Vec<SummaryRow> = sqlx::query_as(
            "SELECT u.id, u.username, u.created_at, u.disabled_at,
                    (SELECT count(*) FROM messages m WHERE m.recipient = u.id)
             FROM users u
             WHERE $1::text IS NULL OR lower(u.username) > lower($1)
             ORDER BY lower(u.username) LIMIT $2",
        )
        .bind(after.map(str::to_owned))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(summary_from_row).collect())
    }

    async fn account_details(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<AccountDetails>> {
        type Row = (
            Uuid,
            String,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            i64,
            i64,
            Option<Uuid>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT u.id, u.username, u.created_at, u.disabled_at,
                    (SELECT count(*) FROM messages m WHERE m.recipient = u.id),
                    (SELECT count(*) FROM refresh_tokens t
                     WHERE t.user_id = u.id AND t.used_at IS NULL AND t.expires_at > $2),
                    (SELECT m.id FROM messages m WHERE m.recipient = u.id ORDER BY m.id LIMIT 1)
             FROM users u WHERE u.id = $1",
        )
        .bind(id)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some((id, username, created, disabled, queued, sessions, oldest)) = row else {
            return Ok(None);
        };
        type DeviceSummaryRow = (i32, i64, DateTime<Utc>, DateTime<Utc>, DateTime<Utc>, i64);
        let devices: Vec<DeviceSummaryRow> = sqlx::query_as(
            "SELECT d.device_id, octet_length(d.public_key)::int8, d.key_updated_at,
                    d.created_at, d.last_seen_at,
                    (SELECT count(*) FROM messages m
                     WHERE m.recipient = d.user_id AND m.device_id = d.device_id)
             FROM devices d WHERE d.user_id = $1 ORDER BY d.device_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(AccountDetails {
            summary: summary_from_row((id, username, created, disabled, queued)),
            devices: devices
                .into_iter()
                .map(
                    |(device, key_bytes, key_updated_at, created_at, last_seen_at, queued)| {
                        DeviceSummary {
                            id: device as DeviceId,
                            public_key_bytes: key_bytes as u64,
                            key_updated_at,
                            created_at,
                            last_seen_at,
                            queued: queued as u64,
                        }
                    },
                )
                .collect(),
            live_sessions: sessions as u64,
            oldest_queued: oldest,
        }))
    }

    async fn stats(&self, now: DateTime<Utc>) -> StoreResult<Stats> {
        type Row = (i64, i64, i64, i64, i64, i64, Option<Uuid>);
        let (users, disabled_users, devices, live_sessions, revocations, recipients, oldest_queued): Row =
            sqlx::query_as(
                "SELECT (SELECT count(*) FROM users),
                        (SELECT count(*) FROM users WHERE disabled_at IS NOT NULL),
                        (SELECT count(*) FROM devices),
                        (SELECT count(*) FROM refresh_tokens WHERE used_at IS NULL AND expires_at > $1),
                        (SELECT count(*) FROM revoked_sessions),
                        (SELECT count(DISTINCT recipient) FROM messages),
                        (SELECT id FROM messages ORDER BY id LIMIT 1)",
            )
            .bind(now)
            .fetch_one(&self.pool)
            .await?;
        let by_key: Vec<(Option<KeyId>, i64)> = sqlx::query_as(
            "SELECT key_id, count(*) FROM messages GROUP BY key_id ORDER BY key_id NULLS FIRST",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(Stats {
            users: users as u64,
            disabled_users: disabled_users as u64,
            devices: devices as u64,
            live_sessions: live_sessions as u64,
            revocations: revocations as u64,
            queued: by_key.iter().map(|(_, n)| *n as u64).sum(),
            recipients: recipients as u64,
            oldest_queued,
            by_key: by_key.into_iter().map(|(k, n)| (k, n as u64)).collect(),
        })
    }

    async fn pending_migrations(&self) -> StoreResult<Vec<i64>> {
        let migrated: bool =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
                .fetch_one(&self.pool)
                .await?;
        let applied: Vec<i64> = if migrated {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(super::pending(&MIGRATOR, &applied))
    }
}

#[async_trait]
impl Queue for PgStore {
    async fn write_batch(
        &self,
        bodies: Vec<SealedBody>,
        messages: Vec<SealedRow>,
        keys: &[SealedKey],
        acks: &[Ack],
    ) -> StoreResult<Vec<StoredRow>> {
        let mut tx = self.writer.begin().await?;
        if !bodies.is_empty() {
            let (mut ids, mut sent_at, mut key_ids, mut sealed) = (
                Vec::with_capacity(bodies.len()),
                Vec::with_capacity(bodies.len()),
                Vec::with_capacity(bodies.len()),
                Vec::with_capacity(bodies.len()),
            );
            for body in bodies {
                ids.push(body.id);
                sent_at.push(body.sent_at);
                key_ids.push(body.key_id);
                sealed.push(body.sealed);
            }
            sqlx::query(
                "INSERT INTO shared_bodies (id, sent_at, key_id, sealed)
                 SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::int2[], $4::bytea[])
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(ids)
            .bind(sent_at)
            .bind(key_ids)
            .bind(sealed)
            .execute(&mut *tx)
            .await?;
        }
        if !keys.is_empty() {
            // One key per message and one message per key: no row is named
            // twice in the statement.
            sqlx::query(
                "INSERT INTO send_keys (key_hash, account_tag, key_id, answer, expires_at)
                 SELECT * FROM UNNEST($1::bytea[], $2::bytea[], $3::int2[], $4::bytea[],
                                      $5::timestamptz[])
                 ON CONFLICT (key_hash)
                 DO UPDATE SET account_tag = EXCLUDED.account_tag, key_id = EXCLUDED.key_id,
                               answer = EXCLUDED.answer, expires_at = EXCLUDED.expires_at",
            )
            .bind(keys.iter().map(|k| k.hash.as_slice()).collect::<Vec<_>>())
            .bind(
                keys.iter()
                    .map(|k| k.account.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(keys.iter().map(|k| k.key_id).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.answer.as_slice()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.expires_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        if !messages.is_empty() {
            let columns = Columns::of(messages);
            sqlx::query(
                "INSERT INTO messages (id, recipient, device_id, sent_at, key_id, sealed, sender_tag)
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::timestamptz[],
                                      $5::int2[], $6::bytea[], $7::bytea[])",
            )
            .bind(columns.ids)
            .bind(columns.recipients)
            .bind(columns.devices)
            .bind(columns.sent_at)
            .bind(columns.key_ids)
            .bind(columns.sealed)
            .bind(columns.sender_tags)
            .execute(&mut *tx)
            .await?;
        }
        let mut deleted = Vec::with_capacity(acks.len());
        for chunk in acks.chunks(ACKS_PER_STATEMENT) {
            let gone: Vec<QueueRow> = sqlx::query_as(
                "DELETE FROM messages m
                 USING UNNEST($1::uuid[], $2::uuid[], $3::int4[]) AS a (id, recipient, device_id)
                 WHERE m.id = a.id AND m.device_id = a.device_id AND m.recipient = a.recipient
                 RETURNING m.id, m.recipient, m.device_id, m.sent_at, m.key_id, m.sealed,
                           m.sender, m.body, m.sender_tag",
            )
            .bind(chunk.iter().map(|a| a.id).collect::<Vec<_>>())
            .bind(chunk.iter().map(|a| a.recipient).collect::<Vec<_>>())
            .bind(
                chunk
                    .iter()
                    .map(|a| pg_device(a.device))
                    .collect::<Vec<_>>(),
            )
            .fetch_all(&mut *tx)
            .await?;
            deleted.extend(stored_rows(gone)?);
        }
        if !deleted.is_empty() {
            // The shared bodies whose last copy this batch acked. Two acks
            // committed at once on two nodes may each still see the
            // other's row and both keep the body: the sweeper deletes it.
            let mut acked: Vec<Uuid> = deleted.iter().map(StoredRow::id).collect();
            acked.sort_unstable();
            acked.dedup();
            sqlx::query(
                "DELETE FROM shared_bodies b WHERE b.id = ANY($1)
                   AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = b.id)",
            )
            .bind(acked)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn shared_bodies(&self, ids: &[Uuid]) -> StoreResult<Vec<SealedBody>> {
        let rows: Vec<(Uuid, DateTime<Utc>, KeyId, Vec<u8>)> = sqlx::query_as(
            "SELECT id, sent_at, key_id, sealed FROM shared_bodies WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(sealed_bodies(rows))
    }

    async fn sent_key(
        &self,
        hashes: &[Vec<u8>],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SealedKey>> {
        let row: Option<(Vec<u8>, Vec<u8>, KeyId, Vec<u8>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT key_hash, account_tag, key_id, answer, expires_at FROM send_keys
             WHERE key_hash = ANY($1) AND expires_at > $2 LIMIT 1",
        )
        .bind(hashes)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(hash, account, key_id, answer, expires_at)| SealedKey {
                hash,
                account,
                key_id,
                answer,
                expires_at,
            }),
        )
    }

    async fn forget_sender_keys(&self, accounts: &[Vec<u8>]) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM send_keys WHERE account_tag = ANY($1)")
            .bind(accounts)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn queued_sizes(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, u64)>> {
        // The length of a value, not the value: PostgreSQL reads it from a TOASTed value's header.
        // A shared copy's page carries its shared body too.
        let sizes: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT m.id, (COALESCE(octet_length(m.sealed), octet_length(m.body), 0)
                           + COALESCE((SELECT octet_length(b.sealed) FROM shared_bodies b
                                       WHERE b.id = m.id), 0))::int8
             FROM messages m
             WHERE m.recipient = $1 AND m.device_id = $2 AND m.id > $3 ORDER BY m.id LIMIT $4",
        )
        .bind(recipient)
        .bind(pg_device(device))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(sizes
            .into_iter()
            .map(|(id, size)| (id, size.max(0) as u64))
            .collect())
    }

    async fn fetch_through(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        through: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<StoredRow>> {
        let rows: Vec<QueueRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {QUEUE_COLUMNS} FROM messages
             WHERE recipient = $1 AND device_id = $2 AND id > $3 AND id <= $4 ORDER BY id LIMIT $5"
        )))
        .bind(recipient)
        .bind(pg_device(device))
        .bind(after)
        .bind(through)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        stored_rows(rows)
    }

    async fn queued_ids(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM messages WHERE recipient = $1 AND device_id = $2 AND id > $3 ORDER BY id LIMIT $4",
        )
        .bind(recipient)
        .bind(pg_device(device))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn queue_shares(&self, recipient: Uuid) -> StoreResult<Vec<QueueShare>> {
        let rows: Vec<(i32, Option<Vec<u8>>, i64, i64)> = sqlx::query_as(
            "SELECT device_id, sender_tag, count(*),
                    COALESCE(SUM(COALESCE(octet_length(sealed), octet_length(body), 0)), 0)::int8
             FROM messages WHERE recipient = $1 GROUP BY device_id, sender_tag",
        )
        .bind(recipient)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(device, tag, rows, bytes)| QueueShare {
                device: device as DeviceId,
                sender_tag: tag.and_then(|t| t.try_into().ok()),
                rows: rows.max(0) as u64,
                bytes: bytes.max(0) as u64,
            })
            .collect())
    }

    async fn purge(&self, recipient: Uuid, device: Option<DeviceId>) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM messages WHERE recipient = $1 AND ($2::int4 IS NULL OR device_id = $2)",
        )
        .bind(recipient)
        .bind(device.map(pg_device))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl QueueMaintenance for PgStore {
    async fn queue_depth(&self) -> StoreResult<QueueDepth> {
        let (total, max, devices): (i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(n), 0)::int8, COALESCE(MAX(n), 0)::int8,
                    (SELECT count(*) FROM devices)
             FROM (SELECT count(*) AS n FROM messages GROUP BY recipient, device_id) AS queues",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(QueueDepth {
            total: total as u64,
            max_per_device: max as u64,
            devices: devices as u64,
        })
    }

    async fn stale_rows(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<StoredRow>> {
        // Whole ids: every copy of the last id read comes in this page.
        let rows: Vec<QueueRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {QUEUE_COLUMNS} FROM messages
             WHERE id IN (SELECT DISTINCT id FROM messages
                          WHERE id > $1 AND (key_id IS NULL OR key_id <> $2)
                          ORDER BY id LIMIT $3)
               AND (key_id IS NULL OR key_id <> $2)
             ORDER BY id, recipient, device_id"
        )))
        .bind(after)
        .bind(current)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        stored_rows(rows)
    }

    async fn reseal(&self, rows: Vec<SealedRow>) -> StoreResult<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let columns = Columns::of(rows);
        let done = sqlx::query(
            "UPDATE messages m SET key_id = u.key_id, sealed = u.sealed, sender_tag = u.sender_tag,
                                   sender = NULL, body = NULL
             FROM UNNEST($1::uuid[], $2::uuid[], $3::int4[], $4::int2[], $5::bytea[], $6::bytea[])
                  AS u (id, recipient, device_id, key_id, sealed, sender_tag)
             WHERE m.id = u.id AND m.recipient = u.recipient AND m.device_id = u.device_id",
        )
        .bind(columns.ids)
        .bind(columns.recipients)
        .bind(columns.devices)
        .bind(columns.key_ids)
        .bind(columns.sealed)
        .bind(columns.sender_tags)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>> {
        Ok(sqlx::query_scalar(
            "SELECT key_id FROM messages WHERE key_id IS NOT NULL
             UNION SELECT key_id FROM shared_bodies ORDER BY key_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn sealed_with(&self, key: KeyId, limit: u32) -> StoreResult<Vec<StoredRow>> {
        let rows: Vec<QueueRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {QUEUE_COLUMNS} FROM messages WHERE key_id = $1 ORDER BY id LIMIT $2"
        )))
        .bind(key)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        stored_rows(rows)
    }

    async fn delete_before(&self, before: Uuid, limit: u32) -> StoreResult<u64> {
        let rows = sqlx::query(
            "DELETE FROM messages WHERE (id, recipient, device_id) IN
             (SELECT id, recipient, device_id FROM messages WHERE id < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        let bodies = sqlx::query(
            "DELETE FROM shared_bodies WHERE id IN
             (SELECT id FROM shared_bodies WHERE id < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(rows.rows_affected() + bodies.rows_affected())
    }

    async fn delete_orphan_bodies(&self, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM shared_bodies WHERE id IN
             (SELECT id FROM shared_bodies b
              WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = b.id) LIMIT $1)",
        )
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn stale_bodies(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<SealedBody>> {
        let rows: Vec<(Uuid, DateTime<Utc>, KeyId, Vec<u8>)> = sqlx::query_as(
            "SELECT id, sent_at, key_id, sealed FROM shared_bodies
             WHERE id > $1 AND key_id <> $2 ORDER BY id LIMIT $3",
        )
        .bind(after)
        .bind(current)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(sealed_bodies(rows))
    }

    async fn reseal_bodies(&self, bodies: Vec<SealedBody>) -> StoreResult<u64> {
        if bodies.is_empty() {
            return Ok(0);
        }
        let (mut ids, mut key_ids, mut sealed) = (Vec::new(), Vec::new(), Vec::new());
        for body in bodies {
            ids.push(body.id);
            key_ids.push(body.key_id);
            sealed.push(body.sealed);
        }
        let done = sqlx::query(
            "UPDATE shared_bodies b SET key_id = u.key_id, sealed = u.sealed
             FROM UNNEST($1::uuid[], $2::int2[], $3::bytea[]) AS u (id, key_id, sealed)
             WHERE b.id = u.id",
        )
        .bind(ids)
        .bind(key_ids)
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn forget_expired_keys(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM send_keys WHERE key_hash IN
             (SELECT key_hash FROM send_keys WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Stores the first refresh token of a new session of `device`.
async fn insert_session(
    tx: &mut sqlx::PgConnection,
    user: Uuid,
    device: DeviceId,
    session: &NewSession,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens
             (token_hash, user_id, device_id, family_id, expires_at, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(session.hash.to_vec())
    .bind(user)
    .bind(pg_device(device))
    .bind(session.family_id)
    .bind(session.expires_at)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_device(
    tx: &mut sqlx::PgConnection,
    user: Uuid,
    device: &Device,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO devices
             (user_id, device_id, public_key, key_updated_at, name, created_at, last_seen_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(user)
    .bind(pg_device(device.id))
    .bind(device.public_key.clone())
    .bind(device.key_updated_at)
    .bind(device.name.clone())
    .bind(device.created_at)
    .bind(device.last_seen_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Locks the user's row for the rest of the transaction, serialising every
/// rotation and revocation of one user (see `rotate_refresh_token`). Returns
/// whether the user exists.
async fn lock_user(tx: &mut sqlx::PgConnection, user_id: Uuid) -> StoreResult<bool> {
    let found: Option<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1 FOR UPDATE")
        .bind(user_id)
        .fetch_optional(&mut *tx)
        .await?;
    Ok(found.is_some())
}

/// Stamps the device's `last_seen_at` inside a session's transaction.
async fn seen(
    tx: &mut sqlx::PgConnection,
    user: Uuid,
    device: DeviceId,
    at: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query("UPDATE devices SET last_seen_at = $3 WHERE user_id = $1 AND device_id = $2")
        .bind(user)
        .bind(pg_device(device))
        .bind(at)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Records that the account changed (a device removed, the account
/// deleted) where every other process looks: a revocation of a session id
/// no token carries. Another process that learns it reads the account's
/// devices afresh, even when the account had no session left to revoke.
async fn mark_changed(
    tx: &mut sqlx::PgConnection,
    user: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO revoked_sessions (id, user_id, revoked_at) VALUES ($1, $2, $3)")
        .bind(Uuid::new_v4())
        .bind(user)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Which of a user's sessions [`revoke_in`] revokes.
#[derive(Clone, Copy)]
enum Revoke {
    All,
    Session(Uuid),
    Device(DeviceId),
}

/// Records the user's sessions in `scope` as revoked and deletes their
/// refresh tokens. Every session with a live access token still has its
/// refresh tokens (spent ones are kept until they expire), so the families
/// found there are every session that needs revoking.
async fn revoke_in(
    tx: &mut sqlx::PgConnection,
    user_id: Uuid,
    scope: Revoke,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Uuid>> {
    let (only, device) = match scope {
        Revoke::All => (None, None),
        Revoke::Session(session) => (Some(session), None),
        Revoke::Device(device) => (None, Some(pg_device(device))),
    };
    let mut sessions: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM refresh_tokens WHERE user_id = $1 AND ($2::uuid IS NULL OR family_id = $2)
             AND ($3::int4 IS NULL OR device_id = $3)
         RETURNING family_id",
    )
    .bind(user_id)
    .bind(only)
    .bind(device)
    .fetch_all(&mut *tx)
    .await?;
    sessions.extend(only);
    sessions.sort_unstable();
    sessions.dedup();
    sqlx::query(
        "INSERT INTO revoked_sessions (id, user_id, revoked_at)
         SELECT id, $2, $3 FROM UNNEST($1::uuid[]) AS s (id)
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&sessions)
    .bind(user_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    Ok(sessions)
}

/// `device_id` is `integer`; ids are handed out below `i32::MAX`.
impl Column<DeviceId> for i32 {
    fn read(self) -> DeviceId {
        self as DeviceId
    }
}

#[async_trait]
impl PushStore for PgStore {
    async fn set_target(
        &self,
        user: Uuid,
        device: DeviceId,
        kind: Kind,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        // The version: `now`, or a millisecond past the previous one, so
        // that it strictly grows even when the clock does not. The upsert
        // locks the row, so two replacements take turns.
        let version: Option<DateTime<Utc>> = sqlx::query_scalar(
            "INSERT INTO push_targets (user_id, device_id, kind, target, updated_at, dropped)
             SELECT $1, $2, $3, $4, $5, false
             WHERE EXISTS (SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2)
             ON CONFLICT (user_id, device_id) DO UPDATE SET
                 kind = excluded.kind, target = excluded.target, dropped = false,
                 updated_at = GREATEST(excluded.updated_at,
                                       push_targets.updated_at + interval '1 millisecond')
             RETURNING updated_at",
        )
        .bind(user)
        .bind(pg_device(device))
        .bind(kind.as_str())
        .bind(sealed)
        .bind(super::truncate_to_millis(now))
        .fetch_optional(&self.pool)
        .await?;
        Ok(version)
    }

    async fn delete_target(&self, user: Uuid, device: DeviceId) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM wakeups WHERE user_id = $1 AND device_id = $2")
            .bind(user)
            .bind(pg_device(device))
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM push_targets WHERE user_id = $1 AND device_id = $2")
            .bind(user)
            .bind(pg_device(device))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn drop_target(
        &self,
        user: Uuid,
        device: DeviceId,
        version: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE push_targets SET kind = NULL, target = NULL, dropped = true
             WHERE user_id = $1 AND device_id = $2 AND updated_at = $3 AND target IS NOT NULL",
        )
        .bind(user)
        .bind(pg_device(device))
        .bind(super::truncate_to_millis(version))
        .execute(&mut *tx)
        .await?;
        let dropped = done.rows_affected() > 0;
        if dropped {
            // Nothing is left to send to.
            sqlx::query("UPDATE wakeups SET due_at = NULL WHERE user_id = $1 AND device_id = $2")
                .bind(user)
                .bind(pg_device(device))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(dropped)
    }

    async fn target_summaries(&self, user: Uuid) -> StoreResult<Vec<TargetSummary>> {
        let rows: Vec<TargetSummaryRow<i32, DateTime<Utc>>> = sqlx::query_as(
            "SELECT device_id, kind, updated_at, dropped FROM push_targets
             WHERE user_id = $1 ORDER BY device_id",
        )
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(TargetSummary::from).collect())
    }

    async fn count_targets(&self) -> StoreResult<Vec<(Kind, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, count(*) FROM push_targets WHERE kind IS NOT NULL
             GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(kind_count).collect())
    }

    async fn schedule_many(
        &self,
        wanted: &[Wanted],
        now: DateTime<Utc>,
        rules: Coalescing,
    ) -> StoreResult<Vec<Scheduled>> {
        let mut tx = self.pool.begin().await?;
        let mut done = vec![Scheduled::NoTarget; wanted.len()];
        for i in lock_order(wanted, |w| (w.user, w.device)) {
            done[i] = schedule_one(&mut tx, &wanted[i], now, rules).await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn take_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
        lease: Duration,
    ) -> StoreResult<Vec<DueWakeup>> {
        // One statement: the due rows are locked as they are found, rows
        // another node holds are skipped (not waited for), and the lease
        // is written before the locks go. A row another node leased and
        // committed meanwhile is re-checked against `due_at <= $1` when
        // locked, and no longer matches.
        let rows: Vec<DueRow<i32, i32, DateTime<Utc>>> = sqlx::query_as(
            "WITH due AS (
                 SELECT w.user_id, w.device_id FROM wakeups w
                 JOIN push_targets t ON t.user_id = w.user_id AND t.device_id = w.device_id
                 WHERE w.due_at <= $1 AND t.target IS NOT NULL
                 ORDER BY w.due_at LIMIT $2
                 FOR UPDATE OF w SKIP LOCKED
             )
             UPDATE wakeups w SET due_at = $3
             FROM due, push_targets t
             WHERE w.user_id = due.user_id AND w.device_id = due.device_id
               AND t.user_id = w.user_id AND t.device_id = w.device_id
             RETURNING w.user_id, w.device_id, w.urgent, w.attempts, t.kind, t.target, t.updated_at",
        )
        .bind(super::truncate_to_millis(now))
        .bind(i64::from(limit))
        .bind(super::truncate_to_millis(super::add(now, lease)))
        .fetch_all(&self.pool)
        .await?;
        // A kind this build does not know stays leased (`UnknownKind`).
        Ok(rows
            .into_iter()
            .filter_map(|row| DueWakeup::try_from(row).ok())
            .collect())
    }

    async fn stale_targets(
        &self,
        current: KeyId,
        after: (Uuid, DeviceId),
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, DeviceId, Vec<u8>)>> {
        let rows: Vec<(Uuid, i32, Vec<u8>)> = sqlx::query_as(
            "SELECT user_id, device_id, target FROM push_targets
             WHERE target IS NOT NULL AND substring(target from 1 for 2) <> $1
               AND (user_id, device_id) > ($2, $3)
             ORDER BY user_id, device_id LIMIT $4",
        )
        .bind(current.to_be_bytes().to_vec())
        .bind(after.0)
        .bind(i64::from(after.1))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user, device, sealed)| (user, device as DeviceId, sealed))
            .collect())
    }

    async fn reseal_target(
        &self,
        user: Uuid,
        device: DeviceId,
        sealed: &[u8],
        resealed: &[u8],
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE push_targets SET target = $1
             WHERE user_id = $2 AND device_id = $3 AND target = $4",
        )
        .bind(resealed)
        .bind(user)
        .bind(pg_device(device))
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn update_wakeups(&self, updates: &[(Uuid, DeviceId, WakeupUpdate)]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        for i in lock_order(updates, |u| (u.0, u.1)) {
            let (user, device, update) = updates[i];
            let query = match update {
                WakeupUpdate::Sent { urgent, at } => sqlx::query(
                    "UPDATE wakeups SET due_at = NULL, attempts = 0, sent_at = $3,
                         quiet_sent_at = CASE WHEN $4 THEN quiet_sent_at ELSE $3 END
                     WHERE user_id = $1 AND device_id = $2",
                )
                .bind(user)
                .bind(pg_device(device))
                .bind(super::truncate_to_millis(at))
                .bind(urgent),
                WakeupUpdate::Retry { at, attempts } => sqlx::query(
                    "UPDATE wakeups SET due_at = $3, attempts = $4
                     WHERE user_id = $1 AND device_id = $2",
                )
                .bind(user)
                .bind(pg_device(device))
                .bind(super::truncate_to_millis(at))
                .bind(i32::try_from(attempts).unwrap_or(i32::MAX)),
                WakeupUpdate::Abandoned => sqlx::query(
                    "UPDATE wakeups SET due_at = NULL, sent_at = NULL, attempts = 0
                     WHERE user_id = $1 AND device_id = $2",
                )
                .bind(user)
                .bind(pg_device(device)),
                // Only a row with something to cancel is written: a device
                // that connects with nothing pending costs an index
                // look-up, no write.
                WakeupUpdate::Cancelled => sqlx::query(
                    "UPDATE wakeups SET due_at = NULL, sent_at = NULL, attempts = 0
                     WHERE user_id = $1 AND device_id = $2
                       AND (due_at IS NOT NULL OR sent_at IS NOT NULL)",
                )
                .bind(user)
                .bind(pg_device(device)),
            };
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// One device of [`PushStore::schedule_many`], inside its transaction.
async fn schedule_one(
    conn: &mut sqlx::PgConnection,
    wanted: &Wanted,
    now: DateTime<Utc>,
    rules: Coalescing,
) -> StoreResult<Scheduled> {
    let user = wanted.user;
    let device = pg_device(wanted.device);
    let due = super::truncate_to_millis(wanted.due);
    let urgent = wanted.urgent;
    let live: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM push_targets
                        WHERE user_id = $1 AND device_id = $2 AND target IS NOT NULL)",
    )
    .bind(user)
    .bind(device)
    .fetch_one(&mut *conn)
    .await?;
    if !live {
        return Ok(Scheduled::NoTarget);
    }
    // Insert-if-absent first: of two nodes scheduling the same device at
    // once, one inserts and the other waits on its row lock, then finds the
    // row below.
    let inserted = sqlx::query(
        "INSERT INTO wakeups (user_id, device_id, due_at, urgent, attempts)
         VALUES ($1, $2, $3, $4, 0) ON CONFLICT (user_id, device_id) DO NOTHING",
    )
    .bind(user)
    .bind(device)
    .bind(due)
    .bind(urgent)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Scheduled::Pending);
    }
    // Locked until the commit: a concurrent schedule, sent or cancel of
    // this device waits, so the decision is made on what is there.
    let row: Option<TimesRow<DateTime<Utc>>> = sqlx::query_as(
        "SELECT due_at, sent_at, quiet_sent_at FROM wakeups
             WHERE user_id = $1 AND device_id = $2 FOR UPDATE",
    )
    .bind(user)
    .bind(device)
    .fetch_optional(&mut *conn)
    .await?;
    let state = row.map(WakeupRow::from);
    let (query, outcome) = match decide(state.as_ref(), urgent, now, rules) {
        // Deleted (with its device) since the insert was refused.
        Decision::Insert => return Ok(Scheduled::NoTarget),
        Decision::Coalesce => return Ok(Scheduled::Coalesced),
        Decision::Revive => (
            sqlx::query(
                "UPDATE wakeups SET due_at = $3, urgent = $4, attempts = 0
                 WHERE user_id = $1 AND device_id = $2",
            ),
            Scheduled::Pending,
        ),
        Decision::Upgrade => (
            sqlx::query(
                "UPDATE wakeups SET urgent = urgent OR $4, due_at = LEAST(due_at, $3)
                 WHERE user_id = $1 AND device_id = $2 AND due_at IS NOT NULL",
            ),
            Scheduled::Coalesced,
        ),
    };
    query
        .bind(user)
        .bind(device)
        .bind(due)
        .bind(urgent)
        .execute(&mut *conn)
        .await?;
    Ok(outcome)
}

/// Shared bodies as selected: `id, sent_at, key_id, sealed`.
fn sealed_bodies(rows: Vec<(Uuid, DateTime<Utc>, KeyId, Vec<u8>)>) -> Vec<SealedBody> {
    rows.into_iter()
        .map(|(id, sent_at, key_id, sealed)| SealedBody {
            id,
            sent_at,
            key_id,
            sealed,
        })
        .collect()
}
