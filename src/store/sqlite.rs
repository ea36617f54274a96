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

use std::collections::HashMap;
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

use super::{
    AccountDetails, AccountSummary, Ack, Credentials, KeyId, QueueDepth, RefreshToken, Revoked,
    Rotation, SealedRow, Stats, Store, StoreError, StoreResult, StoredRow, User,
};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Rows per multi-row statement: 100 inserts bind 500 parameters, far under
/// SQLite's limit of 32,766.
const ROWS_PER_STATEMENT: usize = 100;

/// `INSERT ... VALUES (?, ?, ?, ?, ?), ...` for `rows` messages. Built from
/// constant fragments only; every value is bound.
fn insert_sql(rows: usize) -> String {
    let mut sql =
        String::from("INSERT INTO messages (id, recipient, sent_at, key_id, sealed) VALUES ");
    sql.push_str(&vec!["(?, ?, ?, ?, ?)"; rows].join(", "));
    sql
}

/// Seals `rows` rows again: `VALUES` columns are id, key id, sealed. Built
/// from constant fragments only; every value is bound.
fn reseal_sql(rows: usize) -> String {
    format!(
        "UPDATE messages SET key_id = u.column2, sealed = u.column3, sender = NULL, body = NULL
         FROM (VALUES {}) AS u WHERE messages.id = u.column1",
        vec!["(?, ?, ?)"; rows].join(", ")
    )
}

/// Deletes up to `ids` of one recipient's messages, returning those deleted.
/// Built from constant fragments only; every value is bound.
fn delete_sql(ids: usize) -> String {
    format!(
        "DELETE FROM messages WHERE recipient = ? AND id IN ({}) RETURNING id",
        vec!["?"; ids].join(", ")
    )
}

/// How long a statement waits on SQLite's file lock (held only by another
/// process, such as a backup) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Address space each connection maps the database file into. A page read
/// through the map costs no `pread` and no copy into SQLite's page cache:
/// during a backlog drain, `pread` and its copies were about a tenth of the
/// server's CPU, and the mapping cut the drain's CPU by 10-20% (measured).
/// Only address space: the pages are the kernel's file cache, shared by
/// every connection, not memory of the process. Pages still in the WAL are
/// read as before.
const MMAP_BYTES: u64 = 256 * 1024 * 1024;

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

type UserRow = (Uuid, String, Vec<u8>, i64, i64);

fn user_from_row((id, username, public_key, key_updated_at, created_at): UserRow) -> User {
    User {
        id,
        username,
        public_key,
        key_updated_at: time(key_updated_at),
        created_at: time(created_at),
    }
}

type QueueRow = super::QueueColumns<i64>;

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
        .map(|(id, recipient, sent_at, key_id, sealed, sender, body)| {
            StoredRow::from_columns((id, recipient, time(sent_at), key_id, sealed, sender, body))
        })
        .collect()
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
        if database_path(url).is_none() {
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
        }
        let writer = single(0).connect_with(options.clone()).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self { writer, reader })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.writer).await?;
        Ok(())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn create_user(&self, user: &User, password_hash: &str) -> StoreResult<()> {
        let result = sqlx::query(
            "INSERT INTO users (id, username, password_hash, public_key, key_updated_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(user.id)
        .bind(user.username.clone())
        .bind(password_hash.to_owned())
        .bind(user.public_key.clone())
        .bind(millis(user.key_updated_at))
        .bind(millis(user.created_at))
        .execute(&self.writer)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e))
                if e.is_unique_violation() && e.message().contains("users.username") =>
            {
                Err(StoreError::UsernameTaken)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn user(&self, id: Uuid) -> StoreResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, username, public_key, key_updated_at, created_at FROM users WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(user_from_row))
    }

    async fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(
            "SELECT id, username, public_key, key_updated_at, created_at FROM users WHERE username = ?",
        )
        .bind(username.to_owned())
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(user_from_row))
    }

    async fn user_exists(&self, id: Uuid) -> StoreResult<bool> {
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE id = ?)")
            .bind(id)
            .fetch_one(&self.reader)
            .await?;
        Ok(exists)
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
        let row: Option<(Uuid, String, bool)> = sqlx::query_as(
            "SELECT id, password_hash, disabled_at IS NOT NULL FROM users WHERE username = ?",
        )
        .bind(username.to_owned())
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(|(user_id, password_hash, disabled)| Credentials {
            user_id,
            password_hash,
            disabled,
        }))
    }

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
        let revoked = revoke_in(&mut tx, user_id, None, now).await?;
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
        type Row = (
            Uuid,
            String,
            i64,
            Option<i64>,
            i64,
            i64,
            i64,
            i64,
            Option<Uuid>,
        );
        let row: Option<Row> = sqlx::query_as(
            "SELECT u.id, u.username, u.created_at, u.disabled_at,
                    (SELECT count(*) FROM messages m WHERE m.recipient = u.id),
                    length(u.public_key), u.key_updated_at,
                    (SELECT count(*) FROM refresh_tokens t
                     WHERE t.user_id = u.id AND t.used_at IS NULL AND t.expires_at > ?2),
                    (SELECT m.id FROM messages m WHERE m.recipient = u.id ORDER BY m.id LIMIT 1)
             FROM users u WHERE u.id = ?1",
        )
        .bind(id)
        .bind(millis(now))
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(
            |(id, username, created, disabled, queued, key_bytes, key_at, sessions, oldest)| {
                AccountDetails {
                    summary: summary_from_row((id, username, created, disabled, queued)),
                    public_key_bytes: key_bytes as u64,
                    key_updated_at: time(key_at),
                    live_sessions: sessions as u64,
                    oldest_queued: oldest,
                }
            },
        ))
    }

    async fn stats(&self, now: DateTime<Utc>) -> StoreResult<Stats> {
        let (users, disabled_users, live_sessions, revocations, recipients, oldest_queued): (
            i64,
            i64,
            i64,
            i64,
            i64,
            Option<Uuid>,
        ) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM users),
                    (SELECT count(*) FROM users WHERE disabled_at IS NOT NULL),
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

    async fn set_public_key(
        &self,
        id: Uuid,
        key: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<Option<User>> {
        let row: Option<UserRow> = sqlx::query_as(
            "UPDATE users SET public_key = ?, key_updated_at = ? WHERE id = ?
             RETURNING id, username, public_key, key_updated_at, created_at",
        )
        .bind(key.to_vec())
        .bind(millis(at))
        .bind(id)
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.map(user_from_row))
    }

    async fn insert_refresh_token(&self, token: &RefreshToken) -> StoreResult<bool> {
        // On the single write connection, after or before any
        // `disable_user`, never between its statements.
        let done = sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at)
             SELECT ?, id, ?, ?, ? FROM users WHERE id = ? AND disabled_at IS NULL",
        )
        .bind(token.hash.to_vec())
        .bind(token.family_id)
        .bind(millis(token.expires_at))
        .bind(millis(super::now()))
        .bind(token.user_id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotate_refresh_token(
        &self,
        presented: &[u8; 32],
        next_hash: &[u8; 32],
        next_expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<Rotation> {
        // The single write connection serialises rotations, so the spend and
        // the reuse check cannot interleave with another presentation.
        let mut tx = self.writer.begin().await?;
        let spent: Option<(Uuid, Uuid)> = sqlx::query_as(
            "UPDATE refresh_tokens SET used_at = ?2
             WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2
             RETURNING user_id, family_id",
        )
        .bind(presented.to_vec())
        .bind(millis(now))
        .fetch_optional(&mut *tx)
        .await?;
        let rotation = match spent {
            Some((user_id, family_id)) => {
                sqlx::query(
                    "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(next_hash.to_vec())
                .bind(user_id)
                .bind(family_id)
                .bind(millis(next_expires_at))
                .bind(millis(now))
                .execute(&mut *tx)
                .await?;
                Rotation::Rotated { user_id, family_id }
            }
            None => {
                let previous: Option<(Uuid, bool)> = sqlx::query_as(
                    "SELECT user_id, used_at IS NOT NULL FROM refresh_tokens WHERE token_hash = ?",
                )
                .bind(presented.to_vec())
                .fetch_optional(&mut *tx)
                .await?;
                match previous {
                    Some((user_id, true)) => {
                        let revoked = revoke_in(&mut tx, user_id, None, now).await?;
                        Rotation::Reused { user_id, revoked }
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
        let revoked = revoke_in(&mut tx, user_id, only, now).await?;
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

    async fn set_password(
        &self,
        user_id: Uuid,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Uuid>> {
        let mut tx = self.writer.begin().await?;
        sqlx::query("UPDATE users SET password_hash = ? WHERE id = ?")
            .bind(password_hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let revoked = revoke_in(&mut tx, user_id, None, now).await?;
        tx.commit().await?;
        Ok(revoked)
    }

    async fn delete_user(
        &self,
        user_id: Uuid,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<Uuid>>> {
        let mut tx = self.writer.begin().await?;
        // Revoke before deleting the user: the delete cascades to the
        // refresh tokens, which are how the user's sessions are found.
        let revoked = revoke_in(&mut tx, user_id, None, now).await?;
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

    async fn queued_count(&self, recipient: Uuid) -> StoreResult<u64> {
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE recipient = ?")
            .bind(recipient)
            .fetch_one(&self.reader)
            .await?;
        Ok(count as u64)
    }

    async fn queue_depth(&self) -> StoreResult<QueueDepth> {
        let (total, max): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(n), 0), COALESCE(MAX(n), 0)
             FROM (SELECT count(*) AS n FROM messages GROUP BY recipient) AS queues",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(QueueDepth {
            total: total as u64,
            max_per_recipient: max as u64,
        })
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

    async fn write_batch(&self, messages: Vec<SealedRow>, acks: &[Ack]) -> StoreResult<Vec<Uuid>> {
        // One transaction, one fsync, for the whole batch. sqlx runs each
        // SQLite statement on the connection's worker thread, a cross-thread
        // round trip apiece, so rows go many to a statement: a statement per
        // row cost more CPU in thread hand-offs than SQLite spent working.
        let mut tx = self.writer.begin().await?;
        let mut messages = messages.into_iter().peekable();
        while messages.peek().is_some() {
            let chunk: Vec<SealedRow> = messages.by_ref().take(ROWS_PER_STATEMENT).collect();
            let mut insert = sqlx::query(AssertSqlSafe(insert_sql(chunk.len())));
            for row in chunk {
                insert = insert
                    .bind(row.id)
                    .bind(row.recipient)
                    .bind(millis(row.sent_at))
                    .bind(row.key_id)
                    .bind(row.sealed);
            }
            insert.execute(&mut *tx).await?;
        }
        let mut by_recipient: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
        for ack in acks {
            by_recipient.entry(ack.recipient).or_default().push(ack.id);
        }
        let mut deleted = Vec::new();
        for (recipient, ids) in by_recipient {
            for chunk in ids.chunks(ROWS_PER_STATEMENT) {
                let mut delete =
                    sqlx::query_scalar(AssertSqlSafe(delete_sql(chunk.len()))).bind(recipient);
                for id in chunk {
                    delete = delete.bind(*id);
                }
                let gone: Vec<Uuid> = delete.fetch_all(&mut *tx).await?;
                deleted.extend(gone);
            }
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn fetch(&self, recipient: Uuid, after: Uuid, limit: u32) -> StoreResult<Vec<StoredRow>> {
        let rows: Vec<QueueRow> = sqlx::query_as(
            "SELECT id, recipient, sent_at, key_id, sealed, sender, body FROM messages
             WHERE recipient = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(recipient)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        stored_rows(rows)
    }

    async fn stale_rows(
        &self,
        current: KeyId,
        after: Uuid,
        limit: u32,
    ) -> StoreResult<Vec<StoredRow>> {
        let rows: Vec<QueueRow> = sqlx::query_as(
            "SELECT id, recipient, sent_at, key_id, sealed, sender, body FROM messages
             WHERE id > ? AND (key_id IS NULL OR key_id <> ?) ORDER BY id LIMIT ?",
        )
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
                update = update.bind(row.id).bind(row.key_id).bind(row.sealed);
            }
            updated += update.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(updated)
    }

    async fn key_ids_in_use(&self) -> StoreResult<Vec<KeyId>> {
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT key_id FROM messages WHERE key_id IS NOT NULL ORDER BY key_id",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    async fn sealed_with(&self, key: KeyId, limit: u32) -> StoreResult<Vec<StoredRow>> {
        let rows: Vec<QueueRow> = sqlx::query_as(
            "SELECT id, recipient, sent_at, key_id, sealed, sender, body FROM messages
             WHERE key_id = ? ORDER BY id LIMIT ?",
        )
        .bind(key)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        stored_rows(rows)
    }

    async fn delete_before(&self, before: Uuid, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM messages WHERE id IN (SELECT id FROM messages WHERE id < ? LIMIT ?)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }
}

/// Records the user's sessions (or just `only`) as revoked and deletes
/// their refresh tokens. Every session with a live access token still has
/// its refresh tokens (spent ones are kept until they expire), so the
/// families found there are every session that needs revoking. The single
/// write connection serialises this with rotations.
async fn revoke_in(
    tx: &mut sqlx::SqliteConnection,
    user_id: Uuid,
    only: Option<Uuid>,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Uuid>> {
    let mut sessions: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM refresh_tokens WHERE user_id = ?1 AND (?2 IS NULL OR family_id = ?2)
         RETURNING family_id",
    )
    .bind(user_id)
    .bind(only)
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
