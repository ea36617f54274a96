//! Issue 25's protocol changes, one test each, as protocol.md describes
//! them: a session from sign-up, who a token pair belongs to, the
//! directory's username, `acked`, when to retry a refusal, the refresh
//! grace, `devices_changed` on login and key change and `ready.devices`,
//! an empty send refused without a charge, `GET /v1/limits`, and the demo's
//! address in the start-up log.

use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{
    Account, Api, Backend, PASSWORD, Reply, ServerProcess, TestDb, TestServer, b64, device_id,
    eventually, id, public_key, session,
};

backend_tests!(
    sign_up_opens_a_session_for_one_auth_token,
    every_token_pair_names_its_account_and_device,
    the_device_directory_names_the_account,
    an_ack_with_a_ref_is_answered_once_it_is_durable,
    refusals_say_when_to_retry,
    a_socket_upgrade_refused_for_room_says_when_to_retry,
    a_refresh_replayed_within_the_grace_gets_the_same_pair,
    a_replay_after_the_grace_or_with_it_off_is_reuse,
    a_replay_once_the_successor_was_used_is_reuse,
    a_replay_racing_the_successors_rotation_leaves_no_thief_behind,
    a_login_or_key_change_tells_the_other_devices_only,
    ready_lists_the_accounts_devices,
    an_empty_send_is_refused_and_costs_nothing,
    the_limits_follow_the_configuration,
    the_demo_address_is_logged_when_the_demo_is_on,
);

/// A JSON string field of `value`, which must be there.
#[track_caller]
fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {value}"))
}

/// `POST /v1/register` for `username`; the reply, whatever it is.
async fn register(api: &Api, username: &str) -> Reply {
    api.post(
        "/v1/register",
        None,
        json!({ "username": username, "password": PASSWORD, "public_key": public_key() }),
    )
    .await
}

/// Asserts that `pair` is a token pair of `user`'s `device`, in the shape
/// of every token pair.
#[track_caller]
fn assert_pair(pair: &Value, user: Uuid, device: i64) {
    assert_eq!(pair["token_type"], "bearer", "{pair}");
    assert!(pair["expires_in"].as_u64().is_some_and(|s| s > 0), "{pair}");
    assert!(!text(pair, "access_token").is_empty(), "{pair}");
    assert!(!text(pair, "refresh_token").is_empty(), "{pair}");
    assert_eq!(id(&pair["user_id"]), user, "{pair}");
    assert_eq!(device_id(&pair["device_id"]), device, "{pair}");
}

/// `Retry-After` of a reply: whole seconds, at least one.
#[track_caller]
fn retry_after(reply: &Reply) -> u64 {
    let value = reply
        .headers
        .get("retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {} {:?}", reply.status, reply.body));
    let seconds: u64 = value.to_str().unwrap().parse().expect("whole seconds");
    assert!(seconds >= 1, "Retry-After: {seconds}");
    seconds
}

/// A plain-body `send` frame with `ref`.
fn send_frame(reference: &str, to: Uuid, body: &[u8]) -> Value {
    json!({ "type": "send", "ref": reference, "to": to, "body": b64(body) })
}

/// The ids of the `devices` array of a frame, in order.
#[track_caller]
fn devices_of(frame: &Value) -> Vec<i64> {
    frame["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices in {frame}"))
        .iter()
        .map(device_id)
        .collect()
}

/// Asserts that the next frame is a `devices_changed` about `device` for
/// `reason`, with the account's devices `devices`.
async fn expect_change(ws: &mut WsClient, device: i64, reason: &str, devices: &[i64]) {
    let frame = ws.expect_exactly("devices_changed").await;
    assert_eq!(frame["device_id"], device, "{frame}");
    assert_eq!(frame["reason"], reason, "{frame}");
    assert_eq!(devices_of(&frame), devices, "{frame}");
}

/// Sends `bob` a message from `from` and checks that each socket's next
/// frame is that message: a sentinel after something that must not have
/// arrived, so that a late frame is caught rather than outwaited.
async fn sentinel(api: &Api, from: &Account, to: &Account, sockets: &mut [&mut WsClient]) {
    let sent = api.send(from, to.id, b"sentinel").await;
    for ws in sockets.iter_mut() {
        let frame = ws.expect_exactly("message").await;
        assert_eq!(frame["id"], sent["id"], "{frame}");
    }
}

// ---------------------------------------------------------------------------
// Sign-up and token pairs

/// Sign-up answers with a session of device 1, usable at once: with an
/// auth budget of one, a sign-up then a `GET /v1/me` works, no login was
/// needed, and the budget is spent (the next auth request is refused).
async fn sign_up_opens_a_session_for_one_auth_token(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &["--auth-rate-per-minute", "1", "--auth-rate-burst", "1"],
    )
    .await;
    let reply = register(&server, "Alice").await;
    let account = reply.expect(201);
    let user = id(&account["id"]);
    assert_eq!(account["username"], "Alice", "{account}");
    assert!(!text(&account, "public_key").is_empty(), "{account}");
    assert!(!text(&account, "created_at").is_empty(), "{account}");
    assert_pair(&account, user, 1);
    let me = server
        .get("/v1/me", Some(text(&account, "access_token")))
        .await
        .expect(200);
    assert_eq!(id(&me["id"]), user, "{me}");
    assert_eq!(me["device_id"], 1, "{me}");
    // The one token was the sign-up's.
    let login = server
        .post(
            "/v1/login",
            None,
            json!({ "username": "Alice", "password": PASSWORD }),
        )
        .await;
    login.expect_error(429, "rate_limited");

    // The refresh token is a session's like any other.
    let unlimited = TestServer::start(backend).await;
    let account = register(&unlimited, "bob").await.expect(201);
    let user = id(&account["id"]);
    let renewed = unlimited
        .refresh(text(&account, "refresh_token"))
        .await
        .expect(200);
    assert_pair(&renewed, user, 1);
    unlimited
        .get("/v1/me", Some(text(&renewed, "access_token")))
        .await
        .expect(200);
}

/// Login, refresh, adding a device and a password change all say whose
/// session they opened: `user_id` and `device_id`.
async fn every_token_pair_names_its_account_and_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let login = server.login("alice").await;
    assert_pair(&login, alice.id, 1);
    let refreshed = server.refresh(&alice.refresh).await.expect(200);
    assert_pair(&refreshed, alice.id, 1);
    let added = server
        .try_add_device("alice", PASSWORD, &public_key(), None)
        .await
        .expect(201);
    assert_pair(&added, alice.id, 2);
    let laptop = session(&alice, &added);
    let changed = server
        .put(
            "/v1/password",
            Some(&laptop.access),
            json!({ "current_password": PASSWORD, "new_password": "another long passphrase" }),
        )
        .await
        .expect(200);
    assert_pair(&changed, alice.id, 2);
    // Someone else's pair names them.
    let bob = server.account("bob").await;
    assert_pair(&server.login("bob").await, bob.id, 1);
}

/// `GET /v1/users/{id}/devices` names the account as registered.
async fn the_device_directory_names_the_account(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("Alice.Smith").await;
    let bob = server.account("bob").await;
    server.add_device(&alice, &public_key()).await;
    let listed = server
        .get(
            &format!("/v1/users/{}/devices", alice.id),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(listed["username"], "Alice.Smith", "{listed}");
    assert_eq!(id(&listed["user_id"]), alice.id, "{listed}");
    let listed_ids: Vec<i64> = listed["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("no devices: {listed}"))
        .iter()
        .map(|d| device_id(&d["device_id"]))
        .collect();
    assert_eq!(listed_ids, [1, 2], "{listed}");
    let unknown = server
        .get(
            &format!("/v1/users/{}/devices", Uuid::new_v4()),
            Some(&bob.access),
        )
        .await;
    unknown.expect_error(404, "not_found");
}

// ---------------------------------------------------------------------------
// Acks

/// An ack with a `ref` is answered `acked` once durable: a read of the
/// queue after it no longer has the messages. The ids are the frame's,
/// in its order, without repeats, unknown ones included. Without a `ref`
/// there is no answer; a failure is an `error` with the ref.
async fn an_ack_with_a_ref_is_answered_once_it_is_durable(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    let mut sent = Vec::new();
    for body in [b"one" as &[u8], b"two", b"three"] {
        let reply = server.send(&bob, alice.id, body).await;
        sent.push(text(&reply, "id").to_owned());
        ws.expect_exactly("message").await;
    }
    let unknown = Uuid::now_v7().to_string();
    let upper = sent[0].to_uppercase();
    ws.send_json(json!({
        "type": "ack", "ref": "a-7",
        "ids": [&sent[1], &sent[0], &sent[1], &unknown, &upper],
    }))
    .await;
    let acked = ws.expect_exactly("acked").await;
    assert_eq!(acked["ref"], "a-7", "{acked}");
    assert_eq!(
        acked["ids"],
        json!([&sent[1], &sent[0], &unknown]),
        "{acked}"
    );
    let left: Vec<String> = server
        .inbox(&alice)
        .await
        .iter()
        .map(|m| text(m, "id").to_owned())
        .collect();
    assert_eq!(left, [sent[2].clone()], "what the ack settled is gone");

    // Without a ref: no answer. The next answer is the next ref's (an
    // empty ack, answered at once: the one before it may still be on its
    // way to the database).
    ws.ack(&[&sent[2]]).await;
    ws.send_json(json!({ "type": "ack", "ref": "after", "ids": [] }))
        .await;
    let next = ws.expect_exactly("acked").await;
    assert_eq!(next, json!({ "type": "acked", "ref": "after", "ids": [] }));
    eventually("the ack without a ref settles", async || {
        server.inbox(&alice).await.is_empty().then_some(())
    })
    .await;

    // A failure names the ref.
    let too_many: Vec<String> = (0..501).map(|_| Uuid::now_v7().to_string()).collect();
    ws.send_json(json!({ "type": "ack", "ref": "big", "ids": too_many }))
        .await;
    let error = ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "big", "{error}");
    assert_eq!(error["code"], "invalid", "{error}");
}

// ---------------------------------------------------------------------------
// When to retry

/// Rate limits and a full queue say when to retry: `Retry-After` (whole
/// seconds, at least 1) on every REST 429, `retry_after_ms` on a socket's
/// `error` frame.
async fn refusals_say_when_to_retry(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--send-rate-per-second",
            "1",
            "--send-rate-burst",
            "1",
            "--auth-rate-per-minute",
            "1",
            "--auth-rate-burst",
            "2",
        ],
    )
    .await;
    let alice = server.account("alice").await;
    // The auth budget is spent: sign-up and login.
    let refused = server.refresh(&alice.refresh).await;
    refused.expect_error(429, "rate_limited");
    retry_after(&refused);
    let bob = register(&server, "bob").await;
    bob.expect_error(429, "rate_limited");
    retry_after(&bob);

    // Sends over REST, back to back: a budget of one a second runs out at
    // the second or third. Alice writes to herself (one device, one copy).
    let mut limited = None;
    for attempt in 0..3 {
        let reply = server
            .post(
                "/v1/messages",
                Some(&alice.access),
                json!({ "to": alice.id, "body": b64(format!("{attempt}").as_bytes()) }),
            )
            .await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        reply.expect(201);
    }
    let limited = limited.expect("a budget of one a second ran out");
    limited.expect_error(429, "rate_limited");
    retry_after(&limited);

    // The same on a socket, pipelined: an error frame with the
    // milliseconds, at most the second a token takes.
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    for reference in ["s1", "s2", "s3"] {
        ws.send_json(send_frame(reference, alice.id, b"x")).await;
    }
    let mut errors = Vec::new();
    for _ in 0..3 {
        let answer = ws.json().await;
        match answer["type"].as_str() {
            Some("error") => errors.push(answer),
            Some("sent") => {}
            _ => panic!("expected sent or error, got {answer}"),
        }
    }
    assert!(
        !errors.is_empty(),
        "three sends in a breath, all within a budget of one"
    );
    for error in &errors {
        assert_eq!(error["code"], "rate_limited", "{error}");
        let wait = error["retry_after_ms"]
            .as_u64()
            .unwrap_or_else(|| panic!("no retry_after_ms: {error}"));
        assert!((1..=1000).contains(&wait), "{error}");
    }

    // A full queue: bob may hold one message in alice's queue.
    let server = TestServer::start_with(backend, &["--max-queued-per-sender", "1"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server.send(&bob, alice.id, b"one").await;
    let full = server
        .post(
            "/v1/messages",
            Some(&bob.access),
            json!({ "to": alice.id, "body": b64(b"two") }),
        )
        .await;
    full.expect_error(429, "queue_full");
    retry_after(&full);
    let (mut ws, _) = WsClient::ready(&server, &bob).await;
    ws.send_json(send_frame("q", alice.id, b"three")).await;
    let error = ws.expect_exactly("error").await;
    assert_eq!(error["code"], "queue_full", "{error}");
    assert!(
        error["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms >= 1000),
        "{error}"
    );
}

/// A WebSocket upgrade refused for room (`429 too_many_connections`) says
/// when to try again.
async fn a_socket_upgrade_refused_for_room_says_when_to_retry(backend: Backend) {
    let server =
        TestServer::start_with(backend, &["--max-unauthenticated-sockets-per-ip", "1"]).await;
    let alice = server.account("alice").await;
    // One socket waits to authenticate: the address's one slot.
    let waiting = WsClient::connect(&server, None).await;
    let url = format!("{}/v1/ws", server.base.replacen("http", "ws", 1));
    let refused = tokio_tungstenite::connect_async(url).await;
    let response = match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response,
        Err(other) => panic!("refused otherwise: {other}"),
        Ok(_) => panic!("a second waiting socket was let in"),
    };
    assert_eq!(response.status().as_u16(), 429);
    let seconds: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(seconds >= 1, "Retry-After: {seconds}");
    // A socket with a header token takes no waiting slot.
    let (ws, _) = WsClient::ready(&server, &alice).await;
    ws.close().await;
    waiting.close().await;
}

// ---------------------------------------------------------------------------
// The refresh grace

/// A refresh whose answer was lost: the token just replaced is answered
/// again, within the grace, with the same new refresh token and an access
/// token of the same session; nothing is revoked, and the new refresh
/// token works on.
async fn a_refresh_replayed_within_the_grace_gets_the_same_pair(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let other = server.login("alice").await;
    let first = server.refresh(&alice.refresh).await.expect(200);
    let again = server.refresh(&alice.refresh).await.expect(200);
    assert_eq!(again["refresh_token"], first["refresh_token"], "{again}");
    assert_pair(&again, alice.id, 1);
    let again_twice = server.refresh(&alice.refresh).await.expect(200);
    assert_eq!(again_twice["refresh_token"], first["refresh_token"]);
    // Both access tokens are of the one session, alive; the other session
    // is untouched.
    for token in [&first, &again, &other] {
        server
            .get("/v1/me", Some(text(token, "access_token")))
            .await
            .expect(200);
    }
    let (mut ws, _) = WsClient::ready(&server, &session(&alice, &again)).await;
    // The new refresh token rotates as usual, once.
    let next = server
        .refresh(text(&first, "refresh_token"))
        .await
        .expect(200);
    assert_ne!(next["refresh_token"], first["refresh_token"]);
    server
        .refresh(text(&other, "refresh_token"))
        .await
        .expect(200);
    // Nothing was revoked: the socket is still there.
    let bob = server.account("bob").await;
    sentinel(&server, &bob, &alice, &mut [&mut ws]).await;
}

/// After the grace, or with the grace off, a replay is reuse as it always
/// was: 401, and every session of the account ends. (With a grace, the same
/// replay at once is answered: the grace is what ends.)
async fn a_replay_after_the_grace_or_with_it_off_is_reuse(backend: Backend) {
    for grace in ["0", "3s"] {
        let server = TestServer::start_with(backend, &["--refresh-grace", grace]).await;
        let alice = server.account("alice").await;
        let other = server.login("alice").await;
        let first = server.refresh(&alice.refresh).await.expect(200);
        if grace != "0" {
            let again = server.refresh(&alice.refresh).await.expect(200);
            assert_eq!(again["refresh_token"], first["refresh_token"], "{again}");
            tokio::time::sleep(Duration::from_millis(3200)).await;
        }
        server
            .refresh(&alice.refresh)
            .await
            .expect_error(401, "unauthorized");
        assert_ended(&server, [&first, &other]).await;
    }
}

/// Each of these token pairs is dead: its refresh token and its access
/// token are refused, as after reuse every session of the account is.
async fn assert_ended<const N: usize>(server: &TestServer, pairs: [&Value; N]) {
    for ended in pairs {
        server
            .refresh(text(ended, "refresh_token"))
            .await
            .expect_error(401, "unauthorized");
        server
            .get("/v1/me", Some(text(ended, "access_token")))
            .await
            .expect_error(401, "unauthorized");
    }
}

/// Within the grace a replay is answered, until the successor has been
/// used: then it is reuse. A thief holding the old token cannot ride the
/// grace past the legitimate client's next refresh.
async fn a_replay_once_the_successor_was_used_is_reuse(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let other = server.login("alice").await;
    let first = server.refresh(&alice.refresh).await.expect(200);
    let again = server.refresh(&alice.refresh).await.expect(200);
    assert_eq!(again["refresh_token"], first["refresh_token"], "{again}");
    let second = server
        .refresh(text(&first, "refresh_token"))
        .await
        .expect(200);
    server
        .refresh(&alice.refresh)
        .await
        .expect_error(401, "unauthorized");
    assert_ended(&server, [&second, &other]).await;
}

/// A replay of the spent token racing the rotation of its successor, as a
/// thief and the victim might send them: either the replay came first (both
/// answered, the same successor) or the rotation did (the replay is reuse,
/// and the token the rotation produced is revoked). Never a token alive
/// after a reuse. Repeated to hit the overlap. A guard on the grace rather
/// than a test of it: without the grace every replay is the second case.
async fn a_replay_racing_the_successors_rotation_leaves_no_thief_behind(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.account("alice").await;
    for _ in 0..15 {
        let spent = text(&server.login("alice").await, "refresh_token").to_owned();
        let current = server.refresh(&spent).await.expect(200);
        let current = text(&current, "refresh_token").to_owned();
        let (rotation, replay) = tokio::join!(server.refresh(&current), server.refresh(&spent));
        match replay.status.as_u16() {
            200 => {
                // The replay came first: it got the successor, which the
                // rotation then spent.
                assert_eq!(text(&replay.body, "refresh_token"), current);
                let rotated = rotation.expect(200);
                server
                    .refresh(text(&rotated, "refresh_token"))
                    .await
                    .expect(200);
            }
            _ => {
                replay.expect_error(401, "unauthorized");
                if rotation.status == 200 {
                    server
                        .refresh(text(&rotation.body, "refresh_token"))
                        .await
                        .expect_error(401, "unauthorized");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Devices changed

/// A login as an existing device and a key change reach the account's other
/// devices as `devices_changed` naming the device and why, never the device
/// itself; adding and removing say so too.
async fn a_login_or_key_change_tells_the_other_devices_only(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&alice, &public_key()).await;
    let (mut phone_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &laptop).await;

    // A login as the laptop, with the password.
    server.login_device("alice", 2).await.expect(200);
    expect_change(&mut phone_ws, 2, "login", &[1, 2]).await;
    sentinel(&server, &bob, &alice, &mut [&mut laptop_ws, &mut phone_ws]).await;

    // The phone changes its key; then the laptop, the old way.
    server
        .put(
            "/v1/devices/1/key",
            Some(&alice.access),
            json!({ "public_key": public_key() }),
        )
        .await
        .expect(200);
    expect_change(&mut laptop_ws, 1, "key", &[1, 2]).await;
    server
        .put(
            "/v1/update-key",
            Some(&laptop.access),
            json!({ "public_key": public_key() }),
        )
        .await
        .expect(200);
    expect_change(&mut phone_ws, 2, "key", &[1, 2]).await;
    sentinel(&server, &bob, &alice, &mut [&mut laptop_ws, &mut phone_ws]).await;

    // Adding and removing name the device too.
    let (tablet_id, _) = server.add_device(&alice, &public_key()).await;
    for ws in [&mut phone_ws, &mut laptop_ws] {
        expect_change(ws, tablet_id, "added", &[1, 2, tablet_id]).await;
    }
    server
        .delete(
            &format!("/v1/devices/{tablet_id}"),
            Some(&alice.access),
            json!({ "password": PASSWORD }),
        )
        .await
        .expect(204);
    for ws in [&mut phone_ws, &mut laptop_ws] {
        expect_change(ws, tablet_id, "removed", &[1, 2]).await;
    }
    sentinel(&server, &bob, &alice, &mut [&mut laptop_ws, &mut phone_ws]).await;
}

/// `ready` carries the account's device ids, ascending.
async fn ready_lists_the_accounts_devices(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let (_, ready, _) = WsClient::ready_with(&server, &alice, "").await;
    assert_eq!(devices_of(&ready), [1], "{ready}");
    let (_, laptop) = server.add_device(&alice, &public_key()).await;
    server.add_device(&alice, &public_key()).await;
    server
        .delete(
            "/v1/devices/2",
            Some(&alice.access),
            json!({ "password": PASSWORD }),
        )
        .await
        .expect(204);
    server.add_device(&alice, &public_key()).await;
    let (_, ready, _) = WsClient::ready_with(&server, &alice, "").await;
    assert_eq!(devices_of(&ready), [1, 3, 4], "{ready}");
    assert_eq!(ready["device_id"], 1, "{ready}");
    // The removed laptop's session ended with it.
    server
        .get("/v1/me", Some(&laptop.access))
        .await
        .expect_error(401, "unauthorized");
}

// ---------------------------------------------------------------------------
// Empty sends

/// `envelopes: []`, on REST and on a socket, costs no token of the send or
/// pair budget (with a burst of one, a real send after it goes through):
/// to yourself from your only device it reaches no device, `422` naming
/// `envelopes`; to an account with devices it misses them all, `409
/// devices_changed` listing them, as it always was (how a client with a
/// stale device list learns of the devices it missed).
async fn an_empty_send_is_refused_and_costs_nothing(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--send-rate-per-second",
            "1",
            "--send-rate-burst",
            "1",
            "--pair-rate-per-second",
            "1",
            "--pair-rate-burst",
            "1",
        ],
    )
    .await;
    let bob = server.account("bob").await;
    // Over REST, to bob and to herself (her only device).
    let alice = server.account("alice").await;
    let reply = server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": alice.id, "envelopes": [] }),
        )
        .await;
    reply.expect_error(422, "invalid");
    assert_eq!(
        reply.body["error"]["field"], "envelopes",
        "{:?}",
        reply.body
    );
    let reply = server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": bob.id, "envelopes": [] }),
        )
        .await;
    reply.expect_error(409, "devices_changed");
    assert_eq!(
        reply.body["error"]["missing"],
        json!([1]),
        "{:?}",
        reply.body
    );
    server.send(&alice, bob.id, b"real").await;

    // On a socket, another sender with a budget of its own.
    let carol = server.account("carol").await;
    let (mut ws, _) = WsClient::ready(&server, &carol).await;
    for (to, code) in [(carol.id, "invalid"), (bob.id, "devices_changed")] {
        ws.send_json(json!({ "type": "send", "ref": "empty", "to": to, "envelopes": [] }))
            .await;
        let error = ws.expect_exactly("error").await;
        assert_eq!(error["ref"], "empty", "{error}");
        assert_eq!(error["code"], code, "{error}");
        if code == "invalid" {
            assert_eq!(error["field"], "envelopes", "{error}");
        } else {
            assert_eq!(error["missing"], json!([1]), "{error}");
        }
    }
    ws.send_json(send_frame("real", bob.id, b"real")).await;
    let sent = ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "real", "{sent}");
    assert_eq!(
        server.inbox(&bob).await.len(),
        2,
        "both real sends, nothing else"
    );
}

// ---------------------------------------------------------------------------
// Limits

/// `GET /v1/limits`, without a token, says what the configuration says.
async fn the_limits_follow_the_configuration(backend: Backend) {
    let server = TestServer::start(backend).await;
    let limits = server.get("/v1/limits", None).await.expect(200);
    assert_eq!(
        limits,
        json!({
            "max_body_bytes": 65536, "max_devices_per_user": 10,
            "max_request_body_bytes": 878576, "max_ids_per_ack": 500,
            "max_multi_request_body_bytes": 2291480, "max_recipients_per_send": 1000,
            "max_devices_per_send": 5000, "max_key_bytes": 256,
            "max_messages_per_page": 500, "max_ref_bytes": 128,
            "access_token_ttl_seconds": 1800, "message_ttl_seconds": 604800
        })
    );
    let db = server.stop().await;
    let server = TestServer::start_on(
        db,
        &[
            "--max-body-bytes",
            "30000",
            "--max-devices-per-user",
            "3",
            "--access-token-ttl",
            "10m",
            "--message-ttl",
            "1d",
            "--max-devices-per-send",
            "1000",
            "--max-key-bytes",
            "64",
        ],
    )
    .await;
    let limits = server.get("/v1/limits", None).await.expect(200);
    // 3 devices × (base64 of 30,000 bytes + 64) + 4 KiB.
    let request = 3 * (30_000 / 3 * 4 + 64) + 4096;
    assert_eq!(limits["max_body_bytes"], 30000, "{limits}");
    assert_eq!(limits["max_devices_per_user"], 3, "{limits}");
    assert_eq!(limits["max_request_body_bytes"], request, "{limits}");
    // The shared body's base64, 1,000 × (a 64-byte key's base64 + 96),
    // 4 KiB: more than the single send's limit.
    let multi = 30_000 / 3 * 4 + 1000 * (88 + 96) + 4096;
    assert!(multi > request);
    assert_eq!(limits["max_multi_request_body_bytes"], multi, "{limits}");
    assert_eq!(limits["max_devices_per_send"], 1000, "{limits}");
    assert_eq!(limits["max_key_bytes"], 64, "{limits}");
    assert_eq!(limits["access_token_ttl_seconds"], 600, "{limits}");
    assert_eq!(limits["message_ttl_seconds"], 86400, "{limits}");
    // And the server enforces what it says: one byte over is refused.
    let alice = server.account("alice").await;
    let over = server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": alice.id, "body": b64(&vec![7; 30_001]) }),
        )
        .await;
    over.expect_error(413, "too_large");
    server.send(&alice, alice.id, &vec![7; 30_000]).await;
}

// ---------------------------------------------------------------------------
// The demo's address

/// With the demo on, the server logs where a browser finds it; with it
/// off, it does not.
async fn the_demo_address_is_logged_when_the_demo_is_on(backend: Backend) {
    let db = TestDb::new(backend).await;
    let on = ServerProcess::spawn(&db.url, &[("SEALPOST_DEMO", "true")]);
    let url = format!("{}/demo/", on.api.base);
    let logged = eventually("the demo's address in the log", async || {
        let lines = on.log_lines("demo page at");
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert!(
        logged.iter().any(|line| line.contains(&url)),
        "{logged:?} does not name {url}"
    );
    // The address serves the page.
    let page = on.api.http.get(&url).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    drop(on);

    let off = ServerProcess::spawn(&db.url, &[]);
    // A sentinel: a line logged after start-up, once it is read, every line
    // of start-up has been.
    off.register("carol").await;
    off.login("carol").await;
    eventually("the login in the log", async || {
        (!off.log_lines("logged in").is_empty()).then_some(())
    })
    .await;
    assert_eq!(off.log_lines("demo page at"), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// In a cluster

/// Several nodes on one database: a device notice made on one node reaches
/// the account's sockets on another with its device and reason, and a
/// refresh replayed within the grace on another node than the one that
/// rotated it gets the same pair (successors are derived from the shared
/// secret, not kept by a node).
#[cfg(sealpost_pg_tests)]
mod cluster {
    use serde_json::json;

    use super::{assert_pair, expect_change, sentinel, text};
    use crate::common::cluster::Cluster;
    use crate::common::public_key;
    use crate::common::ws::WsClient;

    /// What reaches another node gets there through NATS, not the
    /// database's revocation poll.
    const NO_POLL: &[&str] = &["--revocation-poll-interval", "1h"];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn device_notices_and_the_refresh_grace_cross_nodes() {
        let cluster = Cluster::start(2, NO_POLL).await;
        let (a, b) = (&cluster[0], &cluster[1]);
        let alice = a.account("alice").await;
        let bob = a.account("bob").await;
        let (_, laptop) = b.add_device(&alice, &public_key()).await;
        let (mut phone_ws, ready, _) = WsClient::ready_with(a, &alice, "").await;
        assert_eq!(ready["devices"], json!([1, 2]), "{ready}");
        let (mut laptop_ws, _) = WsClient::ready(b, &laptop).await;

        // A login as the phone on A reaches the laptop on B, a key change
        // of the laptop on B the phone on A; neither reaches the device it
        // is about.
        a.login_device("alice", 1).await.expect(200);
        expect_change(&mut laptop_ws, 1, "login", &[1, 2]).await;
        b.put(
            "/v1/update-key",
            Some(&laptop.access),
            json!({ "public_key": public_key() }),
        )
        .await
        .expect(200);
        expect_change(&mut phone_ws, 2, "key", &[1, 2]).await;
        sentinel(a, &bob, &alice, &mut [&mut phone_ws, &mut laptop_ws]).await;

        // Rotated on A, replayed on B within the grace: the same pair.
        let first = a.refresh(&alice.refresh).await.expect(200);
        let again = b.refresh(&alice.refresh).await.expect(200);
        assert_eq!(again["refresh_token"], first["refresh_token"], "{again}");
        assert_pair(&again, alice.id, 1);
        // Once the successor is used on B, a replay on A is reuse.
        b.refresh(text(&first, "refresh_token")).await.expect(200);
        a.refresh(&alice.refresh)
            .await
            .expect_error(401, "unauthorized");
        cluster.stop().await;
    }
}
