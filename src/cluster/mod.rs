//! The cluster: several nodes on one PostgreSQL database, and the [`Broker`]
//! that carries between them what one node's hub cannot reach: pushes to
//! sockets held by other nodes, notices (receipts, device changes,
//! displacements), and cluster-wide events (revocations, directory
//! changes).
//!
//! The database is the truth and the broker a fast, lossy path, as in every
//! multi-node relay (Centrifugo's NATS broker, Signal's Redis pub/sub). A
//! message is committed first and published after; anything a broker loses
//! is read from the store again. Two brokers:
//!
//! - [`local::LocalBroker`]: one node. Nothing leaves the process; today's
//!   behaviour, and the default.
//! - [`nats::NatsBroker`]: core NATS (`SEALPOST_NATS_URL`).
//!
//! # The guarantees, restated for a cluster
//!
//! One node alone keeps three rules with process-local state: the delivery
//! core's order lock (id order = commit order = push order), the barrier
//! a connecting socket waits for on its node's committer (nothing accepted
//! before it registered is missing from its backlog), and "a push whose id
//! is at most the last backlog id is a repeat". Each covers only messages
//! accepted by that node. Across nodes:
//!
//! - **No gap.** A socket's node subscribes for the account at the broker
//!   (and waits until the subscription is active there) before it reads
//!   the backlog; other nodes publish a message only after it commits. So a
//!   message from another node is either committed before the read began
//!   (and in it) or published after the subscription was active (and
//!   received). Messages accepted on the socket's own node keep the local
//!   rule (order lock and barrier).
//! - **No duplicate.** A message from another node can arrive both ways,
//!   and its id may be lower than ids the backlog already carried (nodes'
//!   commits interleave). So a clustered connection drops repeats by exact
//!   id (the connection's `Seen` set), not by "at most the last backlog id".
//! - **Order.** Each node publishes in its commit order, which is its id
//!   order, on one NATS connection, and core NATS keeps a publisher's order
//!   on a subject; one task per account handles what arrives. And a
//!   clustered drain reads the backlog's ids in one statement (one
//!   snapshot), in which each node's messages are a prefix of its commits.
//!   Hence: **each sender device's messages reach each recipient device in
//!   the order the sender's node accepted them**, live and in the backlog,
//!   whichever nodes the two are on. Messages accepted by different nodes
//!   have no order between them (their ids are ordered by the nodes'
//!   clocks), and a sender device that sends through two nodes at once has
//!   two orders.
//! - **Lost broker traffic.** A node whose NATS connection drops keeps
//!   accepting and storing; it publishes nothing while down and counts what
//!   it did not send. When the connection returns it waits until its
//!   subscriptions are active again, re-reads the recent backlog of every
//!   socket it holds, and tells every other node to do the same for the
//!   time it was away ([`Announce::Reread`]). Messages recovered that way
//!   may arrive after newer ones that were pushed live: the order above
//!   holds while the broker does.
//!
//! Receipts, device changes and displacements go to the account's subject;
//! revocations and directory changes to every node. Revocations are also in
//! the database, which each node still polls as the safety net.

pub mod local;
pub mod nats;
mod wire;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use uuid::Uuid;

use crate::auth::sessions::Revocations;
use crate::delivery::Delivery;
use crate::devices::DevicesChange;
use crate::hub::{Event, Hub, Kick, Outbound, Receipt};
use crate::metrics::{Metrics, Traffic};
use crate::push::targets::Targets;
use crate::store::{self, DeviceId, Message};
pub use wire::{Copy, Push};

/// How far before a stretch of lost broker traffic a re-read starts: a
/// message committed just before the connection was seen to drop may have
/// been published into it. Detection takes at most two NATS pings (see
/// [`nats::PING_INTERVAL`]), and a commit admitted before it at most the
/// committer's admission timeout.
pub const REREAD_MARGIN: Duration = Duration::from_secs(30);

/// Whether this node can reach the other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// One node: there is nobody to reach.
    Local,
    Connected,
    Disconnected,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Local => "local",
            Status::Connected => "connected",
            Status::Disconnected => "disconnected",
        }
    }
}

/// A notice for every socket of one account, wherever it is.
#[derive(Debug, Clone)]
pub enum Notice {
    /// To the sender's account: a device of the recipient acked.
    Receipt(Receipt),
    /// A change of the account's devices: its device numbers now, and
    /// which device it was about.
    Devices(DevicesChange),
    /// An exclusive socket of this device opened: older ones close (4409).
    Displace(DeviceId),
}

/// An event for every node.
#[derive(Debug, Clone)]
pub enum Announce {
    /// An account's devices changed; sends must be checked against the new
    /// list. With `removed`, copies for that device in flight on a node
    /// are deleted once written; with `deleted`, those of the whole account.
    Directory {
        user: Uuid,
        removed: Option<DeviceId>,
        deleted: bool,
    },
    /// Sessions revoked (tokens refused, sockets closed with 4401); with a
    /// device, every socket of that device closes.
    Revoked {
        user: Uuid,
        sessions: Vec<Uuid>,
        device: Option<DeviceId>,
    },
    /// A node lost broker traffic since `since`: re-read the backlogs of
    /// your sockets from there.
    Reread { since: SystemTime },
    /// An account's push targets changed (set, deleted, dropped by a
    /// provider): forget what [`crate::push::targets::Targets`] holds of
    /// it. A node of before wake-ups drops it as a type it does not know.
    PushTargets { user: Uuid },
}

/// A node's interest in one account's traffic from other nodes. Held by
/// each socket of the account; the subscription goes when the last one
/// does.
pub struct Interest {
    _release: Option<Box<dyn Send + Sync>>,
}

impl Interest {
    /// An interest that holds nothing (one node).
    pub fn none() -> Self {
        Self { _release: None }
    }
}

/// What the delivery core and the sessions need from the other nodes.
/// Every method but [`Broker::interest`] and [`Broker::ephemeral`] returns
/// at once: a broker never holds up a commit or a request.
#[async_trait]
pub trait Broker: Send + Sync {
    /// `local` or `nats`, for `/readyz` and metrics.
    fn kind(&self) -> &'static str;

    /// Whether there are no other nodes: then nothing is prepared for
    /// them (a push copies its bodies).
    fn alone(&self) -> bool {
        false
    }

    fn status(&self) -> Status;

    /// Subscribes this node for `user`'s traffic, and returns once the
    /// subscription is active at the broker, or once waiting longer would
    /// hold up a connecting socket (then the node re-reads that account's
    /// backlogs when it becomes active). While held, this node also
    /// answers for `device`'s presence ([`Broker::present`]).
    async fn interest(&self, user: Uuid, device: DeviceId) -> Interest;

    /// Copies of stored messages, just committed, in commit order: for the
    /// sockets other nodes hold.
    fn committed(&self, push: Push);

    /// An ephemeral message for other nodes' sockets; with `ask`, waits (a
    /// short, bounded time) to learn whether one of them took it.
    async fn ephemeral(&self, push: Push, ask: bool) -> bool;

    fn notify(&self, user: Uuid, notice: Notice);

    fn announce(&self, event: Announce);

    /// Whether another node holds a socket of `user`'s `device`: asked
    /// before a device is woken (this node's hub is asked first). Waits a
    /// short, bounded time; a node alone has no one to ask.
    async fn present(&self, _user: Uuid, _device: DeviceId) -> bool {
        false
    }
}

/// What a node does with the broker's traffic: the parts of this node it
/// reaches. The brokers hold it weakly: it owns them through the delivery
/// core.
pub struct Node {
    pub hub: Arc<Hub>,
    pub delivery: Arc<Delivery>,
    pub revocations: Arc<Revocations>,
    pub metrics: Arc<Metrics>,
    /// Which devices have push targets, forgotten when another node
    /// changes them.
    pub targets: Arc<Targets>,
}

impl Node {
    /// Pushes the copies of a message from another node to this node's
    /// sockets of their devices; returns how many sockets took one.
    pub fn push(&self, push: Push) -> usize {
        let traffic = if push.ephemeral {
            Traffic::Ephemeral
        } else {
            Traffic::Push
        };
        self.metrics.broker.received(traffic);
        // The sending node's clock; on one host, or hosts kept in step by
        // NTP, near enough for a latency in milliseconds.
        let age = SystemTime::now()
            .duration_since(push.accepted)
            .unwrap_or_default();
        let accepted = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let sent_at = store::id_time(push.id);
        let mut delivered = 0;
        let shared = push.shared.map(bytes::Bytes::from);
        for copy in push.copies {
            let body = match (&shared, copy.key.is_some()) {
                (Some(shared), true) => shared.clone(),
                _ => copy.body.into(),
            };
            let outbound = Outbound {
                message: Arc::new(Message {
                    id: push.id,
                    recipient: push.recipient,
                    device: copy.device,
                    sender: push.sender,
                    sender_device: push.sender_device,
                    body,
                    key: copy.key.map(Into::into),
                    // Receipts come from the row its ack deletes.
                    receipts: true,
                    sent_at,
                }),
                ephemeral: push.ephemeral,
                accepted,
                remote: true,
            };
            let took = self.hub.push(push.recipient, copy.device, &outbound);
            if took > 0 {
                self.metrics.broker.push_latency.record(age);
            }
            delivered += took;
        }
        delivered
    }

    /// A notice from another node for `user`'s sockets here.
    pub fn notice(&self, user: Uuid, notice: Notice) {
        self.metrics.broker.received(Traffic::Notice);
        match notice {
            Notice::Receipt(receipt) => {
                self.hub.notify(user, Event::Receipt(Box::new(receipt)));
            }
            Notice::Devices(change) => {
                self.hub
                    .notify(user, Event::DevicesChanged(Box::new(change)));
            }
            Notice::Displace(device) => {
                let displaced = self.hub.kick_device(user, device, Kick::Displaced);
                tracing::debug!(user.id = %user, device, displaced, "displaced by an exclusive socket on another node");
            }
        }
    }

    /// An event another node announced.
    pub async fn announced(&self, event: Announce) {
        self.metrics.broker.received(Traffic::Cluster);
        match event {
            Announce::Directory {
                user,
                removed,
                deleted,
            } => {
                // A removed device's or a deleted account's targets went
                // with it.
                if deleted || removed.is_some() {
                    self.targets.changed(user);
                }
                if deleted {
                    self.delivery.account_deleted_elsewhere(user).await;
                } else if let Some(device) = removed {
                    self.delivery.device_removed_elsewhere(user, device).await;
                } else {
                    self.delivery.devices_may_have_changed(user);
                }
            }
            Announce::Revoked {
                user,
                sessions,
                device,
            } => {
                self.revocations
                    .learn_remote(&self.hub, user, &sessions, device);
            }
            Announce::Reread { since } => self.reread(None, since),
            Announce::PushTargets { user } => self.targets.changed(user),
        }
    }

    /// Tells this node's sockets (of `user`, or all) to read their backlog
    /// again from `since` (less [`REREAD_MARGIN`]).
    pub fn reread(&self, user: Option<Uuid>, since: SystemTime) {
        let from = since.checked_sub(REREAD_MARGIN).unwrap_or(since);
        let after = store::first_id_at(chrono::DateTime::<chrono::Utc>::from(from));
        let sockets = match user {
            Some(user) => self.hub.notify(user, Event::Reread(after)),
            None => self.hub.notify_all(Event::Reread(after)),
        };
        if sockets > 0 {
            self.metrics.broker.rereads.increment(1);
        }
        tracing::info!(user.id = ?user, sockets, "re-reading backlogs for broker traffic that was lost");
    }
}

/// The checks start-up makes on the cluster settings: NATS needs
/// PostgreSQL.
pub fn check(config: &crate::Config) -> Result<String, String> {
    if !config.clustered() {
        return Ok("not set: one node (the local broker)".into());
    }
    if !store::is_postgres(config.database_url()) {
        return Err(format!(
            "SQLite is single-node: {} joins nodes that share one PostgreSQL database; \
             unset it, or set {} to PostgreSQL",
            crate::config::both_names("SEALPOST_NATS_URL"),
            crate::config::both_names("DATABASE_URL"),
        ));
    }
    Ok(format!(
        "a cluster node over NATS ({} server(s)), subjects under `{}.`",
        config.nats_urls().count(),
        config.nats_subject_prefix
    ))
}
