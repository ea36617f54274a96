//! [`Client`]: one signed-in device of one account, and what it does
//! (sign-up, login, sending, acknowledging) over whichever transport runs.
//!
//! The shared state of a client is `Inner`, behind an `Arc` held by the
//! [`Client`] handles and by the tasks (refresher, socket or poller). Those
//! tasks stop when the last `Client` handle is dropped or
//! [`Client::close`] is called: the handles share a guard whose `Drop`
//! signals the shutdown channel every task listens to.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use crate::backoff::full_jitter;
use crate::directory::{DirectoryCache, PeerDevice};
use crate::error::{Error, Result};
use crate::event::DeviceChange;
use crate::event::{EVENTS, Event, Events};
use crate::group::{Group, MAX_GROUP_NAME_CHARS, SharedBody};
use crate::keys::{self, DeviceKeys};
use crate::poll::{PollOptions, Poller};
use crate::rest::Rest;
use crate::seal::{self, MAX_TEXT_CHARS, Plaintext};
use crate::session::{Session, SessionTokens};
use crate::socket::{COMMANDS, Command, ConnectOptions, Driver, Outgoing, SendReply};
use crate::wire::{
    DeviceKey, Envelope, Limits, OwnDevice, PushInfo, PushTarget, SharedRecipient, User,
};

/// Sends again after `devices_changed` at most this often: the devices may
/// keep changing, and each retry costs a directory fetch.
const DIRECTORY_RETRIES: u32 = 3;
/// Sends tried again after a transient failure (5xx, a dropped
/// connection, a rate limit, a socket that stopped for good before its
/// `sent`) at most this often. A socket that drops and reconnects is not
/// counted: the socket task writes the send again itself.
const SEND_RETRIES: u32 = 3;
/// Acks the poller may be handed before [`Client::ack`] waits: as many as
/// the event stream holds.
const POLL_ACKS: usize = EVENTS;
/// A stored session whose access token has less left than this is
/// refreshed before use: the first requests would find it expired.
const RESUME_MARGIN: Duration = Duration::from_secs(60);
/// How long [`Client::ack_durable`] waits for the socket's `acked` before
/// it settles the ids over REST instead.
const ACKED_TIMEOUT: Duration = Duration::from_secs(10);
/// Version, nonce and tag around the plaintext in a sealed body.
const SEAL_OVERHEAD: usize = seal::MIN_LEN;

/// A message the server accepted.
#[derive(Debug)]
pub struct Sent {
    /// The server's id for it, the same in every recipient device's copy.
    pub id: Uuid,
    /// The client message id in its plaintext ([`Incoming::client_id`](crate::Incoming::client_id)
    /// at the receivers); not the `client_id` key of its sends, which the
    /// client draws for each and keeps to itself.
    pub client_id: Uuid,
    /// When the server accepted it.
    pub sent_at: DateTime<Utc>,
    /// Why the sync copy to your other devices could not be sent, if it
    /// could not; the message itself was.
    pub sync_error: Option<Error>,
}

/// How [`Client::send_with`] sends.
#[derive(Debug, Clone)]
pub struct SendOptions {
    urgent: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self { urgent: true }
    }
}

impl SendOptions {
    /// Whether the recipient's offline devices are woken at once, at high
    /// priority (`true`, the default: a message a person waits for), or
    /// at low priority and at most once per device in the server's quiet
    /// interval (`false`: anything that can wait until the app is opened).
    /// [`Client::send`] sends its sync copy to your other devices
    /// non-urgent whatever this says: you wrote it, nobody waits for it.
    pub fn urgent(mut self, urgent: bool) -> Self {
        self.urgent = urgent;
        self
    }
}

/// One signed-in device. Cheap to clone: the clones share the session, the
/// directory cache and the transport.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _guard: Arc<ShutdownGuard>,
}

impl std::fmt::Debug for Client {
    // Who it is, never its keys or tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.rest.base())
            .field("user_id", &self.inner.user_id)
            .field("username", &self.inner.username)
            .field("device_id", &self.inner.device_id)
            .finish_non_exhaustive()
    }
}

/// Signals the shutdown when the last [`Client`] handle goes.
struct ShutdownGuard(watch::Sender<bool>);

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// The transport in use, by the handle that feeds it.
#[derive(Clone)]
enum Transport {
    /// Neither: sends and acks go over REST, nothing is received.
    Rest,
    Socket(mpsc::Sender<Command>),
    Poll(mpsc::Sender<Vec<Uuid>>),
}

pub(crate) struct Inner {
    pub rest: Rest,
    pub session: Session,
    pub keys: DeviceKeys,
    pub user_id: Uuid,
    pub device_id: u32,
    pub username: String,
    pub directory: DirectoryCache,
    pub shutdown: watch::Receiver<bool>,
    /// Set while a transport task runs; held only to clone the handle.
    transport: Mutex<Transport>,
    /// The account's device ids as last seen, to tell which are new.
    known_devices: Mutex<BTreeSet<u32>>,
    /// What the server accepts, fetched once (`GET /v1/limits`).
    limits: tokio::sync::OnceCell<Limits>,
}

impl Client {
    /// Creates the account `username` with `keys` as its first device
    /// (device 1), and signs in as it: with the session the server opens
    /// with the account, or, from a server older than that, by logging in.
    pub async fn register(
        server: &str,
        username: &str,
        password: &str,
        keys: DeviceKeys,
    ) -> Result<Client> {
        let rest = Rest::new(server)?;
        let registered = rest
            .register(username, password, &keys.public_key_base64())
            .await?;
        let device_id = registered.device_id;
        let pair = match registered.session() {
            Some(pair) => pair,
            None => rest.login(username, password, device_id).await?,
        };
        Self::start(rest, SessionTokens::from_pair(pair), keys).await
    }

    /// Resumes a stored session ([`Client::session_tokens`]) without the
    /// password, as the device whose keys are `keys`. An access token with
    /// a minute or more left is used as it is (no request to the
    /// server's auth endpoints); an older one is refreshed first.
    ///
    /// Fails with [`Error::Unauthorized`] when the session has ended
    /// (logged out, expired, revoked): log in again with the password.
    /// Store the tokens again from now on
    /// ([`Client::on_session_tokens`]): refreshing spends the stored
    /// refresh token.
    pub async fn resume(server: &str, tokens: SessionTokens, keys: DeviceKeys) -> Result<Client> {
        let rest = Rest::new(server)?;
        let tokens = if tokens.remaining() < RESUME_MARGIN {
            let pair = rest
                .refresh(&tokens.refresh_token)
                .await
                .map_err(|e| match e {
                    crate::rest::RefreshError::NotSent(e)
                    | crate::rest::RefreshError::Lost(e)
                    | crate::rest::RefreshError::Refused(e) => e,
                })?;
            SessionTokens::from_pair(pair)
        } else {
            tokens
        };
        Self::start(rest, tokens, keys).await
    }

    /// Signs in as device `device_id` of `username`, whose key pair is
    /// `keys` (the one it was added with; a device that lost its keys should
    /// be added anew with [`Client::add_device`]).
    pub async fn login(
        server: &str,
        username: &str,
        password: &str,
        device_id: u32,
        keys: DeviceKeys,
    ) -> Result<Client> {
        let rest = Rest::new(server)?;
        let pair = rest.login(username, password, device_id).await?;
        Self::start(rest, SessionTokens::from_pair(pair), keys).await
    }

    /// Adds a device with `keys` to the account `username` and signs in as
    /// it. Its id is [`Client::device_id`]: keep it, with the keys, to log in
    /// again later.
    pub async fn add_device(
        server: &str,
        username: &str,
        password: &str,
        keys: DeviceKeys,
        name: Option<&str>,
    ) -> Result<Client> {
        let rest = Rest::new(server)?;
        let pair = rest
            .add_device(username, password, &keys.public_key_base64(), name)
            .await?;
        Self::start(rest, SessionTokens::from_pair(pair), keys).await
    }

    async fn start(rest: Rest, tokens: SessionTokens, keys: DeviceKeys) -> Result<Client> {
        let (stop, shutdown) = watch::channel(false);
        // Stops the refresher if a request below fails.
        let guard = ShutdownGuard(stop);
        let session = Session::start(rest.clone(), tokens, shutdown.clone());
        // Through the session: a resumed access token the server no longer
        // takes is refreshed (or the session found ended) here.
        let me = {
            let (token, generation) = session.current()?;
            match rest.me(&token).await {
                Err(Error::Unauthorized(_)) => {
                    let (token, _) = session.refreshed_after(generation).await?;
                    rest.me(&token).await?
                }
                other => other?,
            }
        };
        if me.public_key != keys.public_key_base64() {
            tracing::warn!(
                device_id = me.device_id,
                "the server holds another public key for this device: peers cannot write to these keys"
            );
        }
        let directory = DirectoryCache::default();
        directory.put_name(me.id, &me.username);
        let inner = Arc::new(Inner {
            rest,
            session,
            keys,
            user_id: me.id,
            device_id: me.device_id,
            username: me.username,
            directory,
            shutdown,
            transport: Mutex::new(Transport::Rest),
            known_devices: Mutex::new(BTreeSet::new()),
            limits: tokio::sync::OnceCell::new(),
        });
        // The list later changes are told against.
        inner.own_devices_changed(None).await?;
        Ok(Client {
            inner,
            _guard: Arc::new(guard),
        })
    }

    /// The session in force, to store and [`resume`](Client::resume)
    /// later. It changes with every refresh: see
    /// [`Client::on_session_tokens`].
    pub fn session_tokens(&self) -> SessionTokens {
        self.inner.session.tokens()
    }

    /// Calls `store` with the session in force now, then with every new
    /// pair, before the client uses it: an application that keeps the
    /// session keeps it here (and synchronously, so that a process stopped
    /// just after a refresh has stored the refresh token that replaced the
    /// spent one). Runs on the client's tasks; keep it short. Replaces an
    /// earlier one.
    pub fn on_session_tokens(&self, store: impl Fn(&SessionTokens) + Send + Sync + 'static) {
        self.inner.session.set_listener(Box::new(store));
    }

    /// What the server accepts (`GET /v1/limits`), asked once per client;
    /// the defaults of `protocol.md` from a server older than the endpoint
    /// (and, not kept, while it cannot be reached).
    pub async fn limits(&self) -> Limits {
        self.inner.limits().await
    }

    /// The username of `user`, if this client has learnt it: its own, one
    /// looked up with [`Client::find_user`], or one the server named in
    /// the directory of a peer this client wrote to or read from.
    pub fn known_username(&self, user: Uuid) -> Option<String> {
        self.inner.directory.name(user)
    }

    /// The username of `user`, asking the server's directory
    /// (`GET /v1/users/{id}/devices`) if this client has not learnt it.
    /// `None` from a server older than the directory's `username`.
    pub async fn username_of(&self, user: Uuid) -> Result<Option<String>> {
        if let Some(name) = self.inner.directory.name(user) {
            return Ok(Some(name));
        }
        self.inner.devices_of(user, true).await?;
        Ok(self.inner.directory.name(user))
    }

    /// This account's user id.
    pub fn user_id(&self) -> Uuid {
        self.inner.user_id
    }

    /// This client's device.
    pub fn device_id(&self) -> u32 {
        self.inner.device_id
    }

    pub fn username(&self) -> &str {
        &self.inner.username
    }

    /// This device's keys, to store.
    pub fn keys(&self) -> &DeviceKeys {
        &self.inner.keys
    }

    /// Looks a user up by name (`GET /v1/users/{username}`).
    pub async fn find_user(&self, username: &str) -> Result<User> {
        let rest = &self.inner.rest;
        let user = self
            .inner
            .authed(|token| async move { rest.user(&token, username).await })
            .await?;
        self.inner.directory.put_name(user.id, &user.username);
        Ok(user)
    }

    /// This account's devices (`GET /v1/devices`).
    pub async fn devices(&self) -> Result<Vec<OwnDevice>> {
        let rest = &self.inner.rest;
        self.inner
            .authed(|token| async move { rest.own_devices(&token).await })
            .await
    }

    /// Removes a device of this account (this one included), with the
    /// account's password.
    pub async fn remove_device(&self, device_id: u32, password: &str) -> Result<()> {
        let rest = &self.inner.rest;
        self.inner
            .authed(|token| async move { rest.remove_device(&token, device_id, password).await })
            .await
    }

    /// Registers where the server wakes this device when a message waits
    /// for it and it holds no socket (`PUT /v1/devices/{id}/push`):
    /// replaces its target, if any. The same target again is harmless.
    /// Register again whenever the platform hands out a new token or
    /// subscription, and after [`Event::PushTargetDropped`].
    ///
    /// A wake-up carries nothing (no sender, no text): on one, fetch the
    /// queue, open it and show what it holds (`protocol.md`, "Push
    /// targets"). Fails with [`Error::PushUnavailable`] when the server
    /// has no provider for the target's kind, and [`Error::Invalid`]
    /// naming the field it refuses (an endpoint that is not public
    /// `https`, keys of the wrong size, a token that is not hex).
    pub async fn set_push_target(&self, target: &PushTarget) -> Result<PushInfo> {
        let rest = &self.inner.rest;
        let device_id = self.inner.device_id;
        self.inner
            .authed(|token| async move { rest.set_push(&token, device_id, target).await })
            .await
    }

    /// Removes this device's push target (`DELETE
    /// /v1/devices/{id}/push`): it is no longer woken. Succeeds when it had
    /// none.
    pub async fn delete_push_target(&self) -> Result<()> {
        let rest = &self.inner.rest;
        let device_id = self.inner.device_id;
        self.inner
            .authed(|token| async move { rest.delete_push(&token, device_id).await })
            .await
    }

    /// The server's VAPID public key (`GET /v1/push/vapid`): base64url of
    /// an uncompressed P-256 point, a browser's `applicationServerKey` (and
    /// a UnifiedPush distributor's VAPID key). `None` when the server does
    /// not offer Web Push (not configured, or older than push targets).
    pub async fn vapid_public_key(&self) -> Result<Option<String>> {
        match self.inner.rest.vapid().await {
            Ok(vapid) => Ok(Some(vapid.public_key)),
            Err(Error::PushUnavailable(_) | Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the WebSocket and keeps it open: messages, receipts and state
    /// changes arrive on the returned stream, and sends go over the socket
    /// from now on.
    ///
    /// The socket reconnects by itself after anything but a close that
    /// forbids it (4409, 4429, 1008, 1009), with full-jitter exponential
    /// backoff within [`ConnectOptions`]'s bounds; after `4401` it refreshes
    /// the token first. Each connection delivers its backlog, then
    /// [`Event::Drained`]. Sends still awaiting their reply when a socket
    /// drops are written again on the next one, with the same `client_id`
    /// and ciphertext, so one the server had taken is not stored twice.
    /// Acks are batched, up to 500 ids a frame, within
    /// [`ACK_DELAY`](crate::ACK_DELAY).
    pub fn connect(&self, options: ConnectOptions) -> Result<Events> {
        let (commands, taken) = mpsc::channel(COMMANDS);
        let (events, rx) = mpsc::channel(EVENTS);
        self.inner.set_transport(Transport::Socket(commands))?;
        tokio::spawn(Driver::new(self.inner.clone(), options, taken, events).run());
        Ok(Events { rx })
    }

    /// Polls over REST instead of holding a socket: each round reads the
    /// queue from its start and sends the acks given meanwhile; rounds are
    /// [`PollOptions::interval`] apart. The stream carries the same events
    /// as the socket's ([`Event::Drained`] once the queue was read to its
    /// end with something new in it). Sends go over REST.
    pub fn poll(&self, options: PollOptions) -> Result<Events> {
        let (acks, taken) = mpsc::channel(POLL_ACKS);
        let (events, rx) = mpsc::channel(EVENTS);
        self.inner.set_transport(Transport::Poll(acks))?;
        tokio::spawn(Poller::new(self.inner.clone(), options, taken, events).run());
        Ok(Events { rx })
    }

    /// Sends `text` to `to`: one envelope for each of their devices, then a
    /// sync copy to this account's other devices, both with one client
    /// message id in their plaintext. Returns once the server holds the
    /// message durably (`201`, or `sent` on the socket). A stale directory
    /// is fetched again and the message re-encrypted on `devices_changed`,
    /// a few times at most. After a transient failure the same ciphertext
    /// is sent again under the same `client_id` (one per send: the sync
    /// copy has its own), so a send whose answer was lost is stored once.
    ///
    /// A message whose sealed body would be over the server's limit
    /// ([`Client::limits`]) is refused before anything is sent, with
    /// [`Error::TooLarge`]; so is one over [`MAX_TEXT_CHARS`] characters,
    /// with [`Error::Invalid`].
    ///
    /// The message is urgent (wakes the recipient's offline devices at
    /// once); the sync copy is not (see [`SendOptions::urgent`]).
    pub async fn send(&self, to: Uuid, text: &str) -> Result<Sent> {
        self.send_with(to, text, &SendOptions::default()).await
    }

    /// [`Client::send`] with [`SendOptions`].
    pub async fn send_with(&self, to: Uuid, text: &str, options: &SendOptions) -> Result<Sent> {
        let plaintext = plaintext(text)?;
        let sync = (to != self.inner.user_id).then(|| Plaintext {
            to: Some(to),
            ..plaintext_with_id(text, plaintext.id, plaintext.ts)
        });
        // The sync copy is the larger (it names the peer): checked before
        // the message goes, so that neither goes without the other.
        let limits = self.inner.limits().await;
        check_size(&encode(sync.as_ref().unwrap_or(&plaintext))?, &limits)?;
        let reply = self
            .inner
            .send_sealed(
                to,
                &plaintext,
                Kind::Stored {
                    urgent: options.urgent,
                },
            )
            .await?;
        let mut sync_error = None;
        // Not urgent: a copy of what this user just wrote wakes their
        // other devices at low priority, as Signal sends sync messages.
        if let Some(sync) = sync
            && let Err(e) = self
                .inner
                .send_sealed(self.inner.user_id, &sync, Kind::Stored { urgent: false })
                .await
        {
            tracing::warn!(error = %e, "the sync copy to this account's other devices failed");
            sync_error = Some(e);
        }
        Ok(Sent {
            id: reply.id,
            client_id: plaintext.id,
            sent_at: reply.sent_at,
            sync_error,
        })
    }

    /// A new group named `name` of `members` and this account (added
    /// first when not among them), with an id of its own: nothing is sent
    /// until the first [`Client::send_group`], which makes it known to
    /// its members. Fails with [`Error::Invalid`] (field `name`) for a
    /// name over [`MAX_GROUP_NAME_CHARS`](crate::MAX_GROUP_NAME_CHARS)
    /// characters.
    pub fn new_group(&self, name: &str, members: impl IntoIterator<Item = Uuid>) -> Result<Group> {
        check_group_name(name)?;
        let mut group = Group::new(name, [self.inner.user_id]);
        for member in members {
            group.add(member);
        }
        Ok(group)
    }

    /// Sends `text` to `group` in the shared form (`protocol.md`, "Group
    /// messages (shared form)"): one ciphertext, stored once by the
    /// server, and for every device of every other member (and every
    /// other device of this account, their sync copy) a key to it, all in
    /// one send (`send_multi` on the socket, `POST /v1/messages/multi`
    /// over REST) with one server id. The plaintext names the group (id,
    /// name, members), so every member files it under the group.
    ///
    /// As with [`Client::send`]: the send is retried after a transient
    /// failure with its first ciphertext and keys under one `client_id`;
    /// after `devices_changed` the accounts the server names are fetched
    /// again and only their keys sealed again (the content key, the
    /// shared body and the `client_id` stay), a few times at most.
    /// [`Sent::sync_error`] is always `None`: the sync copies are part of
    /// the one send. Fails with [`Error::Invalid`] for a group with no one
    /// to send to (no other member, no other device of this account) or
    /// a name over the limit, and [`Error::TooLarge`] as [`Client::send`].
    pub async fn send_group(&self, group: &Group, text: &str) -> Result<Sent> {
        self.send_group_with(group, text, &SendOptions::default())
            .await
    }

    /// [`Client::send_group`] with [`SendOptions`].
    pub async fn send_group_with(
        &self,
        group: &Group,
        text: &str,
        options: &SendOptions,
    ) -> Result<Sent> {
        check_group_name(&group.name)?;
        let me = self.inner.user_id;
        let mut group = group.clone();
        // Every member sends to `members`: this account belongs in it.
        group.add(me);
        let plaintext = Plaintext {
            group: Some(group.clone()),
            ..plaintext(text)?
        };
        let accounts: Vec<Uuid> = group.members.iter().copied().filter(|m| *m != me).collect();
        let reply = self
            .inner
            .send_shared(
                &accounts,
                &plaintext,
                Kind::Stored {
                    urgent: options.urgent,
                },
            )
            .await?;
        Ok(Sent {
            id: reply.id,
            client_id: plaintext.id,
            sent_at: reply.sent_at,
            sync_error: None,
        })
    }

    /// Sends `text` ephemerally (typing, presence): only to `to`'s devices
    /// connected now, never stored, no sync copy. Needs the socket. Returns
    /// whether any connection took it.
    pub async fn send_ephemeral(&self, to: Uuid, text: &str) -> Result<bool> {
        let plaintext = plaintext(text)?;
        let reply = self
            .inner
            .send_sealed(to, &plaintext, Kind::Ephemeral)
            .await?;
        Ok(reply.delivered.unwrap_or(false))
    }

    /// Tells `to`'s connected devices that this user is typing
    /// (`protocol.md`, the `typing` plaintext), or, with `stopped`, that
    /// they stopped without sending. Ephemeral: needs the socket, never
    /// stored. Readers show it for about 5 seconds, so a client typing on
    /// sends it again every few seconds. Returns whether any connection
    /// took it.
    pub async fn send_typing(&self, to: Uuid, stopped: bool) -> Result<bool> {
        let plaintext = Plaintext {
            kind: "typing".into(),
            id: Uuid::new_v4(),
            ts: Utc::now().timestamp_millis(),
            text: None,
            to: None,
            state: stopped.then(|| "stopped".into()),
            group: None,
        };
        let reply = self
            .inner
            .send_sealed(to, &plaintext, Kind::Ephemeral)
            .await?;
        Ok(reply.delivered.unwrap_or(false))
    }

    /// Acknowledges delivered messages: their copies for this device are
    /// deleted and never delivered again. Batched on the socket.
    pub async fn ack(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let transport = self.inner.transport();
        match transport {
            // If the task stopped meanwhile: REST below.
            Transport::Socket(socket) => {
                if socket.send(Command::Ack(ids.to_vec())).await.is_ok() {
                    return Ok(());
                }
            }
            Transport::Poll(poller) => {
                if poller.send(ids.to_vec()).await.is_ok() {
                    return Ok(());
                }
            }
            Transport::Rest => {}
        }
        let rest = &self.inner.rest;
        for chunk in ids.chunks(500) {
            self.inner
                .authed(|token| async move { rest.ack(&token, chunk).await })
                .await?;
        }
        Ok(())
    }

    /// Acknowledges delivered messages and returns once the server holds
    /// the ack durably: on the socket by an `ack` with a `ref`, answered
    /// `acked` (servers that know it), else over REST. For an application
    /// that deletes its own copy only once the server's is gone.
    pub async fn ack_durable(&self, ids: &[Uuid]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        if let Transport::Socket(socket) = self.inner.transport() {
            let (reply, answer) = oneshot::channel();
            let command = Command::AckDurable {
                ids: ids.to_vec(),
                reply,
            };
            if socket.send(command).await.is_ok()
                && let Ok(Ok(Ok(()))) = tokio::time::timeout(ACKED_TIMEOUT, answer).await
            {
                return Ok(());
            }
            // No socket, a server without `acked`, or no answer in time:
            // REST settles the same ids again (acks are idempotent).
        }
        let rest = &self.inner.rest;
        for chunk in ids.chunks(500) {
            self.inner
                .authed(|token| async move { rest.ack(&token, chunk).await })
                .await?;
        }
        Ok(())
    }

    /// Ends this session on the server (`POST /v1/logout`) and stops the
    /// client.
    pub async fn logout(self) -> Result<()> {
        let rest = &self.inner.rest;
        let result = self
            .inner
            .authed(|token| async move { rest.logout(&token).await })
            .await;
        self.close();
        result
    }

    /// Stops every task of this client (socket, poller, refresher) and every
    /// clone of it; the event stream ends after a last
    /// [`ConnectionState::Stopped`](crate::ConnectionState::Stopped).
    pub fn close(&self) {
        self._guard.0.send_replace(true);
    }
}

/// What a send is to the server: stored (and waking offline devices,
/// urgently or not) or ephemeral (never stored, never waking).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Stored { urgent: bool },
    Ephemeral,
}

fn plaintext(text: &str) -> Result<Plaintext> {
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(Error::Invalid {
            field: Some("text".into()),
            message: format!("at most {MAX_TEXT_CHARS} characters"),
        });
    }
    Ok(plaintext_with_id(
        text,
        Uuid::new_v4(),
        Utc::now().timestamp_millis(),
    ))
}

fn plaintext_with_id(text: &str, id: Uuid, ts: i64) -> Plaintext {
    Plaintext {
        kind: "text".into(),
        id,
        ts,
        text: Some(text.to_owned()),
        to: None,
        state: None,
        group: None,
    }
}

fn check_group_name(name: &str) -> Result<()> {
    if name.chars().count() > MAX_GROUP_NAME_CHARS {
        return Err(Error::Invalid {
            field: Some("name".into()),
            message: format!("a group's name is at most {MAX_GROUP_NAME_CHARS} characters"),
        });
    }
    Ok(())
}

fn encode(plaintext: &Plaintext) -> Result<Vec<u8>> {
    serde_json::to_vec(plaintext).map_err(|e| Error::Protocol(e.to_string()))
}

/// Refuses a plaintext whose sealed body would be over the server's limit,
/// before it is sealed: the server would refuse it whole (`too_large`),
/// and the user can shorten it.
fn check_size(plaintext: &[u8], limits: &Limits) -> Result<()> {
    let sealed = SEAL_OVERHEAD + plaintext.len();
    if sealed > limits.max_body_bytes {
        return Err(Error::TooLarge(format!(
            "this message is {sealed} bytes once sealed, and the server takes at most {}: shorten it",
            limits.max_body_bytes
        )));
    }
    Ok(())
}

impl Inner {
    fn transport(&self) -> Transport {
        self.transport
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_transport(&self, transport: Transport) -> Result<()> {
        let mut slot = self.transport.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*slot, Transport::Rest) {
            return Err(Error::AlreadyStarted);
        }
        *slot = transport;
        Ok(())
    }

    /// The transport task ended: back to plain REST.
    pub(crate) fn transport_stopped(&self) {
        *self.transport.lock().unwrap_or_else(|p| p.into_inner()) = Transport::Rest;
    }

    /// Runs `call` with the access token; after a `401`, once more with a
    /// refreshed one.
    pub(crate) async fn authed<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Arc<str>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let (token, generation) = self.session.current()?;
        match call(token).await {
            Err(Error::Unauthorized(_)) => {
                let (token, _) = self.session.refreshed_after(generation).await?;
                call(token).await
            }
            other => other,
        }
    }

    /// What the server accepts: asked once; the defaults from a server
    /// without `GET /v1/limits` (kept) or one that cannot be reached now
    /// (not kept: asked again next time).
    pub(crate) async fn limits(&self) -> Limits {
        let fetched = self
            .limits
            .get_or_try_init(|| async {
                match self.rest.limits().await {
                    Ok(limits) => Ok(limits),
                    Err(e) if e.is_transient() => Err(e),
                    // An older server (404) or an answer of another shape.
                    Err(e) => {
                        tracing::debug!(error = %e, "no limits from the server; using the defaults");
                        Ok(Limits::default())
                    }
                }
            })
            .await;
        match fetched {
            Ok(limits) => limits.clone(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask the server's limits now; using the defaults");
                Limits::default()
            }
        }
    }

    /// `user`'s devices, from the cache unless `fresh`.
    pub(crate) async fn devices_of(&self, user: Uuid, fresh: bool) -> Result<Arc<[PeerDevice]>> {
        if !fresh && let Some(devices) = self.directory.get(user) {
            return Ok(devices);
        }
        let rest = &self.rest;
        let listed = self
            .authed(|token| async move { rest.directory(&token, user).await })
            .await?;
        if let Some(name) = &listed.username {
            self.directory.put_name(user, name);
        }
        let devices: Arc<[PeerDevice]> = listed
            .devices
            .into_iter()
            .map(|d| PeerDevice {
                device_id: d.device_id,
                key: keys::public_key(&d.public_key),
            })
            .collect();
        self.directory.put(user, devices.clone());
        Ok(devices)
    }

    /// Fetches this account's devices (`GET /v1/devices`) into the
    /// directory, and says which are new to this client; `change` is what
    /// the server said happened, if it did.
    pub(crate) async fn own_devices_changed(&self, change: Option<DeviceChange>) -> Result<Event> {
        let rest = &self.rest;
        let devices = self
            .authed(|token| async move { rest.own_devices(&token).await })
            .await?;
        let peers: Arc<[PeerDevice]> = devices
            .iter()
            .map(|d| PeerDevice {
                device_id: d.device_id,
                key: keys::public_key(&d.public_key),
            })
            .collect();
        self.directory.put(self.user_id, peers);
        let added = {
            let mut known = self.known_devices.lock().unwrap_or_else(|p| p.into_inner());
            let first = known.is_empty();
            let now: BTreeSet<u32> = devices.iter().map(|d| d.device_id).collect();
            let added = if first {
                Vec::new()
            } else {
                now.difference(&known).copied().collect()
            };
            *known = now;
            added
        };
        Ok(Event::DevicesChanged {
            devices,
            added,
            change,
        })
    }

    /// Whether `devices` (the `ready` frame's) differs from the account's
    /// devices as this client last saw them: one was added or removed
    /// while no socket was open.
    pub(crate) fn own_devices_differ(&self, devices: &[u32]) -> bool {
        let known = self.known_devices.lock().unwrap_or_else(|p| p.into_inner());
        !known.iter().copied().eq(devices.iter().copied())
    }

    /// Seals `plaintext` for each device of `to` (for each of this
    /// account's other devices when `to` is this account) and sends it,
    /// fetching the directory again after `devices_changed`.
    pub(crate) async fn send_sealed(
        &self,
        to: Uuid,
        plaintext: &Plaintext,
        kind: Kind,
    ) -> Result<SendReply> {
        let ephemeral = matches!(kind, Kind::Ephemeral);
        let bytes = encode(plaintext)?;
        check_size(&bytes, &self.limits().await)?;
        // One key for every attempt of this send. A `devices_changed`
        // refusal records no key, so the send encrypted again keeps it.
        // Ephemeral sends are never stored: nothing to repeat.
        let client_id = (!ephemeral).then(|| Uuid::new_v4().to_string());
        let mut attempt = 0;
        loop {
            let devices = self.devices_of(to, attempt > 0).await?;
            let mut envelopes = Vec::with_capacity(devices.len());
            for device in devices.iter() {
                if to == self.user_id && device.device_id == self.device_id {
                    continue;
                }
                let key = device.key.as_ref().ok_or_else(|| {
                    Error::Key(format!(
                        "device {} of {to} has no crypto_box key",
                        device.device_id
                    ))
                })?;
                envelopes.push(Envelope {
                    device_id: device.device_id,
                    body: STANDARD.encode(seal::seal(&bytes, self.keys.secret(), key)),
                });
            }
            let outgoing = Outgoing::One { to, envelopes };
            match self.deliver(&outgoing, client_id.as_deref(), kind).await {
                Err(Error::DevicesChanged { missing, extra, .. })
                    if attempt < DIRECTORY_RETRIES =>
                {
                    tracing::debug!(%to, ?missing, ?extra, "devices changed; encrypting again");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Seals `plaintext` once as a shared body and sends it to `accounts`
    /// (never this one) and to this account's other devices, if it has
    /// any, with a key for each device. After `devices_changed` only the
    /// named accounts' devices are fetched again and their keys sealed
    /// again: the content key, the body, the other keys and the
    /// `client_id` stay, as the protocol asks.
    pub(crate) async fn send_shared(
        &self,
        accounts: &[Uuid],
        plaintext: &Plaintext,
        kind: Kind,
    ) -> Result<SendReply> {
        let bytes = encode(plaintext)?;
        // A shared body's overhead is a sealed body's: version, nonce, tag.
        check_size(&bytes, &self.limits().await)?;
        let sealed = SharedBody::seal(&bytes);
        let shared = STANDARD.encode(&sealed.body);
        let client_id = Uuid::new_v4().to_string();
        let mut recipients = Vec::with_capacity(accounts.len() + 1);
        for &to in accounts {
            let devices = self.devices_of(to, false).await?;
            recipients.push(self.shared_recipient(to, &devices, &sealed)?);
        }
        // This account's other devices get their sync copy in the same send.
        let own = self.devices_of(self.user_id, false).await?;
        let own = self.shared_recipient(self.user_id, &own, &sealed)?;
        if !own.keys.is_empty() {
            recipients.push(own);
        }
        if recipients.is_empty() {
            return Err(Error::Invalid {
                field: Some("members".into()),
                message: "the group has no other member and this account no other device".into(),
            });
        }
        let mut attempt = 0;
        loop {
            let outgoing = Outgoing::Shared {
                shared: shared.clone(),
                recipients: recipients.clone(),
            };
            let changed = match self.deliver(&outgoing, Some(&client_id), kind).await {
                Err(Error::DevicesChanged { recipients, .. }) if attempt < DIRECTORY_RETRIES => {
                    recipients
                }
                other => return other,
            };
            tracing::debug!(
                ?changed,
                "group members' devices changed; sealing their keys again"
            );
            attempt += 1;
            // A server that names no account: every account fetched again.
            let refetch: Vec<Uuid> = if changed.is_empty() {
                recipients.iter().map(|r| r.to).collect()
            } else {
                changed
            };
            for to in refetch {
                let devices = self.devices_of(to, true).await?;
                let entry = self.shared_recipient(to, &devices, &sealed)?;
                match recipients.iter().position(|r| r.to == to) {
                    // This account with no other device left: out.
                    Some(i) if entry.keys.is_empty() => {
                        recipients.remove(i);
                    }
                    Some(i) => recipients[i] = entry,
                    // This account gained another device since.
                    None if !entry.keys.is_empty() => recipients.push(entry),
                    None => {}
                }
            }
        }
    }

    /// `to`'s entry of a shared-form send: a key for each of `devices`
    /// (this one left out, on this account).
    fn shared_recipient(
        &self,
        to: Uuid,
        devices: &[PeerDevice],
        sealed: &SharedBody,
    ) -> Result<SharedRecipient> {
        let mut keys = Vec::with_capacity(devices.len());
        for device in devices {
            if to == self.user_id && device.device_id == self.device_id {
                continue;
            }
            let key = device.key.as_ref().ok_or_else(|| {
                Error::Key(format!(
                    "device {} of {to} has no crypto_box key",
                    device.device_id
                ))
            })?;
            keys.push(DeviceKey {
                device_id: device.device_id,
                key: STANDARD.encode(sealed.key_for(self.keys.secret(), key)),
            });
        }
        Ok(SharedRecipient { to, keys })
    }

    /// Sends sealed envelopes under `client_id`; after a transient
    /// failure, the same envelopes under the same key again (the server
    /// answers a repeat of a send it took with its first answer), a few
    /// times at most. Ephemeral sends are not retried: late is useless.
    async fn deliver(
        &self,
        outgoing: &Outgoing,
        client_id: Option<&str>,
        kind: Kind,
    ) -> Result<SendReply> {
        let ephemeral = matches!(kind, Kind::Ephemeral);
        let mut tries = 0;
        loop {
            let error = match self.deliver_once(outgoing, client_id, kind).await {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            // `Closed`: the socket stopped for good (4409, 4429) with this
            // send unanswered, and sends go over REST from now on.
            let stopped = matches!(error, Error::Closed { .. });
            if ephemeral || tries >= SEND_RETRIES || !(stopped || error.is_transient()) {
                return Err(error);
            }
            let wait = match error {
                Error::RateLimited { retry_after } => retry_after,
                Error::Closed { .. } => Duration::ZERO,
                _ => full_jitter(Duration::from_millis(250), Duration::from_secs(5), tries),
            };
            tracing::debug!(error = %error, ?wait, "send failed; retrying with the same client_id");
            tokio::time::sleep(wait).await;
            tries += 1;
        }
    }

    /// One attempt: over the socket if one runs, else over REST.
    async fn deliver_once(
        &self,
        outgoing: &Outgoing,
        client_id: Option<&str>,
        kind: Kind,
    ) -> Result<SendReply> {
        let (ephemeral, urgent) = match kind {
            Kind::Ephemeral => (true, true),
            Kind::Stored { urgent } => (false, urgent),
        };
        if let Transport::Socket(socket) = self.transport() {
            let (reply, answer) = oneshot::channel();
            let command = Command::Send {
                outgoing: outgoing.clone(),
                ephemeral,
                urgent,
                client_id: client_id.map(str::to_owned),
                reply,
            };
            // An error: the socket task ended meanwhile; REST below.
            if socket.send(command).await.is_ok() {
                return answer.await.map_err(|_| Error::Shutdown)?;
            }
        }
        if ephemeral {
            return Err(Error::NotConnected);
        }
        let rest = &self.rest;
        let accepted = match outgoing {
            Outgoing::One { to, envelopes } => {
                self.authed(|token| async move {
                    rest.send(&token, *to, envelopes, client_id, urgent).await
                })
                .await?
            }
            Outgoing::Shared { shared, recipients } => {
                self.authed(|token| async move {
                    rest.send_multi(&token, shared, recipients, client_id, urgent)
                        .await
                })
                .await?
            }
        };
        Ok(SendReply {
            id: accepted.id,
            sent_at: accepted.sent_at,
            delivered: None,
        })
    }
}
