//! `drain`: queue U×M messages for offline users, then connect them all at
//! once and time the drain to the last acked message.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::{CONNECT_CONCURRENCY, slot, stamp};
use crate::client::{self, Account, Target, b64};
use crate::stats::{Report, now_nanos};
use crate::{Gate, Plan, Shard};

/// Sender sockets used to fill the queues, each with up to `WINDOW` sends
/// awaiting `sent`.
const FILLERS: usize = 8;
const WINDOW: usize = 200;
/// A drain that has not finished by then is reported as incomplete.
const GIVE_UP: Duration = Duration::from_secs(300);

/// Queues `per_user` messages for each of `users`, sent by `sender` over
/// pipelined WebSocket sends. Returns how many were confirmed.
pub async fn fill(
    target: &Target,
    sender: &Account,
    users: &[Account],
    per_user: usize,
    size: usize,
) -> anyhow::Result<u64> {
    let bar = client::progress((users.len() * per_user) as u64, "queueing");
    let work: Vec<(uuid::Uuid, u64)> = (0..per_user)
        .flat_map(|n| users.iter().map(move |u| (u.user_id, n as u64)))
        .collect();
    let chunks: Vec<Vec<(uuid::Uuid, u64)>> = (0..FILLERS)
        .map(|i| work.iter().skip(i).step_by(FILLERS).copied().collect())
        .collect();
    let confirmed: Vec<anyhow::Result<u64>> = stream::iter(chunks)
        .map(|chunk| {
            let bar = bar.clone();
            async move {
                let mut ws = client::connect(target, None, &sender.access)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                client::until_drained(&mut ws).await?;
                let (mut sink, mut frames) = ws.split();
                let (mut next, mut in_flight, mut confirmed) = (0, 0, 0u64);
                while next < chunk.len() || in_flight > 0 {
                    while next < chunk.len() && in_flight < WINDOW {
                        let (to, seq) = chunk[next];
                        let frame = json!({ "type": "send", "ref": "q", "to": to, "body": b64(&stamp(seq, size)) });
                        sink.send(Message::Text(frame.to_string().into())).await?;
                        next += 1;
                        in_flight += 1;
                    }
                    match frames.next().await {
                        Some(Ok(Message::Text(text))) if text.contains("\"type\":\"sent\"") => {
                            in_flight -= 1;
                            confirmed += 1;
                            bar.inc(1);
                        }
                        Some(Ok(Message::Text(_))) => in_flight -= 1,
                        Some(Ok(_)) => {}
                        _ => anyhow::bail!("filler socket closed"),
                    }
                }
                Ok(confirmed)
            }
        })
        .buffer_unordered(FILLERS)
        .collect()
        .await;
    bar.finish_and_clear();
    confirmed.into_iter().sum()
}

pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    users: usize,
    per_user: usize,
) -> anyhow::Result<Report> {
    gate.pass(&Report::default()).await;
    let started = Instant::now();
    let start_nanos = now_nanos();
    let mine: Vec<usize> = shard.indices(users);
    let results: Vec<(u64, u64, Option<u64>)> = stream::iter(mine)
        .map(|n| async move {
            let (account, target, source) = slot(plan, n);
            tokio::time::timeout(
                GIVE_UP,
                drain_one(target, source, &account.access, per_user),
            )
            .await
            .unwrap_or((0, 0, None))
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut report = Report::default();
    let mut last_ack = start_nanos;
    for (received, acked, finished) in results {
        report.add("received", received);
        report.add("acked", acked);
        match finished {
            Some(at) => {
                report.add("drained_users", 1);
                last_ack = last_ack.max(at);
            }
            None => report.add("incomplete_users", 1),
        }
    }
    report.set_seconds("drain", Duration::from_nanos(last_ack - start_nanos));
    report.set_seconds("elapsed", started.elapsed());
    Ok(report)
}

#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(borrow)]
    id: Option<&'a str>,
}

/// Connects, reads `expect` messages, acking in batches of 500. Returns
/// (received, acked, time of the last ack) — `None` if it fell short.
async fn drain_one(
    target: &Target,
    source: Option<std::net::IpAddr>,
    token: &str,
    expect: usize,
) -> (u64, u64, Option<u64>) {
    let Ok(mut ws) = client::connect(target, source, token).await else {
        return (0, 0, None);
    };
    let (mut received, mut acked) = (0u64, 0u64);
    let mut pending: Vec<String> = Vec::new();
    let mut drained = false;
    while let Some(Ok(message)) = ws.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        // Only the type and id matter here: a borrowed, typed parse keeps
        // the load generator's cost per message small.
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(&text) else {
            continue;
        };
        match frame.kind {
            "message" => {
                received += 1;
                pending.extend(frame.id.map(str::to_owned));
            }
            "drained" => drained = true,
            "ready" => continue,
            _ => return (received, acked, None),
        }
        let done = received as usize >= expect;
        if pending.len() >= 500 || (done && !pending.is_empty()) || (drained && !pending.is_empty())
        {
            acked += pending.len() as u64;
            let frame = json!({ "type": "ack", "ids": pending });
            pending.clear();
            if client::send_text(&mut ws, &frame).await.is_err() {
                return (received, acked, None);
            }
        }
        if done {
            let at = now_nanos();
            let _ = ws.close(None).await;
            return (received, acked, Some(at));
        }
    }
    (received, acked, None)
}
