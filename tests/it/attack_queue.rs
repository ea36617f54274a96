//! Issue 24, items 6, 7, 8 and 12: idempotency keys that do not tell who
//! wrote to whom, a sender's share of a device's queue, storage charged per
//! stored copy, and ephemeral sends as a presence oracle.

use serde_json::{Value, json};
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{
    Account, Backend, PASSWORD, Reply, TestDb, TestServer, b64, id, ids, public_key,
};

backend_tests!(
    send_keys_do_not_tell_who_wrote_to_whom,
    many_accounts_cannot_fill_a_queue_for_everyone,
    a_send_is_charged_per_stored_copy,
    an_account_s_queued_bytes_are_capped,
    ephemeral_sends_to_one_recipient_are_rate_limited,
);

/// The default per-(sender, recipient) limit, which the harness turns off:
/// the tests of it set it back.
/// The pair limit at its defaults, with the send budget it is a share of
/// (the harness turns that budget off, which turns the pair limit off too).
const PAIR_DEFAULTS: [&str; 8] = [
    "--send-rate-per-second",
    "50",
    "--send-rate-burst",
    "200",
    "--pair-rate-per-second",
    "2",
    "--pair-rate-burst",
    "50",
];

async fn try_send(server: &TestServer, from: &Account, to: Uuid, body: &[u8]) -> Reply {
    server
        .post(
            "/v1/messages",
            Some(&from.access),
            json!({ "to": to, "body": b64(body) }),
        )
        .await
}

async fn keyed_send(server: &TestServer, from: &Account, to: Uuid, key: &str) -> Uuid {
    let sent = server
        .post(
            "/v1/messages",
            Some(&from.access),
            json!({ "to": to, "body": b64(key.as_bytes()), "client_id": key }),
        )
        .await
        .expect(201);
    id(&sent["id"])
}

/// Every row of `send_keys`, read straight from the database: on
/// PostgreSQL each row as JSON (a `bytea` as its hex), on SQLite each
/// column's bytes in hex; lower case.
async fn send_key_rows(db: &TestDb) -> Vec<String> {
    if db.is_postgres() {
        let pool = PgPool::connect(&db.url).await.expect("raw PostgreSQL");
        let rows: Vec<String> = sqlx::query_scalar("SELECT row_to_json(k)::text FROM send_keys k")
            .fetch_all(&pool)
            .await
            .expect("read send_keys");
        pool.close().await;
        rows.into_iter().map(|r| r.to_lowercase()).collect()
    } else {
        let pool = SqlitePool::connect(&db.url).await.expect("raw SQLite");
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info('send_keys')")
                .fetch_all(&pool)
                .await
                .expect("send_keys columns");
        assert!(!columns.is_empty(), "no send_keys table");
        let select = columns
            .iter()
            .map(|c| format!("hex(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || '|' || ");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {select} FROM send_keys"
        )))
        .fetch_all(&pool)
        .await
        .expect("read send_keys");
        pool.close().await;
        rows.into_iter().map(|r| r.to_lowercase()).collect()
    }
}

/// The ways a column could hold `id`: its bytes (as hex), its text in
/// either notation, or that text's bytes (as hex).
fn spellings(id: Uuid) -> Vec<String> {
    let hex = |s: String| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    vec![
        id.simple().to_string(),
        id.hyphenated().to_string(),
        hex(id.hyphenated().to_string()),
        hex(id.simple().to_string()),
    ]
}

#[track_caller]
fn assert_absent(rows: &[String], what: &str, id: Uuid) {
    for row in rows {
        for spelling in spellings(id) {
            assert!(
                !row.contains(&spelling),
                "send_keys holds the {what} ({id}) in the clear: {row}"
            );
        }
    }
}

/// Item 6: a dump of the database could join `send_keys` (sender, message
/// id) with `messages` (recipient) and tell who wrote to whom.
async fn send_keys_do_not_tell_who_wrote_to_whom(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let first = keyed_send(&server, &alice, bob.id, "k1").await;
    let second = keyed_send(&server, &alice, bob.id, "k2").await;
    let from_bob = keyed_send(&server, &bob, alice.id, "k1").await;

    let rows = send_key_rows(&server.db).await;
    assert_eq!(rows.len(), 3, "one key a send: {rows:?}");
    for (what, id) in [
        ("sender", alice.id),
        ("sender", bob.id),
        ("recipient", bob.id),
        ("message id", first),
        ("message id", second),
        ("message id", from_bob),
    ] {
        assert_absent(&rows, what, id);
    }

    // Retries are still answered with the first send's id, and store
    // nothing more.
    assert_eq!(keyed_send(&server, &alice, bob.id, "k1").await, first);
    assert_eq!(keyed_send(&server, &alice, bob.id, "k2").await, second);
    let inbox = server.inbox(&bob).await;
    assert_eq!(ids(&inbox), [first, second]);
    // A key reused for another send is still refused.
    server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": bob.id, "body": b64(b"other"), "client_id": "k1" }),
        )
        .await
        .expect_error(409, "conflict");

    // Deleting alice deletes her keys, and only hers.
    server
        .delete(
            "/v1/me",
            Some(&alice.access),
            json!({ "password": PASSWORD }),
        )
        .await
        .expect(204);
    let left = send_key_rows(&server.db).await;
    assert_eq!(left.len(), 1, "only bob's key is left: {left:?}");
    assert_eq!(keyed_send(&server, &bob, alice.id, "k1").await, from_bob);
}

/// Item 7: ten free accounts filled an offline device's queue, and from
/// then on every sender to the account got `queue_full`. Here a queue of
/// 30 with shares of 10: five attackers send as fast as they may; the
/// first three fill the queue, the other two get one copy each of the
/// headroom (a tenth: 3), and a person who holds nothing there still gets
/// through.
async fn many_accounts_cannot_fill_a_queue_for_everyone(backend: Backend) {
    let mut flags = vec![
        "--max-queued-per-device",
        "30",
        "--max-queued-per-sender",
        "10",
    ];
    flags.extend(PAIR_DEFAULTS);
    let server = TestServer::start_with(backend, &flags).await;
    let victim = server.account("victim").await;
    let friend = server.account("friend").await;
    let mut accepted = 0;
    let mut refused = Vec::new();
    for n in 0..5 {
        let attacker = server.account(&format!("attacker{n}")).await;
        for m in 0..15 {
            let reply =
                try_send(&server, &attacker, victim.id, format!("{n}/{m}").as_bytes()).await;
            match reply.status.as_u16() {
                201 => accepted += 1,
                _ => refused.push(reply.code().to_owned()),
            }
        }
    }
    assert_eq!(accepted, 32, "three shares and two headroom copies");
    assert_eq!(refused.len(), 5 * 15 - 32);
    assert!(
        refused.iter().all(|code| code == "queue_full"),
        "{refused:?}"
    );

    // The flood holds the queue; the friend's message is still accepted,
    // and the victim gets it.
    let sent = try_send(&server, &friend, victim.id, b"are you there?")
        .await
        .expect(201);
    let inbox = server.inbox(&victim).await;
    assert_eq!(inbox.len(), 33);
    let from_friend: Vec<&Value> = inbox
        .iter()
        .filter(|m| m["from"] == friend.id.to_string())
        .collect();
    assert_eq!(from_friend.len(), 1, "{inbox:?}");
    assert_eq!(id(&from_friend[0]["id"]), id(&sent["id"]));
}

/// Item 8: a plain body to a ten-device account is stored ten times but
/// was charged one send. With a budget of 10 a burst, a five-device
/// recipient takes two sends; a one-device recipient, ten.
async fn a_send_is_charged_per_stored_copy(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &["--send-rate-per-second", "1", "--send-rate-burst", "10"],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    for _ in 0..4 {
        server.add_device(&bob, &public_key()).await;
    }
    for n in 0..2 {
        try_send(&server, &alice, bob.id, format!("m{n}").as_bytes())
            .await
            .expect(201);
    }
    try_send(&server, &alice, bob.id, b"m2")
        .await
        .expect_error(429, "rate_limited");

    // One device: a token a send, the whole burst.
    let carol = server.account("carol").await;
    let dave = server.account("dave").await;
    for n in 0..10 {
        try_send(&server, &carol, dave.id, format!("m{n}").as_bytes())
            .await
            .expect(201);
    }
}

/// Item 8: queued bytes per account. Each copy is stored as its body and
/// 60 bytes of sealing: a 1,000-byte body takes 1,060, so a quota of
/// 10,000 holds nine; an ack makes room again.
async fn an_account_s_queued_bytes_are_capped(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--max-queued-bytes-per-user",
            "10000",
            // One sender fills it: no shares.
            "--max-queued-per-sender",
            "0",
        ],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let body = vec![7u8; 1000];
    let mut sent = Vec::new();
    for _ in 0..9 {
        sent.push(id(&try_send(&server, &alice, bob.id, &body)
            .await
            .expect(201)["id"]));
    }
    try_send(&server, &alice, bob.id, &body)
        .await
        .expect_error(429, "queue_full");
    // A small one still fits (9,540 + 160).
    try_send(&server, &alice, bob.id, &[1u8; 100])
        .await
        .expect(201);

    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [sent[0]] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 1);
    try_send(&server, &alice, bob.id, &body).await.expect(201);
    try_send(&server, &alice, bob.id, &body)
        .await
        .expect_error(429, "queue_full");
}

/// Item 12: an ephemeral send's `delivered` tells whether the recipient is
/// online now. One sender may ask one recipient only as often as the pair
/// limit allows (stored sends draw on the same budget), while its sends to
/// others go on.
async fn ephemeral_sends_to_one_recipient_are_rate_limited(backend: Backend) {
    let server = TestServer::start_with(backend, &PAIR_DEFAULTS).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;
    let (_bob_socket, _) = WsClient::ready(&server, &bob).await;
    let (mut ws, _) = WsClient::ready(&server, &alice).await;

    // Pipelined: the burst (50) passes, and the rate (2 a second) cannot
    // refill 30 more while they are answered.
    const PROBES: usize = 80;
    for n in 0..PROBES {
        ws.send_json(json!({
            "type": "send", "ref": format!("p{n}"), "to": bob.id,
            "body": b64(b"typing"), "ephemeral": true,
        }))
        .await;
    }
    let (mut delivered, mut limited) = (0, 0);
    for _ in 0..PROBES {
        let frame = next_answer(&mut ws).await;
        match frame["type"].as_str() {
            Some("sent") => {
                assert_eq!(frame["delivered"], true, "{frame}");
                delivered += 1;
            }
            _ => {
                assert_eq!(frame["code"], "rate_limited", "{frame}");
                limited += 1;
            }
        }
    }
    assert!(delivered >= 50, "the burst passes: {delivered}");
    assert!(limited >= 1, "then the pair is limited: {delivered} passed");

    // Stored sends to bob share the pair's budget (at most what the rate
    // refilled meanwhile passes, not another burst); sends to carol have
    // their own.
    let mut passed = 0;
    loop {
        let reply = try_send(&server, &alice, bob.id, b"hello").await;
        if reply.status.as_u16() != 201 {
            reply.expect_error(429, "rate_limited");
            break;
        }
        passed += 1;
        assert!(passed < 10, "stored sends have a budget of their own");
    }
    ws.send_json(json!({
        "type": "send", "ref": "c", "to": carol.id,
        "body": b64(b"typing"), "ephemeral": true,
    }))
    .await;
    let answer = next_answer(&mut ws).await;
    assert_eq!(answer["type"], "sent", "{answer}");
    assert_eq!(answer["delivered"], false, "carol is offline: {answer}");
    try_send(&server, &alice, carol.id, b"hello")
        .await
        .expect(201);
}

/// The next `sent` or `error` frame, skipping pushes and notices.
async fn next_answer(ws: &mut WsClient) -> Value {
    loop {
        let frame = ws.json().await;
        if matches!(frame["type"].as_str(), Some("sent" | "error")) {
            return frame;
        }
    }
}
