//! `connect`: open N authenticated sockets, hold them, and report how fast
//! they became ready and why any failed. The parent measures the server's
//! memory at the gate, with every socket open. With several `--url` the
//! sockets go round-robin over the nodes ([`slot`]), and each node's share
//! that became ready is counted (`ready_node{i}`) for its memory per socket.
//! Each socket's ready time goes on the `ready` timeline, so that the
//! parent's memory samples taken while the sockets open can be matched
//! with how many were open then (`memory_curve`).

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};

use super::{CONNECT_CONCURRENCY, node_of, slot};
use crate::client::{self, Ws};
use crate::stats::{Latency, Report, now_nanos};
use crate::{Gate, Plan, Shard};

/// A socket ready and when (ns since the epoch), or why not.
type Opened = Result<(Ws, u64), &'static str>;

/// Opens this shard's share of `conns` sockets; the parent holds them at
/// the gate (and reads the server's memory there).
pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    conns: usize,
) -> anyhow::Result<Report> {
    let mine: Vec<usize> = shard.indices(conns);
    let started = Instant::now();
    let opened: Vec<(usize, Opened, Duration)> = stream::iter(mine)
        .map(|n| async move {
            let (account, target, source) = slot(plan, n);
            let begin = Instant::now();
            let ws = match client::connect(target, source, &account.access).await {
                Ok(mut ws) => match client::until_drained(&mut ws).await {
                    Ok(_) => Ok((ws, now_nanos())),
                    Err(_) => Err("fail_not_ready"),
                },
                Err(e) => Err(e.cause()),
            };
            (node_of(plan, n), ws, begin.elapsed())
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;

    let mut setup = Report::default();
    let mut latency = Latency::default();
    let mut sockets = Vec::new();
    let nodes = plan.targets.len();
    for (node, ws, took) in opened {
        match ws {
            Ok((ws, at)) => {
                latency.record(took);
                setup.mark("ready", at);
                sockets.push(ws);
                if nodes > 1 {
                    setup.add(&format!("ready_node{node}"), 1);
                }
            }
            Err(cause) => setup.add(cause, 1),
        }
    }
    setup.add("ready", sockets.len() as u64);
    setup.set_latency("connect_ready", &latency);
    setup.set_seconds("all_ready", started.elapsed());

    // Keep reading while held, so the sockets answer the server's pings.
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move { while client::next_json(&mut ws).await.is_some() {} })
        })
        .collect();
    gate.pass(&setup).await;

    let mut measured = Report::default();
    let dropped = readers.iter().filter(|r| r.is_finished()).count();
    measured.add("dropped_while_held", dropped as u64);
    for reader in readers {
        reader.abort();
    }
    Ok(measured)
}
