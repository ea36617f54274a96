//! `pairs`: P sender/receiver pairs over WebSockets at a total target rate
//! (0: as fast as each sender's window allows). Each body carries its send
//! time and sequence number; receivers ack what they get and check, against
//! what the sender had confirmed (`sent`), for losses, duplicates and
//! reordering. Latency is send-to-push: the time in the body to the moment
//! the receiver reads the frame.
//!
//! With `--devices N` every receiving account has N devices, each with its
//! own socket: the sender sends one `body` (the server copies it to every
//! device) or, with `--envelopes`, one envelope per device, and every
//! device must get every confirmed message. Each device acks its own copies
//! and is checked on its own; counts and latencies cover every delivery
//! (messages × devices), with a breakdown per device position.
//!
//! With several `--url` (nodes of a cluster) a pair's sender and receiver
//! are on different nodes ([`pair_nodes`]): every push crosses the broker.
//! With `--kill-pid` the parent kills one node mid-run; its clients
//! reconnect to the next URL and go on (with `--restart-cmd` the parent
//! kills and restarts the server, and with one URL the next is the same
//! one): a receiver reads its backlog there
//! (a copy it had already had on the dead node, whose ack died with it,
//! counts as `redelivered`, not as a duplicate), a sender sends on (what it
//! had in flight stays unconfirmed: stored or not, nobody knows). At the
//! end a receiver still missing confirmed messages reads its queue once
//! more: what it finds there was stored but never pushed live
//! (`recovered_from_queue`); `lost` is what is in neither.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use rand::Rng;
use serde_json::json;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::{Arrival, CONNECT_CONCURRENCY, Sequence, pair_nodes, slot, stamp, unstamp};
use crate::client::{self, Target, Ws, b64, unb64};
use crate::stats::{Latency, Report, now_nanos};
use crate::{Fanout, Gate, Kill, Plan, Shard, Traffic};

/// Unconfirmed sends per sender when unthrottled: deep enough to keep the
/// committer's batches full, shallow enough to stay under the server's
/// per-connection limit of 256.
const WINDOW: usize = 128;
/// After the sending stops: time for the last confirmations and pushes.
const GRACE: Duration = Duration::from_secs(10);
/// Receivers ack what they have read as soon as their input runs dry, as
/// a client that acks on receipt does (under load the acks batch up by
/// themselves), and at the latest every `ACK_BATCH` ids.
const ACK_BATCH: usize = 200;
/// Reconnecting after a lost socket (with `--kill-pid` or
/// `--restart-cmd`): full jitter over an exponential ceiling, as storm's
/// clients do; the ceiling stays low, since the other nodes are up (or the
/// restarted server is back within seconds) and the run is short.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// One connection attempt: a dead node refuses at once, but one that hangs
/// must not hold a client for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The last read of a queue (after a kill): time to reach `drained`.
const FINAL_DRAIN: Duration = Duration::from_secs(10);
/// Ids per `ack` frame: the server takes at most 500.
const ACK_FRAME_MAX: usize = 500;

/// One pair's sockets: the sender's, and one per device of the receiver
/// (device id, socket), device 1 first, each with its route.
struct Pair {
    sender: (Ws, Route),
    receivers: Vec<(u32, Ws, Route)>,
    to: Uuid,
}

/// A sender's confirmed sequence numbers, shared by its receiving devices.
type Confirmed = Arc<Vec<u64>>;

/// Where a client's socket goes, and where it goes next when it is lost:
/// the run's nodes in `--url` order, the one it is on, and what it
/// connects with.
#[derive(Clone)]
struct Route {
    targets: Arc<[Target]>,
    node: usize,
    source: Option<IpAddr>,
    token: String,
}

impl Route {
    /// One attempt at the current node, bounded by `CONNECT_TIMEOUT`.
    async fn connect(&self) -> anyhow::Result<Ws> {
        let target = &self.targets[self.node];
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            client::connect(target, self.source, &self.token),
        )
        .await
        {
            Ok(Ok(ws)) => Ok(ws),
            Ok(Err(e)) => Err(anyhow::anyhow!("{}: {e:?}", target.base)),
            Err(_) => Err(anyhow::anyhow!("{}: connect timed out", target.base)),
        }
    }

    /// Connects to the next node, then the one after, ..., backing off
    /// between attempts, until one answers or `give_up` passes.
    async fn reconnect(&mut self, give_up: tokio::time::Instant) -> Option<Ws> {
        self.node = (self.node + 1) % self.targets.len();
        self.connect_until(give_up).await
    }

    /// As [`Route::reconnect`], trying the current node first.
    async fn connect_until(&mut self, give_up: tokio::time::Instant) -> Option<Ws> {
        let mut ceiling = BACKOFF_BASE;
        loop {
            if let Ok(ws) = self.connect().await {
                return Some(ws);
            }
            let now = tokio::time::Instant::now();
            if now >= give_up {
                return None;
            }
            let wait = rand::rng().random_range(0..=ceiling.as_millis() as u64);
            tokio::time::sleep_until((now + Duration::from_millis(wait)).min(give_up)).await;
            ceiling = (ceiling * 2).min(BACKOFF_CAP);
            self.node = (self.node + 1) % self.targets.len();
        }
    }
}

pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    traffic: &Traffic,
    fanout: &Fanout,
    kill: &Kill,
) -> anyhow::Result<Report> {
    let (duration, size) = (traffic.duration(), traffic.body_size());
    let devices = fanout.devices();
    let reconnect = kill.reconnect();
    let targets: Arc<[Target]> = plan.targets.clone().into();
    let mine: Vec<usize> = shard.indices(traffic.pairs);
    // A pair is 1 + devices sockets: keep the sockets in flight as before.
    let opened: Vec<anyhow::Result<Pair>> = stream::iter(mine)
        .map(|pair| {
            let targets = targets.clone();
            async move { open_pair(plan, targets, pair, devices).await }
        })
        .buffer_unordered((CONNECT_CONCURRENCY / (1 + devices)).max(1))
        .collect()
        .await;
    let (ready, setup) = super::ready("pair", opened);
    gate.pass(&setup).await;

    // Every sender paces itself to its share of the total rate, its ticks
    // offset by k/n of the interval: n people typing do not all press send
    // in the same millisecond. (Started together, the senders sent in
    // bursts of n every interval, and the push latency measured how long
    // the server and the generator took to clear a burst.)
    let interval = traffic.interval();
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    let senders = ready.len().max(1) as u32;
    let lag = tokio::spawn(lag_probe(deadline));
    let tasks: Vec<_> = ready
        .into_iter()
        .enumerate()
        .map(
            |(
                k,
                Pair {
                    sender,
                    receivers,
                    to,
                },
            )| {
                let first_tick =
                    start + interval.map_or(Duration::ZERO, |i| i * k as u32 / senders);
                let envelopes = fanout
                    .envelopes
                    .then(|| receivers.iter().map(|(id, _, _)| *id).collect::<Vec<_>>());
                // Per-device counters only with several devices: one device's
                // would repeat the totals.
                let named = devices > 1;
                let (confirmed_txs, receives): (Vec<_>, Vec<_>) = receivers
                    .into_iter()
                    .enumerate()
                    .map(|(k, (_, ws, route))| {
                        let (tx, rx) = oneshot::channel();
                        let position = named.then_some(k + 1);
                        let route = reconnect.then_some(route);
                        (
                            tx,
                            tokio::spawn(receive_loop(ws, rx, deadline + GRACE, position, route)),
                        )
                    })
                    .unzip();
                let (sender, sender_route) = sender;
                let send = tokio::spawn(send_loop(
                    sender,
                    reconnect.then_some(sender_route),
                    to,
                    envelopes,
                    interval,
                    first_tick,
                    deadline,
                    size,
                    confirmed_txs,
                ));
                (send, receives)
            },
        )
        .collect();
    let mut measured = Report::default();
    for (send, receives) in tasks {
        measured.merge(&send.await?);
        for receive in receives {
            measured.merge(&receive.await?);
        }
    }
    measured.set_latency("generator_lag", &lag.await?);
    measured.set_seconds("sending", duration);
    measured.set_seconds("elapsed", started.elapsed());
    Ok(measured)
}

/// How late the generator's own runtime wakes a task: a 1 ms sleep,
/// again and again until `deadline`, and each wake-up's delay past it.
/// A push latency tail that shows here too is the generator's, not the
/// server's.
pub(super) async fn lag_probe(deadline: tokio::time::Instant) -> Latency {
    const TICK: Duration = Duration::from_millis(1);
    let mut lag = Latency::default();
    while tokio::time::Instant::now() < deadline {
        let due = tokio::time::Instant::now() + TICK;
        tokio::time::sleep_until(due).await;
        lag.record(tokio::time::Instant::now().saturating_duration_since(due));
    }
    lag
}

/// Sender of pair n is account 2n, its receiver account 2n + 1, whose
/// first `devices` devices each open a socket, on the nodes
/// [`pair_nodes`] picks (one node: all on it). The sender and device 1 use
/// slot 2n's source address, device k slot 2n + k - 1's. Every socket
/// drains and acks any backlog left by an earlier run.
async fn open_pair(
    plan: &Plan,
    targets: Arc<[Target]>,
    pair: usize,
    devices: usize,
) -> anyhow::Result<Pair> {
    let (receiver_nodes, sender_node) = pair_nodes(pair, targets.len(), devices);
    let (sender, _, source) = slot(plan, 2 * pair);
    let (receiver, _, _) = slot(plan, 2 * pair + 1);
    let sessions = receiver.sessions(devices)?;
    let sender_route = Route {
        targets: targets.clone(),
        node: sender_node,
        source,
        token: sender.access.clone(),
    };
    let mut sender_ws = sender_route.connect().await?;
    let mut receivers = Vec::with_capacity(devices);
    for (k, ((device_id, token), node)) in sessions.into_iter().zip(receiver_nodes).enumerate() {
        let (_, _, source) = slot(plan, 2 * pair + k);
        let route = Route {
            targets: targets.clone(),
            node,
            source,
            token: token.to_owned(),
        };
        let ws = route
            .connect()
            .await
            .map_err(|e| e.context(format!("device {device_id}")))?;
        receivers.push((device_id, ws, route));
    }
    client::until_drained(&mut sender_ws).await?;
    for (device_id, ws, _) in &mut receivers {
        let (ready, stale) = client::ready_and_backlog(ws).await?;
        if let Some(named) = ready["device_id"].as_u64()
            && named != u64::from(*device_id)
        {
            anyhow::bail!("device {device_id}'s socket is ready as device {named}");
        }
        for chunk in stale.chunks(ACK_FRAME_MAX) {
            let ids: Vec<&str> = chunk.iter().filter_map(|m| m["id"].as_str()).collect();
            client::send_text(ws, &json!({ "type": "ack", "ids": ids })).await?;
        }
    }
    Ok(Pair {
        sender: (sender_ws, sender_route),
        receivers,
        to: receiver.user_id,
    })
}

/// Sends to `to` until `deadline`, then waits (until the grace period ends)
/// for the last confirmations, and hands the confirmed set to every
/// receiving device. With `envelopes`, each send carries one envelope per
/// listed device (the same stamped body) instead of one `body`. With a
/// `route`, a lost socket is replaced by one to the next node and the
/// sending goes on; without, it ends the sender.
#[allow(clippy::too_many_arguments)]
async fn send_loop(
    ws: Ws,
    mut route: Option<Route>,
    to: Uuid,
    envelopes: Option<Vec<u32>>,
    interval: Option<Duration>,
    first_tick: tokio::time::Instant,
    deadline: tokio::time::Instant,
    size: usize,
    confirmed_txs: Vec<oneshot::Sender<Confirmed>>,
) -> Report {
    let (mut sink, mut stream) = ws.split();
    let mut ticker =
        tokio::time::interval_at(first_tick, interval.unwrap_or(Duration::from_secs(3600)));
    // Burst: a late tick is made up, so the offered rate is the asked rate.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let give_up = deadline + GRACE;
    let mut report = Report::default();
    let mut sent_latency = Latency::default();
    let mut reconnect_latency = Latency::default();
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut confirmed = Vec::new();
    let (mut receipts, mut unconfirmed) = (0u64, 0u64);
    let mut seq = 0u64;
    loop {
        let sending = tokio::time::Instant::now() < deadline;
        if !sending && in_flight.is_empty() {
            break;
        }
        let can_send = sending && in_flight.len() < WINDOW;
        let mut lost = false;
        tokio::select! {
            _ = ticker.tick(), if can_send && interval.is_some() => {}
            () = std::future::ready(()), if can_send && interval.is_none() => {}
            frame = stream.next() => {
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        // A receiving device acked: best effort, only
                        // counted. Told apart by the frame's first field
                        // (the server writes `type` first) without parsing
                        // it: the load generator shares the server's cores,
                        // and a parse per receipt is its cost, not the
                        // server's.
                        if text.starts_with(r#"{"type":"receipt""#) {
                            receipts += 1;
                            continue;
                        }
                        let frame: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        let Some(n) = frame["ref"].as_str().and_then(|r| r.parse::<u64>().ok()) else { continue };
                        let Some(at) = in_flight.remove(&n) else { continue };
                        match frame["type"].as_str() {
                            Some("sent") => {
                                sent_latency.record(at.elapsed());
                                confirmed.push(n);
                            }
                            _ => report.add(&format!("send_error_{}", frame["code"].as_str().unwrap_or("unknown")), 1),
                        }
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    _ => lost = true,
                }
            }
            () = tokio::time::sleep_until(give_up) => break,
        }
        if !lost {
            let body = b64(&stamp(seq, size));
            let frame = match &envelopes {
                None => json!({ "type": "send", "ref": seq.to_string(), "to": to, "body": body }),
                Some(ids) => {
                    let envelopes: Vec<_> = ids
                        .iter()
                        .map(|id| json!({ "device_id": id, "body": body }))
                        .collect();
                    json!({ "type": "send", "ref": seq.to_string(), "to": to, "envelopes": envelopes })
                }
            };
            // A number is used once, even for a frame whose write failed:
            // the server may have read it all the same.
            let n = seq;
            seq += 1;
            if sink
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_ok()
            {
                in_flight.insert(n, Instant::now());
                continue;
            }
            unconfirmed += 1;
        }
        report.add("sender_socket_lost", 1);
        let Some(route) = route.as_mut() else {
            break;
        };
        // What was in flight may or may not have been stored: it stays
        // unconfirmed, and receivers do not expect it.
        unconfirmed += in_flight.len() as u64;
        in_flight.clear();
        let lost_at = Instant::now();
        let Some(ws) = route.reconnect(give_up).await else {
            break;
        };
        report.add("sender_reconnects", 1);
        reconnect_latency.record(lost_at.elapsed());
        (sink, stream) = ws.split();
    }
    report.add("sent", seq);
    report.add("confirmed", confirmed.len() as u64);
    report.add("unconfirmed", unconfirmed + in_flight.len() as u64);
    report.add("receipts_seen", receipts);
    report.set_latency("send_to_sent", &sent_latency);
    if route.is_some() {
        report.set_latency("reconnect", &reconnect_latency);
    }
    let confirmed = Arc::new(confirmed);
    for tx in confirmed_txs {
        let _ = tx.send(confirmed.clone());
    }
    let _ = sink.close().await;
    report
}

/// One receiving device: reads, acks and checks its stream until it holds
/// every confirmed message or `give_up`. `position` (the device's place in
/// its account, from 1) names per-device counters and latencies as well.
/// With a `route`, a lost socket is replaced by one to the next node (its
/// backlog, then live pushes, are read as before), and a device still
/// missing confirmed messages at the end reads its queue once more.
async fn receive_loop(
    ws: Ws,
    confirmed_rx: oneshot::Receiver<Confirmed>,
    give_up: tokio::time::Instant,
    position: Option<usize>,
    mut route: Option<Route>,
) -> Report {
    let (mut sink, mut stream) = ws.split();
    let mut push = Latency::default();
    let mut push_reconnected = Latency::default();
    let mut reconnect_latency = Latency::default();
    let mut sequence = Sequence::default();
    let mut pending: Vec<String> = Vec::new();
    let mut confirmed_rx = Some(confirmed_rx);
    let mut confirmed: Option<Confirmed> = None;
    let mut report = Report::default();
    let mut received = 0u64;
    // This device's connections, numbered from 0.
    let mut connection = 0u32;
    loop {
        if let Some(confirmed) = &confirmed
            && sequence.unique() >= confirmed.len() as u64
            && sequence.lost(confirmed) == 0
        {
            break;
        }
        let mut lost = false;
        tokio::select! {
            biased;
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let at = now_nanos();
                    let frame: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    if frame["type"] != "message" {
                        continue;
                    }
                    let Some((sent_at, seq)) = frame["body"].as_str().and_then(unb64).as_deref().and_then(unstamp) else {
                        report.add("foreign_message", 1);
                        continue;
                    };
                    received += 1;
                    if sequence.arrive(seq, connection) != Arrival::Redelivered {
                        let latency = Duration::from_nanos(at.saturating_sub(sent_at));
                        push.record(latency);
                        if connection > 0 {
                            push_reconnected.record(latency);
                        }
                    }
                    if let Some(id) = frame["id"].as_str() {
                        pending.push(id.to_owned());
                    }
                    if pending.len() >= ACK_BATCH {
                        flush(&mut sink, &mut pending).await;
                    }
                }
                Some(Ok(_)) => {}
                _ => lost = true,
            },
            list = async { confirmed_rx.as_mut().expect("guarded").await }, if confirmed_rx.is_some() => {
                confirmed_rx = None;
                confirmed = Some(list.unwrap_or_default());
            }
            () = tokio::time::sleep_until(give_up) => break,
            // Last: only once nothing above is ready.
            () = std::future::ready(()), if !pending.is_empty() => flush(&mut sink, &mut pending).await,
        }
        if !lost {
            continue;
        }
        report.add("receiver_socket_lost", 1);
        let Some(route) = route.as_mut() else {
            break;
        };
        // Acks not flushed yet go out on the next socket: they name this
        // device's copies, whichever node takes them.
        let lost_at = Instant::now();
        let Some(ws) = route.reconnect(give_up).await else {
            break;
        };
        report.add("receiver_reconnects", 1);
        reconnect_latency.record(lost_at.elapsed());
        (sink, stream) = ws.split();
        connection += 1;
    }
    flush(&mut sink, &mut pending).await;
    let confirmed = match confirmed {
        Some(confirmed) => confirmed,
        // The sender's list arrives at the latest when it gives up, which is
        // when this device does: wait for it rather than judge without it.
        None => match confirmed_rx {
            Some(rx) => tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default(),
            None => Confirmed::default(),
        },
    };
    let missing_live = sequence.lost(&confirmed);
    if let Some(route) = route.as_mut() {
        report.add("missing_live", missing_live);
        if missing_live > 0 {
            let recovered = read_queue(
                route,
                &mut sequence,
                &confirmed,
                connection + 1,
                &mut report,
            )
            .await;
            report.add("recovered_from_queue", recovered);
        }
        report.set_latency("reconnect", &reconnect_latency);
        report.set_latency("push_reconnected", &push_reconnected);
    }
    let lost = sequence.lost(&confirmed);
    // Delivered but never confirmed: in flight when the sender lost its
    // socket, and stored all the same.
    let confirmed_delivered = confirmed.len() as u64 - lost;
    report.add("received", received);
    report.add("delivered", sequence.unique());
    report.add(
        "unconfirmed_delivered",
        sequence.unique().saturating_sub(confirmed_delivered),
    );
    report.add("lost", lost);
    report.add("duplicated", sequence.duplicates);
    report.add("redelivered", sequence.redelivered);
    report.add("out_of_order", sequence.out_of_order);
    report.set_latency("push", &push);
    if let Some(k) = position {
        report.add(&format!("device{k}_received"), received);
        report.add(&format!("device{k}_lost"), lost);
        report.add(&format!("device{k}_duplicated"), sequence.duplicates);
        report.add(&format!("device{k}_out_of_order"), sequence.out_of_order);
        report.set_latency(&format!("push_device{k}"), &push);
    }
    let _ = sink.close().await;
    report
}

/// The last look at a device's queue: one more socket (to the node it is
/// on, else the next), its backlog read up to `drained` and acked. Returns
/// how many confirmed messages turned up there that had never arrived:
/// stored, but not pushed live. Bounded by `FINAL_DRAIN`.
async fn read_queue(
    route: &mut Route,
    sequence: &mut Sequence,
    confirmed: &[u64],
    connection: u32,
    report: &mut Report,
) -> u64 {
    let until = tokio::time::Instant::now() + FINAL_DRAIN;
    let backlog = async {
        let mut ws = route.connect_until(until).await?;
        let backlog = client::until_drained(&mut ws).await.ok()?;
        Some((ws, backlog))
    };
    let Ok(Some((mut ws, backlog))) = tokio::time::timeout_at(until, backlog).await else {
        report.add("final_read_failed", 1);
        return 0;
    };
    let confirmed: std::collections::HashSet<u64> = confirmed.iter().copied().collect();
    let mut recovered = 0;
    for message in &backlog {
        let Some((_, seq)) = message["body"]
            .as_str()
            .and_then(unb64)
            .as_deref()
            .and_then(unstamp)
        else {
            continue;
        };
        if sequence.recover(seq, connection) && confirmed.contains(&seq) {
            recovered += 1;
        }
    }
    for chunk in backlog.chunks(ACK_FRAME_MAX) {
        let ids: Vec<&str> = chunk.iter().filter_map(|m| m["id"].as_str()).collect();
        let _ = client::send_text(&mut ws, &json!({ "type": "ack", "ids": ids })).await;
    }
    let _ = ws.close(None).await;
    recovered
}

async fn flush(sink: &mut futures_util::stream::SplitSink<Ws, Message>, pending: &mut Vec<String>) {
    if pending.is_empty() {
        return;
    }
    let frame = json!({ "type": "ack", "ids": pending });
    pending.clear();
    let _ = sink.send(Message::Text(frame.to_string().into())).await;
}
