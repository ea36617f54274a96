//! The WebSocket protocol at its edges: refused and expiring credentials,
//! renewal, malformed and oversized frames, send errors, ephemeral sends,
//! several sockets of one user, a stalled reader, and redelivery after a
//! disconnect.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::{Event, WsClient, assert_next_is_sentinel, close};
use crate::common::{
    Account, Api, Backend, TestServer, b64, id, ids, time, token_expiring_at, unb64,
};

backend_tests!(
    bad_header_tokens_are_closed_with_4401,
    frame_auth_must_come_first_and_in_time,
    expired_tokens_are_closed_with_4401,
    a_live_socket_closes_when_its_token_expires,
    renewal_keeps_a_live_socket_open_until_the_fresh_token_expires,
    renewal_with_a_foreign_or_bad_token_is_refused_and_the_socket_stays,
    malformed_frames_get_errors_and_the_socket_stays_usable,
    too_many_malformed_frames_close_with_1008,
    an_oversized_frame_closes_with_1009,
    send_and_ack_errors_echo_the_ref_and_the_socket_stays_open,
    ephemeral_sends_reach_only_online_sockets_and_are_never_stored,
    every_socket_of_a_user_gets_the_push_and_one_ack_settles_it,
    a_stalled_reader_is_cut_off_without_slowing_others_or_losing_messages,
    an_unacked_push_is_redelivered_after_a_disconnect,
);

/// The longest a test waits for the server to notice something (an ack
/// committed, a socket gone), polling every [`POLL`].
const SETTLE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// An access token for `user` that is well formed and unexpired but signed
/// with a secret other than the server's.
fn foreign_token(user: Uuid) -> String {
    let secret = sealpost::config::Secret::new("another-secret-another-secret-0123456".into());
    let tokens = sealpost::auth::token::Tokens::new(
        &secret,
        Duration::from_secs(600),
        Duration::from_secs(600),
    );
    tokens
        .issue_access(user, 1, Uuid::new_v4(), Utc::now())
        .unwrap()
}

/// Asserts the next frame is an `error` with `code` and `reference`.
async fn expect_error(ws: &mut WsClient, reference: Option<&str>, code: &str) -> Value {
    let error = ws.expect("error").await;
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(error["ref"].as_str(), reference, "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error without a message: {error}"
    );
    error
}

/// The server is up and `who` can still open a socket.
async fn assert_alive(api: &Api, who: &Account) {
    assert_eq!(api.get("/healthz", None).await.expect(200)["status"], "ok");
    let (ws, _) = WsClient::ready(api, who).await;
    ws.close().await;
}

/// Polls `who`'s REST inbox until it is empty.
async fn until_inbox_empty(api: &Api, who: &Account) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let inbox = api.inbox(who).await;
        if inbox.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still has {} queued after {SETTLE:?}",
            who.username,
            inbox.len()
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Authentication

async fn bad_header_tokens_are_closed_with_4401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;

    let tampered = {
        let mut parts: Vec<&str> = alice.access.split('.').collect();
        parts[2] = "c2lnbmF0dXJl";
        parts.join(".")
    };
    for (what, token) in [
        ("garbage", "not.a.jwt".to_owned()),
        ("tampered signature", tampered),
        ("another secret", foreign_token(alice.id)),
        ("the refresh token", alice.refresh.clone()),
    ] {
        // The upgrade succeeds; the refusal comes on the socket.
        let mut ws = WsClient::connect(&server.api, Some(&token)).await;
        let event = ws.event().await;
        assert!(event.is(close::REFUSED), "{what}: {event:?}");
    }
    assert_alive(&server.api, &alice).await;
}

async fn frame_auth_must_come_first_and_in_time(backend: Backend) {
    let server = TestServer::start_with(backend, &["--ws-auth-timeout", "1s"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    // Nothing at all: closed once the (1 s) auth timeout passes. The default
    // timeout is 5 s, so a close within 4 s is the flag at work.
    let mut ws = WsClient::connect(&server.api, None).await;
    match ws.event_within(Duration::from_secs(4)).await {
        Some(closed @ Event::Closed(..)) => closed.assert_close(close::REFUSED),
        other => panic!("expected a 4401 close after the auth timeout, got {other:?}"),
    }

    // A first frame that is not `auth`.
    let not_auth: [(&str, Message); 5] = [
        (
            "a send",
            Message::Text(
                json!({ "type": "send", "ref": "r", "to": alice.id, "body": b64(b"hi") })
                    .to_string()
                    .into(),
            ),
        ),
        (
            "an ack",
            Message::Text(json!({ "type": "ack", "ids": [] }).to_string().into()),
        ),
        ("invalid JSON", Message::Text("{\"type\":\"auth\"".into())),
        (
            "auth without a token",
            Message::Text(json!({ "type": "auth" }).to_string().into()),
        ),
        (
            "a binary frame",
            Message::Binary(
                json!({ "type": "auth", "token": bob.access })
                    .to_string()
                    .into_bytes()
                    .into(),
            ),
        ),
    ];
    for (what, frame) in not_auth {
        let mut ws = WsClient::connect(&server.api, None).await;
        ws.send_raw(frame).await;
        let event = ws.event().await;
        assert!(event.is(close::REFUSED), "{what}: {event:?}");
    }

    // An `auth` frame with a token that does not verify.
    for token in ["not.a.jwt".to_owned(), foreign_token(bob.id)] {
        let mut ws = WsClient::connect(&server.api, None).await;
        ws.send_json(json!({ "type": "auth", "token": token }))
            .await;
        ws.event().await.assert_close(close::REFUSED);
    }

    // A valid `auth` frame (after a ping, which does not count as a frame):
    // ready for the token's user, then the backlog, then drained.
    let queued = server.send(&alice, bob.id, b"waiting for bob").await;
    let mut ws = WsClient::connect(&server.api, None).await;
    ws.send_raw(Message::Ping(b"hello".to_vec().into())).await;
    ws.send_json(json!({ "type": "auth", "token": bob.access }))
        .await;
    let ready = ws.expect("ready").await;
    assert_eq!(ready["user_id"], bob.id.to_string());
    assert!(time(&ready["expires_at"]) > Utc::now(), "{ready}");
    let backlog = ws.until_drained().await;
    assert_eq!(ids(&backlog), [id(&queued["id"])]);
    assert_eq!(
        unb64(backlog[0]["body"].as_str().unwrap()),
        b"waiting for bob"
    );

    // Once authenticated, the auth timeout no longer applies.
    ws.expect_silence(Duration::from_millis(1500)).await;
    let sent = server.send(&alice, bob.id, b"live").await;
    assert_eq!(ws.expect("message").await["id"], sent["id"]);
}

async fn expired_tokens_are_closed_with_4401(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = server.account("bob").await;
    // Tokens of bob's live session, one a minute from expiry, one a minute
    // past it: the server takes the first, so only time refuses the second.
    let live = token_expiring_at(&bob, Utc::now() + TimeDelta::minutes(1));
    server.get("/v1/me", Some(&live)).await.expect(200);
    let expired = token_expiring_at(&bob, Utc::now() - TimeDelta::minutes(1));
    server
        .get("/v1/me", Some(&expired))
        .await
        .expect_error(401, "unauthorized");

    let mut ws = WsClient::connect(&server.api, Some(&expired)).await;
    ws.expect_close(close::REFUSED).await;

    let mut ws = WsClient::connect(&server.api, None).await;
    ws.send_json(json!({ "type": "auth", "token": expired }))
        .await;
    ws.expect_close(close::REFUSED).await;

    assert_alive(&server.api, &bob).await;
}

// ---------------------------------------------------------------------------
// Expiry and renewal on a live socket
//
// The tests choose their tokens' expiry (`token_expiring_at`, signed with
// the suite's secret for a real session) instead of waiting out a short
// lifetime, so the only waits are for an expiry to pass, with margins of a
// second or more: no step depends on where in a second it runs.

/// The first whole second at least `seconds` from now (at most one more):
/// a token's `exp` is in whole seconds.
fn whole_second_in(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(Utc::now().timestamp() + seconds + 1, 0).unwrap()
}

/// Sleeps until the wall-clock time `at`, which must be near; returns at
/// once if it has passed.
async fn sleep_until(at: DateTime<Utc>) {
    let left = (at - Utc::now()).to_std().unwrap_or_default();
    assert!(left <= Duration::from_secs(10), "a wait of {left:?}");
    tokio::time::sleep(left).await;
}

async fn a_live_socket_closes_when_its_token_expires(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let exp = whole_second_in(1);
    let token = token_expiring_at(&bob, exp);
    let mut ws = WsClient::connect(&server.api, Some(&token)).await;
    let ready = ws.expect("ready").await;
    assert_eq!(time(&ready["expires_at"]), exp, "{ready}");
    assert!(ws.until_drained().await.is_empty());
    let sent = server.send(&alice, bob.id, b"before expiry").await;
    assert_eq!(ws.expect("message").await["id"], sent["id"]);

    // Closed once the token expires, and not before.
    match ws.event_within(Duration::from_secs(10)).await {
        Some(closed @ Event::Closed(..)) => closed.assert_close(close::EXPIRED),
        other => panic!("expected a 4401 close at expiry, got {other:?}"),
    }
    assert!(Utc::now() >= exp, "closed before the token's expiry {exp}");
}

async fn renewal_keeps_a_live_socket_open_until_the_fresh_token_expires(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    // Connected on a token 2-3 s from expiry, renewed at once with one an
    // hour away.
    let first_expiry = whole_second_in(2);
    let first = token_expiring_at(&bob, first_expiry);
    let mut ws = WsClient::connect(&server.api, Some(&first)).await;
    let ready = ws.expect("ready").await;
    assert_eq!(time(&ready["expires_at"]), first_expiry, "{ready}");
    assert!(ws.until_drained().await.is_empty());
    let later = whole_second_in(3600);
    ws.send_json(json!({ "type": "auth", "token": token_expiring_at(&bob, later) }))
        .await;
    let authed = ws.expect("authed").await;
    assert_eq!(time(&authed["expires_at"]), later, "{authed}");

    // A second past the first token's expiry, the socket still works.
    sleep_until(first_expiry + TimeDelta::seconds(1)).await;
    let sent = server.send(&alice, bob.id, b"after the first expiry").await;
    assert_eq!(ws.expect("message").await["id"], sent["id"]);

    // Renewed again, with a token 1-2 s from expiry: it closes then.
    let last_expiry = whole_second_in(1);
    ws.send_json(json!({ "type": "auth", "token": token_expiring_at(&bob, last_expiry) }))
        .await;
    let authed = ws.expect("authed").await;
    assert_eq!(time(&authed["expires_at"]), last_expiry, "{authed}");
    ws.expect_close(close::EXPIRED).await;
    assert!(
        Utc::now() >= last_expiry,
        "closed before the last token's expiry {last_expiry}"
    );
}

async fn renewal_with_a_foreign_or_bad_token_is_refused_and_the_socket_stays(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut ws, _) = WsClient::ready(&server.api, &bob).await;

    // Another user's valid token, a token signed with another secret, and
    // garbage: each refused with `unauthorized`, and the socket stays open.
    for token in [alice.access.clone(), foreign_token(bob.id), "x".to_owned()] {
        ws.send_json(json!({ "type": "auth", "token": token }))
            .await;
        expect_error(&mut ws, None, "unauthorized").await;
    }

    // Still bob's socket: a message to alice does not reach it, one to bob
    // does.
    server.send(&bob, alice.id, b"for alice").await;
    let sent = server.send(&alice, bob.id, b"for bob").await;
    let pushed = ws.expect("message").await;
    assert_eq!(pushed["id"], sent["id"]);
    assert_eq!(unb64(pushed["body"].as_str().unwrap()), b"for bob");

    // A valid renewal of bob's own still works after the refusals.
    let fresh = server.login("bob").await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    ws.send_json(json!({ "type": "auth", "token": fresh }))
        .await;
    let authed = ws.expect("authed").await;
    assert!(time(&authed["expires_at"]) > Utc::now());
}

// ---------------------------------------------------------------------------
// Malformed and oversized frames

async fn malformed_frames_get_errors_and_the_socket_stays_usable(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut ws, _) = WsClient::ready(&server.api, &alice).await;

    ws.send_raw(Message::Text("{\"type\":\"send\",".into()))
        .await;
    expect_error(&mut ws, None, "invalid").await;
    ws.send_message("after-garbage", bob.id, b"one").await;
    let first = ws.expect("sent").await;
    assert_eq!(first["ref"], "after-garbage");

    ws.send_json(json!({ "type": "launch", "ref": "r-unknown" }))
        .await;
    expect_error(&mut ws, Some("r-unknown"), "invalid").await;

    ws.send_raw(Message::Binary(b"\x00\x01binary".to_vec().into()))
        .await;
    expect_error(&mut ws, None, "invalid").await;

    // A known type with a missing field, and JSON that is not an object.
    ws.send_json(json!({ "type": "send", "ref": "r-missing", "to": bob.id }))
        .await;
    expect_error(&mut ws, Some("r-missing"), "invalid").await;
    ws.send_raw(Message::Text("[1,2,3]".into())).await;
    expect_error(&mut ws, None, "invalid").await;

    ws.send_message("after-all", bob.id, b"two").await;
    let second = ws.expect("sent").await;
    assert_eq!(second["ref"], "after-all");
    assert_next_is_sentinel(&server.api, &[&alice], &mut [&mut ws]).await;

    // Only the two good sends reached bob.
    assert_eq!(
        ids(&server.inbox(&bob).await),
        [id(&first["id"]), id(&second["id"])]
    );
    assert_alive(&server.api, &alice).await;
}

async fn too_many_malformed_frames_close_with_1008(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let (mut ws, _) = WsClient::ready(&server.api, &alice).await;

    for i in 0..11 {
        ws.send_raw(Message::Text(format!("garbage {i}").into()))
            .await;
    }
    // Ten are answered; the eleventh closes the socket.
    let mut errors = 0;
    loop {
        match ws.event().await {
            Event::Json(frame) => {
                assert_eq!(frame["type"], "error", "{frame}");
                assert_eq!(frame["code"], "invalid", "{frame}");
                errors += 1;
                assert!(errors <= 10, "more than 10 errors and no close");
            }
            closed => break closed.assert_close(close::TOO_MANY_MALFORMED),
        }
    }
    assert_eq!(errors, 10);

    // The count belongs to that socket: a new one starts afresh.
    assert_alive(&server.api, &alice).await;
    let (mut ws, _) = WsClient::ready(&server.api, &alice).await;
    ws.send_raw(Message::Text("garbage".into())).await;
    expect_error(&mut ws, None, "invalid").await;
    assert_next_is_sentinel(&server.api, &[&alice], &mut [&mut ws]).await;
}

async fn an_oversized_frame_closes_with_1009(backend: Backend) {
    // Few devices per multi-recipient send, so that the frame limit (room
    // for the largest multi-recipient send) stays at a single send's.
    let server = TestServer::start_with(
        backend,
        &[
            "--max-body-bytes",
            "1024",
            "--max-devices-per-send",
            "10",
            "--max-key-bytes",
            "16",
        ],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut ws, _) = WsClient::ready(&server.api, &alice).await;

    // A frame that carries a maximal body fits.
    ws.send_message("max", bob.id, &[7; 1024]).await;
    assert_eq!(ws.expect("sent").await["ref"], "max");

    // The frame limit here is 18 KiB; send 64 KiB.
    let body = b64(&vec![1; 48 * 1024]);
    let frame = json!({ "type": "send", "ref": "huge", "to": bob.id, "body": body }).to_string();
    assert!(frame.len() > 64 * 1024);
    ws.send_raw(Message::Text(frame.into())).await;
    ws.expect_close(close::TOO_BIG).await;

    assert_eq!(server.inbox(&bob).await.len(), 1);
    assert_alive(&server.api, &alice).await;
}

// ---------------------------------------------------------------------------
// Send and ack errors

async fn send_and_ack_errors_echo_the_ref_and_the_socket_stays_open(backend: Backend) {
    // Default limits: 64 KiB bodies, so a 500-id ack fits in a frame.
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut ws, _) = WsClient::ready(&server.api, &alice).await;
    let (mut bob_ws, _) = WsClient::ready(&server.api, &bob).await;

    let send = |reference: &str, to: Value, body: Value| json!({ "type": "send", "ref": reference, "to": to, "body": body });
    let too_many: Vec<String> = (0..501).map(|_| Uuid::new_v4().to_string()).collect();
    let cases = [
        (
            send("r-nobody", json!(Uuid::new_v4()), json!(b64(b"x"))),
            "not_found",
            None,
        ),
        (
            json!({ "type": "send", "ref": "r-nobody-ephemeral", "to": Uuid::new_v4(),
                    "body": b64(b"x"), "ephemeral": true }),
            "not_found",
            None,
        ),
        (
            send("r-to", json!("bob"), json!(b64(b"x"))),
            "invalid",
            Some("to"),
        ),
        (
            send("r-base64", json!(bob.id), json!("not base64!")),
            "invalid",
            Some("body"),
        ),
        (
            send("r-empty", json!(bob.id), json!("")),
            "invalid",
            Some("body"),
        ),
        (
            send("r-big", json!(bob.id), json!(b64(&vec![0; 65537]))),
            "too_large",
            None,
        ),
        (
            json!({ "type": "ack", "ref": "r-ids", "ids": too_many }),
            "invalid",
            Some("ids"),
        ),
        (
            json!({ "type": "ack", "ref": "r-id", "ids": [Uuid::new_v4().to_string(), "nope"] }),
            "invalid",
            Some("ids"),
        ),
    ];
    for (frame, code, field) in cases {
        let reference = frame["ref"].as_str().unwrap().to_owned();
        ws.send_json(frame).await;
        let error = expect_error(&mut ws, Some(&reference), code).await;
        assert_eq!(error["field"].as_str(), field, "{error}");
    }

    // 500 ids are fine and, as the ack has a ref, answered `acked` with
    // them all; a body of exactly the limit is accepted. The two answers
    // wait on different commits: either may come first.
    let five_hundred: Vec<String> = (0..500).map(|_| Uuid::new_v4().to_string()).collect();
    ws.send_json(json!({ "type": "ack", "ref": "r-500", "ids": five_hundred }))
        .await;
    ws.send_message("r-ok", bob.id, &vec![9; 65536]).await;
    let (mut sent, mut acked) = (None, None);
    for _ in 0..2 {
        let frame = ws.json().await;
        match frame["type"].as_str() {
            Some("sent") => sent = Some(frame),
            Some("acked") => acked = Some(frame),
            _ => panic!("expected sent and acked, got {frame}"),
        }
    }
    let (sent, acked) = (sent.expect("sent"), acked.expect("acked"));
    assert_eq!(sent["ref"], "r-ok");
    assert_eq!(acked["ref"], "r-500");
    assert_eq!(acked["ids"], json!(five_hundred));
    assert_next_is_sentinel(&server.api, &[&alice], &mut [&mut ws]).await;

    // Nothing but the good send reached bob.
    let pushed = bob_ws.expect("message").await;
    assert_eq!(pushed["id"], sent["id"]);
    assert_eq!(ids(&server.inbox(&bob).await), [id(&sent["id"])]);
    assert_next_is_sentinel(&server.api, &[&bob], &mut [&mut bob_ws]).await;
}

// ---------------------------------------------------------------------------
// Ephemeral sends

async fn ephemeral_sends_reach_only_online_sockets_and_are_never_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    // carol never connects.
    let carol = server.account("carol").await;
    let (mut ws, _) = WsClient::ready(&server.api, &alice).await;
    let (mut bob_ws, _) = WsClient::ready(&server.api, &bob).await;

    let ephemeral = |reference: &str, to: Uuid, body: &[u8]| json!({ "type": "send", "ref": reference, "to": to, "body": b64(body), "ephemeral": true });

    // Online: delivered, and pushed marked ephemeral.
    ws.send_json(ephemeral("e1", bob.id, b"typing")).await;
    let sent = ws.expect("sent").await;
    assert_eq!(sent["ref"], "e1");
    assert_eq!(sent["delivered"], true, "{sent}");
    let pushed = bob_ws.expect("message").await;
    assert_eq!(pushed["id"], sent["id"]);
    assert_eq!(pushed["ephemeral"], true, "{pushed}");
    assert_eq!(pushed["from"], alice.id.to_string());
    assert_eq!(unb64(pushed["body"].as_str().unwrap()), b"typing");

    // Offline: not delivered.
    ws.send_json(ephemeral("e2", carol.id, b"typing")).await;
    let sent = ws.expect("sent").await;
    assert_eq!(sent["ref"], "e2");
    assert_eq!(sent["delivered"], false, "{sent}");

    // A stored message, for contrast: no `delivered`, no `ephemeral`.
    ws.send_message("s1", bob.id, b"stored").await;
    let stored = ws.expect("sent").await;
    assert!(stored.get("delivered").is_none(), "{stored}");
    let pushed = bob_ws.expect("message").await;
    assert_eq!(pushed["id"], stored["id"]);
    assert!(pushed.get("ephemeral").is_none(), "{pushed}");

    // bob goes away without acking. Once the server has noticed, ephemeral
    // sends to him are not delivered.
    bob_ws.abandon();
    let deadline = tokio::time::Instant::now() + SETTLE;
    for attempt in 0.. {
        ws.send_json(ephemeral(&format!("e3-{attempt}"), bob.id, b"still there?"))
            .await;
        let sent = ws.expect("sent").await;
        if sent["delivered"] == false {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's abandoned socket still takes ephemeral messages after {SETTLE:?}"
        );
        tokio::time::sleep(POLL).await;
    }

    // Neither inbox nor a later drain holds an ephemeral message.
    assert_eq!(ids(&server.inbox(&bob).await), [id(&stored["id"])]);
    assert!(server.inbox(&carol).await.is_empty());
    let (_bob_ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert_eq!(ids(&backlog), [id(&stored["id"])]);
    let (_carol_ws, backlog) = WsClient::ready(&server.api, &carol).await;
    assert!(backlog.is_empty(), "{backlog:?}");
}

// ---------------------------------------------------------------------------
// Several sockets of one user

async fn every_socket_of_a_user_gets_the_push_and_one_ack_settles_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;
    let (mut phone, _) = WsClient::ready(&server.api, &bob).await;
    let (mut laptop, _) = WsClient::ready(&server.api, &bob).await;

    let sent = server.send(&alice, bob.id, b"to every device").await;
    let message_id = sent["id"].as_str().unwrap().to_owned();
    for ws in [&mut phone, &mut laptop] {
        let pushed = ws.expect("message").await;
        assert_eq!(pushed["id"], sent["id"]);
        assert_eq!(unb64(pushed["body"].as_str().unwrap()), b"to every device");
    }

    // The sender cannot settle it: her ack is ignored. Her next send is
    // committed after her ack, so once it is `sent` the ack has been applied.
    let (mut alice_ws, _) = WsClient::ready(&server.api, &alice).await;
    alice_ws.ack(&[&message_id]).await;
    alice_ws.send_message("barrier", carol.id, b"x").await;
    alice_ws.expect("sent").await;
    assert_next_is_sentinel(&server.api, &[&alice], &mut [&mut alice_ws]).await;
    assert_eq!(ids(&server.inbox(&bob).await), [id(&sent["id"])]);

    // One of bob's sockets acks it: settled for all of them.
    phone.ack(&[&message_id]).await;
    until_inbox_empty(&server.api, &bob).await;
    let (_third, backlog) = WsClient::ready(&server.api, &bob).await;
    assert!(backlog.is_empty(), "{backlog:?}");
    assert_next_is_sentinel(&server.api, &[&bob], &mut [&mut phone, &mut laptop]).await;

    // Both are still live.
    let next = server.send(&alice, bob.id, b"again").await;
    assert_eq!(phone.expect("message").await["id"], next["id"]);
    assert_eq!(laptop.expect("message").await["id"], next["id"]);
}

// ---------------------------------------------------------------------------
// A stalled reader

async fn a_stalled_reader_is_cut_off_without_slowing_others_or_losing_messages(backend: Backend) {
    // Once bob reads again he sees the close the server sent him (1013), or,
    // if his receive buffer was too full for even that frame, the end.
    match stalled_reader(backend).await {
        Event::Ended => {}
        closed => closed.assert_close(close::FELL_BEHIND),
    }
}

/// With `--ws-queue 4`, bob stops reading his socket while alice sends him
/// 150 large messages, interleaved with 150 small ones to carol, who keeps
/// reading. Checks that carol gets hers, that the server cut bob's socket
/// off, and that nothing of bob's was lost; returns how bob's socket ended.
async fn stalled_reader(backend: Backend) -> Event {
    const EACH: usize = 150;
    let server = TestServer::start_with(backend, &["--ws-queue", "4"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;

    // bob reaches `drained`, then stops reading.
    let (mut bob_ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert!(backlog.is_empty());
    // carol keeps reading, in her own task.
    let (mut carol_ws, _) = WsClient::ready(&server.api, &carol).await;
    let carol_reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(EACH);
        for _ in 0..EACH {
            let frame = carol_ws.expect("message").await;
            got.push(id(&frame["id"]));
        }
        (carol_ws, got)
    });

    let big = |i: usize| {
        let mut body = vec![0x5a; 60 * 1024];
        body[..8].copy_from_slice(&(i as u64).to_be_bytes());
        body
    };
    let (mut to_bob, mut to_carol) = (Vec::new(), Vec::new());
    for i in 0..EACH {
        to_bob.push(id(&server.send(&alice, bob.id, &big(i)).await["id"]));
        let small = format!("small {i}");
        to_carol.push(id(
            &server.send(&alice, carol.id, small.as_bytes()).await["id"],
        ));
    }

    // carol got all of hers, in order, on a socket that stayed open.
    let (mut carol_ws, got) = tokio::time::timeout(Duration::from_secs(60), carol_reader)
        .await
        .expect("carol receives her messages within 60 s")
        .expect("carol's reader");
    assert_eq!(got, to_carol);
    let last = server.send(&alice, carol.id, b"one more").await;
    assert_eq!(carol_ws.expect("message").await["id"], last["id"]);

    // bob's socket holds what was written before the server gave up on it,
    // then ends.
    let mut got = Vec::new();
    let mut end = None;
    for _ in 0..=EACH {
        match bob_ws.event().await {
            Event::Json(frame) => {
                assert_eq!(frame["type"], "message", "{frame}");
                got.push(id(&frame["id"]));
            }
            other => {
                end = Some(other);
                break;
            }
        }
    }
    let end = end.expect("bob's stalled socket did not end");
    assert!(
        got.len() < EACH,
        "the stalled socket was never cut off: it carried all {EACH}"
    );
    assert_eq!(got, to_bob[..got.len()], "pushed out of order");

    // Nothing was lost: everything is queued, in order, for bob's next
    // connection.
    let inbox = server.inbox(&bob).await;
    assert_eq!(ids(&inbox), to_bob);
    assert_eq!(
        unb64(inbox[EACH - 1]["body"].as_str().unwrap()),
        big(EACH - 1)
    );
    let (_bob_ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert_eq!(ids(&backlog), to_bob);
    end
}

// ---------------------------------------------------------------------------
// At-least-once delivery

async fn an_unacked_push_is_redelivered_after_a_disconnect(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let (mut ws, _) = WsClient::ready(&server.api, &bob).await;
    let sent = server.send(&alice, bob.id, b"ack me").await;
    let pushed = ws.expect("message").await;
    assert_eq!(pushed["id"], sent["id"]);
    ws.abandon();

    // Not acked: it comes again on the next socket, and over REST.
    let (mut ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert_eq!(ids(&backlog), [id(&sent["id"])]);
    assert_eq!(unb64(backlog[0]["body"].as_str().unwrap()), b"ack me");
    assert_eq!(backlog[0]["sent_at"], sent["sent_at"]);
    assert_eq!(ids(&server.inbox(&bob).await), [id(&sent["id"])]);

    // Acked on the socket: gone from REST and from the next drain.
    ws.ack(&[sent["id"].as_str().unwrap()]).await;
    until_inbox_empty(&server.api, &bob).await;
    assert_next_is_sentinel(&server.api, &[&bob], &mut [&mut ws]).await;
    let (_ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert!(backlog.is_empty(), "{backlog:?}");
}
