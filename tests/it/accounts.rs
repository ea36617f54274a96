//! Registration, login, refresh-token rotation and the caller's profile.

use reqwest::Method;
use serde_json::json;

use crate::backend_tests;
use crate::common::{Backend, PASSWORD, TestServer, public_key, unb64};

backend_tests!(
    register_returns_the_profile,
    register_validates_each_field,
    usernames_are_unique_ignoring_case,
    login_with_json_and_with_the_oauth2_form,
    login_failures_look_alike,
    me_requires_a_valid_token,
    refresh_rotates_and_detects_reuse,
    refresh_rejects_unknown_tokens,
    concurrent_reuse_leaves_no_refresh_token_alive,
    reuse_racing_a_rotation_revokes_the_rotated_token,
);

async fn register_returns_the_profile(backend: Backend) {
    let server = TestServer::start(backend).await;
    let key = public_key();
    let body = server
        .post(
            "/v1/register",
            None,
            json!({ "username": "Alice.B-1_", "password": PASSWORD, "public_key": key }),
        )
        .await
        .expect(201);
    assert_eq!(body["username"], "Alice.B-1_");
    assert_eq!(body["public_key"], key.as_str());
    assert!(body["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    assert!(
        body["created_at"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .is_ok()
    );
    assert!(body.get("password").is_none() && body.get("password_hash").is_none());
}

async fn register_validates_each_field(backend: Backend) {
    let server = TestServer::start(backend).await;
    let cases = [
        (
            json!({ "username": "ab", "password": PASSWORD, "public_key": public_key() }),
            "username",
        ),
        (
            json!({ "username": "a".repeat(33), "password": PASSWORD, "public_key": public_key() }),
            "username",
        ),
        (
            json!({ "username": "bad name", "password": PASSWORD, "public_key": public_key() }),
            "username",
        ),
        (
            json!({ "username": "robert'); DROP TABLE users;--", "password": PASSWORD, "public_key": public_key() }),
            "username",
        ),
        (
            json!({ "username": "carol", "password": "short", "public_key": public_key() }),
            "password",
        ),
        (
            json!({ "username": "carol", "password": "x".repeat(1025), "public_key": public_key() }),
            "password",
        ),
        (
            json!({ "username": "carol", "password": PASSWORD, "public_key": "not base64!" }),
            "public_key",
        ),
        (
            json!({ "username": "carol", "password": PASSWORD, "public_key": crate::common::b64(&[1; 31]) }),
            "public_key",
        ),
        (
            json!({ "username": "carol", "password": PASSWORD, "public_key": crate::common::b64(&[1; 2049]) }),
            "public_key",
        ),
        (
            json!({ "password": PASSWORD, "public_key": public_key() }),
            "username",
        ),
        (
            json!({ "username": "carol", "password": 12345678, "public_key": public_key() }),
            "password",
        ),
    ];
    for (body, field) in cases {
        let reply = server.post("/v1/register", None, body.clone()).await;
        reply.expect_error(422, "invalid");
        assert_eq!(reply.body["error"]["field"], field, "for {body}");
    }
    // None of them created an account.
    let reply = server
        .post(
            "/v1/login",
            None,
            json!({ "username": "carol", "password": PASSWORD }),
        )
        .await;
    reply.expect_error(401, "unauthorized");
}

async fn usernames_are_unique_ignoring_case(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.register("alice").await;
    for taken in ["alice", "ALICE", "aLiCe"] {
        let reply = server
            .post(
                "/v1/register",
                None,
                json!({ "username": taken, "password": PASSWORD, "public_key": public_key() }),
            )
            .await;
        reply.expect_error(409, "conflict");
    }
    // Login is case-insensitive too.
    server.login("ALICE").await;
}

async fn login_with_json_and_with_the_oauth2_form(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.register("alice").await;
    let json_login = server.login("alice").await;
    assert_eq!(json_login["token_type"], "bearer");
    assert_eq!(json_login["expires_in"], 1800);
    assert!(json_login["refresh_token"].as_str().unwrap().len() >= 43);

    let form = server
        .call(server.http.post(server.url("/v1/login")).form(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", PASSWORD),
        ]))
        .await
        .expect(200);
    let me = server
        .get("/v1/me", form["access_token"].as_str())
        .await
        .expect(200);
    assert_eq!(me["username"], "alice");

    let wrong_grant = server
        .call(server.http.post(server.url("/v1/login")).form(&[
            ("grant_type", "client_credentials"),
            ("username", "alice"),
            ("password", PASSWORD),
        ]))
        .await;
    wrong_grant.expect_error(422, "invalid");
    assert_eq!(wrong_grant.body["error"]["field"], "grant_type");
}

async fn login_failures_look_alike(backend: Backend) {
    let server = TestServer::start(backend).await;
    server.register("alice").await;
    let wrong_password = server
        .post(
            "/v1/login",
            None,
            json!({ "username": "alice", "password": "wrong password" }),
        )
        .await;
    let unknown_user = server
        .post(
            "/v1/login",
            None,
            json!({ "username": "nobody", "password": PASSWORD }),
        )
        .await;
    wrong_password.expect_error(401, "unauthorized");
    unknown_user.expect_error(401, "unauthorized");
    assert_eq!(wrong_password.body, unknown_user.body);
}

async fn me_requires_a_valid_token(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let me = server.get("/v1/me", Some(&alice.access)).await.expect(200);
    assert_eq!(me["id"], alice.id.to_string());
    assert_eq!(me["username"], "alice");
    assert_eq!(unb64(me["public_key"].as_str().unwrap()).len(), 32);

    let missing = server.get("/v1/me", None).await;
    missing.expect_error(401, "unauthorized");
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    server
        .get("/v1/me", Some("not.a.jwt"))
        .await
        .expect_error(401, "unauthorized");
    // The refresh token is not an access token.
    server
        .get("/v1/me", Some(&alice.refresh))
        .await
        .expect_error(401, "unauthorized");
    // A token signed with another secret.
    let forged = {
        let mut parts: Vec<&str> = alice.access.split('.').collect();
        parts[2] = "c2lnbmF0dXJl";
        parts.join(".")
    };
    server
        .get("/v1/me", Some(&forged))
        .await
        .expect_error(401, "unauthorized");
    let scheme = server
        .call(
            server
                .http
                .request(Method::GET, server.url("/v1/me"))
                .header("authorization", format!("Basic {}", alice.access)),
        )
        .await;
    scheme.expect_error(401, "unauthorized");
}

async fn refresh_rotates_and_detects_reuse(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    // A second session of the same user.
    let other_session = server.login("alice").await;

    let first = server.refresh(&alice.refresh).await.expect(200);
    let rotated = first["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(rotated, alice.refresh);
    server
        .get("/v1/me", first["access_token"].as_str())
        .await
        .expect(200);

    // The rotated token works once.
    let second = server.refresh(&rotated).await.expect(200);
    let latest = second["refresh_token"].as_str().unwrap().to_owned();

    // Replaying a spent token is theft: 401, and every refresh token of the
    // user is revoked, including the latest and the other session's.
    server
        .refresh(&alice.refresh)
        .await
        .expect_error(401, "unauthorized");
    server
        .refresh(&latest)
        .await
        .expect_error(401, "unauthorized");
    server
        .refresh(other_session["refresh_token"].as_str().unwrap())
        .await
        .expect_error(401, "unauthorized");

    // Logging in again starts a fresh family.
    let fresh = server.login("alice").await;
    server
        .refresh(fresh["refresh_token"].as_str().unwrap())
        .await
        .expect(200);
}

async fn refresh_rejects_unknown_tokens(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    for token in ["", "nonsense", &alice.access, &"A".repeat(43)] {
        server
            .refresh(token)
            .await
            .expect_error(401, "unauthorized");
    }
    server
        .post("/v1/token/refresh", None, json!({}))
        .await
        .expect_error(422, "invalid");
    // The unknown tokens revoked nothing.
    server.refresh(&alice.refresh).await.expect(200);
}

/// Ten presentations of one refresh token at once: exactly one rotates it,
/// the others are reuse, and the reuse revokes everything, including the
/// token the winner just received.
async fn concurrent_reuse_leaves_no_refresh_token_alive(backend: Backend) {
    // Reuse detection itself: with the refresh grace on, the other nine
    // would be answered with the winner's pair (protocol_edges tests that).
    let server = TestServer::start_with(backend, &["--refresh-grace", "0"]).await;
    let alice = server.account("alice").await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (api, token) = (server.api.clone(), alice.refresh.clone());
        tasks.spawn(async move { api.refresh(&token).await });
    }
    let mut winners = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        match reply.status.as_u16() {
            200 => winners.push(reply.body["refresh_token"].as_str().unwrap().to_owned()),
            _ => reply.expect_error(401, "unauthorized"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one presentation rotates the token"
    );
    server
        .refresh(&winners[0])
        .await
        .expect_error(401, "unauthorized");
}

/// A thief rotates the current token while the victim replays an older,
/// spent one. Whichever way they interleave, the reuse must revoke the
/// token the rotation produced: none may survive. Repeated to hit the
/// overlap.
async fn reuse_racing_a_rotation_revokes_the_rotated_token(backend: Backend) {
    // Without the refresh grace, which would answer the victim's replay
    // when it comes first (protocol_edges races the two with it on).
    let server = TestServer::start_with(backend, &["--refresh-grace", "0"]).await;
    server.account("alice").await;
    for _ in 0..25 {
        let spent = server.login("alice").await["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let current = server.refresh(&spent).await.expect(200)["refresh_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let (thief, victim) = tokio::join!(server.refresh(&current), server.refresh(&spent),);
        victim.expect_error(401, "unauthorized");
        if thief.status == 200 {
            let rotated = thief.body["refresh_token"].as_str().unwrap();
            server
                .refresh(rotated)
                .await
                .expect_error(401, "unauthorized");
        }
    }
}
