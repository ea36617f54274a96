//! What the server logs: never a password, a token, a message body or a
//! key, at any level an operator may turn on.
//!
//! A child server logs at `trace` (its own modules and every dependency)
//! while two users go through a whole session over REST and WebSocket,
//! including the failures that are most tempting to log in full: a wrong
//! password, a malformed frame, a refresh-token replay. Then every secret
//! the session used is looked for in every line.

use serde_json::json;

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{Api, Backend, ServerProcess, TestDb, b64};

backend_tests!(a_whole_session_logs_no_secret);

/// A storage key the test can look for (PostgreSQL servers get one anyway).
const STORAGE_KEY: &str = "c2VhbHBvc3QtbG9nLXRlc3Qtc3RvcmFnZS1rZXktMDE=";

/// Logs in; returns (access, refresh).
async fn login(api: &Api, username: &str, password: &str) -> (String, String) {
    let tokens = api
        .post(
            "/v1/login",
            None,
            json!({ "username": username, "password": password }),
        )
        .await
        .expect(200);
    (
        tokens["access_token"].as_str().unwrap().to_owned(),
        tokens["refresh_token"].as_str().unwrap().to_owned(),
    )
}

async fn a_whole_session_logs_no_secret(backend: Backend) {
    let db = TestDb::new(backend).await;
    let storage_keys = format!("7:{STORAGE_KEY}");
    let server = ServerProcess::spawn(
        &db.url,
        &[
            ("RUST_LOG", "trace"),
            ("SEALPOST_STORAGE_KEYS", &storage_keys),
        ],
    );
    let api = &server.api;
    // Every secret is distinctive, so a hit cannot be a coincidence.
    let mut secrets: Vec<(&str, String)> = vec![
        ("JWT secret", crate::common::JWT_SECRET.to_owned()),
        ("storage key", STORAGE_KEY.to_owned()),
    ];
    let password = |who: &str| format!("pw-of-{who}-Zq8vXw3kTn");

    let mut ids = Vec::new();
    for who in ["alice", "bob"] {
        let public_key = b64(format!("public-key-of-{who}-0123456789abcdefgh").as_bytes());
        let id = api
            .post(
                "/v1/register",
                None,
                json!({ "username": who, "password": password(who), "public_key": public_key }),
            )
            .await
            .expect(201);
        ids.push(crate::common::id(&id["id"]));
        secrets.push(("password", password(who)));
        secrets.push(("public key", public_key));
        // Sign-up answers with a session: its tokens are secrets too.
        for (what, field) in [
            ("access token", "access_token"),
            ("refresh token", "refresh_token"),
        ] {
            secrets.push((what, id[field].as_str().unwrap().to_owned()));
        }
    }
    let (alice_id, bob_id) = (ids[0], ids[1]);

    // A password guess is refused, and the guess is not logged either.
    let guess = "pw-guessed-by-mallory-Kd93jf";
    api.post(
        "/v1/login",
        None,
        json!({ "username": "alice", "password": guess }),
    )
    .await
    .expect_error(401, "unauthorized");
    secrets.push(("wrong password", guess.to_owned()));

    let (alice, alice_refresh) = login(api, "alice", &password("alice")).await;
    let (bob, bob_refresh) = login(api, "bob", &password("bob")).await;
    secrets.extend([
        ("access token", alice.clone()),
        ("refresh token", alice_refresh.clone()),
        ("access token", bob.clone()),
        ("refresh token", bob_refresh.clone()),
    ]);

    // A message over REST to bob, offline, and its backlog on his socket.
    let queued = b"body-queued-over-rest-7Yh2Lp";
    api.post(
        "/v1/messages",
        Some(&alice),
        json!({ "to": bob_id, "body": b64(queued) }),
    )
    .await
    .expect(201);
    let mut bob_ws = WsClient::connect(api, Some(&bob)).await;
    bob_ws.expect("ready").await;
    let backlog = bob_ws.until_drained().await;
    assert_eq!(backlog.len(), 1);
    bob_ws.ack(&[backlog[0]["id"].as_str().unwrap()]).await;

    // A message pushed live from alice's socket, which authenticates by
    // frame rather than header.
    let mut alice_ws = WsClient::connect(api, None).await;
    alice_ws
        .send_json(json!({ "type": "auth", "token": alice }))
        .await;
    alice_ws.expect("ready").await;
    alice_ws.until_drained().await;
    let pushed = b"body-pushed-over-socket-Qm4Rt8";
    alice_ws.send_message("1", bob_id, pushed).await;
    alice_ws.expect("sent").await;
    let push = bob_ws.expect("message").await;
    bob_ws.ack(&[push["id"].as_str().unwrap()]).await;

    // A malformed frame carrying a body: refused, and neither is logged.
    let malformed = b"body-in-a-malformed-frame-Hw5Nc1";
    alice_ws
        .send_json(
            json!({ "type": "send", "ref": "2", "to": "not-a-user", "body": b64(malformed) }),
        )
        .await;
    alice_ws.expect("error").await;
    for body in [&queued[..], pushed, malformed] {
        secrets.push(("message body", String::from_utf8(body.to_vec()).unwrap()));
        secrets.push(("message body (base64)", b64(body)));
    }

    // Renewal on the socket, a refresh, a replay of the spent refresh token
    // within the grace (the same pair again), the new one used, the spent
    // one replayed again (reuse, which revokes the session), a password
    // change and a logout.
    let (renewed, renewed_refresh) = login(api, "alice", &password("alice")).await;
    alice_ws
        .send_json(json!({ "type": "auth", "token": renewed }))
        .await;
    alice_ws.expect("authed").await;
    let refreshed = api.refresh(&bob_refresh).await.expect(200);
    let replayed = api.refresh(&bob_refresh).await.expect(200);
    assert_eq!(replayed["refresh_token"], refreshed["refresh_token"]);
    let onward = api
        .refresh(refreshed["refresh_token"].as_str().unwrap())
        .await
        .expect(200);
    api.refresh(&bob_refresh)
        .await
        .expect_error(401, "unauthorized");
    for pair in [&replayed, &onward] {
        for (what, field) in [
            ("access token", "access_token"),
            ("refresh token", "refresh_token"),
        ] {
            secrets.push((what, pair[field].as_str().unwrap().to_owned()));
        }
    }
    let new_password = "pw-new-of-alice-Vb62Gs";
    let changed = api
        .put(
            "/v1/password",
            Some(&renewed),
            json!({ "current_password": password("alice"), "new_password": new_password }),
        )
        .await
        .expect(200);
    api.post(
        "/v1/logout",
        Some(changed["access_token"].as_str().unwrap()),
        json!({}),
    )
    .await;
    secrets.extend([
        ("access token", renewed),
        ("refresh token", renewed_refresh),
        (
            "access token",
            refreshed["access_token"].as_str().unwrap().to_owned(),
        ),
        (
            "refresh token",
            refreshed["refresh_token"].as_str().unwrap().to_owned(),
        ),
        ("password", new_password.to_owned()),
        (
            "access token",
            changed["access_token"].as_str().unwrap().to_owned(),
        ),
        (
            "refresh token",
            changed["refresh_token"].as_str().unwrap().to_owned(),
        ),
    ]);
    alice_ws.close().await;
    bob_ws.close().await;
    assert_ne!(alice_id, bob_id);

    // The log is real and detailed: the session is in it, at trace level.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while server.log_lines("/v1/logout").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the logout was not logged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = server.log_lines("");
    assert!(
        log.iter().any(|line| line.contains("TRACE")),
        "the server did not log at trace level"
    );
    for (what, secret) in &secrets {
        // A token is also looked for by its signature alone, which is what
        // makes it a credential.
        let needles = std::iter::once(secret.as_str())
            .chain(secret.rsplit_once('.').map(|(_, signature)| signature));
        for needle in needles {
            if let Some(line) = log.iter().find(|line| line.contains(needle)) {
                panic!("a {what} is in the log: {line}");
            }
        }
    }
}
