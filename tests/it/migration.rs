//! The devices migration (issue 12) on a database made by the schema of the
//! release before it: every account becomes one with device 1 holding its
//! key, and every queued message and every session moves to device 1, so
//! that nothing queued is lost and no signed-in client is signed out.
//!
//! The database is built with only the migrations that release shipped and
//! filled through its schema with plain SQL, as that release left it: users
//! with keys, a live session (a refresh token, and an access token without
//! the `dev` claim), and a queue holding both legacy plaintext rows and rows
//! sealed in the v1 format (`src/seal.rs` of that release).

use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{
    Account, Backend, JWT_SECRET, PASSWORD, STORAGE_KEYS, TestDb, TestServer, b64, eventually, id,
    ids, public_key, session, time, unb64,
};

backend_tests!(the_migration_keeps_every_queued_message_and_session);

/// The last migration of the release before devices.
const LAST_RELEASED: i64 = 20261124000030;

/// The associated-data label of the v1 sealed format.
const AD_LABEL: &[u8] = b"sealpost/queue/v1";

/// The database, opened directly.
enum Raw {
    Pg(PgPool),
    Sqlite(SqlitePool),
}

/// `migrator` with only the migrations the last release shipped.
fn released(mut migrator: Migrator) -> Migrator {
    migrator.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= LAST_RELEASED)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    let versions: Vec<i64> = migrator.migrations.iter().map(|m| m.version).collect();
    assert_eq!(
        versions,
        [
            20261123000001,
            20261124000010,
            20261124000020,
            20261124000030
        ],
        "the released migrations"
    );
    migrator
}

impl Raw {
    /// Opens `db` (creating an SQLite file) and applies the released
    /// migrations only.
    async fn with_released_schema(db: &TestDb) -> Self {
        if db.is_postgres() {
            let pool = PgPool::connect(&db.url).await.expect("raw PostgreSQL");
            released(sqlx::migrate!("migrations/postgres"))
                .run(&pool)
                .await
                .expect("the released PostgreSQL migrations");
            Raw::Pg(pool)
        } else {
            let options = SqliteConnectOptions::from_str(&db.url)
                .unwrap()
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .foreign_keys(true);
            let pool = SqlitePool::connect_with(options).await.expect("raw SQLite");
            released(sqlx::migrate!("migrations/sqlite"))
                .run(&pool)
                .await
                .expect("the released SQLite migrations");
            Raw::Sqlite(pool)
        }
    }

    async fn close(self) {
        match self {
            Raw::Pg(pool) => pool.close().await,
            Raw::Sqlite(pool) => pool.close().await,
        }
    }

    async fn insert_user(&self, user: &OldUser, password_hash: &str) {
        let done = match self {
            Raw::Pg(pool) => sqlx::query(
                "INSERT INTO users (id, username, password_hash, public_key, key_updated_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(user.id)
            .bind(user.username)
            .bind(password_hash)
            .bind(user.key.clone())
            .bind(user.key_updated_at)
            .bind(user.created_at)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
            Raw::Sqlite(pool) => sqlx::query(
                "INSERT INTO users (id, username, password_hash, public_key, key_updated_at, created_at)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(user.id)
            .bind(user.username)
            .bind(password_hash)
            .bind(user.key.clone())
            .bind(user.key_updated_at.timestamp_millis())
            .bind(user.created_at.timestamp_millis())
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
        };
        assert_eq!(done.expect("insert a user"), 1);
    }

    /// A live refresh token of `user` in session `family`.
    async fn insert_refresh_token(&self, token: &str, user: Uuid, family: Uuid) {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (created, expires) = (
            Utc::now() - TimeDelta::hours(1),
            Utc::now() + TimeDelta::days(20),
        );
        let done = match self {
            Raw::Pg(pool) => sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(hash.to_vec())
            .bind(user)
            .bind(family)
            .bind(expires)
            .bind(created)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
            Raw::Sqlite(pool) => sqlx::query(
                "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at, created_at)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(hash.to_vec())
            .bind(user)
            .bind(family)
            .bind(expires.timestamp_millis())
            .bind(created.timestamp_millis())
            .execute(pool)
            .await
            .map(|r| r.rows_affected()),
        };
        assert_eq!(done.expect("insert a refresh token"), 1);
    }

    async fn insert_message(&self, message: &OldMessage) {
        let sent_at = id_time(message.id);
        let done = if message.sealed {
            let sealed = seal_v1(message.id, message.recipient, message.sender, &message.body);
            match self {
                Raw::Pg(pool) => sqlx::query(
                    "INSERT INTO messages (id, recipient, sent_at, key_id, sealed)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(message.id)
                .bind(message.recipient)
                .bind(sent_at)
                .bind(1i16)
                .bind(sealed)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
                Raw::Sqlite(pool) => sqlx::query(
                    "INSERT INTO messages (id, recipient, sent_at, key_id, sealed)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(message.id)
                .bind(message.recipient)
                .bind(sent_at.timestamp_millis())
                .bind(1i16)
                .bind(sealed)
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            }
        } else {
            match self {
                Raw::Pg(pool) => sqlx::query(
                    "INSERT INTO messages (id, recipient, sent_at, sender, body)
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(message.id)
                .bind(message.recipient)
                .bind(sent_at)
                .bind(message.sender)
                .bind(message.body.clone())
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
                Raw::Sqlite(pool) => sqlx::query(
                    "INSERT INTO messages (id, recipient, sent_at, sender, body)
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(message.id)
                .bind(message.recipient)
                .bind(sent_at.timestamp_millis())
                .bind(message.sender)
                .bind(message.body.clone())
                .execute(pool)
                .await
                .map(|r| r.rows_affected()),
            }
        };
        assert_eq!(done.expect("insert a queued message"), 1);
    }
}

struct OldUser {
    id: Uuid,
    username: &'static str,
    key: Vec<u8>,
    key_updated_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

struct OldMessage {
    id: Uuid,
    recipient: Uuid,
    sender: Uuid,
    body: Vec<u8>,
    /// Sealed in the v1 format, or a legacy plaintext row.
    sealed: bool,
}

/// The acceptance time a UUIDv7 carries: its first 48 bits, in Unix
/// milliseconds. The queue's `sent_at` is this.
fn id_time(id: Uuid) -> DateTime<Utc> {
    let b = id.as_bytes();
    let millis = u64::from_be_bytes([0, 0, b[0], b[1], b[2], b[3], b[4], b[5]]);
    DateTime::from_timestamp_millis(millis as i64).unwrap()
}

/// `sender || body` sealed as the released `src/seal.rs` did, under the
/// suite's storage key 1: `nonce (24) || ciphertext || tag (16)`, with the
/// label, the message id and the recipient id as associated data.
fn seal_v1(id: Uuid, recipient: Uuid, sender: Uuid, body: &[u8]) -> Vec<u8> {
    use chacha20poly1305::aead::AeadInPlace;
    use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};

    let (key_id, key) = STORAGE_KEYS.split_once(':').unwrap();
    assert_eq!(key_id, "1");
    let key: [u8; 32] = unb64(key).try_into().expect("a 32-byte storage key");
    let cipher = XChaCha20Poly1305::new(&Key::from(key));
    let nonce: [u8; 24] = rand::random();
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(sender.as_bytes());
    sealed.extend_from_slice(body);
    let mut ad = AD_LABEL.to_vec();
    ad.extend_from_slice(id.as_bytes());
    ad.extend_from_slice(recipient.as_bytes());
    let tag = cipher
        .encrypt_in_place_detached(&XNonce::from(nonce), &ad, &mut sealed[24..])
        .expect("seal");
    sealed.extend_from_slice(&tag);
    sealed
}

/// An access token as the released server minted it: `sub`, `sid`, `iat`,
/// `exp` and no `dev` claim.
fn old_access_token(user: Uuid, session: Uuid) -> String {
    let now = Utc::now().timestamp();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "sub": user, "sid": session, "iat": now, "exp": now + 600 }),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// An argon2id PHC string of the suite's password, as the released server
/// stored it.
fn password_hash() -> String {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::default()
        .hash_password(PASSWORD.as_bytes())
        .expect("argon2 hash")
        .to_string()
}

/// Asserts that `messages` (a listing or a backlog) are exactly `expected`,
/// in order, each from device 1 of its sender.
#[track_caller]
fn assert_delivered(messages: &[Value], expected: &[&OldMessage]) {
    let want: Vec<Uuid> = expected.iter().map(|m| m.id).collect();
    assert_eq!(ids(messages), want, "{messages:?}");
    for (got, sent) in messages.iter().zip(expected) {
        assert_eq!(id(&got["from"]), sent.sender, "{got}");
        assert_eq!(got["from_device"], 1, "{got}");
        assert_eq!(unb64(got["body"].as_str().unwrap()), sent.body, "{got}");
        assert_eq!(time(&got["sent_at"]), id_time(sent.id), "{got}");
    }
}

/// Asserts that the directory lists exactly device 1 of `user`, with its
/// key of before the upgrade.
async fn assert_only_device_one(server: &TestServer, asker: &Account, user: &OldUser) {
    let listed = server
        .get(
            &format!("/v1/users/{}/devices", user.id),
            Some(&asker.access),
        )
        .await
        .expect(200);
    assert_eq!(id(&listed["user_id"]), user.id, "{listed}");
    let devices = listed["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no device list: {listed}"));
    assert_eq!(devices.len(), 1, "{listed}");
    assert_eq!(devices[0]["device_id"], 1, "{listed}");
    assert_eq!(devices[0]["public_key"], b64(&user.key), "{listed}");
    assert_eq!(
        time(&devices[0]["updated_at"]),
        user.key_updated_at,
        "{listed}"
    );
    let key = server
        .get(&format!("/v1/public-key/{}", user.id), Some(&asker.access))
        .await
        .expect(200);
    assert_eq!(key["public_key"], b64(&user.key), "{key}");
    assert_eq!(time(&key["updated_at"]), user.key_updated_at, "{key}");
}

async fn the_migration_keeps_every_queued_message_and_session(backend: Backend) {
    let db = TestDb::new(backend).await;
    let raw = Raw::with_released_schema(&db).await;

    // Two accounts, made a while ago, with keys of both ends of the range.
    let at = |millis: i64| DateTime::from_timestamp_millis(millis).unwrap();
    let alice = OldUser {
        id: Uuid::now_v7(),
        username: "alice",
        key: (0..32).collect(),
        key_updated_at: at(1_790_000_123_456),
        created_at: at(1_790_000_000_001),
    };
    let bob = OldUser {
        id: Uuid::now_v7(),
        username: "bob",
        key: (0..=255).cycle().take(2048).collect(),
        key_updated_at: at(1_790_100_654_321),
        created_at: at(1_790_000_500_002),
    };
    let hash = password_hash();
    raw.insert_user(&alice, &hash).await;
    raw.insert_user(&bob, &hash).await;

    // Bob's live session: a refresh token and an access token of it.
    let refresh: [u8; 32] = rand::random();
    let refresh = URL_SAFE_NO_PAD.encode(refresh);
    let family = Uuid::new_v4();
    raw.insert_refresh_token(&refresh, bob.id, family).await;
    let bob_before = Account {
        id: bob.id,
        username: "bob".into(),
        access: old_access_token(bob.id, family),
        refresh: refresh.clone(),
    };

    // The queue: six messages for bob from alice and three for alice from
    // bob, interleaved, legacy and sealed rows alternating.
    let mut message_ids: Vec<Uuid> = (0..9).map(|_| Uuid::now_v7()).collect();
    message_ids.sort();
    let queue: Vec<OldMessage> = message_ids
        .iter()
        .enumerate()
        .map(|(n, message_id)| {
            let (recipient, sender) = if n % 3 == 2 {
                (alice.id, bob.id)
            } else {
                (bob.id, alice.id)
            };
            OldMessage {
                id: *message_id,
                recipient,
                sender,
                body: format!("queued before devices {n} {}", Uuid::new_v4()).into_bytes(),
                sealed: n % 2 == 1,
            }
        })
        .collect();
    for message in &queue {
        raw.insert_message(message).await;
    }
    let for_bob: Vec<&OldMessage> = queue.iter().filter(|m| m.recipient == bob.id).collect();
    let for_alice: Vec<&OldMessage> = queue.iter().filter(|m| m.recipient == alice.id).collect();
    assert_eq!((for_bob.len(), for_alice.len()), (6, 3));
    assert!(for_bob.iter().any(|m| m.sealed) && for_bob.iter().any(|m| !m.sealed));
    assert!(for_alice.iter().any(|m| m.sealed) && for_alice.iter().any(|m| !m.sealed));
    raw.close().await;

    // The new release starts on it, with the storage key the rows were
    // sealed under.
    let server = TestServer::start_on(db, &["--storage-keys", STORAGE_KEYS]).await;

    // Bob's session of before the upgrade still works, as device 1: the
    // access token, then the refresh token.
    let profile = server
        .get("/v1/me", Some(&bob_before.access))
        .await
        .expect(200);
    assert_eq!(id(&profile["id"]), bob.id, "{profile}");
    assert_eq!(profile["device_id"], 1, "{profile}");
    assert_eq!(profile["public_key"], b64(&bob.key), "{profile}");
    assert_delivered(&server.inbox(&bob_before).await, &for_bob);
    let renewed = server.refresh(&refresh).await.expect(200);
    assert_eq!(renewed["device_id"], 1, "{renewed}");
    let bob_now = session(&bob_before, &renewed);
    assert_eq!(
        server
            .get("/v1/me", Some(&bob_now.access))
            .await
            .expect(200)["device_id"],
        1
    );

    // Every queued message reaches device 1, over REST and as the socket's
    // backlog, in order, from device 1 of its sender, body intact.
    assert_delivered(&server.inbox(&bob_now).await, &for_bob);
    let (ws, ready, backlog) = WsClient::ready_with(&server, &bob_now, "").await;
    assert_eq!(ready["device_id"], 1, "{ready}");
    assert_delivered(&backlog, &for_bob);
    ws.close().await;

    // Alice's password of before logs in, to device 1, and her queue is
    // there too.
    let login = server.login("alice").await;
    assert_eq!(login["device_id"], 1, "{login}");
    let alice_now = session(
        &Account {
            id: alice.id,
            username: "alice".into(),
            access: String::new(),
            refresh: String::new(),
        },
        &login,
    );
    assert_delivered(&server.inbox(&alice_now).await, &for_alice);
    let (ws, ready, backlog) = WsClient::ready_with(&server, &alice_now, "").await;
    assert_eq!(ready["device_id"], 1, "{ready}");
    assert_delivered(&backlog, &for_alice);
    ws.close().await;

    // Each account is exactly device 1, holding its key of before.
    for user in [&alice, &bob] {
        assert_only_device_one(&server, &alice_now, user).await;
    }

    // New devices are numbered on from 2, and start with an empty queue.
    let (device, bob_laptop) = server.add_device(&bob_now, &public_key()).await;
    assert_eq!(device, 2);
    let (device, _) = server.add_device(&alice_now, &public_key()).await;
    assert_eq!(device, 2);
    assert_eq!(server.device_ids(&alice_now, bob.id).await, [1, 2]);
    assert!(server.inbox(&bob_laptop).await.is_empty());
    let after = id(&server.send(&alice_now, bob.id, b"after the upgrade").await["id"]);
    assert_eq!(ids(&server.inbox(&bob_laptop).await), [after]);

    // The migrated copies are device 1's to settle, like any other.
    let migrated: Vec<Uuid> = for_bob.iter().map(|m| m.id).collect();
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob_now.access),
            json!({ "ids": migrated }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], for_bob.len());
    assert_eq!(ids(&server.inbox(&bob_now).await), [after]);
    assert_eq!(ids(&server.inbox(&bob_laptop).await), [after]);

    // Alice's migrated copies, acked on a socket, go too.
    let (mut ws, _) = WsClient::ready(&server, &alice_now).await;
    let alice_ids: Vec<String> = for_alice.iter().map(|m| m.id.to_string()).collect();
    ws.ack(&alice_ids.iter().map(String::as_str).collect::<Vec<_>>())
        .await;
    eventually("alice's migrated copies acked", async || {
        server.inbox(&alice_now).await.is_empty().then_some(())
    })
    .await;
    ws.close().await;
}
