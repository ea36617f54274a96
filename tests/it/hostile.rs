//! Hostile input: every malformed, oversized or malicious request gets a
//! clean 4xx JSON error, no SQL leaks out, and the server stays up.

use reqwest::Method;
use serde_json::{Value, json};

use crate::backend_tests;
use crate::common::ws::{WsClient, close};
use crate::common::{Backend, PASSWORD, Reply, TestServer, assert_alive, b64, public_key};

backend_tests!(
    malformed_json_is_refused,
    wrong_content_types_are_refused,
    oversized_bodies_are_refused,
    sql_metacharacters_in_login,
    sql_metacharacters_in_directory_lookup,
    like_wildcards_match_nothing,
    deeply_nested_json_is_refused,
    json_depth_cap_is_enforced_at_its_limit,
    unknown_routes_and_wrong_methods,
    hostile_headers_and_queries,
    non_ascii_and_nul_usernames_match_nothing,
);

/// Fragments that must never reach a client.
const LEAKS: [&str; 8] = [
    "SELECT",
    "INSERT",
    "UPDATE users",
    "DELETE FROM",
    "sqlx",
    "syntax error at",
    "sqlite",
    "postgres",
];

/// Asserts `reply` is an error with one of `statuses`, code `code`, and the
/// documented body shape, leaking nothing.
#[track_caller]
fn assert_clean_error(reply: &Reply, statuses: &[u16], code: &str, what: &str) {
    assert!(
        statuses.contains(&reply.status.as_u16()),
        "{what}: status {} not in {statuses:?}: {:?}",
        reply.status,
        reply.body
    );
    let body = reply.body.as_object().unwrap_or_else(|| {
        panic!("{what}: error body is not an object: {:?}", reply.body);
    });
    assert_eq!(body.len(), 1, "{what}: {:?}", reply.body);
    let error = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {:?}", reply.body));
    assert!(
        error
            .keys()
            .all(|k| matches!(k.as_str(), "code" | "message" | "field")),
        "{what}: unexpected keys: {:?}",
        reply.body
    );
    assert_eq!(error["code"], code, "{what}: {:?}", reply.body);
    let message = error["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{what}: {:?}", reply.body);
    if let Some(field) = error.get("field") {
        assert!(field.is_string(), "{what}: {:?}", reply.body);
    }
    let text = reply.body.to_string();
    for leak in LEAKS {
        assert!(
            !text.to_lowercase().contains(&leak.to_lowercase()),
            "{what}: error body leaks {leak:?}: {text}"
        );
    }
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{what}: {:?}",
        reply.headers
    );
}

/// Percent-encodes every byte but ASCII letters and digits, for a path
/// segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Deterministic noise (xorshift), never valid JSON: it starts with 0xff.
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = vec![0xff];
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(state as u8);
    }
    out
}

/// The JSON endpoints, with whether each needs a token.
const JSON_ENDPOINTS: [(&str, &str, bool); 6] = [
    ("POST", "/v1/register", false),
    ("POST", "/v1/login", false),
    ("POST", "/v1/token/refresh", false),
    ("POST", "/v1/messages", true),
    ("POST", "/v1/messages/ack", true),
    ("PUT", "/v1/update-key", true),
];

fn method(name: &str) -> Method {
    name.parse().unwrap()
}

async fn malformed_json_is_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"}".to_vec(),
        b"[]".to_vec(),
        b"[1, 2, 3]".to_vec(),
        b"\"str\"".to_vec(),
        b"42".to_vec(),
        b"null".to_vec(),
        b"true".to_vec(),
        b"".to_vec(),
        b"   ".to_vec(),
        b"{\"username\":".to_vec(),
        b"{\"username\": \"alice\",}".to_vec(),
        b"{'username': 'alice'}".to_vec(),
        b"{\"username\": NaN}".to_vec(),
        b"{\"username\": \"alice\"} trailing".to_vec(),
        b"{\"to\": \"\\ud800\", \"body\": \"\\u0000\"}".to_vec(),
        noise(512),
        // Invalid UTF-8 inside a string and outside one.
        b"{\"username\": \"al\xffice\", \"password\": \"x\"}".to_vec(),
        b"\xc3\x28\xa0\xa1".to_vec(),
        b"\xef\xbb\xbf{}".to_vec(),
    ];
    for (verb, path, authed) in JSON_ENDPOINTS {
        let token = authed.then_some(alice.access.as_str());
        for body in &bodies {
            let reply = server
                .raw(method(verb), path, token, "application/json", body.clone())
                .await;
            let what = format!("{verb} {path} {:?}", String::from_utf8_lossy(body));
            assert_clean_error(&reply, &[400, 422], "invalid", &what);
        }
        assert_alive(&server, &alice).await;
    }
    // Nothing above created an account or changed one.
    server
        .post(
            "/v1/login",
            None,
            json!({ "username": "alice", "password": PASSWORD }),
        )
        .await
        .expect(200);
    assert!(server.inbox(&alice).await.is_empty());
}

async fn wrong_content_types_are_refused(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let valid = |path: &str| -> Value {
        match path {
            "/v1/register" => {
                json!({ "username": "carol", "password": PASSWORD, "public_key": public_key() })
            }
            "/v1/login" => json!({ "username": "alice", "password": PASSWORD }),
            "/v1/token/refresh" => json!({ "refresh_token": alice.refresh }),
            "/v1/messages" => json!({ "to": bob.id, "body": b64(b"hello") }),
            "/v1/messages/ack" => json!({ "ids": [] }),
            "/v1/update-key" => json!({ "public_key": public_key() }),
            other => unreachable!("{other}"),
        }
    };
    for (verb, path, authed) in JSON_ENDPOINTS {
        let token = authed.then_some(alice.access.as_str());
        let body = valid(path).to_string();
        for content_type in [
            "text/plain",
            "text/json",
            "application/xml",
            "application/jsonx",
            "multipart/form-data; boundary=x",
            "application/octet-stream",
            "",
            "\u{1}garbage",
        ] {
            // A header value reqwest refuses to send is no test.
            if reqwest::header::HeaderValue::from_str(content_type).is_err() {
                continue;
            }
            let reply = server
                .raw(method(verb), path, token, content_type, body.clone())
                .await;
            assert_clean_error(
                &reply,
                &[415],
                "invalid",
                &format!("{verb} {path} as {content_type:?}"),
            );
        }
        // No Content-Type at all.
        let mut request = server.http.request(method(verb), server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let reply = server.call(request.body(body.clone())).await;
        assert_clean_error(&reply, &[415], "invalid", &format!("{verb} {path} untyped"));
        assert_alive(&server, &alice).await;
    }
    // The form is accepted on login only.
    let form = server
        .call(server.http.post(server.url("/v1/register")).form(&[
            ("username", "carol"),
            ("password", PASSWORD),
            ("public_key", &public_key()),
        ]))
        .await;
    assert_clean_error(&form, &[415], "invalid", "register as a form");

    // None of the refused requests took effect: carol does not exist, bob
    // got nothing, and alice's refresh token is unspent.
    server
        .get("/v1/users/carol", Some(&alice.access))
        .await
        .expect_error(404, "not_found");
    assert!(server.inbox(&bob).await.is_empty());
    server.refresh(&alice.refresh).await.expect(200);
    // A JSON media type with parameters is still JSON.
    let reply = server
        .raw(
            Method::POST,
            "/v1/messages",
            Some(&alice.access),
            "application/json; charset=utf-8",
            valid("/v1/messages").to_string(),
        )
        .await;
    reply.expect(201);
}

/// Sends one HTTP/1.1 request over a plain socket, writing the body while
/// reading the reply. The server answers an oversized body with 413 and
/// closes without reading the rest, which an ordinary client reports as a
/// broken pipe instead of the reply; this one keeps whatever reply arrived.
async fn upload(
    server: &TestServer,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: Vec<u8>,
) -> Reply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let addr = server.base.strip_prefix("http://").unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    let upload = tokio::spawn(async move {
        // The server may stop reading at any point: that is the test.
        if writer.write_all(head.as_bytes()).await.is_ok() {
            let _ = writer.write_all(&body).await;
        }
        // Dropping the write half would half-close the connection, which
        // the server takes for an aborted request: hold it until the reply
        // is read.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            // A reset after the reply has arrived is the expected close.
            Err(e) if !raw.is_empty() => {
                eprintln!("connection ended with {e} after the reply");
                break;
            }
            Err(e) => panic!("no reply to {path}: {e}"),
        }
    }
    upload.abort();
    assert!(!raw.is_empty(), "no reply to {path}");
    Reply::parse_raw(&raw)
}

async fn oversized_bodies_are_refused(backend: Backend) {
    const FIVE_MIB: usize = 5 * 1024 * 1024;
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let big_register = json!({
        "username": "carol",
        "password": PASSWORD,
        "public_key": "A".repeat(FIVE_MIB),
    });
    let big_message = json!({ "to": bob.id, "body": b64(&vec![0u8; FIVE_MIB]) });
    // Oversized padding around a small valid request.
    let padded = format!(
        "{{\"to\": \"{}\", \"body\": \"{}\"{}}}",
        bob.id,
        b64(b"hi"),
        " ".repeat(FIVE_MIB)
    );
    let form = format!(
        "grant_type=password&username=alice&password={}",
        "x".repeat(FIVE_MIB)
    );
    let cases = [
        (
            "/v1/register",
            None,
            "application/json",
            big_register.to_string(),
        ),
        (
            "/v1/messages",
            Some(alice.access.as_str()),
            "application/json",
            big_message.to_string(),
        ),
        (
            "/v1/messages",
            Some(alice.access.as_str()),
            "application/json",
            padded,
        ),
        (
            "/v1/login",
            None,
            "application/json",
            json!({ "username": "alice", "password": "x".repeat(FIVE_MIB) }).to_string(),
        ),
        ("/v1/login", None, "application/x-www-form-urlencoded", form),
    ];
    for (path, token, content_type, body) in cases {
        let what = format!("{path} with {} bytes of {content_type}", body.len());
        assert!(body.len() > FIVE_MIB, "{what}");
        let reply = upload(&server, path, token, content_type, body.into_bytes()).await;
        assert_clean_error(&reply, &[413], "too_large", &what);
        assert_alive(&server, &alice).await;
    }

    // A body just over the request limit (the default 64 KiB message in
    // base64, plus 4 KiB) is refused the same way as one far over it.
    let just_over = json!({ "to": bob.id, "body": "A".repeat(92 * 1024) }).to_string();
    let reply = upload(
        &server,
        "/v1/messages",
        Some(&alice.access),
        "application/json",
        just_over.into_bytes(),
    )
    .await;
    assert_clean_error(&reply, &[413], "too_large", "just over the request limit");

    // Nothing got through.
    assert!(server.inbox(&bob).await.is_empty());
    server
        .get("/v1/users/carol", Some(&alice.access))
        .await
        .expect_error(404, "not_found");
    server.login("alice").await;
}

/// Usernames that a careless query would treat as SQL or as a pattern.
const HOSTILE_NAMES: [&str; 20] = [
    "' OR '1'='1",
    "' OR 1=1 --",
    "alice'--",
    "alice' --",
    "alice'#",
    "alice\"--",
    "admin'/*",
    "\"; DROP TABLE users; --",
    "'; DELETE FROM users; --",
    "alice'; UPDATE users SET username='x",
    "1; SELECT * FROM users",
    "%",
    "_",
    "%%",
    "a%",
    "%e",
    "ali_e",
    "_____",
    "\\",
    "alice\\",
];

async fn sql_metacharacters_in_login(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let before = server.get("/v1/me", Some(&alice.access)).await.expect(200);

    for name in HOSTILE_NAMES {
        for password in [PASSWORD, "' OR '1'='1", "x' OR 'x'='x"] {
            let reply = server
                .post(
                    "/v1/login",
                    None,
                    json!({ "username": name, "password": password }),
                )
                .await;
            assert_clean_error(&reply, &[401], "unauthorized", &format!("login {name:?}"));
        }
        // The OAuth2 form is decoded by another path; same answer.
        let reply = server
            .call(server.http.post(server.url("/v1/login")).form(&[
                ("grant_type", "password"),
                ("username", name),
                ("password", PASSWORD),
            ]))
            .await;
        assert_clean_error(&reply, &[401], "unauthorized", &format!("form {name:?}"));
        // Registration refuses such names outright.
        let reply = server
            .post(
                "/v1/register",
                None,
                json!({ "username": name, "password": PASSWORD, "public_key": public_key() }),
            )
            .await;
        if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && name.len() >= 3 {
            // `ali_e` and `_____` are legal names; they are new accounts,
            // not matches for alice.
            let created = reply.expect(201);
            assert_ne!(created["id"], alice.id.to_string());
        } else {
            assert_clean_error(&reply, &[422], "invalid", &format!("register {name:?}"));
            assert_eq!(reply.body["error"]["field"], "username");
        }
    }
    assert_alive(&server, &alice).await;

    // The users table is intact: alice logs in, keeps her id and key.
    let tokens = server.login("alice").await;
    let me = server
        .get("/v1/me", tokens["access_token"].as_str())
        .await
        .expect(200);
    assert_eq!(me, before);
    let bob = server.account("bob").await;
    let entry = server
        .get("/v1/users/alice", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(entry["id"], alice.id.to_string());
}

async fn sql_metacharacters_in_directory_lookup(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    for name in HOSTILE_NAMES {
        let path = format!("/v1/users/{}", encode(name));
        let reply = server.get(&path, Some(&bob.access)).await;
        assert_clean_error(&reply, &[404], "not_found", &path);
        let reply = server.get(&path, None).await;
        assert_clean_error(&reply, &[401], "unauthorized", &path);
    }
    // Raw (not percent-encoded) metacharacters that survive in a URL path.
    for raw in [
        "'%20OR%20'1'='1",
        "alice'--",
        "alice;",
        "*",
        "alice%27",
        "%25",
        "%5F%5F%5F%5F%5F",
        "%2e%2e",
    ] {
        let path = format!("/v1/users/{raw}");
        let reply = server.get(&path, Some(&bob.access)).await;
        assert_clean_error(&reply, &[404], "not_found", &path);
    }
    assert_alive(&server, &alice).await;

    // Still exactly alice behind her name, and she still logs in.
    let entry = server
        .get("/v1/users/alice", Some(&bob.access))
        .await
        .expect(200);
    assert_eq!(entry["id"], alice.id.to_string());
    server.login("alice").await;
}

async fn like_wildcards_match_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    // `%` and `_` are LIKE wildcards; none of these may find alice.
    for pattern in [
        "%", "%%", "a%", "%e", "%lic%", "_", "ali_e", "_lice", "alic_", "_____", "a___e",
    ] {
        let path = format!("/v1/users/{}", encode(pattern));
        let reply = server.get(&path, Some(&alice.access)).await;
        assert_clean_error(&reply, &[404], "not_found", pattern);
        let reply = server
            .post(
                "/v1/login",
                None,
                json!({ "username": pattern, "password": PASSWORD }),
            )
            .await;
        assert_clean_error(&reply, &[401], "unauthorized", pattern);
    }
    // A user whose name contains `_` is found by that exact name only.
    let under = server.account("a_b").await;
    let entry = server
        .get("/v1/users/A_B", Some(&alice.access))
        .await
        .expect(200);
    assert_eq!(entry["id"], under.id.to_string());
    for near in ["axb", "a%b", "a__b", "ab"] {
        let reply = server
            .get(&format!("/v1/users/{}", encode(near)), Some(&alice.access))
            .await;
        assert_clean_error(&reply, &[404], "not_found", near);
    }
    assert_alive(&server, &alice).await;
}

async fn deeply_nested_json_is_refused(backend: Backend) {
    // Far past the nesting cap (32) and serde_json's own limit (128), and
    // under the 16 KiB a route other than a send takes: deeper is refused
    // 413 on its size before any parsing.
    const DEPTH: usize = 2_500;
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;

    let open_arrays = "[".repeat(DEPTH);
    let balanced_arrays = format!("{}{}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let nested_objects = format!("{}1{}", "{\"a\":".repeat(DEPTH), "}".repeat(DEPTH));
    let in_a_field = format!(
        "{{\"username\": {}{}, \"password\": \"x\"}}",
        "[".repeat(DEPTH),
        "]".repeat(DEPTH)
    );
    let in_ids = format!("{{\"ids\": {}{}}}", "[".repeat(DEPTH), "]".repeat(DEPTH));
    let in_unknown_field = format!(
        "{{\"extra\": {}{}, \"ids\": []}}",
        "{\"a\":".repeat(DEPTH),
        "}".repeat(DEPTH)
    );
    for (verb, path, authed) in JSON_ENDPOINTS {
        let token = authed.then_some(alice.access.as_str());
        for (what, body) in [
            ("open arrays", &open_arrays),
            ("balanced arrays", &balanced_arrays),
            ("nested objects", &nested_objects),
            ("nested in a field", &in_a_field),
            ("nested in ids", &in_ids),
        ] {
            let reply = server
                .raw(method(verb), path, token, "application/json", body.clone())
                .await;
            assert_clean_error(
                &reply,
                &[400, 422],
                "invalid",
                &format!("{verb} {path} {what}"),
            );
        }
        assert_alive(&server, &alice).await;
    }
    // Deep nesting hidden in a field the endpoint ignores is still refused.
    let reply = server
        .raw(
            Method::POST,
            "/v1/messages/ack",
            Some(&alice.access),
            "application/json",
            in_unknown_field,
        )
        .await;
    assert_clean_error(&reply, &[400], "invalid", "nested in an unknown field");
    assert_alive(&server, &alice).await;
}

/// An ack nested `depth` levels deep (at least 2): the object, and
/// `depth - 1` arrays in a field the endpoint ignores.
fn ack_nested(depth: usize) -> String {
    let arrays = depth - 1;
    format!(
        r#"{{"ids": [], "x": {}{}}}"#,
        "[".repeat(arrays),
        "]".repeat(arrays)
    )
}

async fn json_depth_cap_is_enforced_at_its_limit(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-json-depth", "4"]).await;
    let alice = server.account("alice").await;

    // REST: exactly at the cap is parsed and served; one deeper is 400.
    let ack = |body: String| {
        server.raw(
            Method::POST,
            "/v1/messages/ack",
            Some(&alice.access),
            "application/json",
            body,
        )
    };
    let reply = ack(ack_nested(4)).await;
    assert_eq!(reply.expect(200), json!({ "acked": 0 }));
    let reply = ack(ack_nested(5)).await;
    assert_clean_error(&reply, &[400], "invalid", "one level over the cap");
    let message = reply.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("nested more than 4 levels"), "{message}");
    assert!(
        reply.body["error"].get("field").is_none(),
        "{:?}",
        reply.body
    );
    // Brackets inside strings are not nesting.
    let reply = ack(r#"{"ids": [], "x": "[[[[[[[[{{{{{{"}"#.to_owned()).await;
    reply.expect(200);

    // WebSocket: one frame over the cap gets an error frame and the socket
    // stays; a frame at the cap is served on the same socket.
    let (mut ws, _) = WsClient::ready(&server, &alice).await;
    let mut deep: Value = serde_json::from_str(&ack_nested(5)).unwrap();
    deep["ref"] = json!("deep");
    ws.send_json(deep).await;
    let error = ws.expect("error").await;
    assert_eq!(error["code"], "invalid", "{error}");
    assert!(error.get("field").is_none(), "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("4 levels"),
        "{error}"
    );
    let mut at_cap: Value = serde_json::from_str(&ack_nested(4)).unwrap();
    at_cap["type"] = json!("auth");
    at_cap["token"] = json!(alice.access);
    at_cap["ref"] = json!("at-cap");
    ws.send_json(at_cap).await;
    let authed = ws.expect("authed").await;
    assert_eq!(authed["ref"], "at-cap");
    // Each deep frame is a strike: with the first, ten more close the
    // socket (more than 10 within 10 seconds).
    for _ in 0..10 {
        ws.send_raw(tokio_tungstenite::tungstenite::Message::Text(
            ack_nested(5).into(),
        ))
        .await;
    }
    ws.until_close(close::TOO_MANY_MALFORMED).await;
    assert_alive(&server, &alice).await;
}

async fn unknown_routes_and_wrong_methods(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;

    for path in [
        "/",
        "/nope",
        "/v1",
        "/v1/",
        "/v2/messages",
        "/v1/messages/",
        "/v1/users",
        "/v1/users/",
        "/v1/messages/ack/extra",
        "/v1/public-key",
        "/.env",
        "/v1/../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/v1/users/alice/extra",
    ] {
        for token in [None, Some(alice.access.as_str())] {
            let reply = server.get(path, token).await;
            assert_clean_error(&reply, &[404], "not_found", path);
        }
    }
    let reply = server
        .raw(Method::POST, "/v1/nope", None, "application/json", "{}")
        .await;
    assert_clean_error(&reply, &[404], "not_found", "POST /v1/nope");

    for (verb, path) in [
        ("PUT", "/v1/me"),
        ("POST", "/v1/me"),
        ("GET", "/v1/register"),
        ("GET", "/v1/login"),
        ("PATCH", "/v1/messages"),
        ("DELETE", "/v1/messages"),
        ("GET", "/v1/messages/ack"),
        ("GET", "/v1/update-key"),
        ("POST", "/v1/update-key"),
        ("DELETE", "/v1/users/alice"),
        ("POST", "/healthz"),
    ] {
        for token in [None, Some(alice.access.as_str())] {
            let mut request = server.http.request(method(verb), server.url(path));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let reply = server.call(request).await;
            assert_clean_error(&reply, &[405], "invalid", &format!("{verb} {path}"));
        }
    }
    // DELETE /v1/me without the password is refused and the account
    // survives it.
    for body in [
        None,
        Some(json!({})),
        Some(json!({ "password": "wrong password" })),
    ] {
        let mut request = server
            .http
            .delete(server.url("/v1/me"))
            .bearer_auth(&alice.access);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let reply = server.call(request).await;
        assert!(
            matches!(reply.status.as_u16(), 403 | 415 | 422),
            "DELETE /v1/me with {body:?}: {reply:?}"
        );
    }
    assert_alive(&server, &alice).await;
    server.login("alice").await;
}

async fn hostile_headers_and_queries(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;

    // Malformed or oversized credentials: 401, never 500. (Heads over the
    // server's 32 KiB head limit are refused before routing, with 431:
    // edges.rs.)
    let huge = "A".repeat(16 * 1024);
    let part = "A".repeat(8 * 1024);
    for value in [
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
        "Bearer  ".to_owned(),
        "bearer x.y.z".to_owned(),
        format!("Bearer {huge}"),
        format!("Bearer {part}.{part}.{part}"),
        "Bearer ' OR '1'='1".to_owned(),
        format!("Bearer {}", alice.access.replace('.', "..")),
        format!("Token {}", alice.access),
    ] {
        let reply = server
            .call(
                server
                    .http
                    .get(server.url("/v1/me"))
                    .header("authorization", value.as_str()),
            )
            .await;
        assert_clean_error(
            &reply,
            &[401],
            "unauthorized",
            &value[..value.len().min(40)],
        );
    }
    // A header value that is not UTF-8.
    let reply = server
        .call(server.http.get(server.url("/v1/me")).header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        ))
        .await;
    assert_clean_error(&reply, &[401], "unauthorized", "non-UTF-8 authorization");
    assert_alive(&server, &alice).await;

    // Hostile query strings on the queue.
    for query in [
        "limit=1&limit=2",
        "limit=%27%20OR%201%3D1",
        "after=%27%3B%20DROP%20TABLE%20messages%3B--",
        "limit=99999999999999999999",
        "after=1&after=2",
        "limit=%00",
    ] {
        let reply = server
            .get(&format!("/v1/messages?{query}"), Some(&alice.access))
            .await;
        assert_clean_error(&reply, &[400, 422], "invalid", query);
    }
    // Unknown parameters, however odd, are ignored.
    let bob = server.account("bob").await;
    server.send(&bob, alice.id, b"hello").await;
    for query in [
        "foo=bar&limit=5",
        "limit[]=1",
        "after[]=x&after[]=y",
        "%ff=%ff",
        "&&&=&",
    ] {
        let page = server
            .get(&format!("/v1/messages?{query}"), Some(&alice.access))
            .await
            .expect(200);
        assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{query}");
    }
    assert_alive(&server, &alice).await;
}

/// Usernames are ASCII, so nothing else may match one: not a NUL byte (which
/// PostgreSQL refuses) and not a character whose case folding lands in ASCII,
/// such as the Kelvin sign 'K' (U+212A), which PostgreSQL's `lower()` folds
/// to 'k'.
async fn non_ascii_and_nul_usernames_match_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let kevin = server.account("kevin").await;
    for name in ["kev\u{0}in", "\u{212A}evin", "kevın", "ｋevin"] {
        let path = format!("/v1/users/{}", encode(name));
        let reply = server.get(&path, Some(&kevin.access)).await;
        assert_clean_error(&reply, &[404], "not_found", &path);

        let reply = server
            .post(
                "/v1/login",
                None,
                json!({ "username": name, "password": crate::common::PASSWORD }),
            )
            .await;
        assert_clean_error(&reply, &[401], "unauthorized", name);
        let form = server
            .call(server.http.post(server.url("/v1/login")).form(&[
                ("grant_type", "password"),
                ("username", name),
                ("password", crate::common::PASSWORD),
            ]))
            .await;
        assert_clean_error(&form, &[401], "unauthorized", name);

        let reply = server
            .post("/v1/register", None, json!({ "username": name, "password": crate::common::PASSWORD, "public_key": crate::common::public_key() }))
            .await;
        assert_clean_error(&reply, &[422], "invalid", name);
    }
    assert_alive(&server, &kevin).await;
}
