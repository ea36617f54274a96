//! The delivery core: accepting, pushing, listing and acknowledging sealed
//! envelopes.
//!
//! REST handlers and the WebSocket protocol only translate their wire
//! formats into calls here; validation, id assignment, push, durability and
//! acks live in this one place.
//!
//! A message is addressed to an account and delivered to its devices: one
//! copy per device, each in its own queue, acknowledged on its own. A send
//! carries one envelope per current device of the recipient (or one body
//! for all of them); [`Delivery::accept`] checks the envelopes against the
//! [`Directory`] and refuses with `devices_changed` if they differ, so a
//! sender can never skip a device without knowing it. Envelopes to your own
//! account leave your sending device out: that is how a device keeps the
//! account's others in sync. A plain body goes to every device, the sender's
//! own included, as it did before devices.
//!
//! Accepting a message takes its id, enqueues the insert of all its copies
//! with the [`committer`] and pushes each copy to its device's online
//! connections, all under one short lock: a device's connections see pushes
//! in id order, and the insert is always ahead of any ack the device can
//! send for it. The push does not wait for the commit; the sender's
//! confirmation does. That order is this process's: the lock is
//! `Delivery::order`, and the rule "a push not in the backlog has a larger
//! id than everything in it" holds only for messages accepted here. Other
//! nodes of a cluster hear of a message from the committer once it is
//! written, through the [`Broker`]; [`crate::cluster`] says which rules
//! replace the local ones there.
//!
//! **Deadlines.** A send or an ack is answered within
//! `SEALPOST_DB_TIMEOUT` of its start (plus the one read of the
//! recipient's devices or queue depth a send may need, each bounded by the
//! store on its own): `unavailable` once it passes. Its write is not
//! withdrawn: it is in the committer's hands and may still commit, so the
//! rest of its wait moves to a task of its own ([`within`]) that keeps the
//! queue counters and receipts true to what happened.
//!
//! Rows are sealed at rest ([`crate::seal`]): the committer seals what it
//! writes and [`Delivery::fetch`] opens what it reads. A row that does not
//! open (its key is missing from `SEALPOST_STORAGE_KEYS`, or it was altered)
//! stays in the store untouched; the read fails with `unavailable` (503, or
//! a WebSocket close asking to reconnect) and the cause is logged with the
//! message id, so a recipient's queue waits, complete and in order, until an
//! operator restores the key.

pub mod committer;
pub mod drains;
pub mod idempotency;
pub mod listeners;
mod multi;
mod pending;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{AcquireError, Semaphore};

use drains::{DrainBudget, Held, Holder};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::cluster::{Announce, Broker, Interest, Notice, Push};
use crate::devices::{self, ChangeReason, DevicesChange, Directory};
use crate::error::{Error, Result};
use crate::hub::{Event, Hub, Kick, Outbound, Receipt, Registration};
use crate::limits::queue::{Charge, QueueCaps, QueueLimits};
use crate::limits::rate::{PairBudget, SendBudget};
use crate::logging::Throttle;
use crate::metrics::{Kind, Limited, Metrics};
use crate::seal::{KeyRing, SEAL_OVERHEAD};
use crate::store::{self, DeviceId, Message, Queue, SendKey};
use committer::Committer;
pub use idempotency::SEND_KEY_WINDOW;
use idempotency::{Claim, Flights, Joined};
pub use multi::{Multi, MultiLimits};

/// The most messages one page or one ack may carry.
pub const MAX_PAGE: u32 = 500;

/// The most stored bytes one page carries (sealed bodies: a body plus
/// about 60 bytes): 500 maximal messages would be hundreds of megabytes in
/// one reply. A page always has at least one message, and `next` says where
/// to go on.
pub const MAX_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// The default of `SEALPOST_DRAIN_BUDGET_BYTES`: stored bytes of backlog
/// pages in memory at once, server-wide. Every socket's drain takes its
/// page's bytes from it until the page is written, every REST poll until
/// its page is encoded (the reply being written is not counted). A page in
/// memory is about three times its stored bytes (the rows, the opened
/// messages, their base64 frames), so this caps drains at about 200 MiB
/// however many devices reconnect at once; at the typical few kilobytes a
/// page it admits thousands of drains together, and at the worst, sixteen
/// 4 MiB pages. One account, and one address, may hold a share of it
/// ([`drains`]).
pub const DRAIN_BUDGET: usize = 64 * 1024 * 1024;

/// Backlog pages read from the store at once, server-wide. When thousands
/// of devices reconnect together their reads would otherwise all wait at
/// the connection pool, where the wait counts against each query's deadline
/// (`SEALPOST_DB_TIMEOUT`) and a few thousand of them fail; here they wait
/// their turn in order, and a read that has its turn finds a connection.
/// A few more than a pool holds, so the pool never idles between reads.
pub const DRAIN_READS: usize = 16;

/// How long a poll's page read waits, for its turn ([`DRAIN_READS`]) and
/// then for room in the drain budget ([`drains`]), before it is refused with 503
/// `unavailable`: under the shortest common client timeout (10 s).
pub const DRAIN_WAIT: Duration = Duration::from_secs(10);

/// The same for a socket's drain, which is then closed with 1011: a minute,
/// the time a storm of 19,000 devices with 100 messages each took to drain
/// on two cores. Measured with a 10 s wait, such a storm refused 37,524
/// drains, each a reconnect and a fresh wait.
pub const SOCKET_DRAIN_WAIT: Duration = Duration::from_secs(60);

/// How often a failed backlog read is logged at most
/// ([`Delivery::backlog_failed`]): a storm of a minute writes six lines.
const BACKLOG_FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Who reads a page: the device, and the client's address (its
/// per-address limit key), each charged a share of the drain budget.
#[derive(Clone, Copy)]
struct Reader {
    device: Address,
    client: IpAddr,
}

/// One device of one account: who sends, who reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address {
    pub user: Uuid,
    pub device: DeviceId,
}

/// What a send carries.
pub enum Content {
    /// One body for every device of the recipient.
    Same(Vec<u8>),
    /// One envelope per device, in ascending device order, no device twice.
    PerDevice(Vec<(DeviceId, Vec<u8>)>),
}

pub struct Delivery {
    queue: Arc<dyn Queue>,
    /// Each account's device numbers, that sends are checked against.
    directory: Arc<Directory>,
    committer: Committer,
    hub: Arc<Hub>,
    /// Opens the rows that `fetch` reads.
    keys: Arc<KeyRing>,
    max_body_bytes: usize,
    /// Envelopes one send may carry: the device cap.
    max_envelopes: usize,
    /// What one multi-recipient send may carry.
    multi: MultiLimits,
    /// Sends per user, REST and WebSocket together: a token per stored
    /// copy.
    budget: SendBudget,
    /// Sends per (sender, recipient), stored and ephemeral.
    pairs: PairBudget,
    /// Messages queued per device and per sender there, bytes per account.
    queues: Arc<QueueCaps>,
    /// How long a send or an ack waits for the committer, from its start.
    deadline: Duration,
    metrics: Arc<Metrics>,
    /// Whether an ack sends the sender a receipt.
    receipts: bool,
    /// The other nodes: pushes, notices and directory changes for them.
    broker: Arc<dyn Broker>,
    /// Held while a message gets its id, is enqueued and is pushed, so that
    /// id order, commit order and push order agree. Nothing under it waits.
    order: Mutex<()>,
    /// The sends under a client's key in flight here.
    flights: Arc<Flights>,
    /// Stored bytes of backlog pages in memory, and each account's and
    /// address's share of them.
    drains: DrainBudget,
    /// [`DRAIN_READS`]: backlog pages being read from the store.
    drain_reads: Arc<Semaphore>,
    /// The warnings of sockets' failed backlog reads ([`Delivery::backlog_failed`]).
    backlog_failures: Throttle,
}

/// One page of a device's queue.
pub struct Page {
    pub messages: Vec<Message>,
    /// The cursor for the next page, if there is one.
    pub next: Option<Uuid>,
    /// Its share of the drain budget, given back when the page is dropped.
    budget: Option<Held>,
}

impl Page {
    /// The messages, and the cursor for the next page; the budget the page
    /// held goes with the returned guard, to be dropped once the messages
    /// are written.
    pub fn into_parts(self) -> (Vec<Message>, Option<Uuid>, PageBudget) {
        (self.messages, self.next, PageBudget(self.budget))
    }
}

/// A page's share of the drain budget, held until its messages are out.
pub struct PageBudget(#[allow(dead_code)] Option<Held>);

impl PageBudget {
    /// The share of a page that read nothing.
    pub fn none() -> Self {
        Self(None)
    }
}

/// What a page in memory costs beyond its stored bytes, per message: the
/// opened message, its ids and times, its JSON or frame around the base64.
/// Charged to the drain budget so that a page of many small messages is not
/// undercounted.
const PAGE_ROW_OVERHEAD: usize = 256;

/// Where a page ends, from the sizes of the rows that may be in it.
#[derive(Debug, PartialEq, Eq)]
struct PageExtent {
    /// Its last message.
    last: Uuid,
    /// Its messages.
    rows: usize,
    /// Its stored bytes.
    bytes: usize,
    /// Whether rows follow it.
    more: bool,
}

impl PageExtent {
    /// What the page takes from the drain budget while it is in memory, at
    /// most `share` (a page of one message larger than a share takes all
    /// of it).
    fn weight(&self, share: usize) -> u32 {
        let cost = self.bytes.saturating_add(self.rows * PAGE_ROW_OVERHEAD);
        u32::try_from(cost.clamp(1, share.max(1))).unwrap_or(u32::MAX)
    }
}

impl PageExtent {
    /// The longest run of `sizes` (ids and stored sizes, in id order) of
    /// at most `limit` rows and `max_bytes`, at least one row; `None` for
    /// no rows.
    fn of(sizes: &[(Uuid, u64)], limit: usize, max_bytes: usize) -> Option<Self> {
        let (mut taken, mut bytes) = (0usize, 0usize);
        for &(_, size) in sizes.iter().take(limit) {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if taken > 0 && bytes.saturating_add(size) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(size);
            taken += 1;
        }
        let &(last, _) = sizes.get(taken.checked_sub(1)?)?;
        Some(Self {
            last,
            rows: taken,
            bytes,
            more: taken < sizes.len(),
        })
    }
}

/// A message that has its id and has been pushed, on its way to durability.
pub struct Accepted {
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
    /// Completes once every copy is durable; fails with `unavailable` once
    /// the send's deadline has passed (it may still be stored).
    pub durable: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
}

/// A socket's place in the hub and at the broker, and the barrier to await
/// before reading its backlog (see [`Delivery::subscribe`]).
pub struct Subscription<B> {
    pub registration: Registration,
    /// Held for the socket's life: its account's subscription at the
    /// broker.
    pub interest: Interest,
    pub barrier: B,
}

/// An ephemeral message: pushed to whoever is online now, never stored.
pub struct Ephemeral {
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
    /// Whether at least one connection of a recipient device took it.
    pub delivered: bool,
}

/// The limits the delivery core enforces; 0 turns one off (but for the
/// deadline).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_devices_per_user: u32,
    pub send_rate_per_second: u32,
    pub send_rate_burst: u32,
    pub pair_rate_per_second: u32,
    pub pair_rate_burst: u32,
    pub max_queued_per_device: u32,
    pub max_queued_per_sender: u32,
    pub max_queued_bytes_per_user: u64,
    /// How long a send or an ack may wait for its write
    /// (`SEALPOST_DB_TIMEOUT`).
    pub deadline: Duration,
    /// Stored bytes of backlog pages in memory (`SEALPOST_DRAIN_BUDGET_BYTES`).
    pub drain_budget: usize,
    /// What one account, and one address, may hold of it
    /// (`SEALPOST_DRAIN_SHARE_BYTES`; 0 for a sixteenth).
    pub drain_share: usize,
    /// What one multi-recipient send may carry.
    pub multi: MultiLimits,
}

impl Delivery {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        queue: Arc<dyn Queue>,
        directory: Arc<Directory>,
        committer: Committer,
        hub: Arc<Hub>,
        keys: Arc<KeyRing>,
        limits: Limits,
        receipts: bool,
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            queue,
            directory,
            committer,
            hub,
            keys,
            max_body_bytes: limits.max_body_bytes,
            max_envelopes: limits.max_devices_per_user.max(1) as usize,
            multi: limits.multi,
            budget: SendBudget::new(limits.send_rate_per_second, limits.send_rate_burst),
            pairs: PairBudget::new(limits.pair_rate_per_second, limits.pair_rate_burst),
            queues: Arc::new(QueueCaps::new(
                QueueLimits {
                    per_device: limits.max_queued_per_device,
                    per_sender: limits.max_queued_per_sender,
                    bytes_per_user: limits.max_queued_bytes_per_user,
                },
                !broker.alone(),
            )),
            deadline: limits.deadline,
            metrics,
            receipts,
            broker,
            order: Mutex::new(()),
            flights: Arc::default(),
            drains: DrainBudget::new(limits.drain_budget, limits.drain_share),
            drain_reads: Arc::new(Semaphore::new(DRAIN_READS)),
            backlog_failures: Throttle::new(BACKLOG_FAILURE_LOG_EVERY),
        }
    }

    /// Logs that a socket's backlog read failed (the socket is then closed
    /// to reconnect): refused for want of a turn or of room in the drain
    /// budget ([`SOCKET_DRAIN_WAIT`]), or a database that failed. Both come
    /// in floods: a reconnect storm refused 37,524 drains in minutes, each
    /// a line. So at most one line per [`BACKLOG_FAILURE_LOG_EVERY`], with
    /// the number held back; `sealpost_drains_refused_total` counts every
    /// refusal.
    pub fn backlog_failed(&self, user: Uuid, err: &Error) {
        if let Some(held_back) = self.backlog_failures.admit() {
            tracing::warn!(user.id = %user, error = %err, held_back, "backlog read failed");
        }
    }

    /// Decodes a base64 body, refusing one over the size limit before
    /// decoding it.
    pub fn decode_body(&self, field: &'static str, encoded: &str) -> Result<Vec<u8>> {
        // Padded base64 of n bytes is exactly 4 * ceil(n / 3) characters.
        if encoded.len() > self.max_body_bytes.div_ceil(3) * 4 {
            return Err(self.too_large());
        }
        let body = STANDARD
            .decode(encoded)
            .map_err(|_| Error::field(field, "must be standard base64 (RFC 4648, with padding)"))?;
        if body.len() > self.max_body_bytes {
            return Err(self.too_large());
        }
        if body.is_empty() {
            return Err(Error::field(field, "must not be empty"));
        }
        Ok(body)
    }

    /// Decodes what a send carries: exactly one of a `body` and a list of
    /// `envelopes` (device id, base64 body), each within the size limit.
    pub fn decode_content<'a>(
        &self,
        body: Option<&str>,
        envelopes: Option<impl ExactSizeIterator<Item = (DeviceId, &'a str)>>,
    ) -> Result<Content> {
        match (body, envelopes) {
            (Some(body), None) => Ok(Content::Same(self.decode_body("body", body)?)),
            (None, Some(envelopes)) => {
                if envelopes.len() > self.max_envelopes {
                    return Err(Error::field(
                        "envelopes",
                        format!("at most {} envelopes, one per device", self.max_envelopes),
                    ));
                }
                let mut decoded = envelopes
                    .map(|(device, body)| Ok((device, self.decode_body("envelopes", body)?)))
                    .collect::<Result<Vec<_>>>()?;
                decoded.sort_unstable_by_key(|(device, _)| *device);
                if decoded.windows(2).any(|pair| pair[0].0 == pair[1].0) {
                    return Err(Error::field("envelopes", "names a device more than once"));
                }
                Ok(Content::PerDevice(decoded))
            }
            _ => Err(Error::field(
                "body",
                "give either `body` or `envelopes`, not both or neither",
            )),
        }
    }

    fn too_large(&self) -> Error {
        Error::TooLarge(format!("body exceeds {} bytes", self.max_body_bytes).into())
    }

    /// Checks the envelopes against the recipient's devices before anything
    /// is assigned; returns the recipient's device list as the directory
    /// holds it (to check again under the order lock) and the devices the
    /// message goes to (none only for an empty list of envelopes to
    /// yourself from your only device, which [`Self::refuse_empty`] turns
    /// away first).
    async fn targets(
        &self,
        from: Address,
        to: Uuid,
        content: &Content,
    ) -> Result<(Arc<[DeviceId]>, Vec<DeviceId>)> {
        let devices = self.directory.devices(to).await?;
        if devices.is_empty() {
            return Err(Error::NotFound("recipient"));
        }
        let targets = match content {
            // Every device, as before devices: a note to yourself from a
            // client that knows nothing of devices reaches its own queue.
            Content::Same(_) => devices.to_vec(),
            Content::PerDevice(envelopes) => {
                let targets = covered(from, to, &devices);
                let given: Vec<DeviceId> = envelopes.iter().map(|(d, _)| *d).collect();
                if let Some((missing, extra)) = devices::mismatch(&targets, &given) {
                    return Err(Error::DevicesChanged { missing, extra });
                }
                targets
            }
        };
        Ok((devices, targets))
    }

    /// An empty list of envelopes, answered before any budget is charged,
    /// so a client's mistake costs it nothing: `devices_changed` when the
    /// recipient has devices the send must cover (how a client with a
    /// stale list of its own devices learns of them, as it always has), and
    /// `422` on `envelopes` when there are none (a sync copy from your only
    /// device): a send that reaches no device is no send.
    async fn refuse_empty(&self, from: Address, to: Uuid, content: &Content) -> Result<()> {
        if !matches!(content, Content::PerDevice(envelopes) if envelopes.is_empty()) {
            return Ok(());
        }
        self.targets(from, to, content).await?;
        Err(Error::field(
            "envelopes",
            "must hold at least one envelope: a send to no device is no send",
        ))
    }

    /// Takes a send from the sender's budget and from its budget to `to`:
    /// one token each, before any work. A stored send then takes one more
    /// from the sender's budget per further copy ([`Self::check_copies`]).
    fn check_budget(&self, from: Address, to: Uuid) -> Result<()> {
        self.budget
            .check(from.user)
            .inspect_err(|_| self.metrics.rate_limited(Limited::Send))?;
        self.pairs
            .check(from.user, to)
            .inspect_err(|_| self.metrics.rate_limited(Limited::Pair))
    }

    /// The rest of a stored send's charge: a token per copy beyond the
    /// first, so that storage is paid for as it grows (a plain body to a
    /// ten-device account is ten rows).
    fn check_copies(&self, from: Address, copies: usize) -> Result<()> {
        let more = u32::try_from(copies.saturating_sub(1)).unwrap_or(u32::MAX);
        self.budget
            .check_n(from.user, more)
            .inspect_err(|_| self.metrics.rate_limited(Limited::Send))
    }

    /// Accepts a message and returns once it is durable.
    pub async fn send(
        &self,
        from: Address,
        to: Uuid,
        content: Content,
        client_id: Option<String>,
        urgent: bool,
    ) -> Result<Accepted> {
        let mut accepted = self.accept(from, to, content, client_id, urgent).await?;
        (&mut accepted.durable).await?;
        Ok(accepted)
    }

    /// Where a send under the client's key stands: the first of its key
    /// (claimed, to be sent), or a retry answered with the id the key
    /// already has. See [`idempotency`].
    async fn claim(
        &self,
        from: Address,
        digest: Vec<u8>,
        client_id: String,
        expires: tokio::time::Instant,
    ) -> Result<std::result::Result<Claim, Uuid>> {
        let key = SendKey {
            sender: from.user,
            device: from.device,
            client_id,
        };
        let claim = match self.flights.join(key, digest)? {
            Joined::First(claim) => claim,
            // The first attempt is bounded by its own deadline; this wait
            // by this send's.
            Joined::Earlier(earlier) => {
                return match tokio::time::timeout_at(expires, earlier.wait()).await {
                    Ok(id) => Ok(Err(id?)),
                    Err(_) => Err(Error::Unavailable),
                };
            }
        };
        let key = claim.key();
        let hashes = self
            .keys
            .send_key_hashes(key.sender, key.device, &key.client_id);
        let recorded = match self.queue.sent_key(&hashes, store::now()).await? {
            Some(sealed) => self
                .keys
                .open_key(sealed)
                .inspect_err(|err| {
                    // Altered: as if unknown, the send is stored (at worst
                    // twice) rather than answered with a forged id.
                    tracing::warn!(user.id = %from.user, error = %err, "a send key does not open; ignored");
                })
                .ok(),
            None => None,
        };
        match recorded {
            Some(recorded) => {
                let id = claim.check(&recorded)?;
                claim.sent(id);
                Ok(Err(id))
            }
            None => Ok(Ok(claim)),
        }
    }

    /// Accepts a message: assigns its id, enqueues its copies for the store
    /// and pushes each to its device's online connections. Returns without
    /// waiting for durability; await [`Accepted::durable`] for that.
    ///
    /// The devices checked before the order lock are checked again under
    /// it: a device removed meanwhile (its list dropped from the directory
    /// by [`Delivery::device_removed`], which takes the same lock) sends
    /// this one round again, against the new list. So every copy for a
    /// removed device was enqueued before the removal's barrier, and the
    /// removal's purge behind that barrier deletes it.
    ///
    /// A send with the client's key (`client_id`) that the key already
    /// names is answered with that message's id, durable, and nothing is
    /// stored or pushed again ([`idempotency`]).
    ///
    /// `urgent` (the send's `"urgent"`, true by default) is handed with the
    /// copies to the committer's listeners: it says how an offline
    /// recipient device is woken ([`crate::push::scheduler`]).
    pub async fn accept(
        &self,
        from: Address,
        to: Uuid,
        content: Content,
        client_id: Option<String>,
        urgent: bool,
    ) -> Result<Accepted> {
        self.refuse_empty(from, to, &content).await?;
        self.check_budget(from, to)?;
        let expires = tokio::time::Instant::now() + self.deadline;
        let claim = match client_id {
            None => None,
            Some(client_id) => match self
                .claim(from, idempotency::digest(to, &content), client_id, expires)
                .await?
            {
                Ok(claim) => Some(claim),
                Err(id) => {
                    self.metrics.sends_repeated.increment(1);
                    return Ok(Accepted {
                        id,
                        sent_at: store::id_time(id),
                        durable: Box::pin(std::future::ready(Ok(()))),
                    });
                }
            },
        };
        // A device list changes a few times in an account's life: one more
        // round is plenty; three that all race a change are answered 503.
        let tag = self.keys.sender_tag(from.user, to);
        let mut charged = false;
        for _ in 0..3 {
            let (listed, devices) = self.targets(from, to, &content).await?;
            if !charged {
                self.check_copies(from, devices.len())?;
                charged = true;
            }
            // What each copy will take in the store, for the queue caps.
            let stored: Vec<(DeviceId, u64)> = match &content {
                Content::Same(body) => devices
                    .iter()
                    .map(|&d| (d, (body.len() + SEAL_OVERHEAD) as u64))
                    .collect(),
                Content::PerDevice(envelopes) => envelopes
                    .iter()
                    .map(|(d, b)| (*d, (b.len() + SEAL_OVERHEAD) as u64))
                    .collect(),
            };
            self.queues
                .reserve(self.queue.as_ref(), to, tag, &stored)
                .await?;
            // What to give back for the copies (of `only` these devices)
            // that are not stored after all.
            let charges = move |only: Option<&[DeviceId]>| {
                stored
                    .iter()
                    .filter(|(d, _)| only.is_none_or(|only| only.contains(d)))
                    .map(|&(device, bytes)| Charge {
                        device,
                        tag: Some(tag),
                        bytes,
                    })
                    .collect::<Vec<_>>()
            };
            let bytes = match &content {
                Content::Same(body) => body.len() * devices.len(),
                Content::PerDevice(envelopes) => envelopes.iter().map(|(_, b)| b.len()).sum(),
            };
            let slot = match self.committer.reserve(bytes, expires).await {
                Ok(slot) => slot,
                Err(err) => {
                    self.queues.release(to, charges(None));
                    return Err(err);
                }
            };
            let order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
            if !self.directory.is_current(to, &listed) {
                drop(order);
                drop(slot);
                self.queues.release(to, charges(None));
                continue;
            }
            let (id, sent_at, messages) = stamp(from, to, copies(content, &devices));
            // Staged before it is pushed, so that an ack of a pushed copy
            // finds it; held for the ack window if a socket here took it.
            // The committer publishes it to the other nodes once written,
            // writes the key with the copies and settles the claim once
            // they are durable.
            let key = claim.map(|claim| claim.bind(id));
            let staged = slot.stage(messages.clone(), SystemTime::now(), urgent, key);
            let reached = self.push_here(to, messages, false);
            let insert = staged.enqueue(reached > 0);
            drop(order);
            let (queues, metrics) = (self.queues.clone(), self.metrics.clone());
            let durable = within(expires, async move {
                match insert.await {
                    Ok(()) => {
                        metrics.accepted(Kind::Stored);
                        Ok(())
                    }
                    // Not stored: it takes no room in the queues of the
                    // devices whose copies were not written. (A copy acked
                    // in its window gave its room back with the ack.)
                    Err(unstored) => {
                        let failed: Vec<DeviceId> = match unstored.devices {
                            Some(copies) => copies.into_iter().map(|(_, d)| d).collect(),
                            None => devices,
                        };
                        queues.release(to, charges(Some(&failed)));
                        Err(unstored.error)
                    }
                }
            });
            return Ok(Accepted {
                id,
                sent_at,
                durable,
            });
        }
        tracing::warn!(user.id = %to, "the recipient's devices kept changing during a send");
        Err(Error::Unavailable)
    }

    /// Pushes a message to the recipient devices' connections that are
    /// online now, on this node and the others, without storing it.
    /// `delivered` is true once one socket took it: at once when one here
    /// did, else as the other nodes answer.
    pub async fn send_ephemeral(
        &self,
        from: Address,
        to: Uuid,
        content: Content,
    ) -> Result<Ephemeral> {
        self.refuse_empty(from, to, &content).await?;
        self.check_budget(from, to)?;
        let (_, devices) = self.targets(from, to, &content).await?;
        let copies = copies(content, &devices);
        let (id, sent_at, push, delivered) = {
            let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
            let (id, sent_at, messages) = stamp(from, to, copies);
            let push = if self.broker.alone() {
                None
            } else {
                Push::of(&messages, SystemTime::now(), true)
            };
            let delivered = self.push_here(to, messages, true);
            (id, sent_at, push, delivered > 0)
        };
        // Ask the other nodes only when this one's sockets did not take it.
        let delivered = match push {
            Some(push) => self.broker.ephemeral(push, !delivered).await || delivered,
            None => delivered,
        };
        self.metrics.accepted(Kind::Ephemeral);
        Ok(Ephemeral {
            id,
            sent_at,
            delivered,
        })
    }

    /// Pushes each copy to this node's sockets of its device; returns how
    /// many sockets took one. Call under the order lock.
    fn push_here(&self, to: Uuid, messages: Vec<Arc<Message>>, ephemeral: bool) -> usize {
        let accepted = Instant::now();
        messages
            .into_iter()
            .map(|message| {
                let device = message.device;
                let outbound = Outbound {
                    message,
                    ephemeral,
                    accepted,
                    remote: false,
                };
                self.hub.push(to, device, &outbound)
            })
            .sum()
    }

    /// Registers a connection of `device` in the hub, to be followed by a
    /// backlog read. Await the returned future before reading the backlog.
    ///
    /// A message accepted just before registering was pushed to no one, and
    /// its insert may still be in the committer's queue. Registering under
    /// the order lock and then waiting for a committer barrier closes that
    /// gap: every message accepted before registration is committed by the
    /// time the barrier passes (and is in the backlog), and every one
    /// accepted after it is pushed to the new connection. Both halves rest
    /// on this process's order lock and committer: they cover messages
    /// accepted by this process.
    ///
    /// Messages accepted by other nodes are covered by the broker: the
    /// account's subscription there is active before this returns (see
    /// [`crate::cluster`]), and they are published only once committed.
    ///
    /// An `exclusive` connection first closes every socket its device holds
    /// (all older than it, on every node) with [`Kick::Displaced`], so it
    /// takes over even from a device at its socket cap.
    pub async fn subscribe(
        &self,
        device: Address,
        session: Uuid,
        exclusive: bool,
    ) -> Result<Subscription<impl Future<Output = Result<()>> + Send + 'static>> {
        let interest = self.broker.interest(device.user, device.device).await;
        let expires = tokio::time::Instant::now() + self.deadline;
        let slot = self.committer.reserve(0, expires).await?;
        let registration = {
            let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
            if exclusive {
                let displaced = self
                    .hub
                    .kick_device(device.user, device.device, Kick::Displaced);
                tracing::debug!(user.id = %device.user, device = device.device, displaced, "exclusive socket");
            }
            self.hub.register(device.user, device.device, session)?
        };
        if exclusive {
            self.broker
                .notify(device.user, Notice::Displace(device.device));
        }
        Ok(Subscription {
            registration,
            interest,
            // The device's own acks before it must be written before its
            // backlog is read, or it would be sent what it acked.
            barrier: slot.barrier(Some((device.user, device.device))),
        })
    }

    /// Whether other nodes may push to this node's sockets: then a socket
    /// drains by snapshot ([`Delivery::backlog_ids`]) and drops repeats by
    /// exact id.
    pub fn clustered(&self) -> bool {
        !self.broker.alone()
    }

    /// The device's queued messages after the cursor, oldest first: at
    /// most `limit` (up to [`MAX_PAGE`]) and [`MAX_PAGE_BYTES`] of stored
    /// bytes, at least one message; read for a client at address `client`
    /// (its per-address limit key).
    ///
    /// The page is cut before any body is read: the sizes of the next rows
    /// come first (without their contents), then the page takes its bytes
    /// from its account's share, its address's share and the server-wide
    /// budget ([`drains`]), then its rows are read and opened. The page
    /// holds those bytes until it is dropped (a socket's page once it is
    /// written), so however many devices drain at once, the pages in memory
    /// stay within the budget, and no one account or address holds more
    /// than its share; the others wait for room.
    ///
    /// A poll waits at most [`DRAIN_WAIT`] for its turn and room; a socket's
    /// drain reads with [`Delivery::drain_page`], which waits longer.
    pub async fn fetch(
        &self,
        device: Address,
        client: IpAddr,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Page> {
        let reader = Reader { device, client };
        self.read_page(reader, after, limit, MAX_PAGE_BYTES, DRAIN_WAIT)
            .await
    }

    /// As [`Delivery::fetch`], for a socket's drain: at most `max_bytes`
    /// (the socket's pace), and it waits up to [`SOCKET_DRAIN_WAIT`] for its
    /// turn and room. A socket that waits holds only itself, while one
    /// refused reconnects, authenticates and waits again: in a reconnect
    /// storm the longer wait is less work.
    pub async fn drain_page(
        &self,
        device: Address,
        client: IpAddr,
        after: Option<Uuid>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Page> {
        let reader = Reader { device, client };
        self.read_page(reader, after, limit, max_bytes, SOCKET_DRAIN_WAIT)
            .await
    }

    async fn read_page(
        &self,
        reader: Reader,
        after: Option<Uuid>,
        limit: u32,
        max_bytes: usize,
        patience: Duration,
    ) -> Result<Page> {
        let Reader { device, client } = reader;
        let limit = limit.clamp(1, MAX_PAGE);
        // A page never weighs more than a share: its bytes are cut to one.
        let share = self.drains.share();
        let max_bytes = max_bytes.clamp(1, MAX_PAGE_BYTES.min(share));
        let after = after.unwrap_or(Uuid::nil());
        let waited_until = tokio::time::Instant::now() + patience;
        // Its turn first, so that a storm of drains queues here, in order,
        // rather than at the pool, where each wait counts against the
        // query's deadline.
        let mut turn = self
            .drain_wait(waited_until, self.drain_reads.clone().acquire_owned())
            .await?;
        // One row more than asked tells whether another page follows.
        let sizes = self
            .queue
            .queued_sizes(device.user, device.device, after, limit + 1)
            .await?;
        let Some(extent) = PageExtent::of(&sizes, limit as usize, max_bytes) else {
            return Ok(Page {
                messages: Vec::new(),
                next: None,
                budget: None,
            });
        };
        let weight = extent.weight(share);
        let holders = [Holder::Account(device.user), Holder::Address(client)];
        let shares = match self.drains.try_shares(&holders, weight) {
            Some(shares) => shares,
            None => {
                // Over its share: it waits for its own pages to be written,
                // without its turn, which reads of others take meanwhile.
                drop(turn);
                let shares = self
                    .drain_wait(waited_until, async {
                        Ok::<_, AcquireError>(self.drains.shares(&holders, weight).await)
                    })
                    .await?;
                turn = self
                    .drain_wait(waited_until, self.drain_reads.clone().acquire_owned())
                    .await?;
                shares
            }
        };
        let budget = self
            .drain_wait(waited_until, async {
                Ok::<_, AcquireError>(self.drains.take(shares, weight).await)
            })
            .await?;
        // At most the rows sized: in a cluster another node's commit (or,
        // after a wait for its share, an ack) can change the range between
        // the two reads.
        let rows = self
            .queue
            .fetch_through(
                device.user,
                device.device,
                after,
                extent.last,
                extent.rows as u32,
            )
            .await?;
        drop(turn);
        let cut = rows.len() == extent.rows && rows.last().is_some_and(|r| r.id() < extent.last);
        let mut messages = self.keys.open_all(rows).map_err(|err| {
            tracing::error!(user.id = %device.user, device = device.device, error = %err, "a queued message does not open; it is kept");
            Error::Unavailable
        })?;
        self.fill_shared(device, &mut messages).await?;
        // Cut short by rows that came in between: go on after the last one
        // here, so that none of the range is passed over.
        let next = match messages.last() {
            Some(last) if cut => Some(last.id),
            _ => extent.more.then_some(extent.last),
        };
        Ok(Page {
            messages,
            next,
            budget: Some(budget),
        })
    }

    /// Reads and opens the shared bodies of the shared copies among
    /// `messages`. A body that is missing or does not open fails the read,
    /// as a row that does not open does: the copy is kept.
    async fn fill_shared(&self, device: Address, messages: &mut [Message]) -> Result<()> {
        let ids: Vec<Uuid> = messages
            .iter()
            .filter(|m| m.shared())
            .map(|m| m.id)
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let mut bodies = std::collections::HashMap::with_capacity(ids.len());
        for sealed in self.queue.shared_bodies(&ids).await? {
            let id = sealed.id;
            let body = self.keys.open_body(sealed).map_err(|err| {
                tracing::error!(user.id = %device.user, device = device.device, error = %err, "a shared body does not open; it is kept");
                Error::Unavailable
            })?;
            bodies.insert(id, body);
        }
        for message in messages.iter_mut().filter(|m| m.shared()) {
            message.body = bodies.get(&message.id).cloned().ok_or_else(|| {
                tracing::error!(user.id = %device.user, device = device.device, message.id = %message.id, "a queued copy's shared body is missing");
                Error::Unavailable
            })?;
        }
        Ok(())
    }

    /// Waits for a drain's turn or room until `until` ([`DRAIN_WAIT`] after
    /// the read began): then 503, as a database that does not answer would.
    async fn drain_wait<T>(
        &self,
        until: tokio::time::Instant,
        permit: impl Future<Output = std::result::Result<T, AcquireError>>,
    ) -> Result<T> {
        match tokio::time::timeout_at(until, permit).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.metrics.drains_refused.increment(1);
                Err(Error::Unavailable)
            }
        }
    }

    /// The ids queued for `device` after the cursor, oldest first, up to
    /// `limit`, in one snapshot: what a clustered drain sends (the pages
    /// it then reads by [`Delivery::fetch`] keep only these).
    pub async fn backlog_ids(
        &self,
        device: Address,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Uuid>> {
        Ok(self
            .queue
            .queued_ids(
                device.user,
                device.device,
                after.unwrap_or(Uuid::nil()),
                limit,
            )
            .await?)
    }

    /// Settles `ids` for `device`: its copies are deleted and never sent to
    /// it again; the account's other devices keep theirs. Ids that are
    /// unknown or not queued for this device are left alone and not
    /// counted. Each sender still online hears of its delivery (a receipt).
    pub async fn ack(&self, device: Address, ids: Vec<Uuid>) -> Result<u64> {
        if ids.len() > MAX_PAGE as usize {
            return Err(Error::field(
                "ids",
                format!("at most {MAX_PAGE} ids per ack"),
            ));
        }
        if ids.is_empty() {
            return Ok(0);
        }
        let expires = tokio::time::Instant::now() + self.deadline;
        let settling = self.committer.ack(device.user, device.device, ids, expires);
        let (queues, metrics) = (self.queues.clone(), self.metrics.clone());
        let (hub, broker) = (self.hub.clone(), self.broker.clone());
        let receipts = self.receipts;
        within(expires, async move {
            let settled = settling.await?;
            let acked = settled.len() as u64;
            queues.release(
                device.user,
                settled.iter().map(|copy| Charge {
                    device: device.device,
                    tag: copy.tag,
                    bytes: copy.bytes,
                }),
            );
            metrics.acked.increment(acked);
            if receipts {
                for copy in &settled {
                    if let Some((sender, _)) = copy.sender {
                        let receipt = Receipt {
                            id: copy.id,
                            to: device.user,
                            device: device.device,
                        };
                        hub.notify(sender, Event::Receipt(Box::new(receipt)));
                        broker.notify(sender, Notice::Receipt(receipt));
                    }
                }
            }
            Ok(acked)
        })
        .await
    }

    /// A device was added (committed): sends are checked against the new
    /// list from now on, and every socket of the account is told which
    /// devices it has (`None` when the list could not be read back: they
    /// learn it from their next `409 devices_changed`).
    pub fn device_added(&self, user: Uuid, device: DeviceId, devices: Option<Arc<[DeviceId]>>) {
        self.directory.changed(user);
        self.broker.announce(Announce::Directory {
            user,
            removed: None,
            deleted: false,
        });
        self.tell_account(user, device, ChangeReason::Added, devices);
    }

    /// A device was signed in to with the password, or given a new key
    /// (committed): its number did not change, so sends are checked as
    /// before, but the account's other devices are told, here and on
    /// every node. Someone who has the password can take a device over
    /// this way; its owner's other devices are how they notice.
    pub fn device_updated(
        &self,
        user: Uuid,
        device: DeviceId,
        reason: ChangeReason,
        devices: Option<Arc<[DeviceId]>>,
    ) {
        self.tell_account(user, device, reason, devices);
    }

    /// Tells every socket of the account, here and on every node, what
    /// happened to `device`; its own sockets skip it (see
    /// [`DevicesChange::tells`]). Nothing when the list is unknown.
    fn tell_account(
        &self,
        user: Uuid,
        device: DeviceId,
        reason: ChangeReason,
        devices: Option<Arc<[DeviceId]>>,
    ) {
        let Some(devices) = devices else {
            return;
        };
        let change = DevicesChange {
            devices,
            about: Some((device, reason)),
        };
        self.hub
            .notify(user, Event::DevicesChanged(Box::new(change.clone())));
        self.broker.notify(user, Notice::Devices(change));
    }

    /// The account's device numbers, ascending, as sends are checked
    /// against them here (the directory: no query while cached).
    pub async fn devices(&self, user: Uuid) -> Result<Arc<[DeviceId]>> {
        self.directory.devices(user).await
    }

    /// A device was removed with its queue (committed): sends are checked
    /// against the new list from now on, copies enqueued for it before that
    /// are deleted once written, and every socket left is told which
    /// devices the account has (when the list could be read).
    pub async fn device_removed(
        &self,
        user: Uuid,
        device: DeviceId,
        devices: Option<Arc<[DeviceId]>>,
    ) {
        self.broker.announce(Announce::Directory {
            user,
            removed: Some(device),
            deleted: false,
        });
        self.purge_stragglers(user, Some(device)).await;
        self.tell_account(user, device, ChangeReason::Removed, devices);
    }

    /// The account was deleted with its queues (committed): copies enqueued
    /// for it before the directory forgot it are deleted once written.
    pub async fn account_deleted(&self, user: Uuid) {
        self.broker.announce(Announce::Directory {
            user,
            removed: None,
            deleted: true,
        });
        self.purge_stragglers(user, None).await;
        // Its send keys, by the account's tag: they name no one in the
        // clear, but they are the account's. If this fails they expire
        // within a day.
        match self
            .queue
            .forget_sender_keys(&self.keys.account_tags(user))
            .await
        {
            Ok(forgotten) => {
                tracing::debug!(user.id = %user, forgotten, "deleted the account's send keys");
            }
            Err(err) => {
                tracing::warn!(user.id = %user, error = %err, "the account's send keys stay until they expire");
            }
        }
    }

    /// Another node removed the device: this node's sends stop passing it,
    /// and the copies this node had in flight for it are deleted.
    pub async fn device_removed_elsewhere(&self, user: Uuid, device: DeviceId) {
        self.purge_stragglers(user, Some(device)).await;
    }

    /// Another node deleted the account: as [`Delivery::account_deleted`],
    /// for the copies this node had in flight.
    pub async fn account_deleted_elsewhere(&self, user: Uuid) {
        self.purge_stragglers(user, None).await;
    }

    /// Drops the account's list from the directory under the order lock, so
    /// that every send that passed the old list has enqueued its insert
    /// (see [`Delivery::accept`]); waits for a barrier behind those inserts;
    /// then deletes what they wrote for the gone device (or account). The
    /// store's own removal deleted everything committed before it: this
    /// deletes the copies in flight at that moment. If the database fails
    /// here, those few copies stay until they expire (nobody can read them:
    /// device numbers are never reused); the removal itself has committed.
    async fn purge_stragglers(&self, user: Uuid, device: Option<DeviceId>) {
        self.queues.forget(user, device);
        let purged = async {
            let expires = tokio::time::Instant::now() + self.deadline;
            let slot = self.committer.reserve(0, expires).await?;
            let barrier = {
                let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
                self.directory.changed(user);
                slot.barrier(None)
            };
            barrier.await?;
            Ok::<_, Error>(self.queue.purge(user, device).await?)
        };
        match purged.await {
            Ok(0) => {}
            Ok(purged) => {
                tracing::info!(user.id = %user, device, purged, "deleted copies sent as the device went");
            }
            Err(err) => {
                // Still, no send may pass the old list from now on.
                self.directory.changed(user);
                tracing::warn!(user.id = %user, device, error = %err, "copies sent as the device went may stay until they expire");
            }
        }
    }

    /// Another process may have changed the account's devices: read them
    /// afresh on its next send.
    pub fn devices_may_have_changed(&self, user: Uuid) {
        self.directory.changed(user);
    }

    /// Rows were deleted behind the queue counters (expiry): recount them
    /// from the store as recipients are next sent to.
    pub fn recount_queues(&self) {
        self.queues.reset();
    }

    /// Forgets senders and pairs whose send budget is full again.
    pub fn prune_send_budgets(&self) {
        self.budget.prune();
        self.pairs.prune();
    }
}

/// Waits for `work` until `expires`; past it, answers `unavailable` and
/// lets `work` finish in a task of its own. The work is a write the
/// committer holds already (admission is bounded by the same deadline), so
/// the database may still complete it, and what `work` does after it (the
/// queue counters, receipts) must follow what happened. Such tasks are
/// bounded by the committer's op budget, one per op it holds, and each ends
/// with that op's batch, which the store bounds in turn.
fn within<T: Send + 'static>(
    expires: tokio::time::Instant,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Pin<Box<dyn Future<Output = Result<T>> + Send>> {
    let mut work = Box::pin(work);
    Box::pin(async move {
        match tokio::time::timeout_at(expires, &mut work).await {
            Ok(done) => done,
            Err(_) => {
                tokio::spawn(async move {
                    let _ = work.await;
                });
                Err(Error::Unavailable)
            }
        }
    })
}

/// The devices of `to` (`devices`) that envelopes must cover: all of them,
/// but the sending device in a send to your own account. Envelopes to your
/// own account sync your other devices: the sending device already has
/// what it sent.
fn covered(from: Address, to: Uuid, devices: &[DeviceId]) -> Vec<DeviceId> {
    devices
        .iter()
        .copied()
        .filter(|&d| to != from.user || d != from.device)
        .collect()
}

/// One body per target device: the one body for each (one allocation), or
/// the envelopes as they are (already checked to name exactly `devices`).
fn copies(content: Content, devices: &[DeviceId]) -> Vec<(DeviceId, Bytes)> {
    match content {
        Content::Same(body) => {
            let body = Bytes::from(body);
            devices.iter().map(|&d| (d, body.clone())).collect()
        }
        Content::PerDevice(envelopes) => envelopes
            .into_iter()
            .map(|(d, body)| (d, body.into()))
            .collect(),
    }
}

/// The body bytes `copies` hold in memory: a shared body once per message,
/// each copy's own body or key material.
pub(crate) fn body_bytes(copies: &[Arc<Message>]) -> usize {
    let mut bytes = 0;
    let mut last_shared = None;
    for copy in copies {
        match &copy.key {
            Some(key) => {
                if last_shared != Some(copy.id) {
                    bytes += copy.body.len();
                    last_shared = Some(copy.id);
                }
                bytes += key.len();
            }
            None => bytes += copy.body.len(),
        }
    }
    bytes
}

/// Gives a message its time-ordered id and makes its copies, one per device
/// body. Call under the order lock: ids taken there are in push and commit
/// order.
fn stamp(
    from: Address,
    to: Uuid,
    copies: Vec<(DeviceId, Bytes)>,
) -> (Uuid, DateTime<Utc>, Vec<Arc<Message>>) {
    let id = Uuid::now_v7();
    let sent_at = store::id_time(id);
    let messages = copies
        .into_iter()
        .map(|(device, body)| {
            Arc::new(Message {
                id,
                recipient: to,
                device,
                sender: from.user,
                sender_device: from.device,
                body,
                key: None,
                receipts: true,
                sent_at,
            })
        })
        .collect();
    (id, sent_at, messages)
}

/// An in-memory queue for the unit tests of the delivery core and the
/// committer: the [`Queue`] and [`crate::store::DeviceIds`] parts only, as
/// those are all they use.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::Mutex;
    use std::time::Duration;

    use async_trait::async_trait;
    use uuid::Uuid;

    use chrono::{DateTime, Utc};

    use crate::store::{
        Ack, DeviceId, DeviceIds, Queue, QueueShare, SealedBody, SealedKey, SealedRow, StoreError,
        StoreResult, StoredRow,
    };

    #[derive(Default)]
    pub struct MemQueue {
        pub rows: Mutex<Vec<SealedRow>>,
        /// Every batch written: (rows inserted, acks applied).
        pub batches: Mutex<Vec<(usize, usize)>>,
        /// How long each write takes.
        pub delay: Duration,
        /// When set, every write fails as an unreachable database would.
        pub failing: std::sync::atomic::AtomicBool,
        /// Every account's devices, for the directory.
        pub devices: Mutex<Vec<(Uuid, Vec<DeviceId>)>>,
        /// Send keys written.
        pub keys: Mutex<Vec<SealedKey>>,
        /// Shared bodies written.
        pub bodies: Mutex<Vec<SealedBody>>,
        /// Row reads (`fetch_through` calls).
        pub reads: std::sync::atomic::AtomicUsize,
    }

    impl MemQueue {
        /// The device's rows after `after`, in id order.
        fn queued(
            &self,
            recipient: Uuid,
            device: DeviceId,
            after: Uuid,
        ) -> impl Iterator<Item = SealedRow> {
            let rows = self.rows.lock().unwrap();
            let mut mine: Vec<SealedRow> = rows
                .iter()
                .filter(|r| r.recipient == recipient && r.device == device && r.id > after)
                .cloned()
                .collect();
            mine.sort_by_key(|r| r.id);
            mine.into_iter()
        }
    }

    #[async_trait]
    impl Queue for MemQueue {
        async fn write_batch(
            &self,
            bodies: Vec<SealedBody>,
            messages: Vec<SealedRow>,
            keys: &[SealedKey],
            acks: &[Ack],
        ) -> StoreResult<Vec<StoredRow>> {
            tokio::time::sleep(self.delay).await;
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
            }
            {
                let mut stored = self.bodies.lock().unwrap();
                for body in bodies {
                    if !stored.iter().any(|b| b.id == body.id) {
                        stored.push(body);
                    }
                }
            }
            let mut recorded = self.keys.lock().unwrap();
            for key in keys {
                recorded.retain(|k| k.hash != key.hash);
                recorded.push(key.clone());
            }
            self.batches
                .lock()
                .unwrap()
                .push((messages.len(), acks.len()));
            let mut rows = self.rows.lock().unwrap();
            rows.extend(messages);
            let mut deleted = Vec::new();
            rows.retain(|r| {
                let acked = acks
                    .iter()
                    .any(|a| (a.recipient, a.device, a.id) == (r.recipient, r.device, r.id));
                if acked {
                    deleted.push(StoredRow::Sealed(r.clone()));
                }
                !acked
            });
            self.bodies
                .lock()
                .unwrap()
                .retain(|b| rows.iter().any(|r| r.id == b.id));
            Ok(deleted)
        }

        async fn shared_bodies(&self, ids: &[Uuid]) -> StoreResult<Vec<SealedBody>> {
            let bodies = self.bodies.lock().unwrap();
            Ok(bodies
                .iter()
                .filter(|b| ids.contains(&b.id))
                .cloned()
                .collect())
        }

        async fn sent_key(
            &self,
            hashes: &[Vec<u8>],
            now: DateTime<Utc>,
        ) -> StoreResult<Option<SealedKey>> {
            let keys = self.keys.lock().unwrap();
            Ok(keys
                .iter()
                .find(|k| hashes.contains(&k.hash) && k.expires_at > now)
                .cloned())
        }

        async fn forget_sender_keys(&self, accounts: &[Vec<u8>]) -> StoreResult<u64> {
            let mut keys = self.keys.lock().unwrap();
            let before = keys.len();
            keys.retain(|k| !accounts.contains(&k.account));
            Ok((before - keys.len()) as u64)
        }

        async fn queued_sizes(
            &self,
            recipient: Uuid,
            device: DeviceId,
            after: Uuid,
            limit: u32,
        ) -> StoreResult<Vec<(Uuid, u64)>> {
            let mut sizes: Vec<(Uuid, u64)> = self
                .queued(recipient, device, after)
                .map(|r| (r.id, r.sealed.len() as u64))
                .collect();
            sizes.truncate(limit as usize);
            Ok(sizes)
        }

        async fn fetch_through(
            &self,
            recipient: Uuid,
            device: DeviceId,
            after: Uuid,
            through: Uuid,
            limit: u32,
        ) -> StoreResult<Vec<StoredRow>> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(self
                .queued(recipient, device, after)
                .filter(|r| r.id <= through)
                .take(limit as usize)
                .map(StoredRow::Sealed)
                .collect())
        }

        async fn queued_ids(
            &self,
            recipient: Uuid,
            device: DeviceId,
            after: Uuid,
            limit: u32,
        ) -> StoreResult<Vec<Uuid>> {
            let mut ids: Vec<Uuid> = self
                .queued(recipient, device, after)
                .map(|r| r.id)
                .collect();
            ids.truncate(limit as usize);
            Ok(ids)
        }

        async fn queue_shares(&self, recipient: Uuid) -> StoreResult<Vec<QueueShare>> {
            let rows = self.rows.lock().unwrap();
            let mut shares: Vec<QueueShare> = Vec::new();
            for row in rows.iter().filter(|r| r.recipient == recipient) {
                let bytes = row.sealed.len() as u64;
                match shares
                    .iter_mut()
                    .find(|s| (s.device, s.sender_tag) == (row.device, row.sender_tag))
                {
                    Some(share) => {
                        share.rows += 1;
                        share.bytes += bytes;
                    }
                    None => shares.push(QueueShare {
                        device: row.device,
                        sender_tag: row.sender_tag,
                        rows: 1,
                        bytes,
                    }),
                }
            }
            Ok(shares)
        }

        async fn purge(&self, recipient: Uuid, device: Option<DeviceId>) -> StoreResult<u64> {
            let mut rows = self.rows.lock().unwrap();
            let before = rows.len();
            rows.retain(|r| r.recipient != recipient || device.is_some_and(|d| d != r.device));
            Ok((before - rows.len()) as u64)
        }
    }

    #[async_trait]
    impl DeviceIds for MemQueue {
        async fn device_ids(&self, user: Uuid) -> StoreResult<Vec<DeviceId>> {
            let devices = self.devices.lock().unwrap();
            Ok(devices
                .iter()
                .find(|(u, _)| *u == user)
                .map(|(_, d)| d.clone())
                .unwrap_or_default())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::fake::MemQueue;
    use super::*;

    /// The address the tests' pages are read for.
    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn delivery(queue: Arc<MemQueue>) -> Delivery {
        delivery_within(queue, Duration::from_secs(60))
    }

    /// A delivery core whose sends and acks wait `deadline` for a write.
    fn delivery_within(queue: Arc<MemQueue>, deadline: Duration) -> Delivery {
        let broker: Arc<dyn Broker> = Arc::new(crate::cluster::local::LocalBroker);
        let keys = Arc::new(KeyRing::generate().unwrap());
        let metrics = Arc::new(Metrics::disabled());
        let (committer, _task) = Committer::spawn(
            queue.clone(),
            keys.clone(),
            metrics.clone(),
            true,
            listeners::with_broker(&broker, []),
            Duration::from_millis(5),
        );
        let limits = Limits {
            max_body_bytes: 1024,
            max_devices_per_user: 10,
            send_rate_per_second: 0,
            send_rate_burst: 1,
            pair_rate_per_second: 0,
            pair_rate_burst: 1,
            max_queued_per_device: 0,
            max_queued_per_sender: 0,
            max_queued_bytes_per_user: 0,
            deadline,
            drain_budget: DRAIN_BUDGET,
            drain_share: 0,
            multi: MultiLimits {
                max_recipients: 10,
                max_devices: 50,
                max_key_bytes: 256,
            },
        };
        let hub = Hub::new(16, 0, metrics.clone());
        let directory = Arc::new(Directory::new(queue.clone()));
        Delivery::new(
            queue, directory, committer, hub, keys, limits, true, broker, metrics,
        )
    }

    /// A queue holding these accounts and their devices.
    fn queue_of(accounts: &[(Uuid, Vec<DeviceId>)]) -> Arc<MemQueue> {
        let queue = MemQueue::default();
        *queue.devices.lock().unwrap() = accounts.to_vec();
        Arc::new(queue)
    }

    /// A queue whose commits take a while, so that a message can be
    /// accepted and still uncommitted when a connection subscribes.
    fn slow_queue(accounts: &[(Uuid, Vec<DeviceId>)]) -> Arc<MemQueue> {
        let queue = MemQueue {
            delay: Duration::from_millis(200),
            ..MemQueue::default()
        };
        *queue.devices.lock().unwrap() = accounts.to_vec();
        Arc::new(queue)
    }

    fn device(user: Uuid, device: DeviceId) -> Address {
        Address { user, device }
    }

    /// A message accepted before a connection subscribes, and still being
    /// committed when it does, reaches that connection through its backlog.
    #[tokio::test]
    async fn a_message_in_commit_while_subscribing_is_in_the_backlog() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let delivery = delivery(slow_queue(&[(alice, vec![1]), (bob, vec![1])]));
        let accepted = delivery
            .accept(
                device(alice, 1),
                bob,
                Content::Same(b"early".to_vec()),
                None,
                true,
            )
            .await
            .unwrap();

        let Subscription {
            mut registration,
            barrier,
            ..
        } = delivery
            .subscribe(device(bob, 1), Uuid::new_v4(), false)
            .await
            .unwrap();
        // Not pushed: bob was not registered when it was accepted.
        assert!(registration.rx.try_recv().is_none());
        barrier.await.unwrap();
        let backlog = delivery
            .fetch(device(bob, 1), LOCAL, None, 10)
            .await
            .unwrap();
        assert_eq!(
            backlog.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
            [accepted.id]
        );

        // And one accepted after subscribing is pushed.
        let later = delivery
            .accept(
                device(alice, 1),
                bob,
                Content::Same(b"later".to_vec()),
                None,
                true,
            )
            .await
            .unwrap();
        match registration.rx.recv().await.unwrap() {
            Event::Message(pushed) => assert_eq!(pushed.message.id, later.id),
            _ => panic!("expected the message"),
        }
    }

    /// One id, one copy per device, each acknowledged on its own, and a
    /// receipt to the sender for each.
    #[tokio::test]
    async fn each_device_settles_its_own_copy_and_the_sender_hears_of_it() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = queue_of(&[(alice, vec![1]), (bob, vec![1, 2])]);
        let delivery = delivery(queue.clone());
        let mut sender = delivery
            .subscribe(device(alice, 1), Uuid::new_v4(), false)
            .await
            .unwrap()
            .registration;
        let content = Content::PerDevice(vec![(1, b"one".to_vec()), (2, b"two".to_vec())]);
        let sent = delivery
            .send(device(alice, 1), bob, content, None, true)
            .await
            .unwrap();
        for (d, body) in [(1, b"one"), (2, b"two")] {
            let page = delivery
                .fetch(device(bob, d), LOCAL, None, 10)
                .await
                .unwrap();
            assert_eq!(page.messages.len(), 1);
            assert_eq!(
                (page.messages[0].id, page.messages[0].sender_device),
                (sent.id, 1)
            );
            assert_eq!(page.messages[0].body, &body[..]);
        }
        assert_eq!(
            delivery.ack(device(bob, 1), vec![sent.id]).await.unwrap(),
            1
        );
        assert!(
            delivery
                .fetch(device(bob, 1), LOCAL, None, 10)
                .await
                .unwrap()
                .messages
                .is_empty()
        );
        assert_eq!(
            delivery
                .fetch(device(bob, 2), LOCAL, None, 10)
                .await
                .unwrap()
                .messages
                .len(),
            1
        );
        match sender.rx.recv().await.unwrap() {
            Event::Receipt(receipt) => {
                assert_eq!(
                    *receipt,
                    Receipt {
                        id: sent.id,
                        to: bob,
                        device: 1
                    }
                );
            }
            _ => panic!("expected a receipt"),
        }
    }

    /// A send repeated under its key, while the first is still being
    /// committed and after it is, gets the first id and stores nothing
    /// more; the same key for another send is refused, and another
    /// device's same key is another send.
    #[tokio::test]
    async fn a_repeated_send_key_stores_one_message() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = slow_queue(&[(alice, vec![1, 2]), (bob, vec![1])]);
        let delivery = Arc::new(delivery(queue.clone()));
        let send = |device: DeviceId, body: &'static [u8]| {
            let delivery = delivery.clone();
            async move {
                delivery
                    .send(
                        Address {
                            user: alice,
                            device,
                        },
                        bob,
                        Content::Same(body.to_vec()),
                        Some("k1".into()),
                        true,
                    )
                    .await
            }
        };
        // The second starts while the first commits (200 ms a write).
        let (first, second) = tokio::join!(send(1, b"hi"), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            send(1, b"hi").await
        });
        let id = first.unwrap().id;
        assert_eq!(second.unwrap().id, id);
        assert_eq!(send(1, b"hi").await.unwrap().id, id);
        assert_eq!(queue.rows.lock().unwrap().len(), 1);
        assert_eq!(
            send(1, b"other").await.err().map(|e| e.code()),
            Some("conflict")
        );
        let other_device = send(2, b"hi").await.unwrap();
        assert_ne!(other_device.id, id);
        assert_eq!(queue.rows.lock().unwrap().len(), 2);
        assert!(delivery.flights.is_empty());
    }

    /// A keyed send whose every copy is acked before it is written still
    /// writes its key, and only then is it answered: a retry finds it.
    #[tokio::test]
    async fn a_send_key_is_written_even_when_every_copy_was_acked() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = queue_of(&[(alice, vec![1]), (bob, vec![1])]);
        let delivery = delivery(queue.clone());
        let mut bob_socket = delivery
            .subscribe(device(bob, 1), Uuid::new_v4(), false)
            .await
            .unwrap()
            .registration;
        let mut accepted = delivery
            .accept(
                device(alice, 1),
                bob,
                Content::Same(b"hi".to_vec()),
                Some("k".into()),
                true,
            )
            .await
            .unwrap();
        let Event::Message(pushed) = bob_socket.rx.recv().await.unwrap() else {
            panic!("expected the push");
        };
        assert_eq!(
            delivery
                .ack(device(bob, 1), vec![accepted.id])
                .await
                .unwrap(),
            1
        );
        (&mut accepted.durable).await.unwrap();
        assert!(queue.rows.lock().unwrap().is_empty(), "elided");
        assert_eq!(queue.keys.lock().unwrap().len(), 1);
        let again = delivery
            .send(
                device(alice, 1),
                bob,
                Content::Same(b"hi".to_vec()),
                Some("k".into()),
                true,
            )
            .await
            .unwrap();
        assert_eq!((again.id, pushed.message.id), (accepted.id, accepted.id));
        assert!(queue.rows.lock().unwrap().is_empty());
    }

    /// A keyed send that fails to commit leaves no key: the retry stores it.
    #[tokio::test]
    async fn a_failed_keyed_send_can_be_retried() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = queue_of(&[(alice, vec![1]), (bob, vec![1])]);
        let delivery = delivery(queue.clone());
        let send = || {
            delivery.send(
                device(alice, 1),
                bob,
                Content::Same(b"hi".to_vec()),
                Some("k".into()),
                true,
            )
        };
        queue
            .failing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(send().await.err().map(|e| e.code()), Some("unavailable"));
        queue
            .failing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let sent = send().await.unwrap();
        assert_eq!(queue.rows.lock().unwrap()[0].id, sent.id);
        let key = queue.keys.lock().unwrap()[0].clone();
        assert_eq!(delivery.keys.open_key(key).unwrap().0, sent.id);
    }

    #[test]
    fn a_page_is_cut_by_rows_and_stored_bytes_before_it_is_read() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let sizes = |s: [u64; 4]| ids.iter().copied().zip(s).collect::<Vec<_>>();
        let extent = |sizes: &[(Uuid, u64)], limit, max| PageExtent::of(sizes, limit, max);
        assert_eq!(extent(&[], 10, 100), None);
        // Within both bounds: all of it, nothing follows.
        assert_eq!(
            extent(&sizes([10, 10, 10, 10]), 10, 100),
            Some(PageExtent {
                last: ids[3],
                rows: 4,
                bytes: 40,
                more: false
            })
        );
        // The row bound (the caller reads one row more than it asks).
        assert_eq!(
            extent(&sizes([10, 10, 10, 10]), 3, 100),
            Some(PageExtent {
                last: ids[2],
                rows: 3,
                bytes: 30,
                more: true
            })
        );
        // The byte bound: the row that would pass it starts the next page.
        assert_eq!(
            extent(&sizes([40, 40, 40, 10]), 10, 100),
            Some(PageExtent {
                last: ids[1],
                rows: 2,
                bytes: 80,
                more: true
            })
        );
        // At least one row, however large.
        assert_eq!(
            extent(&sizes([500, 1, 1, 1]), 10, 100),
            Some(PageExtent {
                last: ids[0],
                rows: 1,
                bytes: 500,
                more: true
            })
        );
    }

    /// A page gives its bytes back to the drain budget when it is dropped.
    #[tokio::test]
    async fn a_page_holds_its_bytes_of_the_drain_budget_until_dropped() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = queue_of(&[(alice, vec![1]), (bob, vec![1])]);
        let delivery = delivery(queue.clone());
        for _ in 0..3 {
            let body = Content::Same(vec![7; 1000]);
            delivery
                .send(device(alice, 1), bob, body, None, true)
                .await
                .unwrap();
        }
        let stored: usize = queue
            .rows
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.sealed.len())
            .sum();
        let page = delivery
            .fetch(device(bob, 1), LOCAL, None, 10)
            .await
            .unwrap();
        assert_eq!(page.messages.len(), 3);
        assert_eq!(
            delivery.drains.available(),
            DRAIN_BUDGET - stored - 3 * PAGE_ROW_OVERHEAD
        );
        drop(page);
        assert_eq!(delivery.drains.available(), DRAIN_BUDGET);
        // An empty page reads no rows and takes nothing.
        let reads = queue.reads.load(std::sync::atomic::Ordering::Relaxed);
        let empty = delivery
            .fetch(device(alice, 1), LOCAL, None, 10)
            .await
            .unwrap();
        assert!(empty.messages.is_empty() && empty.next.is_none());
        assert_eq!(
            queue.reads.load(std::sync::atomic::Ordering::Relaxed),
            reads
        );
    }

    /// Envelopes that miss or add a device store nothing and say which.
    #[tokio::test]
    async fn envelopes_must_match_the_devices() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = queue_of(&[(alice, vec![1, 2]), (bob, vec![1, 3])]);
        let delivery = delivery(queue.clone());
        let content = || Content::PerDevice(vec![(1, b"x".to_vec()), (2, b"y".to_vec())]);
        match delivery
            .send(device(alice, 1), bob, content(), None, true)
            .await
        {
            Err(Error::DevicesChanged { missing, extra }) => {
                assert_eq!((missing, extra), (vec![3], vec![2]));
            }
            other => panic!("expected devices_changed, got {:?}", other.err()),
        }
        assert!(queue.rows.lock().unwrap().is_empty());
        // To yourself: your sending device is left out, so naming it is extra.
        match delivery
            .send(device(alice, 1), alice, content(), None, true)
            .await
        {
            Err(Error::DevicesChanged { missing, extra }) => {
                assert_eq!((missing, extra), (vec![], vec![1]));
            }
            other => panic!("expected devices_changed, got {:?}", other.err()),
        }
        let sync = Content::PerDevice(vec![(2, b"sync".to_vec())]);
        delivery
            .send(device(alice, 1), alice, sync, None, true)
            .await
            .unwrap();
        let rows = queue.rows.lock().unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.recipient, r.device))
                .collect::<Vec<_>>(),
            [(alice, 2)]
        );
    }

    /// A write slower than the deadline: the send is answered
    /// `unavailable` without waiting for it, the write goes on and commits
    /// (which is why a 503 "may have been stored"), and the core serves on.
    #[tokio::test]
    async fn a_send_past_its_deadline_is_unavailable_and_may_still_be_stored() {
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let queue = slow_queue(&[(alice, vec![1]), (bob, vec![1])]);
        let delivery = delivery_within(queue.clone(), Duration::from_millis(50));
        let late = delivery
            .send(
                device(alice, 1),
                bob,
                Content::Same(b"late".to_vec()),
                None,
                true,
            )
            .await;
        assert!(matches!(late, Err(Error::Unavailable)), "{:?}", late.err());
        // The write, slow but not failed, completes in the background.
        let stored = async {
            while queue.rows.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), stored)
            .await
            .expect("the write that passed its deadline commits all the same");
        // An ack past its deadline is unavailable too; a retry finds its
        // work done.
        let id = queue.rows.lock().unwrap()[0].id;
        let ack = delivery.ack(device(bob, 1), vec![id]).await;
        assert!(matches!(ack, Err(Error::Unavailable)), "{:?}", ack.err());
        let acked = async {
            while !queue.rows.lock().unwrap().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), acked)
            .await
            .expect("the ack that passed its deadline is applied all the same");
    }
}
