//! A WebSocket client for tests, over tokio-tungstenite, as real clients
//! and the load tester use it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use super::{Account, Api};

/// How long a test waits for a frame before it fails.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(15);

/// A close the server sends: its code and its reason, worded as
/// `src/ws/connection.rs` words it. A test checks both, so that a socket
/// closed for another reason under the same code (an expired token where a
/// revocation was meant) fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: u16,
    pub reason: &'static str,
}

/// The closes of protocol.md's table, one for each reason the server gives.
pub mod close {
    use super::Close;

    /// A token refused when the socket authenticates (in the header or in
    /// the first frame): missing, not ours, expired or revoked.
    pub const REFUSED: Close = Close {
        code: 4401,
        reason: "missing, invalid or expired access token",
    };
    /// The socket's session was ended while it was open.
    pub const REVOKED: Close = Close {
        code: 4401,
        reason: "session has been revoked",
    };
    /// The socket's token reached its `exp` while it was open.
    pub const EXPIRED: Close = Close {
        code: 4401,
        reason: "access token expired",
    };
    pub const CONNECTED_ELSEWHERE: Close = Close {
        code: 4409,
        reason: "connected elsewhere",
    };
    pub const TOO_MANY_FOR_THE_DEVICE: Close = Close {
        code: 4429,
        reason: "too many connections for this device",
    };
    pub const SHUTTING_DOWN: Close = Close {
        code: 1001,
        reason: "server shutting down",
    };
    pub const TOO_MANY_MALFORMED: Close = Close {
        code: 1008,
        reason: "too many malformed frames",
    };
    pub const UNFINISHED: Close = Close {
        code: 1008,
        reason: "message not finished in time",
    };
    pub const TOO_BIG: Close = Close {
        code: 1009,
        reason: "frame too large",
    };
    pub const PROTOCOL: Close = Close {
        code: 1002,
        reason: "protocol violation",
    };
    pub const NOT_UTF8: Close = Close {
        code: 1007,
        reason: "text frames must be UTF-8",
    };
    pub const FELL_BEHIND: Close = Close {
        code: 1013,
        reason: "connection fell behind; reconnect to resume",
    };
    pub const SLOW_BACKLOG: Close = Close {
        code: 1013,
        reason: "too slow to read the backlog; reconnect to resume",
    };
}

/// What the server sent next.
#[derive(Debug)]
pub enum Event {
    Json(Value),
    /// A close frame: its code and reason.
    Closed(u16, String),
    /// The connection ended without a close frame.
    Ended,
}

impl Event {
    /// Whether this is the close `want`, code and reason.
    pub fn is(&self, want: Close) -> bool {
        matches!(self, Event::Closed(code, reason) if *code == want.code && reason == want.reason)
    }

    /// Asserts that this is the close `want`, code and reason.
    #[track_caller]
    pub fn assert_close(&self, want: Close) {
        assert!(
            self.is(want),
            "expected a close {} ({:?}), got {self:?}",
            want.code,
            want.reason
        );
    }
}

pub struct WsClient {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    /// Opens `/v1/ws`, with `Authorization: Bearer <token>` when given.
    pub async fn connect(api: &Api, token: Option<&str>) -> Self {
        Self::connect_query(api, "", token).await
    }

    /// Opens `/v1/ws?{query}` (`exclusive=true`; no query when empty), with
    /// `Authorization: Bearer <token>` when given.
    pub async fn connect_query(api: &Api, query: &str, token: Option<&str>) -> Self {
        let mut url = format!("{}/v1/ws", api.base.replacen("http", "ws", 1));
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let mut request = url.into_client_request().unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("WebSocket upgrade");
        Self { stream }
    }

    /// Connects with header auth and reads `ready` and the backlog up to
    /// `drained`; returns the backlog.
    pub async fn ready(api: &Api, who: &Account) -> (Self, Vec<Value>) {
        let mut client = Self::connect(api, Some(&who.access)).await;
        let ready = client.json().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        assert_eq!(ready["user_id"], who.id.to_string());
        let backlog = client.until_drained().await;
        (client, backlog)
    }

    /// As [`WsClient::ready`] on `/v1/ws?{query}`; returns the `ready`
    /// frame too.
    pub async fn ready_with(api: &Api, who: &Account, query: &str) -> (Self, Value, Vec<Value>) {
        let mut client = Self::connect_query(api, query, Some(&who.access)).await;
        let ready = client.json().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        assert_eq!(ready["user_id"], who.id.to_string());
        let backlog = client.until_drained().await;
        (client, ready, backlog)
    }

    pub async fn send_json(&mut self, value: Value) {
        self.stream
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send frame");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send frame");
    }

    /// Sends a `send` frame with `ref`.
    pub async fn send_message(&mut self, reference: &str, to: uuid::Uuid, body: &[u8]) {
        self.send_json(
            json!({ "type": "send", "ref": reference, "to": to, "body": super::b64(body) }),
        )
        .await;
    }

    pub async fn ack(&mut self, ids: &[&str]) {
        self.send_json(json!({ "type": "ack", "ids": ids })).await;
    }

    /// As [`WsClient::ack`], reporting a failed write instead of
    /// panicking: for a reader whose server may die under it.
    pub async fn try_ack(&mut self, ids: &[&str]) -> bool {
        let frame = json!({ "type": "ack", "ids": ids }).to_string();
        self.stream.send(Message::Text(frame.into())).await.is_ok()
    }

    /// The next event, skipping pings and pongs.
    pub async fn event(&mut self) -> Event {
        self.event_within(FRAME_TIMEOUT)
            .await
            .expect("a frame within the timeout")
    }

    /// The next event, or `None` if nothing came within `wait`.
    pub async fn event_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()?;
            return Some(match next {
                Some(Ok(Message::Text(text))) => {
                    Event::Json(serde_json::from_str(&text).expect("JSON frame"))
                }
                Some(Ok(Message::Close(frame))) => {
                    // Send the close reply tungstenite has queued, completing
                    // the handshake as a live client does.
                    let _ = self.stream.flush().await;
                    match frame {
                        Some(f) => Event::Closed(u16::from(f.code), f.reason.to_string()),
                        None => Event::Closed(u16::from(CloseCode::Status), String::new()),
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Binary(_))) => panic!("the server sent a binary frame"),
                Some(Err(_)) | None => Event::Ended,
            });
        }
    }

    /// The next JSON frame; panics on anything else.
    pub async fn json(&mut self) -> Value {
        match self.event().await {
            Event::Json(value) => value,
            other => panic!("expected a JSON frame, got {other:?}"),
        }
    }

    /// The next JSON frame of `kind`, panicking on any other. Notices a
    /// client written before they existed ignores (`receipt`,
    /// `devices_changed`; protocol.md tells clients to ignore unknown frame
    /// types) are skipped unless `kind` is one of them.
    pub async fn expect(&mut self, kind: &str) -> Value {
        const NOTICES: [&str; 2] = ["receipt", "devices_changed"];
        loop {
            let frame = self.json().await;
            let got = frame["type"].as_str().unwrap_or_default();
            if got != kind && NOTICES.contains(&got) && !NOTICES.contains(&kind) {
                continue;
            }
            assert_eq!(frame["type"], kind, "expected {kind}, got {frame}");
            return frame;
        }
    }

    /// The next JSON frame, which must be of `kind`: unlike
    /// [`WsClient::expect`], no notice is skipped, for tests of what a
    /// socket is told and not told.
    pub async fn expect_exactly(&mut self, kind: &str) -> Value {
        let frame = self.json().await;
        assert_eq!(frame["type"], kind, "expected {kind}, got {frame}");
        frame
    }

    /// `message` frames up to and excluding `drained`.
    pub async fn until_drained(&mut self) -> Vec<Value> {
        let mut messages = Vec::new();
        loop {
            let frame = self.json().await;
            match frame["type"].as_str() {
                Some("message") => messages.push(frame),
                Some("drained") => return messages,
                _ => panic!("unexpected frame while draining: {frame}"),
            }
        }
    }

    /// Asserts that the server ends the socket with `want`, skipping any
    /// frames before it.
    pub async fn until_close(&mut self, want: Close) {
        loop {
            match self.event().await {
                Event::Json(_) => continue,
                closed => return closed.assert_close(want),
            }
        }
    }

    /// Asserts that the server ends the socket with `want` within a few
    /// frames, and never says `ready` on the way.
    pub async fn expect_close(&mut self, want: Close) {
        for _ in 0..20 {
            match self.event().await {
                Event::Json(frame) => assert_ne!(frame["type"], "ready", "accepted: {frame}"),
                closed => return closed.assert_close(want),
            }
        }
        panic!("no close (wanted {want:?}) after 20 frames");
    }

    /// Asserts that nothing but pings arrives within `wait`. Only for a
    /// test of time itself (a timeout that must not close the socket); to
    /// show that nothing more arrives, use [`assert_next_is_sentinel`],
    /// which a late frame cannot outwait.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(event) = self.event_within(wait).await {
            panic!("expected silence, got {event:?}");
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }

    /// Drops the TCP connection without a close handshake.
    pub fn abandon(self) {
        drop(self);
    }
}

/// Ends a check that nothing more arrives on `sockets`: a sentinel
/// message, sent now to the account of `devices` (a session of each of its
/// devices), must be the very next frame on each socket. A device's
/// messages reach it in one order, so whatever the server still had for a
/// socket (a late duplicate, a stray notice) comes before the sentinel and
/// fails the check, where a quiet wait would only outwait it. Each device
/// then acknowledges the sentinel over REST, so every queue is as it was;
/// its sender is signed up here and holds no socket, so no receipt or copy
/// of it goes anywhere.
pub async fn assert_next_is_sentinel(
    api: &Api,
    devices: &[&Account],
    sockets: &mut [&mut WsClient],
) {
    assert!(!sockets.is_empty(), "no socket to check");
    let to = devices.first().expect("the recipient's devices").id;
    assert!(devices.iter().all(|d| d.id == to), "devices of one account");
    let sender = api
        .account(&format!(
            "sentinel_{}",
            &Uuid::new_v4().simple().to_string()[..12]
        ))
        .await;
    let body = format!("sentinel {}", Uuid::new_v4());
    let sentinel = api.send(&sender, to, body.as_bytes()).await["id"].clone();
    for (n, socket) in sockets.iter_mut().enumerate() {
        let frame = socket.json().await;
        assert!(
            frame["type"] == "message" && frame["id"] == sentinel,
            "socket {n}: expected the sentinel {sentinel} next, got {frame}"
        );
    }
    for device in devices {
        let acked = api
            .post(
                "/v1/messages/ack",
                Some(&device.access),
                json!({ "ids": [sentinel] }),
            )
            .await
            .expect(200);
        assert_eq!(acked, json!({ "acked": 1 }), "the sentinel settled");
    }
}
