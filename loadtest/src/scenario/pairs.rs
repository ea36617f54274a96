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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use serde_json::json;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::{CONNECT_CONCURRENCY, Sequence, slot, stamp, unstamp};
use crate::client::{self, Ws, b64, unb64};
use crate::stats::{Latency, Report, now_nanos};
use crate::{Fanout, Gate, Plan, Shard, Traffic};

/// Unconfirmed sends per sender when unthrottled: deep enough to keep the
/// committer's batches full, shallow enough to stay under the server's
/// per-connection limit of 256.
const WINDOW: usize = 128;
/// After the sending stops: time for the last confirmations and pushes.
const GRACE: Duration = Duration::from_secs(10);
/// Receivers ack in batches: every this often, or every `ACK_BATCH` ids.
const ACK_EVERY: Duration = Duration::from_millis(20);
const ACK_BATCH: usize = 200;

/// One pair's sockets: the sender's, and one per device of the receiver
/// (device id, socket), device 1 first.
struct Pair {
    sender: Ws,
    receivers: Vec<(u32, Ws)>,
    to: Uuid,
}

/// A sender's confirmed sequence numbers, shared by its receiving devices.
type Confirmed = Arc<Vec<u64>>;

pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    traffic: &Traffic,
    fanout: &Fanout,
) -> anyhow::Result<Report> {
    let (duration, size) = (traffic.duration(), traffic.body_size());
    let devices = fanout.devices();
    let mine: Vec<usize> = shard.indices(traffic.pairs);
    // A pair is 1 + devices sockets: keep the sockets in flight as before.
    let opened: Vec<anyhow::Result<Pair>> = stream::iter(mine)
        .map(|pair| async move { open_pair(plan, pair, devices).await })
        .buffer_unordered((CONNECT_CONCURRENCY / (1 + devices)).max(1))
        .collect()
        .await;
    let mut setup = Report::default();
    let mut ready = Vec::new();
    for pair in opened {
        match pair {
            Ok(pair) => ready.push(pair),
            Err(e) => {
                if setup.count("fail_pair_setup") == 0 {
                    eprintln!("pair setup failed: {e:#}");
                }
                setup.add("fail_pair_setup", 1);
            }
        }
    }
    setup.add("pairs_ready", ready.len() as u64);
    gate.pass(&setup).await;

    // Every sender paces itself to its share of the total rate.
    let interval = traffic.interval();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let tasks: Vec<_> = ready
        .into_iter()
        .map(
            |Pair {
                 sender,
                 receivers,
                 to,
             }| {
                let envelopes = fanout
                    .envelopes
                    .then(|| receivers.iter().map(|(id, _)| *id).collect::<Vec<_>>());
                // Per-device counters only with several devices: one device's
                // would repeat the totals.
                let named = devices > 1;
                let (confirmed_txs, receives): (Vec<_>, Vec<_>) = receivers
                    .into_iter()
                    .enumerate()
                    .map(|(k, (_, ws))| {
                        let (tx, rx) = oneshot::channel();
                        let position = named.then_some(k + 1);
                        (
                            tx,
                            tokio::spawn(receive_loop(ws, rx, deadline + GRACE, position)),
                        )
                    })
                    .unzip();
                let send = tokio::spawn(send_loop(
                    sender,
                    to,
                    envelopes,
                    interval,
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
    measured.set_seconds("sending", duration);
    measured.set_seconds("elapsed", started.elapsed());
    Ok(measured)
}

/// Sender of pair n is account 2n, its receiver account 2n + 1, whose
/// first `devices` devices each open a socket. The sender and device 1 use
/// slot 2n's node and source address; device k uses slot 2n + k - 1's, so
/// with several `--url` a recipient's devices are spread over the nodes.
/// Every socket drains and acks any backlog left by an earlier run.
async fn open_pair(plan: &Plan, pair: usize, devices: usize) -> anyhow::Result<Pair> {
    let (sender, target, source) = slot(plan, 2 * pair);
    let (receiver, _, _) = slot(plan, 2 * pair + 1);
    let sessions = receiver.sessions(devices)?;
    let mut sender_ws = client::connect(target, source, &sender.access)
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut receivers = Vec::with_capacity(devices);
    for (k, (device_id, token)) in sessions.into_iter().enumerate() {
        let (_, target, source) = slot(plan, 2 * pair + k);
        let ws = client::connect(target, source, token)
            .await
            .map_err(|e| anyhow::anyhow!("device {device_id}: {e:?}"))?;
        receivers.push((device_id, ws));
    }
    client::until_drained(&mut sender_ws).await?;
    for (device_id, ws) in &mut receivers {
        let (ready, stale) = client::ready_and_backlog(ws).await?;
        if let Some(named) = ready["device_id"].as_u64()
            && named != u64::from(*device_id)
        {
            anyhow::bail!("device {device_id}'s socket is ready as device {named}");
        }
        for chunk in stale.chunks(500) {
            let ids: Vec<&str> = chunk.iter().filter_map(|m| m["id"].as_str()).collect();
            client::send_text(ws, &json!({ "type": "ack", "ids": ids })).await?;
        }
    }
    Ok(Pair {
        sender: sender_ws,
        receivers,
        to: receiver.user_id,
    })
}

/// Sends to `to` until `deadline`, then waits (until the grace period ends)
/// for the last confirmations, and hands the confirmed set to every
/// receiving device. With `envelopes`, each send carries one envelope per
/// listed device (the same stamped body) instead of one `body`.
async fn send_loop(
    ws: Ws,
    to: Uuid,
    envelopes: Option<Vec<u32>>,
    interval: Option<Duration>,
    deadline: tokio::time::Instant,
    size: usize,
    confirmed_txs: Vec<oneshot::Sender<Confirmed>>,
) -> Report {
    let (mut sink, mut stream) = ws.split();
    let mut ticker = tokio::time::interval(interval.unwrap_or(Duration::from_secs(3600)));
    // Burst: a late tick is made up, so the offered rate is the asked rate.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let give_up = deadline + GRACE;
    let mut report = Report::default();
    let mut sent_latency = Latency::default();
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut confirmed = Vec::new();
    let mut receipts = 0u64;
    let mut seq = 0u64;
    loop {
        let sending = tokio::time::Instant::now() < deadline;
        if !sending && in_flight.is_empty() {
            break;
        }
        let can_send = sending && in_flight.len() < WINDOW;
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
                    }
                    Some(Ok(_)) => {}
                    _ => {
                        report.add("sender_socket_lost", 1);
                        break;
                    }
                }
                continue;
            }
            () = tokio::time::sleep_until(give_up) => break,
        }
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
        if sink
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            report.add("sender_socket_lost", 1);
            break;
        }
        in_flight.insert(seq, Instant::now());
        seq += 1;
    }
    report.add("sent", seq);
    report.add("confirmed", confirmed.len() as u64);
    report.add("unconfirmed", in_flight.len() as u64);
    report.add("receipts_seen", receipts);
    report.set_latency("send_to_sent", &sent_latency);
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
async fn receive_loop(
    ws: Ws,
    confirmed_rx: oneshot::Receiver<Confirmed>,
    give_up: tokio::time::Instant,
    position: Option<usize>,
) -> Report {
    let (mut sink, mut stream) = ws.split();
    let mut push = Latency::default();
    let mut sequence = Sequence::default();
    let mut pending: Vec<String> = Vec::new();
    let mut ack_ticker = tokio::time::interval(ACK_EVERY);
    let mut confirmed_rx = Some(confirmed_rx);
    let mut confirmed: Option<Confirmed> = None;
    let mut report = Report::default();
    let mut received = 0u64;
    loop {
        if let Some(confirmed) = &confirmed
            && sequence.unique() >= confirmed.len() as u64
        {
            break;
        }
        tokio::select! {
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
                    push.record(Duration::from_nanos(at.saturating_sub(sent_at)));
                    sequence.observe(seq);
                    if let Some(id) = frame["id"].as_str() {
                        pending.push(id.to_owned());
                    }
                    if pending.len() >= ACK_BATCH {
                        flush(&mut sink, &mut pending).await;
                    }
                }
                Some(Ok(_)) => {}
                _ => {
                    report.add("receiver_socket_lost", 1);
                    break;
                }
            },
            _ = ack_ticker.tick() => flush(&mut sink, &mut pending).await,
            list = async { confirmed_rx.as_mut().expect("guarded").await }, if confirmed_rx.is_some() => {
                confirmed_rx = None;
                confirmed = Some(list.unwrap_or_default());
            }
            () = tokio::time::sleep_until(give_up) => break,
        }
    }
    flush(&mut sink, &mut pending).await;
    let confirmed = confirmed.unwrap_or_default();
    let lost = sequence.lost(&confirmed);
    report.add("received", received);
    report.add("delivered", sequence.unique());
    report.add("lost", lost);
    report.add("duplicated", sequence.duplicates);
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

async fn flush(sink: &mut futures_util::stream::SplitSink<Ws, Message>, pending: &mut Vec<String>) {
    if pending.is_empty() {
        return;
    }
    let frame = json!({ "type": "ack", "ids": pending });
    pending.clear();
    let _ = sink.send(Message::Text(frame.to_string().into())).await;
}
