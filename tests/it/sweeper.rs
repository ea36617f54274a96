//! The sweeper deletes messages older than the message TTL, delivered or
//! not, in bounded batches, and logs how many.

use std::time::{Duration, Instant};

use crate::backend_tests;
use crate::common::{Backend, ServerProcess, TestDb, TestServer};

backend_tests!(
    expired_messages_are_swept_and_fresh_ones_kept,
    sweeps_more_than_one_batch
);

async fn expired_messages_are_swept_and_fresh_ones_kept(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(
        &db.url,
        &[
            ("SEALPOST_MESSAGE_TTL", "2s"),
            ("SEALPOST_SWEEP_INTERVAL", "200ms"),
        ],
    );
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    for n in 0..3u8 {
        server.send(&alice, bob.id, &[n]).await;
    }
    assert_eq!(server.inbox(&bob).await.len(), 3);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let fresh = server.send(&alice, bob.id, b"fresh").await;

    // The old three expire 2 s after they were sent; the fresh one about a
    // second later. Watch for the moment the old ones are gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        let inbox = server.inbox(&bob).await;
        // Sent a few milliseconds apart, the old three may expire on either
        // side of a sweep: wait for all of them.
        if inbox.len() <= 1 {
            break inbox;
        }
        assert!(Instant::now() < deadline, "nothing was swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ids: Vec<&str> = remaining
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [fresh["id"].as_str().unwrap()],
        "only the fresh message is left"
    );

    // The sweep said how many it deleted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.log_lines("swept expired rows").is_empty() {
        assert!(Instant::now() < deadline, "the sweep was not logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let swept = || -> u64 {
        server
            .log_lines("swept expired rows")
            .iter()
            .filter_map(|l| {
                l.split("messages=")
                    .nth(1)?
                    .split(' ')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    while swept() < 3 {
        assert!(
            Instant::now() < deadline,
            "the sweeps logged {} messages",
            swept()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(swept(), 3);
}

async fn sweeps_more_than_one_batch(backend: Backend) {
    // More messages than one delete statement takes (1000).
    const COUNT: usize = 1100;
    let server = TestServer::start_with(
        backend,
        &["--message-ttl", "1s", "--sweep-interval", "300ms"],
    )
    .await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (api, alice) = (server.api.clone(), alice.clone());
        tasks.spawn(async move {
            for n in (worker..COUNT).step_by(16) {
                api.send(&alice, bob.id, &(n as u32).to_be_bytes()).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("sender");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = server
            .get("/v1/messages?limit=1", Some(&bob.access))
            .await
            .expect(200);
        if left["messages"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expired messages were not all swept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
