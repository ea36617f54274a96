//! Devices (issue 12): an account holds several devices, each with its own
//! key, queue, acknowledgements and sockets. Per-device delivery and acks,
//! envelopes per device and the `409 devices_changed` refusal, syncing
//! one's own devices, adding, listing, renaming and removing devices, the
//! caps, exclusive sockets (4409), delivery receipts and `devices_changed`
//! frames, over REST and WebSocket as protocol.md's devices section
//! describes them.

use std::str::FromStr;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{PgPool, SqlitePool};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::{WsClient, assert_next_is_sentinel, close};
use crate::common::{
    Account, Api, Backend, PASSWORD, Reply, TestDb, TestServer, assert_message, b64, device_id,
    eventually, id, ids, keys, public_key, session, time,
};

backend_tests!(
    every_device_gets_every_message_and_an_ack_settles_only_its_own_copy,
    envelopes_that_miss_or_add_a_device_are_refused_and_store_nothing,
    distinct_envelopes_reach_their_own_devices_with_from_device,
    sending_to_yourself_syncs_your_other_devices_only,
    removing_a_device_revokes_it_and_deletes_only_its_queue,
    removal_needs_the_password_and_keeps_the_last_device,
    the_device_cap_is_refused_with_too_many_devices,
    device_ids_are_never_reused,
    an_exclusive_socket_displaces_only_the_older_sockets_of_its_device,
    a_receipt_reaches_every_online_socket_of_the_sender,
    no_receipts_when_delivery_receipts_are_off,
    devices_changed_reaches_the_other_devices_on_add_and_remove,
    login_picks_the_device_and_ready_names_it,
    own_devices_are_listed_with_names_and_renamed,
    the_directory_lists_every_device_key_without_names,
    only_a_device_itself_changes_its_key,
    the_socket_cap_counts_per_device,
    the_queue_cap_counts_per_device,
    ephemeral_envelopes_reach_each_online_device_and_are_never_stored,
    the_body_limit_applies_per_envelope,
    adding_a_device_draws_on_the_auth_rate_limit,
    a_password_change_from_any_device_ends_every_session_of_every_device,
);

/// The fields of `GET /v1/public-key/{id}` and `PUT /v1/update-key`, as
/// before devices: neither names a device.
const TODAYS_KEY_VIEW: [&str; 3] = ["public_key", "updated_at", "user_id"];

/// Ample time for the server to send what a committed ack causes (its
/// receipts), so that a socket opened after it is not sent them.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Helpers

/// `envelopes` as the request field: one `{device_id, body}` per pair.
fn envelopes(list: &[(i64, &[u8])]) -> Value {
    list.iter()
        .map(|(device, body)| json!({ "device_id": device, "body": b64(body) }))
        .collect()
}

/// `POST /v1/messages` with one envelope per `(device, body)`.
async fn send_envelopes(api: &Api, from: &Account, to: Uuid, list: &[(i64, &[u8])]) -> Reply {
    api.post(
        "/v1/messages",
        Some(&from.access),
        json!({ "to": to, "envelopes": envelopes(list) }),
    )
    .await
}

/// A `send` frame with one envelope per `(device, body)`.
fn send_frame(reference: &str, to: Uuid, list: &[(i64, &[u8])]) -> Value {
    json!({ "type": "send", "ref": reference, "to": to, "envelopes": envelopes(list) })
}

/// Asserts that `error` (a REST reply's `error` object or a WebSocket
/// `error` frame) is `devices_changed` naming exactly `missing` and
/// `extra`, ascending.
#[track_caller]
fn assert_devices_changed(error: &Value, missing: &[i64], extra: &[i64]) {
    assert_eq!(error["code"], "devices_changed", "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error without a message: {error}"
    );
    assert_eq!(error["missing"], json!(missing), "missing: {error}");
    assert_eq!(error["extra"], json!(extra), "extra: {error}");
}

/// Asserts a `409 devices_changed` reply naming `missing` and `extra`.
#[track_caller]
fn assert_refused(reply: &Reply, missing: &[i64], extra: &[i64]) {
    reply.expect_error(409, "devices_changed");
    assert_devices_changed(&reply.body["error"], missing, extra);
}

/// The ids `who`'s device lists over REST, in order.
async fn inbox_ids(api: &Api, who: &Account) -> Vec<Uuid> {
    ids(&api.inbox(who).await)
}

/// Waits until `who`'s device lists exactly `expected` (an ack made on a
/// socket is applied a moment after it is sent).
async fn until_inbox(api: &Api, who: &Account, expected: &[Uuid]) {
    let what = format!("{}'s queue to be {expected:?}", who.username);
    eventually(&what, async || {
        (inbox_ids(api, who).await == expected).then_some(())
    })
    .await;
}

/// The device ids a `devices_changed` frame carries; panics on any other
/// frame.
async fn next_devices_changed(ws: &mut WsClient) -> Vec<i64> {
    let frame = ws.expect_exactly("devices_changed").await;
    frame["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no device list: {frame}"))
        .iter()
        .map(device_id)
        .collect()
}

/// `DELETE /v1/devices/{device}` as `who` with `password`.
async fn remove_device(api: &Api, who: &Account, device: i64, password: &str) -> Reply {
    api.delete(
        &format!("/v1/devices/{device}"),
        Some(&who.access),
        json!({ "password": password }),
    )
    .await
}

/// `GET /v1/me` as `who`, which must answer 200.
async fn me(api: &Api, who: &Account) -> Value {
    api.get("/v1/me", Some(&who.access)).await.expect(200)
}

/// Asserts that `who`'s access token is refused.
async fn assert_token_refused(api: &Api, who: &Account) {
    api.get("/v1/me", Some(&who.access))
        .await
        .expect_error(401, "unauthorized");
}

/// The key `who`'s own device holds, as `/v1/me` reports it.
async fn own_key(api: &Api, who: &Account) -> String {
    me(api, who).await["public_key"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `(device_id, public_key)` of every device `GET /v1/users/{user}/devices`
/// lists, as `asker` sees them.
async fn directory(api: &Api, asker: &Account, user: Uuid) -> Vec<(i64, String)> {
    let listed = api
        .get(&format!("/v1/users/{user}/devices"), Some(&asker.access))
        .await
        .expect(200);
    listed["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no device list: {listed}"))
        .iter()
        .map(|d| {
            (
                device_id(&d["device_id"]),
                d["public_key"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// How many rows the queue holds for `user`'s `device`, read from the
/// database behind the server's back: what a removed device leaves behind
/// cannot be seen through the API.
async fn rows_queued(db: &TestDb, user: Uuid, device: i64) -> i64 {
    if db.is_postgres() {
        let pool = PgPool::connect(&db.url).await.expect("raw PostgreSQL");
        let count = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE recipient = $1 AND device_id = $2",
        )
        .bind(user)
        .bind(i32::try_from(device).unwrap())
        .fetch_one(&pool)
        .await
        .expect("count queued rows");
        pool.close().await;
        count
    } else {
        let options = SqliteConnectOptions::from_str(&db.url)
            .unwrap()
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePool::connect_with(options).await.expect("raw SQLite");
        let count = sqlx::query_scalar(
            "SELECT COUNT(*) FROM messages WHERE recipient = ? AND device_id = ?",
        )
        .bind(user)
        .bind(device)
        .fetch_one(&pool)
        .await
        .expect("count queued rows");
        pool.close().await;
        count
    }
}

/// A WebSocket upgrade on `/v1/ws?{query}` the server must refuse before
/// upgrading: its HTTP reply, read in full.
async fn refused_upgrade(api: &Api, query: &str, token: &str) -> Reply {
    let request = api
        .http
        .get(api.url(&format!("/v1/ws?{query}")))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .bearer_auth(token);
    let reply = tokio::time::timeout(Duration::from_secs(10), api.call(request))
        .await
        .expect("a refusal within 10 s, not an upgrade");
    assert_ne!(reply.status.as_u16(), 101, "the upgrade was accepted");
    reply
}

/// Asserts that `frame` is the receipt of `message` acknowledged by
/// `to`'s device `device`.
#[track_caller]
fn assert_receipt(frame: &Value, message: Uuid, to: Uuid, device: i64) {
    assert_eq!(frame["type"], "receipt", "{frame}");
    assert_eq!(id(&frame["id"]), message, "{frame}");
    assert_eq!(id(&frame["to"]), to, "{frame}");
    assert_eq!(frame["device_id"], device, "{frame}");
}

// ---------------------------------------------------------------------------
// Delivery per device

async fn every_device_gets_every_message_and_an_ack_settles_only_its_own_copy(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (device, laptop) = server.add_device(&bob, &public_key()).await;
    assert_eq!(device, 2);

    // A plain body goes to every device of the recipient.
    let mut sent = Vec::new();
    for n in 0..3 {
        let reply = server
            .send(&alice, bob.id, format!("m{n}").as_bytes())
            .await;
        sent.push(id(&reply["id"]));
    }
    for device in [&bob, &laptop] {
        let inbox = server.inbox(device).await;
        assert_eq!(ids(&inbox), sent, "{inbox:?}");
        for (n, message) in inbox.iter().enumerate() {
            assert_message(message, sent[n], alice.id, 1, format!("m{n}").as_bytes());
        }
    }

    // Each device's socket drains every one of them, and gets the next.
    let (mut phone_ws, backlog) = WsClient::ready(&server, &bob).await;
    assert_eq!(ids(&backlog), sent);
    assert_message(&backlog[2], sent[2], alice.id, 1, b"m2");
    let (mut laptop_ws, backlog) = WsClient::ready(&server, &laptop).await;
    assert_eq!(ids(&backlog), sent);
    assert_message(&backlog[0], sent[0], alice.id, 1, b"m0");
    let live = id(&server.send(&alice, bob.id, b"live").await["id"]);
    for ws in [&mut phone_ws, &mut laptop_ws] {
        let pushed = ws.expect_exactly("message").await;
        assert_message(&pushed, live, alice.id, 1, b"live");
    }
    sent.push(live);

    // The phone acks all four on its socket: its copies go, the laptop's
    // stay, and the laptop's socket is told nothing.
    let all: Vec<String> = sent.iter().map(Uuid::to_string).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    phone_ws.ack(&all).await;
    until_inbox(&server, &bob, &[]).await;
    assert_eq!(inbox_ids(&server, &laptop).await, sent);
    assert_next_is_sentinel(
        &server,
        &[&bob, &laptop],
        &mut [&mut laptop_ws, &mut phone_ws],
    )
    .await;
    let (_laptop_again, backlog) = WsClient::ready(&server, &laptop).await;
    assert_eq!(ids(&backlog), sent, "the laptop's copies were settled too");
    let (_phone_again, backlog) = WsClient::ready(&server, &bob).await;
    assert!(
        backlog.is_empty(),
        "the phone's acks were lost: {backlog:?}"
    );

    // The laptop settles its copies over REST, each way.
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&laptop.access),
            json!({ "ids": &sent[..2] }),
        )
        .await
        .expect(200);
    assert_eq!(acked, json!({ "acked": 2 }));
    let delivered = server
        .put(
            &format!("/v1/messages/{}/delivered", sent[2]),
            Some(&laptop.access),
            json!({}),
        )
        .await;
    assert_eq!(delivered.status.as_u16(), 204, "{:?}", delivered.body);
    assert_eq!(inbox_ids(&server, &laptop).await, [sent[3]]);

    // The phone, whose copies are gone, cannot settle the laptop's last one.
    let again = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [sent[3]] }),
        )
        .await
        .expect(200);
    assert_eq!(again, json!({ "acked": 0 }));
    server
        .put(
            &format!("/v1/messages/{}/delivered", sent[3]),
            Some(&bob.access),
            json!({}),
        )
        .await
        .expect_error(404, "not_found");
    assert_eq!(inbox_ids(&server, &laptop).await, [sent[3]]);
    assert!(inbox_ids(&server, &bob).await.is_empty());
}

async fn envelopes_that_miss_or_add_a_device_are_refused_and_store_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    // Device 3 existed once: it is as extra as one that never did.
    let (removed, _) = server.add_device(&bob, &public_key()).await;
    assert_eq!(removed, 3);
    assert_eq!(
        remove_device(&server, &bob, 3, PASSWORD)
            .await
            .status
            .as_u16(),
        204
    );
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 2]);

    let cases: [(&[i64], &[i64], &[i64]); 6] = [
        (&[1], &[2], &[]),
        (&[2], &[1], &[]),
        (&[1, 2, 7], &[], &[7]),
        (&[1, 2, 3], &[], &[3]),
        (&[2, 7], &[1], &[7]),
        (&[8, 7], &[1, 2], &[7, 8]),
    ];
    for (devices, missing, extra) in cases {
        let list: Vec<(i64, &[u8])> = devices.iter().map(|d| (*d, &b"refused"[..])).collect();
        let reply = send_envelopes(&server, &alice, bob.id, &list).await;
        assert_refused(&reply, missing, extra);
    }

    // Malformed envelope lists are invalid, not a change of devices.
    let bad = [
        (
            json!({ "to": bob.id, "body": b64(b"x"), "envelopes": envelopes(&[(1, b"x"), (2, b"x")]) }),
            "body",
        ),
        (
            json!({ "to": bob.id, "envelopes": envelopes(&[(1, b"x"), (1, b"y"), (2, b"x")]) }),
            "envelopes",
        ),
    ];
    for (request, field) in bad {
        let reply = server
            .post("/v1/messages", Some(&alice.access), request.clone())
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], field, "for {request}");
    }

    // None of them stored anything: the accepted send is each device's only
    // message.
    let good = send_envelopes(&server, &alice, bob.id, &[(1, b"one"), (2, b"two")])
        .await
        .expect(201);
    let good = id(&good["id"]);
    assert_eq!(inbox_ids(&server, &bob).await, [good]);
    assert_eq!(inbox_ids(&server, &laptop).await, [good]);

    // The `send` frame is refused the same way, with both lists and its ref,
    // and the socket stays usable.
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut bob_ws, backlog) = WsClient::ready(&server, &bob).await;
    assert_eq!(ids(&backlog), [good]);
    alice_ws
        .send_json(send_frame("r-both", bob.id, &[(2, b"x"), (9, b"y")]))
        .await;
    let error = alice_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "r-both", "{error}");
    assert_devices_changed(&error, &[1], &[9]);
    alice_ws
        .send_json(send_frame(
            "r-extra",
            bob.id,
            &[(1, b"x"), (2, b"y"), (3, b"z")],
        ))
        .await;
    let error = alice_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "r-extra", "{error}");
    assert_devices_changed(&error, &[], &[3]);
    alice_ws
        .send_json(send_frame(
            "r-ok",
            bob.id,
            &[(1, b"ws one"), (2, b"ws two")],
        ))
        .await;
    let sent = alice_ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "r-ok", "{sent}");
    let over_ws = id(&sent["id"]);

    // The refused frames reached nobody: bob's next frame is the good one.
    let pushed = bob_ws.expect_exactly("message").await;
    assert_message(&pushed, over_ws, alice.id, 1, b"ws one");
    assert_eq!(inbox_ids(&server, &bob).await, [good, over_ws]);
    assert_eq!(inbox_ids(&server, &laptop).await, [good, over_ws]);
}

async fn distinct_envelopes_reach_their_own_devices_with_from_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let (_, alice_laptop) = server.add_device(&alice, &public_key()).await;
    let bob = server.account("bob").await;
    let (_, bob_laptop) = server.add_device(&bob, &public_key()).await;
    let (mut phone_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &bob_laptop).await;

    // Over REST from alice's device 2, in any order.
    let sent = send_envelopes(
        &server,
        &alice_laptop,
        bob.id,
        &[(2, b"for the laptop"), (1, b"for the phone")],
    )
    .await
    .expect(201);
    assert_eq!(keys(&sent), ["id", "sent_at", "to"], "{sent}");
    assert_eq!(id(&sent["to"]), bob.id);
    let first = id(&sent["id"]);
    let on_phone = phone_ws.expect_exactly("message").await;
    assert_message(&on_phone, first, alice.id, 2, b"for the phone");
    let on_laptop = laptop_ws.expect_exactly("message").await;
    assert_message(&on_laptop, first, alice.id, 2, b"for the laptop");
    assert_eq!(on_phone["sent_at"], sent["sent_at"]);
    assert_eq!(on_laptop["sent_at"], sent["sent_at"]);

    // Over the socket from alice's device 1.
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    alice_ws
        .send_json(send_frame(
            "s",
            bob.id,
            &[(1, b"phone 2"), (2, b"laptop 2")],
        ))
        .await;
    let confirmed = alice_ws.expect_exactly("sent").await;
    assert_eq!(confirmed["ref"], "s", "{confirmed}");
    let second = id(&confirmed["id"]);
    assert_message(
        &phone_ws.expect_exactly("message").await,
        second,
        alice.id,
        1,
        b"phone 2",
    );
    assert_message(
        &laptop_ws.expect_exactly("message").await,
        second,
        alice.id,
        1,
        b"laptop 2",
    );

    // The listings say the same, one id for both copies.
    let phone = server.inbox(&bob).await;
    assert_eq!(ids(&phone), [first, second]);
    assert_message(&phone[0], first, alice.id, 2, b"for the phone");
    assert_message(&phone[1], second, alice.id, 1, b"phone 2");
    let laptop = server.inbox(&bob_laptop).await;
    assert_eq!(ids(&laptop), [first, second]);
    assert_message(&laptop[0], first, alice.id, 2, b"for the laptop");
    assert_message(&laptop[1], second, alice.id, 1, b"laptop 2");
    // Alice's own devices got nothing of it.
    assert!(inbox_ids(&server, &alice_laptop).await.is_empty());
    assert_next_is_sentinel(&server, &[&alice, &alice_laptop], &mut [&mut alice_ws]).await;
}

async fn sending_to_yourself_syncs_your_other_devices_only(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let (_, laptop) = server.add_device(&alice, &public_key()).await;
    let (tablet_id, tablet) = server.add_device(&alice, &public_key()).await;
    assert_eq!(tablet_id, 3);
    let (mut phone_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &laptop).await;

    // From the phone over REST: one envelope for each other device.
    let sent = send_envelopes(
        &server,
        &alice,
        alice.id,
        &[(2, b"sync laptop"), (3, b"sync tablet")],
    )
    .await
    .expect(201);
    assert_eq!(id(&sent["to"]), alice.id);
    let from_phone = id(&sent["id"]);
    let pushed = laptop_ws.expect_exactly("message").await;
    assert_message(&pushed, from_phone, alice.id, 1, b"sync laptop");

    // Including the sending device is extra; leaving another out, missing.
    let all: [(i64, &[u8]); 3] = [(1, b"x"), (2, b"x"), (3, b"x")];
    assert_refused(
        &send_envelopes(&server, &alice, alice.id, &all).await,
        &[],
        &[1],
    );
    assert_refused(
        &send_envelopes(&server, &alice, alice.id, &[(2, b"x")]).await,
        &[3],
        &[],
    );

    // From the laptop over its socket: the same rules, for the laptop.
    laptop_ws
        .send_json(send_frame("self", alice.id, &all))
        .await;
    let error = laptop_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "self", "{error}");
    assert_devices_changed(&error, &[], &[2]);
    laptop_ws
        .send_json(send_frame(
            "sync",
            alice.id,
            &[(1, b"from the laptop"), (3, b"laptop to tablet")],
        ))
        .await;
    let confirmed = laptop_ws.expect_exactly("sent").await;
    assert_eq!(confirmed["ref"], "sync", "{confirmed}");
    let from_laptop = id(&confirmed["id"]);
    let pushed = phone_ws.expect_exactly("message").await;
    assert_message(&pushed, from_laptop, alice.id, 2, b"from the laptop");
    // The sending socket gets no copy of its own message.
    assert_next_is_sentinel(
        &server,
        &[&alice, &laptop, &tablet],
        &mut [&mut laptop_ws, &mut phone_ws],
    )
    .await;

    // Each queue holds what the others sent it, never its own.
    let phone_inbox = server.inbox(&alice).await;
    assert_eq!(ids(&phone_inbox), [from_laptop]);
    assert_eq!(inbox_ids(&server, &laptop).await, [from_phone]);
    let tablet_inbox = server.inbox(&tablet).await;
    assert_eq!(ids(&tablet_inbox), [from_phone, from_laptop]);
    assert_message(&tablet_inbox[0], from_phone, alice.id, 1, b"sync tablet");
    assert_message(
        &tablet_inbox[1],
        from_laptop,
        alice.id,
        2,
        b"laptop to tablet",
    );

    // A plain body to yourself is today's note to self: every device gets
    // it, the sending one included.
    let plain = id(&server.send(&tablet, alice.id, b"plain sync").await["id"]);
    for ws in [&mut phone_ws, &mut laptop_ws] {
        let pushed = ws.expect_exactly("message").await;
        assert_message(&pushed, plain, alice.id, 3, b"plain sync");
    }
    assert_eq!(
        inbox_ids(&server, &tablet).await,
        [from_phone, from_laptop, plain]
    );

    // An account with one device has no other to sync: an empty list of
    // envelopes reaches no device and is refused as such (422, storing
    // nothing); an envelope for itself is extra.
    let carol = server.account("carol").await;
    let nothing = send_envelopes(&server, &carol, carol.id, &[]).await;
    nothing.expect_error(422, "invalid");
    assert_eq!(
        nothing.body["error"]["field"], "envelopes",
        "{:?}",
        nothing.body
    );
    assert_refused(
        &send_envelopes(&server, &carol, carol.id, &[(1, b"x")]).await,
        &[],
        &[1],
    );
    let note = id(&server.send(&carol, carol.id, b"note to self").await["id"]);
    assert_eq!(inbox_ids(&server, &carol).await, [note]);
}

// ---------------------------------------------------------------------------
// Removing devices

async fn removing_a_device_revokes_it_and_deletes_only_its_queue(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    // A second session of the laptop, by login.
    let laptop_login = session(&bob, &server.login_device("bob", 2).await.expect(200));
    let first = id(&server.send(&alice, bob.id, b"one").await["id"]);
    let second = id(&server.send(&alice, bob.id, b"two").await["id"]);
    assert_eq!(rows_queued(&server.db, bob.id, 1).await, 2);
    assert_eq!(rows_queued(&server.db, bob.id, 2).await, 2);
    let (mut phone_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &laptop).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;

    // The phone removes the laptop.
    let removed = remove_device(&server, &bob, 2, PASSWORD).await;
    assert_eq!(removed.status.as_u16(), 204, "{:?}", removed.body);

    // Every session of the laptop is over: tokens, refresh, sockets.
    laptop_ws.expect_close(close::REVOKED).await;
    for gone in [&laptop, &laptop_login] {
        assert_token_refused(&server, gone).await;
        server
            .refresh(&gone.refresh)
            .await
            .expect_error(401, "unauthorized");
    }
    let mut again = WsClient::connect(&server, Some(&laptop.access)).await;
    again.expect_close(close::REFUSED).await;
    server
        .login_device("bob", 2)
        .await
        .expect_error(404, "not_found");

    // The phone is told and keeps its session and its queue; only the
    // laptop's copies are gone.
    assert_eq!(next_devices_changed(&mut phone_ws).await, [1]);
    assert_eq!(me(&server, &bob).await["device_id"], 1);
    assert_eq!(rows_queued(&server.db, bob.id, 2).await, 0);
    assert_eq!(rows_queued(&server.db, bob.id, 1).await, 2);
    assert_eq!(inbox_ids(&server, &bob).await, [first, second]);
    // Its key left the directory.
    assert_eq!(server.device_ids(&alice, bob.id).await, [1]);

    // Sends now target the phone alone.
    assert_refused(
        &send_envelopes(&server, &alice, bob.id, &[(1, b"x"), (2, b"y")]).await,
        &[],
        &[2],
    );
    let third = id(&server.send(&alice, bob.id, b"three").await["id"]);
    assert_message(
        &phone_ws.expect_exactly("message").await,
        third,
        alice.id,
        1,
        b"three",
    );
    assert_eq!(inbox_ids(&server, &bob).await, [first, second, third]);
    assert_eq!(rows_queued(&server.db, bob.id, 2).await, 0);

    // Other accounts are untouched: alice's socket hears only her message.
    let reply = id(&server.send(&bob, alice.id, b"reply").await["id"]);
    assert_message(
        &alice_ws.expect_exactly("message").await,
        reply,
        bob.id,
        1,
        b"reply",
    );
}

async fn removal_needs_the_password_and_keeps_the_last_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let laptop_key = public_key();
    let (_, laptop) = server.add_device(&bob, &laptop_key).await;

    // A wrong password or an unknown device removes nothing.
    remove_device(&server, &bob, 2, "not the password")
        .await
        .expect_error(403, "forbidden");
    remove_device(&server, &bob, 7, PASSWORD)
        .await
        .expect_error(404, "not_found");
    // Device numbers are per account: alice has no device 2 to remove.
    remove_device(&server, &alice, 2, PASSWORD)
        .await
        .expect_error(404, "not_found");
    server
        .delete("/v1/devices/2", None, json!({ "password": PASSWORD }))
        .await
        .expect_error(401, "unauthorized");
    assert_eq!(me(&server, &laptop).await["device_id"], 2);
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 2]);

    // Any device removes another, device 1 included.
    let removed = remove_device(&server, &laptop, 1, PASSWORD).await;
    assert_eq!(removed.status.as_u16(), 204, "{:?}", removed.body);
    assert_token_refused(&server, &bob).await;
    assert_eq!(server.device_ids(&alice, bob.id).await, [2]);
    // The legacy key lookup now answers the lowest remaining device.
    let key = server
        .get(&format!("/v1/public-key/{}", bob.id), Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(key["public_key"], laptop_key.as_str(), "{key}");
    assert_eq!(keys(&key), TODAYS_KEY_VIEW, "{key}");

    // Without device 1, a login must name a device.
    server
        .post(
            "/v1/login",
            None,
            json!({ "username": "bob", "password": PASSWORD }),
        )
        .await
        .expect_error(404, "not_found");
    assert_eq!(
        server.login_device("bob", 2).await.expect(200)["device_id"],
        2
    );

    // The last device cannot be removed: that is deleting the account.
    remove_device(&server, &laptop, 2, PASSWORD)
        .await
        .expect_error(409, "conflict");
    assert_eq!(me(&server, &laptop).await["device_id"], 2);
    assert_eq!(server.device_ids(&alice, bob.id).await, [2]);
}

// ---------------------------------------------------------------------------
// Adding devices

async fn the_device_cap_is_refused_with_too_many_devices(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-devices-per-user", "2"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (device, _) = server.add_device(&bob, &public_key()).await;
    assert_eq!(device, 2);

    let refused = server
        .try_add_device("bob", PASSWORD, &public_key(), Some("one too many"))
        .await;
    refused.expect_error(409, "too_many_devices");
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 2]);

    // Bad credentials are refused as at login, cap or not.
    for (username, password) in [("bob", "not the password"), ("nobody", PASSWORD)] {
        server
            .try_add_device(username, password, &public_key(), None)
            .await
            .expect_error(401, "unauthorized");
    }
    // The cap is per account.
    let (device, _) = server.add_device(&alice, &public_key()).await;
    assert_eq!(device, 2);

    // Removing a device makes room for one more, under a new number.
    assert_eq!(
        remove_device(&server, &bob, 2, PASSWORD)
            .await
            .status
            .as_u16(),
        204
    );
    let (device, _) = server.add_device(&bob, &public_key()).await;
    assert_eq!(device, 3);
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 3]);
    server
        .try_add_device("bob", PASSWORD, &public_key(), None)
        .await
        .expect_error(409, "too_many_devices");
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 3]);
}

async fn device_ids_are_never_reused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    assert_eq!(server.add_device(&bob, &public_key()).await.0, 2);
    assert_eq!(server.add_device(&bob, &public_key()).await.0, 3);
    // Queued for devices 1, 2 and 3.
    let before = id(&server.send(&alice, bob.id, b"before").await["id"]);

    assert_eq!(
        remove_device(&server, &bob, 3, PASSWORD)
            .await
            .status
            .as_u16(),
        204
    );
    let (four, device_four) = server.add_device(&bob, &public_key()).await;
    assert_eq!(four, 4);
    assert_eq!(
        remove_device(&server, &bob, 2, PASSWORD)
            .await
            .status
            .as_u16(),
        204
    );
    let (five, _) = server.add_device(&bob, &public_key()).await;
    assert_eq!(five, 5);
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 4, 5]);

    // The removed numbers stay removed.
    for gone in [2, 3] {
        server
            .login_device("bob", gone)
            .await
            .expect_error(404, "not_found");
    }
    let login = server.login_device("bob", 4).await.expect(200);
    assert_eq!(login["device_id"], 4);
    // Nothing queued for device 3 reached the device after it: device 4
    // starts with an empty queue while device 1 still holds the message.
    assert_eq!(inbox_ids(&server, &bob).await, [before]);
    assert!(inbox_ids(&server, &device_four).await.is_empty());
}

// ---------------------------------------------------------------------------
// Exclusive sockets

async fn an_exclusive_socket_displaces_only_the_older_sockets_of_its_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    let (mut older_a, _) = WsClient::ready(&server, &bob).await;
    let (mut older_b, _, _) = WsClient::ready_with(&server, &bob, "exclusive=false").await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &laptop).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;

    // An exclusive socket closes every older socket of its device with
    // 4409, and no other.
    let (mut exclusive, ready, _) = WsClient::ready_with(&server, &bob, "exclusive=true").await;
    assert_eq!(ready["device_id"], 1, "{ready}");
    older_a.expect_close(close::CONNECTED_ELSEWHERE).await;
    older_b.expect_close(close::CONNECTED_ELSEWHERE).await;

    // Sockets opened after it without `exclusive` coexist with it.
    let (mut plain, _, _) = WsClient::ready_with(&server, &bob, "exclusive=false").await;
    let (mut default, _) = WsClient::ready(&server, &bob).await;
    let first = id(&server.send(&alice, bob.id, b"who is here").await["id"]);
    for ws in [&mut exclusive, &mut plain, &mut default, &mut laptop_ws] {
        assert_message(
            &ws.expect_exactly("message").await,
            first,
            alice.id,
            1,
            b"who is here",
        );
    }

    // On the laptop, an exclusive socket authenticated by frame displaces
    // the laptop's socket once it is authenticated, and nothing of bob's
    // phone.
    let mut by_frame = WsClient::connect_query(&server, "exclusive=true", None).await;
    by_frame
        .send_json(json!({ "type": "auth", "token": laptop.access }))
        .await;
    let ready = by_frame.expect_exactly("ready").await;
    assert_eq!(ready["device_id"], 2, "{ready}");
    assert_eq!(ids(&by_frame.until_drained().await), [first]);
    laptop_ws.expect_close(close::CONNECTED_ELSEWHERE).await;
    let second = id(&server.send(&alice, bob.id, b"still here").await["id"]);
    for ws in [&mut exclusive, &mut plain, &mut default, &mut by_frame] {
        assert_message(
            &ws.expect_exactly("message").await,
            second,
            alice.id,
            1,
            b"still here",
        );
    }

    // A newer exclusive socket displaces the exclusive one too.
    let (mut newest, _, backlog) = WsClient::ready_with(&server, &bob, "exclusive=true").await;
    assert_eq!(ids(&backlog), [first, second]);
    for ws in [&mut exclusive, &mut plain, &mut default] {
        ws.expect_close(close::CONNECTED_ELSEWHERE).await;
    }
    let third = id(&server.send(&alice, bob.id, b"third").await["id"]);
    for ws in [&mut newest, &mut by_frame] {
        assert_message(
            &ws.expect_exactly("message").await,
            third,
            alice.id,
            1,
            b"third",
        );
    }
    // Other accounts' sockets were never touched.
    let reply = id(&server.send(&bob, alice.id, b"hello alice").await["id"]);
    assert_message(
        &alice_ws.expect_exactly("message").await,
        reply,
        bob.id,
        1,
        b"hello alice",
    );

    // Any other value is refused before the upgrade.
    for bad in ["exclusive=yes", "exclusive=1", "exclusive="] {
        let reply = refused_upgrade(&server, bad, &bob.access).await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "exclusive", "{bad}");
    }
    // And displaced nothing.
    let fourth = id(&server.send(&alice, bob.id, b"fourth").await["id"]);
    assert_message(
        &newest.expect_exactly("message").await,
        fourth,
        alice.id,
        1,
        b"fourth",
    );
}

// ---------------------------------------------------------------------------
// Delivery receipts

async fn a_receipt_reaches_every_online_socket_of_the_sender(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let (_, alice_laptop) = server.add_device(&alice, &public_key()).await;
    let bob = server.account("bob").await;
    let (_, bob_laptop) = server.add_device(&bob, &public_key()).await;
    let carol = server.account("carol").await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut alice_laptop_ws, _) = WsClient::ready(&server, &alice_laptop).await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut carol_ws, _) = WsClient::ready(&server, &carol).await;

    // Bob's phone acks on its socket: every socket of alice's hears of it.
    let first = id(&server.send(&alice, bob.id, b"read me").await["id"]);
    assert_message(
        &bob_ws.expect_exactly("message").await,
        first,
        alice.id,
        1,
        b"read me",
    );
    bob_ws.ack(&[&first.to_string()]).await;
    for ws in [&mut alice_ws, &mut alice_laptop_ws] {
        assert_receipt(&ws.expect_exactly("receipt").await, first, bob.id, 1);
    }

    // Bob's laptop acks over REST: a receipt naming the laptop.
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob_laptop.access),
            json!({ "ids": [first] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 1);
    for ws in [&mut alice_ws, &mut alice_laptop_ws] {
        assert_receipt(&ws.expect_exactly("receipt").await, first, bob.id, 2);
    }

    // Sent from alice's laptop, settled by `delivered`.
    let second = id(&server.send(&alice_laptop, bob.id, b"and me").await["id"]);
    // Bob's own socket gets no receipt of his acks: its next frame is this.
    assert_message(
        &bob_ws.expect_exactly("message").await,
        second,
        alice.id,
        2,
        b"and me",
    );
    let delivered = server
        .put(
            &format!("/v1/messages/{second}/delivered"),
            Some(&bob_laptop.access),
            json!({}),
        )
        .await;
    assert_eq!(delivered.status.as_u16(), 204, "{:?}", delivered.body);
    for ws in [&mut alice_ws, &mut alice_laptop_ws] {
        assert_receipt(&ws.expect_exactly("receipt").await, second, bob.id, 2);
    }

    // Nobody else hears of it: carol's next frame is her own message.
    let to_carol = id(&server.send(&bob, carol.id, b"hi carol").await["id"]);
    assert_message(
        &carol_ws.expect_exactly("message").await,
        to_carol,
        bob.id,
        1,
        b"hi carol",
    );

    // Receipts are never stored: acks made while alice is offline do not
    // reach her later sockets.
    bob_ws.ack(&[&second.to_string()]).await;
    for ws in [&mut alice_ws, &mut alice_laptop_ws] {
        assert_receipt(&ws.expect_exactly("receipt").await, second, bob.id, 1);
    }
    alice_ws.close().await;
    alice_laptop_ws.close().await;
    let third = id(&server.send(&alice, bob.id, b"while away").await["id"]);
    assert_message(
        &bob_ws.expect_exactly("message").await,
        third,
        alice.id,
        1,
        b"while away",
    );
    bob_ws.ack(&[&third.to_string()]).await;
    until_inbox(&server, &bob, &[]).await;
    // Past the moment the ack's receipt went out to no one.
    tokio::time::sleep(QUIET).await;
    let (mut later, backlog) = WsClient::ready(&server, &alice).await;
    assert!(backlog.is_empty(), "{backlog:?}");
    let hello = id(&server.send(&carol, alice.id, b"hello").await["id"]);
    assert_message(
        &later.expect_exactly("message").await,
        hello,
        carol.id,
        1,
        b"hello",
    );
}

async fn no_receipts_when_delivery_receipts_are_off(backend: Backend) {
    let server = TestServer::start_with(backend, &["--delivery-receipts", "false"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;

    // Acked on the socket and over REST.
    let first = id(&server.send(&alice, bob.id, b"one").await["id"]);
    assert_message(
        &bob_ws.expect_exactly("message").await,
        first,
        alice.id,
        1,
        b"one",
    );
    bob_ws.ack(&[&first.to_string()]).await;
    until_inbox(&server, &bob, &[]).await;
    let second = id(&server.send(&alice, bob.id, b"two").await["id"]);
    assert_message(
        &bob_ws.expect_exactly("message").await,
        second,
        alice.id,
        1,
        b"two",
    );
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [second] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 1);

    // Alice heard of neither: her next frame is bob's reply.
    let reply = id(&server.send(&bob, alice.id, b"reply").await["id"]);
    assert_message(
        &alice_ws.expect_exactly("message").await,
        reply,
        bob.id,
        1,
        b"reply",
    );
}

// ---------------------------------------------------------------------------
// devices_changed

async fn devices_changed_reaches_the_other_devices_on_add_and_remove(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut phone_a, _) = WsClient::ready(&server, &bob).await;
    let (mut phone_b, _) = WsClient::ready(&server, &bob).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;

    // Added: every socket of the existing devices is told the new list.
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    for ws in [&mut phone_a, &mut phone_b] {
        assert_eq!(next_devices_changed(ws).await, [1, 2]);
    }
    let (mut laptop_ws, _) = WsClient::ready(&server, &laptop).await;
    let (_, tablet) = server.add_device(&bob, &public_key()).await;
    for ws in [&mut phone_a, &mut phone_b, &mut laptop_ws] {
        assert_eq!(next_devices_changed(ws).await, [1, 2, 3]);
    }
    let (mut tablet_ws, _) = WsClient::ready(&server, &tablet).await;

    // Removed (by the tablet): the remaining devices are told, the removed
    // one is closed.
    let removed = remove_device(&server, &tablet, 2, PASSWORD).await;
    assert_eq!(removed.status.as_u16(), 204, "{:?}", removed.body);
    laptop_ws.expect_close(close::REVOKED).await;
    for ws in [&mut phone_a, &mut phone_b, &mut tablet_ws] {
        assert_eq!(next_devices_changed(ws).await, [1, 3]);
    }

    // Other accounts hear nothing of it: alice's next frame is a message.
    let hello = id(&server.send(&bob, alice.id, b"hello").await["id"]);
    assert_message(
        &alice_ws.expect_exactly("message").await,
        hello,
        bob.id,
        1,
        b"hello",
    );
    // Nor were bob's sockets told anything else.
    let next = id(&server.send(&alice, bob.id, b"next").await["id"]);
    for ws in [&mut phone_a, &mut phone_b, &mut tablet_ws] {
        assert_eq!(id(&ws.expect_exactly("message").await["id"]), next);
    }
}

// ---------------------------------------------------------------------------
// Sessions per device

async fn login_picks_the_device_and_ready_names_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let phone_key = public_key();
    let registered = server
        .post(
            "/v1/register",
            None,
            json!({ "username": "bob", "password": PASSWORD, "public_key": phone_key }),
        )
        .await
        .expect(201);
    assert_eq!(registered["device_id"], 1, "{registered}");
    let bob_id = id(&registered["id"]);
    let default = server.login("bob").await;
    assert_eq!(default["device_id"], 1, "{default}");
    let bob = Account {
        id: bob_id,
        username: "bob".into(),
        access: String::new(),
        refresh: String::new(),
    };
    let phone = session(&bob, &default);

    let laptop_key = public_key();
    let added = server
        .try_add_device("bob", PASSWORD, &laptop_key, Some("laptop"))
        .await
        .expect(201);
    assert_eq!(added["device_id"], 2, "{added}");
    assert_eq!(added["token_type"], "bearer", "{added}");
    assert!(
        added["expires_in"].as_u64().is_some_and(|s| s > 0),
        "{added}"
    );

    // Login with device_id 2 opens a session on device 2, JSON or form.
    let login = server.login_device("bob", 2).await.expect(200);
    assert_eq!(login["device_id"], 2, "{login}");
    assert_eq!(login["token_type"], "bearer", "{login}");
    let laptop = session(&bob, &login);
    let laptop_me = me(&server, &laptop).await;
    assert_eq!(laptop_me["device_id"], 2, "{laptop_me}");
    assert_eq!(laptop_me["public_key"], laptop_key.as_str(), "{laptop_me}");
    assert_eq!(id(&laptop_me["id"]), bob_id);
    let phone_me = me(&server, &phone).await;
    assert_eq!(phone_me["device_id"], 1, "{phone_me}");
    assert_eq!(phone_me["public_key"], phone_key.as_str(), "{phone_me}");
    let explicit = server.login_device("bob", 1).await.expect(200);
    assert_eq!(explicit["device_id"], 1, "{explicit}");
    let form = server
        .call(server.http.post(server.url("/v1/login")).form(&[
            ("grant_type", "password"),
            ("username", "bob"),
            ("password", PASSWORD),
            ("device_id", "2"),
        ]))
        .await
        .expect(200);
    assert_eq!(form["device_id"], 2, "{form}");
    assert_eq!(me(&server, &session(&bob, &form)).await["device_id"], 2);

    // `ready` names the token's device.
    let (laptop_ws, ready, _) = WsClient::ready_with(&server, &laptop, "").await;
    assert_eq!(ready["device_id"], 2, "{ready}");
    let (phone_ws, ready, _) = WsClient::ready_with(&server, &phone, "").await;
    assert_eq!(ready["device_id"], 1, "{ready}");
    laptop_ws.close().await;
    phone_ws.close().await;

    // A refresh stays on its device.
    let renewed = server.refresh(&laptop.refresh).await.expect(200);
    assert_eq!(renewed["device_id"], 2, "{renewed}");
    let renewed = session(&bob, &renewed);
    assert_eq!(me(&server, &renewed).await["device_id"], 2);
    let (_ws, ready, _) = WsClient::ready_with(&server, &renewed, "").await;
    assert_eq!(ready["device_id"], 2, "{ready}");

    // A device id that is not a positive integer is invalid; a wrong
    // password is refused as ever; a device that never existed is unknown.
    for bad in [json!(0), json!(-1), json!("two"), json!(1.5), json!(true)] {
        let reply = server
            .post(
                "/v1/login",
                None,
                json!({ "username": "bob", "password": PASSWORD, "device_id": bad }),
            )
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "device_id", "for {bad}");
    }
    server
        .post(
            "/v1/login",
            None,
            json!({ "username": "bob", "password": "not the password", "device_id": 2 }),
        )
        .await
        .expect_error(401, "unauthorized");
    server
        .login_device("bob", 9)
        .await
        .expect_error(404, "not_found");

    // Once removed, the device cannot be logged into or refreshed.
    let removed = remove_device(&server, &phone, 2, PASSWORD).await;
    assert_eq!(removed.status.as_u16(), 204, "{:?}", removed.body);
    server
        .login_device("bob", 2)
        .await
        .expect_error(404, "not_found");
    server
        .refresh(&renewed.refresh)
        .await
        .expect_error(401, "unauthorized");
    assert_token_refused(&server, &renewed).await;
    assert_eq!(server.login("bob").await["device_id"], 1);
}

// ---------------------------------------------------------------------------
// Listing, naming, keys

async fn own_devices_are_listed_with_names_and_renamed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let phone_key = own_key(&server, &bob).await;
    let laptop_key = public_key();
    let added = server
        .try_add_device("bob", PASSWORD, &laptop_key, Some("laptop"))
        .await
        .expect(201);
    let laptop = session(&bob, &added);

    let listed = server
        .get("/v1/devices", Some(&laptop.access))
        .await
        .expect(200);
    let devices = listed["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no device list: {listed}"));
    let numbers: Vec<i64> = devices.iter().map(|d| device_id(&d["device_id"])).collect();
    assert_eq!(numbers, [1, 2], "{listed}");
    for device in devices {
        for field in [
            "device_id",
            "name",
            "public_key",
            "updated_at",
            "created_at",
            "last_seen_at",
            "current",
        ] {
            assert!(device.get(field).is_some(), "no {field}: {device}");
        }
        let (created, seen) = (time(&device["created_at"]), time(&device["last_seen_at"]));
        assert!(created <= seen, "{device}");
        time(&device["updated_at"]);
    }
    assert_eq!(devices[0]["name"], Value::Null, "{listed}");
    assert_eq!(devices[0]["public_key"], phone_key.as_str());
    assert_eq!(devices[0]["current"], false);
    assert_eq!(devices[1]["name"], "laptop");
    assert_eq!(devices[1]["public_key"], laptop_key.as_str());
    assert_eq!(devices[1]["current"], true);
    // A login is seen on its device, and only there.
    let seen = |listed: &Value, n: usize| time(&listed["devices"][n]["last_seen_at"]);
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.login_device("bob", 2).await.expect(200);
    let later = server
        .get("/v1/devices", Some(&laptop.access))
        .await
        .expect(200);
    assert!(seen(&later, 1) > seen(&listed, 1), "{listed} then {later}");
    assert_eq!(seen(&later, 0), seen(&listed, 0), "{listed} then {later}");
    // `current` follows the caller.
    let from_phone = server
        .get("/v1/devices", Some(&bob.access))
        .await
        .expect(200);
    let current: Vec<&Value> = from_phone["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["current"])
        .collect();
    assert_eq!(current, [&json!(true), &json!(false)], "{from_phone}");

    // Any device renames any of the account's devices.
    let renamed = server
        .patch(
            "/v1/devices/1",
            Some(&laptop.access),
            json!({ "name": "phone" }),
        )
        .await
        .expect(200);
    assert_eq!(renamed["device_id"], 1, "{renamed}");
    assert_eq!(renamed["name"], "phone", "{renamed}");
    assert_eq!(renamed["current"], false, "{renamed}");
    assert_eq!(renamed["public_key"], phone_key.as_str(), "{renamed}");
    let names = |listed: &Value| -> Vec<Value> {
        listed["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].clone())
            .collect()
    };
    let listed = server
        .get("/v1/devices", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(names(&listed), [json!("phone"), json!("laptop")]);

    // Names of 1 to 64 characters, without control characters; null clears.
    let longest = "é".repeat(64);
    let renamed = server
        .patch(
            "/v1/devices/2",
            Some(&bob.access),
            json!({ "name": longest }),
        )
        .await
        .expect(200);
    assert_eq!(renamed["name"], longest.as_str());
    let cleared = server
        .patch("/v1/devices/1", Some(&bob.access), json!({ "name": null }))
        .await
        .expect(200);
    assert_eq!(cleared["name"], Value::Null, "{cleared}");
    for bad in [
        json!(""),
        json!("x".repeat(65)),
        json!("tab\there"),
        json!("bell\u{7}"),
        json!(42),
    ] {
        let reply = server
            .patch("/v1/devices/2", Some(&bob.access), json!({ "name": bad }))
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "name", "for {bad}");
    }
    server
        .patch(
            "/v1/devices/9",
            Some(&bob.access),
            json!({ "name": "ghost" }),
        )
        .await
        .expect_error(404, "not_found");
    let listed = server
        .get("/v1/devices", Some(&laptop.access))
        .await
        .expect(200);
    assert_eq!(names(&listed), [Value::Null, json!(longest)]);

    // Another account sees only its own devices and renames none of bob's.
    let hers = server
        .get("/v1/devices", Some(&alice.access))
        .await
        .expect(200);
    let hers = hers["devices"].as_array().unwrap();
    assert_eq!(hers.len(), 1, "{hers:?}");
    assert_eq!(hers[0]["device_id"], 1);
    assert_eq!(hers[0]["current"], true);
    server
        .patch(
            "/v1/devices/2",
            Some(&alice.access),
            json!({ "name": "mine" }),
        )
        .await
        .expect_error(404, "not_found");
    let listed = server
        .get("/v1/devices", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(names(&listed), [Value::Null, json!(longest)]);
    server
        .get("/v1/devices", None)
        .await
        .expect_error(401, "unauthorized");
}

async fn the_directory_lists_every_device_key_without_names(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let phone_key = own_key(&server, &bob).await;
    let laptop_key = public_key();
    server
        .try_add_device("bob", PASSWORD, &laptop_key, Some("secret laptop name"))
        .await
        .expect(201);

    let listed = server
        .get(
            &format!("/v1/users/{}/devices", bob.id),
            Some(&alice.access),
        )
        .await
        .expect(200);
    assert_eq!(
        keys(&listed),
        ["devices", "user_id", "username"],
        "{listed}"
    );
    assert_eq!(id(&listed["user_id"]), bob.id);
    assert_eq!(listed["username"], "bob", "{listed}");
    let devices = listed["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{listed}");
    for device in devices {
        assert_eq!(
            keys(device),
            ["device_id", "public_key", "updated_at"],
            "{device}"
        );
        time(&device["updated_at"]);
    }
    assert_eq!(
        directory(&server, &alice, bob.id).await,
        [(1, phone_key.clone()), (2, laptop_key.clone())]
    );
    assert!(
        !listed.to_string().contains("secret laptop name"),
        "{listed}"
    );
    // The owner sees the same.
    assert_eq!(
        directory(&server, &bob, bob.id).await,
        [(1, phone_key), (2, laptop_key)]
    );

    for unknown in [Uuid::new_v4(), Uuid::now_v7()] {
        server
            .get(&format!("/v1/users/{unknown}/devices"), Some(&alice.access))
            .await
            .expect_error(404, "not_found");
    }
    let reply = server
        .get("/v1/users/not-a-uuid/devices", Some(&alice.access))
        .await;
    reply.expect_error(422, "invalid");
    assert_eq!(reply.body["error"]["field"], "user_id");
    server
        .get(&format!("/v1/users/{}/devices", bob.id), None)
        .await
        .expect_error(401, "unauthorized");
}

async fn only_a_device_itself_changes_its_key(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let phone_key = own_key(&server, &bob).await;
    let laptop_key = public_key();
    let (_, laptop) = server.add_device(&bob, &laptop_key).await;

    // Not by another device of the account, nor by another account.
    let other = public_key();
    for (who, what) in [(&bob, "bob's phone"), (&alice, "alice")] {
        server
            .put(
                "/v1/devices/2/key",
                Some(&who.access),
                json!({ "public_key": other }),
            )
            .await
            .expect_error(403, "forbidden");
        assert_eq!(
            directory(&server, &alice, bob.id).await,
            [(1, phone_key.clone()), (2, laptop_key.clone())],
            "changed by {what}"
        );
    }

    // By the device itself.
    let new_laptop = public_key();
    let changed = server
        .put(
            "/v1/devices/2/key",
            Some(&laptop.access),
            json!({ "public_key": new_laptop }),
        )
        .await
        .expect(200);
    assert_eq!(
        keys(&changed),
        ["device_id", "public_key", "updated_at", "user_id"],
        "{changed}"
    );
    assert_eq!(id(&changed["user_id"]), bob.id);
    assert_eq!(changed["device_id"], 2);
    assert_eq!(changed["public_key"], new_laptop.as_str());
    let listed = server
        .get(
            &format!("/v1/users/{}/devices", bob.id),
            Some(&alice.access),
        )
        .await
        .expect(200);
    assert_eq!(
        listed["devices"][1]["updated_at"], changed["updated_at"],
        "{listed}"
    );
    assert_eq!(
        directory(&server, &alice, bob.id).await,
        [(1, phone_key.clone()), (2, new_laptop.clone())]
    );
    let reply = server
        .put(
            "/v1/devices/2/key",
            Some(&laptop.access),
            json!({ "public_key": "not base64!" }),
        )
        .await;
    reply.expect_error(422, "invalid");
    assert_eq!(reply.body["error"]["field"], "public_key");

    // `PUT /v1/update-key` changes the calling device's key.
    let new_phone = public_key();
    let updated = server
        .put(
            "/v1/update-key",
            Some(&bob.access),
            json!({ "public_key": new_phone }),
        )
        .await
        .expect(200);
    assert_eq!(updated["public_key"], new_phone.as_str(), "{updated}");
    assert_eq!(keys(&updated), TODAYS_KEY_VIEW, "{updated}");
    assert_eq!(
        directory(&server, &alice, bob.id).await,
        [(1, new_phone.clone()), (2, new_laptop.clone())]
    );
    let newest_laptop = public_key();
    let updated = server
        .put(
            "/v1/update-key",
            Some(&laptop.access),
            json!({ "public_key": newest_laptop }),
        )
        .await
        .expect(200);
    assert_eq!(updated["public_key"], newest_laptop.as_str(), "{updated}");
    assert_eq!(
        directory(&server, &alice, bob.id).await,
        [(1, new_phone.clone()), (2, newest_laptop.clone())]
    );

    // Today's lookups answer the lowest-numbered device, in today's shape;
    // /v1/me the caller's.
    let by_id = server
        .get(&format!("/v1/public-key/{}", bob.id), Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(by_id["public_key"], new_phone.as_str(), "{by_id}");
    assert_eq!(keys(&by_id), TODAYS_KEY_VIEW, "{by_id}");
    let by_name = server
        .get("/v1/users/bob", Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(by_name["public_key"], new_phone.as_str(), "{by_name}");
    assert_eq!(
        keys(&by_name),
        ["id", "public_key", "username"],
        "{by_name}"
    );
    assert_eq!(own_key(&server, &laptop).await, newest_laptop);
    assert_eq!(own_key(&server, &bob).await, new_phone);
}

// ---------------------------------------------------------------------------
// Caps per device

async fn the_socket_cap_counts_per_device(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-connections-per-user", "2"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;

    let (mut phone_a, _) = WsClient::ready(&server, &bob).await;
    let (mut phone_b, _) = WsClient::ready(&server, &bob).await;
    let mut refused = WsClient::connect(&server, Some(&bob.access)).await;
    refused.expect_close(close::TOO_MANY_FOR_THE_DEVICE).await;

    // The laptop has a count of its own.
    let (mut laptop_a, _) = WsClient::ready(&server, &laptop).await;
    let (mut laptop_b, _) = WsClient::ready(&server, &laptop).await;
    let mut refused = WsClient::connect(&server, Some(&laptop.access)).await;
    refused.expect_close(close::TOO_MANY_FOR_THE_DEVICE).await;

    let sent = id(&server.send(&alice, bob.id, b"to all four").await["id"]);
    for ws in [&mut phone_a, &mut phone_b, &mut laptop_a, &mut laptop_b] {
        assert_message(
            &ws.expect_exactly("message").await,
            sent,
            alice.id,
            1,
            b"to all four",
        );
    }
}

async fn the_queue_cap_counts_per_device(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-queued-per-device", "2"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    let first = id(&server.send(&alice, bob.id, b"m1").await["id"]);
    let second = id(&server.send(&alice, bob.id, b"m2").await["id"]);

    // The phone makes room in its queue; the laptop's is still full, so
    // the next message is refused for both.
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [first, second] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 2);
    server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": bob.id, "body": b64(b"m3") }),
        )
        .await
        .expect_error(429, "queue_full");
    assert!(inbox_ids(&server, &bob).await.is_empty());
    assert_eq!(inbox_ids(&server, &laptop).await, [first, second]);

    // Once the laptop acks one, the next message reaches both.
    let delivered = server
        .put(
            &format!("/v1/messages/{first}/delivered"),
            Some(&laptop.access),
            json!({}),
        )
        .await;
    assert_eq!(delivered.status.as_u16(), 204, "{:?}", delivered.body);
    let third = id(&server.send(&alice, bob.id, b"m3").await["id"]);
    assert_eq!(inbox_ids(&server, &bob).await, [third]);
    assert_eq!(inbox_ids(&server, &laptop).await, [second, third]);
}

// ---------------------------------------------------------------------------
// Ephemeral sends

/// A send's `(device, body)` envelopes.
type Envelopes<'a> = &'a [(i64, &'a [u8])];

/// An ephemeral `send` frame with one envelope per `(device, body)`.
fn ephemeral_frame(reference: &str, to: Uuid, list: &[(i64, &[u8])]) -> Value {
    let mut frame = send_frame(reference, to, list);
    frame["ephemeral"] = json!(true);
    frame
}

/// Sends an ephemeral frame on `ws` and returns its `sent` reply, which
/// must carry the frame's ref; `delivered` is left to the caller.
async fn send_ephemeral(
    ws: &mut WsClient,
    reference: &str,
    to: Uuid,
    list: &[(i64, &[u8])],
) -> Value {
    ws.send_json(ephemeral_frame(reference, to, list)).await;
    let sent = ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], reference, "{sent}");
    sent
}

/// Asserts that a pushed frame is the ephemeral message `message_id` from
/// `from`'s device `from_device` with `expected` as its body.
#[track_caller]
fn assert_ephemeral(
    frame: &Value,
    message_id: Uuid,
    from: Uuid,
    from_device: i64,
    expected: &[u8],
) {
    assert_message(frame, message_id, from, from_device, expected);
    assert_eq!(frame["ephemeral"], true, "{frame}");
}

async fn ephemeral_envelopes_reach_each_online_device_and_are_never_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let (_, alice_laptop) = server.add_device(&alice, &public_key()).await;
    let bob = server.account("bob").await;
    let (_, bob_laptop) = server.add_device(&bob, &public_key()).await;
    // carol's devices start offline.
    let carol = server.account("carol").await;
    let (_, carol_laptop) = server.add_device(&carol, &public_key()).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut alice_laptop_ws, _) = WsClient::ready(&server, &alice_laptop).await;
    let (mut phone_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &bob_laptop).await;
    let both: [(i64, &[u8]); 2] = [(2, b"typing (laptop)"), (1, b"typing (phone)")];

    // Both of bob's devices online: each gets its own body, at once.
    let sent = send_ephemeral(&mut alice_ws, "e-bob", bob.id, &both).await;
    assert_eq!(sent["delivered"], true, "{sent}");
    let to_bob = id(&sent["id"]);
    assert_ephemeral(
        &phone_ws.expect_exactly("message").await,
        to_bob,
        alice.id,
        1,
        b"typing (phone)",
    );
    assert_ephemeral(
        &laptop_ws.expect_exactly("message").await,
        to_bob,
        alice.id,
        1,
        b"typing (laptop)",
    );

    // Envelopes that miss or add a device are refused as for a stored send,
    // with both lists, and reach nobody.
    let refused: [(&str, Envelopes, &[i64], &[i64]); 3] = [
        ("e-missing", &[(1, b"x")], &[2], &[]),
        ("e-extra", &[(1, b"x"), (2, b"x"), (5, b"x")], &[], &[5]),
        ("e-wrong", &[(2, b"x"), (5, b"x")], &[1], &[5]),
    ];
    for (reference, list, missing, extra) in refused {
        alice_ws
            .send_json(ephemeral_frame(reference, bob.id, list))
            .await;
        let error = alice_ws.expect_exactly("error").await;
        assert_eq!(error["ref"], reference, "{error}");
        assert_devices_changed(&error, missing, extra);
    }
    // From alice's laptop: the next frame each of bob's sockets sees is
    // this one, not a refused one.
    let (mut from_laptop_ws, _) = WsClient::ready(&server, &alice_laptop).await;
    let sent = send_ephemeral(&mut from_laptop_ws, "e-again", bob.id, &both).await;
    assert_eq!(sent["delivered"], true, "{sent}");
    let again = id(&sent["id"]);
    assert_ephemeral(
        &phone_ws.expect_exactly("message").await,
        again,
        alice.id,
        2,
        b"typing (phone)",
    );
    assert_ephemeral(
        &laptop_ws.expect_exactly("message").await,
        again,
        alice.id,
        2,
        b"typing (laptop)",
    );

    // To yourself: your other devices only.
    let sent = send_ephemeral(
        &mut alice_ws,
        "e-self",
        alice.id,
        &[(2, b"read up to here")],
    )
    .await;
    assert_eq!(sent["delivered"], true, "{sent}");
    let to_self = id(&sent["id"]);
    for ws in [&mut alice_laptop_ws, &mut from_laptop_ws] {
        assert_ephemeral(
            &ws.expect_exactly("message").await,
            to_self,
            alice.id,
            1,
            b"read up to here",
        );
    }
    alice_ws
        .send_json(ephemeral_frame(
            "e-self-extra",
            alice.id,
            &[(1, b"x"), (2, b"x")],
        ))
        .await;
    let error = alice_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "e-self-extra", "{error}");
    assert_devices_changed(&error, &[], &[1]);

    // No device of carol's online: not delivered. Then her laptop alone
    // is enough, and gets its own body; her phone gets nothing later.
    let to_carol: [(i64, &[u8]); 2] = [(1, b"for carol's phone"), (2, b"for carol's laptop")];
    let sent = send_ephemeral(&mut alice_ws, "e-carol-off", carol.id, &to_carol).await;
    assert_eq!(sent["delivered"], false, "{sent}");
    let (mut carol_laptop_ws, backlog) = WsClient::ready(&server, &carol_laptop).await;
    assert!(
        backlog.is_empty(),
        "an ephemeral message was kept: {backlog:?}"
    );
    let sent = send_ephemeral(&mut alice_ws, "e-carol-laptop", carol.id, &to_carol).await;
    assert_eq!(sent["delivered"], true, "{sent}");
    let to_laptop = id(&sent["id"]);
    assert_ephemeral(
        &carol_laptop_ws.expect_exactly("message").await,
        to_laptop,
        alice.id,
        1,
        b"for carol's laptop",
    );

    // Nothing of it was stored, for any device: each queue holds only the
    // stored message sent after it.
    let mut stored = Vec::new();
    for who in [&bob, &carol, &alice] {
        stored.push(id(
            &server.send(&alice_laptop, who.id, b"stored").await["id"],
        ));
    }
    for (who, expected) in [
        (&bob, stored[0]),
        (&bob_laptop, stored[0]),
        (&carol, stored[1]),
        (&carol_laptop, stored[1]),
        (&alice, stored[2]),
        (&alice_laptop, stored[2]),
    ] {
        assert_eq!(
            inbox_ids(&server, who).await,
            [expected],
            "{}",
            who.username
        );
    }
    let (_carol_phone_ws, backlog) = WsClient::ready(&server, &carol).await;
    assert_eq!(ids(&backlog), [stored[1]]);
}

// ---------------------------------------------------------------------------
// Size limits per envelope

/// The server's default `SEALPOST_MAX_BODY_BYTES`.
const MAX_BODY: usize = 65_536;
/// The server's default `SEALPOST_MAX_DEVICES_PER_USER`.
const MAX_DEVICES: i64 = 10;

async fn the_body_limit_applies_per_envelope(backend: Backend) {
    // The default limits: together, three maximal envelopes are far over
    // one body's limit (and over a request limit sized for one body).
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    let (_, tablet) = server.add_device(&bob, &public_key()).await;
    let devices = [&bob, &laptop, &tablet];
    let largest: Vec<Vec<u8>> = (0..3u8)
        .map(|n| (0..MAX_BODY).map(|i| (i % 251) as u8 ^ n).collect())
        .collect();
    let list: Vec<(i64, &[u8])> = largest
        .iter()
        .enumerate()
        .map(|(n, body)| (n as i64 + 1, body.as_slice()))
        .collect();

    // Over REST.
    let first = id(&send_envelopes(&server, &alice, bob.id, &list)
        .await
        .expect(201)["id"]);
    // And in one `send` frame.
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut tablet_ws, backlog) = WsClient::ready(&server, &tablet).await;
    assert_eq!(ids(&backlog), [first]);
    alice_ws.send_json(send_frame("big", bob.id, &list)).await;
    let sent = alice_ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "big", "{sent}");
    let second = id(&sent["id"]);
    assert_message(
        &tablet_ws.expect_exactly("message").await,
        second,
        alice.id,
        1,
        &largest[2],
    );
    for (n, device) in devices.into_iter().enumerate() {
        let inbox = server.inbox(device).await;
        assert_eq!(ids(&inbox), [first, second], "device {}", n + 1);
        for message in &inbox {
            assert_message(message, id(&message["id"]), alice.id, 1, &largest[n]);
        }
    }

    // One envelope over the limit refuses the send, for every device.
    let over = vec![7u8; MAX_BODY + 1];
    let one_over: [(i64, &[u8]); 3] = [(1, b"small"), (2, &over), (3, b"small")];
    let reply = send_envelopes(&server, &alice, bob.id, &one_over).await;
    reply.expect_error(413, "too_large");
    alice_ws
        .send_json(send_frame("one-over", bob.id, &one_over))
        .await;
    let error = alice_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "one-over", "{error}");
    assert_eq!(error["code"], "too_large", "{error}");

    // More envelopes than an account may have devices is invalid, not a
    // change of devices.
    let many: Vec<(i64, &[u8])> = (1..=MAX_DEVICES + 1).map(|d| (d, &b"x"[..])).collect();
    let reply = send_envelopes(&server, &alice, bob.id, &many).await;
    reply.expect_error(422, "invalid");
    assert_eq!(
        reply.body["error"]["field"], "envelopes",
        "{:?}",
        reply.body
    );
    alice_ws
        .send_json(send_frame("too-many", bob.id, &many))
        .await;
    let error = alice_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "too-many", "{error}");
    assert_eq!(error["code"], "invalid", "{error}");
    assert_eq!(error["field"], "envelopes", "{error}");

    // None of the refused sends stored anything.
    for device in devices {
        assert_eq!(inbox_ids(&server, device).await, [first, second]);
    }
    assert_next_is_sentinel(&server, &devices, &mut [&mut tablet_ws]).await;
}

// ---------------------------------------------------------------------------
// Adding devices and passwords

async fn adding_a_device_draws_on_the_auth_rate_limit(backend: Backend) {
    // Sign up without limits first, so the limited server sees only what
    // the test counts.
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let db = server.stop().await;
    let server = TestServer::start_on(
        db,
        &["--auth-rate-per-minute", "10", "--auth-rate-burst", "3"],
    )
    .await;

    // The burst: three attempts, answered on their merits.
    let (device, _) = server.add_device(&bob, &public_key()).await;
    assert_eq!(device, 2);
    server
        .try_add_device("bob", "not the password", &public_key(), None)
        .await
        .expect_error(401, "unauthorized");
    server.login("bob").await;

    // The fourth is refused, with the right password, and adds nothing.
    let refused = server
        .try_add_device("bob", PASSWORD, &public_key(), None)
        .await;
    refused.expect_error(429, "rate_limited");
    let wait = crate::security::retry_after(&refused);
    assert!(wait <= 6, "10 a minute refills one every 6 s, told {wait}");
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 2]);
    // Login draws on the same budget.
    server
        .post(
            "/v1/login",
            None,
            json!({ "username": "alice", "password": PASSWORD }),
        )
        .await
        .expect_error(429, "rate_limited");
    let db = server.stop().await;

    // And the other way round: logins spend the budget device additions
    // draw on.
    let server = TestServer::start_on(
        db,
        &["--auth-rate-per-minute", "10", "--auth-rate-burst", "2"],
    )
    .await;
    server.login("bob").await;
    server.login("alice").await;
    let refused = server
        .try_add_device("bob", PASSWORD, &public_key(), None)
        .await;
    refused.expect_error(429, "rate_limited");
    crate::security::retry_after(&refused);
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 2]);
    server.stop().await;
}

async fn a_password_change_from_any_device_ends_every_session_of_every_device(backend: Backend) {
    const NEW_PASSWORD: &str = "a different, longer passphrase";
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &public_key()).await;
    // A second session on each device.
    let phone_again = session(&bob, &server.login_device("bob", 1).await.expect(200));
    let laptop_again = session(&bob, &server.login_device("bob", 2).await.expect(200));
    let (mut phone_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &laptop).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let queued = id(&server.send(&alice, bob.id, b"before the change").await["id"]);

    // Changed from the laptop: a fresh session on the laptop.
    let changed = server
        .put(
            "/v1/password",
            Some(&laptop.access),
            json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
        )
        .await
        .expect(200);
    assert_eq!(changed["token_type"], "bearer", "{changed}");
    assert_eq!(changed["device_id"], 2, "{changed}");
    assert!(
        changed["expires_in"].as_u64().is_some_and(|s| s > 0),
        "{changed}"
    );
    let current = session(&bob, &changed);
    assert_eq!(me(&server, &current).await["device_id"], 2);

    // Every earlier session of every device is over, the changing one too.
    for old in [&bob, &phone_again, &laptop, &laptop_again] {
        assert_token_refused(&server, old).await;
        server
            .refresh(&old.refresh)
            .await
            .expect_error(401, "unauthorized");
    }
    phone_ws.expect_close(close::REVOKED).await;
    laptop_ws.expect_close(close::REVOKED).await;

    // The new pair is the laptop's: its socket, its queue, its refresh.
    let (_ws, ready, backlog) = WsClient::ready_with(&server, &current, "").await;
    assert_eq!(ready["device_id"], 2, "{ready}");
    assert_eq!(ids(&backlog), [queued]);
    let renewed = server.refresh(&current.refresh).await.expect(200);
    assert_eq!(renewed["device_id"], 2, "{renewed}");
    // The phone signs in again with the new password, and finds its copy.
    let phone = server
        .post(
            "/v1/login",
            None,
            json!({ "username": "bob", "password": NEW_PASSWORD, "device_id": 1 }),
        )
        .await
        .expect(200);
    assert_eq!(phone["device_id"], 1, "{phone}");
    assert_eq!(inbox_ids(&server, &session(&bob, &phone)).await, [queued]);
    server
        .login_device("bob", 1)
        .await
        .expect_error(401, "unauthorized");

    // Another account is untouched.
    me(&server, &alice).await;
    let hello = id(&server.send(&alice, alice.id, b"note").await["id"]);
    assert_message(
        &alice_ws.expect_exactly("message").await,
        hello,
        alice.id,
        1,
        b"note",
    );
}
