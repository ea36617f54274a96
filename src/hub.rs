//! The connection hub: which connections are online for which device of
//! which account, and the routing of a pushed message to each of them.
//!
//! Connections are kept per account, each handle naming its device: a
//! message goes to the sockets of one device (each device has its own
//! queue), a notice (a delivery receipt, a change of the account's devices)
//! to every socket of the account. A device may hold several sockets
//! (browser tabs, an app restarting); one opened as exclusive displaces the
//! older ones of its device (kicked with [`Kick::Displaced`] as it
//! registers).
//!
//! The hub only routes: it owns no durability and never touches the
//! database. A message pushed here is also on its way to the store, so a
//! connection that misses it (offline, overflowed, dropped) finds it in its
//! queue on the next drain.
//!
//! Each connection has a bounded outbound queue. The hub never waits on one:
//! it uses `try_send`, and a connection whose queue is full (a reader that
//! has stalled) is kicked: removed from the hub and told to close. Its
//! messages stay queued in the store for its next connection, so a slow
//! reader costs at most its queue and never delays anyone else.
//!
//! The hub knows only this process's connections. Push order (a device's
//! connections see messages in id order) rests on the delivery core calling
//! [`Hub::push`] under its order lock for messages accepted here, and on
//! the broker handing over each other node's messages in that node's order
//! (see [`crate::cluster`]), not on anything here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use dashmap::DashMap;
use flume::TrySendError;
use futures_util::StreamExt;
use smallvec::SmallVec;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::devices::DevicesChange;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::store::{DeviceId, Message};

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kick {
    /// Its outbound queue overflowed: a reader that stalled.
    Overflow,
    /// Its session was revoked, or its device removed.
    Revoked,
    /// A newer exclusive socket of its device took over.
    Displaced,
}

/// Tells a connection to close, and why. The first reason given sticks.
#[derive(Default)]
struct KickSignal {
    token: CancellationToken,
    reason: OnceLock<Kick>,
}

impl KickSignal {
    fn kick(&self, reason: Kick) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

/// What a connection is sent through its queue. The message is shared, not
/// copied: one message pushed to five devices is one allocation.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub message: Arc<Message>,
    /// Pushed only to connections online now and never stored: the client
    /// need not ack it, and it is never redelivered.
    pub ephemeral: bool,
    /// When the delivery core accepted it: the start of its push latency.
    pub accepted: Instant,
    /// Accepted by another node and carried here by the broker: only the
    /// exact-id rule de-duplicates it (see [`crate::cluster`]).
    pub remote: bool,
}

/// A delivery receipt: `to`'s device `device` acknowledged message `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub id: Uuid,
    pub to: Uuid,
    pub device: DeviceId,
}

/// What a connection is sent through its queue.
#[derive(Debug, Clone)]
pub enum Event {
    Message(Outbound),
    /// Sent to every socket of the sender's account; never stored. Boxed
    /// so that an `Event` stays the size of an [`Outbound`]: a queue's
    /// slots are the size of its largest event.
    Receipt(Box<Receipt>),
    /// A device of the account was added, removed, signed in to or given a
    /// new key: the account's device numbers now, and which device it was.
    /// Boxed, as a receipt is: it is rare, and unboxed it made every slot
    /// of every queue 8 bytes larger.
    DevicesChanged(Box<DevicesChange>),
    /// Broker traffic may have been lost: read the backlog again after this
    /// id and send what the socket has not had. Never dropped: a socket
    /// whose queue is full is closed, and drains on reconnect.
    Reread(Uuid),
}

/// One connection as the hub sees it.
#[derive(Clone)]
struct ConnHandle {
    id: u64,
    device: DeviceId,
    /// The session (refresh-token family) the connection authenticated with,
    /// so that revoking a session can find its sockets.
    session: Uuid,
    tx: flume::Sender<Event>,
    kick: Arc<KickSignal>,
}

/// Most users hold one or two connections (phone, laptop): keep those inline.
type Handles = SmallVec<[ConnHandle; 2]>;

pub struct Hub {
    conns: DashMap<Uuid, Handles>,
    next_id: AtomicU64,
    /// Capacity of each connection's outbound queue.
    queue_bound: usize,
    /// Connections one device may hold on this node; 0 for no limit.
    max_per_device: usize,
    /// Its gauges of connections and users online, moved under the same
    /// shard lock that adds or removes a connection.
    metrics: Arc<Metrics>,
}

/// A connection's membership in the hub. Dropping it unregisters the
/// connection, so no exit path of a connection task can leak an entry.
pub struct Registration {
    hub: Arc<Hub>,
    user: Uuid,
    id: u64,
    /// Messages and notices pushed to this connection.
    pub rx: Inbox,
    /// Cancelled when the hub gives up on this connection; then
    /// [`Registration::kick_reason`] says why.
    pub kicked: CancellationToken,
    signal: Arc<KickSignal>,
}

/// A connection's queue of events, filled by the hub: bounded at the hub's
/// `queue_bound`, and empty until something is pushed. A `flume` channel,
/// whose buffer is allocated as events arrive: tokio's bounded channel
/// allocates a block of 32 slots and a 512-byte channel at creation, some
/// 1.5 KiB that every idle socket would hold.
pub struct Inbox {
    rx: flume::Receiver<Event>,
    /// Kept across waits, so that waiting again reuses its registration.
    stream: flume::r#async::RecvStream<'static, Event>,
}

impl Inbox {
    /// The next event; `None` once the hub dropped the connection.
    /// Cancel-safe: an event is taken only when it is returned.
    pub async fn recv(&mut self) -> Option<Event> {
        self.stream.next().await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Registration {
    /// Why the connection was kicked, if it was.
    pub fn kick_reason(&self) -> Option<Kick> {
        self.signal.reason.get().copied()
    }
}

impl Hub {
    pub fn new(queue_bound: usize, max_per_device: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            conns: DashMap::new(),
            next_id: AtomicU64::new(1),
            queue_bound: queue_bound.max(1),
            max_per_device,
            metrics,
        })
    }

    /// Adds a connection of `user`'s `device`, unless the device holds as
    /// many as it may (counted under the same shard lock that adds it, so
    /// concurrent connects cannot overshoot). Messages pushed from now on
    /// reach its `rx`, which buffers them while the connection drains its
    /// backlog.
    pub fn register(
        self: &Arc<Self>,
        user: Uuid,
        device: DeviceId,
        session: Uuid,
    ) -> Result<Registration, Error> {
        let mut handles = self.conns.entry(user).or_default();
        // Sockets already told to close (displaced by this one, say) are
        // on their way out and do not count.
        let held = handles
            .iter()
            .filter(|h| h.device == device && !h.kick.token.is_cancelled())
            .count();
        if self.max_per_device != 0 && held >= self.max_per_device {
            return Err(Error::TooManyConnections(
                "too many connections for this device",
            ));
        }
        let (tx, rx) = flume::bounded(self.queue_bound);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(KickSignal::default());
        // An entry can be present and empty for a moment (see `unregister`):
        // a user comes online when their list stops being empty.
        if handles.is_empty() {
            self.metrics.users_online.increment(1);
        }
        self.metrics.ws_connections.increment(1);
        handles.push(ConnHandle {
            id,
            device,
            session,
            tx,
            kick: signal.clone(),
        });
        drop(handles);
        Ok(Registration {
            hub: self.clone(),
            user,
            id,
            rx: Inbox {
                stream: rx.clone().into_stream(),
                rx,
            },
            kicked: signal.token.clone(),
            signal,
        })
    }

    fn unregister(&self, user: Uuid, id: u64) {
        // `remove_if` takes the shard's write lock once; nothing awaits here.
        if let Some(mut handles) = self.conns.get_mut(&user) {
            // Called twice for a connection the hub dropped (on the kick and
            // when its registration drops): only the first removes it.
            let before = handles.len();
            handles.retain(|h| h.id != id);
            if handles.len() < before {
                self.metrics.ws_connections.decrement(1);
                if handles.is_empty() {
                    self.metrics.users_online.decrement(1);
                }
            }
        }
        self.conns.remove_if(&user, |_, handles| handles.is_empty());
    }

    /// Whether `user` has an entry on this node: the tests' check that an
    /// emptied entry is removed. Sends no longer ask it (the device
    /// directory says whether a recipient exists).
    #[cfg(test)]
    fn is_online(&self, user: Uuid) -> bool {
        self.conns.contains_key(&user)
    }

    /// Whether `user`'s `device` holds a socket on this node that has not
    /// been told to close.
    pub fn has_device(&self, user: Uuid, device: DeviceId) -> bool {
        self.conns.get(&user).is_some_and(|handles| {
            handles
                .iter()
                .any(|h| h.device == device && !h.kick.token.is_cancelled())
        })
    }

    /// Live connections on this node.
    pub fn connections(&self) -> usize {
        self.conns.iter().map(|entry| entry.value().len()).sum()
    }

    /// Queues `message` for every connection of `user`'s `device`; returns
    /// how many took it. Never blocks: a full queue kicks its connection.
    pub fn push(&self, user: Uuid, device: DeviceId, message: &Outbound) -> usize {
        self.send(
            user,
            |h| h.device == device,
            || Event::Message(message.clone()),
            false,
        )
    }

    /// Queues a notice for every connection of `user`, whatever its device;
    /// returns how many took it. A receipt that finds a queue full is
    /// dropped (it is best effort, and a socket draining its backlog reads
    /// no notices until it is done: it must not be closed for them); a
    /// change of devices, which a client must not miss, kicks the
    /// connection as a message would, and it learns the list on reconnect.
    pub fn notify(&self, user: Uuid, event: Event) -> usize {
        let droppable = matches!(event, Event::Receipt(_));
        self.send(user, |_| true, || event.clone(), droppable)
    }

    /// Queues `event` for every connection on this node; returns how many
    /// took it. Visits one shard at a time, never waiting.
    pub fn notify_all(&self, event: Event) -> usize {
        let users: Vec<Uuid> = self.conns.iter().map(|entry| *entry.key()).collect();
        users
            .into_iter()
            .map(|user| self.notify(user, event.clone()))
            .sum()
    }

    fn send(
        &self,
        user: Uuid,
        to: impl Fn(&ConnHandle) -> bool,
        event: impl Fn() -> Event,
        droppable: bool,
    ) -> usize {
        let mut delivered = 0;
        let mut dropped: SmallVec<[u64; 2]> = SmallVec::new();
        if let Some(handles) = self.conns.get(&user) {
            for handle in handles.iter().filter(|h| to(h)) {
                match handle.tx.try_send(event()) {
                    Ok(()) => delivered += 1,
                    Err(TrySendError::Full(_)) if droppable => {
                        self.metrics.receipts_dropped.increment(1);
                    }
                    Err(TrySendError::Full(_)) => {
                        tracing::info!(user.id = %user, conn = handle.id, "outbound queue full: closing the connection");
                        handle.kick.kick(Kick::Overflow);
                        dropped.push(handle.id);
                    }
                    Err(TrySendError::Disconnected(_)) => dropped.push(handle.id),
                }
            }
        } // The shard lock is released here, before `unregister` takes it.
        for id in dropped {
            self.unregister(user, id);
        }
        delivered
    }

    /// Moves a connection to another session of its user (renewal with a
    /// token from a new login), so that revoking that session finds it.
    pub fn rebind(&self, registration: &Registration, session: Uuid) {
        if let Some(mut handles) = self.conns.get_mut(&registration.user) {
            for handle in handles.iter_mut().filter(|h| h.id == registration.id) {
                handle.session = session;
            }
        }
    }

    /// Closes every connection of `user` in `session`, or all of the user's
    /// connections with `None`. Returns how many were closed.
    pub fn kick(&self, user: Uuid, session: Option<Uuid>, reason: Kick) -> usize {
        self.kick_where(user, reason, |h| session.is_none_or(|s| s == h.session))
    }

    /// Closes every connection of `user`'s `device`.
    pub fn kick_device(&self, user: Uuid, device: DeviceId, reason: Kick) -> usize {
        self.kick_where(user, reason, |h| h.device == device)
    }

    fn kick_where(&self, user: Uuid, reason: Kick, which: impl Fn(&ConnHandle) -> bool) -> usize {
        let mut kicked = 0;
        if let Some(handles) = self.conns.get(&user) {
            for handle in handles.iter().filter(|h| which(h)) {
                handle.kick.kick(reason);
                kicked += 1;
            }
        }
        kicked
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.user, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(recipient: Uuid) -> Outbound {
        let id = Uuid::now_v7();
        Outbound {
            message: Arc::new(Message {
                id,
                recipient,
                device: 1,
                sender: Uuid::new_v4(),
                sender_device: 1,
                body: (vec![1, 2, 3]).into(),
                key: None,
                receipts: true,
                sent_at: crate::store::id_time(id),
            }),
            ephemeral: false,
            accepted: Instant::now(),
            remote: false,
        }
    }

    impl Event {
        fn message_id(&self) -> Uuid {
            match self {
                Event::Message(outbound) => outbound.message.id,
                _ => panic!("expected a message"),
            }
        }
    }

    #[tokio::test]
    async fn messages_go_to_one_device_and_notices_to_all() {
        assert_eq!(
            std::mem::size_of::<Event>(),
            std::mem::size_of::<Outbound>()
        );
        let hub = hub(8, 0);
        let alice = Uuid::new_v4();
        let mut phone = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let mut laptop = hub.register(alice, 2, Uuid::new_v4()).unwrap();
        let m = message(alice);
        assert_eq!(hub.push(alice, 2, &m), 1);
        assert_eq!(laptop.rx.recv().await.unwrap().message_id(), m.message.id);
        assert!(phone.rx.try_recv().is_none());
        let change = DevicesChange {
            devices: Arc::from(vec![1, 2]),
            about: Some((2, crate::devices::ChangeReason::Added)),
        };
        assert_eq!(
            hub.notify(alice, Event::DevicesChanged(Box::new(change))),
            2
        );
        for rx in [&mut phone.rx, &mut laptop.rx] {
            assert!(
                matches!(rx.recv().await, Some(Event::DevicesChanged(c)) if *c.devices == [1, 2])
            );
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_receipts_but_not_the_connection() {
        let hub = hub(1, 0);
        let alice = Uuid::new_v4();
        let phone = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let receipt = || {
            Event::Receipt(Box::new(Receipt {
                id: Uuid::now_v7(),
                to: Uuid::new_v4(),
                device: 1,
            }))
        };
        assert_eq!(hub.notify(alice, receipt()), 1);
        assert_eq!(hub.notify(alice, receipt()), 0);
        assert!(!phone.kicked.is_cancelled());
        // A message that finds it full still closes it.
        assert_eq!(hub.push(alice, 1, &message(alice)), 0);
        assert_eq!(phone.kick_reason(), Some(Kick::Overflow));
    }

    #[tokio::test]
    async fn kicking_a_device_leaves_the_others() {
        let hub = hub(8, 0);
        let alice = Uuid::new_v4();
        let old = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let other_device = hub.register(alice, 2, Uuid::new_v4()).unwrap();
        assert_eq!(hub.kick_device(alice, 1, Kick::Displaced), 1);
        assert_eq!(old.kick_reason(), Some(Kick::Displaced));
        assert!(!other_device.kicked.is_cancelled());
        assert_eq!(hub.kick_device(alice, 2, Kick::Revoked), 1);
        assert_eq!(other_device.kick_reason(), Some(Kick::Revoked));
    }

    fn hub(queue_bound: usize, max_per_user: usize) -> Arc<Hub> {
        Hub::new(queue_bound, max_per_user, Arc::new(Metrics::disabled()))
    }

    #[tokio::test]
    async fn pushes_reach_every_connection_of_the_user_only() {
        let hub = hub(8, 0);
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let mut phone = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let mut laptop = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let mut other = hub.register(bob, 1, Uuid::new_v4()).unwrap();
        let m = message(alice);
        assert_eq!(hub.push(alice, 1, &m), 2);
        assert_eq!(phone.rx.recv().await.unwrap().message_id(), m.message.id);
        assert_eq!(laptop.rx.recv().await.unwrap().message_id(), m.message.id);
        assert!(other.rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn dropping_the_registration_unregisters() {
        let hub = hub(8, 0);
        let user = Uuid::new_v4();
        let first = hub.register(user, 1, Uuid::new_v4()).unwrap();
        let second = hub.register(user, 1, Uuid::new_v4()).unwrap();
        assert_eq!(hub.connections(), 2);
        drop(first);
        assert!(hub.is_online(user));
        drop(second);
        assert!(!hub.is_online(user));
        assert_eq!(hub.push(user, 1, &message(user)), 0);
    }

    #[tokio::test]
    async fn a_full_queue_kicks_only_its_connection() {
        let hub = hub(2, 0);
        let user = Uuid::new_v4();
        let stalled = hub.register(user, 1, Uuid::new_v4()).unwrap();
        let mut healthy = hub.register(user, 1, Uuid::new_v4()).unwrap();
        for _ in 0..2 {
            assert_eq!(hub.push(user, 1, &message(user)), 2);
            healthy.rx.recv().await.unwrap();
        }
        // The stalled queue is full: the third push kicks it.
        assert_eq!(hub.push(user, 1, &message(user)), 1);
        assert!(stalled.kicked.is_cancelled());
        assert!(!healthy.kicked.is_cancelled());
        assert_eq!(hub.connections(), 1);
        assert_eq!(hub.push(user, 1, &message(user)), 1);
    }

    #[tokio::test]
    async fn kick_by_session() {
        let hub = hub(2, 0);
        let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
        let a = hub.register(user, 1, session).unwrap();
        let b = hub.register(user, 1, Uuid::new_v4()).unwrap();
        assert_eq!(hub.kick(user, Some(session), Kick::Revoked), 1);
        assert!(a.kicked.is_cancelled() && !b.kicked.is_cancelled());
        assert_eq!(hub.kick(user, None, Kick::Revoked), 2);
    }

    #[tokio::test]
    async fn kicks_say_why() {
        let hub = hub(1, 0);
        let user = Uuid::new_v4();
        let revoked = hub.register(user, 1, Uuid::new_v4()).unwrap();
        hub.kick(user, None, Kick::Revoked);
        assert_eq!(revoked.kick_reason(), Some(Kick::Revoked));
        drop(revoked);
        let stalled = hub.register(user, 1, Uuid::new_v4()).unwrap();
        hub.push(user, 1, &message(user));
        hub.push(user, 1, &message(user));
        assert_eq!(stalled.kick_reason(), Some(Kick::Overflow));
    }

    #[tokio::test]
    async fn the_gauges_count_connections_and_users_once_each() {
        let metrics = Arc::new(Metrics::new(true));
        let hub = Hub::new(1, 0, metrics.clone());
        let gauges = || {
            let text = metrics.render();
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .map(|v| v.parse::<f64>().unwrap())
            };
            (
                value("sealpost_ws_connections"),
                value("sealpost_users_online"),
            )
        };
        let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let phone = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let laptop = hub.register(alice, 1, Uuid::new_v4()).unwrap();
        let stalled = hub.register(bob, 1, Uuid::new_v4()).unwrap();
        assert_eq!(gauges(), (Some(3.0), Some(2.0)));
        drop(phone);
        assert_eq!(gauges(), (Some(2.0), Some(2.0)));
        // Overflow: the hub drops bob's connection, and its registration
        // dropping later removes nothing more.
        hub.push(bob, 1, &message(bob));
        hub.push(bob, 1, &message(bob));
        assert_eq!(gauges(), (Some(1.0), Some(1.0)));
        drop(stalled);
        assert_eq!(gauges(), (Some(1.0), Some(1.0)));
        drop(laptop);
        assert_eq!(gauges(), (Some(0.0), Some(0.0)));
    }

    #[tokio::test]
    async fn the_per_device_cap_refuses_the_next_connection_until_one_leaves() {
        let hub = hub(1, 2);
        let user = Uuid::new_v4();
        // Another device of the same account counts on its own.
        let _laptop = hub.register(user, 2, Uuid::new_v4()).unwrap();
        let first = hub.register(user, 1, Uuid::new_v4()).unwrap();
        let _second = hub.register(user, 1, Uuid::new_v4()).unwrap();
        assert!(matches!(
            hub.register(user, 1, Uuid::new_v4()),
            Err(Error::TooManyConnections(_))
        ));
        assert!(hub.register(Uuid::new_v4(), 1, Uuid::new_v4()).is_ok());
        drop(first);
        assert!(hub.register(user, 1, Uuid::new_v4()).is_ok());
    }
}
