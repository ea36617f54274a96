//! The NATS broker: core NATS through `async-nats`, no JetStream (the store
//! is the durable part; NATS only has to be fast).
//!
//! Subjects, under `SEALPOST_NATS_SUBJECT_PREFIX` (`sealpost` by default):
//! - `<prefix>.u.<account id>`: everything for one account's sockets
//!   (pushes, receipts, device changes, displacements). A node subscribes
//!   while it holds a socket of the account: the first socket subscribes,
//!   the last one's going unsubscribes. A node receives only the traffic of
//!   accounts it serves.
//! - `<prefix>.cluster`: revocations, directory changes and re-read
//!   requests, which every node subscribes to.
//! - `<prefix>.d.<account id>.<device>`: a device's presence. A node
//!   subscribes while it holds a socket of the device and answers every
//!   request at once; a node about to wake the device asks, and "no
//!   responders" (the server's own answer when nobody subscribes) means
//!   the device is offline everywhere ([`Broker::present`]).
//!
//! The client is connected with `no_echo`: a node never hears its own
//! publishes (it pushed to its own sockets already).
//!
//! Nothing here waits on NATS for a commit or a request: publishes go
//! through a bounded outbox to one publisher task, which sends them in
//! order; a publish that finds the outbox full, or NATS down, is dropped and
//! counted, and the nodes re-read their backlogs for it (see the module
//! notes in [`super`]). `async-nats` reconnects by itself, forever, and
//! sends every subscription again; the supervisor waits for the server to
//! confirm them before it asks for re-reads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use async_nats::{Client, ConnectOptions, Event, Request};
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::wire::{ForUser, Wire};
use super::{Announce, Broker, Interest, Node, Notice, Push, Status};
use crate::config::{Config, both_names};
use crate::metrics::{Metrics, Traffic};
use crate::store::DeviceId;

/// How often the client pings the server. A silent network failure is
/// noticed after two unanswered pings; a server that goes away at once.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);

/// How long a connecting socket waits for its account's subscription to be
/// confirmed by the server before it reads its backlog anyway (then the
/// account's backlogs are read again once it is).
const ACTIVATION_WAIT: Duration = Duration::from_secs(2);

/// How long an ephemeral send waits to hear that a socket on another node
/// took it. A node that took none does not answer, so a recipient online
/// elsewhere with none of the target devices costs the sender this much;
/// one online nowhere is known at once ("no responders").
const EPHEMERAL_WAIT: Duration = Duration::from_millis(250);

/// How long a presence question waits for an answer. Nobody subscribed is
/// known at once (the server answers "no responders"); a node holding the
/// device answers in a round trip. Past this, a node that subscribed but
/// did not answer is taken as holding the device.
const PRESENCE_WAIT: Duration = Duration::from_millis(250);

/// Publishes waiting for the publisher task. At 10,000 messages a second
/// this is most of a second of NATS stalling; past it publishes are
/// dropped and re-read, rather than held in memory or holding up commits.
const OUTBOX_BOUND: usize = 8192;

/// Bytes of publishes waiting: maximal bodies must not make the outbox
/// hold gigabytes.
const OUTBOX_BYTES: usize = 64 * 1024 * 1024;

/// Messages one account's subscription buffers inside `async-nats` before
/// the server's slow-consumer rule drops them; its task hands each to the
/// hub without waiting, so it stays near empty.
const SUBSCRIPTION_CAPACITY: usize = 4096;

/// How often the supervisor looks for lost publishes to announce.
const TICK: Duration = Duration::from_secs(1);

pub struct NatsBroker {
    inner: Arc<Inner>,
    /// The cluster subject's subscription, made at connect so that the
    /// first confirmation of the connection covers it too; handed to its
    /// task by [`NatsBroker::attach`].
    cluster: Mutex<Option<async_nats::Subscriber>>,
}

struct Inner {
    client: Client,
    prefix: String,
    node_id: String,
    /// This node's parts; set by [`NatsBroker::attach`].
    node: OnceLock<Weak<Node>>,
    /// Accounts this node is subscribed for.
    subs: DashMap<Uuid, UserSub>,
    /// Devices this node holds a socket of, and answers presence for.
    devices: DashMap<(Uuid, DeviceId), DeviceSub>,
    outbox: mpsc::Sender<Outgoing>,
    outbox_bytes: Arc<Semaphore>,
    connected: AtomicBool,
    /// The server's `max_payload`, read at each connect (0 until then).
    max_payload: AtomicUsize,
    link: Mutex<Link>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

/// What the supervisor remembers about lost traffic.
#[derive(Default)]
struct Link {
    /// Since when the connection has been down (this node missed what the
    /// others published meanwhile).
    down_since: Option<SystemTime>,
    /// Since when publishes of this node may have been lost (the others
    /// must re-read): from the first dropped publish, or the disconnect.
    lost_since: Option<SystemTime>,
    /// When a dropped publish was last logged.
    logged: Option<SystemTime>,
}

struct UserSub {
    /// Sockets of the account on this node.
    holders: usize,
    /// True once the server confirmed the subscription (or gave up
    /// waiting).
    ready: watch::Receiver<bool>,
    cancel: CancellationToken,
}

struct DeviceSub {
    /// Sockets of the device on this node.
    holders: usize,
    cancel: CancellationToken,
}

struct Outgoing {
    subject: String,
    payload: Bytes,
    traffic: Traffic,
    _bytes: OwnedSemaphorePermit,
}

impl NatsBroker {
    /// Connects (in the background: a node starts, and serves, with NATS
    /// down) and starts the publisher and the supervisor.
    pub async fn connect(
        config: &Config,
        node_id: String,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let (events_tx, events_rx) = mpsc::channel(64);
        let options = match &config.nats_credentials {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|err| {
                    anyhow::anyhow!(
                        "reading the NATS credentials {}, {}: {err}",
                        path.display(),
                        both_names("SEALPOST_NATS_CREDENTIALS")
                    )
                })?,
            None => ConnectOptions::new(),
        };
        let mut options = options
            .name(format!("sealpost {node_id}"))
            .no_echo()
            .ping_interval(PING_INTERVAL)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(move |event| {
                let events = events_tx.clone();
                async move {
                    // Full only if the supervisor stalls; a state change is
                    // also read from the client on every tick.
                    let _ = events.try_send(event);
                }
            });
        if let Some(ca) = &config.nats_tls_ca {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&config.nats_tls_cert, &config.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let urls: Vec<&str> = config.nats_urls().collect();
        let client = options
            .connect(urls.as_slice())
            .await
            .map_err(|err| anyhow::anyhow!("{}: {err}", both_names("SEALPOST_NATS_URL")))?;
        let cluster = client
            .subscribe(cluster_subject(&config.nats_subject_prefix))
            .await
            .map_err(|err| anyhow::anyhow!("subscribing on NATS: {err}"))?;
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX_BOUND);
        let inner = Arc::new(Inner {
            client,
            prefix: config.nats_subject_prefix.clone(),
            node_id,
            node: OnceLock::new(),
            subs: DashMap::new(),
            devices: DashMap::new(),
            outbox,
            outbox_bytes: Arc::new(Semaphore::new(OUTBOX_BYTES)),
            connected: AtomicBool::new(false),
            max_payload: AtomicUsize::new(0),
            link: Mutex::new(Link {
                down_since: Some(SystemTime::now()),
                ..Link::default()
            }),
            metrics,
            stop: CancellationToken::new(),
        });
        inner.metrics.broker.connected.set(0.0);
        tokio::spawn(publish(inner.clone(), outbox_rx));
        tokio::spawn(
            Supervisor {
                inner: inner.clone(),
            }
            .run(events_rx),
        );
        Ok(Self {
            inner,
            cluster: Mutex::new(Some(cluster)),
        })
    }

    /// Starts delivering what arrives to `node`, and subscribes to the
    /// cluster subject.
    pub fn attach(&self, node: &Arc<Node>) {
        let _ = self.inner.node.set(Arc::downgrade(node));
        let sub = self
            .cluster
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(sub) = sub {
            tokio::spawn(cluster(self.inner.clone(), sub));
        }
    }

    /// Sends what is queued (a few seconds at most) and stops: call once
    /// the committer has drained, so its last commits are published.
    pub async fn close(&self) {
        let inner = &self.inner;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while inner.outbox.capacity() < OUTBOX_BOUND && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if inner.connected() {
            let _ = tokio::time::timeout(Duration::from_secs(2), inner.client.flush()).await;
        }
        inner.stop.cancel();
    }
}

impl Drop for NatsBroker {
    /// Stops the tasks, which hold the client, when the server goes
    /// without [`NatsBroker::close`] (a start-up that failed after
    /// connecting).
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

impl Inner {
    fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    fn node(&self) -> Option<Arc<Node>> {
        self.node.get().and_then(Weak::upgrade)
    }

    fn user_subject(&self, user: Uuid) -> String {
        format!("{}.u.{}", self.prefix, user.simple())
    }

    fn device_subject(&self, user: Uuid, device: DeviceId) -> String {
        format!("{}.d.{}.{device}", self.prefix, user.simple())
    }

    fn cluster_subject(&self) -> String {
        cluster_subject(&self.prefix)
    }

    /// Waits until the server has processed everything this client sent
    /// before (its subscriptions, above all); false if that takes longer
    /// than [`ACTIVATION_WAIT`] or the connection fails. A flush only
    /// empties the client's write buffer: the server may not have read the
    /// bytes yet, and a publish of another node's arriving first would find
    /// no subscriber. A request to a subject nobody subscribes to is
    /// answered by the server itself ("no responders") once it has read
    /// it, and it reads a connection's input in order.
    async fn confirm(&self) -> bool {
        let probe = format!("{}.probe.{}", self.prefix, self.node_id);
        let request = Request::new()
            .payload(Bytes::new())
            .timeout(Some(ACTIVATION_WAIT));
        match self.client.send_request(probe, request).await {
            Ok(_) => true,
            Err(err) => matches!(
                err.kind(),
                async_nats::client::RequestErrorKind::NoResponders
            ),
        }
    }

    /// Queues a publish; never waits. Returns whether it was queued.
    fn enqueue(&self, subject: String, wire: &Wire, traffic: Traffic) -> bool {
        let payload = wire.encode();
        let weight = u32::try_from(payload.len().min(OUTBOX_BYTES)).unwrap_or(u32::MAX);
        let queued = self
            .outbox_bytes
            .clone()
            .try_acquire_many_owned(weight)
            .ok()
            .map(|bytes| {
                self.outbox.try_send(Outgoing {
                    subject,
                    payload,
                    traffic,
                    _bytes: bytes,
                })
            });
        let queued = matches!(queued, Some(Ok(())));
        if !queued {
            self.lost();
        }
        queued
    }

    /// A publish was not sent: the other nodes will have to re-read.
    fn lost(&self) {
        self.metrics.broker.publish_failed.increment(1);
        let now = SystemTime::now();
        let mut link = self.link.lock().unwrap_or_else(PoisonError::into_inner);
        link.lost_since.get_or_insert(now);
        let quiet = link
            .logged
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() < Duration::from_secs(10));
        if !quiet {
            link.logged = Some(now);
            drop(link);
            tracing::warn!(node = %self.node_id, "a publish to the other nodes was dropped (NATS down or behind); they will re-read their backlogs");
        }
    }

    /// Something arrived on an account's subject.
    async fn arrived(&self, user: Uuid, message: async_nats::Message) {
        let Some(node) = self.node() else { return };
        match Wire::decode(&message.payload).map(Wire::sort) {
            Ok(Ok(ForUser::Push(push))) if push.recipient == user => {
                let ephemeral = push.ephemeral;
                let delivered = node.push(push);
                // Only a node that delivered answers an ephemeral send's
                // question: the first answer is the sender's `true`.
                if ephemeral
                    && delivered > 0
                    && let Some(reply) = message.reply
                {
                    let _ = self.client.publish(reply, Bytes::new()).await;
                }
            }
            Ok(Ok(ForUser::Notice(notice))) => node.notice(user, notice),
            Ok(Ok(ForUser::Wake(since))) => {
                self.metrics.broker.received(Traffic::Push);
                node.reread(Some(user), since);
            }
            Ok(_) => {
                tracing::debug!(subject = %message.subject, "ignoring a misaddressed broker message")
            }
            Err(err) => {
                tracing::warn!(subject = %message.subject, error = %err, "ignoring a broker message this node cannot read (a newer node's?)");
            }
        }
    }
}

/// The subject every node subscribes to.
fn cluster_subject(prefix: &str) -> String {
    format!("{prefix}.cluster")
}

/// Sends the outbox, in order, while connected; drops (and counts) what
/// it cannot send.
async fn publish(inner: Arc<Inner>, mut outbox: mpsc::Receiver<Outgoing>) {
    loop {
        let next = tokio::select! {
            () = inner.stop.cancelled() => break,
            next = outbox.recv() => next,
        };
        let Some(out) = next else { break };
        if !inner.connected() {
            inner.lost();
            continue;
        }
        match inner.client.publish(out.subject, out.payload).await {
            Ok(()) => inner.metrics.broker.published(out.traffic),
            Err(err) => {
                tracing::debug!(error = %err, "publish failed");
                inner.lost();
            }
        }
    }
}

/// Follows the connection's state: on loss, says so and remembers since
/// when; on return, waits for the subscriptions to be confirmed, re-reads
/// this node's backlogs for what it missed, and asks the other nodes to do
/// the same for what it failed to publish.
struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    async fn run(self, mut events: mpsc::Receiver<Event>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.inner.stop.cancelled() => break,
                event = events.recv() => match event {
                    Some(Event::Connected) => self.up().await,
                    Some(Event::Disconnected | Event::Closed) => self.down(),
                    Some(Event::SlowConsumer(sid)) => {
                        // The server or the client dropped messages of a
                        // subscription: read everything recent again.
                        tracing::warn!(node = %self.inner.node_id, sid, "a NATS subscription fell behind; re-reading backlogs");
                        if let Some(node) = self.inner.node() {
                            node.reread(None, SystemTime::now());
                        }
                    }
                    // Each failed reconnect attempt is one: the loss itself
                    // was logged once, as a warning.
                    Some(Event::ClientError(err)) => tracing::debug!(node = %self.inner.node_id, error = %err, "NATS client error"),
                    Some(other) => tracing::info!(node = %self.inner.node_id, event = %other, "NATS"),
                    None => break,
                },
                _ = tick.tick() => self.check().await,
            }
        }
    }

    fn down(&self) {
        let inner = &self.inner;
        if !inner.connected.swap(false, Ordering::AcqRel) {
            return;
        }
        inner.metrics.broker.connected.set(0.0);
        inner.metrics.broker.disconnects.increment(1);
        let now = SystemTime::now();
        let mut link = inner.link.lock().unwrap_or_else(PoisonError::into_inner);
        link.down_since.get_or_insert(now);
        // Publishes written just before the loss was noticed may be gone.
        link.lost_since.get_or_insert(now);
        drop(link);
        tracing::warn!(node = %inner.node_id, "NATS connection lost: still accepting and storing; pushes to and from other nodes wait until it returns");
    }

    async fn up(&self) {
        let inner = &self.inner;
        if inner.connected() {
            return;
        }
        // The client sent every subscription again on reconnecting; wait
        // until the server has taken them.
        if !inner.confirm().await {
            return; // The next tick tries again.
        }
        inner
            .max_payload
            .store(inner.client.server_info().max_payload, Ordering::Relaxed);
        inner.connected.store(true, Ordering::Release);
        inner.metrics.broker.connected.set(1.0);
        let down_since = inner
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .down_since
            .take();
        tracing::info!(node = %inner.node_id, "NATS connected");
        if let (Some(since), Some(node)) = (down_since, inner.node()) {
            node.reread(None, since);
        }
        self.announce_lost();
    }

    /// Every tick: notice a state change whose event was missed, and
    /// announce publishes lost while connected (a full outbox).
    async fn check(&self) {
        let state = self.inner.client.connection_state();
        match state {
            async_nats::connection::State::Connected if !self.inner.connected() => self.up().await,
            async_nats::connection::State::Disconnected if self.inner.connected() => self.down(),
            _ => {}
        }
        if self.inner.connected() {
            self.announce_lost();
        }
    }

    fn announce_lost(&self) {
        let inner = &self.inner;
        let lost = inner
            .link
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lost_since;
        let Some(since) = lost else { return };
        let wire = Wire::announce(Announce::Reread { since }, &inner.node_id);
        if inner.enqueue(inner.cluster_subject(), &wire, Traffic::Cluster) {
            let mut link = inner.link.lock().unwrap_or_else(PoisonError::into_inner);
            if link.lost_since == Some(since) {
                link.lost_since = None;
            }
            drop(link);
            tracing::info!(node = %inner.node_id, "asked the other nodes to re-read what this node could not publish");
        }
    }
}

/// Receives the cluster subject for as long as the broker runs.
async fn cluster(inner: Arc<Inner>, mut sub: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            () = inner.stop.cancelled() => break,
            message = sub.next() => message,
        };
        let Some(message) = message else { break };
        let Some(node) = inner.node() else { break };
        match Wire::decode(&message.payload).map(Wire::sort) {
            Ok(Err(
                event @ Announce::Directory {
                    removed: Some(_), ..
                }
                | event @ Announce::Directory { deleted: true, .. },
            )) => {
                // Purging in-flight copies waits for a commit: not here,
                // where revocations must not wait behind it.
                tokio::spawn(async move { node.announced(event).await });
            }
            Ok(Err(event)) => node.announced(event).await,
            Ok(Ok(_)) => tracing::debug!("ignoring an account message on the cluster subject"),
            Err(err) => {
                tracing::warn!(error = %err, "ignoring a cluster message this node cannot read (a newer node's?)");
            }
        }
    }
}

/// One account's subscription: subscribes, confirms, then hands what
/// arrives to the node, in order, until the last socket goes.
async fn account(
    inner: Arc<Inner>,
    user: Uuid,
    ready: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut sub = match inner.client.subscribe(inner.user_subject(user)).await {
        Ok(sub) => sub,
        Err(err) => {
            let _ = ready.send(true);
            tracing::warn!(user.id = %user, error = %err, "cannot subscribe: this account's sockets here get other nodes' messages on reconnect only");
            return;
        }
    };
    let began = SystemTime::now();
    let confirmed = inner.confirm().await;
    let _ = ready.send(true);
    if !confirmed && inner.connected() {
        // Its socket has read its backlog without waiting for us: once the
        // server confirms, read again what may have been published before.
        // (Were NATS down, its return would re-read everything anyway.)
        let confirmed = async {
            while !inner.confirm().await {
                tokio::time::sleep(TICK).await;
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = confirmed => {
                if let Some(node) = inner.node() {
                    node.reread(Some(user), began);
                }
            }
        }
    }
    loop {
        let message = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            message = sub.next() => message,
        };
        match message {
            Some(message) => inner.arrived(user, message).await,
            None => break,
        }
    }
    // Dropping `sub` unsubscribes.
}

/// Answers presence questions about one device while this node holds a
/// socket of it.
async fn presence(inner: Arc<Inner>, user: Uuid, device: DeviceId, cancel: CancellationToken) {
    let mut sub = match inner
        .client
        .subscribe(inner.device_subject(user, device))
        .await
    {
        Ok(sub) => sub,
        Err(err) => {
            tracing::debug!(user.id = %user, device, error = %err, "cannot answer for a device's presence; it may be woken while online");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            message = sub.next() => message,
        };
        match message {
            Some(message) => {
                if let Some(reply) = message.reply {
                    let _ = inner.client.publish(reply, Bytes::new()).await;
                }
            }
            None => break,
        }
    }
}

/// Drops a socket's hold on its account's subscription and its device's
/// presence.
struct Release {
    inner: Arc<Inner>,
    user: Uuid,
    device: DeviceId,
}

impl Drop for Release {
    fn drop(&mut self) {
        let key = (self.user, self.device);
        let last = match self.inner.devices.get_mut(&key) {
            Some(mut sub) => {
                sub.holders -= 1;
                sub.holders == 0
            }
            None => false,
        };
        if last && let Some((_, sub)) = self.inner.devices.remove_if(&key, |_, s| s.holders == 0) {
            sub.cancel.cancel();
        }
        let last = match self.inner.subs.get_mut(&self.user) {
            Some(mut sub) => {
                sub.holders -= 1;
                sub.holders == 0
            }
            None => false,
        };
        // A socket subscribing in between makes it non-zero again, under
        // the same shard lock that `remove_if` takes.
        if last && let Some((_, sub)) = self.inner.subs.remove_if(&self.user, |_, s| s.holders == 0)
        {
            sub.cancel.cancel();
            self.inner.metrics.broker.subscriptions.decrement(1);
        }
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn status(&self) -> Status {
        if self.inner.connected() {
            Status::Connected
        } else {
            Status::Disconnected
        }
    }

    async fn interest(&self, user: Uuid, device: DeviceId) -> Interest {
        let inner = &self.inner;
        inner
            .devices
            .entry((user, device))
            .or_insert_with(|| {
                let cancel = inner.stop.child_token();
                tokio::spawn(presence(inner.clone(), user, device, cancel.clone()));
                DeviceSub { holders: 0, cancel }
            })
            .holders += 1;
        let mut ready = {
            let mut sub = inner.subs.entry(user).or_insert_with(|| {
                let (tx, rx) = watch::channel(false);
                let cancel = inner.stop.child_token();
                tokio::spawn(account(inner.clone(), user, tx, cancel.clone()));
                inner.metrics.broker.subscriptions.increment(1);
                UserSub {
                    holders: 0,
                    ready: rx,
                    cancel,
                }
            });
            sub.holders += 1;
            sub.ready.clone()
        };
        let release = Release {
            inner: inner.clone(),
            user,
            device,
        };
        if inner.connected() {
            let _ = tokio::time::timeout(ACTIVATION_WAIT, ready.wait_for(|r| *r)).await;
        }
        Interest {
            _release: Some(Box::new(release)),
        }
    }

    fn committed(&self, push: Push) {
        let inner = &self.inner;
        let subject = inner.user_subject(push.recipient);
        let bytes = push.bytes();
        // Base64 and the fields around it; the server refuses a publish
        // over its `max_payload` (1 MiB by default): send a wake-up
        // instead, and the nodes read that account's backlogs.
        let estimate = bytes.div_ceil(3) * 4 + 512 + 64 * push.copies.len();
        let max = inner.max_payload.load(Ordering::Relaxed);
        let wire = if max > 0 && estimate > max {
            Wire::Wake {
                since: push.accepted,
            }
        } else {
            Wire::Push(push)
        };
        inner.enqueue(subject, &wire, Traffic::Push);
    }

    async fn ephemeral(&self, push: Push, ask: bool) -> bool {
        let inner = &self.inner;
        let subject = inner.user_subject(push.recipient);
        let wire = Wire::Push(push);
        if !ask {
            inner.enqueue(subject, &wire, Traffic::Ephemeral);
            return false;
        }
        if !inner.connected() {
            return false;
        }
        inner.metrics.broker.published(Traffic::Ephemeral);
        let request = Request::new()
            .payload(wire.encode())
            .timeout(Some(EPHEMERAL_WAIT));
        inner.client.send_request(subject, request).await.is_ok()
    }

    async fn present(&self, user: Uuid, device: DeviceId) -> bool {
        let inner = &self.inner;
        if !inner.connected() {
            // Nobody to ask: a wake-up too many beats one missed.
            return false;
        }
        let request = Request::new()
            .payload(Bytes::new())
            .timeout(Some(PRESENCE_WAIT));
        match inner
            .client
            .send_request(inner.device_subject(user, device), request)
            .await
        {
            Ok(_) => true,
            Err(err) => matches!(err.kind(), async_nats::client::RequestErrorKind::TimedOut),
        }
    }

    fn notify(&self, user: Uuid, notice: Notice) {
        let subject = self.inner.user_subject(user);
        self.inner
            .enqueue(subject, &Wire::notice(notice), Traffic::Notice);
    }

    fn announce(&self, event: Announce) {
        let inner = &self.inner;
        let wire = Wire::announce(event, &inner.node_id);
        inner.enqueue(inner.cluster_subject(), &wire, Traffic::Cluster);
    }
}
