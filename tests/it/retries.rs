//! Idempotent sends (issue 16): a send repeated under its `client_id` is
//! answered with the first answer and stored once, over REST and the
//! WebSocket alike, while the first is in flight and after a restart; the
//! same key for a different send is refused.

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::backend_tests;
use crate::common::ws::{WsClient, assert_next_is_sentinel};
use crate::common::{Account, Api, Backend, TestServer, b64, id, ids};

backend_tests!(
    a_repeated_rest_send_is_answered_with_the_first_id,
    a_key_is_shared_by_rest_and_the_websocket_of_one_device,
    concurrent_repeats_store_one_message,
    a_repeat_after_a_restart_stores_nothing,
    a_repeat_of_a_delivered_send_is_not_pushed_again,
    bad_keys_are_refused_and_ephemeral_sends_ignore_them,
);

fn keyed(to: &Account, body: &[u8], client_id: &str) -> Value {
    json!({ "to": to.id, "body": b64(body), "client_id": client_id })
}

async fn post(api: &Api, from: &Account, request: &Value) -> crate::common::Reply {
    api.post("/v1/messages", Some(&from.access), request.clone())
        .await
}

async fn a_repeated_rest_send_is_answered_with_the_first_id(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    let request = keyed(&bob, b"hello", "msg-1");
    let first = post(&server, &alice, &request).await.expect(201);
    let again = post(&server, &alice, &request).await.expect(201);
    assert_eq!(again, first, "the same answer, field for field");
    assert_eq!(ids(&server.inbox(&bob).await), [id(&first["id"])]);

    // The same key for something else is refused, and stores nothing.
    post(&server, &alice, &keyed(&bob, b"changed", "msg-1"))
        .await
        .expect_error(409, "conflict");
    let carol = server.account("carol").await;
    post(&server, &alice, &keyed(&carol, b"hello", "msg-1"))
        .await
        .expect_error(409, "conflict");
    // Another key is another message; another sender's same key too.
    let second = post(&server, &alice, &keyed(&bob, b"hello", "msg-2"))
        .await
        .expect(201);
    let from_carol = post(&server, &carol, &keyed(&bob, b"hello", "msg-1"))
        .await
        .expect(201);
    assert_eq!(
        ids(&server.inbox(&bob).await),
        [id(&first["id"]), id(&second["id"]), id(&from_carol["id"])]
    );
    // A send without a key is never taken for a repeat.
    server.send(&alice, bob.id, b"hello").await;
    server.send(&alice, bob.id, b"hello").await;
    assert_eq!(server.inbox(&bob).await.len(), 5);
}

async fn a_key_is_shared_by_rest_and_the_websocket_of_one_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    let frame =
        json!({ "type": "send", "ref": "r1", "to": bob.id, "body": b64(b"hi"), "client_id": "k" });
    ws.send_json(frame.clone()).await;
    let sent = ws.expect("sent").await;
    assert_eq!(sent["ref"], "r1");
    // Repeated on the socket: the same id under the new ref.
    let mut again = frame.clone();
    again["ref"] = json!("r2");
    ws.send_json(again).await;
    let repeat = ws.expect("sent").await;
    assert_eq!(
        (repeat["ref"].clone(), repeat["id"].clone()),
        (json!("r2"), sent["id"].clone())
    );
    assert_eq!(repeat["sent_at"], sent["sent_at"]);
    // And over REST from the same device.
    let rest = post(&server, &alice, &keyed(&bob, b"hi", "k"))
        .await
        .expect(201);
    assert_eq!(rest["id"], sent["id"]);
    // A different body on the socket is an error frame naming the ref.
    ws.send_json(
        json!({ "type": "send", "ref": "r3", "to": bob.id, "body": b64(b"ho"), "client_id": "k" }),
    )
    .await;
    let refused = ws.expect("error").await;
    assert_eq!(
        (refused["ref"].clone(), refused["code"].clone()),
        (json!("r3"), json!("conflict"))
    );
    assert_eq!(server.inbox(&bob).await.len(), 1);

    // The key belongs to the device: the account's second device with the
    // same key sends a message of its own.
    let (_, phone) = server
        .add_device(&alice, &crate::common::public_key())
        .await;
    let other = post(&server, &phone, &keyed(&bob, b"hi", "k"))
        .await
        .expect(201);
    assert_ne!(other["id"], sent["id"]);
    assert_eq!(server.inbox(&bob).await.len(), 2);
}

/// Repeats sent at once, as a client retrying on several connections
/// would, all wait for the first and get its id.
async fn concurrent_repeats_store_one_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    let request = keyed(&bob, b"once", "burst");
    let answers = join_all((0..10).map(|_| post(&server, &alice, &request))).await;
    let answers: Vec<Value> = answers.into_iter().map(|r| r.expect(201)).collect();
    assert!(
        answers.iter().all(|a| a["id"] == answers[0]["id"]),
        "{answers:?}"
    );
    assert_eq!(ids(&server.inbox(&bob).await), [id(&answers[0]["id"])]);
}

async fn a_repeat_after_a_restart_stores_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    let request = keyed(&bob, b"before the restart", "k-restart");
    let first = post(&server, &alice, &request).await.expect(201);
    let db = server.stop().await;

    let server = TestServer::start_on(db, &[]).await;
    let again = post(&server, &alice, &request).await.expect(201);
    assert_eq!(again, first);
    assert_eq!(ids(&server.inbox(&bob).await), [id(&first["id"])]);
    post(
        &server,
        &alice,
        &keyed(&bob, b"something else", "k-restart"),
    )
    .await
    .expect_error(409, "conflict");
}

/// The recipient online acks the push before it is written (so its copy
/// is never stored); the repeat still finds the key, and the recipient is
/// not pushed the message a second time.
async fn a_repeat_of_a_delivered_send_is_not_pushed_again(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let request = keyed(&bob, b"hi", "k");
    let (first, pushed) = tokio::join!(post(&server, &alice, &request), async {
        let pushed = bob_ws.expect("message").await;
        bob_ws.ack(&[pushed["id"].as_str().unwrap()]).await;
        pushed
    });
    let first = first.expect(201);
    assert_eq!(pushed["id"], first["id"]);
    let again = post(&server, &alice, &request).await.expect(201);
    assert_eq!(again["id"], first["id"]);
    assert!(server.inbox(&bob).await.is_empty());
    assert_next_is_sentinel(&server, &[&bob], &mut [&mut bob_ws]).await;
}

async fn bad_keys_are_refused_and_ephemeral_sends_ignore_them(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    for bad in [
        json!(""),
        json!("has space"),
        json!("x".repeat(65)),
        json!(7),
    ] {
        let reply = post(
            &server,
            &alice,
            &json!({ "to": bob.id, "body": b64(b"x"), "client_id": bad }),
        )
        .await;
        if bad.is_string() {
            reply.expect_error(422, "invalid");
            assert_eq!(
                reply.body["error"]["field"], "client_id",
                "{:?}",
                reply.body
            );
        } else {
            assert_eq!(reply.code(), "invalid", "{:?}", reply.body);
        }
    }
    assert!(server.inbox(&bob).await.is_empty());

    // Ephemeral sends are never stored: two under one key are two pushes.
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    for reference in ["e1", "e2"] {
        ws.send_json(
            json!({ "type": "send", "ref": reference, "to": bob.id, "body": b64(b"typing"),
            "ephemeral": true, "client_id": "same" }),
        )
        .await;
        assert_eq!(ws.expect("sent").await["delivered"], true);
        bob_ws.expect("message").await;
    }
}
