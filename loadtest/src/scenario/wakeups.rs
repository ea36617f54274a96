//! `wakeups`: online senders send at a total rate to recipients that are
//! all offline (signed up, never connected), each with a Web Push target
//! pointing at a fake push service in this process (or with none, for the
//! baseline), and the run measures what issue 26 promises: sends answered
//! as fast with targets as without, and wake-ups coalesced (one per device
//! per cooldown, not one per message).
//!
//! The parent ([`main`]) signs up the senders and the recipients, starts
//! the fake ([`crate::fakepush`]), gives every recipient's device 1 a
//! target (`PUT /v1/devices/1/push`) or removes it (`--no-targets`), and
//! at the gate reads the server's wake-up counters and CPU time. Shards
//! ([`run`]) open the senders' sockets and send: sender s's k-th message
//! goes to recipient (s + k·M) mod N, so every recipient gets its share,
//! evenly over the run. Each send's latency is the time from writing its
//! `send` frame to reading its `sent` (the message committed: with every
//! recipient offline, nothing is elided). After the sending the parent
//! waits for the fake to fall quiet, then reads the counters again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::{CONNECT_CONCURRENCY, slot, stamp};
use crate::client::{self, Account, Api, Ws, b64};
use crate::fakepush::{Counts, FakePush};
use crate::metrics::Wakeups;
use crate::stats::{Latency, Report};
use crate::{Gate, Plan, Shard, Spec, cpu_ticks, execute, rss_kib};

/// Unconfirmed sends per sender: as `pairs`, under the server's
/// per-connection limit of 256.
const WINDOW: usize = 128;
/// After the sending stops: time for the last `sent` frames.
const GRACE: Duration = Duration::from_secs(10);
/// Target registrations in flight during the set-up: each is a small
/// write, and the server's pool has room for this many at once.
const SETUP_CONCURRENCY: usize = 32;
/// The fake counts as quiet once no wake-up arrived for this long.
const QUIET: Duration = Duration::from_secs(2);
/// USER_HZ: the unit of utime and stime in /proc/PID/stat, 100 on every
/// Linux architecture the server runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// The command line of `wakeups`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Sender accounts, each holding one socket.
    #[arg(long, default_value_t = 1_000)]
    pub senders: usize,
    /// Recipient accounts, offline: one device each, never connected.
    #[arg(long, default_value_t = 10_000)]
    pub recipients: usize,
    /// Total messages per second.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds of sending.
    #[arg(long = "duration", default_value_t = 20)]
    pub duration_s: u64,
    /// Body size in bytes (at least 16).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Send with `"urgent": false` (non-urgent wake-ups, at low priority
    /// and at most one per device per quiet interval).
    #[arg(long)]
    pub not_urgent: bool,
    /// The baseline: remove every recipient's target instead of setting
    /// one (`DELETE /v1/devices/1/push`); the load is otherwise the same.
    #[arg(long)]
    pub no_targets: bool,
    /// Where the fake Web Push service listens; the server must allow it
    /// (`SEALPOST_PUSH_ALLOW_HOSTS=127.0.0.1:PORT`). Port 0 picks one,
    /// printed on stderr.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub push_listen: SocketAddr,
    /// The server's Prometheus endpoint, scraped at the gate and after the
    /// run for `sealpost_wakeups_total` by outcome (repeat per node).
    #[arg(long = "metrics-url")]
    pub metrics_urls: Vec<String>,
    /// After the sending, at most this many seconds waiting for the last
    /// wake-ups to reach the fake.
    #[arg(long, default_value_t = 30)]
    pub settle: u64,
    /// Sign the accounts up (into --token-cache) and stop: run-wakeup-
    /// benchmark.sh does this once, then copies the database for each run.
    #[arg(long)]
    pub signup_only: bool,
}

/// What a shard needs: the load, and who the recipients are (the senders
/// are the plan's accounts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Load {
    pub rate: u64,
    pub duration_s: u64,
    pub size: usize,
    pub urgent: bool,
    pub recipients: Vec<Uuid>,
}

/// Everything `main` has parsed that a run needs.
pub struct Common<'a> {
    pub api: Api,
    pub plan: Plan,
    pub workers: usize,
    pub pids: &'a [u32],
    pub prefix: &'a str,
    pub token_cache: Option<&'a std::path::Path>,
    pub signup_concurrency: usize,
}

/// The parent: set-up, the run across `workers`, the figures. Returns the
/// JSON result.
pub async fn main(args: &Args, common: Common<'_>) -> anyhow::Result<Value> {
    let Common {
        api,
        mut plan,
        workers,
        pids,
        prefix,
        token_cache,
        signup_concurrency,
    } = common;
    let setup_started = Instant::now();
    let senders = client::accounts(
        &api,
        &format!("{prefix}-ws-"),
        args.senders.max(1),
        signup_concurrency,
        token_cache,
    )
    .await?;
    let recipients = client::accounts(
        &api,
        &format!("{prefix}-wr-"),
        args.recipients.max(1),
        signup_concurrency,
        token_cache,
    )
    .await?;
    if args.signup_only {
        return Ok(json!({
            "scenario": "wakeups",
            "signup_only": true,
            "senders": senders.len(),
            "recipients": recipients.len(),
            "setup_s": setup_started.elapsed().as_secs_f64(),
        }));
    }

    let fake = FakePush::start(args.push_listen).await?;
    eprintln!(
        "fake Web Push service on {} (the server must allow it: SEALPOST_PUSH_ALLOW_HOSTS={})",
        fake.origin(),
        fake.addr()
    );
    let (vapid_status, _) = api
        .call(|h| h.get(format!("{}/v1/push/vapid", api.target.base)))
        .await?;
    let registered = register(&api, &fake, &recipients, !args.no_targets).await?;
    let listed = listed_push(&api, &recipients[0]).await;
    if !args.no_targets && listed.is_null() {
        anyhow::bail!("the first recipient's target is not listed by GET /v1/devices");
    }

    let load = Load {
        rate: args.rate,
        duration_s: args.duration_s,
        size: args.size.max(16),
        urgent: !args.not_urgent,
        recipients: recipients.iter().map(|a| a.user_id).collect(),
    };
    plan.accounts = senders;
    plan.spec = Spec::Wakeups(load);
    let params = json!({
        "senders": args.senders,
        "recipients": args.recipients,
        "rate": args.rate,
        "duration_s": args.duration_s,
        "size": args.size.max(16),
        "urgent": !args.not_urgent,
        "targets": !args.no_targets,
        "fake_push": fake.origin(),
        "metrics_urls": args.metrics_urls,
        "vapid_status": vapid_status.as_u16(),
        "first_recipient_push": listed,
        "setup": {
            "targets_registered": registered.put,
            "targets_removed": registered.deleted,
            "no_push_api": registered.missing,
            "setup_s": setup_started.elapsed().as_secs_f64(),
        },
    });

    // At the gate, with every socket open: the counters the run is
    // measured from.
    let at_gate: Arc<std::sync::Mutex<Option<Snapshot>>> = Arc::default();
    let between = {
        let (at_gate, urls, pids) = (at_gate.clone(), args.metrics_urls.clone(), pids.to_vec());
        Box::pin(async move {
            let snapshot = Snapshot::take(&urls, &pids).await;
            *at_gate.lock().unwrap() = Some(snapshot);
        })
    };
    let report = execute(&plan, workers, between).await?;
    let at_end = Snapshot::take(&[], pids).await;
    let settled = settle(&fake, Duration::from_secs(args.settle)).await;
    let after = Snapshot::take(&args.metrics_urls, &[]).await;
    let before = at_gate.lock().unwrap().take();
    Ok(summarise(
        params, workers, &report, &fake, settled, before, at_end, after,
    ))
}

/// How the targets set-up went.
struct Registered {
    put: u64,
    deleted: u64,
    /// `DELETE` answered 404 or 405: a server without the push API, so
    /// without targets (the baseline can run against one).
    missing: u64,
}

/// Gives each recipient's device 1 a fresh subscription of `fake`, or
/// (without `targets`) removes any target it has.
async fn register(
    api: &Api,
    fake: &FakePush,
    recipients: &[Account],
    targets: bool,
) -> anyhow::Result<Registered> {
    let bar = client::progress(
        recipients.len() as u64,
        if targets { "targets" } else { "no targets" },
    );
    let answers: Vec<anyhow::Result<StatusCode>> = stream::iter(recipients)
        .map(|account| {
            let subscription = targets.then(|| fake.subscribe());
            let (api, bar) = (api.clone(), bar.clone());
            async move {
                let url = format!("{}/v1/devices/1/push", api.target.base);
                let (status, body) = match &subscription {
                    Some(sub) => {
                        api.call(|h| h.put(&url).bearer_auth(&account.access).json(sub))
                            .await?
                    }
                    None => {
                        api.call(|h| h.delete(&url).bearer_auth(&account.access))
                            .await?
                    }
                };
                bar.inc(1);
                let fine = match subscription {
                    Some(_) => status == StatusCode::OK,
                    None => matches!(
                        status,
                        StatusCode::NO_CONTENT | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED
                    ),
                };
                if !fine {
                    anyhow::bail!(
                        "{} {url}: {status} {body} (is Web Push on, SEALPOST_VAPID_SUBJECT, and the fake allowed, SEALPOST_PUSH_ALLOW_HOSTS={}?)",
                        if targets { "PUT" } else { "DELETE" },
                        fake.addr()
                    );
                }
                Ok(status)
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    bar.finish_and_clear();
    let mut registered = Registered {
        put: 0,
        deleted: 0,
        missing: 0,
    };
    for answer in answers {
        match answer? {
            StatusCode::OK => registered.put += 1,
            StatusCode::NO_CONTENT => registered.deleted += 1,
            _ => registered.missing += 1,
        }
    }
    Ok(registered)
}

/// Device 1's `push` field in `GET /v1/devices` (`null` when none, or
/// when the server predates targets).
async fn listed_push(api: &Api, account: &Account) -> Value {
    let url = format!("{}/v1/devices", api.target.base);
    match api.call(|h| h.get(&url).bearer_auth(&account.access)).await {
        Ok((StatusCode::OK, listing)) => listing["devices"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["device_id"] == 1))
            .map(|d| d["push"].clone())
            .unwrap_or(Value::Null),
        _ => Value::Null,
    }
}

/// The servers' wake-up counters and CPU time, this process's CPU time,
/// and the load average, at one moment.
struct Snapshot {
    at: Instant,
    wakeups: Option<Wakeups>,
    /// Whether the servers export wake-up metrics at all.
    wakeup_metrics: bool,
    server_ticks: Option<u64>,
    own_ticks: Option<u64>,
    server_rss_kib: Option<u64>,
    loadavg: Option<String>,
}

impl Snapshot {
    async fn take(metrics_urls: &[String], pids: &[u32]) -> Self {
        let (wakeups, wakeup_metrics) = if metrics_urls.is_empty() {
            (None, false)
        } else {
            match Wakeups::scrape(metrics_urls).await {
                Ok((w, present)) => (Some(w), present),
                Err(e) => {
                    eprintln!("no wake-up metrics: {e:#}");
                    (None, false)
                }
            }
        };
        Self {
            at: Instant::now(),
            wakeups,
            wakeup_metrics,
            server_ticks: (!pids.is_empty())
                .then(|| pids.iter().map(|&p| cpu_ticks(p)).sum::<Option<u64>>())
                .flatten(),
            own_ticks: cpu_ticks(std::process::id()),
            server_rss_kib: (!pids.is_empty())
                .then(|| pids.iter().map(|&p| rss_kib(p)).sum::<Option<u64>>())
                .flatten(),
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .ok()
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        }
    }
}

/// Waits until the fake has had no request for [`QUIET`], at most
/// `limit`; returns the seconds waited.
async fn settle(fake: &FakePush, limit: Duration) -> f64 {
    let started = Instant::now();
    let mut last = fake.counts().requests;
    let mut quiet_since = Instant::now();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = fake.counts().requests;
        if now != last {
            last = now;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= QUIET {
            break;
        }
    }
    started.elapsed().as_secs_f64()
}

#[allow(clippy::too_many_arguments)]
fn summarise(
    params: Value,
    workers: usize,
    report: &Report,
    fake: &FakePush,
    settle_s: f64,
    before: Option<Snapshot>,
    at_end: Snapshot,
    after: Snapshot,
) -> Value {
    let confirmed = report.count("confirmed");
    let sending = report.seconds("sending");
    let counts: Counts = fake.counts();
    let recipients = params["recipients"].as_u64().unwrap_or(1).max(1);
    let send_errors: BTreeMap<&str, u64> = report
        .counters
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("send_error_")?, *v)))
        .collect();
    // Send p99 second by second: a wake-up burst shows where it lands.
    let by_second: Vec<Value> = (0..params["duration_s"].as_u64().unwrap_or(0))
        .map(|s| {
            let latency = report.latency(&format!("send_s{s:03}"));
            json!({
                "second": s,
                "sends": latency.count(),
                "p99_ms": (latency.count() > 0).then(|| latency.quantile_ms(0.99)),
            })
        })
        .collect();
    let cpu = |from: Option<u64>, to: Option<u64>, start: Instant, end: Instant| match (from, to) {
        (Some(a), Some(b)) => {
            let cpu_s = b.saturating_sub(a) as f64 / TICKS_PER_SECOND;
            let wall_s = end.duration_since(start).as_secs_f64();
            json!({ "cpu_s": cpu_s, "wall_s": wall_s, "cores": cpu_s / wall_s.max(1e-9) })
        }
        _ => Value::Null,
    };
    let (server_cpu, own_cpu, server_wakeups, rss_before, loadavg_start) = match &before {
        Some(b) => (
            cpu(b.server_ticks, at_end.server_ticks, b.at, at_end.at),
            cpu(b.own_ticks, at_end.own_ticks, b.at, at_end.at),
            match (&b.wakeups, &after.wakeups) {
                (Some(x), Some(y)) if b.wakeup_metrics || after.wakeup_metrics => x.since(y),
                _ => Value::Null,
            },
            b.server_rss_kib,
            b.loadavg.clone(),
        ),
        None => (Value::Null, Value::Null, Value::Null, None, None),
    };
    let spread =
        (counts.first_at_ns > 0).then(|| (counts.last_at_ns - counts.first_at_ns) as f64 / 1e9);
    json!({
        "scenario": "wakeups",
        "params": params,
        "workers": workers,
        "counters": report.counters,
        "results": {
            "senders_ready": report.count("senders_ready"),
            "sent": report.count("sent"),
            "confirmed": confirmed,
            "achieved_msgs_per_s": if sending > 0.0 { (confirmed as f64 / sending).round() } else { 0.0 },
            "send_errors": send_errors,
            "unconfirmed": report.count("unconfirmed"),
            "send_latency": report.latency("send_to_sent").summary(),
            "send_latency_hist": report.latency("send_to_sent").encode(),
            "send_p99_by_second": by_second,
            "generator_lag": report.latency("generator_lag").summary(),
            "messages_per_recipient": confirmed as f64 / recipients as f64,
            "wakeups_sent": counts.accepted,
            // Messages that made no wake-up of their own.
            "coalesced_fraction": (confirmed > 0)
                .then(|| 1.0 - counts.accepted as f64 / confirmed as f64),
            "wakeups_per_recipient_max": counts.max_per_subscription,
            "wakeup_spread_s": spread,
            "fake_push": counts,
            "server_wakeups": server_wakeups,
            "settle_s": settle_s,
            "server_cpu": server_cpu,
            "loadtest_cpu": own_cpu,
            "server_rss_kib": { "at_gate": rss_before, "at_end": at_end.server_rss_kib },
            "loadavg_start": loadavg_start,
            "loadavg_end": at_end.loadavg,
        },
    })
}

/// One shard: opens its senders' sockets, passes the gate, sends.
pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    load: &Load,
) -> anyhow::Result<Report> {
    let senders = plan.accounts.len();
    let mine = shard.indices(senders);
    let opened: Vec<(usize, anyhow::Result<Ws>)> = stream::iter(mine)
        .map(|n| async move {
            let (account, target, source) = slot(plan, n);
            let ws = async {
                let mut ws = client::connect(target, source, &account.access)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e:?}", target.base))?;
                client::until_drained(&mut ws).await?;
                Ok(ws)
            }
            .await;
            (n, ws)
        })
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let opened = opened.into_iter().map(|(n, ws)| ws.map(|ws| (n, ws)));
    let (ready, setup) = super::ready("sender", opened);
    gate.pass(&setup).await;

    // Each sender paces itself to its share of the total rate, offset by
    // n/M of its interval, as `pairs` senders are.
    let interval = Duration::from_secs_f64(senders as f64 / load.rate.max(1) as f64);
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(load.duration_s);
    let recipients: Arc<[Uuid]> = load.recipients.clone().into();
    let lag = tokio::spawn(super::pairs::lag_probe(deadline));
    let tasks: Vec<_> = ready
        .into_iter()
        .map(|(n, ws)| {
            let first_tick = start + interval * n as u32 / senders as u32;
            tokio::spawn(send_loop(
                ws,
                n,
                senders,
                recipients.clone(),
                interval,
                (start, first_tick, deadline),
                load.size,
                load.urgent,
            ))
        })
        .collect();
    // Merged here, histogram by histogram: one Report per sender would
    // re-encode every per-second histogram at each of a thousand merges.
    let mut total = Sender::default();
    for task in tasks {
        total.merge(task.await?);
    }
    let mut measured = Report::default();
    measured.add("sent", total.sent);
    measured.add("confirmed", total.confirmed);
    measured.add("unconfirmed", total.sent - total.confirmed);
    measured.add("sender_socket_lost", total.sockets_lost);
    for (code, n) in &total.errors {
        measured.add(&format!("send_error_{code}"), *n);
    }
    measured.set_latency("send_to_sent", &total.latency);
    for (second, latency) in total.by_second.iter().enumerate() {
        if latency.count() > 0 {
            measured.set_latency(&format!("send_s{second:03}"), latency);
        }
    }
    measured.set_latency("generator_lag", &lag.await?);
    measured.set_seconds("sending", Duration::from_secs(load.duration_s));
    measured.set_seconds("elapsed", started.elapsed());
    Ok(measured)
}

/// What one sender measured.
#[derive(Default)]
struct Sender {
    sent: u64,
    confirmed: u64,
    sockets_lost: u64,
    /// Sends answered with an error, by its code.
    errors: BTreeMap<String, u64>,
    /// Send to `sent`.
    latency: Latency,
    /// The same by the second of the run the send was written in.
    by_second: Vec<Latency>,
}

impl Sender {
    fn merge(&mut self, other: Sender) {
        self.sent += other.sent;
        self.confirmed += other.confirmed;
        self.sockets_lost += other.sockets_lost;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_insert(0) += n;
        }
        self.latency.merge(&other.latency);
        if self.by_second.len() < other.by_second.len() {
            self.by_second
                .resize_with(other.by_second.len(), Latency::default);
        }
        for (mine, theirs) in self.by_second.iter_mut().zip(&other.by_second) {
            mine.merge(theirs);
        }
    }
}

/// Sender `n` of `senders`: its k-th message goes to recipient
/// (n + k·senders) mod N, until `deadline`; then it waits (up to
/// [`GRACE`]) for the last `sent` frames.
#[allow(clippy::too_many_arguments)]
async fn send_loop(
    ws: Ws,
    n: usize,
    senders: usize,
    recipients: Arc<[Uuid]>,
    interval: Duration,
    (start, first_tick, deadline): (
        tokio::time::Instant,
        tokio::time::Instant,
        tokio::time::Instant,
    ),
    size: usize,
    urgent: bool,
) -> Sender {
    let (mut sink, mut stream) = ws.split();
    let mut ticker = tokio::time::interval_at(first_tick, interval);
    // Burst: a late tick is made up, so the offered rate is the asked rate.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let give_up = deadline + GRACE;
    let mut out = Sender::default();
    // ref → (sent at, second of the run it was sent in)
    let mut in_flight: std::collections::HashMap<u64, (Instant, usize)> =
        std::collections::HashMap::new();
    let mut seq = 0u64;
    loop {
        let sending = tokio::time::Instant::now() < deadline;
        if !sending && in_flight.is_empty() {
            break;
        }
        tokio::select! {
            _ = ticker.tick(), if sending && in_flight.len() < WINDOW => {}
            frame = stream.next() => {
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        let frame: Value = serde_json::from_str(&text).unwrap_or_default();
                        let Some(r) = frame["ref"].as_str().and_then(|r| r.parse::<u64>().ok()) else { continue };
                        let Some((at, second)) = in_flight.remove(&r) else { continue };
                        if frame["type"] == "sent" {
                            let took = at.elapsed();
                            out.latency.record(took);
                            if out.by_second.len() <= second {
                                out.by_second.resize_with(second + 1, Latency::default);
                            }
                            out.by_second[second].record(took);
                            out.confirmed += 1;
                        } else {
                            let code = frame["code"].as_str().unwrap_or("unknown").to_owned();
                            *out.errors.entry(code).or_insert(0) += 1;
                        }
                        continue;
                    }
                    Some(Ok(_)) => continue,
                    _ => {
                        out.sockets_lost += 1;
                        break;
                    }
                }
            }
            () = tokio::time::sleep_until(give_up) => break,
        }
        let to = recipients[(n + seq as usize * senders) % recipients.len()];
        let mut frame = json!({
            "type": "send",
            "ref": seq.to_string(),
            "to": to,
            "body": b64(&stamp(seq, size)),
        });
        if !urgent {
            frame["urgent"] = json!(false);
        }
        // A tick due just before the deadline may fire just after it: it
        // counts in the last second.
        let last = deadline.duration_since(start).as_secs().max(1) as usize - 1;
        let second =
            (tokio::time::Instant::now().duration_since(start).as_secs() as usize).min(last);
        let r = seq;
        seq += 1;
        if sink
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            out.sockets_lost += 1;
            break;
        }
        in_flight.insert(r, (Instant::now(), second));
    }
    out.sent = seq;
    let _ = sink.close().await;
    out
}
