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
            .field("sent_at", &self.sent_at)
            .field("ephemeral", &self.ephemeral)
            .field("text", &format_args!("<{} bytes>", self.text.len()))
            .finish()
    }
}

/// The socket's state, as [`Event::State`] reports each change.
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
    /// A device of your account was added or removed. `devices` is the
    /// account's list now; `added` the ids this client had not seen in it
    /// before: if the user does not know one, someone else may have their
    /// password.
    DevicesChanged {
        devices: Vec<OwnDevice>,
        added: Vec<u32>,
    },
}

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
