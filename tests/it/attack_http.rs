//! Issue 24, items 2 and 13: slow and oversized request bodies, per-route
//! body limits, HTTP connections per address, and client request ids.

use std::net::SocketAddr;

use reqwest::header::HeaderValue;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{Backend, PASSWORD, Reply, SETTLE, TestServer, assert_alive, b64, eventually};

backend_tests!(
    bodies_that_stop_short_are_answered_408_and_closed_at_the_deadline,
    an_oversized_declared_body_is_refused_before_it_is_sent,
    routes_other_than_a_send_take_a_few_kib,
    http_connections_per_address_are_capped,
    upgraded_sockets_stop_counting_as_http_connections,
    a_direct_clients_request_id_is_replaced,
    only_a_trusted_proxys_plain_request_id_is_kept,
);

/// A `POST` head announcing a JSON body of `length` bytes.
fn post_head(path: &str, token: Option<&str>, length: usize) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    format!(
        "POST {path} HTTP/1.1\r\nHost: sealpost\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {length}\r\n\r\n"
    )
}

/// Reads what the server sends until it closes, for at most [`SETTLE`]:
/// `None` if it neither answered nor closed by then.
async fn answer_and_close(tcp: &mut TcpStream) -> Option<Vec<u8>> {
    let mut raw = Vec::new();
    match tokio::time::timeout(SETTLE, tcp.read_to_end(&mut raw)).await {
        Ok(Ok(_)) => Some(raw),
        // A reset after the answer: the answer is what counts.
        Ok(Err(_)) if !raw.is_empty() => Some(raw),
        Ok(Err(e)) => panic!("no answer: {e}"),
        Err(_) => None,
    }
}

/// The attack: many connections each send a head and all of their body but
/// a few bytes, then wait. Each held its buffered part forever (300 held
/// 267 MB); now each is answered 408 and closed once the body deadline
/// passes, on a route that needs no account and on a send alike.
async fn bodies_that_stop_short_are_answered_408_and_closed_at_the_deadline(backend: Backend) {
    let server = TestServer::start_with(backend, &["--body-read-timeout", "1s"]).await;
    let alice = server.account("alice").await;
    let login = serde_json::to_vec(&json!({ "username": "alice", "password": PASSWORD })).unwrap();
    let send = serde_json::to_vec(&json!({ "to": alice.id, "body": b64(&[7u8; 40_000]) })).unwrap();
    let cases = [
        ("/v1/login", None, &login),
        ("/v1/register", None, &login),
        ("/v1/messages", Some(alice.access.as_str()), &send),
    ];
    let mut stalled = Vec::new();
    for _ in 0..10 {
        for (path, token, body) in &cases {
            let mut tcp = TcpStream::connect(server.addr).await.unwrap();
            tcp.write_all(post_head(path, *token, body.len()).as_bytes())
                .await
                .unwrap();
            tcp.write_all(&body[..body.len() - 3]).await.unwrap();
            stalled.push((*path, tcp));
        }
    }
    assert_eq!(stalled.len(), 30);
    for (path, tcp) in &mut stalled {
        let raw = answer_and_close(tcp)
            .await
            .unwrap_or_else(|| panic!("{path}: a body short of its length is held open"));
        Reply::parse_raw(&raw).expect_error(408, "request_timeout");
    }
    assert_alive(&server, &alice).await;
}

/// A `Content-Length` over a route's limit is answered 413 from the head
/// alone: the client need not send, and the server never buffers, a byte of
/// the body. It used to wait for the body, and read it up to the limit.
async fn an_oversized_declared_body_is_refused_before_it_is_sent(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let cases = [
        ("/v1/login", None, 20 * 1024),
        ("/v1/register", None, 100 * 1024 * 1024),
        ("/v1/token/refresh", None, 17 * 1024),
        // Over any send's limit (1 MiB bodies, for 10 devices, in base64).
        (
            "/v1/messages",
            Some(alice.access.as_str()),
            100 * 1024 * 1024,
        ),
    ];
    for (path, token, length) in cases {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(post_head(path, token, length).as_bytes())
            .await
            .unwrap();
        let raw = answer_and_close(&mut tcp)
            .await
            .unwrap_or_else(|| panic!("{path}: no answer to a head announcing {length} bytes"));
        Reply::parse_raw(&raw).expect_error(413, "too_large");
    }
    assert_alive(&server, &alice).await;
}

/// A login or sign-up takes 16 KiB, no longer the ~878 KB a send may be:
/// 20 KiB is refused whether its length is declared or not (chunked). The
/// largest legitimate bodies still pass: a sign-up with a maximal key and
/// a 1024-character password escaped as Python writes it, an ack of a
/// whole page, and a send of a maximal message.
async fn routes_other_than_a_send_take_a_few_kib(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let padded = json!({ "username": "alice", "password": "x".repeat(20 * 1024) }).to_string();
    let reply = server
        .raw(
            reqwest::Method::POST,
            "/v1/login",
            None,
            "application/json",
            padded.clone(),
        )
        .await;
    reply.expect_error(413, "too_large");

    // The same body in chunks, with no length to check up front.
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /v1/login HTTP/1.1\r\nHost: sealpost\r\nContent-Type: application/json\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{padded}\r\n0\r\n\r\n", padded.len());
    // The server may answer and close before the last chunk is in.
    let _ = tcp.write_all(chunk.as_bytes()).await;
    let raw = answer_and_close(&mut tcp).await.expect("an answer");
    Reply::parse_raw(&raw).expect_error(413, "too_large");

    // What a client may legitimately send fits.
    let escaped = "\\ud83d\\ude00".repeat(1024);
    let key = b64(&[5u8; 2048]);
    let signup =
        format!(r#"{{"username": "escaped", "password": "{escaped}", "public_key": "{key}"}}"#);
    assert!(signup.len() > 14 * 1024, "{}", signup.len());
    server
        .raw(
            reqwest::Method::POST,
            "/v1/register",
            None,
            "application/json",
            signup,
        )
        .await
        .expect(201);
    let page: Vec<String> = (0..500).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let ack = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": page }),
        )
        .await;
    assert_eq!(ack.expect(200)["acked"], 0);
    // At the default message limit (64 KiB), some 87 KB of JSON.
    let sent = server.send(&alice, bob.id, &vec![9u8; 64 * 1024]).await;
    let inbox = server.inbox(&bob).await;
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(inbox[0]["id"], sent["id"]);
}

/// A connection from `source` (a loopback address other than 127.0.0.1:
/// another client, as far as the server can tell).
async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    socket.connect(server).await.unwrap()
}

/// A keep-alive `GET /healthz` on `tcp`: its status, or `None` if the
/// server closed without one.
async fn healthz(tcp: &mut TcpStream) -> Option<u16> {
    let request = "GET /healthz HTTP/1.1\r\nHost: sealpost\r\n\r\n";
    if tcp.write_all(request.as_bytes()).await.is_err() {
        return None;
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(SETTLE, tcp.read(&mut buf))
            .await
            .expect("the server neither answers nor closes");
        match read {
            Ok(0) | Err(_) => return None,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        // The whole answer: a head and a body of its declared length.
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let length: usize = head
                .split("content-length:")
                .nth(1)
                .and_then(|rest| rest.lines().next())
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                return head.split(' ').nth(1).and_then(|s| s.parse().ok());
            }
        }
    }
}

/// The default cap on HTTP connections from one address (set back from the
/// tests' "off").
const HTTP_CAP: usize = 64;

/// One address opens as many connections as it may and keeps them: the
/// next is closed unanswered, while another address is served, and a
/// connection given back makes room again.
async fn http_connections_per_address_are_capped(backend: Backend) {
    let cap = HTTP_CAP.to_string();
    let server = TestServer::start_with(
        backend,
        &[
            "--max-http-connections-per-ip",
            &cap,
            // Kept-alive connections stay open through the test.
            "--header-read-timeout",
            "60s",
        ],
    )
    .await;
    let mut held = Vec::new();
    for i in 0..HTTP_CAP {
        let mut tcp = connect_from("127.0.0.1", server.addr).await;
        assert_eq!(healthz(&mut tcp).await, Some(200), "connection {i}");
        held.push(tcp);
    }
    assert_eq!(held.len(), HTTP_CAP);
    let mut over = connect_from("127.0.0.1", server.addr).await;
    assert_eq!(
        healthz(&mut over).await,
        None,
        "connection {} from one address was served",
        HTTP_CAP + 1
    );
    // Another address is another client.
    let mut other = connect_from("127.0.0.2", server.addr).await;
    assert_eq!(healthz(&mut other).await, Some(200));
    // The held ones are still served, and one closed makes room.
    assert_eq!(healthz(&mut held[0]).await, Some(200));
    drop(held.pop());
    eventually("a freed slot is usable", async || {
        let mut tcp = connect_from("127.0.0.1", server.addr).await;
        (healthz(&mut tcp).await == Some(200)).then_some(())
    })
    .await;
}

/// A WebSocket is an HTTP connection until it upgrades; then only the
/// socket cap (`--max-connections-per-ip`) counts it. An address under a
/// small HTTP cap keeps more sockets open than the cap, and still gets
/// HTTP requests served beside them.
async fn upgraded_sockets_stop_counting_as_http_connections(backend: Backend) {
    let server = TestServer::start_with(backend, &["--max-http-connections-per-ip", "2"]).await;
    let alice = server.account("alice").await;
    let mut sockets = Vec::new();
    for _ in 0..5 {
        let (socket, _) = WsClient::ready(&server, &alice).await;
        sockets.push(socket);
    }
    assert_eq!(sockets.len(), 5);
    assert_alive(&server, &alice).await;
    for socket in sockets {
        socket.close().await;
    }
}

/// The `X-Request-Id` a reply carries, after sending `id` on a login.
async fn request_id_after(server: &TestServer, id: HeaderValue) -> String {
    let request = server
        .http
        .post(server.url("/v1/login"))
        .header("x-request-id", id)
        .json(&json!({ "username": "nobody", "password": PASSWORD }));
    let reply = server.call(request).await;
    reply.expect_error(401, "unauthorized");
    reply.headers["x-request-id"].to_str().unwrap().to_owned()
}

#[track_caller]
fn assert_fresh(id: &str, sent: &HeaderValue) {
    assert_ne!(id.as_bytes(), sent.as_bytes(), "the client's id was kept");
    uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("not a fresh UUID: {id}"));
}

/// A direct client's id, however plain, is not believed: it would name the
/// request in every log line, and could be 30 KB of text forging lines.
async fn a_direct_clients_request_id_is_replaced(backend: Backend) {
    let server = TestServer::start(backend).await;
    for sent in [
        HeaderValue::from_static("edge-7f3a9c"),
        HeaderValue::from_str(&format!("x\tlevel=ERROR msg={}", "A".repeat(30_000))).unwrap(),
    ] {
        let id = request_id_after(&server, sent.clone()).await;
        assert_fresh(&id, &sent);
    }
}

/// From a trusted proxy, a plain id is kept (one id follows a request
/// through both logs); one that is too long or carries anything but
/// `A-Z a-z 0-9 . _ -` is replaced.
async fn only_a_trusted_proxys_plain_request_id_is_kept(backend: Backend) {
    let server = TestServer::start_with(backend, &["--trusted-proxies", "127.0.0.1"]).await;
    for plain in [
        "edge-7f3a9c",
        "7e1767ea-0212-4ab9-8dd6-69ea0237da34",
        &"a.b_c".repeat(12),
    ] {
        let id = request_id_after(&server, HeaderValue::from_str(plain).unwrap()).await;
        assert_eq!(id, plain, "a trusted proxy's id was replaced");
    }
    for bad in [
        HeaderValue::from_str(&"a".repeat(65)).unwrap(),
        HeaderValue::from_static("two words"),
        HeaderValue::from_static("tab\there"),
        HeaderValue::from_static("level=ERROR"),
        HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        HeaderValue::from_bytes(b"rlo\xe2\x80\xaeevil").unwrap(),
    ] {
        let id = request_id_after(&server, bad.clone()).await;
        assert_fresh(&id, &bad);
    }
}
