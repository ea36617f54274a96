//! `storm`: N clients connected; the server restarts (the parent runs
//! `--restart-cmd` at the gate, or an operator does) and every client
//! reconnects with jittered exponential backoff. Measures the time from the
//! first drop to the last client ready again, and checks that nothing was
//! lost: messages pushed before the restart and not acked (clients here never
//! ack) must come back in the backlog after it. With `--backlog M` the
//! parent queues M messages per user before the clients first connect, so
//! the restarted server has all of them to send again at once.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;

use super::slot;
use crate::client::{self, Target};
use crate::stats::{Latency, Report, now_nanos};
use crate::{Gate, Plan, Shard};

/// Reconnect backoff: full jitter over an exponential ceiling.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

enum Event {
    /// First connection ready, with this many messages in its backlog.
    Up(u64),
    /// Ready again after a drop at `dropped` (epoch ns); lost = pushed
    /// before the drop but missing from the new backlog.
    Back {
        dropped: u64,
        back: u64,
        lost: u64,
        redelivered: u64,
        attempts: u64,
    },
    Failed,
}

pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    conns: usize,
    timeout: Duration,
) -> anyhow::Result<Report> {
    let mine: Vec<usize> = shard.indices(conns);
    let total = mine.len();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut clients = Vec::with_capacity(total);
    for n in mine {
        let (account, target, source) = slot(plan, n);
        let (target, token, tx) = (target.clone(), account.access.clone(), tx.clone());
        clients.push(tokio::spawn(client_loop(
            target, source, token, tx, timeout,
        )));
        // Stagger the first connections a little.
        if clients.len() % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    drop(tx);

    let mut setup = Report::default();
    let mut up = 0;
    while up + setup.count("fail_first_connect") < total as u64 {
        match rx.recv().await {
            Some(Event::Up(backlog)) => {
                up += 1;
                setup.add("backlog_before", backlog);
            }
            Some(Event::Failed) | None => setup.add("fail_first_connect", 1),
            Some(Event::Back { .. }) => {}
        }
    }
    setup.add("ready", up);
    gate.pass(&setup).await;

    let mut report = Report::default();
    let mut reconnect = Latency::default();
    let (mut first_drop, mut last_back, mut back) = (u64::MAX, 0u64, 0u64);
    let deadline = tokio::time::Instant::now() + timeout;
    while back < up {
        let event = tokio::select! {
            event = rx.recv() => event,
            () = tokio::time::sleep_until(deadline) => None,
        };
        match event {
            Some(Event::Back {
                dropped,
                back: at,
                lost,
                redelivered,
                attempts,
            }) => {
                report.add("redelivered", redelivered);
                back += 1;
                first_drop = first_drop.min(dropped);
                last_back = last_back.max(at);
                reconnect.record(Duration::from_nanos(at.saturating_sub(dropped)));
                report.add("lost", lost);
                report.add("reconnect_attempts", attempts);
            }
            Some(_) => {}
            None => break,
        }
    }
    report.add("back", back);
    report.add("not_back", up - back);
    report.set_latency("reconnect", &reconnect);
    if back > 0 {
        report.set_seconds(
            "first_drop_to_all_back",
            Duration::from_nanos(last_back.saturating_sub(first_drop)),
        );
    }
    for client in clients {
        client.abort();
    }
    Ok(report)
}

async fn client_loop(
    target: Target,
    source: Option<IpAddr>,
    token: String,
    events: mpsc::UnboundedSender<Event>,
    timeout: Duration,
) {
    // Ids as u128: with a backlog, 19,000 clients hold 100 each.
    let mut dropped: Option<(u64, HashSet<u128>)> = None;
    loop {
        let give_up = tokio::time::Instant::now() + timeout;
        let mut attempts = 0u64;
        let mut ceiling = BACKOFF_BASE;
        let (mut ws, backlog) = loop {
            attempts += 1;
            if let Ok(mut ws) = client::connect(&target, source, &token).await
                && let Ok(backlog) = client::until_drained(&mut ws).await
            {
                break (ws, backlog);
            }
            if tokio::time::Instant::now() >= give_up {
                let _ = events.send(Event::Failed);
                return;
            }
            let wait = rand::rng().random_range(0..=ceiling.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            ceiling = (ceiling * 2).min(BACKOFF_CAP);
        };
        let backlog: HashSet<u128> = backlog.iter().filter_map(message_id).collect();
        let event = match dropped.take() {
            None => Event::Up(backlog.len() as u64),
            Some((at, before)) => {
                let lost = before.difference(&backlog).count() as u64;
                Event::Back {
                    dropped: at,
                    back: now_nanos(),
                    lost,
                    redelivered: before.len() as u64 - lost,
                    attempts,
                }
            }
        };
        let _ = events.send(event);
        // Live pushes, never acked: all of them must come back after a drop.
        let mut seen = backlog;
        while let Some(frame) = client::next_json(&mut ws).await {
            if frame["type"] == "message"
                && let Some(id) = message_id(&frame)
            {
                seen.insert(id);
            }
        }
        dropped = Some((now_nanos(), seen));
    }
}

fn message_id(frame: &serde_json::Value) -> Option<u128> {
    uuid::Uuid::parse_str(frame["id"].as_str()?)
        .ok()
        .map(|id| id.as_u128())
}
