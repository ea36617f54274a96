//! A message answered 201 is durable: it survives SIGKILL of the server and
//! a graceful shutdown in the middle of traffic, on both backends. No send
//! waits past its deadline meanwhile, and the server that comes back
//! serves. (Faults of the database itself are in `faults.rs`.)

use serde_json::json;

use crate::backend_tests;
use crate::common::traffic::{
    Plan, Senders, assert_all_queued, assert_answered_in_time, created_ids,
};
use crate::common::{Account, Api, Backend, ServerProcess, TestDb, TestServer};

backend_tests!(
    accepted_messages_survive_kill9,
    acks_survive_kill9,
    graceful_shutdown_loses_nothing_accepted,
);

/// How long the senders may take to get their first answers.
const WARM_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// The server that came back answers: ready, and a send is stored.
async fn assert_serves(api: &Api, from: &Account, to: &Account) {
    api.get("/readyz", None).await.expect(200);
    api.send(from, to.id, b"after the restart").await;
}

async fn accepted_messages_survive_kill9(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(&db.url, &[]);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let senders = Senders::start(&server.api, &alice, bob.id, Plan::UNTIL_REFUSED);
    senders.until_created(200, WARM_UP).await;
    server.kill9();
    let sent = senders.join().await;
    assert_answered_in_time(&sent);
    let accepted = created_ids(&sent);

    let restarted = ServerProcess::spawn(&db.url, &[]);
    assert_all_queued(&restarted.api, &bob, &accepted).await;
    assert_serves(&restarted.api, &alice, &bob).await;
}

async fn acks_survive_kill9(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(&db.url, &[]);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let mut ids = Vec::new();
    for n in 0..10u8 {
        ids.push(
            server.send(&alice, bob.id, &[n]).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let acked = server
        .post(
            "/v1/messages/ack",
            Some(&bob.access),
            json!({ "ids": &ids[..6] }),
        )
        .await
        .expect(200);
    assert_eq!(acked["acked"], 6);
    server.kill9();

    let restarted = ServerProcess::spawn(&db.url, &[]);
    let left: Vec<String> = restarted
        .inbox(&bob)
        .await
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, ids[6..]);
}

async fn graceful_shutdown_loses_nothing_accepted(backend: Backend) {
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let senders = Senders::start(&server.api, &alice, bob.id, Plan::UNTIL_REFUSED);
    senders.until_created(100, WARM_UP).await;
    let db = server.stop().await;
    let sent = senders.join().await;
    assert_answered_in_time(&sent);
    let accepted = created_ids(&sent);

    let restarted = TestServer::start_on(db, &[]).await;
    assert_all_queued(&restarted.api, &bob, &accepted).await;
    assert_serves(&restarted.api, &alice, &bob).await;
}
