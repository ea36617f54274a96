//! The REST transport, for hosts that cannot hold a socket: the polling
//! loop of `protocol.md`, feeding the same [`Events`](crate::Events) as the
//! socket.
//!
//! Each round reads the queue from its start (`GET /v1/messages`, then
//! following `next` to the end), hands what is new to the application, and
//! sends the acks it has (`POST /v1/messages/ack`, 500 ids a request).
//! Starting every round without `after` is deliberate: whatever was not
//! acknowledged comes back, and the [`Inbox`] drops what was already
//! shown. Between rounds the task waits [`PollOptions::interval`], sending
//! the application's acks as they come; after a failed round it backs off
//! (full jitter, up to 30 s).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

use crate::backoff::full_jitter;
use crate::client::Inner;
use crate::error::Error;
use crate::event::{ConnectionState, Event};
use crate::inbox::Inbox;

/// Messages per page: the server's maximum.
const PAGE: u32 = 500;
/// Ids per ack request: the server's maximum.
const ACK_BATCH: usize = 500;
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// How often to poll.
#[derive(Debug, Clone)]
pub struct PollOptions {
    /// The wait between rounds that succeeded (a few seconds in the
    /// foreground, `protocol.md` suggests).
    pub interval: Duration,
}

impl Default for PollOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
        }
    }
}

pub(crate) struct Poller {
    inner: Arc<Inner>,
    options: PollOptions,
    acks_in: mpsc::Receiver<Vec<Uuid>>,
    events: mpsc::Sender<Event>,
    inbox: Inbox,
    /// Acks not yet sent (the application's and the client's own).
    acks: Vec<Uuid>,
}

impl Poller {
    pub fn new(
        inner: Arc<Inner>,
        options: PollOptions,
        acks_in: mpsc::Receiver<Vec<Uuid>>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Self {
            inbox: Inbox::new(inner.clone()),
            inner,
            options,
            acks_in,
            events,
            acks: Vec::new(),
        }
    }

    pub async fn run(mut self) {
        let mut shutdown = self.inner.shutdown.clone();
        let mut first = true;
        let mut failures = 0u32;
        loop {
            let wait = match self.round().await {
                Ok(delivered) => {
                    failures = 0;
                    if first || delivered {
                        first = false;
                        let _ = self.events.send(Event::Drained).await;
                    }
                    self.options.interval
                }
                Err(e @ Error::Unauthorized(_)) => {
                    let _ = self
                        .events
                        .send(Event::State(ConnectionState::Stopped {
                            code: None,
                            reason: e.to_string(),
                        }))
                        .await;
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "polling failed; backing off");
                    failures = failures.saturating_add(1);
                    full_jitter(self.options.interval, BACKOFF_CAP, failures)
                        .max(self.options.interval)
                }
            };
            let until = Instant::now() + wait;
            loop {
                tokio::select! {
                    _ = sleep_until(until) => break,
                    _ = shutdown.changed() => {
                        let _ = self.send_acks().await;
                        self.inner.transport_stopped();
                        return;
                    }
                    ids = self.acks_in.recv() => match ids {
                        Some(ids) => {
                            self.take_acks(ids);
                            // Whatever else is queued shares the request.
                            while let Ok(more) = self.acks_in.try_recv() {
                                self.take_acks(more);
                            }
                            if let Err(e) = self.send_acks().await {
                                tracing::warn!(error = %e, "acks not sent; retrying next round");
                            }
                        }
                        None => {
                            self.inner.transport_stopped();
                            return;
                        }
                    },
                }
            }
        }
        self.inner.transport_stopped();
    }

    /// One round through the queue; whether anything new was delivered.
    async fn round(&mut self) -> Result<bool, Error> {
        while let Ok(more) = self.acks_in.try_recv() {
            self.take_acks(more);
        }
        self.send_acks().await?;
        let mut after = None;
        let mut delivered = false;
        loop {
            let rest = &self.inner.rest;
            let page = self
                .inner
                .authed(|token| async move { rest.messages(&token, after, PAGE).await })
                .await?;
            for message in page.messages {
                let id = message.id;
                let received = self.inbox.receive(message).await;
                if received.ack {
                    self.acks.push(id);
                }
                if let Some(event) = received.event {
                    delivered = true;
                    let _ = self.events.send(event).await;
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        self.send_acks().await?;
        Ok(delivered)
    }

    fn take_acks(&mut self, ids: Vec<Uuid>) {
        self.inbox.acked(&ids);
        self.acks.extend(ids);
    }

    async fn send_acks(&mut self) -> Result<(), Error> {
        while !self.acks.is_empty() {
            let take = self.acks.len().min(ACK_BATCH);
            let chunk: Vec<Uuid> = self.acks[..take].to_vec();
            let rest = &self.inner.rest;
            let chunk = &chunk;
            self.inner
                .authed(|token| async move { rest.ack(&token, chunk).await })
                .await?;
            self.acks.drain(..take);
        }
        Ok(())
    }
}
