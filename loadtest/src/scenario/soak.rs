//! `soak`: mixed traffic against one server for a long time, to see whether
//! its memory and open files stay flat. Each client is an actor holding one
//! account's socket; one driver per shard gives them work at the configured
//! rates: sends (over the socket, some over REST) to a random other client,
//! socket reconnects (after a token refresh), logouts and logouts-all (the
//! server closes the socket; the client logs in again and reconnects), and
//! sign-ups of new accounts that join the traffic. Every message answered
//! `sent` or `201` must reach its recipient, live or in a backlog: at the
//! end every client reconnects once and reads its queue, and what is still
//! missing is **lost**. The server's memory and file descriptors are
//! sampled by the parent (see `main.rs`), not here.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use super::{slot, stamp};
use crate::client::{self, Account, Api, Target, b64};
use crate::stats::Report;
use crate::{Gate, Plan, Shard, Soak};

/// Commands a client's queue holds: a few seconds of its share of the
/// sends at the default rates. A full queue (a client stuck reconnecting
/// or logging in) skips the command and counts it.
const COMMANDS: usize = 16;
/// Acks go out when this many are pending, or every [`ACK_EVERY`].
const ACK_BATCH: usize = 200;
const ACK_EVERY: Duration = Duration::from_millis(100);
/// How long anything a client waits for may take: a connect with its
/// backlog, the server's close after a logout, the final read.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// After the traffic stops: for in-flight sends to be answered and their
/// pushes to land, and for clients between sessions to come back.
const GRACE: Duration = Duration::from_secs(5);
/// Reconnect backoff after a failed connect.
const BACKOFF: Duration = Duration::from_millis(500);
/// A client that cannot connect for this long gives up (counted).
const GIVE_UP: Duration = Duration::from_secs(120);

enum Command {
    Send {
        to: Uuid,
        rest: bool,
    },
    Reconnect,
    Logout {
        all: bool,
    },
    /// Stop, reconnect once to read what is queued, then report done.
    Finish(oneshot::Sender<()>),
}

/// What a shard's clients confirmed and received, by message id.
#[derive(Default)]
struct Book {
    confirmed: HashSet<u128>,
    received: HashSet<u128>,
    report: Report,
}

type Shared = Arc<Mutex<Book>>;

fn count(book: &Shared, name: &str) {
    book.lock().unwrap().report.add(name, 1);
}

struct Client {
    api: Api,
    target: Target,
    source: Option<IpAddr>,
    account: Account,
    book: Shared,
    size: usize,
    seq: u64,
}

/// A client's handle, kept by the driver.
struct Handle {
    user_id: Uuid,
    commands: mpsc::Sender<Command>,
}

pub async fn run(
    plan: &Plan,
    shard: Shard,
    gate: &mut Gate,
    soak: &Soak,
) -> anyhow::Result<Report> {
    let target = plan.targets[0].clone();
    let api = Api::new(target.clone());
    let book = Shared::default();
    let mut setup = Report::default();
    let mut pool = Vec::new();
    let mut ups = Vec::new();
    for n in shard.indices(soak.clients) {
        let (account, _, source) = slot(plan, n);
        let client = Client {
            api: api.clone(),
            target: target.clone(),
            source,
            account: account.clone(),
            book: book.clone(),
            size: soak.size.max(16),
            seq: 0,
        };
        let (handle, up) = spawn(client);
        pool.push(handle);
        ups.push(up);
    }
    for up in ups {
        match tokio::time::timeout(GIVE_UP, up).await {
            Ok(Ok(true)) => setup.add("ready", 1),
            _ => setup.add("fail_first_connect", 1),
        }
    }
    gate.pass(&setup).await;

    let started = Instant::now();
    drive(&api, &target, &book, &mut pool, soak, shard).await;
    let sending = started.elapsed();
    tokio::time::sleep(GRACE).await;
    let mut finished = Vec::new();
    for handle in &pool {
        let (tx, rx) = oneshot::channel();
        if handle.commands.send(Command::Finish(tx)).await.is_ok() {
            finished.push(rx);
        }
    }
    for rx in finished {
        if tokio::time::timeout(STEP_TIMEOUT * 2, rx).await.is_err() {
            count(&book, "error_final_read_timeout");
        }
    }

    let mut book = book.lock().unwrap();
    let lost = book.confirmed.difference(&book.received).count() as u64;
    let (confirmed, received) = (book.confirmed.len() as u64, book.received.len() as u64);
    let report = &mut book.report;
    report.add("confirmed", confirmed);
    report.add("received_unique", received);
    report.add("lost", lost);
    report.add("clients_end", pool.len() as u64);
    report.set_seconds("sending", sending);
    Ok(std::mem::take(report))
}

/// Starts a client's actor; the receiver says whether its first connect
/// succeeded.
fn spawn(client: Client) -> (Handle, oneshot::Receiver<bool>) {
    let (tx, rx) = mpsc::channel(COMMANDS);
    let (up_tx, up_rx) = oneshot::channel();
    let user_id = client.account.user_id;
    tokio::spawn(client.actor(rx, up_tx));
    (
        Handle {
            user_id,
            commands: tx,
        },
        up_rx,
    )
}

/// Hands out the work at the configured rates until the duration is up.
async fn drive(
    api: &Api,
    target: &Target,
    book: &Shared,
    pool: &mut Vec<Handle>,
    soak: &Soak,
    shard: Shard,
) {
    let every = |secs: u64| {
        let period = Duration::from_secs(secs.max(1));
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
        (secs > 0, interval)
    };
    // This shard's share of the rate.
    let share = (soak.rate / shard.count.max(1) as f64).max(0.001);
    let mut sends = tokio::time::interval(Duration::from_secs_f64(1.0 / share));
    sends.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (reconnect_on, mut reconnects) = every(soak.reconnect_every);
    let (signup_on, mut signups) = every(soak.signup_every);
    let (logout_on, mut logouts) = every(soak.logout_every);
    let (logout_all_on, mut logout_alls) = every(soak.logout_all_every);
    let (joined_tx, mut joined) = mpsc::channel::<Handle>(4);
    // One sign-up at a time: a slow one skips the next tick, so the
    // hashing never piles up.
    let mut signing_up = false;
    let mut signed = 0u64;
    let deadline = tokio::time::sleep(soak.duration());
    tokio::pin!(deadline);
    let pick = |pool: &[Handle]| rand::rng().random_range(0..pool.len());
    let order = |book: &Shared, handle: &Handle, command: Command, name: &str| {
        if handle.commands.try_send(command).is_err() {
            count(book, &format!("skipped_{name}_busy"));
        }
    };
    loop {
        tokio::select! {
            () = &mut deadline => break,
            _ = sends.tick(), if pool.len() >= 2 => {
                let from = pick(pool);
                let mut to = pick(pool);
                while to == from {
                    to = pick(pool);
                }
                let rest = rand::rng().random_range(0..100) < soak.rest_percent;
                let command = Command::Send { to: pool[to].user_id, rest };
                order(book, &pool[from], command, "send");
            }
            _ = reconnects.tick(), if reconnect_on => {
                let n = (pool.len() * soak.reconnect_percent as usize).div_ceil(100);
                for _ in 0..n {
                    order(book, &pool[pick(pool)], Command::Reconnect, "reconnect");
                }
            }
            _ = logouts.tick(), if logout_on && !pool.is_empty() => {
                order(book, &pool[pick(pool)], Command::Logout { all: false }, "logout");
            }
            _ = logout_alls.tick(), if logout_all_on && !pool.is_empty() => {
                order(book, &pool[pick(pool)], Command::Logout { all: true }, "logout_all");
            }
            _ = signups.tick(), if signup_on && !signing_up => {
                signing_up = true;
                let username = format!("{}{}-{signed}", soak.signup_prefix, shard.index);
                signed += 1;
                let (api, target, book, joined) =
                    (api.clone(), target.clone(), book.clone(), joined_tx.clone());
                let size = soak.size.max(16);
                tokio::spawn(async move {
                    let account = match api.sign_up(&username).await {
                        Ok(account) => account,
                        Err(e) => {
                            eprintln!("soak: sign-up of {username} failed: {e:#}");
                            count(&book, "error_signup");
                            let _ = joined.send(dead_handle()).await;
                            return;
                        }
                    };
                    let client = Client { api, target, source: None, account, book: book.clone(), size, seq: 0 };
                    let (handle, up) = spawn(client);
                    if matches!(tokio::time::timeout(GIVE_UP, up).await, Ok(Ok(true))) {
                        count(&book, "op_signup");
                        let _ = joined.send(handle).await;
                    } else {
                        count(&book, "error_signup_connect");
                        let _ = joined.send(dead_handle()).await;
                    }
                });
            }
            Some(handle) = joined.recv() => {
                signing_up = false;
                if !handle.commands.is_closed() {
                    pool.push(handle);
                }
            }
        }
    }
}

/// A handle with no actor behind it: what a failed sign-up reports, so the
/// driver knows the sign-up is over.
fn dead_handle() -> Handle {
    let (commands, _) = mpsc::channel(1);
    Handle {
        user_id: Uuid::nil(),
        commands,
    }
}

/// Why a session ended.
enum End {
    /// The driver asked for a reconnect.
    Reconnect,
    /// Logged out; the client must log in again.
    LoggedOut,
    /// The server closed the socket (with this code) or it failed.
    Dropped(Option<u16>),
    Finish(oneshot::Sender<()>),
    /// The driver is gone.
    Gone,
}

impl Client {
    async fn actor(mut self, mut commands: mpsc::Receiver<Command>, up: oneshot::Sender<bool>) {
        let mut up = Some(up);
        loop {
            let ws = match self.connect().await {
                Some(ws) => ws,
                None => {
                    if let Some(up) = up.take() {
                        let _ = up.send(false);
                    }
                    count(&self.book, "error_gave_up");
                    return;
                }
            };
            if let Some(up) = up.take() {
                let _ = up.send(true);
            }
            match self.session(ws, &mut commands).await {
                End::Reconnect => {
                    count(&self.book, "op_reconnect");
                    self.refresh_or_log_in().await;
                }
                End::LoggedOut => match self.api.log_in(&self.account.username).await {
                    Ok((access, refresh)) => {
                        count(&self.book, "op_login");
                        (self.account.access, self.account.refresh) = (access, refresh);
                    }
                    Err(e) => {
                        eprintln!("soak: login of {} failed: {e:#}", self.account.username);
                        count(&self.book, "error_login");
                    }
                },
                End::Dropped(code) => {
                    let code = code.map_or("none".to_owned(), |c| c.to_string());
                    count(&self.book, &format!("closed_by_server_{code}"));
                    // 4401: the token expired or was revoked.
                    self.refresh_or_log_in().await;
                }
                End::Finish(done) => {
                    self.final_read().await;
                    let _ = done.send(());
                    return;
                }
                End::Gone => return,
            }
        }
    }

    /// Connects and reads the backlog, retrying for up to [`GIVE_UP`].
    async fn connect(&mut self) -> Option<client::Ws> {
        let give_up = Instant::now() + GIVE_UP;
        loop {
            let attempt = tokio::time::timeout(STEP_TIMEOUT, async {
                let mut ws = client::connect(&self.target, self.source, &self.account.access)
                    .await
                    .map_err(|e| e.cause())?;
                let backlog = client::until_drained(&mut ws)
                    .await
                    .map_err(|_| "error_backlog")?;
                Ok::<_, &'static str>((ws, backlog))
            })
            .await
            .unwrap_or(Err("error_connect_timeout"));
            match attempt {
                Ok((mut ws, backlog)) => {
                    let ids: Vec<String> = backlog
                        .iter()
                        .filter_map(|m| m["id"].as_str().map(str::to_owned))
                        .collect();
                    self.book
                        .lock()
                        .unwrap()
                        .report
                        .add("backlog_read", ids.len() as u64);
                    for id in &ids {
                        self.receive(id);
                    }
                    for chunk in ids.chunks(ACK_BATCH) {
                        let frame = json!({ "type": "ack", "ids": chunk });
                        if client::send_text(&mut ws, &frame).await.is_err() {
                            count(&self.book, "error_ack");
                        }
                    }
                    return Some(ws);
                }
                Err(cause) => {
                    let cause = cause.strip_prefix("fail_").unwrap_or(cause);
                    count(&self.book, &format!("error_connect_{cause}"));
                    if Instant::now() >= give_up {
                        return None;
                    }
                    // A revoked or expired token: get a fresh one first.
                    self.refresh_or_log_in().await;
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }

    /// A fresh token pair by refresh, or by login if the refresh fails.
    async fn refresh_or_log_in(&mut self) {
        match self.api.refresh(&self.account.refresh).await {
            Ok((access, refresh)) => {
                count(&self.book, "op_refresh");
                (self.account.access, self.account.refresh) = (access, refresh);
            }
            Err(_) => match self.api.log_in(&self.account.username).await {
                Ok((access, refresh)) => {
                    count(&self.book, "op_login_after_failed_refresh");
                    (self.account.access, self.account.refresh) = (access, refresh);
                }
                Err(e) => {
                    eprintln!("soak: login of {} failed: {e:#}", self.account.username);
                    count(&self.book, "error_login");
                }
            },
        }
    }

    /// Records a message id as received.
    fn receive(&self, id: &str) {
        let Ok(id) = Uuid::parse_str(id) else {
            return;
        };
        let mut book = self.book.lock().unwrap();
        if !book.received.insert(id.as_u128()) {
            // Again after a reconnect, before its ack was written: the
            // at-least-once contract allows it.
            book.report.add("redelivered", 1);
        }
        book.report.add("received", 1);
    }

    fn confirm(book: &Shared, id: &str) {
        if let Ok(id) = Uuid::parse_str(id) {
            let mut book = book.lock().unwrap();
            book.confirmed.insert(id.as_u128());
            book.report.add("op_confirmed", 1);
        }
    }

    /// One socket's life: reads pushes (acking them), obeys commands.
    async fn session(&mut self, ws: client::Ws, commands: &mut mpsc::Receiver<Command>) -> End {
        let (mut sink, mut stream) = ws.split();
        let mut acks: Vec<String> = Vec::new();
        let mut in_flight: HashMap<u64, ()> = HashMap::new();
        let mut ack_tick = tokio::time::interval(ACK_EVERY);
        ack_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                frame = stream.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                        match frame["type"].as_str() {
                            Some("message") => {
                                if let Some(id) = frame["id"].as_str() {
                                    self.receive(id);
                                    acks.push(id.to_owned());
                                }
                            }
                            Some("sent") => {
                                if let Some(r) = frame["ref"].as_str().and_then(|r| r.parse().ok()) {
                                    in_flight.remove(&r);
                                }
                                if let Some(id) = frame["id"].as_str() {
                                    Self::confirm(&self.book, id);
                                }
                            }
                            Some("error") => {
                                if let Some(r) = frame["ref"].as_str().and_then(|r| r.parse().ok()) {
                                    in_flight.remove(&r);
                                }
                                let code = frame["code"].as_str().unwrap_or("unknown");
                                count(&self.book, &format!("error_ws_{code}"));
                            }
                            _ => {}
                        }
                        if acks.len() >= ACK_BATCH && !self.flush(&mut sink, &mut acks).await {
                            break End::Dropped(None);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break End::Dropped(frame.map(|f| u16::from(f.code)));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break End::Dropped(None),
                },
                _ = ack_tick.tick(), if !acks.is_empty() => {
                    if !self.flush(&mut sink, &mut acks).await {
                        break End::Dropped(None);
                    }
                }
                command = commands.recv() => match command {
                    Some(Command::Send { to, rest: false }) => {
                        self.seq += 1;
                        let frame = json!({ "type": "send", "ref": self.seq.to_string(), "to": to,
                                            "body": b64(&stamp(self.seq, self.size)) });
                        if sink.send(Message::Text(frame.to_string().into())).await.is_err() {
                            count(&self.book, "error_ws_send");
                            break End::Dropped(None);
                        }
                        in_flight.insert(self.seq, ());
                        count(&self.book, "op_send_ws");
                    }
                    Some(Command::Send { to, rest: true }) => {
                        self.seq += 1;
                        let (api, from, book) = (self.api.clone(), self.account.clone(), self.book.clone());
                        let body = stamp(self.seq, self.size);
                        count(&self.book, "op_send_rest");
                        tokio::spawn(async move {
                            match api.send(&from, to, &body).await {
                                Ok(id) => Self::confirm(&book, &id.to_string()),
                                Err(_) => count(&book, "error_rest_send"),
                            }
                        });
                    }
                    Some(Command::Reconnect) => {
                        self.flush(&mut sink, &mut acks).await;
                        let _ = sink.close().await;
                        break End::Reconnect;
                    }
                    Some(Command::Logout { all }) => {
                        self.flush(&mut sink, &mut acks).await;
                        let name = if all { "logout_all" } else { "logout" };
                        match self.api.log_out(&self.account.access, all).await {
                            Ok(()) => count(&self.book, &format!("op_{name}")),
                            Err(_) => count(&self.book, &format!("error_{name}")),
                        }
                        // The server closes the socket (4401); read until it
                        // does, counting what still arrives.
                        let closed = tokio::time::timeout(STEP_TIMEOUT, async {
                            loop {
                                match stream.next().await {
                                    Some(Ok(Message::Text(text))) => {
                                        if let Ok(frame) = serde_json::from_str::<Value>(&text) {
                                            if frame["type"] == "message"
                                                && let Some(id) = frame["id"].as_str()
                                            {
                                                // Not acked: the session is over, so it
                                                // comes again in the next backlog.
                                                self.receive(id);
                                            } else if frame["type"] == "sent"
                                                && let Some(id) = frame["id"].as_str()
                                            {
                                                Self::confirm(&self.book, id);
                                                if let Some(r) = frame["ref"].as_str().and_then(|r| r.parse().ok()) {
                                                    in_flight.remove(&r);
                                                }
                                            }
                                        }
                                    }
                                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                                    Some(Ok(_)) => {}
                                    Some(Err(_)) | None => return None,
                                }
                            }
                        })
                        .await;
                        match closed {
                            Ok(Some(4401)) => count(&self.book, "op_revoked_socket_closed"),
                            Ok(_) => count(&self.book, "error_revoked_socket_closed_otherwise"),
                            Err(_) => count(&self.book, "error_revoked_socket_left_open"),
                        }
                        break End::LoggedOut;
                    }
                    Some(Command::Finish(done)) => {
                        self.flush(&mut sink, &mut acks).await;
                        let _ = sink.close().await;
                        break End::Finish(done);
                    }
                    None => break End::Gone,
                },
            }
        };
        if !in_flight.is_empty() {
            // Sends the socket took but never answered: stored or not,
            // nobody knows, so they are not in the confirmed set.
            self.book
                .lock()
                .unwrap()
                .report
                .add("unconfirmed", in_flight.len() as u64);
        }
        end
    }

    /// Sends the pending acks; false if the socket failed.
    async fn flush<S>(&self, sink: &mut S, acks: &mut Vec<String>) -> bool
    where
        S: futures_util::Sink<Message> + Unpin,
    {
        if acks.is_empty() {
            return true;
        }
        let frame = json!({ "type": "ack", "ids": acks });
        acks.clear();
        if sink
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            count(&self.book, "error_ack");
            return false;
        }
        count(&self.book, "op_ack_frame");
        true
    }

    /// The end of the run: a fresh token, one more connect, its backlog
    /// read and acked (by [`Client::connect`]).
    async fn final_read(&mut self) {
        self.refresh_or_log_in().await;
        if let Some(mut ws) = self.connect().await {
            let _ = ws.close(None).await;
        }
    }
}
