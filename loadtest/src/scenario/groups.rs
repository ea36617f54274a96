//! `groups`: group messages (issue 27). G groups of M member accounts,
//! each account with D devices, every device online on its own socket.
//! Group messages go out at a total rate, each from a member's device 1 to
//! every other member's devices and to its own other devices (their sync
//! copies), in one of two ways:
//!
//! - the shared form of a multi-recipient send (`send_multi`): one shared
//!   body, and per device a key of [`KEY_BYTES`] (the size the client body
//!   format's sealed content key has);
//! - `--single`: as clients sent before multi-recipient sends, one `send`
//!   with an envelope per device to each other member, and one sync `send`
//!   to the sender's own account: M sends per group message.
//!
//! Every delivery is timed from the send time stamped in the body to its
//! `message` frame (push latency) and acked. A group message is confirmed
//! when its send(s) are answered `sent`; `deliveries_expected` is what the
//! confirmed ones owe. With `--no-ack` receivers read but never ack, so
//! every copy stays queued: run-group-benchmark.sh measures the database
//! bytes a group message then takes.
//!
//! Everything runs in this process (10,000 sockets at the defaults, half
//! the file limit), no worker processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::{CONNECT_CONCURRENCY, stamp, unstamp};
use crate::client::{self, Account, Api, Target, Ws, b64, unb64};
use crate::stats::{Latency, Report, now_nanos};
use crate::{cpu_ticks, rss_kib};

/// A sealed content key in the client body format's group messages:
/// version, nonce, tag, and the 64-byte key and hash.
const KEY_BYTES: usize = 1 + 24 + 16 + 64;
/// After the sending stops: time for the last answers and pushes.
const GRACE: Duration = Duration::from_secs(10);
/// USER_HZ, as `wakeups` reads it.
const TICKS_PER_SECOND: f64 = 100.0;

/// The command line of `groups`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 100)]
    pub groups: usize,
    /// Member accounts per group (each in one group only).
    #[arg(long, default_value_t = 50)]
    pub members: usize,
    /// Devices per member account, each on its own socket.
    #[arg(long, default_value_t = 2)]
    pub devices: usize,
    /// Group messages per second, all groups together.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long = "duration", default_value_t = 20)]
    pub duration_s: u64,
    /// Body size in bytes (at least 16).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Send each group message as single sends (one per member account and
    /// a sync send) instead of one multi-recipient send.
    #[arg(long)]
    pub single: bool,
    /// Receivers never ack: every copy stays queued.
    #[arg(long)]
    pub no_ack: bool,
    /// Sign the accounts up (into --token-cache) and stop.
    #[arg(long)]
    pub signup_only: bool,
}

/// Everything `main` has parsed that a run needs.
pub struct Common<'a> {
    pub api: Api,
    pub target: Target,
    pub pids: &'a [u32],
    pub prefix: &'a str,
    pub token_cache: Option<&'a std::path::Path>,
    pub signup_concurrency: usize,
}

/// One group's members: account ids and device counts.
struct Group {
    members: Vec<Uuid>,
}

/// What one socket measured.
#[derive(Default)]
struct Tally {
    deliveries: u64,
    duplicates: u64,
    push: Latency,
    sent: u64,
    confirmed: u64,
    send_to_sent: Latency,
    errors: std::collections::BTreeMap<String, u64>,
    sockets_lost: u64,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.deliveries += other.deliveries;
        self.duplicates += other.duplicates;
        self.push.merge(&other.push);
        self.sent += other.sent;
        self.confirmed += other.confirmed;
        self.send_to_sent.merge(&other.send_to_sent);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_insert(0) += n;
        }
        self.sockets_lost += other.sockets_lost;
    }
}

/// How a sending socket sends: who it is, its group, the pace.
#[derive(Clone)]
struct Sending {
    me: Uuid,
    device: u32,
    group: Arc<Group>,
    devices: usize,
    size: usize,
    single: bool,
    /// First tick, interval between its group messages, end.
    first: tokio::time::Instant,
    interval: Duration,
    deadline: tokio::time::Instant,
}

pub async fn main(args: &Args, common: Common<'_>) -> anyhow::Result<Value> {
    let Common {
        api,
        target,
        pids,
        prefix,
        token_cache,
        signup_concurrency,
    } = common;
    let setup_started = Instant::now();
    let count = args.groups.max(1) * args.members.max(2);
    let devices = args.devices.max(1);
    let (accounts, device_setup) = client::accounts_with_devices(
        &api,
        &format!("{prefix}-g-"),
        count,
        |_| devices,
        signup_concurrency,
        token_cache,
    )
    .await?;
    if args.signup_only {
        return Ok(json!({
            "scenario": "groups",
            "signup_only": true,
            "accounts": accounts.len(),
            "device_setup": device_setup,
            "setup_s": setup_started.elapsed().as_secs_f64(),
        }));
    }
    let members = args.members.max(2);
    let groups: Vec<Arc<Group>> = accounts
        .chunks(members)
        .map(|chunk| {
            Arc::new(Group {
                members: chunk.iter().map(|a| a.user_id).collect(),
            })
        })
        .collect();

    // Every device's socket, device 1 first for each account.
    let sockets: Vec<(usize, u32, anyhow::Result<Ws>)> =
        stream::iter(accounts.iter().enumerate().flat_map(|(n, account)| {
            sessions(account, devices)
                .into_iter()
                .map(move |(device, token)| (n, device, token))
        }))
        .map(|(n, device, token)| {
            let target = target.clone();
            async move {
                let ws = async {
                    let mut ws = client::connect(&target, None, &token)
                        .await
                        .map_err(|e| anyhow::anyhow!("{}: {e:?}", target.base))?;
                    client::until_drained(&mut ws).await?;
                    Ok(ws)
                }
                .await;
                (n, device, ws)
            }
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut failed = 0u64;
    let at_gate_ticks = pids.first().and_then(|&pid| cpu_ticks(pid));
    let rss_at_gate = pids.first().and_then(|&pid| rss_kib(pid));
    let gate = Instant::now();
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let deadline = start + Duration::from_secs(args.duration_s);
    // Member m of group g (global index m·G + g) sends every G·M / rate
    // seconds, offset by its index: the groups' messages interleave and
    // each group's senders take turns.
    let senders = count;
    let interval = Duration::from_secs_f64(senders as f64 / args.rate.max(0.001));
    let mut tasks = Vec::new();
    for (n, device, ws) in sockets {
        let ws = match ws {
            Ok(ws) => ws,
            Err(e) => {
                if failed == 0 {
                    eprintln!("socket setup failed: {e:#}");
                }
                failed += 1;
                continue;
            }
        };
        let (g, m) = (n / members, n % members);
        let sending = (device == 1).then(|| {
            let index = m * groups.len() + g;
            Sending {
                me: accounts[n].user_id,
                device,
                group: groups[g].clone(),
                devices,
                size: args.size.max(16),
                single: args.single,
                first: start + interval.mul_f64(index as f64 / senders as f64),
                interval,
                deadline,
            }
        });
        tasks.push(tokio::spawn(socket_loop(
            ws,
            sending,
            !args.no_ack,
            deadline + GRACE,
        )));
    }
    let mut total = Tally::default();
    for task in tasks {
        total.merge(task.await?);
    }
    let cpu_s = match (at_gate_ticks, pids.first().and_then(|&pid| cpu_ticks(pid))) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / TICKS_PER_SECOND),
        _ => None,
    };
    // What the confirmed group messages owe: every device of every other
    // member, and the sender's own other devices.
    let per_message = (members - 1) * devices + (devices - 1);
    let mut report = Report::default();
    report.set_latency("push", &total.push);
    Ok(json!({
        "scenario": "groups",
        "params": {
            "groups": groups.len(), "members": members, "devices": devices,
            "rate": args.rate, "duration_s": args.duration_s, "size": args.size.max(16),
            "form": if args.single { "single" } else { "shared" },
            "ack": !args.no_ack, "key_bytes": KEY_BYTES,
        },
        "setup": { "accounts": accounts.len(), "device_setup": device_setup,
                   "sockets_failed": failed, "setup_s": setup_started.elapsed().as_secs_f64() },
        "results": {
            "group_messages_sent": total.sent,
            "group_messages_confirmed": total.confirmed,
            "send_errors": total.errors,
            "deliveries": total.deliveries,
            "deliveries_expected": total.confirmed * per_message as u64,
            "duplicates": total.duplicates,
            "sockets_lost": total.sockets_lost,
            "push_latency": total.push.summary(),
            "push_latency_hist": total.push.encode(),
            "send_to_sent": total.send_to_sent.summary(),
            "deliveries_per_s": total.deliveries as f64 / args.duration_s.max(1) as f64,
            "server_cpu_s": cpu_s,
            "server_rss_kib_at_gate": rss_at_gate,
            "elapsed_s": gate.elapsed().as_secs_f64(),
        },
    }))
}

/// The first `count` devices' (device id, access token).
fn sessions(account: &Account, count: usize) -> Vec<(u32, String)> {
    std::iter::once((1, account.access.clone()))
        .chain(
            account
                .devices
                .iter()
                .map(|d| (d.device_id, d.access.clone())),
        )
        .take(count)
        .collect()
}

/// One socket: reads (timing, acking) and, for a sending device, sends its
/// group messages on its ticks until `deadline`, then waits for the last
/// answers until `give_up`.
async fn socket_loop(
    ws: Ws,
    sending: Option<Sending>,
    ack: bool,
    give_up: tokio::time::Instant,
) -> Tally {
    let (mut sink, mut stream) = ws.split();
    let mut tally = Tally::default();
    let mut seen = std::collections::HashSet::new();
    // ref → (written at, sends still unanswered)
    let mut in_flight: std::collections::HashMap<u64, (Instant, usize)> =
        std::collections::HashMap::new();
    let mut ticker = sending.as_ref().map(|s| {
        let mut t = tokio::time::interval_at(s.first, s.interval);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut seq = 0u64;
    loop {
        let sending_now = sending
            .as_ref()
            .is_some_and(|s| tokio::time::Instant::now() < s.deadline);
        let tick = async {
            match ticker.as_mut() {
                Some(t) if sending_now => {
                    t.tick().await;
                }
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tick => {
                let s = sending.as_ref().expect("a ticker only for senders");
                let frames = group_message(s, seq);
                let sends = frames.len();
                let mut lost = false;
                for frame in frames {
                    if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                        lost = true;
                        break;
                    }
                }
                if lost {
                    tally.sockets_lost += 1;
                    break;
                }
                in_flight.insert(seq, (Instant::now(), sends));
                seq += 1;
            }
            frame = stream.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(_)) => continue,
                    _ => {
                        tally.sockets_lost += 1;
                        break;
                    }
                };
                let frame: Value = serde_json::from_str(&text).unwrap_or_default();
                match frame["type"].as_str() {
                    Some("message") => {
                        let id = frame["id"].as_str().unwrap_or_default().to_owned();
                        if let Some((at, _)) = frame["body"].as_str().and_then(unb64).as_deref().and_then(unstamp) {
                            tally.push.record(Duration::from_nanos(now_nanos().saturating_sub(at)));
                        }
                        if seen.insert(id.clone()) {
                            tally.deliveries += 1;
                        } else {
                            tally.duplicates += 1;
                        }
                        if ack {
                            let frame = json!({"type": "ack", "ids": [id]});
                            if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                                tally.sockets_lost += 1;
                                break;
                            }
                        }
                    }
                    Some("sent") | Some("error") => {
                        let Some((group_seq, _)) = frame["ref"].as_str().and_then(parse_ref) else { continue };
                        if frame["type"] == "error" {
                            let code = frame["code"].as_str().unwrap_or("unknown").to_owned();
                            *tally.errors.entry(code).or_insert(0) += 1;
                            in_flight.remove(&group_seq);
                            continue;
                        }
                        if let Some((at, left)) = in_flight.get_mut(&group_seq) {
                            *left -= 1;
                            if *left == 0 {
                                tally.send_to_sent.record(at.elapsed());
                                tally.confirmed += 1;
                                in_flight.remove(&group_seq);
                            }
                        }
                    }
                    _ => {}
                }
            }
            () = tokio::time::sleep_until(give_up) => break,
        }
        let done_sending = sending
            .as_ref()
            .is_none_or(|s| tokio::time::Instant::now() >= s.deadline);
        if done_sending
            && in_flight.is_empty()
            && tokio::time::Instant::now() >= give_up - GRACE / 2
        {
            break;
        }
    }
    tally.sent = seq;
    let _ = sink.close().await;
    tally
}

/// `"<group seq>.<part>"`: a group message's sends share its sequence.
fn parse_ref(r: &str) -> Option<(u64, u32)> {
    let (seq, part) = r.split_once('.')?;
    Some((seq.parse().ok()?, part.parse().ok()?))
}

/// The frames of one group message: one `send_multi`, or (`single`) one
/// `send` per other member and a sync `send` to the sender's own account.
fn group_message(s: &Sending, seq: u64) -> Vec<Value> {
    let body = b64(&stamp(seq, s.size));
    let key = b64(&[0x4b; KEY_BYTES]);
    let others: Vec<Uuid> = s
        .group
        .members
        .iter()
        .copied()
        .filter(|m| *m != s.me)
        .collect();
    let all: Vec<u32> = (1..=s.devices as u32).collect();
    let own: Vec<u32> = all.iter().copied().filter(|d| *d != s.device).collect();
    let mut targets: Vec<(Uuid, &[u32])> = others.iter().map(|m| (*m, &all[..])).collect();
    if !own.is_empty() {
        targets.push((s.me, &own[..]));
    }
    if !s.single {
        let recipients: Vec<Value> = targets
            .iter()
            .map(|(to, devices)| {
                json!({"to": to, "keys": devices.iter().map(|d| json!({"device_id": d, "key": key})).collect::<Vec<_>>()})
            })
            .collect();
        return vec![json!({
            "type": "send_multi", "ref": format!("{seq}.0"),
            "shared": body, "recipients": recipients, "receipts": false,
        })];
    }
    targets
        .iter()
        .enumerate()
        .map(|(part, (to, devices))| {
            json!({
                "type": "send", "ref": format!("{seq}.{part}"), "to": to,
                "envelopes": devices.iter().map(|d| json!({"device_id": d, "body": body})).collect::<Vec<_>>(),
            })
        })
        .collect()
}
