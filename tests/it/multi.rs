//! The multi-recipient send (issue 27): one message to many accounts over
//! `POST /v1/messages/multi` and the `send_multi` frame, as protocol.md's
//! "One message to many accounts" describes it. One id for every copy; a
//! shared body stored once and deleted after its last copy is settled; all
//! or nothing across accounts (`devices_changed` and `not_found` name the
//! accounts at fault); one order for a sender's single and multi sends;
//! durable once answered, through SIGKILL; retries under a `client_id`;
//! the limits; `receipts: false`; syncing one's own devices. The cross-node
//! case is in `cluster.rs`.

use std::sync::Arc;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::multi::{self, Recipient, assert_copy, rows, with};
use crate::common::traffic::{
    Plan, Request, Senders, assert_all_queued, assert_answered_in_time, created_ids,
};
use crate::common::ws::{WsClient, assert_next_is_sentinel};
use crate::common::{
    Account, Api, Backend, ServerProcess, TestDb, TestServer, assert_alive, b64, eventually, id,
    ids, keys, unb64,
};

backend_tests!(
    three_accounts_two_devices_one_send,
    a_mismatch_for_one_account_stores_nothing,
    an_unknown_recipient_is_named,
    order_across_single_and_multi_sends,
    acks_delete_the_shared_body_after_the_last,
    a_kill9_loses_no_answered_multi_send,
    multi_sends_are_idempotent,
    limits_are_answered_clearly,
    receipts_false_sends_no_receipt,
    the_sender_syncs_its_own_devices,
);

/// How long the senders of the SIGKILL test may take to get their first
/// answers.
const WARM_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// The fields of a live copy, without and with a `key`.
const FRAME: [&str; 6] = ["body", "from", "from_device", "id", "sent_at", "type"];
const SHARED_FRAME: [&str; 7] = [
    "body",
    "from",
    "from_device",
    "id",
    "key",
    "sent_at",
    "type",
];

// ---------------------------------------------------------------------------
// Helpers

/// The key material of `who`'s device `device`: distinct for every device,
/// so that a copy carrying another device's key shows.
fn key(who: &Account, device: i64) -> Vec<u8> {
    format!("key of {} device {device}", who.username).into_bytes()
}

/// An envelope body of its own for `who`'s device `device`.
fn envelope(who: &Account, device: i64, tag: &str) -> Vec<u8> {
    format!("{tag} for {} device {device}", who.username).into_bytes()
}

/// `who`'s account covering `devices`, each with `what(device)`.
fn cover(who: &Account, devices: &[i64], what: impl Fn(i64) -> Vec<u8>) -> Recipient {
    (who.id, devices.iter().map(|d| (*d, what(*d))).collect())
}

/// `who`'s account covering `devices`, each with its [`key`].
fn keyed(who: &Account, devices: &[i64]) -> Recipient {
    cover(who, devices, |d| key(who, d))
}

/// `who`'s account covering `devices`, each with an [`envelope`] of its own.
fn enveloped(who: &Account, devices: &[i64], tag: &str) -> Recipient {
    cover(who, devices, |d| envelope(who, d, tag))
}

/// The device ids of an account given as a session of each device, in
/// device order (as `account_with_devices` returns them).
fn all(sessions: &[Account]) -> Vec<i64> {
    (1..=sessions.len() as i64).collect()
}

/// `POST /v1/messages/ack` of one message as `who`; the number acked.
async fn ack(api: &Api, who: &Account, message: Uuid) -> i64 {
    let acked = api
        .post(
            "/v1/messages/ack",
            Some(&who.access),
            json!({ "ids": [message] }),
        )
        .await
        .expect(200);
    acked["acked"]
        .as_i64()
        .unwrap_or_else(|| panic!("no count: {acked}"))
}

/// Asserts that `error` (a REST reply's `error` object or an `error`
/// frame) is `devices_changed` with one entry per account in `expected`,
/// `(to, missing, extra)`, and no other; in any order.
#[track_caller]
fn assert_changed(error: &Value, expected: &[(Uuid, &[i64], &[i64])]) {
    assert_eq!(error["code"], "devices_changed", "{error}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error without a message: {error}"
    );
    let mut got: Vec<(Uuid, Value, Value)> = error["recipients"]
        .as_array()
        .unwrap_or_else(|| panic!("no recipients in {error}"))
        .iter()
        .map(|r| (id(&r["to"]), r["missing"].clone(), r["extra"].clone()))
        .collect();
    got.sort_by_key(|(to, ..)| *to);
    let mut want: Vec<(Uuid, Value, Value)> = expected
        .iter()
        .map(|(to, missing, extra)| (*to, json!(missing), json!(extra)))
        .collect();
    want.sort_by_key(|(to, ..)| *to);
    assert_eq!(got, want, "(to, missing, extra) per account: {error}");
}

/// Asserts that `error` is `not_found` naming exactly `unknown`, in any
/// order.
#[track_caller]
fn assert_unknown(error: &Value, unknown: &[Uuid]) {
    assert_eq!(error["code"], "not_found", "{error}");
    let mut got: Vec<Uuid> = error["unknown"]
        .as_array()
        .unwrap_or_else(|| panic!("no unknown in {error}"))
        .iter()
        .map(id)
        .collect();
    got.sort();
    let mut want = unknown.to_vec();
    want.sort();
    assert_eq!(got, want, "{error}");
}

/// Asserts that no device of `sessions` (sessions of every device of
/// some accounts) has anything queued.
async fn assert_nothing_queued(api: &Api, sessions: &[&Account]) {
    for who in sessions {
        let inbox = api.inbox(who).await;
        assert!(
            inbox.is_empty(),
            "{}'s device has a queue: {inbox:?}",
            who.username
        );
    }
}

// ---------------------------------------------------------------------------
// Delivery

/// Alice sends one message to three accounts of two devices each, in each
/// form. Every copy has the one id, alice's device, and the device's own
/// body or the shared body with the device's own key; bob's phone gets its
/// copy live, the rest from their queues. The shared form stores its body
/// once, however many devices it goes to.
async fn three_accounts_two_devices_one_send(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account_with_devices("carol", 2).await;
    let dave = server.account_with_devices("dave", 2).await;
    let groups = [&bob, &carol, &dave];
    let (mut bob_ws, backlog) = WsClient::ready(&server, &bob[0]).await;
    assert!(backlog.is_empty(), "{backlog:?}");

    // Per-device envelopes: each device its own body, no key.
    let request = multi::envelopes(&groups.map(|g| enveloped(&g[0], &[1, 2], "own")));
    let reply = multi::send(&server, &alice, &request).await.expect(201);
    assert_eq!(keys(&reply), ["id", "sent_at"], "{reply}");
    let own = id(&reply["id"]);
    assert_eq!(own.get_version_num(), 7, "ids are UUIDv7");
    let pushed = bob_ws.expect_exactly("message").await;
    assert_eq!(keys(&pushed), FRAME, "{pushed}");
    assert_copy(
        &pushed,
        own,
        alice.id,
        1,
        &envelope(&bob[0], 1, "own"),
        None,
    );
    assert_eq!(pushed["sent_at"], reply["sent_at"], "{pushed}");
    for group in groups {
        for (device, session) in all(group).into_iter().zip(group.iter()) {
            let inbox = server.inbox(session).await;
            assert_eq!(
                ids(&inbox),
                [own],
                "{} {device}: {inbox:?}",
                session.username
            );
            let body = envelope(session, device, "own");
            assert_copy(&inbox[0], own, alice.id, 1, &body, None);
            assert_eq!(inbox[0]["sent_at"], reply["sent_at"], "{}", inbox[0]);
        }
    }
    assert_eq!(
        rows(&server.db).await,
        (6, 0),
        "(queued copies, shared bodies): a copy per device, no shared body"
    );

    // A shared body: the same bytes for all, each device its own key.
    let body = b"one ciphertext for the whole group";
    let request = multi::shared(body, &groups.map(|g| keyed(&g[0], &[1, 2])));
    let reply = multi::send(&server, &alice, &request).await.expect(201);
    assert_eq!(keys(&reply), ["id", "sent_at"], "{reply}");
    let shared = id(&reply["id"]);
    assert!(own < shared, "ids ascend in acceptance order");
    let pushed = bob_ws.expect_exactly("message").await;
    assert_eq!(keys(&pushed), SHARED_FRAME, "{pushed}");
    assert_copy(&pushed, shared, alice.id, 1, body, Some(&key(&bob[0], 1)));
    assert_eq!(pushed["sent_at"], reply["sent_at"], "{pushed}");
    for group in groups {
        for (device, session) in all(group).into_iter().zip(group.iter()) {
            let inbox = server.inbox(session).await;
            assert_eq!(
                ids(&inbox),
                [own, shared],
                "{} {device}: {inbox:?}",
                session.username
            );
            let got = &inbox[1];
            assert_copy(got, shared, alice.id, 1, body, Some(&key(session, device)));
            assert_eq!(got["sent_at"], reply["sent_at"], "{got}");
        }
    }
    assert_eq!(
        rows(&server.db).await,
        (12, 1),
        "(queued copies, shared bodies): six more copies, one stored body"
    );

    // The sender's own queue holds nothing of it, and bob's phone got each
    // copy once.
    assert!(server.inbox(&alice).await.is_empty());
    assert_next_is_sentinel(&server, &[&bob[0], &bob[1]], &mut [&mut bob_ws]).await;
}

/// One account's devices are wrong (a device missing, one extra, or both):
/// the whole send is refused `devices_changed`, naming only the accounts at
/// fault, in either form and over the socket; nothing is stored for
/// anyone, and an online device of another account is pushed nothing.
async fn a_mismatch_for_one_account_stores_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account_with_devices("carol", 2).await;
    let dave = server.account("dave").await;
    let (mut carol_ws, _) = WsClient::ready(&server, &carol[0]).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;

    // (bob's, carol's, dave's devices as sent; the accounts at fault)
    type Case<'a> = ([&'a [i64]; 3], &'a [(Uuid, &'a [i64], &'a [i64])]);
    let cases: [Case; 4] = [
        ([&[1, 2], &[1], &[1]], &[(carol[0].id, &[2], &[])]),
        ([&[1, 2], &[1, 2], &[1, 2]], &[(dave.id, &[], &[2])]),
        ([&[1, 3], &[1, 2], &[1]], &[(bob[0].id, &[2], &[3])]),
        (
            [&[2], &[1, 2, 5], &[1]],
            &[(bob[0].id, &[1], &[]), (carol[0].id, &[], &[5])],
        ),
    ];
    for (n, ([to_bob, to_carol, to_dave], fault)) in cases.iter().enumerate() {
        let shared = multi::shared(
            b"refused",
            &[
                keyed(&bob[0], to_bob),
                keyed(&carol[0], to_carol),
                keyed(&dave, to_dave),
            ],
        );
        let reply = multi::send(&server, &alice, &shared).await;
        reply.expect_error(409, "devices_changed");
        assert_changed(&reply.body["error"], fault);

        let envelopes = multi::envelopes(&[
            enveloped(&bob[0], to_bob, "refused"),
            enveloped(&carol[0], to_carol, "refused"),
            enveloped(&dave, to_dave, "refused"),
        ]);
        let reply = multi::send(&server, &alice, &envelopes).await;
        reply.expect_error(409, "devices_changed");
        assert_changed(&reply.body["error"], fault);

        let reference = format!("case-{n}");
        alice_ws.send_json(multi::frame(&reference, &shared)).await;
        let error = alice_ws.expect_exactly("error").await;
        assert_eq!(error["ref"], reference, "{error}");
        assert_changed(&error, fault);
    }

    assert_nothing_queued(&server, &[&bob[0], &bob[1], &carol[0], &carol[1], &dave]).await;
    assert_eq!(
        rows(&server.db).await,
        (0, 0),
        "(queued copies, shared bodies)"
    );

    // The same send with every account right goes through, and is the
    // first thing carol's socket hears: none of the refused was pushed.
    let good = multi::shared(
        b"accepted",
        &[
            keyed(&bob[0], &[1, 2]),
            keyed(&carol[0], &[1, 2]),
            keyed(&dave, &[1]),
        ],
    );
    let reply = multi::send(&server, &alice, &good).await.expect(201);
    let pushed = carol_ws.expect_exactly("message").await;
    assert_copy(
        &pushed,
        id(&reply["id"]),
        alice.id,
        1,
        b"accepted",
        Some(&key(&carol[0], 1)),
    );
    assert_eq!(
        rows(&server.db).await,
        (5, 1),
        "(queued copies, shared bodies)"
    );
}

/// A `to` that is no account is refused `not_found`, with every such id in
/// `unknown`, in either form and over the socket; nothing is stored or
/// pushed for the accounts that exist.
async fn an_unknown_recipient_is_named(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account("carol").await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob[0]).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let ghost = Uuid::new_v4();
    let another = Uuid::now_v7();
    let nobody = |to: Uuid| -> Recipient { (to, vec![(1, b"key for nobody".to_vec())]) };

    for unknown in [vec![ghost], vec![ghost, another]] {
        let mut recipients = vec![keyed(&bob[0], &[1, 2])];
        recipients.extend(unknown.iter().map(|u| nobody(*u)));
        recipients.push(keyed(&carol, &[1]));
        let shared = multi::shared(b"to a ghost", &recipients);
        let reply = multi::send(&server, &alice, &shared).await;
        reply.expect_error(404, "not_found");
        assert_unknown(&reply.body["error"], &unknown);

        let mut recipients = vec![enveloped(&bob[0], &[1, 2], "ghost")];
        recipients.extend(unknown.iter().map(|u| nobody(*u)));
        let reply = multi::send(&server, &alice, &multi::envelopes(&recipients)).await;
        reply.expect_error(404, "not_found");
        assert_unknown(&reply.body["error"], &unknown);

        alice_ws.send_json(multi::frame("ghost", &shared)).await;
        let error = alice_ws.expect_exactly("error").await;
        assert_eq!(error["ref"], "ghost", "{error}");
        assert_unknown(&error, &unknown);
    }

    assert_nothing_queued(&server, &[&bob[0], &bob[1], &carol]).await;
    assert_eq!(
        rows(&server.db).await,
        (0, 0),
        "(queued copies, shared bodies)"
    );
    assert_next_is_sentinel(&server, &[&bob[0], &bob[1]], &mut [&mut bob_ws]).await;
}

// ---------------------------------------------------------------------------
// Order

/// What the `i`th send of the order test is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A `send` to bob with a plain body.
    Single,
    /// A `send_multi` to bob and carol, shared form.
    Shared,
    /// A `send_multi` to bob and carol, envelopes form.
    Envelopes,
}

fn kind(i: usize) -> Kind {
    match i % 4 {
        1 => Kind::Shared,
        3 => Kind::Envelopes,
        _ => Kind::Single,
    }
}

/// The body and key the `i`th send of the order test carries to `who`'s
/// device `device`.
fn nth_copy(i: usize, who: &Account, device: i64) -> (Vec<u8>, Option<Vec<u8>>) {
    let plain = format!("send {i:02}").into_bytes();
    let own = format!("send {i:02} for {} device {device}", who.username).into_bytes();
    match kind(i) {
        Kind::Single => (plain, None),
        Kind::Shared => (plain, Some(own)),
        Kind::Envelopes => (own, None),
    }
}

/// Alice pipelines single and multi sends on one socket: bob's online
/// device gets them live in frame order, his offline one and carol find
/// them in that order in their queues, and the ids ascend in it.
async fn order_across_single_and_multi_sends(backend: Backend) {
    const SENDS: usize = 20;
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account("carol").await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob[0]).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;

    for i in 0..SENDS {
        let reference = i.to_string();
        let copies = |who: &Account, devices: &[i64]| -> Recipient {
            cover(who, devices, |d| {
                let (body, key) = nth_copy(i, who, d);
                key.unwrap_or(body)
            })
        };
        let recipients = [copies(&bob[0], &[1, 2]), copies(&carol, &[1])];
        let frame = match kind(i) {
            Kind::Single => json!({
                "type": "send", "ref": reference, "to": bob[0].id,
                "body": b64(&nth_copy(i, &bob[0], 1).0),
            }),
            Kind::Shared => multi::frame(
                &reference,
                &multi::shared(&nth_copy(i, &bob[0], 1).0, &recipients),
            ),
            Kind::Envelopes => multi::frame(&reference, &multi::envelopes(&recipients)),
        };
        alice_ws.send_json(frame).await;
    }
    let mut sent: Vec<Option<Uuid>> = vec![None; SENDS];
    for _ in 0..SENDS {
        // `expect` fails on an `error` frame, naming it.
        let frame = alice_ws.expect("sent").await;
        let n: usize = frame["ref"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("a sent frame with a ref not ours: {frame}"));
        assert!(
            sent[n].replace(id(&frame["id"])).is_none(),
            "two sent for {n}"
        );
    }
    let sent: Vec<Uuid> = sent.into_iter().map(Option::unwrap).collect();
    assert!(
        sent.windows(2).all(|w| w[0] < w[1]),
        "ids ascend in frame order: {sent:?}"
    );

    // Bob's phone, live, in frame order.
    for (i, message) in sent.iter().enumerate() {
        let pushed = bob_ws.expect_exactly("message").await;
        let (body, key) = nth_copy(i, &bob[0], 1);
        assert_copy(&pushed, *message, alice.id, 1, &body, key.as_deref());
    }
    // Bob's laptop and carol, from their queues, in the same order.
    let laptop = server.inbox(&bob[1]).await;
    assert_eq!(ids(&laptop), sent, "bob's laptop's queue in frame order");
    for (i, message) in laptop.iter().enumerate() {
        let (body, key) = nth_copy(i, &bob[1], 2);
        assert_copy(message, sent[i], alice.id, 1, &body, key.as_deref());
    }
    let to_carol: Vec<usize> = (0..SENDS).filter(|i| kind(*i) != Kind::Single).collect();
    let queue = server.inbox(&carol).await;
    let expected: Vec<Uuid> = to_carol.iter().map(|i| sent[*i]).collect();
    assert_eq!(ids(&queue), expected, "carol's queue in frame order");
    for (message, i) in queue.iter().zip(&to_carol) {
        let (body, key) = nth_copy(*i, &carol, 1);
        assert_copy(message, sent[*i], alice.id, 1, &body, key.as_deref());
    }
    assert_next_is_sentinel(&server, &[&bob[0], &bob[1]], &mut [&mut bob_ws]).await;
}

// ---------------------------------------------------------------------------
// The shared body's life

/// A shared body stays while any copy of it is queued, readable whole by
/// each device that has not acked, and goes with the last ack; another
/// message's shared body is untouched.
async fn acks_delete_the_shared_body_after_the_last(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account("carol").await;
    let first_body = b"the first shared body";
    let first = multi::shared(first_body, &[keyed(&bob[0], &[1, 2]), keyed(&carol, &[1])]);
    let first = id(&multi::send(&server, &alice, &first).await.expect(201)["id"]);
    let second_body = b"the second shared body, carol's alone";
    let second = multi::shared(second_body, &[keyed(&carol, &[1])]);
    let second = id(&multi::send(&server, &alice, &second).await.expect(201)["id"]);
    assert_eq!(
        rows(&server.db).await,
        (4, 2),
        "(queued copies, shared bodies)"
    );

    // Bob's phone acks: its copy goes, the body stays for the others.
    assert_eq!(ack(&server, &bob[0], first).await, 1);
    assert_eq!(
        rows(&server.db).await,
        (3, 2),
        "(queued copies, shared bodies)"
    );
    assert!(server.inbox(&bob[0]).await.is_empty());
    let laptop = server.inbox(&bob[1]).await;
    assert_eq!(ids(&laptop), [first], "{laptop:?}");
    assert_copy(
        &laptop[0],
        first,
        alice.id,
        1,
        first_body,
        Some(&key(&bob[1], 2)),
    );

    // Bob's laptop acks: carol's copy still reads the whole body.
    assert_eq!(ack(&server, &bob[1], first).await, 1);
    assert_eq!(
        rows(&server.db).await,
        (2, 2),
        "(queued copies, shared bodies)"
    );
    let queue = server.inbox(&carol).await;
    assert_eq!(ids(&queue), [first, second], "{queue:?}");
    assert_copy(
        &queue[0],
        first,
        alice.id,
        1,
        first_body,
        Some(&key(&carol, 1)),
    );

    // Carol acks the last copy: the body goes with it, the second stays.
    assert_eq!(ack(&server, &carol, first).await, 1);
    eventually("the first shared body to be deleted", async || {
        (rows(&server.db).await == (1, 1)).then_some(())
    })
    .await;
    assert_eq!(ack(&server, &bob[0], first).await, 0, "a repeated ack");
    let queue = server.inbox(&carol).await;
    assert_eq!(ids(&queue), [second], "{queue:?}");
    assert_copy(
        &queue[0],
        second,
        alice.id,
        1,
        second_body,
        Some(&key(&carol, 1)),
    );

    assert_eq!(ack(&server, &carol, second).await, 1);
    eventually("every shared body to be deleted", async || {
        (rows(&server.db).await == (0, 0)).then_some(())
    })
    .await;
}

// ---------------------------------------------------------------------------
// Durability

/// What the SIGKILL test's sender `s` sends to `user`'s device `device` in
/// its `n`th send: a shared body `"{s}:{n}"` with this key, or this as the
/// device's own envelope. Each copy names its device and its send, so a
/// body paired with another's key shows.
fn kill9_copy(user: &str, device: i64, sender: usize, n: usize) -> Vec<u8> {
    format!("{user}/{device}|{sender}:{n}").into_bytes()
}

/// Multi sends in both forms from several tasks, the server SIGKILLed
/// under them: every send answered 201 is in every recipient device's
/// queue after the restart, with its body and key whole.
async fn a_kill9_loses_no_answered_multi_send(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(&db.url, &[]);
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account("carol").await;
    let devices = [(&bob[0], 1), (&bob[1], 2), (&carol, 1)];

    let (bob_id, carol_id) = (bob[0].id, carol.id);
    let request = Request {
        path: "/v1/messages/multi",
        body: Arc::new(move |s: usize, n: usize| {
            let copies = |to: Uuid, user: &str, devices: &[i64]| -> Recipient {
                let list = devices.iter().map(|d| (*d, kill9_copy(user, *d, s, n)));
                (to, list.collect())
            };
            let recipients = [
                copies(bob_id, "bob", &[1, 2]),
                copies(carol_id, "carol", &[1]),
            ];
            if n.is_multiple_of(2) {
                multi::shared(format!("{s}:{n}").as_bytes(), &recipients)
            } else {
                multi::envelopes(&recipients)
            }
        }),
    };
    // One send before the senders start, so that a server refusing them
    // fails here with its reply rather than by waiting for answers.
    let first = multi::send(&server, &alice, &(request.body)(usize::MAX, 0)).await;
    let first = id(&first.expect(201)["id"]);
    let senders = Senders::start_with(&server.api, &alice, request, Plan::UNTIL_REFUSED);
    senders.until_created(60, WARM_UP).await;
    server.kill9();
    let sent = senders.join().await;
    assert_answered_in_time(&sent);
    let mut accepted = vec![first];
    accepted.extend(created_ids(&sent));

    let restarted = ServerProcess::spawn(&db.url, &[]);
    let mut forms = (0, 0);
    for (who, device) in devices {
        assert_all_queued(&restarted.api, who, &accepted).await;
        for message in restarted.inbox(who).await {
            assert_eq!(id(&message["from"]), alice.id, "{message}");
            let body = unb64(message["body"].as_str().unwrap_or_default());
            let own = format!("{}/{device}|", who.username);
            match message.get("key") {
                Some(key) => {
                    let key = unb64(key.as_str().unwrap_or_default());
                    let mut expected = own.into_bytes();
                    expected.extend_from_slice(&body);
                    assert_eq!(key, expected, "the key of this body's send: {message}");
                    forms.0 += 1;
                }
                None => {
                    assert!(body.starts_with(own.as_bytes()), "{message}");
                    forms.1 += 1;
                }
            }
        }
    }
    assert!(
        forms.0 > 0 && forms.1 > 0,
        "both forms survived (shared, envelopes): {forms:?}"
    );

    // The server that came back takes multi sends.
    restarted.get("/readyz", None).await.expect(200);
    let after = multi::shared(b"after the restart", &[keyed(&carol, &[1])]);
    multi::send(&restarted, &alice, &after).await.expect(201);
}

// ---------------------------------------------------------------------------
// Retries

/// A multi send repeated under its `client_id` is answered with the first
/// answer and stored once, over REST and the socket of the same device
/// alike; another send under the same `client_id` is refused `conflict`
/// and stores nothing.
async fn multi_sends_are_idempotent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account("carol").await;
    let queues = [&bob[0], &bob[1], &carol];
    let recipients = [keyed(&bob[0], &[1, 2]), keyed(&carol, &[1])];
    let request = with(
        multi::shared(b"once", &recipients),
        "client_id",
        json!("g-1"),
    );

    let first = multi::send(&server, &alice, &request).await.expect(201);
    let again = multi::send(&server, &alice, &request).await.expect(201);
    assert_eq!(again, first, "the same answer, field for field");
    let first_id = id(&first["id"]);
    for who in queues {
        assert_eq!(
            ids(&server.inbox(who).await),
            [first_id],
            "{}",
            who.username
        );
    }
    assert_eq!(
        rows(&server.db).await,
        (3, 1),
        "(queued copies, shared bodies)"
    );

    // Another send under the same key: another body, fewer recipients,
    // another key, the other form, a single send.
    let mut other_key = recipients.clone();
    other_key[1].1[0].1 = b"another key".to_vec();
    let different = [
        multi::shared(b"twice", &recipients),
        multi::shared(b"once", &recipients[..1]),
        multi::shared(b"once", &other_key),
        multi::envelopes(&recipients),
    ];
    for request in different {
        let request = with(request, "client_id", json!("g-1"));
        let reply = multi::send(&server, &alice, &request).await;
        reply.expect_error(409, "conflict");
    }
    server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": carol.id, "body": b64(b"once"), "client_id": "g-1" }),
        )
        .await
        .expect_error(409, "conflict");
    for who in queues {
        assert_eq!(
            ids(&server.inbox(who).await),
            [first_id],
            "{}",
            who.username
        );
    }
    assert_eq!(
        rows(&server.db).await,
        (3, 1),
        "(queued copies, shared bodies)"
    );

    // On the socket of the same device: the REST send's key is known...
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    ws.send_json(multi::frame("r1", &request)).await;
    let repeat = ws.expect_exactly("sent").await;
    assert_eq!(repeat["ref"], "r1", "{repeat}");
    assert_eq!(repeat["id"], first["id"], "{repeat}");
    assert_eq!(repeat["sent_at"], first["sent_at"], "{repeat}");

    // ...a new one is sent once, repeated under a new ref, over REST too...
    let second = with(
        multi::envelopes(&[
            enveloped(&bob[0], &[1, 2], "second"),
            enveloped(&carol, &[1], "second"),
        ]),
        "client_id",
        json!("g-2"),
    );
    ws.send_json(multi::frame("r2", &second)).await;
    let sent = ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "r2", "{sent}");
    let second_id = id(&sent["id"]);
    ws.send_json(multi::frame("r3", &second)).await;
    let repeat = ws.expect_exactly("sent").await;
    assert_eq!(repeat["ref"], "r3", "{repeat}");
    assert_eq!(id(&repeat["id"]), second_id, "{repeat}");
    assert_eq!(repeat["sent_at"], sent["sent_at"], "{repeat}");
    let rest = multi::send(&server, &alice, &second).await.expect(201);
    assert_eq!(id(&rest["id"]), second_id, "{rest}");

    // ...and another send under it is an error frame with its ref.
    let changed = with(
        multi::envelopes(&[
            enveloped(&bob[0], &[1, 2], "third"),
            enveloped(&carol, &[1], "third"),
        ]),
        "client_id",
        json!("g-2"),
    );
    ws.send_json(multi::frame("r4", &changed)).await;
    let refused = ws.expect_exactly("error").await;
    assert_eq!(refused["ref"], "r4", "{refused}");
    assert_eq!(refused["code"], "conflict", "{refused}");

    for who in queues {
        assert_eq!(
            ids(&server.inbox(who).await),
            [first_id, second_id],
            "{}",
            who.username
        );
    }
    assert_eq!(
        rows(&server.db).await,
        (6, 1),
        "(queued copies, shared bodies)"
    );
}

// ---------------------------------------------------------------------------
// Limits

/// Every malformed or oversized multi send is refused with its code and
/// the field at fault, over REST and the socket, storing nothing; a send
/// at every limit exactly goes through; the server serves on.
async fn limits_are_answered_clearly(backend: Backend) {
    const BODY_LIMIT: usize = 1024;
    const KEY_LIMIT: usize = 256;
    let server = TestServer::start_with(
        backend,
        &[
            "--max-recipients-per-send",
            "2",
            "--max-devices-per-send",
            "3",
            "--max-body-bytes",
            "1024",
        ],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let carol = server.account("carol").await;
    let dave = server.account("dave").await;
    let erin = server.account_with_devices("erin", 2).await;
    let frank = server.account("frank").await;
    let everyone = [&bob[0], &bob[1], &carol, &dave, &erin[0], &erin[1], &frank];

    let body = b"within the limits";
    let good = [keyed(&bob[0], &[1, 2]), keyed(&carol, &[1])];
    let entry = |to: &Account, form: &str, items: Value| json!({ "to": to.id, form: items });
    let key_of = |bytes: &[u8]| json!([{ "device_id": 1, "key": b64(bytes) }]);
    let shared = b64(body);

    // (what, request, status, code, field)
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        (
            "no recipients",
            json!({ "shared": shared, "recipients": [] }),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "no recipients, envelopes",
            json!({ "recipients": [] }),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "an account twice",
            multi::shared(body, &[keyed(&carol, &[1]), keyed(&carol, &[1])]),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "the forms mixed",
            json!({ "shared": shared, "recipients": [
                entry(&carol, "keys", key_of(b"k")),
                entry(&dave, "envelopes", json!([{ "device_id": 1, "body": b64(b"b") }])),
            ] }),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "an entry of both forms",
            json!({ "shared": shared, "recipients": [{
                "to": carol.id, "keys": key_of(b"k"),
                "envelopes": [{ "device_id": 1, "body": b64(b"b") }],
            }] }),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "an entry of neither form",
            json!({ "shared": shared, "recipients": [{ "to": carol.id }] }),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "an entry with no device",
            json!({ "shared": shared, "recipients": [entry(&carol, "keys", json!([]))] }),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "keys without shared",
            json!({ "recipients": [entry(&carol, "keys", key_of(b"k"))] }),
            422,
            "invalid",
            Some("shared"),
        ),
        (
            "an empty shared body",
            json!({ "shared": "", "recipients": [entry(&carol, "keys", key_of(b"k"))] }),
            422,
            "invalid",
            Some("shared"),
        ),
        (
            "a shared body not base64",
            json!({ "shared": "not base64!", "recipients": [entry(&carol, "keys", key_of(b"k"))] }),
            422,
            "invalid",
            Some("shared"),
        ),
        (
            "a key over the key limit",
            multi::shared(body, &[cover(&carol, &[1], |_| vec![7; KEY_LIMIT + 1])]),
            422,
            "invalid",
            Some("keys"),
        ),
        (
            "an empty key",
            json!({ "shared": shared, "recipients": [entry(&carol, "keys", json!([{ "device_id": 1, "key": "" }]))] }),
            422,
            "invalid",
            Some("keys"),
        ),
        (
            "a key not base64",
            json!({ "shared": shared, "recipients": [entry(&carol, "keys", json!([{ "device_id": 1, "key": "no!" }]))] }),
            422,
            "invalid",
            Some("keys"),
        ),
        (
            "a device named twice among keys",
            multi::shared(body, &[keyed(&bob[0], &[1, 1, 2])]),
            422,
            "invalid",
            Some("keys"),
        ),
        (
            "an empty envelope",
            multi::envelopes(&[cover(&carol, &[1], |_| Vec::new())]),
            422,
            "invalid",
            Some("envelopes"),
        ),
        (
            "a device named twice among envelopes",
            multi::envelopes(&[enveloped(&bob[0], &[1, 2, 2], "twice")]),
            422,
            "invalid",
            Some("envelopes"),
        ),
        (
            "an empty client_id",
            with(multi::shared(body, &good), "client_id", json!("")),
            422,
            "invalid",
            Some("client_id"),
        ),
        (
            "more accounts than --max-recipients-per-send",
            multi::shared(
                body,
                &[keyed(&carol, &[1]), keyed(&dave, &[1]), keyed(&frank, &[1])],
            ),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "more devices than --max-devices-per-send",
            multi::shared(body, &[keyed(&bob[0], &[1, 2]), keyed(&erin[0], &[1, 2])]),
            422,
            "invalid",
            Some("recipients"),
        ),
        (
            "a shared body over the body limit",
            multi::shared(&vec![7; BODY_LIMIT + 1], &good),
            413,
            "too_large",
            None,
        ),
        (
            "an envelope over the body limit",
            multi::envelopes(&[
                enveloped(&bob[0], &[1, 2], "fits"),
                cover(&carol, &[1], |_| vec![7; BODY_LIMIT + 1]),
            ]),
            413,
            "too_large",
            None,
        ),
    ];
    for (what, request, status, code, field) in &cases {
        let reply = multi::send(&server, &alice, request).await;
        assert_eq!(reply.status.as_u16(), *status, "{what}: {:?}", reply.body);
        reply.expect_error(*status, code);
        match field {
            Some(field) => assert_eq!(
                reply.body["error"]["field"], *field,
                "{what}: {:?}",
                reply.body
            ),
            None => assert!(
                reply.body["error"].get("field").is_none(),
                "{what}: {:?}",
                reply.body
            ),
        }
    }

    // The socket answers the same with an error frame and its ref, and
    // stays usable.
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    for (n, (what, request, _, code, field)) in cases.iter().enumerate() {
        let reference = format!("bad-{n}");
        ws.send_json(multi::frame(&reference, request)).await;
        let error = ws.expect_exactly("error").await;
        assert_eq!(error["ref"], reference, "{what}: {error}");
        assert_eq!(error["code"], *code, "{what}: {error}");
        match field {
            Some(field) => assert_eq!(error["field"], *field, "{what}: {error}"),
            None => assert!(error.get("field").is_none(), "{what}: {error}"),
        }
    }
    assert_nothing_queued(&server, &everyone).await;
    assert_eq!(
        rows(&server.db).await,
        (0, 0),
        "(queued copies, shared bodies)"
    );

    // At every limit exactly: two accounts, three devices, a maximal shared
    // body and a maximal key.
    let largest: Vec<u8> = (0..BODY_LIMIT).map(|i| (i % 251) as u8).collect();
    let longest_key = vec![9; KEY_LIMIT];
    let at_limits = [
        cover(&bob[0], &[1, 2], |_| longest_key.clone()),
        keyed(&carol, &[1]),
    ];
    let reply = multi::send(&server, &alice, &multi::shared(&largest, &at_limits))
        .await
        .expect(201);
    let queue = server.inbox(&bob[1]).await;
    assert_eq!(ids(&queue), [id(&reply["id"])], "{queue:?}");
    assert_copy(
        &queue[0],
        id(&reply["id"]),
        alice.id,
        1,
        &largest,
        Some(&longest_key),
    );
    ws.send_json(multi::frame("good", &multi::shared(body, &good)))
        .await;
    let sent = ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "good", "{sent}");
    assert_eq!(
        rows(&server.db).await,
        (6, 2),
        "(queued copies, shared bodies)"
    );
    assert_alive(&server, &alice).await;
}

// ---------------------------------------------------------------------------
// Receipts

/// A multi send with `"receipts": false` brings its sender no `receipt`
/// when its copies are acked, over REST or the socket; the same send
/// without it does, so the silence is the flag's.
async fn receipts_false_sends_no_receipt(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account_with_devices("bob", 2).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    let to_bob = [keyed(&bob[0], &[1, 2])];

    let quiet = with(
        multi::shared(b"no receipts", &to_bob),
        "receipts",
        json!(false),
    );
    let quiet_rest = id(&multi::send(&server, &alice, &quiet).await.expect(201)["id"]);
    alice_ws.send_json(multi::frame("quiet", &quiet)).await;
    let sent = alice_ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "quiet", "{sent}");
    let quiet_ws = id(&sent["id"]);
    for device in &bob {
        for message in [quiet_rest, quiet_ws] {
            assert_eq!(ack(&server, device, message).await, 1);
        }
    }

    // The control: the same send with receipts (the default) and a single
    // send. Alice's next frames are their receipts: none came before them.
    let loud = id(
        &multi::send(&server, &alice, &multi::shared(b"receipts", &to_bob))
            .await
            .expect(201)["id"],
    );
    let single = id(&server.send(&alice, bob[0].id, b"a single send").await["id"]);
    for (message, device) in [(loud, 1), (loud, 2), (single, 1)] {
        let session = &bob[device as usize - 1];
        assert_eq!(ack(&server, session, message).await, 1);
        let receipt = alice_ws.expect_exactly("receipt").await;
        assert_eq!(id(&receipt["id"]), message, "{receipt}");
        assert_eq!(id(&receipt["to"]), bob[0].id, "{receipt}");
        assert_eq!(receipt["device_id"], device, "{receipt}");
    }
}

// ---------------------------------------------------------------------------
// Sending to yourself

/// Alice's account among the recipients covers her other devices, not the
/// sending one: each device syncs the other, and naming the sending
/// device is `extra`.
async fn the_sender_syncs_its_own_devices(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account_with_devices("alice", 2).await;
    let bob = server.account("bob").await;
    let (phone, laptop) = (&alice[0], &alice[1]);
    let (mut laptop_ws, _) = WsClient::ready(&server, laptop).await;

    // From the phone over REST: bob, and the laptop's sync copy.
    let body = b"to bob, and to my laptop";
    let request = multi::shared(body, &[keyed(&bob, &[1]), keyed(phone, &[2])]);
    let from_phone = id(&multi::send(&server, phone, &request).await.expect(201)["id"]);
    let pushed = laptop_ws.expect_exactly("message").await;
    assert_copy(&pushed, from_phone, phone.id, 1, body, Some(&key(phone, 2)));
    let queue = server.inbox(&bob).await;
    assert_eq!(ids(&queue), [from_phone], "{queue:?}");
    assert_copy(
        &queue[0],
        from_phone,
        phone.id,
        1,
        body,
        Some(&key(&bob, 1)),
    );
    assert!(
        server.inbox(phone).await.is_empty(),
        "no copy for the sender"
    );

    // Naming the sending device is extra, from either device.
    let itself = multi::shared(b"x", &[keyed(&bob, &[1]), keyed(phone, &[1, 2])]);
    let reply = multi::send(&server, phone, &itself).await;
    reply.expect_error(409, "devices_changed");
    assert_changed(&reply.body["error"], &[(phone.id, &[], &[1])]);
    laptop_ws.send_json(multi::frame("itself", &itself)).await;
    let error = laptop_ws.expect_exactly("error").await;
    assert_eq!(error["ref"], "itself", "{error}");
    assert_changed(&error, &[(phone.id, &[], &[2])]);

    // From the laptop over its socket: the phone is its other device.
    let request = multi::envelopes(&[
        enveloped(&bob, &[1], "sync"),
        enveloped(phone, &[1], "sync"),
    ]);
    laptop_ws.send_json(multi::frame("sync", &request)).await;
    let sent = laptop_ws.expect_exactly("sent").await;
    assert_eq!(sent["ref"], "sync", "{sent}");
    let from_laptop = id(&sent["id"]);
    let queue = server.inbox(phone).await;
    assert_eq!(ids(&queue), [from_laptop], "{queue:?}");
    assert_copy(
        &queue[0],
        from_laptop,
        phone.id,
        2,
        &envelope(phone, 1, "sync"),
        None,
    );
    assert_eq!(ids(&server.inbox(&bob).await), [from_phone, from_laptop]);
    // The laptop's queue has the phone's copy only, and its socket no copy
    // of its own send.
    assert_eq!(ids(&server.inbox(laptop).await), [from_phone]);
    assert_next_is_sentinel(&server, &[phone, laptop], &mut [&mut laptop_ws]).await;
}
