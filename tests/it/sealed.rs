//! Sealed storage: a dump of the queue reveals no sender and no body; keys
//! rotate without losing a row; rows of an earlier release are kept and
//! sealed; a key list that cannot open the queue (a key missing, or another
//! key under its id) stops start-up.
//!
//! These tests read the database behind the server's back, with sqlx on the
//! test database's URL, as someone holding a dump would.

use std::path::Path;
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::Utc;
use sealpost::Server;
use sealpost::auth::token::Tokens;
use sealpost::config::Secret;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{AssertSqlSafe, PgPool, SqlitePool};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{
    self, Account, Backend, JWT_SECRET, TestDb, TestServer, assert_each, id, unb64,
};

backend_tests!(
    a_dump_reveals_no_sender_and_no_body,
    rotated_keys_keep_old_rows_and_seal_them_again,
    a_key_list_missing_a_key_in_use_refuses_to_start_and_keeps_the_rows,
    another_key_under_the_same_id_refuses_to_start_and_keeps_the_rows,
    plaintext_rows_of_an_earlier_release_are_delivered_and_sealed,
);

pub(crate) const OLD: &str = "1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub(crate) const NEW: &str = "2:ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

pub(crate) fn rotated() -> String {
    format!("{NEW},{OLD}")
}

/// The test database, opened directly (also read by `client.rs`).
pub(crate) enum Raw {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

impl Raw {
    pub(crate) async fn open(db: &TestDb) -> Self {
        if db.url.starts_with("postgres") {
            Raw::Pg(PgPool::connect(&db.url).await.expect("raw PostgreSQL"))
        } else {
            // Created if missing, in the WAL mode the server uses, so that
            // it can be prepared before the server first starts.
            let options = SqliteConnectOptions::from_str(&db.url)
                .unwrap()
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal);
            Raw::Sqlite(SqlitePool::connect_with(options).await.expect("raw SQLite"))
        }
    }

    /// Every column of every `messages` row as text, one string per row,
    /// whatever the columns are. Blobs appear in hex (`\x..` in PostgreSQL's
    /// JSON, `X'..'` from SQLite's `quote`), so raw bytes are searched for
    /// by their hex.
    pub(crate) async fn dump(&self) -> Vec<String> {
        let rows: Vec<String> = match self {
            Raw::Pg(pool) => sqlx::query_scalar("SELECT row_to_json(m)::text FROM messages m")
                .fetch_all(pool)
                .await
                .unwrap(),
            Raw::Sqlite(pool) => {
                let columns: Vec<String> =
                    sqlx::query_scalar("SELECT name FROM pragma_table_info('messages')")
                        .fetch_all(pool)
                        .await
                        .unwrap();
                let row = columns
                    .iter()
                    .map(|c| format!("{c}=' || quote({c}) || '"))
                    .collect::<Vec<_>>()
                    .join(", ");
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT '{row}' FROM messages")))
                    .fetch_all(pool)
                    .await
                    .unwrap()
            }
        };
        rows.into_iter().map(|r| r.to_lowercase()).collect()
    }

    /// `(id, key_id)` of every row, in id order; `None` for plaintext rows.
    async fn key_ids(&self) -> Vec<(Uuid, Option<i16>)> {
        let sql = "SELECT id, key_id FROM messages ORDER BY id";
        match self {
            Raw::Pg(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
            Raw::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await.unwrap(),
        }
    }

    /// Waits until every row is sealed under `key_id`; there must be rows.
    async fn wait_sealed_under(&self, key_id: i16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = self.key_ids().await;
            assert!(!rows.is_empty(), "no rows to seal under key {key_id}");
            if rows.iter().all(|(_, k)| *k == Some(key_id)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "rows not sealed under key {key_id}: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts that no row shows `sender` (as text or as its 16 bytes) or any
/// of `bodies` (as text or as bytes); a dump of no rows hides nothing.
#[track_caller]
fn assert_hidden(dump: &[String], sender: Uuid, bodies: &[Vec<u8>]) {
    assert!(!dump.is_empty(), "an empty dump: no row to look in");
    assert!(!bodies.is_empty(), "no bodies to look for");
    let mut needles = vec![sender.to_string(), hex(sender.as_bytes())];
    for body in bodies {
        needles.push(String::from_utf8_lossy(body).to_lowercase());
        needles.push(hex(body));
    }
    for row in dump {
        for needle in &needles {
            assert!(!row.contains(needle), "{needle} found in a row: {row}");
        }
    }
}

/// `n` distinctive bodies.
fn bodies(tag: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{tag} {i} {}", Uuid::new_v4()).into_bytes())
        .collect()
}

async fn send_all(server: &TestServer, from: &Account, to: Uuid, bodies: &[Vec<u8>]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for body in bodies {
        ids.push(id(&server.send(from, to, body).await["id"]));
    }
    ids
}

/// Asserts that `who`'s queue is exactly `bodies` from `from`, in order.
async fn assert_inbox(server: &TestServer, who: &Account, from: Uuid, bodies: &[Vec<u8>]) {
    let inbox = server.inbox(who).await;
    let got: Vec<Vec<u8>> = inbox
        .iter()
        .map(|m| unb64(m["body"].as_str().unwrap()))
        .collect();
    assert!(!bodies.is_empty(), "an empty queue proves nothing");
    assert_eq!(got, bodies);
    assert_each(&inbox, "from the sender", |m| id(&m["from"]) == from);
}

async fn a_dump_reveals_no_sender_and_no_body(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sent = bodies("attack at dawn", 5);
    send_all(&server, &alice, bob.id, &sent).await;

    let raw = Raw::open(&server.db).await;
    let dump = raw.dump().await;
    assert_eq!(dump.len(), 5);
    assert_hidden(&dump, alice.id, &sent);
    // The dump does show rows: the recipient is in the clear, by design.
    assert_each(&dump, "the recipient in the clear", |row| {
        row.contains(&bob.id.to_string()) || row.contains(&hex(bob.id.as_bytes()))
    });
    assert_inbox(&server, &bob, alice.id, &sent).await;
}

async fn rotated_keys_keep_old_rows_and_seal_them_again(backend: Backend) {
    let server = TestServer::start_with(backend, &["--storage-keys", OLD]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let old = bodies("old", 3);
    send_all(&server, &alice, bob.id, &old).await;
    let db = server.stop().await;
    let raw = Raw::open(&db).await;
    assert_each(&raw.key_ids().await, "sealed under key 1", |(_, k)| {
        *k == Some(1)
    });

    // New key first, old key kept: old rows still read, new rows use key 2.
    let server = TestServer::start_on(db, &["--storage-keys", &rotated()]).await;
    let new = bodies("new", 2);
    let new_ids = send_all(&server, &alice, bob.id, &new).await;
    let tagged = raw.key_ids().await;
    for new_id in &new_ids {
        assert!(tagged.contains(&(*new_id, Some(2))), "{tagged:?}");
    }
    let all = [old.clone(), new.clone()].concat();
    assert_inbox(&server, &bob, alice.id, &all).await;

    // The sweeper seals the old rows again under key 2 ...
    raw.wait_sealed_under(2).await;
    assert_hidden(&raw.dump().await, alice.id, &all);
    let db = server.stop().await;

    // ... so key 1 can be retired.
    let server = TestServer::start_on(db, &["--storage-keys", NEW]).await;
    assert_inbox(&server, &bob, alice.id, &all).await;
}

async fn a_key_list_missing_a_key_in_use_refuses_to_start_and_keeps_the_rows(backend: Backend) {
    let server = TestServer::start_with(backend, &["--storage-keys", OLD]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sent = bodies("kept", 2);
    send_all(&server, &alice, bob.id, &sent).await;
    let db = server.stop().await;

    let refused = match Server::bind(common::config(&db, &["--storage-keys", NEW])).await {
        Ok(_) => panic!("started without the key its queued rows are sealed with"),
        Err(err) => format!("{err:#}"),
    };
    assert!(refused.contains("storage key id(s) [1]"), "{refused}");
    assert!(refused.contains("SEALPOST_STORAGE_KEYS"), "{refused}");
    let raw = Raw::open(&db).await;
    assert_eq!(raw.key_ids().await.len(), 2, "a row was lost");

    // With the old key back, after the new one, everything is delivered.
    let server = TestServer::start_on(db, &["--storage-keys", &rotated()]).await;
    assert_inbox(&server, &bob, alice.id, &sent).await;
}

/// A key file generated anew after a restore (or a mistyped key) has the id
/// of the key the queue was sealed with, but not its bytes.
async fn another_key_under_the_same_id_refuses_to_start_and_keeps_the_rows(backend: Backend) {
    let server = TestServer::start_with(backend, &["--storage-keys", OLD]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sent = bodies("same-id", 2);
    send_all(&server, &alice, bob.id, &sent).await;
    let db = server.stop().await;

    let impostor = format!("1:{}", NEW.split_once(':').unwrap().1);
    let refused = match Server::bind(common::config(&db, &["--storage-keys", &impostor])).await {
        Ok(_) => panic!("started with a key that does not open its queued rows"),
        Err(err) => format!("{err:#}"),
    };
    assert!(
        refused.contains("storage key 1 does not open the queued messages"),
        "{refused}"
    );
    let raw = Raw::open(&db).await;
    assert_eq!(raw.key_ids().await.len(), 2, "a row was lost");

    let server = TestServer::start_on(db, &["--storage-keys", OLD]).await;
    assert_inbox(&server, &bob, alice.id, &sent).await;
}

/// Applies only the first migration, as the release before sealed storage
/// left the database.
async fn migrate_to_initial(raw: &Raw, backend: Backend) {
    let folder = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let name = "20261123000001_initial.sql";
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder)
        .join(name);
    std::fs::copy(source, dir.path().join(name)).unwrap();
    let migrator = sqlx::migrate::Migrator::new(dir.path()).await.unwrap();
    match raw {
        Raw::Pg(pool) => migrator.run(pool).await.unwrap(),
        Raw::Sqlite(pool) => migrator.run(pool).await.unwrap(),
    }
}

async fn plaintext_rows_of_an_earlier_release_are_delivered_and_sealed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let raw = Raw::open(&db).await;
    migrate_to_initial(&raw, backend).await;
    let (sender, recipient) = (Uuid::new_v4(), Uuid::new_v4());
    let legacy = bodies("legacy", 3);
    for body in &legacy {
        let id = Uuid::now_v7();
        let sent_at = sealpost::store::id_time(id);
        match &raw {
            Raw::Pg(pool) => sqlx::query(
                "INSERT INTO messages (id, recipient, sender, body, sent_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(recipient)
            .bind(sender)
            .bind(body.clone())
            .bind(sent_at)
            .execute(pool)
            .await
            .map(|_| ())
            .unwrap(),
            Raw::Sqlite(pool) => sqlx::query(
                "INSERT INTO messages (id, recipient, sender, body, sent_at)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(recipient)
            .bind(sender)
            .bind(body.clone())
            .bind(sent_at.timestamp_millis())
            .execute(pool)
            .await
            .map(|_| ())
            .unwrap(),
        };
    }

    // The new release migrates, keeps the rows and delivers them intact.
    let server = TestServer::start_on(db, &[]).await;
    let tokens = Tokens::new(
        &Secret::new(JWT_SECRET.to_owned()),
        Duration::from_secs(600),
        Duration::from_secs(600),
    );
    let reader = Account {
        id: recipient,
        username: "legacy".into(),
        access: tokens
            .issue_access(recipient, 1, Uuid::new_v4(), Utc::now())
            .unwrap(),
        refresh: String::new(),
    };
    assert_inbox(&server, &reader, sender, &legacy).await;

    // The sweeper seals them at start-up (key 1: generated with SQLite,
    // the suite's with PostgreSQL); no plaintext is left in the rows.
    raw.wait_sealed_under(1).await;
    assert_hidden(&raw.dump().await, sender, &legacy);
    assert_inbox(&server, &reader, sender, &legacy).await;
}

#[test]
fn postgres_without_storage_keys_refuses_to_start() {
    let output = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env("SEALPOST_JWT_SECRET", JWT_SECRET)
        .output()
        .expect("run sealpost");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("SEALPOST_STORAGE_KEYS is not set"),
        "{stderr}"
    );
}
