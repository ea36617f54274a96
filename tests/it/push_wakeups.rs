//! Wake-ups end to end: a real server, its devices' Web Push targets on
//! the fake push service (which checks VAPID and decrypts), and what it
//! receives. Who is woken (offline devices with a target, after a commit;
//! after a socket closes owing acks), who is not (online devices,
//! ephemeral sends, receipts), how often (one for a burst, low priority at
//! most once per quiet interval), and what the provider's answers do (410
//! drops the target, unless it was registered again; `Retry-After`; a
//! hanging service slows no send and no other wake-up). A wake-up waiting
//! in the database for its retry outlives a kill -9 of its process; and in
//! a cluster (`cluster`, PostgreSQL and NATS) a device online on another
//! node is not woken, and is woken once after its socket closes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::backend_tests;
use crate::common::fake_push::webpush::{Answer, FakeWebPush, Received, Subscription};
use crate::common::ws::WsClient;
use crate::common::{Account, Api, Backend, ServerProcess, TestDb, TestServer, b64, eventually};

backend_tests!(
    twenty_messages_to_an_offline_device_make_one_content_free_wakeup,
    an_online_device_is_woken_only_after_its_socket_closes_owing_acks,
    ephemeral_sends_and_receipts_wake_nothing,
    a_non_urgent_send_wakes_at_low_priority_once_per_quiet_interval,
    a_gone_target_is_dropped_and_sent_nothing_more,
    a_target_registered_again_during_a_failed_wakeup_is_kept,
    retry_after_is_honoured,
    a_hanging_service_slows_no_send_and_no_other_wakeup,
    a_wakeup_waiting_for_its_retry_survives_kill9,
    a_target_sealed_under_a_retired_key_is_sealed_again_and_still_wakes,
);

/// How long a test waits for a wake-up that should come.
const WAIT: Duration = Duration::from_secs(10);

/// A fake push service and a server using it.
async fn setup(backend: Backend, extra: &[&str]) -> (FakeWebPush, TestServer) {
    let fake = FakeWebPush::start().await;
    let server = serve(&fake, TestDb::new(backend).await, extra).await;
    (fake, server)
}

/// A server on `db` using `fake`, with `extra` flags.
async fn serve(fake: &FakeWebPush, db: TestDb, extra: &[&str]) -> TestServer {
    let mut flags = fake.server_flags(db.is_postgres());
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestServer::start_on(db, &flags).await
}

/// Registers a fresh subscription of `fake` as `who`'s (device 1) target.
async fn subscribe(server: &Api, fake: &FakeWebPush, who: &Account) -> Subscription {
    let sub = fake.subscribe();
    register(server, who, &sub).await;
    sub
}

async fn register(server: &Api, who: &Account, sub: &Subscription) {
    server
        .put("/v1/devices/1/push", Some(&who.access), sub.target_json())
        .await
        .expect(200);
}

async fn send(server: &Api, from: &Account, to: &Account, urgent: Option<bool>) -> Value {
    let mut body = json!({ "to": to.id, "body": b64(b"sealed") });
    if let Some(urgent) = urgent {
        body["urgent"] = json!(urgent);
    }
    server
        .post("/v1/messages", Some(&from.access), body)
        .await
        .expect(201)
}

/// Asserts that `sub` receives nothing more than `n` pushes for `quiet`.
async fn no_more(fake: &FakeWebPush, sub: &Subscription, n: usize, quiet: Duration) {
    tokio::time::sleep(quiet).await;
    let received = fake.received(&sub.id);
    assert_eq!(received.len(), n, "{received:?}");
}

fn assert_wake(push: &Received, urgency: &str) {
    assert_eq!(push.plaintext_json(), json!({ "type": "wake" }));
    assert_eq!(push.urgency.as_deref(), Some(urgency));
}

async fn twenty_messages_to_an_offline_device_make_one_content_free_wakeup(backend: Backend) {
    let (fake, server) = setup(backend, &[]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sub = subscribe(&server, &fake, &bob).await;
    for _ in 0..20 {
        send(&server, &alice, &bob, None).await;
    }
    let received = fake.wait_for(&sub.id, 1, WAIT).await;
    assert_wake(&received[0], "high");
    // Nothing of the messages: the plaintext is the constant above, and
    // the one body is the same size whatever was sent.
    assert!(received[0].body.len() < 200, "{}", received[0].body.len());
    no_more(&fake, &sub, 1, Duration::from_secs(2)).await;
    // The messages are all there for the device to fetch.
    assert_eq!(server.inbox(&bob).await.len(), 20);
}

async fn an_online_device_is_woken_only_after_its_socket_closes_owing_acks(backend: Backend) {
    let (fake, server) = setup(backend, &["--wakeup-after-close", "1s"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sub = subscribe(&server, &fake, &bob).await;
    let (mut socket, _) = WsClient::ready(&server, &bob).await;
    send(&server, &alice, &bob, None).await;
    let pushed = socket.expect("message").await;
    assert_eq!(pushed["body"], b64(b"sealed"));
    // Online: no wake-up, though the copy was written (not acked).
    no_more(&fake, &sub, 0, Duration::from_secs(2)).await;
    // Its socket goes without acking: woken a second later.
    let closed = tokio::time::Instant::now();
    socket.close().await;
    let received = fake.wait_for(&sub.id, 1, WAIT).await;
    assert_wake(&received[0], "high");
    assert!(received[0].at - closed >= Duration::from_millis(900));

    // A socket that acked what it was sent owes nothing: no wake-up when
    // it closes.
    let carol = server.account("carol").await;
    let carols = subscribe(&server, &fake, &carol).await;
    let (mut socket, _) = WsClient::ready(&server, &carol).await;
    send(&server, &alice, &carol, None).await;
    let pushed = socket.expect("message").await;
    socket.ack(&[pushed["id"].as_str().unwrap()]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    socket.close().await;
    no_more(&fake, &carols, 0, Duration::from_secs(3)).await;
}

async fn ephemeral_sends_and_receipts_wake_nothing(backend: Backend) {
    let (fake, server) = setup(backend, &["--delivery-receipts", "true"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    // Alice is offline, with a target.
    let alices = subscribe(&server, &fake, &alice).await;
    let (mut socket, _) = WsClient::ready(&server, &bob).await;
    socket
        .send_json(json!({"type": "send", "ref": "e", "to": alice.id, "body": b64(b"typing"), "ephemeral": true}))
        .await;
    let sent = socket.expect("sent").await;
    assert_eq!(sent["delivered"], false, "{sent}");
    // Alice sends bob a stored message (her own sending device is not
    // woken for it), bob acks it: the receipt to alice wakes nothing.
    send(&server, &alice, &bob, None).await;
    let pushed = socket.expect("message").await;
    socket.ack(&[pushed["id"].as_str().unwrap()]).await;
    no_more(&fake, &alices, 0, Duration::from_secs(3)).await;
    socket.close().await;
    // The same offline device is woken by a stored send: the quiet above
    // was not for want of a working target.
    send(&server, &bob, &alice, None).await;
    let received = fake.wait_for(&alices.id, 1, WAIT).await;
    assert_wake(&received[0], "high");
}

async fn a_non_urgent_send_wakes_at_low_priority_once_per_quiet_interval(backend: Backend) {
    let (fake, server) = setup(backend, &["--wakeup-cooldown", "1s"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sub = subscribe(&server, &fake, &bob).await;
    send(&server, &alice, &bob, Some(false)).await;
    let received = fake.wait_for(&sub.id, 1, WAIT).await;
    assert_wake(&received[0], "low");
    // Past the cool-down, and after showing up (a poll): another
    // non-urgent send within the quiet interval (20 min) wakes nothing.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.inbox(&bob).await;
    send(&server, &alice, &bob, Some(false)).await;
    no_more(&fake, &sub, 1, Duration::from_secs(2)).await;
    // An urgent one is not held back.
    send(&server, &alice, &bob, Some(true)).await;
    let received = fake.wait_for(&sub.id, 2, WAIT).await;
    assert_wake(&received[1], "high");
}

async fn a_gone_target_is_dropped_and_sent_nothing_more(backend: Backend) {
    let (fake, server) = setup(backend, &["--wakeup-cooldown", "1s"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sub = subscribe(&server, &fake, &bob).await;
    fake.script(&sub.id, [Answer::Status(410)]);
    send(&server, &alice, &bob, None).await;
    fake.wait_for(&sub.id, 1, WAIT).await;
    let push = eventually("the target dropped", async || {
        let devices = server
            .get("/v1/devices", Some(&bob.access))
            .await
            .expect(200);
        let push = devices["devices"][0]["push"].clone();
        push.is_null().then_some(push)
    })
    .await;
    assert!(push.is_null());
    let (socket, ready, _) = WsClient::ready_with(&server, &bob, "").await;
    assert_eq!(ready["push_dropped"], true, "{ready}");
    socket.close().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send(&server, &alice, &bob, None).await;
    no_more(&fake, &sub, 1, Duration::from_secs(3)).await;
}

async fn a_target_registered_again_during_a_failed_wakeup_is_kept(backend: Backend) {
    let (fake, server) = setup(backend, &[]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let old = subscribe(&server, &fake, &bob).await;
    // The service takes its time, then says the old subscription is gone;
    // meanwhile the device registers a new one.
    fake.script(&old.id, [Answer::HangThen(Duration::from_secs(2), 410)]);
    send(&server, &alice, &bob, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fresh = fake.subscribe();
    register(&server, &bob, &fresh).await;
    // The new target is kept, and woken in the old one's place.
    let received = fake.wait_for(&fresh.id, 1, WAIT).await;
    assert_wake(&received[0], "high");
    let devices = server
        .get("/v1/devices", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(
        devices["devices"][0]["push"]["kind"], "webpush",
        "{devices}"
    );
}

async fn retry_after_is_honoured(backend: Backend) {
    let (fake, server) = setup(backend, &[]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sub = subscribe(&server, &fake, &bob).await;
    fake.script(&sub.id, [Answer::TooMany(Some("2".into()))]);
    send(&server, &alice, &bob, None).await;
    let received = fake.wait_for(&sub.id, 2, WAIT).await;
    assert_eq!(received[0].answered, 429);
    assert_eq!(received[1].answered, 201);
    let waited = received[1].at - received[0].at;
    assert!(waited >= Duration::from_secs(2), "{waited:?}");
    no_more(&fake, &sub, 2, Duration::from_secs(1)).await;
}

async fn a_hanging_service_slows_no_send_and_no_other_wakeup(backend: Backend) {
    // Two push services on two ports: one hangs for 20 s.
    let (hanging, fake) = (FakeWebPush::start().await, FakeWebPush::start().await);
    let db = TestDb::new(backend).await;
    let mut flags = fake.server_flags(db.is_postgres());
    let allow = flags
        .iter()
        .position(|f| f.starts_with("--push-allow-hosts="))
        .unwrap();
    flags[allow] = format!(
        "--push-allow-hosts={},{}",
        fake.allow_host(),
        hanging.allow_host()
    );
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start_on(db, &flags).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;
    let bobs = subscribe(&server, &hanging, &bob).await;
    hanging.script(&bobs.id, [Answer::Hang(Duration::from_secs(20))]);
    send(&server, &alice, &bob, None).await;
    hanging.wait_for(&bobs.id, 1, WAIT).await;
    // Sends stay fast while the service hangs.
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = tokio::time::Instant::now();
        send(&server, &alice, &bob, None).await;
        slowest = slowest.max(started.elapsed());
    }
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    // Another device's wake-up, on the other service, goes out at once.
    let carols = subscribe(&server, &fake, &carol).await;
    let started = tokio::time::Instant::now();
    send(&server, &alice, &carol, None).await;
    let received = fake.wait_for(&carols.id, 1, Duration::from_secs(5)).await;
    assert!(received[0].at - started < Duration::from_secs(3));
}

async fn a_wakeup_waiting_for_its_retry_survives_kill9(backend: Backend) {
    let fake = FakeWebPush::start().await;
    let db = TestDb::new(backend).await;
    // On SQLite the VAPID key is the one generated beside the database at
    // the first start; on PostgreSQL the one both starts are given.
    let env = fake.server_env(db.is_postgres());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = ServerProcess::spawn(&db.url, &env);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    // Made for this server's key, as a browser does: a push signed with
    // another (a restart that lost the key) would be refused.
    let vapid = server.get("/v1/push/vapid", None).await.expect(200);
    let sub = fake.subscribe_for(vapid["public_key"].as_str().unwrap());
    register(&server, &bob, &sub).await;
    // The first try is throttled: the retry waits 3 s in the database.
    fake.script(&sub.id, [Answer::TooMany(Some("3".into()))]);
    send(&server, &alice, &bob, None).await;
    fake.wait_for(&sub.id, 1, WAIT).await;
    eventually("the retry written to the database", async || {
        let waiting = db
            .count("SELECT COUNT(*) FROM wakeups WHERE attempts = 1 AND due_at IS NOT NULL")
            .await;
        (waiting == 1).then_some(())
    })
    .await;
    server.kill9();
    let killed = tokio::time::Instant::now();

    // A new process on the same database sends the retry when it is due,
    // once.
    let restarted = ServerProcess::spawn(&db.url, &env);
    let received = fake.wait_for(&sub.id, 2, WAIT).await;
    assert_eq!(received[0].answered, 429);
    assert_eq!(received[1].answered, 201);
    assert!(received[1].at > killed, "the retry came before the kill");
    assert_wake(&received[1], "high");
    assert_eq!(received[1].vapid_key, received[0].vapid_key);
    let waited = received[1].at - received[0].at;
    assert!(waited >= Duration::from_secs(3), "{waited:?}");
    no_more(&fake, &sub, 2, Duration::from_secs(3)).await;
    let refused = fake.rejected(&sub.id);
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(restarted.inbox(&bob).await.len(), 1);
}

/// Wake-ups in a cluster: the presence check asks every node, and any
/// node sends what is due, once. PostgreSQL and NATS, as the other cluster
/// tests (`crate::cluster`): compiled in with the PostgreSQL tests, and a
/// NATS that does not answer fails them.
#[cfg(sealpost_pg_tests)]
mod cluster {
    use std::time::Duration;

    use super::{WAIT, assert_wake, no_more, send, subscribe};
    use crate::common::cluster::Cluster;
    use crate::common::fake_push::webpush::FakeWebPush;
    use crate::common::ws::WsClient;

    /// How long nothing must reach the push service where nothing should.
    const QUIET: Duration = Duration::from_secs(2);

    /// Bob is online on node 1; alice sends through node 2, whose hub has
    /// no socket of his: only the cluster's presence check keeps him from
    /// being woken. His socket closes owing acks: he is woken once, after
    /// the delay, by whichever node takes the wake-up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_device_online_on_another_node_is_woken_once_after_its_socket_closes() {
        let fake = FakeWebPush::start().await;
        let mut flags = fake.server_flags(true);
        flags.push("--wakeup-after-close=1s".into());
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let cluster = Cluster::start(2, &flags).await;
        let (a, b) = (&cluster[0], &cluster[1]);
        let alice = b.account("alice").await;
        let bob = a.account("bob").await;
        let carol = b.account("carol").await;
        let bobs = subscribe(a, &fake, &bob).await;
        let carols = subscribe(b, &fake, &carol).await;

        let (mut socket, _) = WsClient::ready(a, &bob).await;
        for _ in 0..5 {
            send(b, &alice, &bob, None).await;
            socket.expect("message").await;
        }
        // Carol, offline, is woken through node 2 at once: the quiet for
        // bob is not node 2 failing to wake anyone.
        send(b, &alice, &carol, None).await;
        let woken = fake.wait_for(&carols.id, 1, WAIT).await;
        assert_wake(&woken[0], "high");
        no_more(&fake, &bobs, 0, QUIET).await;

        let closed = tokio::time::Instant::now();
        socket.close().await;
        let received = fake.wait_for(&bobs.id, 1, WAIT).await;
        assert_wake(&received[0], "high");
        let after = received[0].at - closed;
        assert!(after >= Duration::from_millis(900), "{after:?}");
        // Both nodes poll the database every second: a wake-up either took
        // twice would have come by now.
        no_more(&fake, &bobs, 1, Duration::from_secs(3)).await;
        cluster.stop().await;
    }
}

/// A target lives as long as its device, so a storage key rotation must
/// carry it over: the sweeper seals it again under the new key, and once
/// the old key is retired the device is still woken.
async fn a_target_sealed_under_a_retired_key_is_sealed_again_and_still_wakes(backend: Backend) {
    use crate::sealed::{NEW, OLD, rotated};
    let (fake, server) = setup(backend, &["--storage-keys", OLD]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let sub = subscribe(&server, &fake, &bob).await;
    let db = server.stop().await;
    // Targets whose sealing begins with the key id `01` or `02`.
    let under = |postgres: bool, key: u8| -> &'static str {
        match (postgres, key) {
            (true, 1) => {
                "SELECT COUNT(*) FROM push_targets WHERE encode(substr(target, 1, 2), 'hex') = '0001'"
            }
            (true, _) => {
                "SELECT COUNT(*) FROM push_targets WHERE encode(substr(target, 1, 2), 'hex') = '0002'"
            }
            (false, 1) => {
                "SELECT COUNT(*) FROM push_targets WHERE hex(substr(target, 1, 2)) = '0001'"
            }
            (false, _) => {
                "SELECT COUNT(*) FROM push_targets WHERE hex(substr(target, 1, 2)) = '0002'"
            }
        }
    };
    let postgres = db.is_postgres();
    assert_eq!(db.count(under(postgres, 1)).await, 1);

    // The new key first, the old one kept: the sweeper's first pass, at
    // start-up, seals the target again.
    let server = serve(&fake, db, &["--storage-keys", &rotated()]).await;
    eventually("the target sealed under key 2", async || {
        (server.db.count(under(postgres, 2)).await == 1).then_some(())
    })
    .await;
    assert_eq!(server.db.count(under(postgres, 1)).await, 0);
    let db = server.stop().await;

    // The old key retired: the device is still woken.
    let server = serve(&fake, db, &["--storage-keys", NEW]).await;
    send(&server, &alice, &bob, None).await;
    let received = fake.wait_for(&sub.id, 1, WAIT).await;
    assert_wake(&received[0], "high");
    server.stop().await;
}
