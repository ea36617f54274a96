//! The WebSocket protocol: authentication, push, drain, acks, renewal.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::{Event, WsClient, assert_next_is_sentinel, close};
use crate::common::{
    Account, Api, Backend, ServerProcess, TestDb, TestServer, b64, id, ids, unb64,
};

backend_tests!(
    header_auth_then_ready_and_an_empty_drain,
    online_push_from_rest_and_from_socket,
    backlog_drains_in_order_on_connect,
    live_messages_during_the_drain_keep_order_without_repeats,
    sent_means_durable_across_kill9_for_offline_and_online_recipients,
    graceful_shutdown_confirms_in_flight_sends_and_closes_with_1001,
    silent_peers_are_dropped_and_answering_ones_kept,
);

/// The sequence number each test message carries in its body.
fn seq(frame: &Value) -> u32 {
    let body = unb64(frame["body"].as_str().unwrap());
    u32::from_be_bytes(body[..4].try_into().unwrap())
}

async fn header_auth_then_ready_and_an_empty_drain(backend: Backend) {
    let server = TestServer::start(backend).await;
    let bob = server.account("bob").await;
    let (mut ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert!(backlog.is_empty());
    assert_next_is_sentinel(&server.api, &[&bob], &mut [&mut ws]).await;
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

async fn backlog_drains_in_order_on_connect(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let carol = server.account("carol").await;
    let bob = server.account("bob").await;
    // 260 messages from two senders, interleaved: more than one drain page.
    let mut sent = Vec::new();
    for n in 0..260u32 {
        let from = if n % 2 == 0 { &alice } else { &carol };
        sent.push(
            server.send(from, bob.id, &n.to_be_bytes()).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (mut ws, backlog) = WsClient::ready(&server.api, &bob).await;
    let got: Vec<&str> = backlog.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got, sent);
    assert!(backlog.iter().enumerate().all(|(n, m)| seq(m) == n as u32));
    // Nothing more: the live queue held no repeats of the backlog.
    assert_next_is_sentinel(&server.api, &[&bob], &mut [&mut ws]).await;
}

async fn live_messages_during_the_drain_keep_order_without_repeats(backend: Backend) {
    const QUEUED: u32 = 300;
    const LIVE: u32 = 300;
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    for n in 0..QUEUED {
        server.send(&alice, bob.id, &n.to_be_bytes()).await;
    }
    // Keep sending while bob connects and drains.
    let (api, sender) = (server.api.clone(), alice.clone());
    let live = tokio::spawn(async move {
        for n in QUEUED..QUEUED + LIVE {
            api.send(&sender, bob.id, &n.to_be_bytes()).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut ws = WsClient::connect(&server.api, Some(&bob.access)).await;
    ws.expect("ready").await;
    let mut received = Vec::new();
    let mut drained = false;
    while received.len() < (QUEUED + LIVE) as usize {
        let frame = ws.json().await;
        match frame["type"].as_str() {
            Some("message") => received.push(frame),
            Some("drained") => {
                assert!(!drained, "drained twice");
                drained = true;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    live.await.unwrap();
    assert!(drained, "no drained frame");
    let seqs: Vec<u32> = received.iter().map(seq).collect();
    assert_eq!(
        seqs,
        (0..QUEUED + LIVE).collect::<Vec<_>>(),
        "out of order, missing or repeated"
    );
    let ids = ids(&received);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_next_is_sentinel(&server.api, &[&bob], &mut [&mut ws]).await;
}

/// Sends `count` messages over a socket, pipelined, and returns the ids the
/// server confirmed with `sent`.
async fn send_over_socket(ws: &mut WsClient, to: Uuid, count: u32) -> Vec<Uuid> {
    for n in 0..count {
        ws.send_message(&n.to_string(), to, &n.to_be_bytes()).await;
    }
    let mut confirmed = Vec::new();
    while confirmed.len() < count as usize {
        let frame = ws.expect("sent").await;
        confirmed.push(id(&frame["id"]));
    }
    confirmed
}

async fn assert_queued(api: &Api, who: &Account, confirmed: &[Uuid]) {
    let queued: HashSet<Uuid> = ids(&api.inbox(who).await).into_iter().collect();
    let lost: Vec<&Uuid> = confirmed.iter().filter(|id| !queued.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} confirmed messages lost: {lost:?}",
        lost.len()
    );
}

async fn sent_means_durable_across_kill9_for_offline_and_online_recipients(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(&db.url, &[]);
    let alice = server.account("alice").await;
    let offline = server.account("offline").await;
    let online = server.account("online").await;
    // `online` is connected and receives every push, but never acks.
    let (mut online_ws, _) = WsClient::ready(&server.api, &online).await;
    let (mut alice_ws, _) = WsClient::ready(&server.api, &alice).await;

    let to_offline = send_over_socket(&mut alice_ws, offline.id, 100).await;
    let to_online = send_over_socket(&mut alice_ws, online.id, 100).await;
    let mut pushed = 0;
    while pushed < to_online.len() {
        online_ws.expect("message").await;
        pushed += 1;
    }
    server.kill9();

    let restarted = ServerProcess::spawn(&db.url, &[]);
    assert_queued(&restarted.api, &offline, &to_offline).await;
    assert_queued(&restarted.api, &online, &to_online).await;
    // The unacked pushes come back on the next connection, in order.
    let (_, backlog) = WsClient::ready(&restarted.api, &online).await;
    assert_eq!(ids(&backlog), to_online);
}

async fn graceful_shutdown_confirms_in_flight_sends_and_closes_with_1001(backend: Backend) {
    const SENDS: u32 = 200;
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut bob_ws, _) = WsClient::ready(&server.api, &bob).await;
    let (mut alice_ws, _) = WsClient::ready(&server.api, &alice).await;
    for n in 0..SENDS {
        alice_ws
            .send_message(&n.to_string(), bob.id, &n.to_be_bytes())
            .await;
    }
    // Shut down while the sends are in flight: after the first is confirmed.
    let mut confirmed = vec![id(&alice_ws.expect("sent").await["id"])];
    // Stop in the background: the server waits for clients to answer its
    // close frames, as live clients do.
    let stopping = tokio::spawn(server.stop());

    // Alice sees `sent` for what the server took, then 1001.
    loop {
        match alice_ws.event().await {
            Event::Json(frame) if frame["type"] == "sent" => confirmed.push(id(&frame["id"])),
            Event::Json(frame) => panic!("unexpected frame {frame}"),
            closed => break closed.assert_close(close::SHUTTING_DOWN),
        }
    }
    bob_ws.until_close(close::SHUTTING_DOWN).await;
    let db = stopping.await.expect("server stops");

    let restarted = TestServer::start_on(db, &[]).await;
    assert_queued(&restarted.api, &bob, &confirmed).await;
}

/// With a 1 s ping interval: a client that keeps reading (so its library
/// answers pings) stays connected across several intervals; one that stops
/// reading sends no pongs and is dropped by the next ping after.
async fn silent_peers_are_dropped_and_answering_ones_kept(backend: Backend) {
    let server = TestServer::start_with(backend, &["--ws-ping-interval", "1s"]).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (mut answering, _) = WsClient::ready(&server.api, &alice).await;
    let (mut silent, _) = WsClient::ready(&server.api, &bob).await;

    // Reading answers the server's pings; nothing else arrives meanwhile.
    answering.expect_silence(Duration::from_millis(3500)).await;
    // bob read nothing for 3.5 s: by now the server has given up on him.
    if let Event::Json(frame) = silent.event().await {
        panic!("unexpected frame {frame}");
    }
    // alice is still connected and served.
    server.send(&bob, alice.id, b"still here").await;
    assert_eq!(
        unb64(answering.expect("message").await["body"].as_str().unwrap()),
        b"still here"
    );
}
