//! The SQLite store, the embedded default.
//!
//! SQLite admits one writer at a time, so the store keeps one write
//! connection (the committer's batches, sign-ups, token rotation and the
//! sweeper take turns on it, never fighting over the file lock) and a small
//! pool of readers that WAL mode lets run beside it.
//!
//! Durability: WAL with `synchronous=FULL`, so a committed transaction
//! survives both `kill -9` of the process and a power loss. Group commit
//! amortises the extra fsync over every message in the batch.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use uuid::Uuid;

use crate::push::target::Kind;

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

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per multi-row statement: 100 inserts bind 700 parameters, far under
/// SQLite's limit of 32,766.
const ROWS_PER_STATEMENT: usize = 100;

/// `INSERT ... VALUES (?, ?, ?, ?, ?, ?, ?), ...` for `rows` messages. Built from
/// constant fragments only; every value is bound.
fn insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO messages (id, recipient, device_id, sent_at, key_id, sealed, sender_tag) VALUES ",
    );
    sql.push_str(&vec!["(?, ?, ?, ?, ?, ?, ?)"; rows].join(", "));
    sql
}

/// `INSERT ... VALUES (?, ?, ?, ?, ?), ...` for `rows` send keys, a key
/// already recorded replaced. Built from constant fragments only.
fn key_insert_sql(rows: usize) -> String {
    format!(
        "INSERT INTO send_keys (key_hash, account_tag, key_id, answer, expires_at) VALUES {}
         ON CONFLICT (key_hash)
         DO UPDATE SET account_tag = excluded.account_tag, key_id = excluded.key_id,
                       answer = excluded.answer, expires_at = excluded.expires_at",
        vec!["(?, ?, ?, ?, ?)"; rows].join(", ")
    )
}

/// Seals `rows` rows again: `VALUES` columns are id, recipient, device,
/// key id, sealed, sender tag. Built from constant fragments only; every
/// value is bound.
fn reseal_sql(rows: usize) -> String {
    format!(
        "UPDATE messages SET key_id = u.column4, sealed = u.column5, sender_tag = u.column6,
                             sender = NULL, body = NULL
         FROM (VALUES {}) AS u
         WHERE messages.id = u.column1 AND messages.recipient = u.column2
           AND messages.device_id = u.column3",
        vec!["(?, ?, ?, ?, ?, ?)"; rows].join(", ")
    )
}

/// `INSERT ... VALUES (?, ?, ?, ?), ...` for `rows` shared bodies, one
/// already stored kept. Built from constant fragments only.
fn body_insert_sql(rows: usize) -> String {
    format!(
        "INSERT INTO shared_bodies (id, sent_at, key_id, sealed) VALUES {} ON CONFLICT (id) DO NOTHING",
        vec!["(?, ?, ?, ?)"; rows].join(", ")
    )
}

/// Deletes the shared bodies of `ids` that no row refers to any more.
fn body_gc_sql(ids: usize) -> String {
    format!(
        "DELETE FROM shared_bodies WHERE id IN ({})
           AND NOT EXISTS (SELECT 1 FROM messages WHERE messages.id = shared_bodies.id)",
        vec!["?"; ids].join(", ")
    )
}

/// Deletes `acks` copies of any devices in one statement, returning the
/// rows deleted: the ids first (`id IN (...)` finds the rows by primary
/// key), then each copy's (id, device, recipient), which keeps only the
/// copies named (a row-value `IN` alone would scan the table). Built from
/// constant fragments only; every value is bound.
fn delete_sql(acks: usize) -> String {
    format!(
        "DELETE FROM messages WHERE id IN ({}) AND (id, device_id, recipient) IN (VALUES {}) \
         RETURNING {QUEUE_COLUMNS}",
        vec!["?"; acks].join(", "),
        vec!["(?, ?, ?)"; acks].join(", ")
    )
}

/// Acks per delete statement: four values each, well inside SQLite's
/// 32,766 variables, and few enough statements that a batch of thousands
/// of acks costs a handful of round trips to the connection's thread.
const ACKS_PER_STATEMENT: usize = 250;

/// How long a statement waits on SQLite's file lock (held only by another
/// process, such as a backup) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Address space each connection maps the database file into: none, as
/// SQLite's default. A 256 MiB map once cut a drain's CPU by 10-20% (no
/// `pread` copies), but with the committer's larger batches it cost more
/// than it saved: perf of a drain showed a tenth of the server's time in
/// `munmap` and page-table teardown, and the drain of 1,000 x 100 ran at
/// 67-94k msgs/s without the map against 41-85k with it (four and five
/// runs, alternating binaries, 2026-12-03).
const MMAP_BYTES: u64 = 0;

pub struct SqliteStore {
    /// The single write connection.
    writer: SqlitePool,
    /// Readers; the same pool as `writer` for an in-memory database, whose
    /// contents exist only on its one connection.
    reader: SqlitePool,
}

/// The file behind a `sqlite:` URL, or `None` for an in-memory database.
pub fn database_path(url: &str) -> Option<PathBuf> {
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    let name = path.to_string_lossy();
    if name.is_empty() || name == ":memory:" || url.contains("mode=memory") {
        None
    } else {
        Some(path.to_path_buf())
    }
}

fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

type UserRow = (Uuid, String, i64);

fn user_from_row((id, username, created_at): UserRow) -> User {
    User {
        id,
        username,
        created_at: time(created_at),
    }
}

/// `device_id, public_key, key_updated_at, name, created_at, last_seen_at`.
type DeviceRow = (i64, Vec<u8>, i64, Option<String>, i64, i64);

const DEVICE_COLUMNS: &str =
    "device_id, public_key, key_updated_at, name, created_at, last_seen_at";

fn device_from_row((id, public_key, key_at, name, created_at, last_seen_at): DeviceRow) -> Device {
    Device {
        id: id as DeviceId,
        public_key,
        key_updated_at: time(key_at),
        name,
        created_at: time(created_at),
        last_seen_at: time(last_seen_at),
    }
}

type QueueRow = super::queue::QueueColumns<i64, i64>;

/// `id, username, created_at, disabled_at, queued`, as the account queries
/// select them.
type SummaryRow = (Uuid, String, i64, Option<i64>, i64);

fn summary_from_row((id, username, created_at, disabled_at, queued): SummaryRow) -> AccountSummary {
    AccountSummary {
        id,
        username,
        created_at: time(created_at),
        disabled_at: disabled_at.map(time),
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
                    time(sent_at),
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

/// Whether the write connection may be used again once returned: not if
/// sqlx still counts a transaction open on it.
///
/// On some errors, a full disk (`SQLITE_FULL`) among them, SQLite rolls the
/// whole transaction back by itself. sqlx's own `ROLLBACK` then fails and
/// sqlx goes on counting the transaction open, so the connection's next
/// `begin()` is a `SAVEPOINT`. Once a later statement fails and is rolled
/// back to that savepoint (which leaves SQLite's transaction open), every
/// batch after it "commits" by releasing a savepoint inside a transaction
/// that never ends: answered 201, visible to no reader, gone at the next
/// rollback. On a tmpfs filled under steady sends, 75 of 176 messages
/// answered 201 were lost that way (tests/it/faults.rs). Closed instead, the
/// connection takes any transaction of its with it, and the next one counts
/// from zero.
async fn fit_for_reuse(conn: &mut sqlx::SqliteConnection) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    // A transaction dropped unfinished queued its rollback on the
    // connection's worker; this waits behind it, so the count is settled.
    conn.ping().await?;
    let fit = !conn.is_in_transaction();
    if !fit {
        tracing::warn!(
            "closing the SQLite write connection: its transaction state is unknown after an error"
        );
    }
    Ok(fit)
}

impl SqliteStore {
    pub async fn connect(url: &str, pool_size: u32) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StoreError::Database)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            .pragma("mmap_size", MMAP_BYTES.to_string());
        let single = |min| {
            SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(min)
                .acquire_timeout(Duration::from_secs(30))
        };
        let Some(path) = database_path(url) else {
            // Keep the one connection forever: closing it drops the database.
            let pool = single(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(options)
                .await?;
            return Ok(Self {
                writer: pool.clone(),
                reader: pool,
            });
        };
        // `sqlite::memory:` names a shared in-memory database
        // `file:sqlx-in-memory-N`, which is no file of ours to create.
        if !path.to_string_lossy().starts_with("file:") {
            create_private(&path);
        }
        let writer = single(0)
            .after_release(|conn, _| Box::pin(fit_for_reuse(conn)))
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        for suffix in ["", "-wal", "-shm"] {
            let mut file = path.clone().into_os_string();
            file.push(suffix);
            crate::keyfile::warn_if_shared(std::path::Path::new(&file), "the database");
        }
        Ok(Self { writer, reader })
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
                 WHERE username_skeleton IS NULL AND id > ? ORDER BY id LIMIT ?",
            )
            .bind(after)
            .bind(SKELETON_BATCH)
            .fetch_all(&self.writer)
            .await?;
            let Some((last, _)) = batch.last() else {
                return Ok(());
            };
            after = *last;
            for (id, username) in batch {
                let done = sqlx::query(
                    "UPDATE users SET username_skeleton = ?
                     WHERE id = ? AND username_skeleton IS NULL",
                )
                .bind(username_skeleton(&username))
                .bind(id)
                .execute(&self.writer)
                .await;
                match done {
                    Ok(_) => {}
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => warn_look_alike(id),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// Creates the database file, empty, readable by its owner only, unless it
/// exists. SQLite would create it with the mode the umask leaves (0644 under
/// the common 022: password hashes and queued messages readable by every
/// user of the machine), and gives its `-wal` and `-shm` files the mode of
/// the database file, so this covers all three. A failure here is left for
/// SQLite's own open to report.
fn create_private(path: &std::path::Path) {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let _ = options.open(path);
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.writer).await?;
        self.fill_skeletons().await
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

#[async_trait]
impl DeviceIds for SqliteStore {
    async fn device_ids(&self, user: Uuid) -> StoreResult<Vec<DeviceId>> {
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT device_id FROM devices WHERE user_id = ? ORDER BY device_id",
        )
        .bind(user)
        .fetch_all(&self.reader)
        .await?;
        Ok(ids.into_iter().map(|id| id as DeviceId).collect())
    }
}

#[async_trait]
impl Accounts for SqliteStore {
    async fn create_user(
        &self,
        user: &User,
        password_hash: &str,
        device: &Device,
        session: &NewSession,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        let result = sqlx::query(
            "INSERT INTO users (id, username, password_hash, created_at, username_skeleton)
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(user.id)
        .bind(user.username.clone())
        .bind(password_hash.to_owned())
        .bind(millis(user.created_at))
        .bind(username_skeleton(&user.username))
        .execute(&mut *tx)
        .await;
        match result {
            Ok(_) => {}
            // `users.username` or `users.username_skeleton`.
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation() && e.message().contains("users.username") =>
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
            sqlx::query_as("SELECT id, username, created_at FROM users WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(user_from_row))
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        let row: Option<UserRow> =
            sqlx::query_as("SELECT id, username, created_at FROM users WHERE username = ?")
                .bind(username.to_owned())
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(user_from_row))
    }

    async fn name_taken(&self, username: &str) -> StoreResult<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM users WHERE username = ? OR username_skeleton = ?)",
        )
        .bind(username.to_owned())
        .bind(username_skeleton(username))
        .fetch_one(&self.reader)
        .await?)
    }

    async fn password_hash(&self, id: Uuid) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT password_hash FROM users WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>> {
        let row: Option<(Uuid, String, bool, i64)> = sqlx::query_as(
            "SELECT id, password_hash, disabled_at IS NOT NULL, credentials_version
             FROM users WHERE username = ?",
        )
        .bind(username.to_owned())
        .fetch_optional(&self.reader)
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
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE user_id = ? ORDER BY device_id"
        )))
        .bind(user)
        .fetch_all(&self.reader)
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
        // The single write connection serialises additions: the count and
        // the number taken cannot race another addition, nor a password
        // change.
        let mut tx = self.writer.begin().await?;
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT next_device_id, (SELECT count(*) FROM devices WHERE user_id = ?1),
                    credentials_version
             FROM users WHERE id = ?1 AND disabled_at IS NULL",
        )
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((next, count, version)) = row else {
            return Ok(AddDevice::NoAccount);
        };
        if version != account.credentials {
            return Ok(AddDevice::Stale);
        }
        if count >= i64::from(max) || next > i64::from(super::MAX_DEVICE_ID) {
            return Ok(AddDevice::TooMany);
        }
        sqlx::query("UPDATE users SET next_device_id = next_device_id + 1 WHERE id = ?")
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
            "UPDATE devices SET name = ? WHERE user_id = ? AND device_id = ?
             RETURNING {DEVICE_COLUMNS}"
        )))
        .bind(name.map(str::to_owned))
        .bind(user)
        .bind(i64::from(device))
        .fetch_optional(&self.writer)
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
            "UPDATE devices SET public_key = ?, key_updated_at = ? WHERE user_id = ? AND device_id = ?
             RETURNING {DEVICE_COLUMNS}"
        )))
        .bind(key.to_vec())
        .bind(millis(at))
        .bind(user)
        .bind(i64::from(device))
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.map(device_from_row))
    }

    async fn remove_device(
        &self,
        user: Uuid,
        device: DeviceId,
        now: DateTime<Utc>,
    ) -> StoreResult<RemoveDevice> {
        let mut tx = self.writer.begin().await?;
        let (exists, count): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2),
                    (SELECT count(*) FROM devices WHERE user_id = ?1)",
        )
        .bind(user)
        .bind(i64::from(device))
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
            "DELETE FROM devices WHERE user_id = ? AND device_id = ?",
            "DELETE FROM messages WHERE recipient = ? AND device_id = ?",
        ] {
            sqlx::query(statement)
                .bind(user)
                .bind(i64::from(device))
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
        let mut tx = self.writer.begin().await?;
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE users SET password_hash = ?, credentials_version = credentials_version + 1
             WHERE id = ? RETURNING credentials_version",
        )
        .bind(password_hash)
        .bind(user_id)
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
        let mut tx = self.writer.begin().await?;
        // Revoke before deleting the user: the delete cascades to the
        // refresh tokens, which are how the user's sessions are found.
        let revoked = revoke_in(&mut tx, user_id, Revoke::All, now).await?;
        mark_changed(&mut tx, user_id, now).await?;
        let deleted = sqlx::query("DELETE FROM users WHERE id = ?")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Ok(None);
        }
        sqlx::query("DELETE FROM messages WHERE recipient = ?")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(revoked))
    }
}

#[async_trait]
impl Sessions for SqliteStore {
    async fn insert_refresh_token(
        &self,
        token: &RefreshToken,
        credentials: CredentialsVersion,
    ) -> StoreResult<SessionStart> {
        // On the single write connection, after or before any
        // `disable_user`, `remove_device` or `set_password`, never between
        // its statements.
        let now = super::now();
        let mut tx = self.writer.begin().await?;
        let account: Option<(i64, bool)> = sqlx::query_as(
            "SELECT credentials_version, disabled_at IS NOT NULL FROM users WHERE id = ?",
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
            "INSERT INTO refresh_tokens (token_hash, user_id, device_id, family_id, expires_at, created_at)
             SELECT ?1, user_id, device_id, ?2, ?3, ?4 FROM devices
             WHERE user_id = ?5 AND device_id = ?6",
        )
        .bind(token.hash.to_vec())
        .bind(token.family_id)
        .bind(millis(token.expires_at))
        .bind(millis(now))
        .bind(token.user_id)
        .bind(i64::from(token.device))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(SessionStart::NoDevice);
        }
        seen(&mut tx, token.user_id, token.device, now).await?;
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
        // The single write connection serialises rotations, so the spend and
        // the reuse check cannot interleave with another presentation.
        let mut tx = self.writer.begin().await?;
        let spent: Option<(Uuid, i64, Uuid)> = sqlx::query_as(
            "UPDATE refresh_tokens SET used_at = ?2
             WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2
             RETURNING user_id, device_id, family_id",
        )
        .bind(presented.to_vec())
        .bind(millis(now))
        .fetch_optional(&mut *tx)
        .await?;
        let rotation = match spent {
            Some((user_id, device, family_id)) => {
                sqlx::query(
                    "INSERT INTO refresh_tokens
                         (token_hash, user_id, device_id, family_id, expires_at, created_at)
                     VALUES (?, ?, ?, ?, ?, ?)",
                )
                .bind(next_hash.to_vec())
                .bind(user_id)
                .bind(device)
                .bind(family_id)
                .bind(millis(next_expires_at))
                .bind(millis(now))
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
                let previous: Option<(Uuid, i64, Uuid, Option<i64>)> = sqlx::query_as(
                    "SELECT user_id, device_id, family_id, used_at FROM refresh_tokens
                     WHERE token_hash = ?",
                )
                .bind(presented.to_vec())
                .fetch_optional(&mut *tx)
                .await?;
                match previous {
                    Some((user_id, device, family_id, Some(used_at))) => {
                        let in_grace = grace_from.is_some_and(|from| used_at >= millis(from));
                        // The successor this token's rotation stored, if it
                        // is still there and unspent.
                        let successor_live = in_grace
                            && sqlx::query_scalar::<_, bool>(
                                "SELECT used_at IS NULL AND expires_at > ?3 FROM refresh_tokens
                                 WHERE token_hash = ?1 AND family_id = ?2",
                            )
                            .bind(next_hash.to_vec())
                            .bind(family_id)
                            .bind(millis(now))
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
        let mut tx = self.writer.begin().await?;
        let scope = only.map_or(Revoke::All, Revoke::Session);
        let revoked = revoke_in(&mut tx, user_id, scope, now).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn revoked_sessions(&self, since: DateTime<Utc>) -> StoreResult<Vec<Revoked>> {
        let rows: Vec<(Uuid, Uuid)> =
            sqlx::query_as("SELECT id, user_id FROM revoked_sessions WHERE revoked_at >= ?")
                .bind(millis(since))
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(session, user_id)| Revoked { session, user_id })
            .collect())
    }

    async fn purge_revoked_sessions(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM revoked_sessions WHERE id IN
             (SELECT id FROM revoked_sessions WHERE revoked_at < ? LIMIT ?)",
        )
        .bind(millis(before))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn purge_refresh_tokens(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM refresh_tokens WHERE token_hash IN
             (SELECT token_hash FROM refresh_tokens WHERE expires_at <= ? LIMIT ?)",
        )
        .bind(millis(now))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl Operator for SqliteStore {
    async fn disable_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        // The single write connection orders this against logins inserting
        // a session and against rotations.
        let mut tx = self.writer.begin().await?;
        let updated =
            sqlx::query("UPDATE users SET disabled_at = COALESCE(disabled_at, ?) WHERE id = ?")
                .bind(millis(now))
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        let revoked = revoke_in(&mut tx, user_id, Revoke::All, now).await?;
        tx.commit().await?;
        Ok(Some(revoked))
    }

    async fn enable_user(&self, user_id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE users SET disabled_at = NULL WHERE id = ?")
            .bind(user_id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<AccountSummary>> {
        // `username` is COLLATE NOCASE: the comparison and the order ignore
        // ASCII letter case, as PostgreSQL's `lower()` does here.
        let rows: Vec<SummaryRow> = sqlx::query_as(
            "SELECT u.id, u.username, u.created_at, u.disabled_at,
                    (SELECT count(*) FROM messages m WHERE m.recipient = u.id)
             FROM users u
             WHERE ?1 IS NULL OR u.username > ?1
             ORDER BY u.username LIMIT ?2",
        )
        .bind(after.map(str::to_owned))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(summary_from_row).collect())
    }

    async fn account_details(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<AccountDetails>> {
        type Row = (Uuid, String, i64, Option<i64>, i64, i64, Option<Uuid>);
        let row: Option<Row> = sqlx::query_as(
            "SELECT u.id, u.username, u.created_at, u.disabled_at,
                    (SELECT count(*) FROM messages m WHERE m.recipient = u.id),
                    (SELECT count(*) FROM refresh_tokens t
                     WHERE t.user_id = u.id AND t.used_at IS NULL AND t.expires_at > ?2),
                    (SELECT m.id FROM messages m WHERE m.recipient = u.id ORDER BY m.id LIMIT 1)
             FROM users u WHERE u.id = ?1",
        )
        .bind(id)
        .bind(millis(now))
        .fetch_optional(&self.reader)
        .await?;
        let Some((id, username, created, disabled, queued, sessions, oldest)) = row else {
            return Ok(None);
        };
        type DeviceSummaryRow = (i64, i64, i64, i64, i64, i64);
        let devices: Vec<DeviceSummaryRow> = sqlx::query_as(
            "SELECT d.device_id, length(d.public_key), d.key_updated_at, d.created_at,
                    d.last_seen_at,
                    (SELECT count(*) FROM messages m
                     WHERE m.recipient = d.user_id AND m.device_id = d.device_id)
             FROM devices d WHERE d.user_id = ? ORDER BY d.device_id",
        )
        .bind(id)
        .fetch_all(&self.reader)
        .await?;
        Ok(Some(AccountDetails {
            summary: summary_from_row((id, username, created, disabled, queued)),
            devices: devices
                .into_iter()
                .map(
                    |(device, key_bytes, key_at, created, seen, queued)| DeviceSummary {
                        id: device as DeviceId,
                        public_key_bytes: key_bytes as u64,
                        key_updated_at: time(key_at),
                        created_at: time(created),
                        last_seen_at: time(seen),
                        queued: queued as u64,
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
                        (SELECT count(*) FROM refresh_tokens WHERE used_at IS NULL AND expires_at > ?),
                        (SELECT count(*) FROM revoked_sessions),
                        (SELECT count(DISTINCT recipient) FROM messages),
                        (SELECT id FROM messages ORDER BY id LIMIT 1)",
            )
            .bind(millis(now))
            .fetch_one(&self.reader)
            .await?;
        // NULL (legacy plaintext) sorts first.
        let by_key: Vec<(Option<KeyId>, i64)> =
            sqlx::query_as("SELECT key_id, count(*) FROM messages GROUP BY key_id ORDER BY key_id")
                .fetch_all(&self.reader)
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
        let migrated: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master
                            WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&self.reader)
        .await?;
        let applied: Vec<i64> = if migrated {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.reader)
                .await?
        } else {
            Vec::new()
        };
        Ok(super::pending(&MIGRATOR, &applied))
    }
}

#[async_trait]
impl Queue for SqliteStore {
    async fn write_batch(
        &self,
        bodies: Vec<SealedBody>,
        messages: Vec<SealedRow>,
        keys: &[SealedKey],
        acks: &[Ack],
    ) -> StoreResult<Vec<StoredRow>> {
        // One transaction, one fsync, for the whole batch. sqlx runs each
        // SQLite statement on the connection's worker thread, a cross-thread
        // round trip apiece, so rows go many to a statement: a statement per
        // row cost more CPU in thread hand-offs than SQLite spent working.
        let mut tx = self.writer.begin().await?;
        let mut bodies = bodies.into_iter().peekable();
        while bodies.peek().is_some() {
            let chunk: Vec<SealedBody> = bodies.by_ref().take(ROWS_PER_STATEMENT).collect();
            let mut insert = sqlx::query(AssertSqlSafe(body_insert_sql(chunk.len())));
            for body in chunk {
                insert = insert
                    .bind(body.id)
                    .bind(millis(body.sent_at))
                    .bind(body.key_id)
                    .bind(body.sealed);
            }
            insert.execute(&mut *tx).await?;
        }
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let chunk: Vec<SealedRow> = messages.by_ref().take(ROWS_PER_STATEMENT).collect();
            let mut insert = sqlx::query(AssertSqlSafe(insert_sql(chunk.len())));
            for row in chunk {
                insert = insert
                    .bind(row.id)
                    .bind(row.recipient)
                    .bind(i64::from(row.device))
                    .bind(millis(row.sent_at))
                    .bind(row.key_id)
                    .bind(row.sealed)
                    .bind(row.sender_tag.map(|t| t.to_vec()));
            }
            insert.execute(&mut *tx).await?;
        }
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let mut insert = sqlx::query(AssertSqlSafe(key_insert_sql(chunk.len())));
            for key in chunk {
                insert = insert
                    .bind(key.hash.as_slice())
                    .bind(key.account.as_slice())
                    .bind(key.key_id)
                    .bind(key.answer.as_slice())
                    .bind(millis(key.expires_at));
            }
            insert.execute(&mut *tx).await?;
        }
        let mut deleted = Vec::new();
        for chunk in acks.chunks(ACKS_PER_STATEMENT) {
            let mut delete = sqlx::query_as(AssertSqlSafe(delete_sql(chunk.len())));
            for ack in chunk {
                delete = delete.bind(ack.id);
            }
            for ack in chunk {
                delete = delete
                    .bind(ack.id)
                    .bind(i64::from(ack.device))
                    .bind(ack.recipient);
            }
            let gone: Vec<QueueRow> = delete.fetch_all(&mut *tx).await?;
            deleted.extend(stored_rows(gone)?);
        }
        // The shared bodies whose last copy this batch acked.
        let mut acked: Vec<Uuid> = deleted.iter().map(StoredRow::id).collect();
        acked.sort_unstable();
        acked.dedup();
        for chunk in acked.chunks(ACKS_PER_STATEMENT) {
            let mut gc = sqlx::query(AssertSqlSafe(body_gc_sql(chunk.len())));
            for id in chunk {
                gc = gc.bind(id);
            }
            gc.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn sent_key(
        &self,
        hashes: &[Vec<u8>],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<SealedKey>> {
        if hashes.is_empty() {
            return Ok(None);
        }
        // One hash per storage key: a handful of parameters.
        let sql = format!(
            "SELECT key_hash, account_tag, key_id, answer, expires_at FROM send_keys
             WHERE key_hash IN ({}) AND expires_at > ? LIMIT 1",
            vec!["?"; hashes.len()].join(", ")
        );
        let mut query = sqlx::query_as(AssertSqlSafe(sql));
        for hash in hashes {
            query = query.bind(hash.as_slice());
        }
        let row: Option<(Vec<u8>, Vec<u8>, KeyId, Vec<u8>, i64)> =
            query.bind(millis(now)).fetch_optional(&self.reader).await?;
        Ok(
            row.map(|(hash, account, key_id, answer, expires_at)| SealedKey {
                hash,
                account,
                key_id,
                answer,
                expires_at: time(expires_at),
            }),
        )
    }

    async fn forget_sender_keys(&self, accounts: &[Vec<u8>]) -> StoreResult<u64> {
        if accounts.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "DELETE FROM send_keys WHERE account_tag IN ({})",
            vec!["?"; accounts.len()].join(", ")
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for account in accounts {
            query = query.bind(account.as_slice());
        }
        Ok(query.execute(&self.writer).await?.rows_affected())
    }

    async fn queued_sizes(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, u64)>> {
        // The length of a value, not the value: SQLite reads it without loading the blob's overflow pages.
        // A shared copy's page carries its shared body too.
        let sizes: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT m.id, COALESCE(length(m.sealed), length(m.body), 0)
                          + COALESCE((SELECT length(b.sealed) FROM shared_bodies b WHERE b.id = m.id), 0)
             FROM messages m
             WHERE m.recipient = ? AND m.device_id = ? AND m.id > ? ORDER BY m.id LIMIT ?",
        )
        .bind(recipient)
        .bind(i64::from(device))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
             WHERE recipient = ? AND device_id = ? AND id > ? AND id <= ? ORDER BY id LIMIT ?"
        )))
        .bind(recipient)
        .bind(i64::from(device))
        .bind(after)
        .bind(through)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        stored_rows(rows)
    }

    async fn shared_bodies(&self, ids: &[Uuid]) -> StoreResult<Vec<SealedBody>> {
        let mut bodies = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ACKS_PER_STATEMENT) {
            let sql = format!(
                "SELECT id, sent_at, key_id, sealed FROM shared_bodies WHERE id IN ({})",
                vec!["?"; chunk.len()].join(", ")
            );
            let mut query = sqlx::query_as(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id);
            }
            let rows: Vec<(Uuid, i64, KeyId, Vec<u8>)> = query.fetch_all(&self.reader).await?;
            bodies.extend(sealed_bodies(rows));
        }
        Ok(bodies)
    }

    async fn queued_ids(
        &self,
        recipient: Uuid,
        device: DeviceId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM messages WHERE recipient = ? AND device_id = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(recipient)
        .bind(i64::from(device))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?)
    }

    async fn queue_shares(&self, recipient: Uuid) -> StoreResult<Vec<QueueShare>> {
        let rows: Vec<(i64, Option<Vec<u8>>, i64, i64)> = sqlx::query_as(
            "SELECT device_id, sender_tag, count(*),
                    COALESCE(SUM(COALESCE(length(sealed), length(body), 0)), 0)
             FROM messages WHERE recipient = ? GROUP BY device_id, sender_tag",
        )
        .bind(recipient)
        .fetch_all(&self.reader)
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
            "DELETE FROM messages WHERE recipient = ?1 AND (?2 IS NULL OR device_id = ?2)",
        )
        .bind(recipient)
        .bind(device.map(i64::from))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl QueueMaintenance for SqliteStore {
    async fn queue_depth(&self) -> StoreResult<QueueDepth> {
        let (total, max, devices): (i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(n), 0), COALESCE(MAX(n), 0), (SELECT count(*) FROM devices)
             FROM (SELECT count(*) AS n FROM messages GROUP BY recipient, device_id) AS queues",
        )
        .fetch_one(&self.reader)
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
                          WHERE id > ?1 AND (key_id IS NULL OR key_id <> ?2)
                          ORDER BY id LIMIT ?3)
               AND (key_id IS NULL OR key_id <> ?2)
             ORDER BY id, recipient, device_id"
        )))
        .bind(after)
        .bind(current)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        stored_rows(rows)
    }

    async fn reseal(&self, rows: Vec<SealedRow>) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await?;
        let mut updated = 0;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<SealedRow> = rows.by_ref().take(ROWS_PER_STATEMENT).collect();
            let mut update = sqlx::query(AssertSqlSafe(reseal_sql(chunk.len())));
            for row in chunk {
                update = update
                    .bind(row.id)
                    .bind(row.recipient)
                    .bind(i64::from(row.device))
                    .bind(row.key_id)
                    .bind(row.sealed)
                    .bind(row.sender_tag.map(|t| t.to_vec()));
            }
            updated += update.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>> {
        Ok(sqlx::query_scalar(
            "SELECT key_id FROM messages WHERE key_id IS NOT NULL
             UNION SELECT key_id FROM shared_bodies ORDER BY key_id",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    async fn sealed_with(&self, key: KeyId, limit: u32) -> StoreResult<Vec<StoredRow>> {
        let rows: Vec<QueueRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {QUEUE_COLUMNS} FROM messages WHERE key_id = ? ORDER BY id LIMIT ?"
        )))
        .bind(key)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        stored_rows(rows)
    }

    async fn delete_before(&self, before: Uuid, limit: u32) -> StoreResult<u64> {
        let rows = sqlx::query(
            "DELETE FROM messages WHERE (id, recipient, device_id) IN
             (SELECT id, recipient, device_id FROM messages WHERE id < ? LIMIT ?)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        let bodies = sqlx::query(
            "DELETE FROM shared_bodies WHERE id IN (SELECT id FROM shared_bodies WHERE id < ? LIMIT ?)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(rows.rows_affected() + bodies.rows_affected())
    }

    async fn delete_orphan_bodies(&self, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM shared_bodies WHERE id IN
             (SELECT id FROM shared_bodies b
              WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = b.id) LIMIT ?)",
        )
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn stale_bodies(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<SealedBody>> {
        let rows: Vec<(Uuid, i64, KeyId, Vec<u8>)> = sqlx::query_as(
            "SELECT id, sent_at, key_id, sealed FROM shared_bodies
             WHERE id > ? AND key_id <> ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(current)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(sealed_bodies(rows))
    }

    async fn reseal_bodies(&self, bodies: Vec<SealedBody>) -> StoreResult<u64> {
        let mut tx = self.writer.begin().await?;
        let mut updated = 0;
        for body in bodies {
            updated += sqlx::query("UPDATE shared_bodies SET key_id = ?, sealed = ? WHERE id = ?")
                .bind(body.key_id)
                .bind(body.sealed)
                .bind(body.id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn forget_expired_keys(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM send_keys WHERE key_hash IN
             (SELECT key_hash FROM send_keys WHERE expires_at <= ? LIMIT ?)",
        )
        .bind(millis(now))
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Stores the first refresh token of a new session of `device`.
async fn insert_session(
    tx: &mut sqlx::SqliteConnection,
    user: Uuid,
    device: DeviceId,
    session: &NewSession,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, user_id, device_id, family_id, expires_at, created_at)
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(session.hash.to_vec())
    .bind(user)
    .bind(i64::from(device))
    .bind(session.family_id)
    .bind(millis(session.expires_at))
    .bind(millis(now))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn insert_device(
    tx: &mut sqlx::SqliteConnection,
    user: Uuid,
    device: &Device,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO devices
             (user_id, device_id, public_key, key_updated_at, name, created_at, last_seen_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(user)
    .bind(i64::from(device.id))
    .bind(device.public_key.clone())
    .bind(millis(device.key_updated_at))
    .bind(device.name.clone())
    .bind(millis(device.created_at))
    .bind(millis(device.last_seen_at))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Stamps the device's `last_seen_at` inside a session's transaction.
async fn seen(
    tx: &mut sqlx::SqliteConnection,
    user: Uuid,
    device: DeviceId,
    at: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query("UPDATE devices SET last_seen_at = ? WHERE user_id = ? AND device_id = ?")
        .bind(millis(at))
        .bind(user)
        .bind(i64::from(device))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Records that the account changed (a device removed, the account
/// deleted) where every other process looks: a revocation of a session id
/// no token carries. Another process that learns it reads the account's
/// devices afresh, even when the account had no session left to revoke.
async fn mark_changed(
    tx: &mut sqlx::SqliteConnection,
    user: Uuid,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query("INSERT INTO revoked_sessions (id, user_id, revoked_at) VALUES (?, ?, ?)")
        .bind(Uuid::new_v4())
        .bind(user)
        .bind(millis(now))
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
/// found there are every session that needs revoking. The single write
/// connection serialises this with rotations.
async fn revoke_in(
    tx: &mut sqlx::SqliteConnection,
    user_id: Uuid,
    scope: Revoke,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Uuid>> {
    let (only, device) = match scope {
        Revoke::All => (None, None),
        Revoke::Session(session) => (Some(session), None),
        Revoke::Device(device) => (None, Some(i64::from(device))),
    };
    let mut sessions: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM refresh_tokens WHERE user_id = ?1 AND (?2 IS NULL OR family_id = ?2)
             AND (?3 IS NULL OR device_id = ?3)
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
    for session in &sessions {
        sqlx::query(
            "INSERT INTO revoked_sessions (id, user_id, revoked_at) VALUES (?, ?, ?)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(session)
        .bind(user_id)
        .bind(millis(now))
        .execute(&mut *tx)
        .await?;
    }
    Ok(sessions)
}

/// `device_id` is an `INTEGER` the store wrote from a [`DeviceId`].
impl Column<DeviceId> for i64 {
    fn read(self) -> DeviceId {
        self as DeviceId
    }
}

/// Times are stored as milliseconds since the epoch.
impl Column<DateTime<Utc>> for i64 {
    fn read(self) -> DateTime<Utc> {
        time(self)
    }
}

#[async_trait]
impl PushStore for SqliteStore {
    async fn set_target(
        &self,
        user: Uuid,
        device: DeviceId,
        kind: Kind,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        // The version: `now`, or a millisecond past the previous one, so
        // that it strictly grows even when the clock does not.
        let version: Option<i64> = sqlx::query_scalar(
            "INSERT INTO push_targets (user_id, device_id, kind, target, updated_at, dropped)
             SELECT ?1, ?2, ?3, ?4, ?5, 0
             WHERE EXISTS (SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2)
             ON CONFLICT (user_id, device_id) DO UPDATE SET
                 kind = excluded.kind, target = excluded.target, dropped = 0,
                 updated_at = max(excluded.updated_at, push_targets.updated_at + 1)
             RETURNING updated_at",
        )
        .bind(user)
        .bind(i64::from(device))
        .bind(kind.as_str())
        .bind(sealed)
        .bind(millis(now))
        .fetch_optional(&self.writer)
        .await?;
        Ok(version.map(time))
    }

    async fn delete_target(&self, user: Uuid, device: DeviceId) -> StoreResult<bool> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM wakeups WHERE user_id = ? AND device_id = ?")
            .bind(user)
            .bind(i64::from(device))
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM push_targets WHERE user_id = ? AND device_id = ?")
            .bind(user)
            .bind(i64::from(device))
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
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query(
            "UPDATE push_targets SET kind = NULL, target = NULL, dropped = 1
             WHERE user_id = ? AND device_id = ? AND updated_at = ? AND target IS NOT NULL",
        )
        .bind(user)
        .bind(i64::from(device))
        .bind(millis(version))
        .execute(&mut *tx)
        .await?;
        let dropped = done.rows_affected() > 0;
        if dropped {
            // Nothing is left to send to.
            sqlx::query("UPDATE wakeups SET due_at = NULL WHERE user_id = ? AND device_id = ?")
                .bind(user)
                .bind(i64::from(device))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(dropped)
    }

    async fn target_summaries(&self, user: Uuid) -> StoreResult<Vec<TargetSummary>> {
        let rows: Vec<TargetSummaryRow<i64, i64>> = sqlx::query_as(
            "SELECT device_id, kind, updated_at, dropped FROM push_targets
             WHERE user_id = ? ORDER BY device_id",
        )
        .bind(user)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(TargetSummary::from).collect())
    }

    async fn count_targets(&self) -> StoreResult<Vec<(Kind, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT kind, count(*) FROM push_targets WHERE kind IS NOT NULL
             GROUP BY kind ORDER BY kind",
        )
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().filter_map(kind_count).collect())
    }

    async fn schedule_many(
        &self,
        wanted: &[Wanted],
        now: DateTime<Utc>,
        rules: Coalescing,
    ) -> StoreResult<Vec<Scheduled>> {
        // The single write connection serialises schedules with each other
        // and with sends, so the reads and the writes below cannot race;
        // one transaction for the batch is one commit on it.
        let mut tx = self.writer.begin().await?;
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
        // One transaction on the single write connection: no other taker
        // can read these rows between the read and the lease. The lease is
        // one statement over the same rows (the same query, in a total
        // order, on rows nothing else wrote since), not one per row: the
        // write connection is the one sends commit on.
        const DUE: &str = "FROM wakeups w JOIN push_targets t
                 ON t.user_id = w.user_id AND t.device_id = w.device_id
             WHERE w.due_at IS NOT NULL AND w.due_at <= ?1 AND t.target IS NOT NULL
             ORDER BY w.due_at, w.user_id, w.device_id LIMIT ?2";
        let mut tx = self.writer.begin().await?;
        let rows: Vec<DueRow<i64, i64, i64>> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT w.user_id, w.device_id, w.urgent, w.attempts, t.kind, t.target, t.updated_at {DUE}"
        )))
        .bind(millis(now))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        if !rows.is_empty() {
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE wakeups SET due_at = ?3
                 WHERE (user_id, device_id) IN (SELECT w.user_id, w.device_id {DUE})"
            )))
            .bind(millis(now))
            .bind(i64::from(limit))
            .bind(millis(super::add(now, lease)))
            .execute(&mut *tx)
            .await?;
        }
        // A kind this build does not know stays leased (`UnknownKind`).
        let due = rows
            .into_iter()
            .filter_map(|row| DueWakeup::try_from(row).ok())
            .collect();
        tx.commit().await?;
        Ok(due)
    }

    async fn stale_targets(
        &self,
        current: KeyId,
        after: (Uuid, DeviceId),
        limit: u32,
    ) -> StoreResult<Vec<(Uuid, DeviceId, Vec<u8>)>> {
        let rows: Vec<(Uuid, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT user_id, device_id, target FROM push_targets
             WHERE target IS NOT NULL AND substr(target, 1, 2) <> ?
               AND (user_id, device_id) > (?, ?)
             ORDER BY user_id, device_id LIMIT ?",
        )
        .bind(current.to_be_bytes().to_vec())
        .bind(after.0)
        .bind(i64::from(after.1))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
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
            "UPDATE push_targets SET target = ?
             WHERE user_id = ? AND device_id = ? AND target = ?",
        )
        .bind(resealed)
        .bind(user)
        .bind(i64::from(device))
        .bind(sealed)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn update_wakeups(&self, updates: &[(Uuid, DeviceId, WakeupUpdate)]) -> StoreResult<()> {
        let mut tx = self.writer.begin().await?;
        for i in lock_order(updates, |u| (u.0, u.1)) {
            let (user, device, update) = updates[i];
            let query = match update {
                WakeupUpdate::Sent { urgent, at } => sqlx::query(
                    "UPDATE wakeups SET due_at = NULL, attempts = 0, sent_at = ?1,
                         quiet_sent_at = CASE WHEN ?2 THEN quiet_sent_at ELSE ?1 END
                     WHERE user_id = ?3 AND device_id = ?4",
                )
                .bind(millis(at))
                .bind(urgent),
                WakeupUpdate::Retry { at, attempts } => sqlx::query(
                    "UPDATE wakeups SET due_at = ?1, attempts = ?2
                     WHERE user_id = ?3 AND device_id = ?4",
                )
                .bind(millis(at))
                .bind(i64::from(attempts)),
                WakeupUpdate::Abandoned => sqlx::query(
                    "UPDATE wakeups SET due_at = NULL, sent_at = NULL, attempts = 0
                     WHERE user_id = ?1 AND device_id = ?2",
                ),
                WakeupUpdate::Cancelled => sqlx::query(
                    "UPDATE wakeups SET due_at = NULL, sent_at = NULL, attempts = 0
                     WHERE user_id = ?1 AND device_id = ?2
                       AND (due_at IS NOT NULL OR sent_at IS NOT NULL)",
                ),
            };
            query
                .bind(user)
                .bind(i64::from(device))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// One device of [`PushStore::schedule_many`], inside its transaction.
async fn schedule_one(
    conn: &mut sqlx::SqliteConnection,
    wanted: &Wanted,
    now: DateTime<Utc>,
    rules: Coalescing,
) -> StoreResult<Scheduled> {
    let Wanted {
        user,
        device,
        due,
        urgent,
    } = *wanted;
    // Insert-if-absent first, the common case (a device with no wake-up
    // row yet) in one statement.
    let inserted = sqlx::query(
        "INSERT INTO wakeups (user_id, device_id, due_at, urgent, attempts)
         SELECT ?1, ?2, ?3, ?4, 0 WHERE EXISTS (
             SELECT 1 FROM push_targets
             WHERE user_id = ?1 AND device_id = ?2 AND target IS NOT NULL)
         ON CONFLICT (user_id, device_id) DO NOTHING",
    )
    .bind(user)
    .bind(i64::from(device))
    .bind(millis(due))
    .bind(urgent)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(Scheduled::Pending);
    }
    let live: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM push_targets
                        WHERE user_id = ? AND device_id = ? AND target IS NOT NULL)",
    )
    .bind(user)
    .bind(i64::from(device))
    .fetch_one(&mut *conn)
    .await?;
    if !live {
        return Ok(Scheduled::NoTarget);
    }
    let row: Option<TimesRow<i64>> = sqlx::query_as(
        "SELECT due_at, sent_at, quiet_sent_at FROM wakeups WHERE user_id = ? AND device_id = ?",
    )
    .bind(user)
    .bind(i64::from(device))
    .fetch_optional(&mut *conn)
    .await?;
    let state = row.map(WakeupRow::from);
    let (query, outcome) = match decide(state.as_ref(), urgent, now, rules) {
        Decision::Insert => (
            sqlx::query(
                "INSERT INTO wakeups (due_at, urgent, user_id, device_id, attempts)
                 VALUES (?, ?, ?, ?, 0)",
            )
            .bind(millis(due))
            .bind(urgent),
            Scheduled::Pending,
        ),
        Decision::Revive => (
            sqlx::query(
                "UPDATE wakeups SET due_at = ?, urgent = ?, attempts = 0
                 WHERE user_id = ? AND device_id = ?",
            )
            .bind(millis(due))
            .bind(urgent),
            Scheduled::Pending,
        ),
        Decision::Upgrade => (
            sqlx::query(
                "UPDATE wakeups SET urgent = 1, due_at = min(due_at, ?)
                 WHERE user_id = ? AND device_id = ? AND due_at IS NOT NULL",
            )
            .bind(millis(due)),
            Scheduled::Coalesced,
        ),
        Decision::Coalesce => return Ok(Scheduled::Coalesced),
    };
    query
        .bind(user)
        .bind(i64::from(device))
        .execute(&mut *conn)
        .await?;
    Ok(outcome)
}

/// Shared bodies as selected: `id, sent_at, key_id, sealed`.
fn sealed_bodies(rows: Vec<(Uuid, i64, KeyId, Vec<u8>)>) -> Vec<SealedBody> {
    rows.into_iter()
        .map(|(id, sent_at, key_id, sealed)| SealedBody {
            id,
            sent_at: time(sent_at),
            key_id,
            sealed,
        })
        .collect()
}
