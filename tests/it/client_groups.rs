//! Group messages through the Rust client (`sealpost-client`) against the
//! real server: the shared form of `protocol.md` ("Group messages (shared
//! form)"), sent over the socket (`send_multi`) and over REST (`POST
//! /v1/messages/multi`, by a polling client), read by every device of every
//! other member and by the sender's other devices as their sync copy, with
//! one shared body stored; and a stale directory recovered from
//! `devices_changed` with the accounts it names.

use std::time::Duration;

use sealpost_client::{Client, Event, Events, Group, Incoming, PollOptions};
use tokio::time::{Instant, timeout_at};
use uuid::Uuid;

use crate::backend_tests;
use crate::client::{add_device, message, online, register};
use crate::common::multi::rows;
use crate::common::{Backend, TestServer, eventually};

backend_tests!(
    three_members_exchange_group_messages_through_the_library,
    a_group_send_recovers_from_a_member_adding_a_device,
);

/// How long a device is watched for a copy it must not get.
const QUIET: Duration = Duration::from_millis(500);

#[track_caller]
fn assert_group_copy(m: &Incoming, from: &Client, group: &Group, text: &str) {
    assert_eq!(m.from, from.user_id(), "{m:?}");
    assert_eq!(m.from_device, from.device_id(), "{m:?}");
    assert_eq!(m.text, text, "{m:?}");
    assert_eq!(m.group.as_ref(), Some(group), "{m:?}");
    assert_eq!(m.to, None, "{m:?}");
    assert!(!m.ephemeral, "{m:?}");
}

/// The next message of `events`, checked to be the copy of `sent` (by id)
/// and acknowledged.
async fn receive(
    client: &Client,
    events: &mut Events,
    sent: Uuid,
    from: &Client,
    group: &Group,
    text: &str,
) {
    let m = message(events).await;
    assert_eq!(m.id, sent, "{} got {m:?}", client.username());
    assert_group_copy(&m, from, group, text);
    client.ack(&[m.id]).await.unwrap();
}

/// Every copy acknowledged so far is deleted, and with the last one its
/// shared body: the counts of the next send start from nothing.
async fn settled(server: &TestServer) {
    eventually(
        "every copy settled and its shared body deleted",
        async || (rows(&server.db).await == (0, 0)).then_some(()),
    )
    .await;
}

/// No message reaches `events` within [`QUIET`].
async fn assert_no_message(events: &mut Events, who: &str) {
    let deadline = Instant::now() + QUIET;
    while let Ok(Some(event)) = timeout_at(deadline, events.next()).await {
        assert!(
            !matches!(event, Event::Message(_)),
            "{who} got a copy of its own send: {event:?}"
        );
    }
}

async fn three_members_exchange_group_messages_through_the_library(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice_phone = register(&server.api, "alice").await;
    let alice_laptop = add_device(&server.api, "alice", "laptop").await;
    let bob = register(&server.api, "bob").await;
    let carol = register(&server.api, "carol").await;
    let mut alice_phone_events = online(&alice_phone).await;
    let mut alice_laptop_events = online(&alice_laptop).await;
    let mut bob_events = online(&bob).await;
    // Carol polls: her sends go over REST (`POST /v1/messages/multi`),
    // the others' over the socket (`send_multi`).
    let mut carol_events = carol
        .poll(PollOptions {
            interval: Duration::from_millis(200),
        })
        .unwrap();

    // Alice's phone makes the group up and writes first.
    let group = alice_phone
        .new_group("friends", [bob.user_id(), carol.user_id()])
        .unwrap();
    assert_eq!(
        group.members,
        [alice_phone.user_id(), bob.user_id(), carol.user_id()]
    );
    let first = alice_phone
        .send_group(&group, "hello, friends")
        .await
        .unwrap();
    assert!(first.sync_error.is_none());
    // Stored once: a copy for Bob, Carol and Alice's laptop (the sync
    // copy), and one shared body for the three.
    assert_eq!(rows(&server.db).await, (3, 1));
    let m = message(&mut bob_events).await;
    assert_eq!(m.id, first.id);
    assert_eq!(m.client_id, first.client_id);
    assert_group_copy(&m, &alice_phone, &group, "hello, friends");
    bob.ack(&[m.id]).await.unwrap();
    // Carol files it under the same group, learnt from the message.
    let m = message(&mut carol_events).await;
    assert_eq!(m.id, first.id);
    assert_group_copy(&m, &alice_phone, &group, "hello, friends");
    let learnt = m.group.clone().unwrap();
    carol.ack(&[m.id]).await.unwrap();
    receive(
        &alice_laptop,
        &mut alice_laptop_events,
        first.id,
        &alice_phone,
        &group,
        "hello, friends",
    )
    .await;
    assert_no_message(&mut alice_phone_events, "alice's phone").await;
    settled(&server).await;

    // Bob answers in the group: both of Alice's devices and Carol; Bob has
    // no other device, so no sync copy.
    let reply = bob.send_group(&group, "hi all").await.unwrap();
    assert_eq!(rows(&server.db).await, (3, 1));
    for (client, events) in [
        (&alice_phone, &mut alice_phone_events),
        (&alice_laptop, &mut alice_laptop_events),
        (&carol, &mut carol_events),
    ] {
        receive(client, events, reply.id, &bob, &group, "hi all").await;
    }
    assert_no_message(&mut bob_events, "bob").await;

    settled(&server).await;
    // Carol, over REST, to the group as she learnt it.
    let from_carol = carol.send_group(&learnt, "hi from carol").await.unwrap();
    assert_eq!(rows(&server.db).await, (3, 1));
    for (client, events) in [
        (&alice_phone, &mut alice_phone_events),
        (&alice_laptop, &mut alice_laptop_events),
        (&bob, &mut bob_events),
    ] {
        receive(
            client,
            events,
            from_carol.id,
            &carol,
            &group,
            "hi from carol",
        )
        .await;
    }

    // Alice's laptop, the sender now: the phone gets the sync copy.
    let from_laptop = alice_laptop
        .send_group(&group, "from my laptop")
        .await
        .unwrap();
    for (client, events) in [
        (&alice_phone, &mut alice_phone_events),
        (&bob, &mut bob_events),
        (&carol, &mut carol_events),
    ] {
        receive(
            client,
            events,
            from_laptop.id,
            &alice_laptop,
            &group,
            "from my laptop",
        )
        .await;
    }

    // Messages between two people are as before: no group.
    let direct = bob.send(carol.user_id(), "just us").await.unwrap();
    let m = message(&mut carol_events).await;
    assert_eq!(
        (m.id, m.text.as_str(), m.group.as_ref()),
        (direct.id, "just us", None)
    );
    carol.ack(&[m.id]).await.unwrap();

    settled(&server).await;
}

async fn a_group_send_recovers_from_a_member_adding_a_device(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server.api, "alice").await;
    let bob_phone = register(&server.api, "bob").await;
    let carol = register(&server.api, "carol").await;
    let _alice_events = online(&alice).await;
    let mut bob_phone_events = online(&bob_phone).await;
    let mut carol_events = online(&carol).await;
    let group = alice
        .new_group("plans", [bob_phone.user_id(), carol.user_id()])
        .unwrap();
    // Alice caches Bob's one device with this send.
    let first = alice.send_group(&group, "one device").await.unwrap();
    receive(
        &bob_phone,
        &mut bob_phone_events,
        first.id,
        &alice,
        &group,
        "one device",
    )
    .await;
    receive(
        &carol,
        &mut carol_events,
        first.id,
        &alice,
        &group,
        "one device",
    )
    .await;

    // Bob adds a laptop behind Alice's back: her cached directory is
    // stale, the server answers `devices_changed` naming Bob, and the
    // client seals keys for Bob's devices again and sends once more.
    let bob_laptop = add_device(&server.api, "bob", "laptop").await;
    let mut bob_laptop_events = online(&bob_laptop).await;
    settled(&server).await;
    let second = alice.send_group(&group, "two devices").await.unwrap();
    assert_ne!(second.id, first.id);
    // Bob's two devices and Carol: one send, one shared body.
    assert_eq!(rows(&server.db).await, (3, 1));
    for (client, events) in [
        (&bob_phone, &mut bob_phone_events),
        (&bob_laptop, &mut bob_laptop_events),
        (&carol, &mut carol_events),
    ] {
        receive(client, events, second.id, &alice, &group, "two devices").await;
    }
    settled(&server).await;
}
