//! The operator commands (`check-config`, `user`, `stats`, `healthcheck`),
//! run as the real binary against databases a real server filled through
//! its API; revocations made outside a server reaching it; secrets read
//! from files.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::backend_tests;
use crate::common::ws::{WsClient, close};
use crate::common::{
    self, Account, Backend, JWT_SECRET, PASSWORD, STORAGE_KEYS, ServerProcess, TestDb, TestServer,
};

backend_tests!(
    user_commands_list_show_disable_enable_and_delete,
    stats_count_accounts_sessions_and_the_queue,
    a_disabled_account_is_cut_off_from_a_running_server,
    a_deleted_account_is_cut_off_from_a_running_server,
    revocations_reach_every_server_of_the_database,
    secrets_and_the_database_url_can_come_from_files,
    operator_commands_neither_create_nor_migrate_a_database,
    no_session_starts_for_a_disabled_account,
    user_show_lists_each_device_and_stats_count_devices,
    adding_a_device_needs_the_password_and_an_enabled_account,
);

/// How often the servers of these tests look for revocations made
/// elsewhere: short, so that the tests are quick.
const POLL: &str = "200ms";

/// How long a revocation made elsewhere may take to close a socket here:
/// the poll interval and then some, for a loaded machine.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(10);

/// Runs `sealpost` with only `env` in its environment.
async fn sealpost(args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run sealpost")
}

/// A `check-config --json` report's errors, each as `"SETTING": "message"`.
fn errors(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "error")
        .map(|c| format!("{}: {}", c["setting"], c["message"]))
        .collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs an operator command on the database at `url` and returns its
/// output, which must be a success.
async fn run_ok(url: &str, args: &[&str]) -> String {
    let output = sealpost(args, &[("DATABASE_URL", url)]).await;
    assert!(
        output.status.success(),
        "sealpost {args:?} failed: {}",
        stderr(&output)
    );
    stdout(&output)
}

/// Runs an operator command with `--json` on the database at `url`.
async fn json_of(url: &str, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = run_ok(url, &args).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Runs an operator command that must fail; returns its stderr.
async fn run_err(url: &str, args: &[&str]) -> String {
    let output = sealpost(args, &[("DATABASE_URL", url)]).await;
    assert!(
        !output.status.success(),
        "sealpost {args:?} succeeded: {}",
        stdout(&output)
    );
    stderr(&output)
}

fn usernames(page: &Value) -> Vec<&str> {
    page["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect()
}

async fn login_reply(api: &common::Api, username: &str, password: &str) -> common::Reply {
    api.post(
        "/v1/login",
        None,
        json!({ "username": username, "password": password }),
    )
    .await
}

async fn user_commands_list_show_disable_enable_and_delete(backend: Backend) {
    let server = TestServer::start(backend).await;
    let url = server.db.url.clone();
    let alice = server.account("alice").await;
    let bob = server.account("Bob").await;
    server.register("carol").await;
    server.send(&alice, bob.id, b"one").await;
    server.send(&alice, bob.id, b"two").await;

    // Pages in username order, ignoring letter case.
    let first = json_of(&url, &["user", "list", "--limit", "2"]).await;
    assert_eq!(usernames(&first), ["alice", "Bob"], "{first}");
    assert_eq!(first["next"], "Bob");
    let bob_row = &first["users"][1];
    assert_eq!(bob_row["id"], bob.id.to_string());
    assert_eq!(bob_row["queued"], 2);
    assert_eq!(bob_row["disabled_at"], Value::Null);
    common::time(&bob_row["created_at"]);
    let rest = json_of(&url, &["user", "list", "--after", "Bob"]).await;
    assert_eq!(usernames(&rest), ["carol"]);
    assert_eq!(rest["next"], Value::Null);
    let text = run_ok(&url, &["user", "list", "--limit", "2"]).await;
    assert!(text.starts_with("USERNAME"), "{text}");
    assert!(
        text.contains(&bob.id.to_string()) && text.contains("active"),
        "{text}"
    );
    assert!(text.contains("--after Bob"), "{text}");

    // One account, by name in any letter case or by id.
    let shown = json_of(&url, &["user", "show", "BOB"]).await;
    assert_eq!(shown["id"], bob.id.to_string(), "{shown}");
    assert_eq!(shown["username"], "Bob");
    assert_eq!(shown["queued"], 2);
    // Sign-up's session and the login's.
    assert_eq!(shown["live_sessions"], 2);
    assert_eq!(shown["public_key_bytes"], 32);
    assert_eq!(shown["disabled_at"], Value::Null);
    common::time(&shown["oldest_queued_at"]);
    let by_id = json_of(&url, &["user", "show", &bob.id.to_string()]).await;
    assert_eq!(by_id["username"], "Bob");
    let text = run_ok(&url, &["user", "show", "bob"]).await;
    assert!(text.contains("status         active"), "{text}");
    let err = run_err(&url, &["user", "show", "nobody"]).await;
    assert!(err.contains("nobody"), "{err}");

    // Disabled: every session revoked, logins refused with 403.
    let disabled = json_of(&url, &["user", "disable", "bob"]).await;
    assert_eq!(disabled["disabled"], true, "{disabled}");
    assert_eq!(disabled["unchanged"], false);
    assert_eq!(disabled["sessions_revoked"], 2);
    let shown = json_of(&url, &["user", "show", "bob"]).await;
    common::time(&shown["disabled_at"]);
    assert_eq!(shown["live_sessions"], 0);
    login_reply(&server.api, "Bob", PASSWORD)
        .await
        .expect_error(403, "forbidden");
    // A wrong password does not learn that the account is disabled.
    login_reply(&server.api, "Bob", "not the password at all")
        .await
        .expect_error(401, "unauthorized");
    server
        .refresh(&bob.refresh)
        .await
        .expect_error(401, "unauthorized");
    // Others may still write to a disabled account: it keeps its queue.
    server.send(&alice, bob.id, b"three").await;
    let again = json_of(&url, &["user", "disable", "bob"]).await;
    assert_eq!(again["unchanged"], true);
    assert_eq!(again["sessions_revoked"], 0);
    assert_eq!(again["disabled_at"], shown["disabled_at"]);
    let text = run_ok(&url, &["user", "list"]).await;
    assert!(text.contains("disabled"), "{text}");

    // Enabled again: it logs in and finds its messages.
    let enabled = json_of(&url, &["user", "enable", "bob"]).await;
    assert_eq!(enabled["disabled"], false, "{enabled}");
    assert_eq!(enabled["unchanged"], false);
    let tokens = server.login("Bob").await;
    let bob = Account {
        access: tokens["access_token"].as_str().unwrap().to_owned(),
        refresh: tokens["refresh_token"].as_str().unwrap().to_owned(),
        ..bob
    };
    assert_eq!(server.inbox(&bob).await.len(), 3);

    // Deleting needs --yes; without it nothing happens.
    let err = run_err(&url, &["user", "delete", "bob"]).await;
    assert!(err.contains("--yes") && err.contains("3 queued"), "{err}");
    json_of(&url, &["user", "show", "bob"]).await;
    let deleted = json_of(&url, &["user", "delete", "bob", "--yes"]).await;
    assert_eq!(deleted["id"], bob.id.to_string(), "{deleted}");
    assert_eq!(deleted["queued_deleted"], 3);
    assert_eq!(deleted["sessions_revoked"], 1);
    run_err(&url, &["user", "show", "bob"]).await;
    login_reply(&server.api, "Bob", PASSWORD)
        .await
        .expect_error(401, "unauthorized");
    let left = json_of(&url, &["user", "list"]).await;
    assert_eq!(usernames(&left), ["alice", "carol"]);
    server.stop().await;
}

async fn stats_count_accounts_sessions_and_the_queue(backend: Backend) {
    let server = TestServer::start(backend).await;
    let url = server.db.url.clone();
    let empty = json_of(&url, &["stats"]).await;
    assert_eq!(empty["users"], 0, "{empty}");
    assert_eq!(empty["queued"], 0);
    assert_eq!(empty["oldest_queued_at"], Value::Null);

    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server.register("carol").await;
    for body in [b"1", b"2", b"3"] {
        server.send(&alice, bob.id, body).await;
    }
    server.send(&bob, alice.id, b"4").await;
    server
        .post("/v1/logout", Some(&alice.access), json!({}))
        .await;
    run_ok(&url, &["user", "disable", "carol"]).await;

    let stats = json_of(&url, &["stats"]).await;
    assert_eq!(stats["users"], 3, "{stats}");
    assert_eq!(stats["disabled_users"], 1);
    // Each sign-up opens a session: alice's is left (her login's was logged
    // out), bob's two (sign-up's and login's); carol's was revoked with the
    // disable, as alice's login's was by the logout.
    assert_eq!(stats["live_sessions"], 3);
    assert_eq!(stats["revocations"], 2);
    assert_eq!(stats["queued"], 4);
    assert_eq!(stats["recipients"], 2);
    common::time(&stats["oldest_queued_at"]);
    assert!(stats["oldest_queued_age_seconds"].as_u64().unwrap() < 600);
    // Sealed under the one storage key, id 1 (configured with PostgreSQL,
    // generated with SQLite).
    assert_eq!(
        stats["queued_by_key"],
        json!([{ "key_id": 1, "messages": 4 }])
    );
    let text = run_ok(&url, &["stats"]).await;
    assert!(text.contains("4 for 2 recipient(s)"), "{text}");
    assert!(text.contains("key 1: 4"), "{text}");
    server.stop().await;
}

/// A running server learnt of a revocation made elsewhere within the
/// deadline: it closed the session's socket with 4401 and refuses its token.
async fn cut_off(server: &TestServer, socket: &mut WsClient, access: &str, started: Instant) {
    socket.expect_close(close::REVOKED).await;
    assert!(
        started.elapsed() < REVOCATION_DEADLINE,
        "closed after {:?}",
        started.elapsed()
    );
    server
        .get("/v1/me", Some(access))
        .await
        .expect_error(401, "unauthorized");
}

/// `sealpost user disable` writes to the database only; the running server
/// learns of it at its next revocation poll.
async fn a_disabled_account_is_cut_off_from_a_running_server(backend: Backend) {
    let server = TestServer::start_with(backend, &["--revocation-poll-interval", POLL]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut socket, _) = WsClient::ready(&server.api, &alice).await;
    server.get("/v1/me", Some(&alice.access)).await.expect(200);

    let started = Instant::now();
    run_ok(&server.db.url, &["user", "disable", "alice"]).await;
    cut_off(&server, &mut socket, &alice.access, started).await;
    WsClient::connect(&server.api, Some(&alice.access))
        .await
        .expect_close(close::REFUSED)
        .await;
    server
        .refresh(&alice.refresh)
        .await
        .expect_error(401, "unauthorized");
    login_reply(&server.api, "alice", PASSWORD)
        .await
        .expect_error(403, "forbidden");
    // Nobody else is touched.
    server.get("/v1/me", Some(&bob.access)).await.expect(200);
    server.stop().await;
}

async fn a_deleted_account_is_cut_off_from_a_running_server(backend: Backend) {
    let server = TestServer::start_with(backend, &["--revocation-poll-interval", POLL]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut socket, _) = WsClient::ready(&server.api, &alice).await;

    let started = Instant::now();
    run_ok(&server.db.url, &["user", "delete", "alice", "--yes"]).await;
    cut_off(&server, &mut socket, &alice.access, started).await;
    login_reply(&server.api, "alice", PASSWORD)
        .await
        .expect_error(401, "unauthorized");
    server
        .post(
            "/v1/messages",
            Some(&bob.access),
            json!({ "to": alice.id, "body": common::b64(b"hello?") }),
        )
        .await
        .expect_error(404, "not_found");
    server.stop().await;
}

/// Two servers on one database: a logout on one closes the session's socket
/// on the other and makes it refuse the session's token.
async fn revocations_reach_every_server_of_the_database(backend: Backend) {
    let first = TestServer::start_with(backend, &["--revocation-poll-interval", POLL]).await;
    let second =
        TestServer::start_on(first.db.shared(), &["--revocation-poll-interval", POLL]).await;
    let alice = first.account("alice").await;
    let other = {
        let tokens = first.login("alice").await;
        tokens["access_token"].as_str().unwrap().to_owned()
    };
    let (mut socket, _) = WsClient::ready(&second.api, &alice).await;
    second.get("/v1/me", Some(&alice.access)).await.expect(200);

    let started = Instant::now();
    first
        .post("/v1/logout", Some(&alice.access), json!({}))
        .await
        .expect(204);
    cut_off(&second, &mut socket, &alice.access, started).await;
    // Her other session lives on, on both.
    second.get("/v1/me", Some(&other)).await.expect(200);
    first.get("/v1/me", Some(&other)).await.expect(200);
    second.stop().await;
    first.stop().await;
}

/// `*_FILE` settings: read, trailing line breaks dropped, the same secrets
/// as set directly.
async fn secrets_and_the_database_url_can_come_from_files(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, content: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let url_file = file("database-url", format!("{}\n", db.url));
    let jwt_file = file("jwt-secret", format!("{JWT_SECRET}\n"));
    let keys_file = file("storage-keys", format!("{STORAGE_KEYS}\r\n"));
    let server = ServerProcess::spawn_with(
        &db.url,
        &[
            ("DATABASE_URL_FILE", &url_file),
            ("SEALPOST_JWT_SECRET_FILE", &jwt_file),
            ("SEALPOST_STORAGE_KEYS_FILE", &keys_file),
        ],
        &[
            "DATABASE_URL",
            "SEALPOST_JWT_SECRET",
            "SEALPOST_STORAGE_KEYS",
        ],
    );
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server
        .send(&alice, bob.id, b"sealed with a key from a file")
        .await;
    server.kill9();

    // The same values set directly: the tokens still verify and the
    // message still opens.
    let server = ServerProcess::spawn(&db.url, &[("SEALPOST_STORAGE_KEYS", STORAGE_KEYS)]);
    let inbox = server.inbox(&bob).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(
        common::unb64(inbox[0]["body"].as_str().unwrap()),
        b"sealed with a key from a file"
    );
    // And an operator command finds the database through the file.
    let output = sealpost(
        &["user", "list", "--json"],
        &[("DATABASE_URL_FILE", &url_file)],
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("\"alice\""));
}

async fn operator_commands_neither_create_nor_migrate_a_database(backend: Backend) {
    let db = TestDb::new(backend).await;
    if backend == Backend::Sqlite {
        // A mistyped path is an error, not a new empty database.
        let path = db.url.trim_start_matches("sqlite://").to_owned();
        let err = run_err(&db.url, &["user", "list"]).await;
        assert!(err.contains("no database") && err.contains(&path), "{err}");
        assert!(!Path::new(&path).exists());
        // An empty file is a database without the schema.
        std::fs::write(&path, b"").unwrap();
    }
    let err = run_err(&db.url, &["stats"]).await;
    assert!(err.contains("sealpost migrate"), "{err}");
    run_ok(&db.url, &["migrate"]).await;
    let page = json_of(&db.url, &["user", "list"]).await;
    assert_eq!(page, json!({ "users": [], "next": null }));
    assert_eq!(run_ok(&db.url, &["user", "list"]).await, "no users\n");
}

/// A login that checked the password just before the account was disabled
/// must not get a session in: the store refuses its refresh token.
async fn no_session_starts_for_a_disabled_account(backend: Backend) {
    use sealpost::store::{self, RefreshToken, SessionStart, StoreOptions};

    let server = TestServer::start(backend).await;
    let alice = server.register("alice").await;
    let store = store::connect(&StoreOptions {
        url: server.db.url.clone(),
        pool_size: 2,
    })
    .await
    .unwrap();
    let token = |n: u8| RefreshToken {
        hash: [n; 32],
        user_id: alice,
        device: 1,
        family_id: uuid::Uuid::new_v4(),
        expires_at: store::add(store::now(), Duration::from_secs(60)),
    };
    let insert = |n: u8| {
        let store = store.clone();
        async move { store.insert_refresh_token(&token(n), 0).await.unwrap() }
    };
    assert_eq!(insert(1).await, SessionStart::Started);
    let revoked = store.disable_user(alice, store::now()).await.unwrap();
    // The sign-up's session and this one.
    assert_eq!(revoked.map(|r| r.len()), Some(2));
    assert_eq!(insert(2).await, SessionStart::Disabled);
    assert!(store.enable_user(alice).await.unwrap());
    assert_eq!(insert(3).await, SessionStart::Started);
    // Nor for an account that is gone.
    store.delete_user(alice, store::now()).await.unwrap();
    assert_eq!(insert(4).await, SessionStart::NoAccount);
    server.stop().await;
}

/// The `device_id`s of a `user show` reply's `devices`, in order.
#[track_caller]
fn shown_devices(shown: &Value) -> Vec<i64> {
    shown["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {shown}"))
        .iter()
        .map(|d| common::device_id(&d["device_id"]))
        .collect()
}

/// `(public_key_bytes, queued)` of each device a `user show` reply lists.
#[track_caller]
fn device_counts(shown: &Value) -> Vec<(u64, u64)> {
    shown["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {shown}"))
        .iter()
        .map(|d| {
            (
                d["public_key_bytes"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{d}")),
                d["queued"].as_u64().unwrap_or_else(|| panic!("{d}")),
            )
        })
        .collect()
}

async fn user_show_lists_each_device_and_stats_count_devices(backend: Backend) {
    let server = TestServer::start(backend).await;
    let url = server.db.url.clone();
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    // Keys of different sizes tell the devices apart: 32 bytes for the
    // phone, 48 for the laptop.
    let (_, laptop) = server.add_device(&bob, &common::b64(&[7u8; 48])).await;
    let shown = json_of(&url, &["user", "show", "bob"]).await;
    assert_eq!(shown_devices(&shown), [1, 2], "{shown}");
    assert_eq!(device_counts(&shown), [(32, 0), (48, 0)], "{shown}");
    for device in shown["devices"].as_array().unwrap() {
        common::time(&device["key_updated_at"]);
        common::time(&device["created_at"]);
        common::time(&device["last_seen_at"]);
        // Names are the account's own.
        assert!(device.get("name").is_none(), "{device}");
    }

    // A message to the account is one copy for each device's queue.
    let first = server.send(&alice, bob.id, b"one").await;
    server.send(&alice, bob.id, b"two").await;
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&laptop.access),
            json!({ "ids": [first["id"]] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 1);
    let shown = json_of(&url, &["user", "show", "bob"]).await;
    assert_eq!(device_counts(&shown), [(32, 2), (48, 1)], "{shown}");
    assert_eq!(shown["queued"], 3, "copies, all devices together: {shown}");
    // The top-level key is the lowest-numbered device's, as before devices.
    assert_eq!(shown["public_key_bytes"], 32, "{shown}");
    assert_eq!(
        shown["key_updated_at"], shown["devices"][0]["key_updated_at"],
        "{shown}"
    );
    let text = run_ok(&url, &["user", "show", "bob"]).await;
    assert!(text.contains("key 48 bytes"), "{text}");
    assert!(text.contains("devices        2"), "{text}");
    // A single-device account lists its one device.
    let hers = json_of(&url, &["user", "show", "alice"]).await;
    assert_eq!(shown_devices(&hers), [1], "{hers}");
    assert_eq!(device_counts(&hers), [(32, 0)], "{hers}");

    let stats = json_of(&url, &["stats"]).await;
    assert_eq!(stats["users"], 2, "{stats}");
    assert_eq!(stats["devices"], 3, "{stats}");
    assert_eq!(stats["queued"], 3, "{stats}");
    assert_eq!(stats["recipients"], 1, "{stats}");
    let text = run_ok(&url, &["stats"]).await;
    assert!(text.contains("devices           3"), "{text}");

    // Without device 1, the top level describes device 2.
    let removed = server
        .delete(
            "/v1/devices/1",
            Some(&laptop.access),
            json!({ "password": PASSWORD }),
        )
        .await;
    assert_eq!(removed.status.as_u16(), 204, "{:?}", removed.body);
    let shown = json_of(&url, &["user", "show", "bob"]).await;
    assert_eq!(shown_devices(&shown), [2], "{shown}");
    assert_eq!(device_counts(&shown), [(48, 1)], "{shown}");
    assert_eq!(shown["public_key_bytes"], 48, "{shown}");
    assert_eq!(shown["queued"], 1, "{shown}");
    let stats = json_of(&url, &["stats"]).await;
    assert_eq!(stats["devices"], 2, "{stats}");
    assert_eq!(stats["queued"], 1, "{stats}");
    server.stop().await;
}

async fn adding_a_device_needs_the_password_and_an_enabled_account(backend: Backend) {
    let server = TestServer::start(backend).await;
    let url = server.db.url.clone();
    let alice = server.account("alice").await;
    server.account("bob").await;
    let bad_login = login_reply(&server.api, "bob", "not the password")
        .await
        .expect(401);

    // A wrong password is refused as a bad login is, body and all, and so
    // is an unknown account.
    for (username, password) in [("bob", "not the password"), ("nobody", PASSWORD)] {
        let refused = server
            .try_add_device(username, password, &common::public_key(), None)
            .await;
        refused.expect_error(401, "unauthorized");
        assert_eq!(refused.body, bad_login, "{username}");
    }

    // Disabled: the right password learns it (403), a wrong one does not.
    run_ok(&url, &["user", "disable", "bob"]).await;
    server
        .try_add_device("bob", PASSWORD, &common::public_key(), None)
        .await
        .expect_error(403, "forbidden");
    let refused = server
        .try_add_device("bob", "not the password", &common::public_key(), None)
        .await;
    refused.expect_error(401, "unauthorized");
    assert_eq!(refused.body, bad_login);
    let shown = json_of(&url, &["user", "show", "bob"]).await;
    assert_eq!(shown_devices(&shown), [1], "a device was added: {shown}");
    assert_eq!(shown["live_sessions"], 0, "{shown}");

    // Enabled again, the device is added.
    run_ok(&url, &["user", "enable", "bob"]).await;
    let added = server
        .try_add_device("bob", PASSWORD, &common::public_key(), None)
        .await
        .expect(201);
    assert_eq!(added["device_id"], 2, "{added}");
    let shown = json_of(&url, &["user", "show", "bob"]).await;
    assert_eq!(shown_devices(&shown), [1, 2], "{shown}");
    let me = server
        .get("/v1/me", added["access_token"].as_str())
        .await
        .expect(200);
    assert_eq!(me["device_id"], 2, "{me}");
    server.get("/v1/me", Some(&alice.access)).await.expect(200);
    server.stop().await;
}

#[tokio::test]
async fn check_config_prints_every_setting_with_secrets_masked() {
    let db_password = "pg-password-must-not-show";
    let url = format!("postgres://sealpost:{db_password}@127.0.0.1:1/sealpost");
    let keys = "1:c2VhbHBvc3QtdGVzdC1zdG9yYWdlLWtleS0wMTIzNDU=,7:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("SEALPOST_JWT_SECRET", JWT_SECRET),
        ("SEALPOST_STORAGE_KEYS", keys),
        ("SEALPOST_MESSAGE_TTL", "3d"),
    ];
    let output = sealpost(&["check-config"], &env).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for secret in [db_password, JWT_SECRET, "c2VhbHBvc3Qt", "AAECAwQF"] {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
        assert!(!stderr(&output).contains(secret), "{secret} logged");
    }
    assert!(
        text.contains("postgres://sealpost:***@127.0.0.1:1/sealpost"),
        "{text}"
    );
    assert!(text.contains("key ids 1,7"), "{text}");
    assert!(text.contains("SEALPOST_MESSAGE_TTL"), "{text}");

    // Every setting `serve --help` knows is listed, with its source.
    let output = sealpost(&["check-config", "--json"], &env).await;
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let help = stdout(&sealpost(&["serve", "--help"], &[]).await);
    let listed: Vec<&str> = report["settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["env"].as_str().unwrap())
        .collect();
    let in_help: Vec<&str> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap())
        .collect();
    common::assert_each(&in_help, "listed by check-config", |var| {
        listed.contains(var)
    });
    let setting = |env: &str| {
        report["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["env"] == env)
            .unwrap()
            .clone()
    };
    assert_eq!(setting("SEALPOST_MESSAGE_TTL")["value"], "3d");
    assert_eq!(setting("SEALPOST_MESSAGE_TTL")["source"], "environment");
    assert_eq!(setting("SEALPOST_ADDR")["source"], "default");
    assert_eq!(setting("SEALPOST_JWT_SECRET")["value"], "***");
    assert_eq!(setting("SEALPOST_TLS_CERT")["value"], Value::Null);
}

/// The push settings: the VAPID key masked, the key file paths shown,
/// which services are on, and what would stop start-up.
#[tokio::test]
async fn check_config_shows_the_push_settings() {
    let (vapid_key, _) = crate::push_targets::p256_pem();
    let vapid_key = vapid_key.as_str();
    // The key's body, which must not show.
    let secret_line = vapid_key.lines().nth(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p8 = dir.path().join("AuthKey_ABCDE12345.p8");
    std::fs::write(&p8, crate::push_targets::p256_pem().0).unwrap();
    let p8 = p8.display().to_string();
    let keys = "1:c2VhbHBvc3QtdGVzdC1zdG9yYWdlLWtleS0wMTIzNDU=";
    let base = [
        ("DATABASE_URL", "postgres://sealpost@127.0.0.1:1/sealpost"),
        ("SEALPOST_JWT_SECRET", JWT_SECRET),
        ("SEALPOST_STORAGE_KEYS", keys),
        ("SEALPOST_VAPID_SUBJECT", "mailto:ops@example.com"),
        ("SEALPOST_APNS_KEY_FILE", p8.as_str()),
        ("SEALPOST_APNS_KEY_ID", "ABCDE12345"),
        ("SEALPOST_APNS_TEAM_ID", "TEAM123456"),
        ("SEALPOST_PUSH_ALLOW_HOSTS", "127.0.0.1:9000"),
    ];
    let mut env = base.to_vec();
    env.push(("SEALPOST_VAPID_KEY", vapid_key));
    let output = sealpost(&["check-config", "--json"], &env).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(!text.contains(secret_line), "{text}");
    assert!(!stderr(&output).contains(secret_line));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let setting = |env: &str| {
        report["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["env"] == env)
            .unwrap_or_else(|| panic!("{env} not listed: {report}"))
            .clone()
    };
    assert_eq!(setting("SEALPOST_VAPID_KEY")["value"], "***");
    assert_eq!(setting("SEALPOST_APNS_KEY_FILE")["value"], p8.as_str());
    assert_eq!(setting("SEALPOST_WAKEUP_COOLDOWN")["value"], "30s");
    assert_eq!(setting("SEALPOST_WAKEUP_COOLDOWN")["source"], "default");
    let check = |setting: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["setting"] == setting)
            .unwrap_or_else(|| panic!("no check of {setting}: {report}"))
            .clone()
    };
    assert_eq!(check("SEALPOST_VAPID_SUBJECT")["level"], "ok");
    let apns = "SEALPOST_APNS_KEY_FILE, SEALPOST_APNS_KEY_ID, SEALPOST_APNS_TEAM_ID";
    assert_eq!(check(apns)["level"], "ok", "{report}");
    assert_eq!(check("SEALPOST_FCM_CREDENTIALS_FILE")["level"], "note");
    assert_eq!(check("SEALPOST_PUSH_ALLOW_HOSTS")["level"], "warning");

    // Keys that would stop start-up are found here, not at start-up: a
    // `.p8` that is no key, a VAPID key that is no key, a service-account
    // file that is not one. Each named, none quoted.
    let bad_p8 = dir.path().join("AuthKey_BAD.p8");
    std::fs::write(&bad_p8, "not-a-key-must-not-show").unwrap();
    let bad_p8 = bad_p8.display().to_string();
    let fcm = dir.path().join("service-account.json");
    std::fs::write(&fcm, r#"{"type": "authorized_user"}"#).unwrap();
    let fcm = fcm.display().to_string();
    let mut env = base.to_vec();
    env[4] = ("SEALPOST_APNS_KEY_FILE", bad_p8.as_str());
    env.push((
        "SEALPOST_VAPID_KEY",
        "-----BEGIN PRIVATE KEY-----\nbad\n-----END PRIVATE KEY-----",
    ));
    env.push(("SEALPOST_FCM_CREDENTIALS_FILE", fcm.as_str()));
    let output = sealpost(&["check-config", "--json"], &env).await;
    assert!(!output.status.success());
    assert!(!stdout(&output).contains("not-a-key-must-not-show"));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let errors = errors(&report);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("\"SEALPOST_VAPID_KEY\""),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with(&format!("\"{apns}\"")) && errors[1].contains(&bad_p8),
        "{errors:?}"
    );
    assert!(
        errors[2].contains("SEALPOST_FCM_CREDENTIALS_FILE")
            && errors[2].contains("service_account"),
        "{errors:?}"
    );

    // Web Push on PostgreSQL without a key, and a subject that is no URI:
    // start-up would fail.
    let output = sealpost(&["check-config", "--json"], &base).await;
    assert!(!output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let errors: Vec<&Value> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["level"] == "error")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["setting"], "SEALPOST_VAPID_KEY", "{errors:?}");
    let mut env = base.to_vec();
    env[3] = ("SEALPOST_VAPID_SUBJECT", "ops@example.com");
    let output = sealpost(&["check-config"], &env).await;
    assert!(!output.status.success());
    assert!(
        stdout(&output).contains("SEALPOST_VAPID_SUBJECT: must be a `mailto:` or `https:` URI"),
        "{}",
        stdout(&output)
    );
}

#[tokio::test]
async fn check_config_reports_what_would_stop_start_up() {
    // A value that does not parse: the error names the setting as it was
    // given, here the variable (cli.rs has every way of giving one).
    let output = sealpost(&["check-config"], &[("SEALPOST_MESSAGE_TTL", "forever")]).await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("SEALPOST_MESSAGE_TTL"),
        "{}",
        stderr(&output)
    );

    // Settings that parse but do not go together.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem").display().to_string();
    let output = sealpost(
        &["check-config", "--json"],
        &[
            ("DATABASE_URL", "postgres://sealpost@127.0.0.1:1/sealpost"),
            ("SEALPOST_TLS_CERT", &missing),
            ("SEALPOST_TLS_KEY", &missing),
        ],
    )
    .await;
    assert!(!output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let errors = errors(&report);
    assert_eq!(errors.len(), 3, "{errors:?}");
    for named in [
        "SEALPOST_JWT_SECRET",
        "SEALPOST_STORAGE_KEYS",
        "SEALPOST_TLS_CERT",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(named)),
            "{named}: {errors:?}"
        );
    }
    assert!(stderr(&output).contains("start-up would fail"));

    let output = sealpost(&["check-config"], &[("DATABASE_URL", "mysql://db/x")]).await;
    assert!(!output.status.success());
    assert!(stdout(&output).contains("DATABASE_URL: unsupported scheme"));
}

/// With SQLite and nothing configured, start-up would create the database
/// and generate secrets beside it; check-config says so and does neither.
#[tokio::test]
async fn check_config_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sealpost.db").display());
    let output = sealpost(&["check-config"], &[("DATABASE_URL", &url)]).await;
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("does not exist yet"), "{text}");
    assert!(text.contains("sealpost.db.jwt-secret"), "{text}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn bad_secret_files_stop_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let file = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    };
    let missing = dir.path().join("missing").display().to_string();
    let short = file("short", "hunter2-too-short\n");
    let bad_keys = file("keys", "1:c2VjcmV0LWtleS1ieXRlcw==\n");
    let empty = file("empty", "\n");
    for (var, path, named, hidden) in [
        (
            "SEALPOST_JWT_SECRET_FILE",
            &missing,
            "--jwt-secret-file",
            None,
        ),
        (
            "SEALPOST_JWT_SECRET_FILE",
            &short,
            "--jwt-secret-file",
            Some("hunter2"),
        ),
        (
            "SEALPOST_JWT_SECRET_FILE",
            &empty,
            "--jwt-secret-file",
            None,
        ),
        (
            "SEALPOST_STORAGE_KEYS_FILE",
            &bad_keys,
            "--storage-keys-file",
            Some("c2VjcmV0"),
        ),
        ("DATABASE_URL_FILE", &missing, "--database-url-file", None),
    ] {
        let output = sealpost(&["serve"], &[("DATABASE_URL", &url), (var, path)]).await;
        let err = stderr(&output);
        assert!(!output.status.success(), "{var}={path} was accepted");
        // Set in the environment, named as set there.
        assert!(err.contains(var) && !err.contains(named), "{var}: {err}");
        assert!(
            err.contains(path.as_str()),
            "{var}: the file is not named: {err}"
        );
        if let Some(hidden) = hidden {
            assert!(!err.contains(hidden), "{var}: the content is shown: {err}");
        }
    }
    // A file conflicts with the direct setting.
    let secret = file("secret", JWT_SECRET);
    let output = sealpost(
        &["serve"],
        &[
            ("DATABASE_URL", &url),
            ("SEALPOST_JWT_SECRET", JWT_SECRET),
            ("SEALPOST_JWT_SECRET_FILE", &secret),
        ],
    )
    .await;
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("'SEALPOST_JWT_SECRET_FILE'") && err.contains("'SEALPOST_JWT_SECRET'"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        4,
        "start-up went ahead and created files"
    );
}

#[tokio::test]
async fn healthcheck_probes_the_server() {
    let db = TestDb::new(Backend::Sqlite).await;
    // Listening on every address: probed on loopback.
    let server = ServerProcess::spawn(&db.url, &[("SEALPOST_ADDR", "0.0.0.0:0")]);
    let addr = server.api.base.trim_start_matches("http://").to_owned();
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    for probe in [&["healthcheck"][..], &["healthcheck", "--ready"]] {
        let output = sealpost(probe, &[("SEALPOST_ADDR", &addr)]).await;
        assert!(output.status.success(), "{probe:?}: {}", stderr(&output));
        assert!(stdout(&output).contains(": 200"), "{}", stdout(&output));
    }
    server.kill9();
    let started = Instant::now();
    let output = sealpost(
        &["healthcheck", "--timeout", "3s"],
        &[("SEALPOST_ADDR", &addr)],
    )
    .await;
    assert!(!output.status.success());
    assert!(stderr(&output).contains("/healthz"), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_speaks_tls_to_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pair = |name: &str| {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("generate a certificate");
        let cert = dir.path().join(format!("{name}.pem"));
        let key = dir.path().join(format!("{name}.key"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    };
    let (cert, key) = pair("server");
    let (other_cert, other_key) = pair("other");
    let server =
        TestServer::start_with(Backend::Sqlite, &["--tls-cert", &cert, "--tls-key", &key]).await;
    let addr = server.addr.to_string();
    let probe = |cert: &str, key: &str| {
        let env = [
            ("SEALPOST_ADDR", addr.clone()),
            ("SEALPOST_TLS_CERT", cert.to_owned()),
            ("SEALPOST_TLS_KEY", key.to_owned()),
        ];
        async move {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            sealpost(&["healthcheck"], &env).await
        }
    };
    let output = probe(&cert, &key).await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stdout(&output).contains("https://"), "{}", stdout(&output));
    // Another certificate is not the server's.
    let output = probe(&other_cert, &other_key).await;
    assert!(!output.status.success());
    // Plain HTTP to a TLS port gets no status line.
    let output = sealpost(&["healthcheck"], &[("SEALPOST_ADDR", &addr)]).await;
    assert!(!output.status.success());
    server.stop().await;
}
