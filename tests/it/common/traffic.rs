//! Steady REST traffic for the tests that break things under a running
//! server (durability, faults): [`Senders`] send over `POST /v1/messages`
//! (or another send: a [`Request`]) from several tasks at once, timing
//! every request and sorting every answer, so that a test can assert that
//! each request was answered, in time, with `201` or a clean `503
//! unavailable`; [`assert_all_queued`]
//! then checks that every message answered `201` is in the recipient's
//! queue.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use super::{Account, Api, b64, eventually_within};

/// The server's `SEALPOST_DB_TIMEOUT`, left at its default by the tests:
/// no request may wait longer for the database.
pub const DB_TIMEOUT: Duration = Duration::from_secs(5);

/// What an answer may take beyond its deadline: scheduling on a shared
/// two-core machine. A functional bound (nothing waits past its deadline),
/// not a performance target.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// The longest any request may take to be answered.
pub const ANSWER_BOUND: Duration = DB_TIMEOUT.saturating_add(ANSWER_MARGIN);

/// Senders running at once: enough that a fault lands while requests are in
/// flight, and that the committer's batches hold several messages.
pub const SENDERS: usize = 8;

/// How long the client waits for an answer before it records none: far
/// past [`ANSWER_BOUND`], so that a server that hangs fails the bound
/// instead of hanging the test.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 201, with the message's id.
    Created(Uuid),
    /// 503 with the JSON error code `unavailable`.
    Unavailable,
    /// Another status or body, as text.
    Other(String),
    /// No answer: refused, reset, or the client's timeout.
    Lost(String),
}

/// One request: its answer and how long it took.
#[derive(Debug, Clone)]
pub struct Sent {
    pub answer: Answer,
    pub took: Duration,
}

/// How the senders go.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Each sender stops at its first answer other than 201 (a test that
    /// kills the server), or goes on through them until stopped (a test
    /// that breaks the database under it).
    pub stop_at_refusal: bool,
    /// Between one sender's requests.
    pub pace: Duration,
    /// Requests per sender at most, so that the test ends even if it is
    /// never stopped.
    pub per_sender: usize,
}

impl Plan {
    /// As fast as the server answers, until the first refusal.
    pub const UNTIL_REFUSED: Plan = Plan {
        stop_at_refusal: true,
        pace: Duration::ZERO,
        per_sender: 300,
    };

    /// A steady trickle through any failure: 8 senders every 20 ms, a
    /// few hundred requests a second, on a machine other tests share.
    pub const STEADY: Plan = Plan {
        stop_at_refusal: false,
        pace: Duration::from_millis(20),
        per_sender: 10_000,
    };
}

/// What every request of [`Senders`] posts: where, and the JSON body of
/// sender `s`'s `n`th request.
#[derive(Clone)]
pub struct Request {
    pub path: &'static str,
    pub body: Arc<dyn Fn(usize, usize) -> Value + Send + Sync>,
}

impl Request {
    /// `POST /v1/messages` to `to`, with the plain body `"{s}:{n}"`.
    pub fn single(to: Uuid) -> Self {
        Self {
            path: "/v1/messages",
            body: Arc::new(
                move |sender, n| json!({ "to": to, "body": b64(format!("{sender}:{n}").as_bytes()) }),
            ),
        }
    }
}

/// [`SENDERS`] tasks sending from one account.
pub struct Senders {
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    tasks: JoinSet<()>,
}

impl Senders {
    /// Plain-body sends to `to`.
    pub fn start(api: &Api, from: &Account, to: Uuid, plan: Plan) -> Self {
        Self::start_with(api, from, Request::single(to), plan)
    }

    /// Sends of `request`.
    pub fn start_with(api: &Api, from: &Account, request: Request, plan: Plan) -> Self {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for sender in 0..SENDERS {
            let (api, token) = (api.clone(), from.access.clone());
            let (sent, stop, request) = (sent.clone(), stop.clone(), request.clone());
            tasks.spawn(async move {
                for n in 0..plan.per_sender {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let body = (request.body)(sender, n);
                    let one = send(&api, &token, request.path, &body).await;
                    let refused = !matches!(one.answer, Answer::Created(_));
                    sent.lock().unwrap().push(one);
                    if refused && plan.stop_at_refusal {
                        return;
                    }
                    tokio::time::sleep(plan.pace).await;
                }
            });
        }
        Self { sent, stop, tasks }
    }

    /// Every request so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    /// How many were answered 201 so far.
    pub fn created(&self) -> usize {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| matches!(s.answer, Answer::Created(_)))
            .count()
    }

    /// Waits (at most `limit`) until `n` sends were answered 201.
    pub async fn until_created(&self, n: usize, limit: Duration) {
        eventually_within(&format!("{n} sends answered 201"), limit, async || {
            (self.created() >= n).then_some(())
        })
        .await;
    }

    /// Waits until every sender has stopped on its own.
    pub async fn join(mut self) -> Vec<Sent> {
        while let Some(done) = self.tasks.join_next().await {
            done.expect("a sender");
        }
        self.sent()
    }

    /// Stops the senders; returns every request, in the order answered.
    pub async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }
}

/// One timed `POST` of a send.
async fn send(api: &Api, token: &str, path: &str, body: &Value) -> Sent {
    let started = Instant::now();
    let request = api
        .http
        .post(api.url(path))
        .bearer_auth(token)
        .timeout(CLIENT_TIMEOUT)
        .json(body);
    let answer = match request.send().await {
        Err(err) => Answer::Lost(err.to_string()),
        Ok(response) => {
            let status = response.status().as_u16();
            match response.bytes().await {
                Err(err) => Answer::Lost(format!("{status}, body lost: {err}")),
                Ok(bytes) => classify(status, &bytes),
            }
        }
    };
    Sent {
        answer,
        took: started.elapsed(),
    }
}

fn classify(status: u16, bytes: &[u8]) -> Answer {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    let text = || format!("{status} {}", String::from_utf8_lossy(bytes));
    match (status, body) {
        (201, Some(body)) => match body["id"].as_str().and_then(|id| id.parse().ok()) {
            Some(id) => Answer::Created(id),
            None => Answer::Other(text()),
        },
        (503, Some(body)) if body["error"]["code"] == "unavailable" => Answer::Unavailable,
        _ => Answer::Other(text()),
    }
}

/// The ids answered 201, in the order answered.
pub fn created_ids(sent: &[Sent]) -> Vec<Uuid> {
    sent.iter()
        .filter_map(|s| match s.answer {
            Answer::Created(id) => Some(id),
            _ => None,
        })
        .collect()
}

/// Asserts that every request was answered (none lost), and with 201 or
/// a clean 503 `unavailable`: never a 500, never a hang.
#[track_caller]
pub fn assert_created_or_unavailable(sent: &[Sent]) {
    assert!(!sent.is_empty(), "no request was sent");
    let other: Vec<&Sent> = sent
        .iter()
        .filter(|s| !matches!(s.answer, Answer::Created(_) | Answer::Unavailable))
        .collect();
    assert!(
        other.is_empty(),
        "{} of {} requests answered neither 201 nor 503 unavailable: {:?}",
        other.len(),
        sent.len(),
        &other[..other.len().min(10)]
    );
}

/// Asserts that no request that got an answer waited longer than
/// [`ANSWER_BOUND`].
#[track_caller]
pub fn assert_answered_in_time(sent: &[Sent]) {
    let answered: Vec<&Sent> = sent
        .iter()
        .filter(|s| !matches!(s.answer, Answer::Lost(_)))
        .collect();
    assert!(!answered.is_empty(), "no request was answered");
    let late: Vec<&&Sent> = answered.iter().filter(|s| s.took > ANSWER_BOUND).collect();
    assert!(
        late.is_empty(),
        "{} of {} requests waited past their deadline ({DB_TIMEOUT:?} + {ANSWER_MARGIN:?}): {:?}",
        late.len(),
        answered.len(),
        &late[..late.len().min(10)]
    );
}

/// The longest an answered request took, and how long those answered
/// `answer`-like took at most: for a test's report.
pub fn slowest(sent: &[Sent], pick: impl Fn(&Answer) -> bool) -> Option<Duration> {
    sent.iter()
        .filter(|s| pick(&s.answer))
        .map(|s| s.took)
        .max()
}

/// Asserts that every id in `accepted` is queued for `who`, and that the
/// queue is in id order. Fails on an empty `accepted`: a test whose sends
/// were all refused has proved nothing.
pub async fn assert_all_queued(api: &Api, who: &Account, accepted: &[Uuid]) {
    assert!(!accepted.is_empty(), "no message was accepted");
    let queued: Vec<Uuid> = api
        .inbox(who)
        .await
        .iter()
        .map(|m| super::id(&m["id"]))
        .collect();
    let present: BTreeSet<Uuid> = queued.iter().copied().collect();
    let lost: Vec<&Uuid> = accepted.iter().filter(|id| !present.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} accepted messages lost: {lost:?}",
        lost.len(),
        accepted.len()
    );
    assert!(
        queued.windows(2).all(|w| w[0] < w[1]),
        "queue out of id order"
    );
}
