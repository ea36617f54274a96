//! The WebSocket protocol: authentication, push, drain, acks, renewal.

use std::time::Duration;

use serde_json::json;

use crate::backend_tests;
use crate::common::ws::WsClient;
use crate::common::{Backend, TestServer, b64, unb64};

backend_tests!(
    header_auth_then_ready_and_an_empty_drain,
    online_push_from_rest_and_from_socket
);

async fn header_auth_then_ready_and_an_empty_drain(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = server.account("bob").await;
    let (mut ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert!(backlog.is_empty());
    ws.expect_silence(Duration::from_millis(200)).await;
}

async fn online_push_from_rest_and_from_socket(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut bob_ws, _) = WsClient::ready(&server.api, &bob).await;

    let sent = server.send(&alice, bob.id, b"over rest").await;
    let pushed = bob_ws.expect("message").await;
    assert_eq!(pushed["id"], sent["id"]);
    assert_eq!(pushed["from"], alice.id.to_string());
    assert_eq!(unb64(pushed["body"].as_str().unwrap()), b"over rest");
    assert_eq!(pushed["sent_at"], sent["sent_at"]);

    let (mut alice_ws, _) = WsClient::ready(&server.api, &alice).await;
    alice_ws
        .send_json(
            json!({ "type": "send", "ref": "r1", "to": bob.id, "body": b64(b"over socket") }),
        )
        .await;
    let sent = alice_ws.expect("sent").await;
    assert_eq!(sent["ref"], "r1");
    let pushed = bob_ws.expect("message").await;
    assert_eq!(pushed["id"], sent["id"]);
    assert_eq!(unb64(pushed["body"].as_str().unwrap()), b"over socket");
}
