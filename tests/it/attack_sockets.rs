//! Issue 24, items 1 and 2 (WebSocket part): the unauthenticated-socket
//! slots, header tokens, the auth timeout, unfinished fragmented messages,
//! close codes, and token expiry agreed by REST and sockets.
//!
//! Distinct client addresses on loopback come from `X-Forwarded-For` behind
//! a trusted proxy (`--trusted-proxies 127.0.0.1`), as in `security.rs`.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::backend_tests;
use crate::common::ws::{Close, Event, WsClient, close};
use crate::common::{Api, Backend, TestServer, b64, eventually, token_expiring_at};

backend_tests!(
    one_address_cannot_hold_every_waiting_slot,
    a_valid_header_token_needs_no_waiting_slot,
    a_refused_socket_frees_its_slot_before_the_close_handshake,
    a_silent_socket_is_closed_within_the_default_auth_timeout,
    rest_refuses_a_token_once_the_socket_has_closed_on_it,
    protocol_violations_close_with_1002_and_bad_utf8_with_1007,
    an_unfinished_message_is_closed_at_the_message_timeout,
    a_frame_that_trickles_in_is_closed_at_the_message_timeout,
);

/// The default share of waiting slots per address
/// (`SEALPOST_MAX_UNAUTHENTICATED_SOCKETS_PER_IP`), which the harness turns
/// off and these tests set back.
const DEFAULT_SHARE: usize = 16;
const SHARE_FLAG: &str = "--max-unauthenticated-sockets-per-ip";

/// The server's time for a close handshake (`CLOSE_TIMEOUT` in
/// `ws/connection.rs`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

const ATTACKER: &str = "198.51.100.7";

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/v1/ws` as the client `from` (an `X-Forwarded-For` value), with
/// `token` in the `Authorization` header when given; the HTTP status if the
/// upgrade is refused.
async fn connect_from(api: &Api, from: &str, token: Option<&str>) -> Result<Socket, u16> {
    let url = format!("{}/v1/ws", api.base.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("x-forwarded-for", from.parse().unwrap());
    if let Some(token) = token {
        headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(WsError::Http(response)) => Err(response.status().as_u16()),
        Err(err) => panic!("upgrade failed: {err}"),
    }
}

/// The next JSON frame, skipping pings and pongs.
async fn json(socket: &mut Socket) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(15), socket.next())
            .await
            .expect("a frame within 15 s");
        match frame {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }
}

/// Reads `ready` (authenticating by frame first with `frame_token`), then
/// the (empty) backlog up to `drained`.
async fn expect_ready(socket: &mut Socket, frame_token: Option<&str>) {
    if let Some(token) = frame_token {
        let auth = json!({ "type": "auth", "token": token }).to_string();
        socket.send(Message::Text(auth.into())).await.unwrap();
    }
    let ready = json(socket).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    let drained = json(socket).await;
    assert_eq!(drained["type"], "drained", "{drained}");
}

/// Asserts that the server has not closed `socket`, which has not
/// authenticated (so no message can be its sentinel): a ping sent now is
/// answered with its pong, which comes after any close the server sent
/// before it.
async fn assert_open(socket: &mut Socket) {
    socket
        .send(Message::Ping(b"still open?".to_vec().into()))
        .await
        .expect("ping");
    let next = tokio::time::timeout(Duration::from_secs(15), socket.next())
        .await
        .expect("an answer to the ping within 15 s");
    match next {
        Some(Ok(Message::Pong(payload))) if payload == b"still open?".as_slice() => {}
        other => panic!("expected the pong of an open socket, got {other:?}"),
    }
}

/// The close the server ends `socket` with within `wait` (as an
/// [`Event::Closed`]), skipping other frames; `None` if it did not close in
/// time.
async fn close_within(socket: &mut Socket, wait: Duration) -> Option<Event> {
    let deadline = Instant::now() + wait;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next())
            .await
            .ok()?;
        match next {
            Some(Ok(Message::Close(frame))) => {
                return Some(frame.map_or(Event::Closed(1005, String::new()), |f| {
                    Event::Closed(f.code.into(), f.reason.to_string())
                }));
            }
            Some(Ok(_)) => continue,
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    }
}

/// Writes `bytes` to the socket's TCP stream as they are: frames the client
/// library would refuse to make.
async fn write_raw(socket: &mut Socket, bytes: &[u8]) {
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = socket.get_mut() else {
        panic!("plain TCP expected");
    };
    tcp.write_all(bytes).await.unwrap();
    tcp.flush().await.unwrap();
}

/// A client frame: `first` is the byte of FIN, RSV and opcode; the payload
/// is masked (with a zero mask, so it reads as given) unless `masked` is
/// false.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut bytes = vec![first, payload.len() as u8 | if masked { 0x80 } else { 0 }];
    if masked {
        bytes.extend([0; 4]);
    }
    bytes.extend(payload);
    bytes
}

const FIN: u8 = 0x80;
const TEXT: u8 = 0x1;
const PONG: u8 = 0xA;

// ---------------------------------------------------------------------------
// Item 1: waiting slots

/// One address opens sockets and never authenticates them, as many as the
/// server lets it; others, with a header token or an `auth` frame, still
/// get in.
async fn one_address_cannot_hold_every_waiting_slot(backend: Backend) {
    // The server-wide pool smaller than its default of 1,000 only to keep
    // the test light: one address could fill either. The share per address
    // is at its default (which the harness turns off). 30 s to authenticate: the attacker's sockets are
    // held for the whole test, as one that reopens them would.
    let server = TestServer::start_with(
        backend,
        &[
            "--trusted-proxies",
            "127.0.0.1",
            "--max-unauthenticated-sockets",
            "64",
            SHARE_FLAG,
            "16",
            "--ws-auth-timeout",
            "30s",
        ],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let mut held = Vec::new();
    let refused = loop {
        match connect_from(&server, ATTACKER, None).await {
            Ok(socket) => held.push(socket),
            Err(status) => break status,
        }
        assert!(held.len() <= 64, "the server-wide cap did not hold");
    };
    assert_eq!(refused, 429);
    assert_eq!(held.len(), DEFAULT_SHARE, "the attacker's share");

    // A valid header token from another address: ready.
    let mut header = connect_from(&server, "203.0.113.5", Some(&alice.access))
        .await
        .expect("a socket with a valid header token is let in");
    expect_ready(&mut header, None).await;
    // An `auth` frame from another address: a slot of its own, then ready.
    let mut framed = connect_from(&server, "203.0.113.6", None)
        .await
        .expect("a socket from another address gets a waiting slot");
    expect_ready(&mut framed, Some(&bob.access)).await;
    // The attacker's own address can still come in with a valid token.
    let mut own = connect_from(&server, ATTACKER, Some(&bob.access))
        .await
        .expect("a valid header token needs no waiting slot");
    expect_ready(&mut own, None).await;

    // Its sockets were held throughout, not closed to make room.
    for socket in &mut held {
        assert_open(socket).await;
    }
    drop(held);
    server.stop().await;
}

/// Attackers on several addresses fill the whole pool (what a botnet can
/// still do): sockets that authenticate by frame must wait for a slot, but
/// one with a valid header token never needs one.
async fn a_valid_header_token_needs_no_waiting_slot(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--trusted-proxies",
            "127.0.0.1",
            "--max-unauthenticated-sockets",
            "32",
            SHARE_FLAG,
            "16",
            "--ws-auth-timeout",
            "30s",
        ],
    )
    .await;
    let alice = server.account("alice").await;

    let mut held = Vec::new();
    for attacker in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        while let Ok(socket) = connect_from(&server, attacker, None).await {
            held.push(socket);
            assert!(held.len() <= 32, "the server-wide cap did not hold");
        }
    }
    assert_eq!(held.len(), 32, "the pool is full");
    assert_eq!(
        connect_from(&server, "203.0.113.5", None).await.err(),
        Some(429)
    );

    let mut header = connect_from(&server, "203.0.113.5", Some(&alice.access))
        .await
        .expect("a socket with a valid header token is let in");
    expect_ready(&mut header, None).await;

    // A bad header token still waits, so it is refused while the pool is
    // full; given a slot it is closed with 4401 on the socket.
    assert_eq!(
        connect_from(&server, "203.0.113.5", Some("not.a.jwt"))
            .await
            .err(),
        Some(429)
    );
    drop(held.pop());
    let mut bad = eventually("a slot freed by a closed socket", async || {
        connect_from(&server, "203.0.113.5", Some("not.a.jwt"))
            .await
            .ok()
    })
    .await;
    close_within(&mut bad, Duration::from_secs(10))
        .await
        .expect("closed")
        .assert_close(close::REFUSED);
    drop(held);
    server.stop().await;
}

/// A socket that never authenticates and never answers the close frame
/// gives its slot back at the auth timeout, not after the close handshake
/// has timed out too.
async fn a_refused_socket_frees_its_slot_before_the_close_handshake(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--max-unauthenticated-sockets",
            "1",
            "--ws-auth-timeout",
            "1s",
        ],
    )
    .await;
    // Upgraded, and then never read from: the server's close frame is
    // never answered.
    let opened = Instant::now();
    let silent = connect_from(&server, "127.0.0.1", None).await.unwrap();
    assert_eq!(
        connect_from(&server, "127.0.0.1", None).await.err(),
        Some(429)
    );

    let next = eventually("the slot freed", async || {
        connect_from(&server, "127.0.0.1", None).await.ok()
    })
    .await;
    let waited = opened.elapsed();
    assert!(
        waited < Duration::from_secs(1) + CLOSE_TIMEOUT - Duration::from_millis(500),
        "the slot was held {waited:?}: through the close handshake"
    );
    drop((silent, next));
    server.stop().await;
}

/// The default auth timeout is short: a socket that says nothing is closed
/// within it (5 s), where it was 10 s.
async fn a_silent_socket_is_closed_within_the_default_auth_timeout(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut ws = WsClient::connect(&server, None).await;
    match ws.event_within(Duration::from_secs(8)).await {
        Some(closed @ Event::Closed(..)) => closed.assert_close(close::REFUSED),
        other => panic!("expected a 4401 close within 8 s, got {other:?}"),
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Token expiry, REST and sockets

/// A socket closes at its token's `exp`; from then on REST refuses the same
/// token (it took it for up to a second more).
async fn rest_refuses_a_token_once_the_socket_has_closed_on_it(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = server.account("bob").await;
    // A token of bob's session that expires in 1-2 s.
    let exp = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() + 2, 0).unwrap();
    let token = token_expiring_at(&bob, exp);
    let mut ws = WsClient::connect(&server, Some(&token)).await;
    ws.expect("ready").await;
    assert!(ws.until_drained().await.is_empty());
    server.get("/v1/me", Some(&token)).await.expect(200);
    match ws.event_within(Duration::from_secs(10)).await {
        Some(closed @ Event::Closed(..)) => closed.assert_close(close::EXPIRED),
        other => panic!("expected a 4401 close at expiry, got {other:?}"),
    }
    server
        .get("/v1/me", Some(&token))
        .await
        .expect_error(401, "unauthorized");
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Close codes

/// Frames that break RFC 6455 close with 1002, a text message that is not
/// UTF-8 with 1007; not with 1001 (going away), which blames the server.
async fn protocol_violations_close_with_1002_and_bad_utf8_with_1007(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let cases: [(&str, Vec<u8>, Close); 5] = [
        (
            "a reserved data opcode",
            frame(FIN | 0x3, b"hi", true),
            close::PROTOCOL,
        ),
        (
            "a reserved control opcode",
            frame(FIN | 0xB, b"", true),
            close::PROTOCOL,
        ),
        (
            "an unmasked client frame",
            frame(FIN | TEXT, b"{}", false),
            close::PROTOCOL,
        ),
        (
            "a continuation of nothing",
            frame(FIN, b"{}", true),
            close::PROTOCOL,
        ),
        (
            "text that is not UTF-8",
            frame(FIN | TEXT, b"\"\xff\xfe\"", true),
            close::NOT_UTF8,
        ),
    ];
    for (what, bytes, want) in cases {
        let mut socket = connect_from(&server, "127.0.0.1", Some(&alice.access))
            .await
            .unwrap();
        expect_ready(&mut socket, None).await;
        write_raw(&mut socket, &bytes).await;
        match close_within(&mut socket, Duration::from_secs(10)).await {
            Some(closed) if closed.is(want) => {}
            other => panic!("{what}: expected {want:?}, got {other:?}"),
        }
    }
    // Before authentication too.
    let mut socket = connect_from(&server, "127.0.0.1", None).await.unwrap();
    write_raw(&mut socket, &frame(FIN | 0x3, b"hi", true)).await;
    close_within(&mut socket, Duration::from_secs(10))
        .await
        .expect("closed")
        .assert_close(close::PROTOCOL);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Item 2: unfinished messages

/// A message begun in a fragment (FIN = 0) and never finished is closed on
/// at the message timeout, though pongs keep coming; one finished in time
/// is accepted.
async fn an_unfinished_message_is_closed_at_the_message_timeout(backend: Backend) {
    let server = TestServer::start_with(backend, &["--ws-message-timeout", "1s"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    // Fragmented and finished in time: sent.
    let mut socket = connect_from(&server, "127.0.0.1", Some(&alice.access))
        .await
        .unwrap();
    expect_ready(&mut socket, None).await;
    let send =
        json!({ "type": "send", "ref": "r1", "to": bob.id, "body": b64(b"in two") }).to_string();
    let (head, tail) = send.as_bytes().split_at(send.len() / 2);
    write_raw(&mut socket, &frame(TEXT, head, true)).await;
    write_raw(&mut socket, &frame(FIN | PONG, b"", true)).await;
    write_raw(&mut socket, &frame(FIN, tail, true)).await;
    let sent = json(&mut socket).await;
    assert_eq!(
        (&sent["type"], &sent["ref"]),
        (&json!("sent"), &json!("r1")),
        "{sent}"
    );

    // Begun and never finished, with a pong every 200 ms: closed with 1008
    // at the timeout (1 s), well before anything else would close it.
    write_raw(&mut socket, &frame(TEXT, b"{\"type\":\"send\",", true)).await;
    let begun = Instant::now();
    let closed = loop {
        write_raw(&mut socket, &frame(FIN | PONG, b"", true)).await;
        if let Some(closed) = close_within(&mut socket, Duration::from_millis(200)).await {
            break closed;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "the unfinished message was held for 10 s"
        );
    };
    closed.assert_close(close::UNFINISHED);
    assert!(
        begun.elapsed() >= Duration::from_millis(900),
        "closed before the timeout"
    );
    server.stop().await;
}

/// One frame whose header announced 64 KiB, its payload arriving a byte at
/// a time: closed at the message timeout too.
async fn a_frame_that_trickles_in_is_closed_at_the_message_timeout(backend: Backend) {
    let server = TestServer::start_with(backend, &["--ws-message-timeout", "1s"]).await;
    let alice = server.account("alice").await;
    let mut socket = connect_from(&server, "127.0.0.1", Some(&alice.access))
        .await
        .unwrap();
    expect_ready(&mut socket, None).await;
    // FIN | text, masked, 64-bit length 65,536, zero mask.
    let mut header = vec![FIN | TEXT, 0x80 | 127];
    header.extend(65_536u64.to_be_bytes());
    header.extend([0; 4]);
    write_raw(&mut socket, &header).await;
    let begun = Instant::now();
    let closed = loop {
        write_raw(&mut socket, b" ").await;
        if let Some(closed) = close_within(&mut socket, Duration::from_millis(200)).await {
            break closed;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "the trickling frame was held for 10 s"
        );
    };
    closed.assert_close(close::UNFINISHED);
    server.stop().await;
}
