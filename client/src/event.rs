//! What the client tells the application: decrypted messages, receipts,
//! connection changes, as one ordered stream of [`Event`]s.
//!
//! [`Events`] is fed by whichever transport runs ([`crate::socket`] or
//! [`crate::poll`]) through a channel of [`EVENTS`] entries. Its bound is
//! backpressure, not loss: when the application stops reading, the
//! transport waits, stops reading its socket, and the server keeps the
//! messages queued (it closes a socket that falls far behind with 1013; the
//! client reconnects and gets them in its backlog). Read the stream
//! concurrently with any `send` you await.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::Stream;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::group::Group;
use crate::seal::Unreadable;
use crate::wire::OwnDevice;

/// Events waiting for the application.
pub(crate) const EVENTS: usize = 256;

/// A message for this device, opened and checked.
#[derive(Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The server's id for this message; acknowledge it with
    /// [`Client::ack`](crate::Client::ack) once it is stored.
    pub id: Uuid,
    /// The sending user: your own id for a sync copy of what your other
    /// device sent.
    pub from: Uuid,
    /// The sending device, whose key opened the body.
    pub from_device: u32,
    /// The sender's client message id, the same in every device's copy and
    /// in every retry.
    pub client_id: Uuid,
    /// When the sender's user sent it, by the sender's clock.
    pub ts: DateTime<Utc>,
    pub text: String,
    /// In a sync copy only: the peer of the conversation it belongs to.
    pub to: Option<Uuid>,
    /// In a group message: the group it belongs to (file it under
    /// `group.id`, whoever sent it; its `name` and `members` are the
    /// group's latest). `None` for a message between two accounts.
    pub group: Option<Group>,
    /// When the server accepted it; the server's order.
    pub sent_at: DateTime<Utc>,
    /// An ephemeral message (typing, presence): never stored, not to be
    /// acknowledged.
    pub ephemeral: bool,
}

impl fmt::Debug for Incoming {
    // Message text never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("id", &self.id)
            .field("from", &self.from)
            .field("from_device", &self.from_device)
            .field("client_id", &self.client_id)
            .field("to", &self.to)
            .field("group", &self.group.as_ref().map(|g| g.id))
            .field("sent_at", &self.sent_at)
            .field("ephemeral", &self.ephemeral)
            .field("text", &format_args!("<{} bytes>", self.text.len()))
            .finish()
    }
}

/// The socket's state, as [`Event::State`] reports each change. Its
/// `Display` says it in words, for a user ("connected", "disconnected
/// (1006 the connection ended); retrying in 2s").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Opening a socket; `attempt` counts the tries since the last one that
    /// reached `drained` (0 for the first).
    Connecting { attempt: u32 },
    /// Authenticated (`ready`): the backlog follows, then
    /// [`Event::Drained`].
    Connected { expires_at: DateTime<Utc> },
    /// The socket closed or could not open; the next try is in `retry_in`.
    /// `code` is the close code, if the server sent one.
    Disconnected {
        code: Option<u16>,
        reason: String,
        retry_in: Duration,
    },
    /// No more tries: the client was closed, the server closed with a code
    /// that forbids reconnecting (4409, 4429, 1008, 1009), or the session
    /// ended and needs a new login.
    Stopped { code: Option<u16>, reason: String },
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionState::Connecting { attempt: 0 } => write!(f, "connecting"),
            ConnectionState::Connecting { attempt } => {
                write!(f, "connecting (attempt {})", attempt + 1)
            }
            ConnectionState::Connected { .. } => write!(f, "connected"),
            ConnectionState::Disconnected {
                code,
                reason,
                retry_in,
            } => {
                write!(f, "disconnected (")?;
                if let Some(code) = code {
                    write!(f, "{code} ")?;
                }
                write!(f, "{reason}); retrying in {}", Seconds(*retry_in))
            }
            ConnectionState::Stopped { code, reason } => {
                write!(f, "stopped (")?;
                if let Some(code) = code {
                    write!(f, "{code} ")?;
                }
                write!(f, "{reason})")
            }
        }
    }
}

/// A wait as a person reads it: "0.4s", "12s".
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0.as_secs_f64();
        if secs < 10.0 {
            write!(f, "{secs:.1}s")
        } else {
            write!(f, "{}s", self.0.as_secs())
        }
    }
}

/// What the server said happened to a device of your account
/// (`devices_changed`'s `device_id` and `reason`; newer servers only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceChange {
    /// The device the change is about.
    pub device_id: u32,
    pub reason: DeviceChangeReason,
}

/// Why a device of your account changed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceChangeReason {
    /// A new device was added.
    Added,
    /// The device was removed.
    Removed,
    /// The device's key was changed.
    Key,
    /// A new session of the device was opened with the password (a
    /// login): if that was not you, someone else has the password.
    Login,
    /// A reason this version of the client does not know.
    Other(String),
}

impl DeviceChangeReason {
    pub(crate) fn parse(reason: &str) -> Self {
        match reason {
            "added" => Self::Added,
            "removed" => Self::Removed,
            "key" => Self::Key,
            "login" => Self::Login,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// Something the application should know.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A message: show it, store it, then [`Client::ack`](crate::Client::ack)
    /// its `id`. Until acknowledged it is delivered again after a
    /// reconnect, and dropped then as a duplicate in this process.
    Message(Incoming),
    /// A body that is not a message of this format or does not open: it can
    /// never be read, so it is acknowledged already. Tell the user that a
    /// message from `from` could not be read.
    Undecryptable {
        id: Uuid,
        from: Uuid,
        from_device: u32,
        sent_at: DateTime<Utc>,
        reason: Unreadable,
    },
    /// Device `device_id` of user `to` acknowledged its copy of your
    /// message `id`. Best effort: never stored, never repeated.
    Receipt { id: Uuid, to: Uuid, device_id: u32 },
    /// The backlog has been delivered: what follows is live (on the
    /// socket), or the queue was read to its end (polling).
    Drained,
    /// The socket's state changed.
    State(ConnectionState),
    /// The socket runs on a fresh access token (`authed`), valid until
    /// `expires_at`.
    Renewed { expires_at: DateTime<Utc> },
    /// A device of your account was added, removed, given a new key or
    /// logged in again. `devices` is the account's list now; `added` the
    /// ids this client had not seen in it before: if the user does not
    /// know one, someone else may have their password. `change` is what
    /// the server said happened (newer servers), `None` if it did not say
    /// (or the client noticed the list changed while it was offline).
    DevicesChanged {
        devices: Vec<OwnDevice>,
        added: Vec<u32>,
        change: Option<DeviceChange>,
    },
    /// This device's push target was dropped by its push service (the
    /// subscription expired, the app was uninstalled and reinstalled, the
    /// token was rotated): the server no longer wakes it. Told on the
    /// `ready` of each socket until a target is registered again: get a
    /// fresh token or subscription from the platform and
    /// [`Client::set_push_target`](crate::Client::set_push_target). (A
    /// polling client sees it as [`OwnDevice::push`] turned `None`.)
    PushTargetDropped,
    /// `from` is typing to you (a `typing` plaintext), or, with `stopped`,
    /// stopped without sending. Show it for about
    /// [`TYPING_SHOWN`] after the last one, and drop
    /// it at once when a message from `from` arrives. Never acknowledged.
    Typing {
        from: Uuid,
        from_device: u32,
        stopped: bool,
    },
}

/// How long a reader shows "typing…" after the last `typing` from a
/// sender (`protocol.md`).
pub const TYPING_SHOWN: Duration = Duration::from_secs(5);

/// The stream of [`Event`]s of one transport; ends when the client shuts
/// down.
pub struct Events {
    pub(crate) rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the transport has stopped for good.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}
