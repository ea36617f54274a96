//! `attack`: the cheap attacks of issue 24, each run beside a legitimate
//! client, reporting what that client saw (and what the attacker got).
//! Unlike the other scenarios it runs in one process (no workers, no
//! [`Plan`](crate::Plan)): an attack is a few hundred connections, and its
//! figures are the legitimate client's answers, not throughput.
//!
//! Addresses, so that per-address limits tell the parties apart:
//! - the attacker connects from [`ATTACKER`] (127.0.0.1);
//! - the legitimate client's sockets, polls and sends come from [`LEGIT`]
//!   (127.0.0.2); its logins each from the next of [`LOGIN_SOURCES`]
//!   addresses in 127.0.1.0/24 (many users logging in now and then, so the
//!   per-address auth limit, 10 a minute, never refuses them);
//! - the set-up's sign-ups each from an address of their own in
//!   127.0.2.0/23 upwards, so that the server runs with its default limits
//!   and still signs them up at once.
//!
//! The legitimate client never retries: every answer it gets is counted as
//! it came (`200`, `429 rate_limited`, `503 unavailable`, `timeout`). So are
//! the attacker's refusals: a fixed server may answer it 429, and the run
//! goes on. Every loop is bounded by the attack's deadline and every wait by
//! a timeout.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt, stream};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::client::{self, Account, Api, Target, b64};
use crate::stats::Latency;
use crate::{open_fds, rss_kib};

/// Where every attack comes from.
pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// Where the legitimate client's sockets, polls and sends come from.
pub const LEGIT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Addresses the legitimate logins take turns on: at one login every half
/// second, each address logs in every 20 s, under the default 10 a minute.
pub const LOGIN_SOURCES: usize = 40;
/// How long any one legitimate request may take before it counts as
/// `timeout`: longer than the server's own waits (10 s), so that its 503
/// is seen rather than cut short.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);
/// Legitimate operations before the attack starts, for comparison.
const BASELINE: usize = 3;
/// The slow reader's socket: a receive buffer and segment size so small
/// that the kernels buffer only tens of kilobytes between the server and
/// the reader, so that its writes (and the page it holds for them) go at
/// the reader's pace.
const SLOW_RCVBUF: u32 = 16 * 1024;
const SLOW_MSS: u32 = 536;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Attack {
    /// Item 1: the attacker holds every slot for sockets waiting to
    /// authenticate, reconnecting as the server times them out; the
    /// legitimate client opens a socket with its token in the header every
    /// few seconds.
    Slots {
        /// Unauthenticated upgrades the attacker keeps open at once (the
        /// server's SEALPOST_MAX_UNAUTHENTICATED_SOCKETS default).
        #[arg(long, default_value_t = 1000)]
        slots: usize,
        /// Seconds the legitimate client tries, after the attacker's ramp.
        #[arg(long, default_value_t = 45)]
        duration: u64,
        /// Seconds between the legitimate client's sockets.
        #[arg(long, default_value_t = 3)]
        every: u64,
        /// Seconds the attacker has to take the slots before the
        /// legitimate client starts.
        #[arg(long, default_value_t = 5)]
        ramp: u64,
    },
    /// Item 2: connections that send a login's head and all but a few
    /// bytes of a large body, then hold; the legitimate client logs in and
    /// polls beside them.
    SlowBodies {
        #[arg(long, default_value_t = 300)]
        conns: usize,
        /// The `Content-Length` each announces (the server's request limit
        /// is about 878,000 bytes at its defaults).
        #[arg(long, default_value_t = 850_000)]
        body: usize,
        /// Bytes of the body left unsent.
        #[arg(long, default_value_t = 8)]
        short: usize,
        /// Seconds the attacker holds its connections.
        #[arg(long, default_value_t = 60)]
        hold: u64,
        /// Seconds between the legitimate client's login-and-poll.
        #[arg(long, default_value_t = 2)]
        every: u64,
    },
    /// Item 3: one free account hammers `PUT /v1/password` with a wrong
    /// current password, many requests in flight; other users log in
    /// beside it.
    HashStall {
        /// The attacker's requests in flight: at some 40 hashes a second
        /// on two cores, 512 queue each hash for longer than the server's
        /// 10 s wait.
        #[arg(long, default_value_t = 512)]
        in_flight: usize,
        /// Seconds of legitimate logins during the attack.
        #[arg(long, default_value_t = 45)]
        duration: u64,
        /// Milliseconds between legitimate logins.
        #[arg(long, default_value_t = 500)]
        every_ms: u64,
        /// Legitimate accounts the logins take turns on (so that a limit
        /// per account is not what they meet).
        #[arg(long, default_value_t = 16)]
        users: usize,
    },
    /// Item 7: attacker accounts fill an offline device's queue; then a
    /// legitimate sender sends to it.
    InboxLock {
        #[arg(long, default_value_t = 10)]
        attackers: usize,
        /// Messages per second each attacker sends (the server's
        /// SEALPOST_SEND_RATE_PER_SECOND default).
        #[arg(long, default_value_t = 50)]
        rate: u32,
        /// Seconds the attackers have to fill the queue.
        #[arg(long, default_value_t = 60)]
        fill: u64,
        /// The legitimate sender's sends, one every half second.
        #[arg(long, default_value_t = 10)]
        sends: usize,
    },
    /// Item 9: queues of large messages for many accounts, whose sockets
    /// then read very slowly, holding the server's drain budget; a
    /// legitimate user polls `GET /v1/messages` beside them.
    SlowReaders {
        /// Accounts (and slow sockets).
        #[arg(long, default_value_t = 90)]
        accounts: usize,
        /// Messages queued for each: 24 of 60,000 bytes are one backlog
        /// page of 1.44 MB, a minute's read at the default rate.
        #[arg(long, default_value_t = 24)]
        per_user: usize,
        /// Body size of each, in bytes (the server's body limit is 65,536).
        #[arg(long, default_value_t = 60_000)]
        size: usize,
        /// Seconds the slow sockets are held.
        #[arg(long, default_value_t = 60)]
        hold: u64,
        /// Bytes per second each slow socket reads: fast enough that each
        /// of the server's writes (one frame, ~80 KB) finishes within its
        /// 10 s write timeout, slow enough that a page takes a minute.
        #[arg(long, default_value_t = 24_000)]
        read_rate: usize,
        /// Seconds between the legitimate polls.
        #[arg(long, default_value_t = 1)]
        every: u64,
    },
}

impl Attack {
    pub fn name(&self) -> &'static str {
        match self {
            Attack::Slots { .. } => "slots",
            Attack::SlowBodies { .. } => "slow-bodies",
            Attack::HashStall { .. } => "hash-stall",
            Attack::InboxLock { .. } => "inbox-lock",
            Attack::SlowReaders { .. } => "slow-readers",
        }
    }

    /// The numbered item of issue 24 it reproduces.
    pub fn item(&self) -> u32 {
        match self {
            Attack::Slots { .. } => 1,
            Attack::SlowBodies { .. } => 2,
            Attack::HashStall { .. } => 3,
            Attack::InboxLock { .. } => 7,
            Attack::SlowReaders { .. } => 9,
        }
    }
}

/// Runs `attack` against `target` and returns its JSON result:
/// `scenario`, `attack`, `item`, `params`, `results` (with `summary`, one
/// line each for the attacker and the legitimate client).
pub async fn run(
    attack: &Attack,
    target: &Target,
    pid: Option<u32>,
    prefix: &str,
) -> anyhow::Result<Value> {
    let prefix = format!("{prefix}-{}", attack.name());
    let load_start = loadavg();
    let (params, mut results) = match attack {
        Attack::Slots {
            slots,
            duration,
            every,
            ramp,
        } => {
            let params =
                json!({ "slots": slots, "duration_s": duration, "every_s": every, "ramp_s": ramp });
            let secs = Duration::from_secs;
            (
                params,
                self::slots(
                    target,
                    &prefix,
                    *slots,
                    secs(*duration),
                    secs(*every),
                    secs(*ramp),
                )
                .await?,
            )
        }
        Attack::SlowBodies {
            conns,
            body,
            short,
            hold,
            every,
        } => {
            let params = json!({ "conns": conns, "content_length": body, "short_bytes": short,
                                 "hold_s": hold, "every_s": every });
            let shape = SlowBody {
                conns: *conns,
                body: *body,
                short: (*short).min(*body),
                hold: Duration::from_secs(*hold),
                every: Duration::from_secs((*every).max(1)),
            };
            (params, slow_bodies(target, &prefix, pid, shape).await?)
        }
        Attack::HashStall {
            in_flight,
            duration,
            every_ms,
            users,
        } => {
            let params = json!({ "in_flight": in_flight, "duration_s": duration,
                                 "every_ms": every_ms, "legit_users": users });
            (
                params,
                hash_stall(
                    target,
                    &prefix,
                    *in_flight,
                    Duration::from_secs(*duration),
                    Duration::from_millis((*every_ms).max(10)),
                    (*users).max(1),
                )
                .await?,
            )
        }
        Attack::InboxLock {
            attackers,
            rate,
            fill,
            sends,
        } => {
            let params = json!({ "attackers": attackers, "rate_per_attacker": rate,
                                 "fill_s": fill, "legit_sends": sends });
            (
                params,
                inbox_lock(
                    target,
                    &prefix,
                    (*attackers).max(1),
                    (*rate).max(1),
                    Duration::from_secs(*fill),
                    *sends,
                )
                .await?,
            )
        }
        Attack::SlowReaders {
            accounts,
            per_user,
            size,
            hold,
            read_rate,
            every,
        } => {
            let params = json!({ "accounts": accounts, "per_user": per_user, "size": size,
                                 "hold_s": hold, "read_rate": read_rate, "every_s": every });
            let shape = SlowReaders {
                accounts: (*accounts).max(1),
                per_user: *per_user,
                size: (*size).max(16),
                hold: Duration::from_secs(*hold),
                read_rate: (*read_rate).max(10),
                every: Duration::from_secs((*every).max(1)),
            };
            (params, slow_readers(target, &prefix, pid, shape).await?)
        }
    };
    results["loadavg_start"] = json!(load_start);
    results["loadavg_end"] = json!(loadavg());
    Ok(json!({
        "scenario": "attack",
        "attack": attack.name(),
        "item": attack.item(),
        "params": params,
        "results": results,
    }))
}

/// The machine's load averages, as /proc/loadavg has them: the figures are
/// only as good as the machine was idle.
fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Answers counted by outcome (`200`, `429 rate_limited`, `timeout`, ...),
/// with the latency of all of them and of the successful ones.
#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    all: Latency,
    ok: Latency,
}

type Shared = Arc<Mutex<Tally>>;

impl Tally {
    fn record(&mut self, outcome: &str, ok: bool, took: Duration) {
        *self.outcomes.entry(outcome.to_owned()).or_default() += 1;
        self.all.record(took);
        if ok {
            self.ok.record(took);
        }
    }

    fn attempts(&self) -> u64 {
        self.outcomes.values().sum()
    }

    fn succeeded(&self) -> u64 {
        self.ok.count()
    }

    /// Outcomes whose name starts with `prefix` (`"429"`, `"503"`).
    fn count(&self, prefix: &str) -> u64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum()
    }

    fn json(&self) -> Value {
        json!({
            "attempts": self.attempts(),
            "succeeded": self.succeeded(),
            "outcomes": self.outcomes,
            "latency": self.all.summary(),
            "ok_latency": self.ok.summary(),
        })
    }

    /// `"12 of 15 ok (3 × 429 too_many_connections); p50 40 ms, max 90 ms"`.
    fn line(&self, what: &str) -> String {
        let others: Vec<String> = self
            .outcomes
            .iter()
            .filter(|(k, _)| !is_success(k))
            .map(|(k, v)| format!("{v} × {k}"))
            .collect();
        let mut line = format!("{} of {} {what}", self.succeeded(), self.attempts());
        if !others.is_empty() {
            line.push_str(&format!(" ({})", others.join(", ")));
        }
        if self.all.count() > 0 {
            line.push_str(&format!(
                "; p50 {}, p99 {}, max {}",
                ms(self.all.quantile_ms(0.5)),
                ms(self.all.quantile_ms(0.99)),
                ms(self.all.quantile_ms(1.0)),
            ));
        }
        line
    }
}

/// The answer to a password change with the wrong current password (403
/// `forbidden`; 401 should a server answer that instead): the server
/// hashed it.
fn is_wrong_password(outcome: &str) -> bool {
    outcome.starts_with("403") || outcome.starts_with("401")
}

fn is_success(outcome: &str) -> bool {
    outcome.starts_with('2') || outcome == "ready"
}

fn ms(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.1} s", value / 1000.0)
    } else {
        format!("{value:.0} ms")
    }
}

/// An HTTP client whose every connection comes from `source`.
fn http(source: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(source)
        .timeout(PROBE_TIMEOUT)
        .pool_max_idle_per_host(1024)
        .build()
        .expect("HTTP client")
}

/// What a request came to, as a [`Tally`] outcome: the status, with the
/// error code when the server named one; `timeout` or `failed` when no
/// answer came. A success's body is read in full, so that its latency
/// covers it.
async fn outcome(result: reqwest::Result<reqwest::Response>) -> (String, bool) {
    match result {
        Ok(response) => {
            let status = response.status();
            if status.is_success() {
                let read = response.bytes().await.is_ok();
                return (status.as_u16().to_string(), read);
            }
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let outcome = match body["error"]["code"].as_str() {
                Some(code) => format!("{} {code}", status.as_u16()),
                None => status.as_u16().to_string(),
            };
            (outcome, false)
        }
        Err(e) if e.is_timeout() => ("timeout".to_owned(), false),
        Err(_) => ("failed".to_owned(), false),
    }
}

/// Sends one request and records what came of it in `tally`.
async fn probe(tally: &Shared, request: reqwest::RequestBuilder) {
    let begin = Instant::now();
    let (outcome, ok) = outcome(request.send().await).await;
    tally.lock().unwrap().record(&outcome, ok, begin.elapsed());
}

/// The address the n-th account of a set-up signs up from: one each, so
/// that the default per-address auth limit lets them all through at once.
fn signup_source(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        2 + (n / 250) as u8,
        1 + (n % 250) as u8,
    ))
}

/// The address of the n-th of the slow bodies' logins: four to an
/// address, under the default auth burst (5) that would refuse the rest
/// before their bodies are read, as a botnet would spread them.
fn botnet_source(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        4 + (n / 1000) as u8,
        1 + (n % 1000 / 4) as u8,
    ))
}

/// The address the n-th legitimate login comes from.
fn login_source(n: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (n % LOGIN_SOURCES) as u8))
}

/// Signs up `{prefix}{n}` for n in `0..count`, each from its own address.
async fn sign_up(target: &Target, prefix: &str, count: usize) -> anyhow::Result<Vec<Account>> {
    anyhow::ensure!(
        count <= 250 * 200,
        "too many accounts for the sign-up addresses"
    );
    let signed: Vec<anyhow::Result<Account>> = stream::iter(0..count)
        .map(|n| async move {
            Api::bound(target.clone(), signup_source(n))
                .sign_up(&format!("{prefix}{n}"))
                .await
        })
        .buffered(8)
        .collect()
        .await;
    signed.into_iter().collect()
}

/// Runs `op(n)` every `every` until `until`, each on a task of its own so
/// that a slow answer does not hold back the next; then waits for them
/// all (each bounded by its own timeout). At most `until / every` runs.
async fn every<F, Fut>(every: Duration, until: Instant, mut op: F)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::new();
    for n in 0.. {
        tick.tick().await;
        if Instant::now() >= until {
            break;
        }
        tasks.push(tokio::spawn(op(n)));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// The server's memory and open files, sampled every 250 ms until stopped
/// (at most [`SAMPLES_MAX`] samples).
struct Sampler {
    pid: Option<u32>,
    /// (seconds since start, VmRSS KiB, open fds).
    samples: Arc<Mutex<Vec<(f64, u64, u64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Ten minutes of samples: longer than any attack.
const SAMPLES_MAX: usize = 2_400;

impl Sampler {
    fn start(pid: Option<u32>) -> Self {
        let sampler = Self {
            pid,
            samples: Arc::default(),
            stop: Arc::default(),
        };
        if let Some(pid) = pid {
            let (samples, stop) = (sampler.samples.clone(), sampler.stop.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                for _ in 0..SAMPLES_MAX {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    if let (Some(rss), Some(fds)) = (rss_kib(pid), open_fds(pid)) {
                        let t = started.elapsed().as_secs_f64();
                        samples.lock().unwrap().push((t, rss, fds));
                    }
                    sleep(Duration::from_millis(250)).await;
                }
            });
        }
        sampler
    }

    /// Stops sampling and summarises: the server's VmRSS and open files at
    /// the start, at their peak, at the end.
    fn finish(self) -> Value {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples = self.samples.lock().unwrap().clone();
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            return Value::Null;
        };
        let peak_rss = samples.iter().map(|s| s.1).max();
        let peak_fds = samples.iter().map(|s| s.2).max();
        json!({
            "pid": self.pid,
            "samples": samples.len(),
            "rss_start_kib": first.1,
            "rss_peak_kib": peak_rss,
            "rss_end_kib": last.1,
            "rss_growth_kib": peak_rss.map(|p| p.saturating_sub(first.1)),
            "fds_start": first.2,
            "fds_peak": peak_fds,
            "fds_end": last.2,
        })
    }
}

/// A TCP connection from `source`. `slow` shrinks the receive buffer and
/// the segment size it announces before connecting (the server's send
/// buffer is sized from the segment size), so that little can be buffered
/// between the server and the reader.
async fn tcp(addr: SocketAddr, source: IpAddr, slow: bool) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if slow {
        socket.set_recv_buffer_size(SLOW_RCVBUF)?;
        socket2::SockRef::from(&socket).set_tcp_mss(SLOW_MSS)?;
    }
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Opens `/v1/ws` over a raw connection, with `token` in the header or
/// none, and reads the response head: (status, the connection).
async fn upgrade(
    addr: SocketAddr,
    source: IpAddr,
    token: Option<&str>,
    slow: bool,
) -> std::io::Result<(u16, TcpStream)> {
    let mut stream = tcp(addr, source, slow).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let status = read_status(&mut stream).await?;
    Ok((status, stream))
}

/// Reads a response head and returns its status. Bytes after the head
/// that came in the same read are dropped: callers only hold the
/// connection.
async fn read_status(stream: &mut TcpStream) -> std::io::Result<u16> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("response head over 16 KiB"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    status_of(&head).ok_or_else(|| std::io::Error::other("no status line"))
}

/// The status of `HTTP/1.1 429 Too Many Requests...`.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Reads and drops what the server sends until it closes the connection
/// or `until` comes: how long after `since` it closed (`None`: still open
/// at `until`), and the status of a response it sent first, if any.
async fn until_closed(
    stream: &mut TcpStream,
    since: Instant,
    until: Instant,
) -> (Option<Duration>, Option<u16>) {
    let mut buf = vec![0u8; 4096];
    let mut status = None;
    let mut first = true;
    loop {
        match timeout_at(until, stream.read(&mut buf)).await {
            Err(_) => return (None, status),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(since.elapsed()), status),
            Ok(Ok(n)) => {
                if first {
                    status = status_of(&buf[..n]);
                    first = false;
                }
            }
        }
    }
}

/// How long connections stayed open, and how many were still open at the
/// end of the hold.
#[derive(Default)]
struct Held {
    closed: Latency,
    open_at_end: u64,
}

impl Held {
    fn record(&mut self, closed: Option<Duration>) {
        match closed {
            Some(after) => self.closed.record(after),
            None => self.open_at_end += 1,
        }
    }

    fn json(&self) -> Value {
        json!({
            "closed_by_server": self.closed.count(),
            "closed_after": self.closed.summary(),
            "open_at_end": self.open_at_end,
        })
    }
}

// ---------------------------------------------------------------- item 1

/// What the legitimate socket came to: `ready`, an HTTP status at the
/// upgrade (`429`), or how it failed.
async fn legit_socket(target: &Target, token: &str) -> String {
    let opened = async {
        let mut ws = match client::connect(target, Some(LEGIT), token).await {
            Ok(ws) => ws,
            Err(client::ConnectError::Ws(WsError::Http(response))) => {
                return response.status().as_u16().to_string();
            }
            Err(e) => return e.cause().to_owned(),
        };
        let outcome = match client::next_json(&mut ws).await {
            Some(frame) if frame["type"] == "ready" => "ready".to_owned(),
            Some(frame) => format!("first frame {}", frame["type"]),
            None => "closed before ready".to_owned(),
        };
        let _ = ws.close(None).await;
        outcome
    };
    timeout(PROBE_TIMEOUT, opened)
        .await
        .unwrap_or_else(|_| "timeout".to_owned())
}

async fn slots(
    target: &Target,
    prefix: &str,
    slots: usize,
    duration: Duration,
    interval: Duration,
    ramp: Duration,
) -> anyhow::Result<Value> {
    let legit = sign_up(target, &format!("{prefix}-u"), 1).await?.remove(0);
    let socket_probe = |tally: Shared| {
        let (target, token) = (target.clone(), legit.access.clone());
        move |_| {
            let (target, token, tally) = (target.clone(), token.clone(), tally.clone());
            async move {
                let begin = Instant::now();
                let outcome = legit_socket(&target, &token).await;
                tally
                    .lock()
                    .unwrap()
                    .record(&outcome, outcome == "ready", begin.elapsed());
            }
        }
    };
    let baseline = Shared::default();
    let spaced = interval.min(Duration::from_secs(1));
    let quick = Instant::now() + spaced * BASELINE as u32;
    every(spaced, quick, socket_probe(baseline.clone())).await;

    // The attacker: `slots` loops, each an unauthenticated upgrade held
    // until the server closes it, then the next; a refusal backs off
    // (250 ms doubling to 4 s) and tries again.
    let started = Instant::now();
    let until = started + ramp + duration;
    let attacker = Shared::default();
    let held = Arc::new(Mutex::new(Held::default()));
    let loops: Vec<_> = (0..slots)
        .map(|_| {
            let (addr, attacker, held) = (target.addr, attacker.clone(), held.clone());
            tokio::spawn(async move {
                let mut backoff = Duration::from_millis(250);
                while Instant::now() < until {
                    let begin = Instant::now();
                    match timeout_at(until, upgrade(addr, ATTACKER, None, false)).await {
                        Err(_) => break,
                        Ok(Ok((101, mut stream))) => {
                            attacker
                                .lock()
                                .unwrap()
                                .record("101", true, begin.elapsed());
                            backoff = Duration::from_millis(250);
                            let (closed, _) = until_closed(&mut stream, begin, until).await;
                            held.lock().unwrap().record(closed);
                        }
                        Ok(Ok((status, _))) => {
                            let status = status.to_string();
                            attacker
                                .lock()
                                .unwrap()
                                .record(&status, false, begin.elapsed());
                            sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(4));
                        }
                        Ok(Err(e)) => {
                            let cause = format!("tcp {:?}", e.kind());
                            attacker
                                .lock()
                                .unwrap()
                                .record(&cause, false, begin.elapsed());
                            sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(4));
                        }
                    }
                }
            })
        })
        .collect();
    sleep(ramp).await;
    let during = Shared::default();
    every(interval, until, socket_probe(during.clone())).await;
    for task in loops {
        let _ = timeout(Duration::from_secs(5), task).await;
    }
    let attacker = attacker.lock().unwrap();
    let during = during.lock().unwrap();
    let baseline = baseline.lock().unwrap();
    let held = held.lock().unwrap();
    let upgraded = attacker.count("101");
    let seconds = started.elapsed().as_secs_f64();
    Ok(json!({
        "attacker": {
            "upgrades": attacker.json(),
            "upgrades_per_s": (upgraded as f64 / seconds * 10.0).round() / 10.0,
            "held": held.json(),
        },
        "legitimate": { "baseline": baseline.json(), "during": during.json() },
        "summary": {
            "attacker": format!(
                "{} unauthenticated upgrades from 1 address ({:.0}/s), {} refused",
                upgraded, upgraded as f64 / seconds, attacker.attempts() - upgraded
            ),
            "legitimate": format!(
                "sockets with a header token: {}; {} refused with 429",
                during.line("got ready"),
                during.count("429")
            ),
        },
    }))
}

// ---------------------------------------------------------------- item 2

struct SlowBody {
    conns: usize,
    body: usize,
    short: usize,
    hold: Duration,
    every: Duration,
}

/// One legitimate login (from the next login address) and one poll (from
/// [`LEGIT`]), each recorded.
struct LoginAndPoll {
    target: Target,
    logins: Arc<Vec<reqwest::Client>>,
    poller: reqwest::Client,
}

impl LoginAndPoll {
    fn new(target: &Target) -> Self {
        Self {
            target: target.clone(),
            logins: Arc::new((0..LOGIN_SOURCES).map(|n| http(login_source(n))).collect()),
            poller: http(LEGIT),
        }
    }

    fn login(&self, n: usize, username: &str) -> reqwest::RequestBuilder {
        self.logins[n % LOGIN_SOURCES]
            .post(format!("{}/v1/login", self.target.base))
            .json(&json!({ "username": username, "password": client::PASSWORD }))
    }

    fn poll(&self, access: &str) -> reqwest::RequestBuilder {
        self.poller
            .get(format!("{}/v1/messages?limit=100", self.target.base))
            .bearer_auth(access)
    }
}

async fn slow_bodies(
    target: &Target,
    prefix: &str,
    pid: Option<u32>,
    shape: SlowBody,
) -> anyhow::Result<Value> {
    let mut accounts = sign_up(target, &format!("{prefix}-u"), 2).await?;
    let (legit, attacker_account) = (accounts.remove(0), accounts.remove(0));
    let client = Arc::new(LoginAndPoll::new(target));
    let (logins, polls) = (Shared::default(), Shared::default());
    let legit_round = |logins: Shared, polls: Shared| {
        let (client, legit) = (client.clone(), legit.clone());
        move |n| {
            let (client, legit) = (client.clone(), legit.clone());
            let (logins, polls) = (logins.clone(), polls.clone());
            async move {
                probe(&logins, client.login(n, &legit.username)).await;
                probe(&polls, client.poll(&legit.access)).await;
            }
        }
    };
    let (base_logins, base_polls) = (Shared::default(), Shared::default());
    let quick = Instant::now() + Duration::from_millis(500) * BASELINE as u32;
    every(
        Duration::from_millis(500),
        quick,
        legit_round(base_logins.clone(), base_polls.clone()),
    )
    .await;

    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let until = started + shape.hold;
    let attacker = Shared::default();
    let held = Arc::new(Mutex::new(BTreeMap::<&'static str, Held>::new()));
    let mut answers = BTreeMap::<String, u64>::new();
    let answers_seen = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    // Even connections log in from many addresses, a few each (under the
    // per-address auth burst, which answers 429 before reading a body);
    // odd ones send a message with the attacker's free account.
    let conns: Vec<_> = (0..shape.conns)
        .map(|i| {
            let (addr, attacker, held) = (target.addr, attacker.clone(), held.clone());
            let answers = answers_seen.clone();
            let (body, short) = (shape.body, shape.short);
            let (path, source, auth) = if i % 2 == 0 {
                ("/v1/login", botnet_source(i / 2), String::new())
            } else {
                let token = &attacker_account.access;
                (
                    "/v1/messages",
                    ATTACKER,
                    format!("Authorization: Bearer {token}\r\n"),
                )
            };
            tokio::spawn(async move {
                let begin = Instant::now();
                let sent = timeout_at(until, async {
                    let mut stream = tcp(addr, source, false).await?;
                    let head = format!(
                        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                         {auth}Content-Length: {body}\r\n\r\n"
                    );
                    stream.write_all(head.as_bytes()).await?;
                    let chunk = vec![b' '; 64 * 1024];
                    let mut left = body - short;
                    while left > 0 {
                        let n = left.min(chunk.len());
                        stream.write_all(&chunk[..n]).await?;
                        left -= n;
                    }
                    Ok::<_, std::io::Error>(stream)
                })
                .await;
                match sent {
                    Err(_) => {
                        attacker.lock().unwrap().record(
                            "still sending at the end",
                            false,
                            begin.elapsed(),
                        );
                        held.lock().unwrap().entry(path).or_default().record(None);
                    }
                    Ok(Err(e)) => {
                        // Refused or cut off while sending: closed by the server.
                        let cause = format!("write {:?}", e.kind());
                        attacker
                            .lock()
                            .unwrap()
                            .record(&cause, false, begin.elapsed());
                        held.lock()
                            .unwrap()
                            .entry(path)
                            .or_default()
                            .record(Some(begin.elapsed()));
                    }
                    Ok(Ok(mut stream)) => {
                        attacker
                            .lock()
                            .unwrap()
                            .record("body sent", true, begin.elapsed());
                        let (closed, status) = until_closed(&mut stream, begin, until).await;
                        held.lock().unwrap().entry(path).or_default().record(closed);
                        if let Some(status) = status {
                            *answers
                                .lock()
                                .unwrap()
                                .entry(format!("{path} {status}"))
                                .or_default() += 1;
                        }
                    }
                }
            })
        })
        .collect();
    // Give the bodies a moment to arrive before the legitimate client
    // starts, so that it meets the server holding them.
    sleep(Duration::from_secs(2).min(shape.hold / 2)).await;
    every(
        shape.every,
        until,
        legit_round(logins.clone(), polls.clone()),
    )
    .await;
    for task in conns {
        let _ = timeout(Duration::from_secs(5), task).await;
    }
    // The connections are closed: does the server give the memory back?
    sleep(Duration::from_secs(3)).await;
    let server = sampler.finish();
    answers.extend(answers_seen.lock().unwrap().clone());
    let attacker = attacker.lock().unwrap();
    let held = held.lock().unwrap();
    let (logins, polls) = (logins.lock().unwrap(), polls.lock().unwrap());
    let growth_mib = server["rss_growth_kib"].as_u64().map(|k| k / 1024);
    let open_line = held
        .iter()
        .map(|(path, held)| {
            let closed = held.closed.count();
            let mut line = format!(
                "{path}: {} of {} open after {} s",
                held.open_at_end,
                held.open_at_end + closed,
                shape.hold.as_secs()
            );
            if closed > 0 {
                line.push_str(&format!(
                    ", {closed} closed by the server (p50 after {})",
                    ms(held.closed.quantile_ms(0.5))
                ));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("; ");
    let held: BTreeMap<&str, Value> = held.iter().map(|(k, v)| (*k, v.json())).collect();
    Ok(json!({
        "attacker": {
            "connections": attacker.json(),
            "held": held,
            "answers": answers,
        },
        "server": server,
        "legitimate": {
            "baseline": { "logins": base_logins.lock().unwrap().json(), "polls": base_polls.lock().unwrap().json() },
            "during": { "logins": logins.json(), "polls": polls.json() },
        },
        "summary": {
            "attacker": format!(
                "{} bodies of {} KB, {} B short, half to /v1/login from {} addresses, half to \
                 /v1/messages from 1 free account: {}; server RSS +{} MiB",
                shape.conns, shape.body / 1000, shape.short,
                shape.conns.div_ceil(2).div_ceil(4),
                open_line,
                growth_mib.map_or("?".to_owned(), |m| m.to_string())
            ),
            "legitimate": format!("logins: {}; polls: {}", logins.line("ok"), polls.line("ok")),
        },
    }))
}

// ---------------------------------------------------------------- item 3

async fn hash_stall(
    target: &Target,
    prefix: &str,
    in_flight: usize,
    duration: Duration,
    interval: Duration,
    users: usize,
) -> anyhow::Result<Value> {
    let attacker_account = sign_up(target, &format!("{prefix}-a"), 1).await?.remove(0);
    let legit = Arc::new(sign_up(target, &format!("{prefix}-u"), users).await?);
    let client = Arc::new(LoginAndPoll::new(target));
    let login = |tally: Shared| {
        let (client, legit) = (client.clone(), legit.clone());
        move |n: usize| {
            let (client, legit, tally) = (client.clone(), legit.clone(), tally.clone());
            async move {
                probe(&tally, client.login(n, &legit[n % legit.len()].username)).await;
            }
        }
    };
    let baseline = Shared::default();
    let quick = Instant::now() + interval * BASELINE as u32;
    every(interval, quick, login(baseline.clone())).await;

    let started = Instant::now();
    let ramp = Duration::from_secs(2);
    let until = started + ramp + duration;
    let attacker = Shared::default();
    let http = http(ATTACKER);
    let url = format!("{}/v1/password", target.base);
    let body = json!({ "current_password": "not-the-password-0", "new_password": "another-password-0123456789" });
    let loops: Vec<_> = (0..in_flight)
        .map(|_| {
            let (http, url, body, attacker) =
                (http.clone(), url.clone(), body.clone(), attacker.clone());
            let access = attacker_account.access.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    let request = http.put(&url).bearer_auth(&access).json(&body);
                    let begin = Instant::now();
                    let Ok(result) = timeout_at(until, request.send()).await else {
                        break;
                    };
                    let (outcome, _) = self::outcome(result).await;
                    // A wrong password (403) is what it asks for: a hash
                    // done.
                    let hashed = is_wrong_password(&outcome);
                    attacker
                        .lock()
                        .unwrap()
                        .record(&outcome, hashed, begin.elapsed());
                    if !hashed {
                        // Refused or failed: a moment before the next, so
                        // that refusals do not spin.
                        sleep(Duration::from_millis(200)).await;
                    }
                }
            })
        })
        .collect();
    sleep(ramp).await;
    let during = Shared::default();
    every(interval, until, login(during.clone())).await;
    for task in loops {
        let _ = timeout(Duration::from_secs(5), task).await;
    }
    let attacker = attacker.lock().unwrap();
    let during = during.lock().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let hashed = attacker.count("403") + attacker.count("401");
    Ok(json!({
        "attacker": {
            "requests": attacker.json(),
            "wrong_password_answers_per_s": (hashed as f64 / seconds * 10.0).round() / 10.0,
        },
        "legitimate": { "baseline": baseline.lock().unwrap().json(), "during": during.json() },
        "summary": {
            "attacker": format!(
                "1 account, {in_flight} in flight: {} wrong-password answers ({:.0}/s), {} refused or failed",
                hashed, hashed as f64 / seconds, attacker.attempts() - hashed
            ),
            "legitimate": format!(
                "logins: {}; {} × 503",
                during.line("ok"),
                during.count("503")
            ),
        },
    }))
}

// ---------------------------------------------------------------- item 7

/// One attacker's socket sending to `to` at `rate` a second until it has
/// been told `queue_full` three times or `until`, at most 200 sends
/// awaiting an answer. Returns when it stopped on `queue_full`.
async fn flood(
    target: Target,
    account: Account,
    to: uuid::Uuid,
    rate: u32,
    until: Instant,
    tally: Shared,
    started: Instant,
) -> anyhow::Result<Option<Duration>> {
    let mut ws = client::connect(&target, Some(ATTACKER), &account.access)
        .await
        .map_err(|e| anyhow::anyhow!("attacker socket: {}", e.cause()))?;
    client::until_drained(&mut ws).await?;
    let (mut sink, mut frames) = ws.split();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let body = b64(&[0x5a; 16]);
    let (mut in_flight, mut full, mut stopping, mut seq) = (0u32, 0u32, false, 0u64);
    let mut full_at = None;
    let mut sent_at = std::collections::HashMap::new();
    loop {
        if stopping && in_flight == 0 {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if !stopping && in_flight < 200 => {
                seq += 1;
                let frame = json!({ "type": "send", "ref": seq.to_string(), "to": to, "body": body });
                sink.send(Message::Text(frame.to_string().into())).await?;
                sent_at.insert(seq.to_string(), Instant::now());
                in_flight += 1;
            }
            frame = frames.next() => {
                let Some(Ok(frame)) = frame else { break };
                let Message::Text(text) = frame else { continue };
                let Ok(frame) = serde_json::from_str::<Value>(&text) else { continue };
                let took = frame["ref"].as_str().and_then(|r| sent_at.remove(r)).map(|t| t.elapsed());
                let outcome = match frame["type"].as_str() {
                    Some("sent") => "sent".to_owned(),
                    Some("error") => format!("error {}", frame["code"].as_str().unwrap_or("?")),
                    _ => continue,
                };
                in_flight = in_flight.saturating_sub(1);
                tally.lock().unwrap().record(&outcome, outcome == "sent", took.unwrap_or_default());
                if outcome == "error queue_full" {
                    full_at.get_or_insert(started.elapsed());
                    full += 1;
                    stopping |= full >= 3;
                }
            }
            _ = sleep_until(until) => break,
        }
    }
    let _ = sink.close().await;
    Ok(full_at)
}

async fn inbox_lock(
    target: &Target,
    prefix: &str,
    attackers: usize,
    rate: u32,
    fill: Duration,
    sends: usize,
) -> anyhow::Result<Value> {
    let mut accounts = sign_up(target, &format!("{prefix}-"), attackers + 2).await?;
    let (victim, sender) = (accounts.remove(0), accounts.remove(0));
    let started = Instant::now();
    let until = started + fill;
    let attacker = Shared::default();
    let floods: Vec<_> = accounts
        .into_iter()
        .map(|account| {
            let (target, tally) = (target.clone(), attacker.clone());
            tokio::spawn(flood(
                target,
                account,
                victim.user_id,
                rate,
                until,
                tally,
                started,
            ))
        })
        .collect();
    let mut full_at = Vec::new();
    let mut flood_errors = Vec::new();
    for task in floods {
        match task.await {
            Ok(Ok(at)) => full_at.extend(at),
            Ok(Err(e)) => flood_errors.push(format!("{e:#}")),
            Err(e) => flood_errors.push(e.to_string()),
        }
    }
    let filled = full_at.iter().min().copied();
    let fill_s = started.elapsed().as_secs_f64();

    // The legitimate sender: one send every half second, never retried.
    let legit = Shared::default();
    let http = http(LEGIT);
    let url = format!("{}/v1/messages", target.base);
    let quick = Instant::now() + Duration::from_millis(500) * sends as u32;
    every(Duration::from_millis(500), quick, |n| {
        let (tally, request) = (legit.clone(), http.post(&url));
        let body =
            json!({ "to": victim.user_id, "body": b64(format!("legitimate {n}").as_bytes()) });
        let request = request.bearer_auth(&sender.access).json(&body);
        async move { probe(&tally, request).await }
    })
    .await;
    let attacker = attacker.lock().unwrap();
    let legit = legit.lock().unwrap();
    let accepted = attacker.count("sent");
    Ok(json!({
        "attacker": {
            "sends": attacker.json(),
            "accepted": accepted,
            "queue_full_after_s": filled.map(|d| d.as_secs_f64()),
            "attackers_stopped_by_queue_full": full_at.len(),
            "fill_s": fill_s,
            "errors": flood_errors,
        },
        "legitimate": { "sends": legit.json() },
        "summary": {
            "attacker": format!(
                "{attackers} accounts × {rate}/s: {accepted} accepted; {}",
                match filled {
                    Some(d) => format!("queue full after {:.1} s", d.as_secs_f64()),
                    None => format!("queue not full after {:.0} s", fill_s),
                }
            ),
            "legitimate": format!(
                "sends to the victim: {}; {} × queue_full",
                legit.line("accepted"),
                legit.count("429 queue_full")
            ),
        },
    }))
}

// ---------------------------------------------------------------- item 9

struct SlowReaders {
    accounts: usize,
    per_user: usize,
    size: usize,
    hold: Duration,
    read_rate: usize,
    every: Duration,
}

/// Reads `rate` bytes a second (a tenth every 100 ms) until the server
/// closes the connection or `until`: how long after `since` it closed
/// (`None`: open at `until`).
async fn read_slowly(
    stream: &mut TcpStream,
    since: Instant,
    until: Instant,
    rate: usize,
) -> Option<Duration> {
    let share = (rate / 10).max(1);
    let mut buf = vec![0u8; share];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        if Instant::now() >= until {
            return None;
        }
        let mut got = 0;
        while got < share {
            match timeout(
                Duration::from_millis(20),
                stream.read(&mut buf[..share - got]),
            )
            .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
                Ok(Ok(n)) => got += n,
                Err(_) => break,
            }
        }
    }
}

async fn slow_readers(
    target: &Target,
    prefix: &str,
    pid: Option<u32>,
    shape: SlowReaders,
) -> anyhow::Result<Value> {
    let mut accounts = sign_up(target, &format!("{prefix}-"), shape.accounts + 1).await?;
    let legit = accounts.remove(0);
    // Each account's queue filled by the next one (each sender stays far
    // under the per-user send burst), and three small messages for the
    // legitimate user to poll.
    let api = Api::bound(target.clone(), ATTACKER);
    let body = vec![0x5au8; shape.size];
    let n = accounts.len();
    let fill_started = Instant::now();
    let work: Vec<(usize, usize)> = (0..shape.per_user)
        .flat_map(|m| (0..n).map(move |i| (i, m)))
        .collect();
    let bar = client::progress(work.len() as u64, "queueing");
    let queued: Vec<anyhow::Result<uuid::Uuid>> = stream::iter(work)
        .map(|(i, _)| {
            let (api, body, bar) = (api.clone(), &body, bar.clone());
            let (from, to) = (&accounts[(i + 1) % n], accounts[i].user_id);
            async move {
                let sent = api.send(from, to, body).await;
                bar.inc(1);
                sent
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    bar.finish_and_clear();
    let queued_ok = queued.iter().filter(|r| r.is_ok()).count();
    let first_error = queued
        .iter()
        .find_map(|r| r.as_ref().err().map(|e| format!("{e:#}")));
    for k in 0..3 {
        api.send(
            &accounts[0],
            legit.user_id,
            format!("for the legitimate user {k}").as_bytes(),
        )
        .await
        .context("queueing the legitimate user's messages")?;
    }
    let fill_s = fill_started.elapsed().as_secs_f64();

    let poller = http(LEGIT);
    let poll = |tally: Shared| {
        let (poller, url, access) = (
            poller.clone(),
            format!("{}/v1/messages?limit=100", target.base),
            legit.access.clone(),
        );
        move |_| {
            let (tally, request) = (tally.clone(), poller.get(&url).bearer_auth(&access));
            async move { probe(&tally, request).await }
        }
    };
    let baseline = Shared::default();
    let quick = Instant::now() + Duration::from_millis(300) * BASELINE as u32;
    every(Duration::from_millis(300), quick, poll(baseline.clone())).await;

    let sampler = Sampler::start(pid);
    let started = Instant::now();
    let until = started + shape.hold;
    let upgrades = Shared::default();
    let held = Arc::new(Mutex::new(Held::default()));
    let readers: Vec<_> = accounts
        .iter()
        .map(|account| {
            let (addr, token) = (target.addr, account.access.clone());
            let (upgrades, held, read_rate) = (upgrades.clone(), held.clone(), shape.read_rate);
            tokio::spawn(async move {
                // Again whenever the server closes it: each connection
                // drains the unacknowledged backlog from the start.
                while Instant::now() < until {
                    let begin = Instant::now();
                    match timeout_at(until, upgrade(addr, ATTACKER, Some(&token), true)).await {
                        Ok(Ok((101, mut stream))) => {
                            upgrades
                                .lock()
                                .unwrap()
                                .record("101", true, begin.elapsed());
                            let closed = read_slowly(&mut stream, begin, until, read_rate).await;
                            held.lock().unwrap().record(closed);
                        }
                        Ok(Ok((status, _))) => {
                            let status = status.to_string();
                            upgrades
                                .lock()
                                .unwrap()
                                .record(&status, false, begin.elapsed());
                            sleep(Duration::from_secs(1)).await;
                        }
                        Ok(Err(e)) => {
                            let cause = format!("tcp {:?}", e.kind());
                            upgrades
                                .lock()
                                .unwrap()
                                .record(&cause, false, begin.elapsed());
                            sleep(Duration::from_secs(1)).await;
                        }
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    // The drains start at once; the polls meet them a moment later.
    sleep(Duration::from_secs(2).min(shape.hold / 2)).await;
    let during = Shared::default();
    every(shape.every, until, poll(during.clone())).await;
    for task in readers {
        let _ = timeout(Duration::from_secs(5), task).await;
    }
    let server = sampler.finish();
    let upgrades = upgrades.lock().unwrap();
    let during = during.lock().unwrap();
    let held = held.lock().unwrap();
    let queued_mb = (queued_ok * shape.size) as f64 / 1e6;
    Ok(json!({
        "setup": {
            "queued": queued_ok,
            "queued_mb": queued_mb,
            "fill_s": fill_s,
            "first_error": first_error,
        },
        "attacker": { "upgrades": upgrades.json(), "held": held.json() },
        "server": server,
        "legitimate": { "baseline": baseline.lock().unwrap().json(), "during": during.json() },
        "summary": {
            "attacker": format!(
                "{} slow sockets ({} KB/s each, reconnecting when closed) over {:.0} MB of backlog: \
                 {} upgrades, {} closed by the server, {} open after {} s",
                shape.accounts, shape.read_rate / 1000, queued_mb, upgrades.count("101"),
                held.closed.count(), held.open_at_end, shape.hold.as_secs()
            ),
            "legitimate": format!(
                "polls: {}; {} × 503",
                during.line("200"),
                during.count("503")
            ),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_tallies() {
        assert_eq!(status_of(b"HTTP/1.1 429 Too Many Requests\r\n"), Some(429));
        assert_eq!(status_of(b"HTTP/1.1 101 Switching\r\n\r\n"), Some(101));
        assert_eq!(status_of(b"garbage"), None);
        let mut tally = Tally::default();
        tally.record("ready", true, Duration::from_millis(5));
        tally.record("429", false, Duration::from_millis(1));
        tally.record("429", false, Duration::from_millis(1));
        assert_eq!(
            (tally.attempts(), tally.succeeded(), tally.count("429")),
            (3, 1, 2)
        );
        let line = tally.line("got ready");
        assert!(line.starts_with("1 of 3 got ready (2 × 429)"), "{line}");
        // The addresses stay apart from the attacker's and the client's.
        assert_ne!(login_source(0), LEGIT);
        assert_eq!(login_source(LOGIN_SOURCES), login_source(0));
        assert_ne!(signup_source(249), signup_source(250));
    }
}
