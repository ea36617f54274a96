//! The user directory and public keys: lookup by name, by id, and key
//! rotation.

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{Account, Backend, PASSWORD, TestServer, b64, public_key, time, unb64};

backend_tests!(
    directory_lookup_by_name,
    directory_lookup_ignores_case,
    directory_lookup_of_unknown_names,
    directory_requires_a_token,
    public_key_by_id,
    public_key_of_unknown_or_malformed_ids,
    public_key_requires_a_token,
    update_key_is_seen_by_others,
    update_key_rejects_invalid_keys,
    update_key_requires_a_token,
);

/// The public key `who` registered with, as `/v1/me` reports it.
async fn own_key(server: &TestServer, who: &Account) -> String {
    let me = server.get("/v1/me", Some(&who.access)).await.expect(200);
    me["public_key"].as_str().unwrap().to_owned()
}

/// Registers `username` with `key` and logs in.
async fn account_with_key(server: &TestServer, username: &str, key: &str) -> Account {
    let body = server
        .post(
            "/v1/register",
            None,
            json!({ "username": username, "password": PASSWORD, "public_key": key }),
        )
        .await
        .expect(201);
    let tokens = server.login(username).await;
    Account {
        id: body["id"].as_str().unwrap().parse().unwrap(),
        username: username.to_owned(),
        access: tokens["access_token"].as_str().unwrap().to_owned(),
        refresh: tokens["refresh_token"].as_str().unwrap().to_owned(),
    }
}

async fn directory_lookup_by_name(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob_key = public_key();
    let bob = account_with_key(&server, "bob", &bob_key).await;
    let alice = server.account("alice").await;

    let entry = server
        .get("/v1/users/bob", Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(
        entry,
        json!({ "id": bob.id, "username": "bob", "public_key": bob_key }),
        "exactly id, username and public_key"
    );
    // One's own entry is visible too.
    let own = server
        .get("/v1/users/alice", Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(own["id"], alice.id.to_string());
    assert_eq!(own["public_key"], own_key(&server, &alice).await);
}

async fn directory_lookup_ignores_case(backend: Backend) {
    let server = TestServer::start(backend).await;
    let key = public_key();
    let mixed = account_with_key(&server, "Bob.Smith", &key).await;
    let alice = server.account("alice").await;
    for spelling in ["Bob.Smith", "bob.smith", "BOB.SMITH", "bOB.sMITH"] {
        let entry = server
            .get(&format!("/v1/users/{spelling}"), Some(&alice.access))
            .await
            .expect(200);
        assert_eq!(entry["id"], mixed.id.to_string(), "{spelling}");
        // The name as registered, not as asked.
        assert_eq!(entry["username"], "Bob.Smith", "{spelling}");
        assert_eq!(entry["public_key"], key.as_str(), "{spelling}");
    }
}

async fn directory_lookup_of_unknown_names(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    server.register("bob").await;
    // Unknown, a prefix, an extension, and a name that could not be
    // registered at all.
    for name in ["carol", "bo", "bobby", "bob_", "b0b", "x"] {
        let reply = server
            .get(&format!("/v1/users/{name}"), Some(&alice.access))
            .await;
        reply.expect_error(404, "not_found");
        assert!(reply.body["error"].get("field").is_none());
    }
}

async fn directory_requires_a_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let reply = server.get("/v1/users/alice", None).await;
    reply.expect_error(401, "unauthorized");
    assert_eq!(reply.headers["www-authenticate"], "Bearer");
    // Nor does a bad token reveal whether the name exists.
    server
        .get("/v1/users/alice", Some("garbage"))
        .await
        .expect_error(401, "unauthorized");
    server
        .get("/v1/users/nobody", Some(&alice.refresh))
        .await
        .expect_error(401, "unauthorized");
}

async fn public_key_by_id(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob_key = public_key();
    let bob = account_with_key(&server, "bob", &bob_key).await;
    let alice = server.account("alice").await;
    let before = Utc::now() - chrono::TimeDelta::seconds(60);

    let view = server
        .get(&format!("/v1/public-key/{}", bob.id), Some(&alice.access))
        .await
        .expect(200);
    let fields: Vec<&str> = view
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        fields.len(),
        3,
        "exactly user_id, public_key, updated_at: {view}"
    );
    assert_eq!(view["user_id"], bob.id.to_string());
    assert_eq!(view["public_key"], bob_key.as_str());
    assert_eq!(unb64(view["public_key"].as_str().unwrap()).len(), 32);
    let updated_at = time(&view["updated_at"]);
    assert!(
        updated_at > before && updated_at <= Utc::now(),
        "{updated_at}"
    );

    // The id is case-insensitive hex like any UUID, hyphenated or not.
    let upper = server
        .get(
            &format!("/v1/public-key/{}", bob.id.to_string().to_uppercase()),
            Some(&alice.access),
        )
        .await
        .expect(200);
    assert_eq!(upper, view);
    let simple = server
        .get(
            &format!("/v1/public-key/{}", bob.id.simple()),
            Some(&alice.access),
        )
        .await
        .expect(200);
    assert_eq!(simple, view);
}

async fn public_key_of_unknown_or_malformed_ids(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    for id in [Uuid::new_v4(), Uuid::nil(), Uuid::max(), Uuid::now_v7()] {
        server
            .get(&format!("/v1/public-key/{id}"), Some(&alice.access))
            .await
            .expect_error(404, "not_found");
    }
    // Not a UUID at all: a validation error naming the path parameter.
    for bad in [
        "not-a-uuid",
        "alice",
        "12345",
        "00000000-0000-0000-0000-00000000000g",
        "%27%20OR%20%271%27%3D%271",
    ] {
        let reply = server
            .get(&format!("/v1/public-key/{bad}"), Some(&alice.access))
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "user_id", "{bad}");
    }
    // One's own id resolves like anyone else's.
    server
        .get(&format!("/v1/public-key/{}", alice.id), Some(&alice.access))
        .await
        .expect(200);
}

async fn public_key_requires_a_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    server
        .get(&format!("/v1/public-key/{}", alice.id), None)
        .await
        .expect_error(401, "unauthorized");
    // Authentication comes before validation of the path.
    server
        .get("/v1/public-key/not-a-uuid", None)
        .await
        .expect_error(401, "unauthorized");
}

async fn update_key_is_seen_by_others(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let old = server
        .get(&format!("/v1/public-key/{}", alice.id), Some(&bob.access))
        .await
        .expect(200);

    // Sizes at both ends of the accepted range.
    for bytes in [vec![7u8; 32], (0..=255).cycle().take(2048).collect()] {
        let new_key = b64(&bytes);
        let previous = server
            .get(&format!("/v1/public-key/{}", alice.id), Some(&bob.access))
            .await
            .expect(200);
        let updated = server
            .put(
                "/v1/update-key",
                Some(&alice.access),
                json!({ "public_key": new_key }),
            )
            .await
            .expect(200);
        assert_eq!(updated["user_id"], alice.id.to_string());
        assert_eq!(updated["public_key"], new_key.as_str());
        assert_eq!(updated.as_object().unwrap().len(), 3, "{updated}");
        assert!(time(&updated["updated_at"]) >= time(&previous["updated_at"]));

        // Another user sees the new key through both lookups.
        let by_id = server
            .get(&format!("/v1/public-key/{}", alice.id), Some(&bob.access))
            .await
            .expect(200);
        assert_eq!(by_id, updated);
        let by_name = server
            .get("/v1/users/ALICE", Some(&bob.access))
            .await
            .expect(200);
        assert_eq!(by_name["public_key"], new_key.as_str());
        assert_eq!(by_name["id"], alice.id.to_string());
        assert_eq!(unb64(by_name["public_key"].as_str().unwrap()), bytes);
        // And so does the owner.
        assert_eq!(own_key(&server, &alice).await, new_key);
    }
    assert_ne!(
        old["public_key"],
        server
            .get("/v1/users/alice", Some(&bob.access))
            .await
            .expect(200)["public_key"]
    );
    // Bob's key was not touched by Alice's updates.
    let bob_view = server
        .get(&format!("/v1/public-key/{}", bob.id), Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(bob_view["public_key"], own_key(&server, &bob).await);
    assert_ne!(bob_view["public_key"], b64(&[7u8; 32]));
}

async fn update_key_rejects_invalid_keys(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let before = server
        .get(&format!("/v1/public-key/{}", alice.id), Some(&bob.access))
        .await
        .expect(200);
    let cases = [
        json!({ "public_key": "not base64!" }),
        json!({ "public_key": "" }),
        // Unpadded and URL-safe alphabets are not standard base64.
        json!({ "public_key": b64(&[1; 32]).trim_end_matches('=') }),
        json!({ "public_key": b64(&[0xfb; 33]).replace('+', "-").replace('/', "_") }),
        json!({ "public_key": b64(&[1; 31]) }),
        json!({ "public_key": b64(&[1; 2049]) }),
        json!({}),
        json!({ "public_key": null }),
        json!({ "public_key": 42 }),
        json!({ "public_key": [public_key()] }),
        json!({ "key": public_key() }),
    ];
    for body in cases {
        let reply = server
            .put("/v1/update-key", Some(&alice.access), body.clone())
            .await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], "public_key", "for {body}");
    }
    // The old key is still in place, timestamp and all.
    let after = server
        .get(&format!("/v1/public-key/{}", alice.id), Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(after, before);
    assert_eq!(own_key(&server, &alice).await, before["public_key"]);
}

async fn update_key_requires_a_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let before = own_key(&server, &alice).await;
    let new_key = public_key();
    for token in [None, Some("not.a.jwt"), Some(alice.refresh.as_str())] {
        server
            .put("/v1/update-key", token, json!({ "public_key": new_key }))
            .await
            .expect_error(401, "unauthorized");
    }
    assert_eq!(own_key(&server, &alice).await, before);
}
