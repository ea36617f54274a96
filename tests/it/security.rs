//! Sessions, rate limits and caps, end to end: the per-IP auth limit and
//! who the client is behind a proxy, the per-user send budget shared by
//! REST and WebSocket, logout, logout everywhere, password change, account
//! deletion, and the caps on sockets and queues. Each limit must refuse with
//! its code, keep the server up and lose nothing already accepted.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::{Event, WsClient, assert_next_is_sentinel, close};
use crate::common::{Account, Api, Backend, PASSWORD, Reply, TestServer, b64, id, unb64};

backend_tests!(
    auth_routes_are_rate_limited_per_ip_and_other_routes_are_not,
    forwarded_addresses_count_only_behind_trusted_proxies,
    ipv6_clients_share_one_budget_per_64,
    the_send_budget_is_shared_by_rest_and_websocket,
    logout_ends_only_its_own_session,
    logout_all_ends_every_session,
    password_change_needs_the_current_password_and_ends_every_session,
    account_deletion_needs_the_password_and_removes_the_account,
    a_users_third_socket_is_closed_with_4429,
    sockets_per_ip_are_capped_before_the_upgrade,
    unauthenticated_sockets_are_capped_until_they_authenticate,
    a_full_queue_refuses_until_the_recipient_acks,
);

/// The longest a test waits for the server to notice something (a socket
/// gone), polling every [`POLL`].
const SETTLE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

const NEW_PASSWORD: &str = "a different, longer passphrase";

/// `POST /v1/login` as `username` with `password`, from `forwarded_for`
/// (an `X-Forwarded-For` value) when given.
async fn login_as(api: &Api, username: &str, password: &str, forwarded_for: Option<&str>) -> Reply {
    let mut request = api.http.post(api.url("/v1/login"));
    if let Some(xff) = forwarded_for {
        request = request.header("x-forwarded-for", xff);
    }
    api.call(request.json(&json!({ "username": username, "password": password })))
        .await
}

/// Another session (login) of `who`.
async fn second_session(api: &Api, who: &Account) -> Account {
    let tokens = api.login(&who.username).await;
    session_from(who, &tokens)
}

/// `who` with the token pair of a login or password change reply.
fn session_from(who: &Account, tokens: &Value) -> Account {
    Account {
        access: tokens["access_token"].as_str().unwrap().to_owned(),
        refresh: tokens["refresh_token"].as_str().unwrap().to_owned(),
        ..who.clone()
    }
}

async fn refresh(api: &Api, refresh_token: &str) -> Reply {
    api.refresh(refresh_token).await
}

async fn delete_me(api: &Api, token: &str, password: &str) -> Reply {
    let request = api
        .http
        .delete(api.url("/v1/me"))
        .bearer_auth(token)
        .json(&json!({ "password": password }));
    api.call(request).await
}

/// `POST /v1/messages`, whatever the answer.
async fn try_send(api: &Api, from: &Account, to: Uuid, body: &[u8]) -> Reply {
    api.post(
        "/v1/messages",
        Some(&from.access),
        json!({ "to": to, "body": b64(body) }),
    )
    .await
}

/// The `Retry-After` of a 429, which must be a positive whole number of
/// seconds.
#[track_caller]
pub(crate) fn retry_after(reply: &Reply) -> u64 {
    let value = reply
        .headers
        .get(RETRY_AFTER)
        .unwrap_or_else(|| panic!("a 429 without Retry-After: {:?}", reply.headers));
    let seconds: u64 = value
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {value:?}"));
    assert!(seconds > 0, "Retry-After: {seconds}");
    seconds
}

/// Asserts that the access token is refused.
async fn assert_refused(api: &Api, who: &Account) {
    api.get("/v1/me", Some(&who.access))
        .await
        .expect_error(401, "unauthorized");
}

/// Asserts that the access token works.
async fn assert_accepted(api: &Api, who: &Account) {
    let me = api.get("/v1/me", Some(&who.access)).await.expect(200);
    assert_eq!(id(&me["id"]), who.id);
}

async fn assert_healthy(api: &Api) {
    let health = api.get("/healthz", None).await.expect(200);
    assert_eq!(health["status"], "ok");
}

/// Pushes one message from `from` to `to` and asserts that `ws` (a socket
/// of `to`) receives it: the socket is open and live.
async fn assert_live(api: &Api, ws: &mut WsClient, from: &Account, to: Uuid) {
    let body = format!("ping {}", Uuid::new_v4());
    let sent = api.send(from, to, body.as_bytes()).await;
    let frame = ws.expect("message").await;
    assert_eq!(frame["id"], sent["id"], "{frame}");
    assert_eq!(unb64(frame["body"].as_str().unwrap()), body.as_bytes());
}

/// The bodies of a list of messages, sorted.
fn bodies(messages: &[Value]) -> Vec<String> {
    let mut all: Vec<String> = messages
        .iter()
        .map(|m| String::from_utf8(unb64(m["body"].as_str().unwrap())).unwrap())
        .collect();
    all.sort();
    all
}

fn ws_url(api: &Api) -> String {
    format!("{}/v1/ws", api.base.replacen("http", "ws", 1))
}

/// A WebSocket upgrade the server must refuse before upgrading: its HTTP
/// reply, read in full.
async fn refused_upgrade(api: &Api, token: Option<&str>) -> Reply {
    let mut request = api
        .http
        .get(ws_url(api).replacen("ws", "http", 1))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let reply = tokio::time::timeout(Duration::from_secs(10), api.call(request))
        .await
        .expect("a refusal within 10 s, not an upgrade");
    assert_ne!(reply.status.as_u16(), 101, "the upgrade was accepted");
    reply
}

type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Upgrades with `token` in the header until the server accepts (a socket
/// closed a moment ago may still be counted), and reads its `ready`.
async fn connect_when_room(api: &Api, token: &str) -> RawSocket {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let mut request = ws_url(api).into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match tokio_tungstenite::connect_async(request).await {
            Ok((mut stream, _)) => {
                let frame = tokio::time::timeout(Duration::from_secs(15), stream.next())
                    .await
                    .expect("a frame within 15 s");
                let Some(Ok(Message::Text(text))) = frame else {
                    panic!("expected ready, got {frame:?}");
                };
                let ready: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(ready["type"], "ready", "{ready}");
                return stream;
            }
            Err(WsError::Http(response)) => {
                assert_eq!(response.status().as_u16(), 429, "{response:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "still refused {SETTLE:?} after a socket closed"
                );
                tokio::time::sleep(POLL).await;
            }
            Err(err) => panic!("upgrade failed: {err}"),
        }
    }
}

async fn auth_routes_are_rate_limited_per_ip_and_other_routes_are_not(backend: Backend) {
    // Sign up without limits first, so the limited server sees logins only.
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let db = server.stop().await;
    let server = TestServer::start_on(
        db,
        &["--auth-rate-per-minute", "10", "--auth-rate-burst", "3"],
    )
    .await;

    // The burst: three attempts, right or wrong, answered on their merits.
    let first = login_as(&server, "alice", PASSWORD, None).await.expect(200);
    login_as(&server, "alice", "wrong password!", None)
        .await
        .expect_error(401, "unauthorized");
    login_as(&server, "alice", PASSWORD, None).await.expect(200);

    // The fourth is refused before the password is even looked at.
    let refused = login_as(&server, "alice", PASSWORD, None).await;
    refused.expect_error(429, "rate_limited");
    let wait = retry_after(&refused);
    assert!(wait <= 6, "10 a minute refills one every 6 s, told {wait}");

    // Refresh and sign-up draw on the same per-address budget.
    refresh(&server, first["refresh_token"].as_str().unwrap())
        .await
        .expect_error(429, "rate_limited");
    let register = server
        .post(
            "/v1/register",
            None,
            json!({ "username": "bob", "password": PASSWORD, "public_key": crate::common::public_key() }),
        )
        .await;
    register.expect_error(429, "rate_limited");
    retry_after(&register);

    // Everything else is not limited.
    let session = session_from(&alice, &first);
    for _ in 0..20 {
        assert_accepted(&server, &session).await;
    }
    assert!(server.inbox(&session).await.is_empty());
    assert_healthy(&server).await;
    server.stop().await;
}

async fn forwarded_addresses_count_only_behind_trusted_proxies(backend: Backend) {
    let limits = ["--auth-rate-burst", "2", "--auth-rate-per-minute", "1"];

    // Behind a trusted proxy, each forwarded client has its own budget.
    let mut flags = limits.to_vec();
    flags.extend(["--trusted-proxies", "127.0.0.1"]);
    let server = TestServer::start_with(backend, &flags).await;
    let register = server
        .http
        .post(server.url("/v1/register"))
        .header("x-forwarded-for", "192.0.2.10")
        .json(&json!({ "username": "alice", "password": PASSWORD, "public_key": crate::common::public_key() }));
    server.call(register).await.expect(201);

    let one = Some("198.51.100.1");
    login_as(&server, "alice", PASSWORD, one).await.expect(200);
    login_as(&server, "alice", PASSWORD, one).await.expect(200);
    let refused = login_as(&server, "alice", PASSWORD, one).await;
    refused.expect_error(429, "rate_limited");
    retry_after(&refused);
    // A client cannot escape by prepending addresses of its own: the
    // proxy appended the real one, and that is the one counted.
    login_as(
        &server,
        "alice",
        PASSWORD,
        Some("198.51.100.2, 198.51.100.1"),
    )
    .await
    .expect_error(429, "rate_limited");
    // Another client behind the proxy, and the proxy itself, are untouched.
    login_as(&server, "alice", PASSWORD, Some("198.51.100.2"))
        .await
        .expect(200);
    login_as(&server, "alice", PASSWORD, None).await.expect(200);
    assert_healthy(&server).await;
    server.stop().await;

    // Without trusted proxies the header is the client's word and ignored:
    // every request counts as 127.0.0.1, whatever it claims.
    let server = TestServer::start_with(backend, &limits).await;
    server.register("alice").await;
    login_as(&server, "alice", PASSWORD, Some("198.51.100.1"))
        .await
        .expect(200);
    for xff in ["198.51.100.2", "198.51.100.3", "203.0.113.7, 198.51.100.4"] {
        login_as(&server, "alice", PASSWORD, Some(xff))
            .await
            .expect_error(429, "rate_limited");
    }
    login_as(&server, "alice", PASSWORD, None)
        .await
        .expect_error(429, "rate_limited");
    assert_healthy(&server).await;
    server.stop().await;
}

/// An IPv6 host owns a /64: fresh addresses from it are not fresh budgets
/// (issue 24, item 11). Before the fix every address had its own.
async fn ipv6_clients_share_one_budget_per_64(backend: Backend) {
    let flags = [
        "--auth-rate-burst",
        "2",
        "--auth-rate-per-minute",
        "1",
        "--trusted-proxies",
        "127.0.0.1",
    ];
    let server = TestServer::start_with(backend, &flags).await;
    let register = server
        .http
        .post(server.url("/v1/register"))
        .header("x-forwarded-for", "2001:db8:ffff::1")
        .json(&json!({ "username": "alice", "password": PASSWORD, "public_key": crate::common::public_key() }));
    server.call(register).await.expect(201);

    // Two logins from two addresses of one /64 spend its burst of two...
    login_as(&server, "alice", PASSWORD, Some("2001:db8:1:2::1"))
        .await
        .expect(200);
    login_as(
        &server,
        "alice",
        PASSWORD,
        Some("[2001:db8:1:2:aaaa::7]:4431"),
    )
    .await
    .expect(200);
    // ...and every further address of it is refused.
    for xff in ["2001:db8:1:2::2", "2001:db8:1:2:ffff:ffff:ffff:ffff"] {
        login_as(&server, "alice", PASSWORD, Some(xff))
            .await
            .expect_error(429, "rate_limited");
    }
    // The next /64 is another client.
    login_as(&server, "alice", PASSWORD, Some("2001:db8:1:3::1"))
        .await
        .expect(200);
    assert_healthy(&server).await;
    server.stop().await;
}

async fn the_send_budget_is_shared_by_rest_and_websocket(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &["--send-rate-per-second", "1", "--send-rate-burst", "3"],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;
    // Alice's socket is ready before her budget is spent, so the WebSocket
    // send below comes well within the second it takes to refill.
    let (mut ws, backlog) = WsClient::ready(&server, &alice).await;
    assert!(backlog.is_empty());

    for n in 1..=3 {
        server
            .send(&alice, bob.id, format!("rest {n}").as_bytes())
            .await;
    }
    let refused = try_send(&server, &alice, bob.id, b"rest 4").await;
    refused.expect_error(429, "rate_limited");
    assert_eq!(retry_after(&refused), 1, "one a second: wait at most 1 s");

    // The budget spent over REST refuses the WebSocket send too; the
    // socket stays open.
    ws.send_message("w1", bob.id, b"ws 1").await;
    let error = ws.expect("error").await;
    assert_eq!(error["code"], "rate_limited", "{error}");
    assert_eq!(error["ref"], "w1", "{error}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));

    // Budgets are per sender.
    server.send(&carol, bob.id, b"carol").await;

    // After the refill the same socket sends again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ws.send_message("w2", bob.id, b"ws 2").await;
    let sent = ws.expect("sent").await;
    assert_eq!(sent["ref"], "w2", "{sent}");

    // Exactly the accepted messages are queued; the refused ones are not.
    let inbox = server.inbox(&bob).await;
    assert_eq!(
        bodies(&inbox),
        ["carol", "rest 1", "rest 2", "rest 3", "ws 2"]
    );
    assert!(inbox.iter().any(|m| m["id"] == sent["id"]));
    assert_healthy(&server).await;
    ws.close().await;
    server.stop().await;
}

async fn logout_ends_only_its_own_session(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let phone = second_session(&server, &alice).await;
    let bob = server.account("bob").await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut phone_ws, _) = WsClient::ready(&server, &phone).await;

    server
        .post("/v1/logout", Some(&alice.access), json!({}))
        .await
        .expect(204);

    // The session's access token, refresh token and socket are all done.
    assert_refused(&server, &alice).await;
    laptop_ws.expect_close(close::REVOKED).await;
    refresh(&server, &alice.refresh)
        .await
        .expect_error(401, "unauthorized");
    let mut again = WsClient::connect(&server, Some(&alice.access)).await;
    again.expect_close(close::REFUSED).await;
    server
        .post("/v1/logout", Some(&alice.access), json!({}))
        .await
        .expect_error(401, "unauthorized");

    // The other session is untouched, even after the dead refresh token
    // was presented: that is not a reuse of a live family.
    assert_accepted(&server, &phone).await;
    assert_live(&server, &mut phone_ws, &bob, alice.id).await;
    let renewed = refresh(&server, &phone.refresh).await.expect(200);
    let renewed = session_from(&phone, &renewed);
    assert_accepted(&server, &renewed).await;
    assert_next_is_sentinel(&server, &[&renewed], &mut [&mut phone_ws]).await;
    assert_live(&server, &mut phone_ws, &bob, alice.id).await;
    phone_ws.close().await;
    server.stop().await;
}

async fn logout_all_ends_every_session(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let phone = second_session(&server, &alice).await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut phone_ws, _) = WsClient::ready(&server, &phone).await;

    server
        .post("/v1/logout-all", Some(&phone.access), json!({}))
        .await
        .expect(204);

    for session in [&alice, &phone] {
        assert_refused(&server, session).await;
        refresh(&server, &session.refresh)
            .await
            .expect_error(401, "unauthorized");
    }
    laptop_ws.expect_close(close::REVOKED).await;
    phone_ws.expect_close(close::REVOKED).await;

    // Other users are not affected.
    assert_accepted(&server, &bob).await;
    assert_live(&server, &mut bob_ws, &carol, bob.id).await;

    // A fresh login works, over REST and WebSocket.
    let fresh = second_session(&server, &alice).await;
    assert_accepted(&server, &fresh).await;
    let (mut fresh_ws, backlog) = WsClient::ready(&server, &fresh).await;
    assert!(backlog.is_empty());
    assert_live(&server, &mut fresh_ws, &bob, alice.id).await;
    fresh_ws.close().await;
    bob_ws.close().await;
    server.stop().await;
}

async fn password_change_needs_the_current_password_and_ends_every_session(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let phone = second_session(&server, &alice).await;
    let bob = server.account("bob").await;
    let (mut laptop_ws, _) = WsClient::ready(&server, &alice).await;
    let (mut phone_ws, _) = WsClient::ready(&server, &phone).await;

    // A wrong current password changes nothing and revokes nothing.
    let wrong = server
        .put(
            "/v1/password",
            Some(&alice.access),
            json!({ "current_password": "not the password", "new_password": NEW_PASSWORD }),
        )
        .await;
    wrong.expect_error(403, "forbidden");
    assert_accepted(&server, &alice).await;
    assert_accepted(&server, &phone).await;
    // Both sockets are open: each gets the push.
    let sent = server.send(&bob, alice.id, b"still signed in").await;
    for ws in [&mut laptop_ws, &mut phone_ws] {
        assert_eq!(ws.expect("message").await["id"], sent["id"]);
    }
    server.login("alice").await;

    let changed = server
        .put(
            "/v1/password",
            Some(&alice.access),
            json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
        )
        .await
        .expect(200);
    assert_eq!(changed["token_type"], "bearer");
    let current = session_from(&alice, &changed);
    assert_ne!(current.access, alice.access);

    // Every earlier session is over, including the one that changed it.
    for old in [&alice, &phone] {
        assert_refused(&server, old).await;
        refresh(&server, &old.refresh)
            .await
            .expect_error(401, "unauthorized");
    }
    laptop_ws.expect_close(close::REVOKED).await;
    phone_ws.expect_close(close::REVOKED).await;

    // The new pair works: access, socket and refresh.
    assert_accepted(&server, &current).await;
    let (mut ws, backlog) = WsClient::ready(&server, &current).await;
    assert_eq!(
        ids_of(&backlog),
        [id(&sent["id"])],
        "the unacked push is still queued"
    );
    assert_live(&server, &mut ws, &bob, alice.id).await;
    let renewed = refresh(&server, &current.refresh).await.expect(200);
    assert_accepted(&server, &session_from(&alice, &renewed)).await;

    // Only the new password logs in.
    login_as(&server, "alice", PASSWORD, None)
        .await
        .expect_error(401, "unauthorized");
    login_as(&server, "alice", NEW_PASSWORD, None)
        .await
        .expect(200);
    ws.close().await;
    server.stop().await;
}

async fn account_deletion_needs_the_password_and_removes_the_account(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server.send(&bob, alice.id, b"for alice 1").await;
    server.send(&bob, alice.id, b"for alice 2").await;
    let to_bob = server.send(&alice, bob.id, b"from alice").await;
    let (mut ws, backlog) = WsClient::ready(&server, &alice).await;
    assert_eq!(backlog.len(), 2);

    // A wrong password deletes nothing.
    delete_me(&server, &alice.access, "not the password")
        .await
        .expect_error(403, "forbidden");
    assert_accepted(&server, &alice).await;
    assert_live(&server, &mut ws, &bob, alice.id).await;
    assert_eq!(server.inbox(&alice).await.len(), 3);

    let deleted = delete_me(&server, &alice.access, PASSWORD).await;
    assert_eq!(deleted.status.as_u16(), 204, "{:?}", deleted.body);
    ws.expect_close(close::REVOKED).await;
    assert_refused(&server, &alice).await;
    refresh(&server, &alice.refresh)
        .await
        .expect_error(401, "unauthorized");
    login_as(&server, "alice", PASSWORD, None)
        .await
        .expect_error(401, "unauthorized");

    // Nobody can send to the account any more.
    try_send(&server, &bob, alice.id, b"too late")
        .await
        .expect_error(404, "not_found");
    server
        .get(&format!("/v1/public-key/{}", alice.id), Some(&bob.access))
        .await
        .expect_error(404, "not_found");
    server
        .get("/v1/users/alice", Some(&bob.access))
        .await
        .expect_error(404, "not_found");

    // What Alice sent stays Bob's.
    let bobs = server.inbox(&bob).await;
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0]["id"], to_bob["id"]);
    assert_eq!(id(&bobs[0]["from"]), alice.id);
    assert_eq!(unb64(bobs[0]["body"].as_str().unwrap()), b"from alice");

    // The name is free again, and the new account inherits nothing.
    let reborn = server.account("alice").await;
    assert_ne!(reborn.id, alice.id);
    assert!(server.inbox(&reborn).await.is_empty());
    let (mut ws, backlog) = WsClient::ready(&server, &reborn).await;
    assert!(backlog.is_empty());
    assert_live(&server, &mut ws, &bob, reborn.id).await;
    assert_healthy(&server).await;
    ws.close().await;

    // The deleted account's access token is revoked, not merely orphaned:
    // it can neither send nor hold a socket (which would make the old id
    // look online and let messages to it be accepted).
    try_send(&server, &alice, bob.id, b"from the grave")
        .await
        .expect_error(401, "unauthorized");
    let mut again = WsClient::connect(&server, Some(&alice.access)).await;
    again.expect_close(close::REFUSED).await;
    assert_eq!(server.inbox(&bob).await.len(), 1);
    server.stop().await;
}

async fn a_users_third_socket_is_closed_with_4429(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-connections-per-user", "2"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut first, _) = WsClient::ready(&server, &alice).await;
    let (mut second, _) = WsClient::ready(&server, &alice).await;

    let mut third = WsClient::connect(&server, Some(&alice.access)).await;
    third.expect_close(close::TOO_MANY_FOR_THE_DEVICE).await;
    // Another user is not affected by Alice's count.
    let (mut bobs, _) = WsClient::ready(&server, &bob).await;

    // The first two are untouched: both get the next push.
    let sent = server.send(&bob, alice.id, b"still here").await;
    for ws in [&mut first, &mut second] {
        let frame = ws.expect("message").await;
        assert_eq!(frame["id"], sent["id"]);
    }
    assert_live(&server, &mut bobs, &alice, bob.id).await;

    // A closed socket makes room (once the server has noticed).
    first.close().await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut replacement = loop {
        let mut ws = WsClient::connect(&server, Some(&alice.access)).await;
        match ws.event().await {
            Event::Json(ready) => {
                assert_eq!(ready["type"], "ready", "{ready}");
                break ws;
            }
            closed => closed.assert_close(close::TOO_MANY_FOR_THE_DEVICE),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after {SETTLE:?}"
        );
        tokio::time::sleep(POLL).await;
    };
    let backlog = replacement.until_drained().await;
    assert_eq!(ids_of(&backlog), [id(&sent["id"])], "nothing lost");
    assert_healthy(&server).await;
    assert_eq!(server.inbox(&alice).await.len(), 1);
    second.close().await;
    replacement.close().await;
    bobs.close().await;
    server.stop().await;
}

fn ids_of(messages: &[Value]) -> Vec<Uuid> {
    messages.iter().map(|m| id(&m["id"])).collect()
}

async fn sockets_per_ip_are_capped_before_the_upgrade(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-connections-per-ip", "2"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (first, _) = WsClient::ready(&server, &alice).await;
    let (mut second, _) = WsClient::ready(&server, &bob).await;

    // The third from 127.0.0.1 is refused with HTTP 429, whoever it is and
    // whether or not it carries a token.
    for token in [Some(alice.access.as_str()), Some(&bob.access), None] {
        refused_upgrade(&server, token)
            .await
            .expect_error(429, "too_many_connections");
    }
    // REST is not capped, and the open sockets keep working.
    assert_healthy(&server).await;
    assert_live(&server, &mut second, &alice, bob.id).await;

    first.close().await;
    let mut replacement = connect_when_room(&server, &alice.access).await;
    refused_upgrade(&server, Some(&alice.access))
        .await
        .expect_error(429, "too_many_connections");
    let _ = replacement.close(None).await;

    assert_healthy(&server).await;
    assert_eq!(server.inbox(&bob).await.len(), 1, "nothing lost");
    second.close().await;
    server.stop().await;
}

async fn unauthenticated_sockets_are_capped_until_they_authenticate(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-unauthenticated-sockets", "1"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    // Upgraded, but no header and no auth frame yet.
    let mut waiting = WsClient::connect(&server, None).await;
    refused_upgrade(&server, None)
        .await
        .expect_error(429, "too_many_connections");
    assert_healthy(&server).await;

    // Once it authenticates it no longer counts.
    waiting
        .send_json(json!({ "type": "auth", "token": alice.access }))
        .await;
    let ready = waiting.expect("ready").await;
    assert_eq!(id(&ready["user_id"]), alice.id);
    assert!(waiting.until_drained().await.is_empty());

    let mut next = WsClient::connect(&server, None).await;
    next.send_json(json!({ "type": "auth", "token": bob.access }))
        .await;
    next.expect("ready").await;
    assert!(next.until_drained().await.is_empty());

    // Both authenticated sockets are live.
    assert_live(&server, &mut waiting, &bob, alice.id).await;
    assert_live(&server, &mut next, &alice, bob.id).await;
    assert_healthy(&server).await;
    waiting.close().await;
    next.close().await;
    server.stop().await;
}

async fn a_full_queue_refuses_until_the_recipient_acks(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-queued-per-device", "3"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let carol = server.account("carol").await;

    let mut accepted = Vec::new();
    for n in 1..=3 {
        accepted.push(id(&server
            .send(&alice, bob.id, format!("m{n}").as_bytes())
            .await["id"]));
    }
    try_send(&server, &alice, bob.id, b"m4")
        .await
        .expect_error(429, "queue_full");
    // The cap is the recipient's, whoever sends, and on either path.
    try_send(&server, &carol, bob.id, b"c1")
        .await
        .expect_error(429, "queue_full");
    let (mut ws, _) = WsClient::ready(&server, &carol).await;
    ws.send_message("q", bob.id, b"c2").await;
    let error = ws.expect("error").await;
    assert_eq!(error["code"], "queue_full", "{error}");
    assert_eq!(error["ref"], "q", "{error}");
    // Other recipients are not affected.
    server.send(&alice, carol.id, b"for carol").await;
    assert_healthy(&server).await;

    // Bob polls and acks one: that makes room for exactly one more.
    let page = server
        .get("/v1/messages", Some(&bob.access))
        .await
        .expect(200);
    let listed = page["messages"].as_array().unwrap();
    assert_eq!(ids_of(listed), accepted, "exactly the accepted messages");
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [accepted[0]] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 1);
    let again = server.send(&alice, bob.id, b"m5").await;
    try_send(&server, &alice, bob.id, b"m6")
        .await
        .expect_error(429, "queue_full");

    let inbox = server.inbox(&bob).await;
    assert_eq!(bodies(&inbox), ["m2", "m3", "m5"]);
    assert_eq!(id(&inbox[2]["id"]), id(&again["id"]));
    assert_healthy(&server).await;
    ws.close().await;
    server.stop().await;
}
