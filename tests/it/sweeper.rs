//! The sweeper deletes messages older than the message TTL, delivered or
//! not, in bounded batches, and logs how many; and send keys older than
//! their window, after which a repeat is a new message.

use std::time::{Duration, Instant};

use crate::backend_tests;
use serde_json::json;

use crate::common::{Backend, ServerProcess, TestDb, TestServer, b64, eventually};
use crate::sealed::Raw;

backend_tests!(
    expired_messages_are_swept_and_fresh_ones_kept,
    sweeps_more_than_one_batch,
    send_keys_are_forgotten_after_their_window,
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
    // More messages than one delete statement takes (1000), from one
    // sender: more than a sender's default share of a queue, so shares off.
    const COUNT: usize = 1100;
    let server = TestServer::start_with(
        backend,
        &[
            "--message-ttl",
            "1s",
            "--sweep-interval",
            "300ms",
            "--max-queued-per-sender",
            "0",
        ],
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

/// A send key is kept for a day: one made to look two days old (its
/// message id is a UUIDv7, whose time the sweeper reads) is swept, and the
/// same key then sends a new message.
async fn send_keys_are_forgotten_after_their_window(backend: Backend) {
    let server = TestServer::start_with(backend, &["--sweep-interval", "200ms"]).await;
    let (alice, bob) = (server.account("alice").await, server.account("bob").await);
    let request = json!({ "to": bob.id, "body": b64(b"hi"), "client_id": "old" });
    let first = server
        .post("/v1/messages", Some(&alice.access), request.clone())
        .await
        .expect(201);
    let raw = Raw::open(&server.db).await;
    // A key past its expiry (a day after its send, on the hour).
    let expired = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    let keys = || async {
        match &raw {
            Raw::Pg(pool) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM send_keys")
                .fetch_one(pool)
                .await
                .unwrap(),
            Raw::Sqlite(pool) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM send_keys")
                .fetch_one(pool)
                .await
                .unwrap(),
        }
    };
    assert_eq!(keys().await, 1);
    match &raw {
        Raw::Pg(pool) => {
            sqlx::query("UPDATE send_keys SET expires_at = $1")
                .bind(expired)
                .execute(pool)
                .await
                .unwrap();
        }
        Raw::Sqlite(pool) => {
            sqlx::query("UPDATE send_keys SET expires_at = ?")
                .bind(expired.timestamp_millis())
                .execute(pool)
                .await
                .unwrap();
        }
    }
    eventually("the old key to be swept", async || {
        (keys().await == 0).then_some(())
    })
    .await;
    let again = server
        .post("/v1/messages", Some(&alice.access), request)
        .await
        .expect(201);
    assert_ne!(again["id"], first["id"], "a new message after the window");
    assert_eq!(server.inbox(&bob).await.len(), 2);
}
