//! The ack window's contract (`SEALPOST_ACK_WINDOW`): a copy pushed to an
//! online device and acked within the window is never written and never
//! redelivered, and its sender's `sent` then means "acked by the
//! recipient"; a copy not acked in time is written and survives kill -9.

use std::time::Duration;

use serde_json::json;

use crate::backend_tests;
use crate::common::cluster::metric;
use crate::common::ws::{Event, WsClient};
use crate::common::{Backend, ServerProcess, TestDb, TestServer, id};

backend_tests!(
    acked_in_the_window_is_never_written_nor_redelivered,
    acked_over_rest_in_the_window_is_never_written,
    not_acked_in_the_window_survives_kill9,
);

/// Long enough that no scheduling hiccup of a loaded test machine lets a
/// window end before the ack it waits for: the tests then pin behaviour,
/// not timing.
const LONG_WINDOW: &str = "10s";

async fn counters(server: &TestServer) -> (f64, f64) {
    let addr = server.metrics_addr.expect("metrics are on");
    let elided = metric(addr, "sealpost_copies_elided_total", &[]).await;
    let written = metric(addr, "sealpost_copies_written_total", &[]).await;
    (elided.unwrap_or(0.0), written.unwrap_or(0.0))
}

async fn acked_in_the_window_is_never_written_nor_redelivered(backend: Backend) {
    let flags = ["--ack-window", LONG_WINDOW, "--metrics-addr", "127.0.0.1:0"];
    let server = TestServer::start_with(backend, &flags).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;

    alice_ws.send_message("m1", bob.id, b"hello").await;
    let pushed = bob_ws.expect("message").await;
    let message = pushed["id"].as_str().unwrap().to_owned();
    bob_ws.ack(&[&message]).await;
    // `sent` comes from bob's ack, long before the window would have
    // ended: it means "acked by the recipient".
    let sent = match alice_ws.event_within(Duration::from_secs(5)).await {
        Some(Event::Json(frame)) if frame["type"] == "receipt" => alice_ws.expect("sent").await,
        Some(Event::Json(frame)) => frame,
        other => panic!("expected `sent` before the window ended, got {other:?}"),
    };
    assert_eq!(sent["type"], "sent", "{sent}");
    assert_eq!(sent["ref"], "m1");
    assert_eq!(sent["id"], message.as_str());
    assert_eq!(counters(&server).await, (1.0, 0.0));

    // Not in the queue, on a new socket or over REST, now or after the
    // window.
    bob_ws.close().await;
    let (_again, backlog) = WsClient::ready(&server, &bob).await;
    assert!(backlog.is_empty(), "{backlog:?}");
    assert!(server.inbox(&bob).await.is_empty());
    // The same message acked again settles nothing.
    let again = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [message] }),
        )
        .await
        .expect(200);
    assert_eq!(again["acked"], 0);
    assert_eq!(counters(&server).await, (1.0, 0.0));
}

/// A push read on a socket and acked over REST is elided too: the ack
/// window is the device's, not the socket's.
async fn acked_over_rest_in_the_window_is_never_written(backend: Backend) {
    let flags = ["--ack-window", LONG_WINDOW, "--metrics-addr", "127.0.0.1:0"];
    let server = TestServer::start_with(backend, &flags).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let sending = {
        let (server, alice, to) = (server.api.clone(), alice.clone(), bob.id);
        tokio::spawn(async move { server.send(&alice, to, b"over rest").await })
    };
    let pushed = bob_ws.expect("message").await;
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": [pushed["id"]] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 1);
    // The sender's 201 names the message the recipient acked.
    let created = tokio::time::timeout(Duration::from_secs(5), sending)
        .await
        .expect("201 before the window ended")
        .unwrap();
    assert_eq!(id(&created["id"]), id(&pushed["id"]));
    assert_eq!(counters(&server).await, (1.0, 0.0));
    assert!(server.inbox(&bob).await.is_empty());
}

/// Pushed, not acked in the window, answered `sent`: written, so a kill -9
/// right after loses nothing, and the recipient finds it on its next
/// connection.
async fn not_acked_in_the_window_survives_kill9(backend: Backend) {
    let db = TestDb::new(backend).await;
    let window = [("SEALPOST_ACK_WINDOW", "50ms")];
    let server = ServerProcess::spawn(&db.url, &window);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut bob_ws, _) = WsClient::ready(&server, &bob).await;
    let (mut alice_ws, _) = WsClient::ready(&server, &alice).await;
    alice_ws.send_message("m1", bob.id, b"keep me").await;
    let pushed = bob_ws.expect("message").await;
    let sent = alice_ws.expect("sent").await;
    assert_eq!(sent["id"], pushed["id"]);
    server.kill9();

    let restarted = ServerProcess::spawn(&db.url, &window);
    let (mut bob_ws, backlog) = WsClient::ready(&restarted, &bob).await;
    assert_eq!(backlog.len(), 1, "{backlog:?}");
    assert_eq!(backlog[0]["id"], pushed["id"]);
    // Acked now: a delete, and gone for good.
    bob_ws.ack(&[backlog[0]["id"].as_str().unwrap()]).await;
    crate::common::eventually("the ack to be written", async || {
        restarted.inbox(&bob).await.is_empty().then_some(())
    })
    .await;
}
