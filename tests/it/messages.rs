//! The message queue over REST: send, poll with cursors, acknowledge.

use std::collections::HashSet;

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{Account, Backend, TestServer, b64, id, ids, keys, time, unb64};

backend_tests!(
    pages_stop_at_four_mebibytes_of_bodies,
    send_then_poll_round_trips,
    send_rejects_bad_requests,
    send_requires_a_token,
    body_size_limit_is_exact,
    sender_cannot_be_spoofed,
    pages_follow_send_order,
    paging_parameters_are_validated,
    inboxes_are_private,
    delivered_removes_one_message,
    delivered_only_settles_own_messages,
    batch_ack_counts_only_own_queued_ids,
    batch_ack_limits_and_validation,
    concurrent_sends_get_distinct_ordered_ids,
);

/// Pages through `who`'s queue `limit` at a time, checking each page's size
/// and cursor.
async fn page_through(server: &TestServer, who: &Account, limit: u32) -> Vec<Value> {
    let mut all = Vec::new();
    let mut path = format!("/v1/messages?limit={limit}");
    loop {
        let page = server.get(&path, Some(&who.access)).await.expect(200);
        assert_eq!(keys(&page), ["messages", "next"], "{page}");
        let messages = page["messages"].as_array().unwrap().clone();
        assert!(messages.len() <= limit as usize);
        all.extend(messages.iter().cloned());
        if page["next"].is_null() {
            return all;
        }
        // A page with a cursor after it is full, and the cursor is its last id.
        assert_eq!(messages.len(), limit as usize, "short page before the end");
        assert_eq!(page["next"], messages.last().unwrap()["id"]);
        path = format!("/v1/messages?limit={limit}&after={}", id(&page["next"]));
    }
}

async fn send_then_poll_round_trips(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let body: Vec<u8> = (0..=255).collect();

    let before = Utc::now() - TimeDelta::seconds(1);
    let sent = server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": bob.id, "body": b64(&body) }),
        )
        .await
        .expect(201);
    let after = Utc::now() + TimeDelta::seconds(1);
    assert_eq!(keys(&sent), ["id", "sent_at", "to"]);
    assert_eq!(sent["to"], bob.id.to_string());
    let message_id = id(&sent["id"]);
    assert_eq!(message_id.get_version_num(), 7, "ids are UUIDv7");
    let sent_at = time(&sent["sent_at"]);
    assert!(before <= sent_at && sent_at <= after, "{sent_at}");

    let page = server
        .get("/v1/messages", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(page["next"], Value::Null);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 1, "{page}");
    let got = &messages[0];
    assert_eq!(keys(got), ["body", "from", "from_device", "id", "sent_at"]);
    assert_eq!(got["from_device"], 1);
    assert_eq!(id(&got["id"]), message_id);
    assert_eq!(id(&got["from"]), alice.id);
    assert_eq!(unb64(got["body"].as_str().unwrap()), body);
    assert_eq!(time(&got["sent_at"]), sent_at);

    // Polling does not consume: the message stays until acknowledged.
    assert_eq!(ids(&server.inbox(&bob).await), [message_id]);
    // The sender's own queue is empty.
    assert!(server.inbox(&alice).await.is_empty());

    // Sending to oneself is an ordinary message.
    let own = server.send(&bob, bob.id, b"note to self").await;
    let inbox = server.inbox(&bob).await;
    assert_eq!(ids(&inbox), [message_id, id(&own["id"])]);
    assert_eq!(id(&inbox[1]["from"]), bob.id);
}

async fn send_rejects_bad_requests(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let body = b64(b"hello");

    for to in [Uuid::new_v4(), Uuid::nil(), Uuid::now_v7()] {
        let reply = server
            .post(
                "/v1/messages",
                Some(&alice.access),
                json!({ "to": to, "body": body }),
            )
            .await;
        reply.expect_error(404, "not_found");
    }

    let cases = [
        (json!({ "to": "bob", "body": body }), "to"),
        (json!({ "to": "", "body": body }), "to"),
        (json!({ "to": format!("{}x", bob.id), "body": body }), "to"),
        (json!({ "to": 42, "body": body }), "to"),
        (json!({ "body": body }), "to"),
        (json!({ "to": bob.id, "body": "not base64!" }), "body"),
        (json!({ "to": bob.id, "body": "aGVsbG8" }), "body"),
        (json!({ "to": bob.id, "body": "aGVs_G8=" }), "body"),
        (json!({ "to": bob.id, "body": "" }), "body"),
        (json!({ "to": bob.id, "body": null }), "body"),
        (json!({ "to": bob.id, "body": [1, 2, 3] }), "body"),
        (json!({ "to": bob.id }), "body"),
    ];
    for (request, field) in cases {
        let reply = server
            .post("/v1/messages", Some(&alice.access), request.clone())
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], field, "for {request}");
    }
    // None of them queued anything.
    assert!(server.inbox(&bob).await.is_empty());
}

async fn send_requires_a_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let request = json!({ "to": bob.id, "body": b64(b"hello") });
    for token in [None, Some("not.a.jwt"), Some(alice.refresh.as_str())] {
        let reply = server.post("/v1/messages", token, request.clone()).await;
        reply.expect_error(401, "unauthorized");
        assert_eq!(reply.headers["www-authenticate"], "Bearer");
    }
    server
        .get("/v1/messages", None)
        .await
        .expect_error(401, "unauthorized");
    assert!(server.inbox(&bob).await.is_empty());
}

async fn body_size_limit_is_exact(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-body-bytes", "1024"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let largest: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    let sent = server.send(&alice, bob.id, &largest).await;
    let smallest = server.send(&alice, bob.id, &[0]).await;

    for size in [1025, 1026, 2000, 12_000, 100_000] {
        let reply = server
            .post(
                "/v1/messages",
                Some(&alice.access),
                json!({ "to": bob.id, "body": b64(&vec![9u8; size]) }),
            )
            .await;
        reply.expect_error(413, "too_large");
        assert!(reply.body["error"].get("field").is_none(), "{size}");
    }
    // An over-long body is refused for its size before it is decoded.
    server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": bob.id, "body": "!".repeat(2000) }),
        )
        .await
        .expect_error(413, "too_large");

    let inbox = server.inbox(&bob).await;
    assert_eq!(ids(&inbox), [id(&sent["id"]), id(&smallest["id"])]);
    assert_eq!(unb64(inbox[0]["body"].as_str().unwrap()), largest);
    assert_eq!(unb64(inbox[1]["body"].as_str().unwrap()), [0]);
}

async fn sender_cannot_be_spoofed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let mallory = server.account("mallory").await;

    let sent = server
        .post(
            "/v1/messages",
            Some(&mallory.access),
            json!({
                "to": bob.id,
                "body": b64(b"trust me"),
                "from": alice.id,
                "sender": alice.id,
                "id": Uuid::nil(),
                "sent_at": "2000-01-01T00:00:00Z",
            }),
        )
        .await
        .expect(201);
    assert_ne!(id(&sent["id"]), Uuid::nil());

    let inbox = server.inbox(&bob).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(id(&inbox[0]["from"]), mallory.id);
    assert_eq!(id(&inbox[0]["id"]), id(&sent["id"]));
    assert_eq!(inbox[0]["sent_at"], sent["sent_at"]);
    assert!(time(&inbox[0]["sent_at"]) > Utc::now() - TimeDelta::minutes(5));
}

async fn pages_follow_send_order(backend: Backend) {
    const COUNT: usize = 260;
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let carol = server.account("carol").await;
    let bob = server.account("bob").await;

    // (id, sender, body, sent_at) in acceptance order.
    let mut sent = Vec::with_capacity(COUNT);
    for i in 0..COUNT {
        let from = if i % 2 == 0 { &alice } else { &carol };
        let body = format!("message {i:04}").into_bytes();
        let reply = server.send(from, bob.id, &body).await;
        sent.push((id(&reply["id"]), from.id, body, reply["sent_at"].clone()));
    }
    let sent_ids: Vec<Uuid> = sent.iter().map(|s| s.0).collect();
    assert!(
        sent_ids.windows(2).all(|w| w[0] < w[1]),
        "ids increase in acceptance order"
    );

    for limit in [100, 7, 130, COUNT as u32, 500] {
        let all = page_through(&server, &bob, limit).await;
        assert_eq!(all.len(), COUNT, "limit={limit}");
        for (got, (sent_id, from, body, sent_at)) in all.iter().zip(&sent) {
            assert_eq!(id(&got["id"]), *sent_id, "limit={limit}");
            assert_eq!(id(&got["from"]), *from, "limit={limit}");
            assert_eq!(unb64(got["body"].as_str().unwrap()), *body);
            assert_eq!(time(&got["sent_at"]), time(sent_at));
        }
    }

    // The default page is 100.
    let first = server
        .get("/v1/messages", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(ids(first["messages"].as_array().unwrap()), sent_ids[..100]);
    assert_eq!(id(&first["next"]), sent_ids[99]);

    // Any id works as a cursor, queued or not.
    let mid = server
        .get(
            &format!("/v1/messages?limit=3&after={}", sent_ids[41]),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(ids(mid["messages"].as_array().unwrap()), sent_ids[42..45]);
    let start = server
        .get(
            &format!("/v1/messages?limit=2&after={}", Uuid::nil()),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(ids(start["messages"].as_array().unwrap()), sent_ids[..2]);
    let end = server
        .get(
            &format!("/v1/messages?after={}", Uuid::max()),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(end, json!({ "messages": [], "next": null }));
    let last = server
        .get(
            &format!("/v1/messages?limit=5&after={}", sent_ids[COUNT - 2]),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(
        ids(last["messages"].as_array().unwrap()),
        sent_ids[COUNT - 1..]
    );
    assert_eq!(last["next"], Value::Null);
}

async fn paging_parameters_are_validated(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server.send(&alice, bob.id, b"hello").await;

    // Out of range: a validation error naming the parameter.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=100000", "limit"),
        ("after=not-a-uuid", "after"),
        ("after=", "after"),
        ("limit=10&after=123", "after"),
    ] {
        let reply = server
            .get(&format!("/v1/messages?{query}"), Some(&bob.access))
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], field, "{query}");
    }
    // Numbers out of range, however large: 422 naming `limit`.
    for query in ["limit=-1", "limit=4294967296"] {
        let reply = server
            .get(&format!("/v1/messages?{query}"), Some(&bob.access))
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "limit", "{query}");
    }
    // Not a whole number at all: a malformed query.
    for query in ["limit=abc", "limit=1.5", "limit="] {
        server
            .get(&format!("/v1/messages?{query}"), Some(&bob.access))
            .await
            .expect_error(400, "invalid");
    }
    // The bounds themselves are fine.
    for query in ["limit=1", "limit=500"] {
        let page = server
            .get(&format!("/v1/messages?{query}"), Some(&bob.access))
            .await
            .expect(200);
        assert_eq!(page["messages"].as_array().unwrap().len(), 1);
    }
}

async fn inboxes_are_private(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;

    let mut to_bob = Vec::new();
    let mut to_carol = Vec::new();
    for i in 0..10u8 {
        to_bob.push(id(&server.send(&alice, bob.id, &[b'b', i]).await["id"]));
        to_carol.push(id(&server.send(&alice, carol.id, &[b'c', i]).await["id"]));
    }
    let bob_inbox = server.inbox(&bob).await;
    assert_eq!(ids(&bob_inbox), to_bob);
    assert!(
        bob_inbox
            .iter()
            .all(|m| unb64(m["body"].as_str().unwrap())[0] == b'b')
    );
    assert_eq!(ids(&server.inbox(&carol).await), to_carol);
    assert!(server.inbox(&alice).await.is_empty());

    // A cursor taken from someone else's queue reveals nothing of it.
    let page = server
        .get(
            &format!("/v1/messages?limit=500&after={}", to_carol[0]),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(ids(page["messages"].as_array().unwrap()), to_bob[1..]);
}

async fn delivered_removes_one_message(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let first = id(&server.send(&alice, bob.id, b"one").await["id"]);
    let second = id(&server.send(&alice, bob.id, b"two").await["id"]);

    let reply = server
        .put(
            &format!("/v1/messages/{first}/delivered"),
            Some(&bob.access),
            json!({}),
        )
        .await;
    assert_eq!(reply.status.as_u16(), 204, "{:?}", reply.body);
    assert_eq!(reply.body, Value::Null, "204 has no body");
    assert_eq!(ids(&server.inbox(&bob).await), [second]);

    // Settled once and for all.
    server
        .put(
            &format!("/v1/messages/{first}/delivered"),
            Some(&bob.access),
            json!({}),
        )
        .await
        .expect_error(404, "not_found");
    assert_eq!(ids(&server.inbox(&bob).await), [second]);

    server
        .put(
            &format!("/v1/messages/{second}/delivered"),
            Some(&bob.access),
            json!({}),
        )
        .await
        .expect(204);
    assert!(server.inbox(&bob).await.is_empty());
    // An id that never existed.
    server
        .put(
            &format!("/v1/messages/{}/delivered", Uuid::now_v7()),
            Some(&bob.access),
            json!({}),
        )
        .await
        .expect_error(404, "not_found");
}

async fn delivered_only_settles_own_messages(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let mallory = server.account("mallory").await;
    let message = id(&server.send(&alice, bob.id, b"for bob").await["id"]);

    // Neither a third party nor the sender can settle bob's message.
    for other in [&mallory, &alice] {
        server
            .put(
                &format!("/v1/messages/{message}/delivered"),
                Some(&other.access),
                json!({}),
            )
            .await
            .expect_error(404, "not_found");
    }
    assert_eq!(ids(&server.inbox(&bob).await), [message]);

    server
        .put(
            &format!("/v1/messages/{message}/delivered"),
            None,
            json!({}),
        )
        .await
        .expect_error(401, "unauthorized");
    for bad in ["not-a-uuid", "1", "%27%3B%20DELETE%20FROM%20messages%3B--"] {
        let reply = server
            .put(
                &format!("/v1/messages/{bad}/delivered"),
                Some(&bob.access),
                json!({}),
            )
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "id", "{bad}");
    }
    assert_eq!(ids(&server.inbox(&bob).await), [message]);
}

async fn batch_ack_counts_only_own_queued_ids(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let mut mine = Vec::new();
    for i in 0..5u8 {
        mine.push(id(&server.send(&alice, bob.id, &[i]).await["id"]));
    }
    let alices = id(&server.send(&bob, alice.id, b"for alice").await["id"]);
    // mine[0] is already settled.
    server
        .put(
            &format!("/v1/messages/{}/delivered", mine[0]),
            Some(&bob.access),
            json!({}),
        )
        .await
        .expect(204);

    let request = json!({ "ids": [
        mine[1], mine[2], mine[0], alices, Uuid::new_v4(),
        mine[1], mine[1], mine[2].to_string().to_uppercase(), mine[3],
    ] });
    let acked = server
        .post("/v1/messages/ack", Some(&bob.access), request.clone())
        .await
        .expect(200);
    assert_eq!(acked, json!({ "acked": 3 }));
    assert_eq!(ids(&server.inbox(&bob).await), [mine[4]]);
    // Alice's message was not touched.
    assert_eq!(ids(&server.inbox(&alice).await), [alices]);

    // The same request again settles nothing more.
    let again = server
        .post("/v1/messages/ack", Some(&bob.access), request)
        .await
        .expect(200);
    assert_eq!(again, json!({ "acked": 0 }));

    let empty = server
        .post("/v1/messages/ack", Some(&bob.access), json!({ "ids": [] }))
        .await
        .expect(200);
    assert_eq!(empty, json!({ "acked": 0 }));

    // Settled ids never come back, whatever the cursor.
    for path in [
        "/v1/messages".to_owned(),
        format!("/v1/messages?limit=500&after={}", Uuid::nil()),
        format!("/v1/messages?limit=1&after={}", mine[0]),
    ] {
        let page = server.get(&path, Some(&bob.access)).await.expect(200);
        assert_eq!(
            ids(page["messages"].as_array().unwrap()),
            [mine[4]],
            "{path}"
        );
    }

    let last = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [mine[4]] }),
        )
        .await
        .expect(200);
    assert_eq!(last, json!({ "acked": 1 }));
    assert!(server.inbox(&bob).await.is_empty());
}

async fn batch_ack_limits_and_validation(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let queued = id(&server.send(&alice, bob.id, b"keep me").await["id"]);

    // 500 ids is the most one request may carry.
    let mut ids_500: Vec<String> = (0..499).map(|_| Uuid::new_v4().to_string()).collect();
    ids_500.push(queued.to_string());
    let mut ids_501 = ids_500.clone();
    ids_501.push(Uuid::new_v4().to_string());
    let reply = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": ids_501 }),
        )
        .await;
    reply.expect_error(422, "invalid");
    assert_eq!(reply.body["error"]["field"], "ids");
    // Refused whole: the queued id in it was not settled.
    assert_eq!(ids(&server.inbox(&bob).await), [queued]);

    // One malformed id refuses the whole request too.
    for bad in [
        json!({ "ids": [queued, "not-a-uuid"] }),
        json!({ "ids": [queued, 7] }),
        json!({ "ids": queued }),
        json!({ "ids": null }),
        json!({}),
    ] {
        let reply = server
            .post("/v1/messages/ack", Some(&bob.access), bad.clone())
            .await;
        reply.expect_error(422, "invalid");
        let field = reply.body["error"]["field"].as_str().unwrap_or_default();
        assert!(field.starts_with("ids"), "{bad}: {:?}", reply.body);
    }
    assert_eq!(ids(&server.inbox(&bob).await), [queued]);

    server
        .post("/v1/messages/ack", None, json!({ "ids": [queued] }))
        .await
        .expect_error(401, "unauthorized");
    assert_eq!(ids(&server.inbox(&bob).await), [queued]);

    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": ids_500 }),
        )
        .await
        .expect(200);
    assert_eq!(acked, json!({ "acked": 1 }));
    assert!(server.inbox(&bob).await.is_empty());
}

async fn concurrent_sends_get_distinct_ordered_ids(backend: Backend) {
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 10;
    let server = TestServer::start(backend).await;
    let bob = server.account("bob").await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        senders.push(server.account(&format!("sender{i}")).await);
    }

    let mut tasks = JoinSet::new();
    for n in 0..SENDERS * PER_SENDER {
        let api = server.api.clone();
        let from = senders[n % SENDERS].clone();
        let to = bob.id;
        tasks.spawn(async move {
            let body = format!("concurrent {n}").into_bytes();
            let reply = api
                .post(
                    "/v1/messages",
                    Some(&from.access),
                    json!({ "to": to, "body": b64(&body) }),
                )
                .await;
            (from.id, body, reply)
        });
    }
    let mut sent = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (from, body, reply) = joined.expect("send task");
        let reply = reply.expect(201);
        sent.push((id(&reply["id"]), from, body, reply["sent_at"].clone()));
    }
    assert_eq!(sent.len(), SENDERS * PER_SENDER);
    let distinct: HashSet<Uuid> = sent.iter().map(|s| s.0).collect();
    assert_eq!(distinct.len(), sent.len(), "every send got its own id");

    sent.sort_by_key(|s| s.0);
    let inbox = server.inbox(&bob).await;
    let inbox_ids = ids(&inbox);
    assert_eq!(inbox_ids.len(), sent.len());
    assert!(
        inbox_ids.windows(2).all(|w| w[0] < w[1]),
        "inbox in increasing id order"
    );
    for (got, (sent_id, from, body, sent_at)) in inbox.iter().zip(&sent) {
        assert_eq!(id(&got["id"]), *sent_id);
        assert_eq!(id(&got["from"]), *from);
        assert_eq!(unb64(got["body"].as_str().unwrap()), *body);
        assert_eq!(time(&got["sent_at"]), time(sent_at));
    }
}

/// 70 maximal bodies (64 KiB) are 4.4 MiB: one page of 500 stops at 4 MiB
/// of stored bytes, with a `next`, and the second page has the rest. A
/// stored body is its sealing (the body, the sender, a nonce and a tag), a
/// few dozen bytes more, so 63 of them fit, not 64.
async fn pages_stop_at_four_mebibytes_of_bodies(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    for n in 0..70u8 {
        server.send(&alice, bob.id, &vec![n; 65536]).await;
    }
    let first = server
        .get("/v1/messages?limit=500", Some(&bob.access))
        .await
        .expect(200);
    let count = first["messages"].as_array().unwrap().len();
    assert_eq!(count, 63, "4 MiB of sealed 64 KiB bodies");
    let next = first["next"].as_str().expect("a next page");
    let second = server
        .get(
            &format!("/v1/messages?limit=500&after={next}"),
            Some(&bob.access),
        )
        .await
        .expect(200);
    assert_eq!(second["messages"].as_array().unwrap().len(), 7);
    assert!(second["next"].is_null());
}
