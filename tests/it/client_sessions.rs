//! The Rust client's sessions and limits against the real server: signing
//! up on the register answer's session, resuming a stored session without
//! the password, keeping it across refreshes, the server's limits checked
//! before sealing, typing notices, and what a device change is about.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sealpost_client::{
    Client, ConnectOptions, DeviceChange, DeviceChangeReason, DeviceKeys, Error, Event, Events,
    SessionTokens,
};
use tokio::time::{Instant, timeout_at};

use crate::backend_tests;
use crate::common::{Backend, PASSWORD, TestServer, eventually};

backend_tests!(
    signing_up_costs_one_auth_request,
    a_stored_session_resumes_without_the_password,
    a_kept_session_follows_every_refresh,
    a_message_too_large_once_sealed_is_refused_before_it_is_sent,
    the_servers_own_body_limit_is_learnt_from_it,
    typing_reaches_the_peer_and_is_not_stored,
    device_changes_say_which_device_and_why,
    a_device_added_while_offline_is_told_on_reconnect,
    a_durable_ack_returns_once_the_copy_is_gone,
);

const WAIT: Duration = Duration::from_secs(20);

async fn wait_for<T>(
    events: &mut Events,
    what: &str,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let event = timeout_at(deadline, events.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
            .unwrap_or_else(|| panic!("{what}: the event stream ended"));
        if let Some(found) = pick(event) {
            return found;
        }
    }
}

async fn online(client: &Client) -> Events {
    let mut events = client.connect(ConnectOptions::default()).unwrap();
    wait_for(&mut events, "drained", |e| {
        matches!(e, Event::Drained).then_some(())
    })
    .await;
    events
}

async fn register(server: &TestServer, username: &str) -> Client {
    Client::register(&server.api.base, username, PASSWORD, DeviceKeys::generate())
        .await
        .unwrap_or_else(|e| panic!("register {username}: {e}"))
}

/// Messages queued for `client`'s device, over REST.
async fn queued(server: &TestServer, client: &Client) -> usize {
    let token = client.session_tokens().access_token;
    let page = server
        .api
        .get("/v1/messages", Some(&token))
        .await
        .expect(200);
    page["messages"].as_array().unwrap().len()
}

/// One auth request a minute, and one at once: a sign-up that logged in
/// after registering would be refused its login.
async fn signing_up_costs_one_auth_request(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &["--auth-rate-per-minute", "1", "--auth-rate-burst", "1"],
    )
    .await;
    let alice = register(&server, "alice").await;
    assert_eq!(alice.device_id(), 1);
    assert_eq!(alice.username(), "alice");
    // The session works: an authenticated call and a socket.
    assert_eq!(alice.find_user("alice").await.unwrap().id, alice.user_id());
    let _events = online(&alice).await;
    // And the limit is met now: the next auth request is refused.
    let refused = Client::login(&server.api.base, "alice", PASSWORD, 1, alice.keys().clone()).await;
    assert!(
        matches!(refused, Err(Error::RateLimited { .. })),
        "{refused:?}"
    );
}

async fn a_stored_session_resumes_without_the_password(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server, "alice").await;
    let bob = register(&server, "bob").await;
    let keys = alice.keys().clone();
    let stored = alice.session_tokens();
    alice.close();
    drop(alice);

    // A live access token: used as it is.
    let alice = Client::resume(&server.api.base, stored.clone(), keys.clone())
        .await
        .unwrap();
    assert_eq!(alice.username(), "alice");
    assert_eq!(alice.session_tokens(), stored);
    alice.send(bob.user_id(), "resumed").await.unwrap();
    assert_eq!(queued(&server, &bob).await, 1);
    alice.close();

    // An access token about to end: refreshed first, so the pair changes.
    let ending = SessionTokens {
        expires_at: chrono::Utc::now(),
        ..stored.clone()
    };
    let alice = Client::resume(&server.api.base, ending, keys.clone())
        .await
        .unwrap();
    let fresh = alice.session_tokens();
    assert_ne!(fresh.refresh_token, stored.refresh_token);
    assert!(fresh.remaining() > Duration::from_secs(60), "{fresh:?}");
    alice.send(bob.user_id(), "refreshed").await.unwrap();
    assert_eq!(queued(&server, &bob).await, 2);

    // After a logout the session is over: resuming says so, typed.
    alice.logout().await.unwrap();
    let ended = Client::resume(&server.api.base, fresh, keys).await;
    assert!(matches!(ended, Err(Error::Unauthorized(_))), "{ended:?}");
}

async fn a_kept_session_follows_every_refresh(backend: Backend) {
    let server = TestServer::start_with(backend, &["--access-token-ttl", "3s"]).await;
    let alice = register(&server, "alice").await;
    let bob = register(&server, "bob").await;
    let kept: Arc<Mutex<Vec<SessionTokens>>> = Arc::default();
    let store = kept.clone();
    alice.on_session_tokens(move |tokens| store.lock().unwrap().push(tokens.clone()));
    // At once, the pair in force; then each refresh's.
    assert_eq!(kept.lock().unwrap().len(), 1);
    eventually("two refreshes", async || {
        (kept.lock().unwrap().len() >= 3).then_some(())
    })
    .await;
    let keys = alice.keys().clone();
    alice.close();
    drop(alice);
    let latest = kept.lock().unwrap().last().unwrap().clone();
    let refresh_tokens: std::collections::BTreeSet<String> = kept
        .lock()
        .unwrap()
        .iter()
        .map(|t| t.refresh_token.clone())
        .collect();
    assert!(
        refresh_tokens.len() >= 3,
        "every refresh stored a new token"
    );
    let alice = Client::resume(&server.api.base, latest, keys)
        .await
        .unwrap();
    alice.send(bob.user_id(), "still me").await.unwrap();
    assert_eq!(queued(&server, &bob).await, 1);
}

async fn a_message_too_large_once_sealed_is_refused_before_it_is_sent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server, "alice").await;
    let bob = register(&server, "bob").await;
    // Within the 16,384 characters, but 65,536 bytes of text alone: over
    // the server's 65,536-byte sealed body.
    let emoji = "😀".repeat(16_384);
    match alice.send(bob.user_id(), &emoji).await {
        Err(Error::TooLarge(message)) => {
            assert!(message.contains("once sealed"), "{message}");
            assert!(message.contains("65536"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Over the character limit: refused as invalid text.
    let long = "x".repeat(16_385);
    assert!(matches!(
        alice.send(bob.user_id(), &long).await,
        Err(Error::Invalid { field: Some(f), .. }) if f == "text"
    ));
    // Nothing went; what fits does.
    assert_eq!(queued(&server, &bob).await, 0);
    let fits = "😀".repeat(16_000);
    alice.send(bob.user_id(), &fits).await.unwrap();
    assert_eq!(queued(&server, &bob).await, 1);
}

/// A server configured for smaller bodies says so (`GET /v1/limits`), and
/// the client refuses by its number, not the default.
async fn the_servers_own_body_limit_is_learnt_from_it(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-body-bytes", "4096"]).await;
    let alice = register(&server, "alice").await;
    let bob = register(&server, "bob").await;
    assert_eq!(alice.limits().await.max_body_bytes, 4096);
    match alice.send(bob.user_id(), &"x".repeat(5_000)).await {
        Err(Error::TooLarge(message)) => {
            assert!(message.contains("at most 4096"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(queued(&server, &bob).await, 0);
}

async fn typing_reaches_the_peer_and_is_not_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server, "alice").await;
    let bob = register(&server, "bob").await;
    let _alice_events = online(&alice).await;
    let mut bob_events = online(&bob).await;
    assert!(alice.send_typing(bob.user_id(), false).await.unwrap());
    let (from, stopped) = wait_for(&mut bob_events, "typing", |e| match e {
        Event::Typing { from, stopped, .. } => Some((from, stopped)),
        Event::Message(m) => panic!("typing shown as a message: {m:?}"),
        _ => None,
    })
    .await;
    assert_eq!((from, stopped), (alice.user_id(), false));
    assert!(alice.send_typing(bob.user_id(), true).await.unwrap());
    let stopped = wait_for(&mut bob_events, "stopped typing", |e| match e {
        Event::Typing { stopped, .. } => Some(stopped),
        _ => None,
    })
    .await;
    assert!(stopped);
    // Then a message: the next event, nothing stored before it.
    let sent = alice.send(bob.user_id(), "done typing").await.unwrap();
    let got = wait_for(&mut bob_events, "the message", |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(got.id, sent.id);
    assert_eq!(queued(&server, &bob).await, 1);
}

async fn device_changes_say_which_device_and_why(backend: Backend) {
    let server = TestServer::start(backend).await;
    let phone = register(&server, "alice").await;
    let mut phone_events = online(&phone).await;

    let laptop_keys = DeviceKeys::generate();
    let laptop = Client::add_device(
        &server.api.base,
        "alice",
        PASSWORD,
        laptop_keys.clone(),
        Some("laptop"),
    )
    .await
    .unwrap();
    let change = wait_for(&mut phone_events, "device added", |e| match e {
        Event::DevicesChanged { change, .. } => Some(change),
        _ => None,
    })
    .await;
    assert_eq!(
        change,
        Some(DeviceChange {
            device_id: 2,
            reason: DeviceChangeReason::Added
        })
    );
    laptop.close();

    // The laptop signs in again with the password: the phone is told.
    let _laptop = Client::login(&server.api.base, "alice", PASSWORD, 2, laptop_keys)
        .await
        .unwrap();
    let change = wait_for(&mut phone_events, "device logged in", |e| match e {
        Event::DevicesChanged { change, .. } => Some(change),
        _ => None,
    })
    .await;
    assert_eq!(
        change,
        Some(DeviceChange {
            device_id: 2,
            reason: DeviceChangeReason::Login
        })
    );
}

/// The `ready` frame lists the account's devices: a device added while no
/// socket of this one was open is told when it connects.
async fn a_device_added_while_offline_is_told_on_reconnect(backend: Backend) {
    let server = TestServer::start(backend).await;
    let phone = register(&server, "alice").await;
    let _laptop = Client::add_device(
        &server.api.base,
        "alice",
        PASSWORD,
        DeviceKeys::generate(),
        Some("laptop"),
    )
    .await
    .unwrap();
    let mut events = phone.connect(ConnectOptions::default()).unwrap();
    let (added, change) = wait_for(&mut events, "devices changed", |e| match e {
        Event::DevicesChanged { added, change, .. } => Some((added, change)),
        Event::Drained => panic!("drained without telling of the new device"),
        _ => None,
    })
    .await;
    assert_eq!(added, vec![2]);
    assert_eq!(change, None);
}

async fn a_durable_ack_returns_once_the_copy_is_gone(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server, "alice").await;
    let bob = register(&server, "bob").await;
    let mut bob_events = online(&bob).await;
    let mut ids = Vec::new();
    for text in ["one", "two", "three"] {
        ids.push(alice.send(bob.user_id(), text).await.unwrap().id);
    }
    for _ in 0..3 {
        wait_for(&mut bob_events, "a message", |e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .await;
    }
    assert_eq!(queued(&server, &bob).await, 3);
    let started = Instant::now();
    bob.ack_durable(&ids).await.unwrap();
    // Answered by `acked`, not after the wait for one that never comes.
    assert!(started.elapsed() < Duration::from_secs(5));
    // Durable: gone at once, no waiting for a batch.
    assert_eq!(queued(&server, &bob).await, 0);
}
