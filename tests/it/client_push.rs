//! The Rust client's push targets against a server with Web Push and APNs
//! (not FCM): the VAPID key, a target set, listed, replaced, refused and
//! deleted, a dropped target told on the next socket's `ready` as
//! [`Event::PushTargetDropped`], and a server without Web Push.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use sealpost_client::{
    Client, ConnectOptions, ConnectionState, DeviceKeys, Error, Event, Events, PushKind, PushTarget,
};
use tokio::time::timeout;

use crate::backend_tests;
use crate::common::{Backend, PASSWORD, TestServer};
use crate::push_targets::{AUTH, P256DH, PUSH_HOST, push_server};

backend_tests!(
    the_client_sets_lists_and_deletes_its_target,
    the_client_is_told_of_a_dropped_target,
    a_server_without_web_push_has_no_vapid_key,
);

async fn signed_up(server: &TestServer, name: &str) -> Client {
    Client::register(&server.api.base, name, PASSWORD, DeviceKeys::generate())
        .await
        .expect("signs up")
}

fn subscription(n: u32) -> PushTarget {
    PushTarget::web_push(format!("https://{PUSH_HOST}/sub/{n}"), P256DH, AUTH)
}

/// This device's `push` as `GET /v1/devices` lists it.
async fn own_push(client: &Client) -> Option<PushKind> {
    let devices = client.devices().await.expect("lists devices");
    let me = devices
        .iter()
        .find(|d| d.current)
        .expect("the current device is listed");
    me.push.as_ref().map(|p| p.kind)
}

async fn the_client_sets_lists_and_deletes_its_target(backend: Backend) {
    let server = push_server(backend).await;
    let alice = signed_up(&server, "alice").await;
    let key = alice
        .vapid_public_key()
        .await
        .unwrap()
        .expect("Web Push is on");
    assert_eq!(
        URL_SAFE_NO_PAD.decode(&key).unwrap(),
        server.vapid.to_encoded_point(false).as_bytes()
    );
    assert_eq!(own_push(&alice).await, None);

    let set = alice.set_push_target(&subscription(1)).await.unwrap();
    assert_eq!(set.kind, PushKind::WebPush);
    assert_eq!(own_push(&alice).await, Some(PushKind::WebPush));
    // Idempotent; then replaced by an APNs token.
    alice.set_push_target(&subscription(1)).await.unwrap();
    let apns = alice
        .set_push_target(&PushTarget::apns_sandbox(
            "ab".repeat(32),
            "com.example.app",
        ))
        .await
        .unwrap();
    assert_eq!(apns.kind, PushKind::Apns);
    assert!(apns.updated_at >= set.updated_at);
    assert_eq!(own_push(&alice).await, Some(PushKind::Apns));

    // Refused: no FCM here; an endpoint on a private address.
    match alice.set_push_target(&PushTarget::fcm("token")).await {
        Err(Error::PushUnavailable(message)) => assert!(message.contains("fcm"), "{message}"),
        other => panic!("{other:?}"),
    }
    let private = PushTarget::web_push("https://10.0.0.1/sub", P256DH, AUTH);
    match alice.set_push_target(&private).await {
        Err(Error::Invalid { field, .. }) => assert_eq!(field.as_deref(), Some("endpoint")),
        other => panic!("{other:?}"),
    }
    assert_eq!(own_push(&alice).await, Some(PushKind::Apns), "kept");

    alice.delete_push_target().await.unwrap();
    assert_eq!(own_push(&alice).await, None);
    alice.delete_push_target().await.expect("none: still 204");
    alice.close();
    server.server.stop().await;
}

/// Events up to the first `Connected`, and what follows it within a
/// moment; the socket's events of one connection.
async fn ready_events(events: &mut Events) -> Vec<Event> {
    let mut seen = Vec::new();
    loop {
        let event = timeout(Duration::from_secs(30), events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on");
        let done = matches!(event, Event::Drained);
        seen.push(event);
        if done {
            return seen;
        }
    }
}

async fn the_client_is_told_of_a_dropped_target(backend: Backend) {
    use sealpost::store::{self, StoreOptions};

    let server = push_server(backend).await;
    let alice = signed_up(&server, "alice").await;
    let mut events = alice.connect(ConnectOptions::default()).unwrap();
    let first = ready_events(&mut events).await;
    assert!(
        matches!(
            first.first(),
            Some(Event::State(ConnectionState::Connecting { .. }))
        ),
        "{first:?}"
    );
    assert!(
        !first.iter().any(|e| matches!(e, Event::PushTargetDropped)),
        "{first:?}"
    );
    // Set after the socket read the device's state: the server's cache of
    // targets is told of the change, and reads the dropping below anew
    // (the scheduler tells it of a drop; this test drops in the database).
    let set = alice.set_push_target(&subscription(7)).await.unwrap();
    alice.close();

    // The push service said it is gone (what the scheduler does on a 410).
    let db = store::connect(&StoreOptions {
        url: server.db.url.clone(),
        pool_size: 1,
    })
    .await
    .unwrap();
    assert!(
        db.drop_target(alice.user_id(), 1, set.updated_at)
            .await
            .unwrap()
    );

    let again = Client::resume(
        &server.api.base,
        alice.session_tokens(),
        alice.keys().clone(),
    )
    .await
    .unwrap();
    let mut events = again.connect(ConnectOptions::default()).unwrap();
    let second = ready_events(&mut events).await;
    let connected = second
        .iter()
        .position(|e| matches!(e, Event::State(ConnectionState::Connected { .. })))
        .expect("connected");
    assert!(
        matches!(second.get(connected + 1), Some(Event::PushTargetDropped)),
        "told right after ready: {second:?}"
    );
    assert_eq!(
        own_push(&again).await,
        None,
        "a dropped target lists as none"
    );
    // Registered again: the next socket is not told.
    again.set_push_target(&subscription(8)).await.unwrap();
    again.close();
    let third = Client::resume(
        &server.api.base,
        again.session_tokens(),
        again.keys().clone(),
    )
    .await
    .unwrap();
    let mut events = third.connect(ConnectOptions::default()).unwrap();
    let seen = ready_events(&mut events).await;
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::State(ConnectionState::Connected { .. }))),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|e| matches!(e, Event::PushTargetDropped)),
        "{seen:?}"
    );
    third.close();
    server.server.stop().await;
}

async fn a_server_without_web_push_has_no_vapid_key(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = signed_up(&server, "bob").await;
    assert_eq!(bob.vapid_public_key().await.unwrap(), None);
    match bob.set_push_target(&subscription(1)).await {
        Err(Error::PushUnavailable(_)) => {}
        other => panic!("{other:?}"),
    }
    bob.close();
    server.stop().await;
}
