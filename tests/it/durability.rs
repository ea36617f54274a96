//! A message answered 201 is durable: it survives SIGKILL of the server and
//! a graceful shutdown in the middle of traffic, on both backends.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{Account, Api, Backend, ServerProcess, TestDb, TestServer, b64};

backend_tests!(
    accepted_messages_survive_kill9,
    acks_survive_kill9,
    graceful_shutdown_loses_nothing_accepted,
);

/// Senders running at once: enough that the kill lands while requests are in
/// flight, and that batches hold several messages.
const SENDERS: usize = 8;
/// Per sender, so the test ends even if the kill never lands.
const MAX_SENDS: usize = 300;

/// Starts `SENDERS` tasks that send to `to` until a request fails; returns
/// the ids the server answered 201 for.
fn start_senders(
    api: &Api,
    from: &Account,
    to: Uuid,
) -> (Arc<Mutex<Vec<Uuid>>>, tokio::task::JoinSet<()>) {
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for sender in 0..SENDERS {
        let (api, token, accepted) = (api.clone(), from.access.clone(), accepted.clone());
        tasks.spawn(async move {
            for n in 0..MAX_SENDS {
                let request = api
                    .http
                    .post(api.url("/v1/messages"))
                    .bearer_auth(&token)
                    .json(&json!({ "to": to, "body": b64(format!("{sender}:{n}").as_bytes()) }));
                match request.send().await {
                    Ok(response) if response.status() == 201 => {
                        let body: serde_json::Value = response.json().await.expect("201 body");
                        accepted
                            .lock()
                            .unwrap()
                            .push(body["id"].as_str().unwrap().parse().unwrap());
                    }
                    // The server died or is draining: stop sending.
                    _ => return,
                }
            }
        });
    }
    (accepted, tasks)
}

async fn wait_for(accepted: &Mutex<Vec<Uuid>>, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while accepted.lock().unwrap().len() < at_least {
        assert!(Instant::now() < deadline, "senders too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Asserts that every accepted id is queued for `who`, in acceptance order.
async fn assert_all_queued(api: &Api, who: &Account, accepted: &[Uuid]) {
    let queued: Vec<Uuid> = api
        .inbox(who)
        .await
        .iter()
        .map(|m| m["id"].as_str().unwrap().parse().unwrap())
        .collect();
    let present: BTreeSet<Uuid> = queued.iter().copied().collect();
    let lost: Vec<&Uuid> = accepted.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages lost: {lost:?}",
        lost.len(),
        accepted.len()
    );
    assert!(
        queued.windows(2).all(|w| w[0] < w[1]),
        "queue out of id order"
    );
}

async fn accepted_messages_survive_kill9(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(&db.url, &[]);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;

    let (accepted, mut senders) = start_senders(&server.api, &alice, bob.id);
    wait_for(&accepted, 200).await;
    server.kill9();
    while senders.join_next().await.is_some() {}
    let accepted = accepted.lock().unwrap().clone();

    let restarted = ServerProcess::spawn(&db.url, &[]);
    assert_all_queued(&restarted.api, &bob, &accepted).await;
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

    let (accepted, mut senders) = start_senders(&server.api, &alice, bob.id);
    wait_for(&accepted, 100).await;
    let db = server.stop().await;
    while senders.join_next().await.is_some() {}
    let accepted = accepted.lock().unwrap().clone();

    let restarted = TestServer::start_on(db, &[]).await;
    assert_all_queued(&restarted.api, &bob, &accepted).await;
}
