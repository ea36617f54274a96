//! From a delivered copy to an [`Event`]: open the body with the sending
//! device's key, read the plaintext, drop duplicates, and say whether the
//! copy is to be acknowledged without the application.
//!
//! One [`Inbox`] belongs to the transport task that feeds the application
//! (socket or poller), so its memory of what was shown ([`Seen`]) needs no
//! lock. It is per process: after a restart the server's redeliveries of
//! unacknowledged copies are shown again, which is what they are for.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::DateTime;
use uuid::Uuid;

use crate::client::Inner;
use crate::dedup::{REMEMBERED, Seen};
use crate::event::{Event, Incoming};
use crate::group::{self, SHARED_VERSION};
use crate::seal::{self, MIN_LEN, Plaintext, Unreadable, VERSION};
use crate::wire::MessageView;

/// What to do with one delivered copy.
pub(crate) struct Received {
    /// For the application, if anything.
    pub event: Option<Event>,
    /// The client settles this copy itself: it can never be read, or it
    /// repeats one already shown.
    pub ack: bool,
}

impl Received {
    fn nothing() -> Self {
        Self {
            event: None,
            ack: false,
        }
    }
}

pub(crate) struct Inbox {
    inner: Arc<Inner>,
    /// Server ids already handed over: a copy redelivered before its ack
    /// settled (after a reconnect) is not shown twice. The application's
    /// own ack of the first delivery settles it.
    ids: Seen<Uuid>,
    /// (sender, client message id) already shown: a send stored twice
    /// because its sender retried after a lost reply.
    client_ids: Seen<(Uuid, Uuid)>,
    /// Server ids acknowledged, by the application or by the client: an
    /// ack lost with its socket leaves the copy queued, and its
    /// redelivery is acknowledged again rather than dropped unsettled.
    acked: Seen<Uuid>,
}

impl Inbox {
    pub fn new(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            ids: Seen::new(REMEMBERED),
            client_ids: Seen::new(REMEMBERED),
            acked: Seen::new(REMEMBERED),
        }
    }

    /// The application acknowledged these.
    pub fn acked(&mut self, ids: &[Uuid]) {
        for id in ids {
            self.acked.insert(*id);
        }
    }

    /// A copy the client settles itself.
    fn settle(&mut self, id: Uuid, ephemeral: bool, event: Option<Event>) -> Received {
        if ephemeral {
            return Received { event, ack: false };
        }
        self.acked.insert(id);
        Received { event, ack: true }
    }

    pub async fn receive(&mut self, message: MessageView) -> Received {
        if self.ids.contains(&message.id) {
            // Shown before: settled again if it was settled, else left for
            // the application's ack of the first delivery.
            return Received {
                event: None,
                ack: self.acked.contains(&message.id),
            };
        }
        let plaintext = match self.open(&message).await {
            Ok(Some(plaintext)) => plaintext,
            // The sender's directory could not be fetched: not the body's
            // fault. Leave the copy queued; it comes back on the next
            // connection or poll.
            Ok(None) => return Received::nothing(),
            Err(reason) => return self.unreadable(message, reason),
        };
        let Ok(plaintext) = serde_json::from_slice::<Plaintext>(&plaintext) else {
            return self.unreadable(message, Unreadable::NotAMessage);
        };
        self.ids.insert(message.id);
        if plaintext.kind == "typing" {
            // Not kept in `client_ids`: each is new, and they would push
            // out the messages' ids. Settled by the client (never stored
            // when sent as the protocol asks, ephemeral).
            let event = Event::Typing {
                from: message.from,
                from_device: message.from_device,
                stopped: plaintext.state.as_deref() == Some("stopped"),
            };
            return self.settle(message.id, message.ephemeral, Some(event));
        }
        // A type of a later version, or a send stored twice: acknowledge
        // and drop.
        if plaintext.kind != "text" || !self.client_ids.insert((message.from, plaintext.id)) {
            return self.settle(message.id, message.ephemeral, None);
        }
        Received {
            event: Some(Event::Message(Incoming {
                id: message.id,
                from: message.from,
                from_device: message.from_device,
                client_id: plaintext.id,
                ts: DateTime::from_timestamp_millis(plaintext.ts).unwrap_or(message.sent_at),
                text: plaintext.text.unwrap_or_default(),
                to: plaintext.to,
                group: plaintext.group,
                sent_at: message.sent_at,
                ephemeral: message.ephemeral,
            })),
            ack: false,
        }
    }

    fn unreadable(&mut self, message: MessageView, reason: Unreadable) -> Received {
        tracing::warn!(id = %message.id, from = %message.from, ?reason, "a message could not be read");
        self.ids.insert(message.id);
        let event = Event::Undecryptable {
            id: message.id,
            from: message.from,
            from_device: message.from_device,
            sent_at: message.sent_at,
            reason,
        };
        self.settle(message.id, message.ephemeral, Some(event))
    }

    /// The opened body; `Ok(None)` when the sender's keys could not be
    /// fetched. A cached key that does not open the box is fetched again
    /// once: the device may have a new key.
    ///
    /// A copy with a `key` is a group message's: a `0x02` shared body,
    /// opened through the key (`group::open`, which checks that the key
    /// was sealed for this very body); one without is a `0x01` body.
    async fn open(&self, message: &MessageView) -> Result<Option<Vec<u8>>, Unreadable> {
        let body = STANDARD
            .decode(&message.body)
            .map_err(|_| Unreadable::NotAMessage)?;
        let key = match &message.key {
            Some(key) => Some(STANDARD.decode(key).map_err(|_| Unreadable::NotAMessage)?),
            None => None,
        };
        if body.len() < MIN_LEN {
            return Err(Unreadable::TooShort);
        }
        let expected = if key.is_some() {
            SHARED_VERSION
        } else {
            VERSION
        };
        if body[0] != expected {
            return Err(Unreadable::Version(body[0]));
        }
        let mut outcome = Err(Unreadable::UnknownSender);
        for fresh in [false, true] {
            let devices = match self.inner.devices_of(message.from, fresh).await {
                Ok(devices) => devices,
                Err(e) => {
                    tracing::warn!(error = %e, from = %message.from, "cannot fetch the sender's devices");
                    return Ok(None);
                }
            };
            let sender = devices
                .iter()
                .find(|d| d.device_id == message.from_device)
                .and_then(|d| d.key.as_ref());
            let Some(sender) = sender else {
                outcome = Err(Unreadable::UnknownSender);
                continue;
            };
            let ours = self.inner.keys.secret();
            let opened = match &key {
                Some(key) => group::open(&body, key, ours, sender),
                None => seal::open(&body, ours, sender),
            };
            match opened {
                Ok(plaintext) => return Ok(Some(plaintext)),
                // Only another key for the sender could change this.
                Err(reason @ Unreadable::DoesNotOpen) => outcome = Err(reason),
                Err(reason) => return Err(reason),
            }
        }
        outcome
    }
}
