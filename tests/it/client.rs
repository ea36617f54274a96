//! The Rust client (`sealpost-client`) against the real server: sealed
//! conversations between multi-device accounts, a restart and a token
//! expiry in the middle of one, the directory going stale, ephemeral
//! sends, receipts, polling, and the typed errors.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sealpost_client::{
    Client, ConnectOptions, ConnectionState, DeviceKeys, Error, Event, Events, Incoming,
    PollOptions,
};
use tokio::time::{Instant, timeout_at};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::proxy::{Cut, LossyProxy};
use crate::common::ws::close;
use crate::common::{
    self, Account, Api, Backend, PASSWORD, ServerProcess, TestDb, TestServer, eventually,
    free_local_addr,
};
use crate::sealed::{Raw, hex};

backend_tests!(
    two_users_with_two_devices_each_exchange_sealed_messages,
    a_server_restart_mid_conversation_loses_and_repeats_nothing,
    a_conversation_across_access_token_expiry_keeps_its_socket,
    a_stale_directory_recovers_from_devices_changed,
    ephemeral_sends_reach_only_connected_devices_and_are_not_stored,
    receipts_reach_every_device_of_the_sender,
    polling_feeds_the_same_stream_and_settles_the_queue,
    refusals_arrive_as_typed_errors,
    the_socket_does_not_reconnect_after_4409_or_4429,
    a_rest_send_whose_answer_is_lost_is_stored_once,
    a_socket_send_whose_sent_is_lost_is_stored_once,
);

/// The longest a test waits for one event.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Backoff short enough for a restart within a test.
pub(crate) fn fast() -> ConnectOptions {
    ConnectOptions {
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
        ..ConnectOptions::default()
    }
}

/// The next event for which `pick` answers `Some`, skipping the others;
/// panics after [`WAIT`].
pub(crate) async fn wait_for<T>(
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

pub(crate) async fn message(events: &mut Events) -> Incoming {
    wait_for(events, "a message", |e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await
}

async fn drained(events: &mut Events) {
    wait_for(events, "drained", |e| {
        matches!(e, Event::Drained).then_some(())
    })
    .await
}

/// Connects `client` and waits for the end of its backlog.
pub(crate) async fn online(client: &Client) -> Events {
    let mut events = client.connect(fast()).expect("connect");
    drained(&mut events).await;
    events
}

pub(crate) async fn register(api: &Api, username: &str) -> Client {
    Client::register(&api.base, username, PASSWORD, DeviceKeys::generate())
        .await
        .unwrap_or_else(|e| panic!("register {username}: {e}"))
}

pub(crate) async fn add_device(api: &Api, username: &str, name: &str) -> Client {
    Client::add_device(
        &api.base,
        username,
        PASSWORD,
        DeviceKeys::generate(),
        Some(name),
    )
    .await
    .unwrap_or_else(|e| panic!("add a device to {username}: {e}"))
}

/// A session of `client`'s device for the harness's own requests.
async fn harness_session(api: &Api, client: &Client) -> Account {
    let tokens = api
        .login_device(client.username(), i64::from(client.device_id()))
        .await
        .expect(200);
    let who = Account {
        id: client.user_id(),
        username: client.username().to_owned(),
        access: String::new(),
        refresh: String::new(),
    };
    common::session(&who, &tokens)
}

#[track_caller]
fn assert_incoming(m: &Incoming, id: Uuid, from: &Client, text: &str, to: Option<Uuid>) {
    assert_eq!(m.id, id, "{m:?}");
    assert_eq!(m.from, from.user_id(), "{m:?}");
    assert_eq!(m.from_device, from.device_id(), "{m:?}");
    assert_eq!(m.text, text, "{m:?}");
    assert_eq!(m.to, to, "{m:?}");
    assert!(!m.ephemeral, "{m:?}");
}

async fn two_users_with_two_devices_each_exchange_sealed_messages(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice_phone = register(&server.api, "alice").await;
    let alice_laptop = add_device(&server.api, "alice", "laptop").await;
    let bob_phone = register(&server.api, "bob").await;
    let bob_laptop = add_device(&server.api, "bob", "laptop").await;
    assert_eq!((alice_laptop.device_id(), bob_laptop.device_id()), (2, 2));
    let mut alice_phone_events = online(&alice_phone).await;
    let mut alice_laptop_events = online(&alice_laptop).await;
    let mut bob_phone_events = online(&bob_phone).await;
    let mut bob_laptop_events = online(&bob_laptop).await;

    // Alice's phone to Bob: both of Bob's devices, and a sync copy to
    // Alice's laptop, all under one client id.
    let to_bob = format!("attack at dawn {}", Uuid::new_v4());
    let sent = alice_phone
        .send(bob_phone.user_id(), &to_bob)
        .await
        .unwrap();
    assert!(sent.sync_error.is_none(), "{:?}", sent.sync_error);
    for events in [&mut bob_phone_events, &mut bob_laptop_events] {
        let got = message(events).await;
        assert_incoming(&got, sent.id, &alice_phone, &to_bob, None);
        assert_eq!(got.client_id, sent.client_id);
    }
    let sync = message(&mut alice_laptop_events).await;
    let alice_sync = sync.id;
    assert_ne!(sync.id, sent.id, "the sync copy is a message of its own");
    assert_incoming(
        &sync,
        sync.id,
        &alice_phone,
        &to_bob,
        Some(bob_phone.user_id()),
    );
    assert_eq!(sync.client_id, sent.client_id);

    // Bob's laptop answers: both of Alice's devices, and Bob's phone.
    let to_alice = format!("retreat at noon {}", Uuid::new_v4());
    let reply = bob_laptop
        .send(alice_phone.user_id(), &to_alice)
        .await
        .unwrap();
    assert!(reply.sync_error.is_none(), "{:?}", reply.sync_error);
    for events in [&mut alice_phone_events, &mut alice_laptop_events] {
        let got = message(events).await;
        assert_incoming(&got, reply.id, &bob_laptop, &to_alice, None);
        assert_eq!(got.client_id, reply.client_id);
    }
    let sync = message(&mut bob_phone_events).await;
    let bob_sync = sync.id;
    assert_incoming(
        &sync,
        sync.id,
        &bob_laptop,
        &to_alice,
        Some(alice_phone.user_id()),
    );

    // What the server holds and hands out is sealed: each copy queued for
    // Bob's phone is a body of the client format, and no row of the
    // database holds either text, as text or as bytes.
    let bob_session = harness_session(&server.api, &bob_phone).await;
    let queued = server.inbox(&bob_session).await;
    assert_eq!(queued.len(), 2, "{queued:?}");
    for item in &queued {
        let body = common::body(item);
        assert_eq!(body[0], 0x01, "version byte");
        assert!(body.len() >= 41 + to_bob.len().min(to_alice.len()));
        for text in [&to_bob, &to_alice] {
            assert!(
                !body.windows(text.len()).any(|w| w == text.as_bytes()),
                "a plaintext on the wire"
            );
        }
    }
    let rows = Raw::open(&server.db).await.dump().await;
    assert!(
        rows.len() >= 4,
        "the unacknowledged copies are stored: {rows:?}"
    );
    for text in [&to_bob, &to_alice] {
        let (plain, bytes) = (text.to_lowercase(), hex(text.as_bytes()));
        assert!(
            rows.iter()
                .all(|r| !r.contains(&plain) && !r.contains(&bytes)),
            "a plaintext in the database"
        );
    }

    // Acknowledged on every device, nothing is left for any of them.
    alice_phone.ack(&[reply.id]).await.unwrap();
    alice_laptop.ack(&[reply.id, alice_sync]).await.unwrap();
    bob_phone.ack(&[sent.id, bob_sync]).await.unwrap();
    bob_laptop.ack(&[sent.id]).await.unwrap();
    for client in [&alice_phone, &alice_laptop, &bob_phone, &bob_laptop] {
        let session = harness_session(&server.api, client).await;
        eventually("every copy acknowledged", async || {
            server.inbox(&session).await.is_empty().then_some(())
        })
        .await;
    }
}

async fn a_server_restart_mid_conversation_loses_and_repeats_nothing(backend: Backend) {
    const TOTAL: usize = 60;
    const KILL_AFTER: usize = 15;
    let db = TestDb::new(backend).await;
    let addr = free_local_addr();
    let env = [("SEALPOST_ADDR", addr.as_str())];
    let mut server = Some(ServerProcess::spawn(&db.url, &env));
    let api = server.as_ref().unwrap().api.clone();
    let alice = register(&api, "alice").await;
    let bob = register(&api, "bob").await;
    let mut alice_events = online(&alice).await;
    let mut bob_events = online(&bob).await;

    // Alice keeps talking, paced so that the restart lands mid-stream;
    // each send returns once the server holds it.
    let (sender, to) = (alice.clone(), bob.user_id());
    let talking = tokio::spawn(async move {
        let mut sent = Vec::new();
        for n in 0..TOTAL {
            let text = format!("m{n}");
            sent.push(sender.send(to, &text).await.expect("send").client_id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });

    let mut received: Vec<Incoming> = Vec::new();
    let mut bob_states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while received.len() < TOTAL {
        let event = timeout_at(deadline, bob_events.next())
            .await
            .expect("the whole conversation within 90 s")
            .expect("bob's events");
        match event {
            Event::Message(m) => {
                bob.ack(&[m.id]).await.unwrap();
                received.push(m);
                if received.len() == KILL_AFTER {
                    server.take().unwrap().kill9();
                    let (url, env) = (db.url.clone(), addr.clone());
                    server = Some(
                        tokio::task::spawn_blocking(move || {
                            ServerProcess::spawn(&url, &[("SEALPOST_ADDR", env.as_str())])
                        })
                        .await
                        .unwrap(),
                    );
                }
            }
            Event::State(state) => bob_states.push(state),
            _ => {}
        }
    }
    let sent = talking.await.unwrap();
    // Every message once, in the order sent.
    let texts: Vec<&str> = received.iter().map(|m| m.text.as_str()).collect();
    let expected: Vec<String> = (0..TOTAL).map(|n| format!("m{n}")).collect();
    assert_eq!(texts, expected, "lost, repeated or out of order");
    let client_ids: Vec<Uuid> = received.iter().map(|m| m.client_id).collect();
    assert_eq!(client_ids, sent);
    // The restart was seen, and survived, by the socket.
    assert!(
        bob_states
            .iter()
            .any(|s| matches!(s, ConnectionState::Disconnected { .. })),
        "{bob_states:?}"
    );
    assert!(
        matches!(bob_states.last(), Some(ConnectionState::Connected { .. })),
        "{bob_states:?}"
    );
    // Nothing is left in Bob's queue once he acknowledged what he saw: a
    // send written again after the restart carried its `client_id`, and
    // was not stored a second time.
    let restarted = server.as_ref().unwrap();
    let session = harness_session(&restarted.api, &bob).await;
    eventually("bob's queue settles", async || {
        restarted.inbox(&session).await.is_empty().then_some(())
    })
    .await;
    // Alice's socket is back too: Bob's answer reaches her.
    let answer = bob.send(alice.user_id(), "all received").await.unwrap();
    let got = message(&mut alice_events).await;
    assert_eq!((got.id, got.text.as_str()), (answer.id, "all received"));
}

async fn a_conversation_across_access_token_expiry_keeps_its_socket(backend: Backend) {
    let server = TestServer::start_with(backend, &["--access-token-ttl", "3s"]).await;
    let alice = register(&server.api, "alice").await;
    let bob = register(&server.api, "bob").await;
    let mut alice_events = online(&alice).await;
    let mut bob_events = online(&bob).await;

    // Three renewals in place: the last comes after the first token's
    // expiry (3 s after login; a renewal every 1.5 s). The socket never
    // changes state meanwhile.
    let no_state_change = |what: &'static str| {
        move |event: Event| match event {
            Event::State(state) => panic!("{what}: the socket changed state: {state:?}"),
            Event::Renewed { expires_at } => Some(expires_at),
            _ => None,
        }
    };
    let started = Instant::now();
    let mut last = None;
    for _ in 0..3 {
        let renewed = wait_for(&mut alice_events, "alice renews", no_state_change("alice")).await;
        if let Some(previous) = last {
            assert!(renewed > previous, "each renewal extends the socket's life");
        }
        last = Some(renewed);
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "past the first token's life"
    );

    // Messages still flow both ways on the same sockets.
    let sent = alice.send(bob.user_id(), "still here?").await.unwrap();
    let got = wait_for(&mut bob_events, "bob's message", |e| match e {
        Event::State(state) => panic!("bob's socket changed state: {state:?}"),
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await;
    assert_incoming(&got, sent.id, &alice, "still here?", None);
    let reply = bob.send(alice.user_id(), "still here").await.unwrap();
    let got = wait_for(&mut alice_events, "alice's message", |e| match e {
        Event::State(state) => panic!("alice's socket changed state: {state:?}"),
        Event::Message(m) => Some(m),
        _ => None,
    })
    .await;
    assert_incoming(&got, reply.id, &bob, "still here", None);
    // And REST calls too, on the refreshed token.
    assert_eq!(alice.find_user("bob").await.unwrap().id, bob.user_id());
}

async fn a_stale_directory_recovers_from_devices_changed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server.api, "alice").await;
    let bob_phone = register(&server.api, "bob").await;
    let mut alice_events = online(&alice).await;
    let mut bob_phone_events = online(&bob_phone).await;
    // Alice caches Bob's one device.
    let first = alice.send(bob_phone.user_id(), "one device").await.unwrap();
    assert_eq!(message(&mut bob_phone_events).await.id, first.id);

    // Bob adds a laptop: his phone is told, and which device is new.
    let bob_laptop = add_device(&server.api, "bob", "laptop").await;
    let mut bob_laptop_events = online(&bob_laptop).await;
    let (devices, added) = wait_for(&mut bob_phone_events, "devices changed", |e| match e {
        Event::DevicesChanged { devices, added, .. } => Some((devices, added)),
        _ => None,
    })
    .await;
    assert_eq!(added, vec![2]);
    let ids: Vec<u32> = devices.iter().map(|d| d.device_id).collect();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(devices[1].name.as_deref(), Some("laptop"));

    // Alice's directory is stale: the server refuses, the client fetches
    // it again, seals for both devices and sends again.
    let second = alice
        .send(bob_phone.user_id(), "two devices")
        .await
        .unwrap();
    for events in [&mut bob_phone_events, &mut bob_laptop_events] {
        let got = message(events).await;
        assert_incoming(&got, second.id, &alice, "two devices", None);
    }
    // Bob's phone's own directory followed the frame: the sync copy of its
    // next message reaches the laptop.
    let third = bob_phone
        .send(alice.user_id(), "from my phone")
        .await
        .unwrap();
    assert!(third.sync_error.is_none(), "{:?}", third.sync_error);
    let sync = message(&mut bob_laptop_events).await;
    assert_eq!(sync.to, Some(alice.user_id()));
    assert_eq!(sync.client_id, third.client_id);
    assert_eq!(message(&mut alice_events).await.id, third.id);

    // The laptop goes: Alice's directory now has a device too many.
    bob_phone.remove_device(2, PASSWORD).await.unwrap();
    let added = wait_for(&mut bob_phone_events, "devices changed", |e| match e {
        Event::DevicesChanged { devices, added, .. } => Some((devices.len(), added)),
        _ => None,
    })
    .await;
    assert_eq!(added, (1, vec![]));
    let fourth = alice.send(bob_phone.user_id(), "one again").await.unwrap();
    assert_eq!(message(&mut bob_phone_events).await.id, fourth.id);
}

async fn ephemeral_sends_reach_only_connected_devices_and_are_not_stored(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server.api, "alice").await;
    let bob = register(&server.api, "bob").await;
    // Without a socket, an ephemeral send cannot go.
    assert!(matches!(
        alice.send_ephemeral(bob.user_id(), "typing").await,
        Err(Error::NotConnected)
    ));
    let _alice_events = online(&alice).await;
    // Bob is offline: nobody takes it.
    assert!(!alice.send_ephemeral(bob.user_id(), "typing").await.unwrap());

    let mut bob_events = online(&bob).await;
    assert!(alice.send_ephemeral(bob.user_id(), "typing").await.unwrap());
    let got = message(&mut bob_events).await;
    assert!(got.ephemeral, "{got:?}");
    assert_eq!((got.text.as_str(), got.from), ("typing", alice.user_id()));
    // Never stored: Bob's queue is empty without an ack.
    let session = harness_session(&server.api, &bob).await;
    assert!(server.inbox(&session).await.is_empty());
}

async fn receipts_reach_every_device_of_the_sender(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server.api, "alice").await;
    let alice_laptop = add_device(&server.api, "alice", "laptop").await;
    let bob_phone = register(&server.api, "bob").await;
    let bob_laptop = add_device(&server.api, "bob", "laptop").await;
    let mut alice_events = online(&alice).await;
    let mut laptop_events = online(&alice_laptop).await;
    let mut bob_phone_events = online(&bob_phone).await;
    let mut bob_laptop_events = online(&bob_laptop).await;

    let sent = alice
        .send(bob_phone.user_id(), "did it arrive?")
        .await
        .unwrap();
    let on_phone = message(&mut bob_phone_events).await;
    let on_laptop = message(&mut bob_laptop_events).await;
    bob_phone.ack(&[on_phone.id]).await.unwrap();
    bob_laptop.ack(&[on_laptop.id]).await.unwrap();

    for events in [&mut alice_events, &mut laptop_events] {
        let mut devices = BTreeSet::new();
        while devices.len() < 2 {
            let (to, device) = wait_for(events, "a receipt", |e| match e {
                Event::Receipt { id, to, device_id } if id == sent.id => Some((to, device_id)),
                _ => None,
            })
            .await;
            assert_eq!(to, bob_phone.user_id());
            devices.insert(device);
        }
        assert_eq!(devices, BTreeSet::from([1, 2]));
    }
}

async fn polling_feeds_the_same_stream_and_settles_the_queue(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = register(&server.api, "alice").await;
    let bob = register(&server.api, "bob").await;
    // Sent over REST (no transport runs for Alice) before Bob polls.
    let mut sent = BTreeMap::new();
    for n in 0..3 {
        let text = format!("polled {n}");
        sent.insert(alice.send(bob.user_id(), &text).await.unwrap().id, text);
    }
    let mut events = bob
        .poll(PollOptions {
            interval: Duration::from_millis(200),
        })
        .unwrap();
    assert!(matches!(bob.connect(fast()), Err(Error::AlreadyStarted)));
    let mut got = BTreeMap::new();
    while got.len() < 3 {
        let m = message(&mut events).await;
        assert_eq!(m.from, alice.user_id());
        got.insert(m.id, m.text);
    }
    assert_eq!(got, sent);
    drained(&mut events).await;
    // Not acknowledged yet: every round reads them again, and nothing is
    // shown twice; the acks settle them on the server.
    let ids: Vec<Uuid> = got.keys().copied().collect();
    bob.ack(&ids).await.unwrap();
    let session = harness_session(&server.api, &bob).await;
    eventually("the polled messages are settled", async || {
        server.inbox(&session).await.is_empty().then_some(())
    })
    .await;
    // A later message arrives on the next round.
    let later = alice.send(bob.user_id(), "later").await.unwrap();
    let m = message(&mut events).await;
    assert_eq!((m.id, m.text.as_str()), (later.id, "later"));
}

async fn refusals_arrive_as_typed_errors(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--max-devices-per-user",
            "2",
            "--max-body-bytes",
            "200",
            "--max-queued-per-device",
            "1",
        ],
    )
    .await;
    let base = server.api.base.as_str();
    let alice = register(&server.api, "alice").await;
    let bob = register(&server.api, "bob").await;

    let taken = Client::register(base, "alice", PASSWORD, DeviceKeys::generate()).await;
    assert!(matches!(taken, Err(Error::Conflict(_))), "{taken:?}");
    let short = Client::register(base, "carol", "short", DeviceKeys::generate()).await;
    assert!(
        matches!(&short, Err(Error::Invalid { field: Some(f), .. }) if f == "password"),
        "{short:?}"
    );
    let wrong = Client::login(base, "alice", "not the password", 1, DeviceKeys::generate()).await;
    assert!(matches!(wrong, Err(Error::Unauthorized(_))), "{wrong:?}");
    let no_device = Client::login(base, "alice", PASSWORD, 7, DeviceKeys::generate()).await;
    assert!(
        matches!(no_device, Err(Error::NotFound(_))),
        "{no_device:?}"
    );
    let _laptop = add_device(&server.api, "alice", "laptop").await;
    let third = Client::add_device(base, "alice", PASSWORD, DeviceKeys::generate(), None).await;
    assert!(matches!(third, Err(Error::TooManyDevices)), "{third:?}");

    let nobody = alice.send(Uuid::new_v4(), "hello?").await;
    assert!(matches!(nobody, Err(Error::NotFound(_))), "{nobody:?}");
    let long = alice.send(bob.user_id(), &"x".repeat(300)).await;
    assert!(matches!(long, Err(Error::TooLarge(_))), "{long:?}");
    let too_long = alice.send(bob.user_id(), &"x".repeat(16_385)).await;
    assert!(
        matches!(&too_long, Err(Error::Invalid { field: Some(f), .. }) if f == "text"),
        "{too_long:?}"
    );
    // Bob's one queue slot fills; the next send is refused, nothing stored.
    alice.send(bob.user_id(), "first").await.unwrap();
    let full = alice.send(bob.user_id(), "second").await;
    assert!(matches!(full, Err(Error::QueueFull)), "{full:?}");
    let refused = alice.remove_device(2, "not the password").await;
    assert!(matches!(refused, Err(Error::Forbidden(_))), "{refused:?}");
    let only = bob.remove_device(1, PASSWORD).await;
    assert!(matches!(only, Err(Error::Conflict(_))), "{only:?}");
    for (error, code) in [
        (nobody.unwrap_err(), "not_found"),
        (full.unwrap_err(), "queue_full"),
    ] {
        assert_eq!(error.code(), Some(code));
    }

    // Over the sign-in rate limit: `rate_limited` with the server's wait.
    // Signing up takes the one auth request allowed (it opens a session:
    // no login after it).
    let limited = TestServer::start_with(
        backend,
        &["--auth-rate-per-minute", "1", "--auth-rate-burst", "1"],
    )
    .await;
    register(&limited.api, "dave").await;
    let again = Client::login(
        &limited.api.base,
        "dave",
        PASSWORD,
        1,
        DeviceKeys::generate(),
    )
    .await;
    match again {
        Err(Error::RateLimited { retry_after }) => assert!(retry_after > Duration::ZERO),
        other => panic!("{other:?}"),
    }
}

async fn the_socket_does_not_reconnect_after_4409_or_4429(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-connections-per-user", "1"]).await;
    let alice = register(&server.api, "alice").await;
    let _first = online(&alice).await;

    // A second socket of the same device is one too many: 4429, and the
    // client stops rather than retry in a loop.
    let same_device = Client::login(&server.api.base, "alice", PASSWORD, 1, alice.keys().clone())
        .await
        .unwrap();
    let mut second = same_device.connect(fast()).unwrap();
    let stopped = wait_for(&mut second, "the second socket stops", |e| match e {
        Event::State(ConnectionState::Stopped { code, reason }) => Some((code, reason)),
        Event::State(ConnectionState::Disconnected { code, .. }) => {
            panic!("reconnecting after {code:?}")
        }
        _ => None,
    })
    .await;
    let want = close::TOO_MANY_FOR_THE_DEVICE;
    assert_eq!(stopped, (Some(want.code), want.reason.to_owned()));
    let end = tokio::time::timeout(WAIT, second.next()).await;
    assert!(matches!(end, Ok(None)), "the stream ends after Stopped");

    // An exclusive socket of Bob's device closes his older one with 4409
    // (on a server without the cap, which would refuse the newer one).
    let server = TestServer::start(backend).await;
    let alice = register(&server.api, "alice").await;
    let bob = register(&server.api, "bob").await;
    let mut older = online(&bob).await;
    let newer = Client::login(&server.api.base, "bob", PASSWORD, 1, bob.keys().clone())
        .await
        .unwrap();
    drop(online_with(&newer, true).await);
    let stopped = wait_for(&mut older, "the older socket stops", |e| match e {
        Event::State(ConnectionState::Stopped { code, reason }) => Some((code, reason)),
        Event::State(ConnectionState::Disconnected { code, .. }) => {
            panic!("reconnecting after {code:?}")
        }
        _ => None,
    })
    .await;
    let want = close::CONNECTED_ELSEWHERE;
    assert_eq!(stopped, (Some(want.code), want.reason.to_owned()));
    // Sends fall back to REST once the socket has stopped.
    let alice_bob = bob.send(alice.user_id(), "over REST").await.unwrap();
    assert!(!alice_bob.id.is_nil());
}

async fn online_with(client: &Client, exclusive: bool) -> Events {
    let mut events = client
        .connect(ConnectOptions {
            exclusive,
            ..fast()
        })
        .expect("connect");
    drained(&mut events).await;
    events
}

/// The laptop of `alice` (a phone on the server itself) and Bob's phone,
/// with the laptop speaking through `proxy`.
async fn laptop_behind(server: &TestServer, proxy: &LossyProxy) -> (Client, Client, Client) {
    let phone = register(&server.api, "alice").await;
    let laptop = add_device(&Api::new(proxy.base.clone()), "alice", "laptop").await;
    let bob = register(&server.api, "bob").await;
    (phone, laptop, bob)
}

async fn a_rest_send_whose_answer_is_lost_is_stored_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    // The server handles the laptop's first send, and its 201 never
    // arrives: the connection closes instead.
    let proxy =
        LossyProxy::start(server.addr, Cut::AnswerTo("POST /v1/messages HTTP/1.1"), 1).await;
    let (phone, laptop, bob) = laptop_behind(&server, &proxy).await;

    // No transport runs: the send goes over REST, and is retried.
    let sent = laptop.send(bob.user_id(), "only once").await.unwrap();
    assert_eq!(proxy.cuts(), 1, "the first answer was lost");
    // The retry carried the same client_id and ciphertext: answered with
    // the first id, and nothing stored twice.
    let bob_session = harness_session(&server.api, &bob).await;
    let queued = server.inbox(&bob_session).await;
    assert_eq!(common::ids(&queued), [sent.id], "{queued:?}");
    // The sync copy has a client_id of its own (under the message's, the
    // server would refuse it: another `to` is another send).
    assert!(sent.sync_error.is_none(), "{:?}", sent.sync_error);
    let phone_session = harness_session(&server.api, &phone).await;
    let synced = server.inbox(&phone_session).await;
    assert_eq!(synced.len(), 1, "{synced:?}");
    let sync_id = common::id(&synced[0]["id"]);
    assert_ne!(sync_id, sent.id);
    // In the phone's backlog, before `drained`.
    let mut events = phone.connect(fast()).unwrap();
    let got = message(&mut events).await;
    assert_incoming(&got, sync_id, &laptop, "only once", Some(bob.user_id()));
    assert_eq!(got.client_id, sent.client_id);
}

async fn a_socket_send_whose_sent_is_lost_is_stored_once(backend: Backend) {
    let server = TestServer::start(backend).await;
    // The server takes the laptop's send on its socket; the `sent` frame
    // is lost with the connection.
    let proxy = LossyProxy::start(server.addr, Cut::Answer(r#""type":"sent""#), 1).await;
    let (_phone, laptop, bob) = laptop_behind(&server, &proxy).await;
    let mut laptop_events = online(&laptop).await;
    let mut bob_events = online(&bob).await;

    let sent = laptop.send(bob.user_id(), "once, socket").await.unwrap();
    assert_eq!(proxy.cuts(), 1, "the first sent was lost");
    wait_for(&mut laptop_events, "the socket drops", |e| {
        matches!(e, Event::State(ConnectionState::Disconnected { .. })).then_some(())
    })
    .await;
    // Pushed once, under the id the retry was answered with ...
    let got = message(&mut bob_events).await;
    assert_incoming(&got, sent.id, &laptop, "once, socket", None);
    // ... and stored once: the frame written again on the next socket
    // carried the same client_id.
    let bob_session = harness_session(&server.api, &bob).await;
    let queued = server.inbox(&bob_session).await;
    assert_eq!(common::ids(&queued), [sent.id], "{queued:?}");
    assert!(sent.sync_error.is_none(), "{:?}", sent.sync_error);
}
