//! Prometheus metrics: what the server counts about itself, and the listener
//! that shows them (`SEALPOST_METRICS_ADDR`, `GET /metrics` in the text
//! format).
//!
//! [`Metrics`] owns every metric as a handle of the `metrics` crate,
//! registered once at start-up with this server's own Prometheus recorder.
//! No process-global recorder is installed: each server (and each test
//! server in one process) counts on its own, and recording is an atomic
//! operation on a handle held here, with no lookup by name or label.
//!
//! Labels take their values from small fixed sets (a wire error code, a
//! close reason, an HTTP status class), one handle per value, so no user id
//! or other unbounded value can ever become a series.
//!
//! With metrics off every handle is a no-op: nothing is recorded, nothing
//! is served, and the sweeper skips its queue-depth query.
//!
//! The metric names, types and labels are listed for operators in README.md
//! ("Metrics"); keep that list in step with this file.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::error::{self, Error};
use crate::http1;
use crate::limits::connections::HttpConnections;

/// Upper bounds of the buckets of every `_seconds` histogram: from 100 µs
/// (a push or a commit on an idle server) to 10 s (the hashing queue times
/// out there, and `SEALPOST_DB_TIMEOUT` is 5 s by default).
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Operations per committer batch (inserts, acks, barriers): powers of four
/// up to 65,536, the ops the committer admits at once, which bound a batch
/// (its rows stop at 16,384, but a barrier weighs none).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
];

/// How often histogram samples are folded into their buckets between
/// scrapes. The recorder keeps each sample (16 bytes) until then, so this
/// bounds its memory when nobody scrapes: a few seconds of pushes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How long the metrics listener may take to finish a scrape at shutdown.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The Prometheus text format's media type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

const DB_WRITE_BATCH: &str = "sealpost_db_write_batch_ops";

/// A label whose values are a fixed set; a value's index is its position.
pub trait LabelValue: Copy {
    const KEY: &'static str;
    const VALUES: &'static [&'static str];
    fn index(self) -> usize;
}

/// Declares an enum of label values; each variant's value is the string
/// beside it, and its discriminant indexes [`LabelValue::VALUES`].
macro_rules! label_values {
    ($(#[$meta:meta])* $name:ident ($key:literal) {
        $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }
        impl LabelValue for $name {
            const KEY: &'static str = $key;
            const VALUES: &'static [&'static str] = &[$($value,)+];
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label_values! {
    /// How an accepted message travels.
    Kind ("kind") {
        /// Stored until acked; counted once durable (`sent` or 201).
        Stored = "stored",
        /// Pushed to whoever is online now, never stored.
        Ephemeral = "ephemeral",
    }
}

label_values! {
    /// Where a message written to a socket came from.
    Source ("source") {
        /// Pushed as it was accepted.
        Live = "live",
        /// Read from the queue while the connection drained its backlog.
        Backlog = "backlog",
    }
}

label_values! {
    /// What crosses the broker between nodes.
    Traffic ("kind") {
        /// Stored messages, published once committed.
        Push = "push",
        /// Ephemeral messages, never stored.
        Ephemeral = "ephemeral",
        /// Notices for an account's sockets: receipts, device changes,
        /// displacements.
        Notice = "notice",
        /// Cluster-wide events: revocations, directory changes, re-reads.
        Cluster = "cluster",
    }
}

label_values! {
    /// Which rate limit refused a request.
    Limited ("scope") {
        /// Sign-up, login and refresh per client IP.
        Auth = "auth",
        /// Sends per user, REST and WebSocket together.
        Send = "send",
        /// Sends from one user to one recipient.
        Pair = "pair",
        /// Password checks of a signed-in account: its budget, its lockout
        /// after wrong passwords, its one hash at a time.
        Password = "password",
    }
}

label_values! {
    /// Which HTTP listener a connection came to.
    Listener ("listener") {
        /// The API's (`SEALPOST_ADDR`).
        Api = "api",
        /// The metrics' own (`SEALPOST_METRICS_ADDR`).
        Metrics = "metrics",
    }
}

label_values! {
    /// Why authentication failed.
    AuthFailure ("reason") {
        /// A login with an unknown username or a wrong password.
        Credentials = "credentials",
        /// A wrong current password on a password change or account deletion.
        CurrentPassword = "current_password",
        /// No bearer token, or a socket that sent no `auth` frame in time.
        MissingToken = "missing_token",
        /// An access token that is malformed, forged or expired.
        AccessToken = "access_token",
        /// An access token of a revoked session.
        RevokedSession = "revoked_session",
        /// An unknown or expired refresh token.
        RefreshToken = "refresh_token",
        /// A refresh token presented again after it was spent: a sign of
        /// theft, on which every session of the user is revoked.
        RefreshReuse = "refresh_reuse",
    }
}

label_values! {
    /// Why a WebSocket ended.
    Closed ("reason") {
        /// The client closed it.
        Client = "client",
        /// The peer vanished: EOF or a read error without a close, a write
        /// that failed or timed out, or pings left unanswered.
        Gone = "gone",
        /// The server is shutting down.
        Shutdown = "shutdown",
        /// The access token in force expired.
        TokenExpired = "token_expired",
        /// Its session was revoked, or its device removed.
        Revoked = "revoked",
        /// A newer exclusive socket of its device took over (4409).
        Displaced = "displaced",
        /// Its outbound queue overflowed: a reader that fell behind.
        Overflow = "overflow",
        /// A backlog page not written within
        /// `SEALPOST_WS_PAGE_WRITE_TIMEOUT`: a reader too slow for it.
        Slow = "slow",
        /// It did not authenticate (bad token, or no `auth` frame in time).
        Unauthenticated = "unauthenticated",
        /// The device already held as many sockets as it may.
        TooManyConnections = "too_many_connections",
        /// Too many malformed frames, a frame that breaks the protocol, or a
        /// message not finished in time.
        Malformed = "malformed",
        /// A frame over the size limit.
        TooBig = "too_big",
        /// The server could not serve it (backlog or registration failed).
        Error = "error",
    }
}

label_values! {
    /// What came of a wake-up (or of a device considered for one).
    WakeupOutcome ("outcome") {
        /// The push service accepted it.
        Sent = "sent",
        /// The service said the target is gone: it was dropped.
        Gone = "gone",
        /// A try failed (5xx, timeout, 429) and another is scheduled.
        Retried = "retried",
        /// Every try failed, or the target did not open: given up.
        Failed = "failed",
        /// The service refused it as our configuration's fault (400, 401,
        /// 403): given up, the target kept.
        ConfigError = "config_error",
        /// Not scheduled: one was pending or cooling already.
        Coalesced = "coalesced",
    }
}

/// A counter with one label: one handle per value of `L`.
struct Labelled<L> {
    handles: Box<[Counter]>,
    _label: PhantomData<L>,
}

impl<L: LabelValue> Labelled<L> {
    fn get(&self, value: L) -> &Counter {
        &self.handles[value.index()]
    }
}

/// The HTTP status classes, the values of `class` on the response counter.
const STATUS_CLASSES: &[&str] = &["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every metric of one server. Shared as an `Arc` through
/// [`AppState`](crate::state::AppState) and by the components that record.
pub struct Metrics {
    /// Renders the text format; `None` when metrics are off.
    handle: Option<PrometheusHandle>,
    /// Authenticated WebSockets registered in the hub (kept by the hub).
    pub ws_connections: Gauge,
    /// Users with at least one such socket (kept by the hub).
    pub users_online: Gauge,
    accepted: Labelled<Kind>,
    /// Indexed like [`error::CODES`].
    rejected: Box<[Counter]>,
    pushed: Labelled<Source>,
    /// Queued messages settled by acks (deleted, or never written).
    pub acked: Counter,
    /// Queued messages the sweeper deleted past the message TTL.
    pub expired: Counter,
    /// From acceptance to the `message` frame written to a recipient's
    /// socket, for live pushes.
    pub push_latency: Histogram,
    /// One committer batch's transaction.
    pub db_write: Histogram,
    /// Operations (inserts and acks) in one committer batch.
    pub db_write_batch: Histogram,
    /// Committer batches that failed; their callers were told.
    pub db_write_errors: Counter,
    /// Database calls that passed their deadline (a stalled database).
    pub db_timeouts: Counter,
    /// Message copies acked before they were written: never written.
    pub copies_elided: Counter,
    /// Message copies written to the queue.
    pub copies_written: Counter,
    /// Sends answered with the id their `client_id` already had.
    pub sends_repeated: Counter,
    /// Backlog reads refused because the drain budget stayed full.
    pub drains_refused: Counter,
    /// Messages queued in the store, sampled by the sweeper.
    pub queued_messages: Gauge,
    /// The longest one device's queue, sampled by the sweeper. The name is
    /// from before devices, kept so that dashboards and alerts hold.
    pub queued_max_per_user: Gauge,
    /// Devices in the database, sampled by the sweeper.
    pub devices: Gauge,
    /// Receipts dropped because the socket's queue was full.
    pub receipts_dropped: Counter,
    rate_limited: Labelled<Limited>,
    auth_failures: Labelled<AuthFailure>,
    /// Time a password hash or check waited for a hashing slot.
    pub hash_wait: Histogram,
    /// Indexed like [`STATUS_CLASSES`].
    http_responses: Box<[Counter]>,
    header_timeouts: Labelled<Listener>,
    connections_refused: Labelled<Listener>,
    ws_closed: Labelled<Closed>,
    /// The cluster's broker (no-ops but `node_info` on one node).
    pub broker: BrokerMetrics,
    /// Wake-ups of offline devices ([`crate::push`]).
    pub push: PushMetrics,
    registrar: Option<PrometheusRecorder>,
}

/// What the broker counts (see [`crate::cluster`]).
pub struct BrokerMetrics {
    /// 1 while the node's NATS connection is up, 0 while it is not.
    pub connected: Gauge,
    published: Labelled<Traffic>,
    /// Publishes not sent: the broker was down, or its queue full.
    pub publish_failed: Counter,
    received: Labelled<Traffic>,
    /// From acceptance on the sending node to the push queued here.
    pub push_latency: Histogram,
    pub disconnects: Counter,
    /// Backlog re-reads of this node's sockets after lost broker traffic.
    pub rereads: Counter,
    /// Accounts this node holds a subscription for.
    pub subscriptions: Gauge,
}

/// What the wake-up scheduler counts ([`crate::push::scheduler`]). No label
/// carries a target, a user or a device: only the provider's kind.
pub struct PushMetrics {
    /// Indexed by provider kind, then [`WakeupOutcome`].
    wakeups: Box<[Box<[Counter]>]>,
    /// Live targets by provider kind, sampled every minute.
    targets: Box<[Gauge]>,
    /// Devices not considered for a wake-up: the scheduler's queue was full.
    pub dropped: Counter,
    /// From a message's commit to the push service's answer to the wake-up
    /// it caused.
    pub latency: Histogram,
}

/// The provider kinds, the values of `provider` on the push metrics.
const PROVIDERS: &[crate::push::target::Kind] = &[
    crate::push::target::Kind::WebPush,
    crate::push::target::Kind::Apns,
    crate::push::target::Kind::Fcm,
];

fn provider_index(kind: crate::push::target::Kind) -> usize {
    PROVIDERS.iter().position(|k| *k == kind).unwrap_or(0)
}

impl PushMetrics {
    pub fn wakeup(&self, kind: crate::push::target::Kind, outcome: WakeupOutcome) {
        self.wakeups[provider_index(kind)][outcome.index()].increment(1);
    }

    /// `messages` committed for one device that wake it no further: a
    /// wake-up pending or cooling covers them. Counted per copy, so that
    /// over a run `sent` + `coalesced` is about the copies committed for
    /// offline devices with a target.
    pub fn coalesced(&self, kind: crate::push::target::Kind, messages: u32) {
        if messages > 0 {
            self.wakeups[provider_index(kind)][WakeupOutcome::Coalesced.index()]
                .increment(u64::from(messages));
        }
    }

    /// Sets the targets gauge from a count by kind (kinds not listed: 0).
    pub fn set_targets(&self, counts: &[(crate::push::target::Kind, u64)]) {
        for (i, kind) in PROVIDERS.iter().enumerate() {
            let n = counts
                .iter()
                .filter(|(k, _)| k == kind)
                .map(|(_, n)| *n)
                .sum::<u64>();
            self.targets[i].set(n as f64);
        }
    }
}

/// What the accept loop of one HTTP listener counts; handles into
/// [`Metrics`], cheap to clone into each connection's task.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Connections cut off in the middle of a request head.
    pub header_timeouts: Counter,
    /// Connections closed at accept: their address had its share open.
    pub refused: Counter,
}

impl BrokerMetrics {
    pub fn published(&self, traffic: Traffic) {
        self.published.get(traffic).increment(1);
    }

    pub fn received(&self, traffic: Traffic) {
        self.received.get(traffic).increment(1);
    }
}

impl Metrics {
    /// Metrics recorded by a recorder of their own, when `enabled`; no-ops
    /// otherwise.
    pub fn new(enabled: bool) -> Self {
        if !enabled {
            return Self::disabled();
        }
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(DB_WRITE_BATCH.into()), BATCH_BUCKETS)
            })
            // Only an empty bucket list is refused, and these are constants.
            .expect("non-empty buckets")
            .build_recorder();
        let mut metrics = Self::register(&Registrar(Some(&recorder)));
        metrics.handle = Some(recorder.handle());
        metrics.registrar = Some(recorder);
        metrics
    }

    /// Every handle a no-op: for servers with metrics off, and unit tests.
    pub fn disabled() -> Self {
        Self::register(&Registrar(None))
    }

    fn register(r: &Registrar<'_>) -> Self {
        Self {
            handle: None,
            ws_connections: r.gauge(
                "sealpost_ws_connections",
                "Authenticated WebSocket connections open on this node.",
            ),
            users_online: r.gauge(
                "sealpost_users_online",
                "Users with at least one authenticated WebSocket on this node.",
            ),
            accepted: r.labelled(
                "sealpost_messages_accepted_total",
                "Messages accepted: stored ones once durable, ephemeral ones once pushed.",
            ),
            rejected: r.counters(
                "sealpost_messages_rejected_total",
                "Sends refused, by wire error code (a failed commit included).",
                "code",
                &error::CODES,
            ),
            pushed: r.labelled(
                "sealpost_messages_pushed_total",
                "Message frames written to a recipient's WebSocket.",
            ),
            acked: r.counter(
                "sealpost_messages_acked_total",
                "Queued messages settled by an acknowledgement.",
            ),
            expired: r.counter(
                "sealpost_messages_expired_total",
                "Queued messages deleted by the sweeper past the message TTL.",
            ),
            push_latency: r.histogram(
                "sealpost_push_latency_seconds",
                "From a message's acceptance to its frame written to a recipient's socket (live pushes).",
            ),
            db_write: r.histogram(
                "sealpost_db_write_seconds",
                "Duration of one committer batch's database transaction.",
            ),
            db_write_batch: r.histogram(
                DB_WRITE_BATCH,
                "Operations (message inserts and acks) written in one committer batch.",
            ),
            db_write_errors: r.counter(
                "sealpost_db_write_errors_total",
                "Committer batches that failed to be written.",
            ),
            db_timeouts: r.counter(
                "sealpost_db_timeouts_total",
                "Database calls abandoned at their deadline (SEALPOST_DB_TIMEOUT): the database did not answer.",
            ),
            copies_elided: r.counter(
                "sealpost_copies_elided_total",
                "Message copies acked by their device before they were written, and so never written.",
            ),
            copies_written: r.counter(
                "sealpost_copies_written_total",
                "Message copies written to a device's queue.",
            ),
            drains_refused: r.counter(
                "sealpost_drains_refused_total",
                "Backlog reads refused with unavailable after waiting for their turn or the drain budget: 10 s for a poll, 60 s for a socket's drain.",
            ),
            sends_repeated: r.counter(
                "sealpost_sends_repeated_total",
                "Sends whose client_id was already accepted: answered with the first id, nothing stored again.",
            ),
            queued_messages: r.gauge(
                "sealpost_queued_messages",
                "Messages queued in the store, sampled every sweep interval.",
            ),
            queued_max_per_user: r.gauge(
                "sealpost_queued_messages_max_per_user",
                "The longest single device's queue, sampled every sweep interval.",
            ),
            devices: r.gauge(
                "sealpost_devices",
                "Devices of all accounts, sampled every sweep interval.",
            ),
            receipts_dropped: r.counter(
                "sealpost_receipts_dropped_total",
                "Delivery receipts dropped because the sender's socket queue was full.",
            ),
            rate_limited: r.labelled(
                "sealpost_rate_limited_total",
                "Requests refused by a rate limit.",
            ),
            auth_failures: r.labelled(
                "sealpost_auth_failures_total",
                "Failed authentications, by reason.",
            ),
            hash_wait: r.histogram(
                "sealpost_password_hash_wait_seconds",
                "Time a password hash or check waited for a hashing slot.",
            ),
            http_responses: r.counters(
                "sealpost_http_responses_total",
                "HTTP responses on the API listener, by status class.",
                "class",
                STATUS_CLASSES,
            ),
            header_timeouts: r.labelled(
                "sealpost_http_header_timeouts_total",
                "HTTP connections closed because a request head they had begun was not complete within SEALPOST_HEADER_READ_TIMEOUT (slowloris), by listener.",
            ),
            connections_refused: r.labelled(
                "sealpost_http_connections_refused_total",
                "HTTP connections closed at accept because their address had SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP open, by listener.",
            ),
            ws_closed: r.labelled(
                "sealpost_ws_closed_total",
                "WebSockets ended, by reason.",
            ),
            broker: BrokerMetrics {
                connected: r.gauge(
                    "sealpost_broker_connected",
                    "1 while this node's NATS connection is up, 0 while it is down (clusters only).",
                ),
                published: r.labelled(
                    "sealpost_broker_published_total",
                    "Messages this node published to the other nodes, by kind.",
                ),
                publish_failed: r.counter(
                    "sealpost_broker_publish_failed_total",
                    "Publishes not sent (NATS down, or the publish queue full); the nodes re-read backlogs for them.",
                ),
                received: r.labelled(
                    "sealpost_broker_received_total",
                    "Messages this node received from the other nodes, by kind.",
                ),
                push_latency: r.histogram(
                    "sealpost_broker_push_latency_seconds",
                    "From a message's acceptance on another node to its push queued for a socket here (wall clocks).",
                ),
                disconnects: r.counter(
                    "sealpost_broker_disconnects_total",
                    "Times this node lost its NATS connection.",
                ),
                rereads: r.counter(
                    "sealpost_broker_rereads_total",
                    "Backlog re-reads of this node's sockets after broker traffic was lost.",
                ),
                subscriptions: r.gauge(
                    "sealpost_broker_subscriptions",
                    "Accounts this node is subscribed for on NATS (those with a socket here).",
                ),
            },
            push: PushMetrics {
                wakeups: PROVIDERS
                    .iter()
                    .map(|kind| {
                        WakeupOutcome::VALUES
                            .iter()
                            .map(|outcome| {
                                r.labelled_counter2(
                                    "sealpost_wakeups_total",
                                    "Wake-ups of offline devices, by provider and outcome.",
                                    ("provider", kind.as_str()),
                                    (WakeupOutcome::KEY, outcome),
                                )
                            })
                            .collect()
                    })
                    .collect(),
                targets: PROVIDERS
                    .iter()
                    .map(|kind| {
                        r.labelled_gauge(
                            "sealpost_push_targets",
                            "Devices with a live push target, by provider, sampled every minute.",
                            ("provider", kind.as_str()),
                        )
                    })
                    .collect(),
                dropped: r.counter(
                    "sealpost_wakeups_dropped_total",
                    "Devices not considered for a wake-up because the scheduler's queue was full (the database too slow).",
                ),
                latency: r.histogram(
                    "sealpost_wakeup_latency_seconds",
                    "From a message's acceptance to the push service's answer to the wake-up it caused.",
                ),
            },
            registrar: None,
        }
    }

    /// Sets `sealpost_node_info{node, broker} 1`: which node this is, for
    /// dashboards that join on it.
    pub fn node_info(&self, node: &str, broker: &'static str) {
        let Some(recorder) = &self.registrar else {
            return;
        };
        const NAME: &str = "sealpost_node_info";
        recorder.describe_gauge(
            KeyName::from_const_str(NAME),
            None,
            "Always 1; its labels name this node and its broker (local or nats).".into(),
        );
        let key = Key::from_parts(
            NAME,
            vec![
                Label::new("node", node.to_owned()),
                Label::from_static_parts("broker", broker),
            ],
        );
        recorder.register_gauge(&key, &METADATA).set(1.0);
    }

    /// Whether metrics are on: work done only to feed them (a query) is
    /// skipped when not.
    pub fn enabled(&self) -> bool {
        self.handle.is_some()
    }

    /// The current values in the Prometheus text format (empty when off).
    pub fn render(&self) -> String {
        self.handle
            .as_ref()
            .map(PrometheusHandle::render)
            .unwrap_or_default()
    }

    pub fn accepted(&self, kind: Kind) {
        self.accepted.get(kind).increment(1);
    }

    /// A send refused with `err`.
    pub fn rejected(&self, err: &Error) {
        let code = err.code();
        if let Some(i) = error::CODES.iter().position(|c| *c == code) {
            self.rejected[i].increment(1);
        }
    }

    pub fn pushed(&self, source: Source) {
        self.pushed.get(source).increment(1);
    }

    pub fn rate_limited(&self, scope: Limited) {
        self.rate_limited.get(scope).increment(1);
    }

    pub fn auth_failed(&self, reason: AuthFailure) {
        self.auth_failures.get(reason).increment(1);
    }

    pub fn ws_closed(&self, reason: Closed) {
        self.ws_closed.get(reason).increment(1);
    }

    /// What [`crate::http1::serve`] counts of `listener`'s connections.
    pub fn connections(&self, listener: Listener) -> ConnectionMetrics {
        ConnectionMetrics {
            header_timeouts: self.header_timeouts.get(listener).clone(),
            refused: self.connections_refused.get(listener).clone(),
        }
    }

    pub fn http_response(&self, status: StatusCode) {
        let class = usize::from(status.as_u16() / 100).clamp(1, STATUS_CLASSES.len());
        self.http_responses[class - 1].increment(1);
    }
}

/// Registers handles with a recorder, or makes no-ops without one.
struct Registrar<'a>(Option<&'a PrometheusRecorder>);

/// What the `metrics` crate passes to a recorder about a call site; the
/// Prometheus recorder ignores it.
const METADATA: Metadata<'static> = Metadata::new("sealpost", Level::INFO, None);

impl Registrar<'_> {
    fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        self.labelled_counter(name, help, None)
    }

    fn labelled_counter(
        &self,
        name: &'static str,
        help: &'static str,
        label: Option<(&'static str, &'static str)>,
    ) -> Counter {
        let Some(recorder) = self.0 else {
            return Counter::noop();
        };
        recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
        recorder.register_counter(&key(name, label), &METADATA)
    }

    /// One counter per value of a label.
    fn counters(
        &self,
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: &[&'static str],
    ) -> Box<[Counter]> {
        values
            .iter()
            .map(|value| self.labelled_counter(name, help, Some((label, value))))
            .collect()
    }

    fn labelled<L: LabelValue>(&self, name: &'static str, help: &'static str) -> Labelled<L> {
        Labelled {
            handles: self.counters(name, help, L::KEY, L::VALUES),
            _label: PhantomData,
        }
    }

    /// A counter with two labels.
    fn labelled_counter2(
        &self,
        name: &'static str,
        help: &'static str,
        a: (&'static str, &'static str),
        b: (&'static str, &'static str),
    ) -> Counter {
        let Some(recorder) = self.0 else {
            return Counter::noop();
        };
        recorder.describe_counter(KeyName::from_const_str(name), None, help.into());
        let key = Key::from_parts(
            name,
            vec![
                Label::from_static_parts(a.0, a.1),
                Label::from_static_parts(b.0, b.1),
            ],
        );
        recorder.register_counter(&key, &METADATA)
    }

    fn labelled_gauge(
        &self,
        name: &'static str,
        help: &'static str,
        label: (&'static str, &'static str),
    ) -> Gauge {
        let Some(recorder) = self.0 else {
            return Gauge::noop();
        };
        recorder.describe_gauge(KeyName::from_const_str(name), None, help.into());
        recorder.register_gauge(&key(name, Some(label)), &METADATA)
    }

    fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        let Some(recorder) = self.0 else {
            return Gauge::noop();
        };
        recorder.describe_gauge(KeyName::from_const_str(name), None, help.into());
        recorder.register_gauge(&key(name, None), &METADATA)
    }

    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        let Some(recorder) = self.0 else {
            return Histogram::noop();
        };
        let unit = name.ends_with("_seconds").then_some(Unit::Seconds);
        recorder.describe_histogram(KeyName::from_const_str(name), unit, help.into());
        recorder.register_histogram(&key(name, None), &METADATA)
    }
}

fn key(name: &'static str, label: Option<(&'static str, &'static str)>) -> Key {
    match label {
        Some((k, v)) => Key::from_parts(name, vec![Label::from_static_parts(k, v)]),
        None => Key::from_static_name(name),
    }
}

/// Serves `GET /metrics` on `listener` until `stop`, and meanwhile folds
/// histogram samples into their buckets every [`UPKEEP_INTERVAL`]. Plain
/// HTTP, and nothing else on this listener: it is for a scraper on a
/// private network, not for clients. Its connections have the API's limits
/// ([`crate::http1`]): the same head timeout and size, and `per_address`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: http1::Limits,
    per_address: Arc<HttpConnections>,
    stop: CancellationToken,
) {
    let Some(handle) = metrics.handle.clone() else {
        return;
    };
    let upkeep = {
        let (handle, stop) = (handle.clone(), stop.clone());
        async move {
            let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticker.tick() => handle.run_upkeep(),
                }
            }
        }
    };
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let text = handle.render();
            async move {
                (
                    [(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT))],
                    text,
                )
                    .into_response()
            }
        }),
    );
    let serving = async {
        let graceful = http1::serve(
            listener,
            app,
            limits,
            per_address,
            metrics.connections(Listener::Metrics),
            stop.clone().cancelled_owned(),
        );
        // A scraper that holds its connection open must not hold up the
        // rest of shutdown.
        let finished = async {
            stop.cancelled().await;
            tokio::time::sleep(STOP_TIMEOUT).await;
        };
        tokio::select! {
            () = graceful => {}
            () = finished => tracing::warn!("the metrics listener did not stop in time"),
        }
    };
    tokio::join!(serving, upkeep);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_rendered_before_anything_is_recorded() {
        let metrics = Metrics::new(true);
        let text = metrics.render();
        for name in [
            "sealpost_ws_connections",
            "sealpost_users_online",
            "sealpost_messages_accepted_total{kind=\"ephemeral\"} 0",
            "sealpost_messages_rejected_total{code=\"queue_full\"} 0",
            "sealpost_messages_pushed_total{source=\"backlog\"} 0",
            "sealpost_messages_acked_total 0",
            "sealpost_messages_expired_total 0",
            "sealpost_push_latency_seconds_bucket{le=\"0.0001\"} 0",
            "sealpost_db_write_seconds_count 0",
            "sealpost_db_write_batch_ops_bucket{le=\"256\"} 0",
            "sealpost_db_write_errors_total 0",
            "sealpost_db_timeouts_total 0",
            "sealpost_queued_messages 0",
            "sealpost_queued_messages_max_per_user 0",
            "sealpost_rate_limited_total{scope=\"send\"} 0",
            "sealpost_auth_failures_total{reason=\"refresh_reuse\"} 0",
            "sealpost_password_hash_wait_seconds_sum 0",
            "sealpost_http_responses_total{class=\"5xx\"} 0",
            "sealpost_http_header_timeouts_total{listener=\"api\"} 0",
            "sealpost_http_header_timeouts_total{listener=\"metrics\"} 0",
            "sealpost_http_connections_refused_total{listener=\"api\"} 0",
            "sealpost_http_connections_refused_total{listener=\"metrics\"} 0",
            "sealpost_ws_closed_total{reason=\"too_big\"} 0",
            "sealpost_wakeups_total{provider=\"webpush\",outcome=\"coalesced\"} 0",
            "sealpost_wakeups_total{provider=\"fcm\",outcome=\"config_error\"} 0",
            "sealpost_push_targets{provider=\"apns\"} 0",
            "sealpost_wakeups_dropped_total 0",
            "sealpost_wakeup_latency_seconds_count 0",
            "# TYPE sealpost_push_latency_seconds histogram",
            "# HELP sealpost_ws_closed_total WebSockets ended, by reason.",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn recording_moves_only_its_own_series() {
        let metrics = Metrics::new(true);
        metrics.rejected(&Error::QueueFull);
        metrics.rejected(&Error::NotFound("recipient"));
        metrics.http_response(StatusCode::SWITCHING_PROTOCOLS);
        metrics.http_response(StatusCode::TOO_MANY_REQUESTS);
        metrics.ws_closed(Closed::Overflow);
        metrics.push_latency.record(Duration::from_micros(300));
        let text = metrics.render();
        for line in [
            "sealpost_messages_rejected_total{code=\"queue_full\"} 1",
            "sealpost_messages_rejected_total{code=\"not_found\"} 1",
            "sealpost_messages_rejected_total{code=\"invalid\"} 0",
            "sealpost_http_responses_total{class=\"1xx\"} 1",
            "sealpost_http_responses_total{class=\"4xx\"} 1",
            "sealpost_ws_closed_total{reason=\"overflow\"} 1",
            "sealpost_push_latency_seconds_bucket{le=\"0.00025\"} 0",
            "sealpost_push_latency_seconds_bucket{le=\"0.0005\"} 1",
            "sealpost_push_latency_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn two_servers_count_apart_and_off_renders_nothing() {
        let (a, b) = (Metrics::new(true), Metrics::new(true));
        a.acked.increment(3);
        assert!(a.render().contains("sealpost_messages_acked_total 3"));
        assert!(b.render().contains("sealpost_messages_acked_total 0"));
        let off = Metrics::disabled();
        off.acked.increment(3);
        assert!(!off.enabled());
        assert_eq!(off.render(), "");
    }

    #[test]
    fn label_values_follow_their_variants() {
        assert_eq!(Closed::VALUES[Closed::Error.index()], "error");
        assert_eq!(Closed::VALUES.len(), Closed::Error.index() + 1);
        assert_eq!(
            AuthFailure::VALUES[AuthFailure::RefreshReuse.index()],
            "refresh_reuse"
        );
    }
}
