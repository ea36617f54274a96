//! Property tests: generated hostile input, first against the WebSocket frame
//! decoder alone, then against a live server over REST and WebSocket.
//!
//! The generators aim near the target, not only at noise: objects with the
//! right keys and values of every JSON type, real ids, tokens, keys and
//! passwords among random strings, valid bodies with one byte changed or cut
//! short. Noise alone almost never gets past the JSON parser.
//!
//! The live tests run a bounded number of cases ([`LIVE_CASES`] per
//! endpoint) so the suite stays fast; a failure is shrunk against the live
//! server and printed with its minimal input. `PROPTEST_CASES` raises the
//! count of the decoder tests only.

use std::fmt::Debug;
use std::future::Future;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use reqwest::Method;
use sealpost::ws::frame::{ClientFrame, MAX_REF_BYTES, parse};
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::backend_tests;
use crate::common::ws::{Event, WsClient};
use crate::common::{
    Account, Api, Backend, PASSWORD, Reply, TestServer, assert_alive, b64, public_key,
};

/// The server's default nesting cap.
const MAX_DEPTH: usize = 32;

/// Cases per endpoint against a live server.
const LIVE_CASES: u32 = 48;

/// The error codes of `protocol.md` that come with a 4xx.
const CLIENT_ERROR_CODES: [&str; 6] = [
    "invalid",
    "unauthorized",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
];

// ---------------------------------------------------------------------------
// Generators

/// Any JSON value, up to a few levels deep, whose strings are drawn from
/// `strings` as often as at random.
fn json_value(strings: Vec<String>) -> BoxedStrategy<Value> {
    let string = prop_oneof![
        prop::sample::select(strings),
        "\\PC{0,24}".prop_map(String::from),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(u64::MAX)),
        string.prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("\\PC{0,8}", inner), 0..4)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
    .boxed()
}

/// An object with (most of) `keys`, each holding any value, and perhaps one
/// more key.
fn structured(keys: &'static [&'static str], value: BoxedStrategy<Value>) -> BoxedStrategy<Value> {
    (
        prop::collection::vec(prop::option::weighted(0.85, value.clone()), keys.len()),
        prop::option::weighted(0.2, ("\\PC{0,8}", value)),
    )
        .prop_map(move |(values, extra)| {
            let mut object = Map::new();
            for (key, value) in keys.iter().zip(values) {
                if let Some(value) = value {
                    object.insert((*key).to_owned(), value);
                }
            }
            if let Some((key, value)) = extra {
                object.insert(key, value);
            }
            Value::Object(object)
        })
        .boxed()
}

/// A request body for an endpoint taking `keys`: mostly objects of about the
/// right shape, sometimes damaged, sometimes anything at all.
fn body(keys: &'static [&'static str], strings: Vec<String>) -> BoxedStrategy<Vec<u8>> {
    let value = json_value(strings);
    let shaped = structured(keys, value.clone());
    prop_oneof![
        4 => shaped.clone().prop_map(|v| v.to_string().into_bytes()),
        2 => (shaped, any::<Index>(), any::<u8>(), any::<bool>()).prop_map(
            |(v, at, byte, cut)| {
                let mut bytes = v.to_string().into_bytes();
                let at = at.index(bytes.len());
                if cut {
                    bytes.truncate(at);
                } else {
                    bytes[at] = byte;
                }
                bytes
            }
        ),
        1 => value.prop_map(|v| v.to_string().into_bytes()),
        1 => "\\PC{0,64}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..128),
        1 => (1..200usize).prop_map(|depth| "[".repeat(depth).into_bytes()),
    ]
    .boxed()
}

/// Percent-encodes all but unreserved characters.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The strings worth trying in any field: what the server knows, and near
/// misses.
fn interesting(alice: &Account, bob: &Account) -> Vec<String> {
    vec![
        alice.id.to_string(),
        bob.id.to_string(),
        uuid::Uuid::nil().to_string(),
        alice.id.simple().to_string(),
        alice.username.clone(),
        "bob".into(),
        PASSWORD.into(),
        public_key(),
        b64(b"hello"),
        "aGk".into(),
        alice.access.clone(),
        alice.refresh.clone(),
        "password".into(),
        String::new(),
        "\u{0}".into(),
        "-1".into(),
        "99999999999999999999".into(),
    ]
}

// ---------------------------------------------------------------------------
// Checks

/// Runs `test` on `LIVE_CASES` generated values, each to completion on the
/// test's runtime; a failing case is shrunk and reported with its input.
fn live_cases<S, F, Fut>(strategy: S, test: F)
where
    S: Strategy,
    S::Value: Debug,
    F: Fn(S::Value) -> Fut,
    Fut: Future<Output = ()>,
{
    let handle = tokio::runtime::Handle::current();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: LIVE_CASES,
        // Shrinking replays requests against the server: keep it bounded.
        max_shrink_iters: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = tokio::task::block_in_place(|| {
        runner.run(&strategy, |value| {
            handle.block_on(test(value));
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// A 2xx, or a 4xx with the documented error body and a known code: never a
/// 5xx, never a bare rejection.
#[track_caller]
fn assert_clean(reply: &Reply, what: &dyn Debug) {
    let status = reply.status.as_u16();
    if (200..300).contains(&status) {
        return;
    }
    assert!(
        (400..500).contains(&status),
        "{what:?}: status {status}: {:?}",
        reply.body
    );
    let code = reply.code();
    assert!(
        CLIENT_ERROR_CODES.contains(&code),
        "{what:?}: status {status} with code {code:?}: {:?}",
        reply.body
    );
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what:?}: {:?}",
        reply.body
    );
}

// ---------------------------------------------------------------------------
// The frame decoder alone

/// What a decoded frame must agree with: the JSON it came from.
fn assert_agrees(text: &str, inbound: &sealpost::ws::frame::Inbound) {
    let value: Option<Value> = serde_json::from_str(text).ok();
    let claimed_ref = value
        .as_ref()
        .and_then(|v| v.get("ref"))
        .and_then(Value::as_str);
    if let Some(reference) = &inbound.reference {
        assert!(reference.len() <= MAX_REF_BYTES, "{text:?}");
        assert_eq!(Some(reference.as_str()), claimed_ref, "{text:?}");
    }
    match &inbound.frame {
        Err(err) => {
            assert_eq!(err.code(), "invalid", "{text:?}: {err}");
            assert!(!err.to_string().is_empty(), "{text:?}");
            assert!(err.status().is_client_error(), "{text:?}: {err}");
        }
        Ok(frame) => {
            let value = value
                .as_ref()
                .unwrap_or_else(|| panic!("decoded a non-JSON frame: {text:?}"));
            assert!(
                claimed_ref.is_none_or(|r| r.len() <= MAX_REF_BYTES),
                "{text:?}"
            );
            assert_eq!(inbound.reference.as_deref(), claimed_ref, "{text:?}");
            match frame {
                ClientFrame::Auth { token } => {
                    assert_eq!(value["type"], "auth", "{text:?}");
                    assert_eq!(value["token"], token.as_str(), "{text:?}");
                }
                ClientFrame::Send {
                    to,
                    body,
                    envelopes,
                    ephemeral,
                    client_id,
                    urgent,
                } => {
                    assert_eq!(value["type"], "send", "{text:?}");
                    assert_eq!(
                        value.get("urgent").and_then(Value::as_bool).unwrap_or(true),
                        *urgent,
                        "{text:?}"
                    );
                    assert_eq!(
                        value.get("client_id").and_then(Value::as_str),
                        client_id.as_deref(),
                        "{text:?}"
                    );
                    assert_eq!(value["to"], to.as_str(), "{text:?}");
                    assert_eq!(
                        value.get("body").and_then(Value::as_str),
                        body.as_deref(),
                        "{text:?}"
                    );
                    assert_eq!(
                        value.get("envelopes").is_some(),
                        envelopes.is_some(),
                        "{text:?}"
                    );
                    let claimed = value.get("ephemeral").and_then(Value::as_bool);
                    assert_eq!(claimed.unwrap_or(false), *ephemeral, "{text:?}");
                }
                ClientFrame::SendMulti(frame) => {
                    assert_eq!(value["type"], "send_multi", "{text:?}");
                    assert_eq!(
                        value["recipients"].as_array().map(Vec::len),
                        Some(frame.send.recipients.len()),
                        "{text:?}"
                    );
                    assert_eq!(
                        value.get("shared").and_then(Value::as_str),
                        frame.send.shared.as_deref(),
                        "{text:?}"
                    );
                    let claimed = value.get("ephemeral").and_then(Value::as_bool);
                    assert_eq!(claimed.unwrap_or(false), frame.ephemeral, "{text:?}");
                }
                ClientFrame::Ack { ids } => {
                    assert_eq!(value["type"], "ack", "{text:?}");
                    assert_eq!(value["ids"], json!(ids), "{text:?}");
                }
            }
        }
    }
}

/// A frame of about the right shape, with any values in its fields.
fn frame_like() -> BoxedStrategy<Value> {
    let strings = vec![
        "auth".into(),
        "send".into(),
        "ack".into(),
        "Send".into(),
        uuid::Uuid::nil().to_string(),
        "aGk=".into(),
        "r".repeat(MAX_REF_BYTES),
        "r".repeat(MAX_REF_BYTES + 1),
    ];
    structured(
        &["type", "ref", "token", "to", "body", "ephemeral", "ids"],
        json_value(strings),
    )
}

/// A valid client frame as JSON, and what it must decode to.
fn valid_frame() -> impl Strategy<Value = (Value, Option<String>)> {
    let text = "\\PC{0,24}";
    let frame = prop_oneof![
        text.prop_map(|token| json!({ "type": "auth", "token": token })),
        (text, text, prop::option::of(any::<bool>())).prop_map(|(to, body, ephemeral)| {
            let mut frame = json!({ "type": "send", "to": to, "body": body });
            if let Some(ephemeral) = ephemeral {
                frame["ephemeral"] = json!(ephemeral);
            }
            frame
        }),
        prop::collection::vec(text, 0..8).prop_map(|ids| json!({ "type": "ack", "ids": ids })),
    ];
    // At most 32 characters of at most 4 bytes: within MAX_REF_BYTES.
    (frame, prop::option::of("\\PC{0,32}")).prop_map(|(mut frame, reference)| {
        if let Some(r) = &reference {
            frame["ref"] = json!(r);
        }
        (frame, reference)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frames_from_any_text_decode_or_fail_cleanly(text in any::<String>()) {
        assert_agrees(&text, &parse(&text, MAX_DEPTH));
    }

    #[test]
    fn frames_from_any_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = String::from_utf8_lossy(&bytes);
        assert_agrees(&text, &parse(&text, MAX_DEPTH));
    }

    #[test]
    fn frames_of_about_the_right_shape_decode_or_fail_cleanly(frame in frame_like()) {
        let text = frame.to_string();
        let inbound = parse(&text, MAX_DEPTH);
        assert_agrees(&text, &inbound);
        // An over-long ref is never echoed, and fails the frame.
        if frame["ref"].as_str().is_some_and(|r| r.len() > MAX_REF_BYTES) {
            prop_assert!(inbound.reference.is_none() && inbound.frame.is_err());
        }
    }

    #[test]
    fn valid_frames_round_trip((frame, reference) in valid_frame()) {
        let text = frame.to_string();
        let inbound = parse(&text, MAX_DEPTH);
        prop_assert!(inbound.frame.is_ok(), "{text}: {:?}", inbound.frame.err());
        prop_assert_eq!(&inbound.reference, &reference);
        assert_agrees(&text, &inbound);
        // Pretty-printed, the same frame decodes the same.
        let pretty = serde_json::to_string_pretty(&frame).unwrap();
        assert_agrees(&pretty, &parse(&pretty, MAX_DEPTH));
    }

    #[test]
    fn frames_nested_past_the_cap_fail_without_parsing(extra in 1..64usize, reference in "[a-z]{1,8}") {
        let depth = MAX_DEPTH + extra;
        let text = format!(
            r#"{{"type":"ack","ids":[],"ref":"{reference}","x":{}{}}}"#,
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        );
        let inbound = parse(&text, MAX_DEPTH);
        let err = inbound.frame.unwrap_err();
        prop_assert_eq!(err.code(), "invalid");
        prop_assert!(err.to_string().contains("levels deep"), "{}", err);
        prop_assert!(inbound.reference.is_none());
    }
}

// ---------------------------------------------------------------------------
// A live server

backend_tests!(
    request_bodies_get_clean_answers,
    queries_and_paths_get_clean_answers,
    websocket_frames_get_clean_answers,
);

/// The JSON endpoints, the keys each takes, and whether it needs a token.
const BODIES: [(&str, &str, &[&str], bool); 6] = [
    (
        "POST",
        "/v1/register",
        &["username", "password", "public_key"],
        false,
    ),
    ("POST", "/v1/login", &["username", "password"], false),
    ("POST", "/v1/token/refresh", &["refresh_token"], false),
    ("PUT", "/v1/update-key", &["public_key"], true),
    ("POST", "/v1/messages", &["to", "body"], true),
    ("POST", "/v1/messages/ack", &["ids"], true),
];

async fn request_bodies_get_clean_answers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let api: &Api = &server;
    for (verb, path, keys, authed) in BODIES {
        let token = authed.then_some(alice.access.as_str());
        let method: Method = verb.parse().unwrap();
        let bodies = body(keys, interesting(&alice, &bob));
        live_cases(bodies, |body| {
            let method = method.clone();
            async move {
                let what = (verb, path, String::from_utf8_lossy(&body).into_owned());
                let reply = api.raw(method, path, token, "application/json", body).await;
                assert_clean(&reply, &what);
            }
        });
        assert_alive(api, &alice).await;
    }
    // The form login, too.
    let form = prop::collection::vec(
        (
            prop::sample::select(vec!["grant_type", "username", "password", "x"]),
            prop_oneof![
                prop::sample::select(vec!["password", "alice", PASSWORD]).prop_map(String::from),
                "\\PC{0,16}"
            ],
        ),
        0..5,
    );
    live_cases(form, |pairs| async move {
        let body = pairs
            .iter()
            .map(|(k, v)| format!("{k}={}", encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let reply = api
            .raw(
                Method::POST,
                "/v1/login",
                None,
                "application/x-www-form-urlencoded",
                body,
            )
            .await;
        assert_clean(&reply, &pairs);
    });
    assert_alive(api, &alice).await;
}

async fn queries_and_paths_get_clean_answers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server.send(&bob, alice.id, b"hello").await;
    let api: &Api = &server;
    let strings = interesting(&alice, &bob);
    let value = prop_oneof![
        prop::sample::select(strings.clone()),
        any::<i64>().prop_map(|n| n.to_string()),
        (0u32..600).prop_map(|n| n.to_string()),
        "\\PC{0,16}",
    ];
    let pair = (
        prop::sample::select(vec!["limit", "after", "limit[]", "x", ""]),
        value.clone(),
    )
        .prop_map(|(k, v)| format!("{k}={}", encode(&v)));
    let query = prop_oneof![
        prop::collection::vec(pair, 0..4).prop_map(|pairs| pairs.join("&")),
        // Raw, including broken percent escapes.
        "[A-Za-z0-9%&=+;.\\[\\]]{0,32}",
    ];
    live_cases((query, any::<bool>()), |(query, authed)| {
        let token = authed.then_some(alice.access.as_str());
        async move {
            let reply = api.get(&format!("/v1/messages?{query}"), token).await;
            assert_clean(&reply, &query);
        }
    });
    assert_alive(api, &alice).await;

    let routes = prop::sample::select(vec![
        ("GET", "/v1/users/{}"),
        ("GET", "/v1/public-key/{}"),
        ("PUT", "/v1/messages/{}/delivered"),
    ]);
    live_cases(
        (routes, value, any::<bool>()),
        |((verb, route), segment, authed)| {
            let token = authed.then_some(alice.access.as_str());
            let path = route.replace("{}", &encode(&segment));
            async move {
                let reply = match verb {
                    "GET" => api.get(&path, token).await,
                    _ => api.put(&path, token, Value::Null).await,
                };
                assert_clean(&reply, &path);
            }
        },
    );
    assert_alive(api, &alice).await;
    // Nothing above consumed bob's message but a delivered ack of its id,
    // which no generator knows.
    assert_eq!(server.inbox(&alice).await.len(), 1);
}

/// What a case sends on the socket.
#[derive(Debug, Clone)]
enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

async fn websocket_frames_get_clean_answers(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let api: &Api = &server;
    let value = json_value(interesting(&alice, &bob));
    let shaped = structured(&["type", "ref", "token", "to", "body", "ids"], value);
    let typed = (
        shaped.clone(),
        prop::sample::select(vec!["auth", "send", "ack", "ready", ""]),
    )
        .prop_map(|(mut frame, kind)| {
            frame["type"] = json!(kind);
            frame
        });
    let frames = prop_oneof![
        3 => typed.prop_map(|v| Frame::Text(v.to_string())),
        1 => shaped.prop_map(|v| Frame::Text(v.to_string())),
        1 => "\\PC{0,64}".prop_map(Frame::Text),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Binary),
        1 => (1..200usize).prop_map(|depth| Frame::Text("[".repeat(depth))),
    ];
    let (alice_ref, bob_id) = (&alice, bob.id);
    live_cases(frames, |frame| async move {
        // One socket per case: a malformed frame is a strike, and a case
        // must not be cut off for its predecessors' strikes.
        let (mut ws, _) = WsClient::ready(api, alice_ref).await;
        ws.send_raw(match &frame {
            Frame::Text(text) => Message::Text(text.clone().into()),
            Frame::Binary(bytes) => Message::Binary(bytes.clone().into()),
        })
        .await;
        // Then a frame with a known answer: every frame before that answer
        // is the case's, and the answer proves the socket survived.
        ws.send_json(json!({ "type": "auth", "ref": "probe", "token": alice_ref.access }))
            .await;
        loop {
            let reply = match ws.event().await {
                Event::Json(reply) => reply,
                other => panic!("{frame:?}: the socket ended: {other:?}"),
            };
            match reply["type"].as_str() {
                Some("authed") if reply["ref"] == "probe" => break,
                Some("authed" | "sent" | "message") => {}
                Some("error") => {
                    let code = reply["code"].as_str().unwrap_or_default();
                    assert!(
                        CLIENT_ERROR_CODES.contains(&code),
                        "{frame:?}: error frame with code {code:?}: {reply}"
                    );
                    assert!(
                        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
                        "{frame:?}: {reply}"
                    );
                }
                _ => panic!("{frame:?}: unexpected reply {reply}"),
            }
        }
        ws.close().await;
    });
    assert_alive(api, &alice).await;
    // The relay still relays.
    let (mut ws, _) = WsClient::ready(api, &alice).await;
    ws.send_message("last", bob_id, b"still here").await;
    let sent = ws.expect("sent").await;
    assert_eq!(sent["ref"], "last");
    ws.close().await;
}
