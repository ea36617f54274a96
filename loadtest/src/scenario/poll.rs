//! `poll`: the `pairs` traffic over the REST fallback: senders POST, and
//! receivers GET their queue and ack what they got, in a loop. For
//! comparison with the socket path.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};

use super::{Sequence, slot, stamp, unstamp};
use crate::client::{Account, Api};
use crate::stats::{Latency, Report, now_nanos};
use crate::{Gate, Plan, Shard, Traffic};

/// How long a receiver waits after an empty poll.
const POLL_PAUSE: Duration = Duration::from_millis(50);
const GRACE: Duration = Duration::from_secs(10);

pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    traffic: &Traffic,
) -> anyhow::Result<Report> {
    let (duration, size) = (traffic.duration(), traffic.body_size());
    let mine: Vec<usize> = shard.indices(traffic.pairs);
    let api_for = |n: usize| Api::new(slot(plan, n).1.clone());
    // Empty the receivers' queues of anything an earlier run left.
    let _: Vec<()> = stream::iter(mine.iter().copied())
        .map(|pair| {
            let (receiver, api) = (slot(plan, 2 * pair + 1).0.clone(), api_for(2 * pair + 1));
            async move {
                while let Ok(page) = api.fetch(&receiver, 500).await {
                    if page.is_empty() {
                        break;
                    }
                    let ids: Vec<String> = page.into_iter().map(|(id, _)| id).collect();
                    let _ = api.ack(&receiver, &ids).await;
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    gate.pass(&Report::default()).await;

    let interval = traffic.interval();
    let deadline = tokio::time::Instant::now() + duration;
    let started = Instant::now();
    let tasks: Vec<_> = mine
        .into_iter()
        .map(|pair| {
            let (sender, receiver) = (
                slot(plan, 2 * pair).0.clone(),
                slot(plan, 2 * pair + 1).0.clone(),
            );
            let api = api_for(2 * pair);
            tokio::spawn(run_pair(api, sender, receiver, interval, deadline, size))
        })
        .collect();
    let mut report = Report::default();
    for task in tasks {
        report.merge(&task.await?);
    }
    report.set_seconds("sending", duration);
    report.set_seconds("elapsed", started.elapsed());
    Ok(report)
}

async fn run_pair(
    api: Api,
    sender: Account,
    receiver: Account,
    interval: Option<Duration>,
    deadline: tokio::time::Instant,
    size: usize,
) -> Report {
    let (confirmed_tx, confirmed_rx) = tokio::sync::oneshot::channel();
    let sending = {
        let api = api.clone();
        let to = receiver.user_id;
        tokio::spawn(async move {
            let mut report = Report::default();
            let mut latency = Latency::default();
            let mut confirmed = Vec::new();
            let mut ticker = tokio::time::interval(
                interval
                    .unwrap_or(Duration::ZERO)
                    .max(Duration::from_micros(1)),
            );
            let mut seq = 0u64;
            while tokio::time::Instant::now() < deadline {
                if interval.is_some() {
                    ticker.tick().await;
                }
                let begin = Instant::now();
                match api.send(&sender, to, &stamp(seq, size)).await {
                    Ok(_) => {
                        latency.record(begin.elapsed());
                        confirmed.push(seq);
                    }
                    Err(_) => report.add("send_errors", 1),
                }
                seq += 1;
            }
            report.add("sent", seq);
            report.add("confirmed", confirmed.len() as u64);
            report.set_latency("send_to_201", &latency);
            let _ = confirmed_tx.send(confirmed);
            report
        })
    };
    let mut report = Report::default();
    let mut push = Latency::default();
    let mut sequence = Sequence::default();
    let mut confirmed_rx = Some(confirmed_rx);
    let mut confirmed: Option<Vec<u64>> = None;
    let give_up = deadline + GRACE;
    let mut received = 0u64;
    while tokio::time::Instant::now() < give_up {
        if let Some(rx) = confirmed_rx.as_mut()
            && let Ok(list) = rx.try_recv()
        {
            confirmed = Some(list);
            confirmed_rx = None;
        }
        if confirmed
            .as_ref()
            .is_some_and(|c| sequence.unique() >= c.len() as u64)
        {
            break;
        }
        let Ok(page) = api.fetch(&receiver, 500).await else {
            report.add("poll_errors", 1);
            tokio::time::sleep(POLL_PAUSE).await;
            continue;
        };
        let at = now_nanos();
        if page.is_empty() {
            tokio::time::sleep(POLL_PAUSE).await;
            continue;
        }
        let mut ids = Vec::with_capacity(page.len());
        for (id, body) in page {
            if let Some((sent_at, seq)) = unstamp(&body) {
                received += 1;
                push.record(Duration::from_nanos(at.saturating_sub(sent_at)));
                sequence.observe(seq);
            }
            ids.push(id);
        }
        if api.ack(&receiver, &ids).await.is_err() {
            report.add("ack_errors", 1);
        }
    }
    if let Ok(sent) = sending.await {
        report.merge(&sent);
    }
    let confirmed = confirmed.unwrap_or_default();
    report.add("received", received);
    report.add("lost", sequence.lost(&confirmed));
    report.add("duplicated", sequence.duplicates);
    report.add("out_of_order", sequence.out_of_order);
    report.set_latency("push", &push);
    report
}
