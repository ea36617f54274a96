//! Push targets over REST: `PUT`/`DELETE /v1/devices/{id}/push`, the
//! `push` field of `GET /v1/devices`, `GET /v1/push/vapid`, and the
//! `ready` frame's `push_dropped`; what is refused (the SSRF guard, bad
//! keys and tokens, another device, a kind with no provider), and what is
//! stored (sealed, and gone with its device and account).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{Value, json};

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{Account, Backend, PASSWORD, TestDb, TestServer, keys, public_key, time};

backend_tests!(
    a_target_is_set_replaced_listed_and_deleted,
    only_the_device_itself_sets_its_target,
    bad_targets_are_refused_by_field,
    a_kind_without_a_provider_is_push_unavailable,
    targets_are_sealed_at_rest,
    targets_go_with_their_device_and_account,
    a_dropped_target_is_told_in_ready,
    the_vapid_key_is_served_when_web_push_is_on,
);

/// The host the suite's Web Push endpoints name: allowed by the servers
/// here (`--push-allow-hosts`), so that it is not resolved.
pub(crate) const PUSH_HOST: &str = "push.test";

/// A browser's key (RFC 8291's example) and auth secret.
pub(crate) const P256DH: &str =
    "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
pub(crate) const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

/// A fresh P-256 key, as PKCS#8 PEM: the VAPID key, or an APNs `.p8`.
pub(crate) fn p256_pem() -> (String, p256::PublicKey) {
    let key = loop {
        let bytes: [u8; 32] = rand::random();
        if let Ok(key) = p256::SecretKey::from_slice(&bytes) {
            break key;
        }
    };
    let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    (pem, key.public_key())
}

/// A server with Web Push and APNs on (not FCM), `push.test` allowed.
pub(crate) struct PushServer {
    pub server: TestServer,
    pub vapid: p256::PublicKey,
    _apns_key: tempfile::TempDir,
}

impl std::ops::Deref for PushServer {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.server
    }
}

pub(crate) async fn push_server(backend: Backend) -> PushServer {
    let (vapid_pem, vapid) = p256_pem();
    let dir = tempfile::tempdir().unwrap();
    let p8 = dir.path().join("AuthKey_ABCDE12345.p8");
    std::fs::write(&p8, p256_pem().0).unwrap();
    // One argument: a value that starts with `-----` is not taken as a
    // flag's value on its own.
    let vapid_key = format!("--vapid-key={vapid_pem}");
    let server = TestServer::start_with(
        backend,
        &[
            "--vapid-subject",
            "mailto:ops@example.com",
            &vapid_key,
            "--apns-key-file",
            p8.to_str().unwrap(),
            "--apns-key-id",
            "ABCDE12345",
            "--apns-team-id",
            "TEAM123456",
            "--push-allow-hosts",
            PUSH_HOST,
        ],
    )
    .await;
    PushServer {
        server,
        vapid,
        _apns_key: dir,
    }
}

fn webpush(endpoint: &str) -> Value {
    // As `PushSubscription.toJSON()` gives it, plus `kind`.
    json!({
        "kind": "webpush",
        "endpoint": endpoint,
        "expirationTime": null,
        "keys": { "p256dh": P256DH, "auth": AUTH },
    })
}

fn apns() -> Value {
    json!({ "kind": "apns", "token": "ab".repeat(32), "topic": "com.example.app" })
}

fn path(device: i64) -> String {
    format!("/v1/devices/{device}/push")
}

/// `who`'s devices' `push` fields, by device id.
async fn pushes(server: &TestServer, who: &Account) -> Vec<(i64, Value)> {
    let listed = server
        .get("/v1/devices", Some(&who.access))
        .await
        .expect(200);
    let devices = listed["devices"].as_array().unwrap();
    assert!(!devices.is_empty(), "{listed}");
    devices
        .iter()
        .map(|d| {
            assert!(d.get("push").is_some(), "no push field: {d}");
            (d["device_id"].as_i64().unwrap(), d["push"].clone())
        })
        .collect()
}

async fn a_target_is_set_replaced_listed_and_deleted(backend: Backend) {
    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let (second, _) = server.add_device(&alice, &public_key()).await;
    let endpoint = format!("https://{PUSH_HOST}/wpush/v2/secret-capability");
    let set = server
        .put(&path(1), Some(&alice.access), webpush(&endpoint))
        .await
        .expect(200);
    assert_eq!(keys(&set), ["kind", "updated_at"], "{set}");
    assert_eq!(set["kind"], "webpush");
    let first_version = time(&set["updated_at"]);
    let listed = pushes(&server, &alice).await;
    assert_eq!(listed, vec![(1, set.clone()), (second, Value::Null)]);
    let text = server
        .get("/v1/devices", Some(&alice.access))
        .await
        .body
        .to_string();
    assert!(!text.contains("secret-capability"), "{text}");
    assert!(!text.contains(P256DH) && !text.contains(AUTH), "{text}");
    // The same body again: the same answer, a later version.
    let again = server
        .put(&path(1), Some(&alice.access), webpush(&endpoint))
        .await
        .expect(200);
    assert_eq!(again["kind"], "webpush");
    assert!(time(&again["updated_at"]) > first_version, "{again}");
    // A public address literal needs no allow-list (and no resolving).
    server
        .put(
            &path(1),
            Some(&alice.access),
            webpush("https://93.184.216.34:8443/push/1"),
        )
        .await
        .expect(200);
    // Replaced by another kind.
    let replaced = server
        .put(&path(1), Some(&alice.access), apns())
        .await
        .expect(200);
    assert_eq!(replaced["kind"], "apns");
    assert_eq!(pushes(&server, &alice).await[0], (1, replaced));
    // Deleted, and deleted again.
    for _ in 0..2 {
        let reply = server
            .delete(&path(1), Some(&alice.access), Value::Null)
            .await;
        assert_eq!(reply.status, 204, "{:?}", reply.body);
    }
    assert_eq!(
        pushes(&server, &alice).await,
        vec![(1, Value::Null), (second, Value::Null)]
    );
    server.server.stop().await;
}

async fn only_the_device_itself_sets_its_target(backend: Backend) {
    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (second, alice2) = server.add_device(&alice, &public_key()).await;
    let body = webpush(&format!("https://{PUSH_HOST}/x"));
    // Another device of the same account, one that does not exist, and
    // (the path names no account) bob's device 1 is his own.
    for (who, device) in [(&alice, second), (&alice2, 1), (&alice, 99)] {
        server
            .put(&path(device), Some(&who.access), body.clone())
            .await
            .expect_error(403, "forbidden");
        server
            .delete(&path(device), Some(&who.access), Value::Null)
            .await
            .expect_error(403, "forbidden");
    }
    server
        .put(&path(1), None, body.clone())
        .await
        .expect_error(401, "unauthorized");
    // Bob's own device 1 is his, and alice's stays without a target.
    server
        .put(&path(1), Some(&bob.access), body.clone())
        .await
        .expect(200);
    server
        .put(&path(second), Some(&alice2.access), body)
        .await
        .expect(200);
    let listed = pushes(&server, &alice).await;
    assert_eq!(listed[0], (1, Value::Null));
    assert_eq!(listed[1].1["kind"], "webpush", "{listed:?}");
    server.server.stop().await;
}

async fn bad_targets_are_refused_by_field(backend: Backend) {
    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let with_keys = |p256dh: &str, auth: &str| {
        json!({ "kind": "webpush", "endpoint": format!("https://{PUSH_HOST}/x"),
                "keys": { "p256dh": p256dh, "auth": auth } })
    };
    let mut off_curve = URL_SAFE_NO_PAD.decode(P256DH).unwrap();
    off_curve[64] ^= 1;
    let off_curve = URL_SAFE_NO_PAD.encode(off_curve);
    let compressed = URL_SAFE_NO_PAD.encode(p256_pem().1.to_encoded_point(true).as_bytes());
    let long = format!("https://{PUSH_HOST}/{}", "a".repeat(1000));
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "plain http",
            webpush("http://push.example.com/x"),
            "endpoint",
        ),
        ("loopback v4", webpush("https://127.0.0.1/x"), "endpoint"),
        ("loopback v6", webpush("https://[::1]:8443/x"), "endpoint"),
        ("private v4", webpush("https://10.1.2.3/x"), "endpoint"),
        (
            "private v4, 192.168",
            webpush("https://192.168.1.20/x"),
            "endpoint",
        ),
        (
            "link-local v4",
            webpush("https://169.254.169.254/latest"),
            "endpoint",
        ),
        ("link-local v6", webpush("https://[fe80::1]/x"), "endpoint"),
        (
            "unique-local v6",
            webpush("https://[fd00::1]/x"),
            "endpoint",
        ),
        (
            "v4-mapped loopback",
            webpush("https://[::ffff:127.0.0.1]/x"),
            "endpoint",
        ),
        (
            "v4-mapped private",
            webpush("https://[::ffff:10.0.0.1]/x"),
            "endpoint",
        ),
        ("localhost", webpush("https://localhost/x"), "endpoint"),
        (
            "user info",
            webpush("https://u:p@push.example.com/x"),
            "endpoint",
        ),
        ("not a URL", webpush("push me"), "endpoint"),
        ("too long", webpush(&long), "endpoint"),
        (
            "p256dh off the curve",
            with_keys(&off_curve, AUTH),
            "keys.p256dh",
        ),
        (
            "p256dh compressed",
            with_keys(&compressed, AUTH),
            "keys.p256dh",
        ),
        (
            "p256dh 64 bytes",
            with_keys(&URL_SAFE_NO_PAD.encode([4u8; 64]), AUTH),
            "keys.p256dh",
        ),
        (
            "p256dh not base64url",
            with_keys("a+b/c", AUTH),
            "keys.p256dh",
        ),
        (
            "auth 15 bytes",
            with_keys(P256DH, &URL_SAFE_NO_PAD.encode([1u8; 15])),
            "keys.auth",
        ),
        (
            "auth 17 bytes",
            with_keys(P256DH, &URL_SAFE_NO_PAD.encode([1u8; 17])),
            "keys.auth",
        ),
        (
            "no endpoint",
            json!({ "kind": "webpush", "keys": { "p256dh": P256DH, "auth": AUTH } }),
            "endpoint",
        ),
        (
            "no keys",
            json!({ "kind": "webpush", "endpoint": format!("https://{PUSH_HOST}/x") }),
            "keys",
        ),
        (
            "no auth",
            json!({ "kind": "webpush", "endpoint": format!("https://{PUSH_HOST}/x"),
                    "keys": { "p256dh": P256DH } }),
            "keys.auth",
        ),
        (
            "no kind",
            json!({ "endpoint": "https://push.test/x" }),
            "kind",
        ),
        ("unknown kind", json!({ "kind": "pigeon" }), "kind"),
        (
            "APNs token not hex",
            json!({ "kind": "apns", "token": "zz".repeat(32), "topic": "com.example.app" }),
            "token",
        ),
        (
            "APNs token odd length",
            json!({ "kind": "apns", "token": "a".repeat(65), "topic": "com.example.app" }),
            "token",
        ),
        (
            "APNs token too short",
            json!({ "kind": "apns", "token": "ab".repeat(8), "topic": "com.example.app" }),
            "token",
        ),
        (
            "APNs without topic",
            json!({ "kind": "apns", "token": "ab".repeat(32) }),
            "topic",
        ),
        (
            "APNs topic with a control character",
            json!({ "kind": "apns", "token": "ab".repeat(32), "topic": "com.example\u{7}" }),
            "topic",
        ),
        (
            "APNs bad environment",
            json!({ "kind": "apns", "token": "ab".repeat(32), "topic": "com.example.app",
                    "environment": "staging" }),
            "environment",
        ),
    ];
    for (what, body, field) in cases {
        let reply = server.put(&path(1), Some(&alice.access), body).await;
        assert_eq!(reply.status, 422, "{what}: {:?}", reply.body);
        assert_eq!(reply.code(), "invalid", "{what}: {:?}", reply.body);
        assert_eq!(
            reply.body["error"]["field"], field,
            "{what}: {:?}",
            reply.body
        );
    }
    // Nothing was stored by any of them.
    assert_eq!(pushes(&server, &alice).await, vec![(1, Value::Null)]);
    server.server.stop().await;
}

async fn a_kind_without_a_provider_is_push_unavailable(backend: Backend) {
    // Web Push and APNs only.
    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let fcm = json!({ "kind": "fcm", "token": "dGVzdA:APA91b-token" });
    let reply = server.put(&path(1), Some(&alice.access), fcm.clone()).await;
    reply.expect_error(422, "push_unavailable");
    assert_eq!(reply.body["error"]["field"], "kind", "{:?}", reply.body);
    assert_eq!(
        reply.body["error"]["message"],
        "this server has no fcm provider configured"
    );
    server.server.stop().await;
    // No provider at all: every kind refused, and no VAPID key.
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    for body in [webpush(&format!("https://{PUSH_HOST}/x")), apns(), fcm] {
        let reply = server.put(&path(1), Some(&alice.access), body).await;
        reply.expect_error(422, "push_unavailable");
        assert_eq!(reply.body["error"]["field"], "kind", "{:?}", reply.body);
    }
    server
        .get("/v1/push/vapid", None)
        .await
        .expect_error(404, "push_unavailable");
    server.stop().await;
}

/// The rows of `push_targets`, read with SQL of the test's own: device,
/// kind and the stored target.
async fn raw_targets(db: &TestDb) -> Vec<(i64, Option<String>, Option<Vec<u8>>)> {
    const SQL: &str = "SELECT device_id, kind, target FROM push_targets ORDER BY device_id";
    if db.is_postgres() {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let rows: Vec<(i32, Option<String>, Option<Vec<u8>>)> =
            sqlx::query_as(SQL).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows.into_iter()
            .map(|(d, k, t)| (i64::from(d), k, t))
            .collect()
    } else {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        let rows = sqlx::query_as(SQL).fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }
}

async fn targets_are_sealed_at_rest(backend: Backend) {
    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let endpoint = format!("https://{PUSH_HOST}/wpush/v2/gAAAAABsecretcapability");
    server
        .put(&path(1), Some(&alice.access), webpush(&endpoint))
        .await
        .expect(200);
    let rows = raw_targets(&server.db).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (device, kind, sealed) = &rows[0];
    assert_eq!((*device, kind.as_deref()), (1, Some("webpush")));
    let sealed = sealed.as_ref().expect("a live target");
    let contains = |needle: &[u8]| sealed.windows(needle.len()).any(|w| w == needle);
    for clear in [
        endpoint.as_bytes(),
        b"gAAAAABsecretcapability",
        PUSH_HOST.as_bytes(),
        P256DH.as_bytes(),
        &URL_SAFE_NO_PAD.decode(P256DH).unwrap()[1..33],
        &URL_SAFE_NO_PAD.decode(AUTH).unwrap(),
    ] {
        assert!(
            !contains(clear),
            "{:?} is stored in the clear",
            String::from_utf8_lossy(clear)
        );
    }
    server.server.stop().await;
}

async fn targets_go_with_their_device_and_account(backend: Backend) {
    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let (second, alice2) = server.add_device(&alice, &public_key()).await;
    let bob = server.account("bob").await;
    for who in [&alice, &bob] {
        server
            .put(&path(1), Some(&who.access), apns())
            .await
            .expect(200);
    }
    server
        .put(&path(second), Some(&alice2.access), apns())
        .await
        .expect(200);
    assert_eq!(raw_targets(&server.db).await.len(), 3);
    // Alice's second device removed: its target with it.
    let reply = server
        .delete(
            &format!("/v1/devices/{second}"),
            Some(&alice.access),
            json!({ "password": PASSWORD }),
        )
        .await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    let devices: Vec<i64> = raw_targets(&server.db).await.iter().map(|r| r.0).collect();
    assert_eq!(devices, vec![1, 1]);
    assert_eq!(pushes(&server, &alice).await.len(), 1);
    // Alice's account deleted: hers go, bob's stays.
    let reply = server
        .delete(
            "/v1/me",
            Some(&alice.access),
            json!({ "password": PASSWORD }),
        )
        .await;
    assert_eq!(reply.status, 204, "{:?}", reply.body);
    assert_eq!(raw_targets(&server.db).await.len(), 1);
    assert_eq!(pushes(&server, &bob).await[0].1["kind"], "apns");
    server.server.stop().await;
}

async fn a_dropped_target_is_told_in_ready(backend: Backend) {
    use sealpost::store::{self, StoreOptions};

    let server = push_server(backend).await;
    let alice = server.account("alice").await;
    let (_, ready, _) = WsClient::ready_with(&server.api, &alice, "").await;
    assert!(ready.get("push_dropped").is_none(), "{ready}");
    let set = server
        .put(&path(1), Some(&alice.access), apns())
        .await
        .expect(200);
    // The provider says it is gone (what the wake-up scheduler does on a
    // 410), at the version the wake-up was sent to.
    let db = store::connect(&StoreOptions {
        url: server.db.url.clone(),
        pool_size: 1,
    })
    .await
    .unwrap();
    assert!(
        db.drop_target(alice.id, 1, time(&set["updated_at"]))
            .await
            .unwrap()
    );
    let (ws, ready, _) = WsClient::ready_with(&server.api, &alice, "").await;
    assert_eq!(ready["push_dropped"], true, "{ready}");
    ws.close().await;
    assert_eq!(pushes(&server, &alice).await, vec![(1, Value::Null)]);
    // Registered again: no longer dropped.
    server
        .put(&path(1), Some(&alice.access), apns())
        .await
        .expect(200);
    let (ws, ready, _) = WsClient::ready_with(&server.api, &alice, "").await;
    assert!(ready.get("push_dropped").is_none(), "{ready}");
    ws.close().await;
    server.server.stop().await;
}

async fn the_vapid_key_is_served_when_web_push_is_on(backend: Backend) {
    let server = push_server(backend).await;
    let reply = server.get("/v1/push/vapid", None).await.expect(200);
    assert_eq!(keys(&reply), ["public_key"], "{reply}");
    let key = URL_SAFE_NO_PAD
        .decode(reply["public_key"].as_str().unwrap())
        .unwrap();
    assert_eq!(key.len(), 65);
    assert_eq!(key[0], 4, "uncompressed");
    assert!(p256::PublicKey::from_sec1_bytes(&key).is_ok());
    assert_eq!(key, server.vapid.to_encoded_point(false).as_bytes());
    server.server.stop().await;
}
