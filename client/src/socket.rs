//! The WebSocket transport: one task that owns the socket, reconnects it,
//! and is the only writer and reader of it.
//!
//! - **Connect** with the access token in the `Authorization` header; the
//!   server answers `ready`, the backlog, then `drained` (reported as
//!   [`Event::Drained`]).
//! - **Reconnect** after anything but a close that forbids it (4409, 4429,
//!   1008, 1009), with full-jitter exponential backoff between
//!   [`ConnectOptions::backoff_base`] (250 ms) and
//!   [`ConnectOptions::backoff_cap`] (30 s); the window grows until a
//!   connection reaches `drained`. A 4401 close is answered by refreshing
//!   the token and reconnecting at once (once; again only after backoff).
//! - **Renew in place**: when the session refreshes its token (at 80% of
//!   its life), the task sends it as an `auth` frame; the server answers
//!   `authed` ([`Event::Renewed`]) and the socket stays.
//! - **Sends** are pipelined and matched to their replies by `ref`. The
//!   pending map ([`Driver::pending`]) is what guarantees a stored send is
//!   not lost with a socket: whatever it holds when a socket drops is
//!   written again on the next one, the same frame byte for byte, so with
//!   the same `client_id` and ciphertext: a send the server had accepted is
//!   answered with its first `id` and not stored again. Ephemeral sends are
//!   not carried over: they fail with [`Error::ConnectionLost`]. A group
//!   message's `send_multi` is a send like any other here.
//!   At most [`MAX_IN_FLIGHT`] await their reply, the server's own limit
//!   per connection; past it the task stops taking commands.
//! - **Acks** are batched: up to 500 ids a frame, written [`ACK_DELAY`]
//!   after the first one queued, or at once when 500 are queued. Acks
//!   queued while no socket is open are written on the next. A durable
//!   ack ([`Client::ack_durable`](crate::Client::ack_durable)) is a frame
//!   of its own with a `ref` (`a-<n>`), answered `acked` by servers that
//!   speak it (those whose `ready` lists the account's devices); on others,
//!   or when its socket drops, it fails here and the client settles it
//!   over REST.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::backoff::full_jitter;
use crate::client::Inner;
use crate::error::{Error, Result};
use crate::event::{ConnectionState, DeviceChange, DeviceChangeReason, Event};
use crate::inbox::Inbox;
use crate::session::TokenState;
use crate::wire::{ClientFrame, Envelope, ServerFrame, SharedRecipient};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Sends awaiting `sent` on one connection: the server stops reading a
/// socket past 256.
pub(crate) const MAX_IN_FLIGHT: usize = 256;
/// Commands (sends, acks) waiting for the task; a caller past it waits.
pub(crate) const COMMANDS: usize = 256;
/// Ids per `ack` frame: the server's limit.
const ACK_BATCH: usize = 500;
/// How long an ack waits for others to share its frame.
pub const ACK_DELAY: Duration = Duration::from_millis(20);
/// How long the upgrade, and then `ready`, may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// How the socket connects and reconnects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Open with `?exclusive=true`: the server closes this device's older
    /// sockets (4409). For a device that runs one instance of the client.
    pub exclusive: bool,
    /// The first backoff window after a failure.
    pub backoff_base: Duration,
    /// The widest backoff window.
    pub backoff_cap: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            exclusive: false,
            backoff_base: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// A server reply to one `send`.
#[derive(Debug)]
pub(crate) struct SendReply {
    pub id: Uuid,
    pub sent_at: chrono::DateTime<chrono::Utc>,
    pub delivered: Option<bool>,
}

/// What one send carries: a body per device of one account (`send`), or
/// one shared body and a key per device of several (`send_multi`).
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    One {
        to: Uuid,
        envelopes: Vec<Envelope>,
    },
    Shared {
        shared: String,
        recipients: Vec<SharedRecipient>,
    },
}

/// What the rest of the client asks of the socket task.
pub(crate) enum Command {
    Send {
        outgoing: Outgoing,
        ephemeral: bool,
        /// `false`: wake offline devices at low priority.
        urgent: bool,
        /// The send's key, kept by the caller across its retries.
        client_id: Option<String>,
        reply: oneshot::Sender<Result<SendReply>>,
    },
    Ack(Vec<Uuid>),
    /// An ack answered once durable (`acked`).
    AckDurable {
        ids: Vec<Uuid>,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// A durable ack awaiting `acked`.
struct PendingAck {
    ids: Vec<Uuid>,
    reply: oneshot::Sender<Result<()>>,
    written: bool,
}

struct Pending {
    /// The frame as written, to write again on the next socket.
    frame: String,
    ephemeral: bool,
    reply: oneshot::Sender<Result<SendReply>>,
    /// Written on the current socket.
    written: bool,
}

/// How a connection ended.
enum End {
    /// Try again, after `retry_in` or at once.
    Retry {
        code: Option<u16>,
        reason: String,
        at_once: bool,
    },
    /// Never again on this client.
    Stop {
        code: Option<u16>,
        reason: String,
        error: fn(u16, String) -> Error,
    },
    /// The client is shutting down.
    Shutdown,
}

pub(crate) struct Driver {
    inner: Arc<Inner>,
    options: ConnectOptions,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    shutdown: watch::Receiver<bool>,
    inbox: Inbox,
    /// Sends written or to write, by the sequence number in their `ref`
    /// (`s-<n>`); in order, so that a reconnect writes them again in the
    /// order they were sent.
    pending: BTreeMap<u64, Pending>,
    next_ref: u64,
    /// Ids to acknowledge, across sockets.
    acks: Vec<Uuid>,
    /// When the queued acks are to be written.
    ack_due: Option<Instant>,
    /// Tries since the last connection that reached `drained`.
    attempt: u32,
    /// Durable acks by the number in their `ref` (`a-<n>`). Bounded by the
    /// callers: each awaits its answer.
    durable_acks: BTreeMap<u64, PendingAck>,
    next_ack_ref: u64,
    /// The server of the current socket answers an ack's `ref` (its `ready`
    /// listed the account's devices: the same revision of the protocol).
    acked_refs: bool,
}

impl Driver {
    pub fn new(
        inner: Arc<Inner>,
        options: ConnectOptions,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Self {
        Self {
            inbox: Inbox::new(inner.clone()),
            shutdown: inner.shutdown.clone(),
            inner,
            options,
            commands,
            events,
            pending: BTreeMap::new(),
            next_ref: 0,
            acks: Vec::new(),
            ack_due: None,
            attempt: 0,
            durable_acks: BTreeMap::new(),
            next_ack_ref: 0,
            acked_refs: false,
        }
    }

    pub async fn run(mut self) {
        let (code, reason, error) = loop {
            self.emit(Event::State(ConnectionState::Connecting {
                attempt: self.attempt,
            }))
            .await;
            match self.connection().await {
                End::Shutdown => break (None, "the client shut down".to_owned(), None),
                End::Stop {
                    code,
                    reason,
                    error,
                } => break (code, reason, Some(error)),
                End::Retry {
                    code,
                    reason,
                    at_once,
                } => {
                    self.lost_socket();
                    let retry_in = if at_once {
                        Duration::ZERO
                    } else {
                        full_jitter(
                            self.options.backoff_base,
                            self.options.backoff_cap,
                            self.attempt,
                        )
                    };
                    self.attempt = self.attempt.saturating_add(1);
                    tracing::info!(?code, %reason, ?retry_in, "socket lost; reconnecting");
                    self.emit(Event::State(ConnectionState::Disconnected {
                        code,
                        reason,
                        retry_in,
                    }))
                    .await;
                    if !self.wait_offline(retry_in).await {
                        break (None, "the client shut down".to_owned(), None);
                    }
                }
            }
        };
        // Sends and acks from now on go over REST.
        self.inner.transport_stopped();
        let fail = |reason: &str| match error {
            Some(make) => make(code.unwrap_or(0), reason.to_owned()),
            None => Error::Shutdown,
        };
        for (_, pending) in std::mem::take(&mut self.pending) {
            let _ = pending.reply.send(Err(fail(&reason)));
        }
        for (_, pending) in std::mem::take(&mut self.durable_acks) {
            let _ = pending.reply.send(Err(fail(&reason)));
        }
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Send { reply, .. } => {
                    let _ = reply.send(Err(fail(&reason)));
                }
                Command::AckDurable { reply, .. } => {
                    let _ = reply.send(Err(fail(&reason)));
                }
                Command::Ack(_) => {}
            }
        }
        tracing::info!(?code, %reason, "socket stopped");
        self.emit(Event::State(ConnectionState::Stopped { code, reason }))
            .await;
    }

    async fn emit(&self, event: Event) {
        // The application dropped its stream: nobody to tell.
        let _ = self.events.send(event).await;
    }

    /// A socket is gone: ephemeral sends fail (stale by the next socket),
    /// the others wait to be written again.
    fn lost_socket(&mut self) {
        let ephemeral: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.ephemeral)
            .map(|(n, _)| *n)
            .collect();
        for n in ephemeral {
            if let Some(p) = self.pending.remove(&n) {
                let _ = p.reply.send(Err(Error::ConnectionLost));
            }
        }
        // The caller settles them over REST: no need to wait for a socket.
        for (_, pending) in std::mem::take(&mut self.durable_acks) {
            let _ = pending.reply.send(Err(Error::ConnectionLost));
        }
        self.acked_refs = false;
        for pending in self.pending.values_mut() {
            pending.written = false;
        }
    }

    /// Waits `wait` without a socket, taking commands meanwhile; `false`
    /// on shutdown.
    async fn wait_offline(&mut self, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = sleep_until(until) => return true,
                _ = self.shutdown.changed() => return false,
                command = self.commands.recv(), if self.pending.len() < MAX_IN_FLIGHT => {
                    match command {
                        None => return false,
                        Some(Command::Send { ephemeral: true, reply, .. }) => {
                            let _ = reply.send(Err(Error::NotConnected));
                        }
                        Some(Command::AckDurable { ids, reply }) => {
                            self.inbox.acked(&ids);
                            let _ = reply.send(Err(Error::NotConnected));
                        }
                        Some(command) => self.take(command),
                    }
                }
            }
        }
    }

    fn take(&mut self, command: Command) {
        match command {
            Command::Send {
                outgoing,
                ephemeral,
                urgent,
                client_id,
                reply,
            } => {
                self.next_ref += 1;
                let reference = format!("s-{}", self.next_ref);
                let client_id = client_id.as_deref();
                let frame = match &outgoing {
                    Outgoing::One { to, envelopes } => ClientFrame::Send {
                        reference: &reference,
                        to: *to,
                        envelopes,
                        ephemeral,
                        client_id,
                        urgent,
                    },
                    Outgoing::Shared { shared, recipients } => ClientFrame::SendMulti {
                        reference: &reference,
                        shared,
                        recipients,
                        ephemeral,
                        client_id,
                        urgent,
                    },
                }
                .to_text();
                self.pending.insert(
                    self.next_ref,
                    Pending {
                        frame,
                        ephemeral,
                        reply,
                        written: false,
                    },
                );
            }
            Command::Ack(ids) => {
                self.inbox.acked(&ids);
                self.queue_acks(ids);
            }
            Command::AckDurable { ids, reply } => {
                self.inbox.acked(&ids);
                if !self.acked_refs || ids.len() > ACK_BATCH {
                    // An older server would never answer: over REST.
                    let _ = reply.send(Err(Error::NotConnected));
                    return;
                }
                self.next_ack_ref += 1;
                self.durable_acks.insert(
                    self.next_ack_ref,
                    PendingAck {
                        ids,
                        reply,
                        written: false,
                    },
                );
            }
        }
    }

    fn queue_acks(&mut self, ids: impl IntoIterator<Item = Uuid>) {
        self.acks.extend(ids);
        if !self.acks.is_empty() && self.ack_due.is_none() {
            self.ack_due = Some(Instant::now() + ACK_DELAY);
        }
    }

    /// One socket, from the upgrade to its end.
    async fn connection(&mut self) -> End {
        let (token, generation) = match self.inner.session.current() {
            Ok(current) => current,
            Err(e) => return stop_session(e),
        };
        let mut tokens = self.inner.session.watch();
        let mut ws = match self.open(&token).await {
            Ok(ws) => ws,
            Err(end) => return end,
        };
        // `ready`, or a close.
        let ready = match timeout(HANDSHAKE_TIMEOUT, ws.next()).await {
            Err(_) => return retry(None, "no ready frame in time"),
            Ok(frame) => frame,
        };
        match ready {
            Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(ServerFrame::Ready {
                    expires_at,
                    devices,
                    push_dropped,
                    ..
                }) => {
                    self.emit(Event::State(ConnectionState::Connected { expires_at }))
                        .await;
                    if push_dropped {
                        self.emit(Event::PushTargetDropped).await;
                    }
                    self.acked_refs = devices.is_some();
                    // A device added or removed while no socket was open
                    // (its `devices_changed` went to no socket of ours).
                    if let Some(devices) = devices
                        && self.inner.own_devices_differ(&devices)
                    {
                        match self.inner.own_devices_changed(None).await {
                            Ok(event) => self.emit(event).await,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot fetch this account's devices")
                            }
                        }
                    }
                }
                _ => return retry(None, "the first frame was not ready"),
            },
            Some(Ok(Message::Close(frame))) => return self.closed(frame, generation).await,
            Some(Ok(_)) => return retry(None, "the first frame was not ready"),
            Some(Err(e)) => return retry(None, &e.to_string()),
            None => return retry(None, "the connection ended"),
        }
        let mut in_force = generation;
        if let Err(end) = self.write_queued(&mut ws).await {
            return end;
        }
        let mut tokens_live = true;
        loop {
            tokio::select! {
                _ = self.shutdown.changed() => {
                    let _ = ws.close(None).await;
                    return End::Shutdown;
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => self.on_frame(&text).await,
                    Some(Ok(Message::Close(frame))) => return self.closed(frame, in_force).await,
                    // Pings are answered by tungstenite as it reads.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return retry(None, &e.to_string()),
                    None => return retry(None, "the connection ended"),
                },
                command = self.commands.recv(), if self.pending.len() < MAX_IN_FLIGHT => {
                    let Some(command) = command else {
                        let _ = ws.close(None).await;
                        return End::Shutdown;
                    };
                    self.take(command);
                    // Whatever else is ready shares the write.
                    while self.pending.len() < MAX_IN_FLIGHT {
                        let Ok(command) = self.commands.try_recv() else { break };
                        self.take(command);
                    }
                }
                _ = sleep_until(self.ack_due.unwrap_or_else(Instant::now)), if self.ack_due.is_some() => {
                    self.ack_due = None;
                }
                changed = tokens.changed(), if tokens_live => {
                    if changed.is_err() {
                        // The refresher ended: the server closes at expiry.
                        tokens_live = false;
                        continue;
                    }
                    let state: TokenState = tokens.borrow_and_update().clone();
                    if let Some(token) = state.access
                        && state.generation > in_force
                    {
                        let reference = format!("auth-{}", state.generation);
                        let frame = ClientFrame::Auth { reference: &reference, token: &token }.to_text();
                        if let Err(e) = ws.send(Message::text(frame)).await {
                            return retry(None, &e.to_string());
                        }
                        in_force = state.generation;
                    }
                }
            }
            if let Err(end) = self.write_queued(&mut ws).await {
                return end;
            }
        }
    }

    async fn open(&self, token: &str) -> Result<Socket, End> {
        let base = self.inner.rest.base();
        let ws_base = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_owned()
        };
        let query = if self.options.exclusive {
            "?exclusive=true"
        } else {
            ""
        };
        let mut request = match format!("{ws_base}/v1/ws{query}").into_client_request() {
            Ok(request) => request,
            Err(e) => {
                return Err(End::Stop {
                    code: None,
                    reason: format!("bad server address: {e}"),
                    error: |_, reason| Error::Protocol(reason),
                });
            }
        };
        let Ok(bearer) = format!("Bearer {token}").parse() else {
            return Err(retry(None, "the access token is not a header value"));
        };
        request.headers_mut().insert("authorization", bearer);
        #[cfg(feature = "rustls")]
        let connect = tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            false,
            Some(tokio_tungstenite::Connector::Rustls(self.inner.rest.tls())),
        );
        #[cfg(not(feature = "rustls"))]
        let connect = tokio_tungstenite::connect_async(request);
        match timeout(HANDSHAKE_TIMEOUT, connect).await {
            Err(_) => Err(retry(None, "the upgrade timed out")),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                Err(retry(None, &format!("upgrade refused with HTTP {status}")))
            }
            Ok(Err(e)) => Err(retry(None, &e.to_string())),
        }
    }

    /// Writes the sends not yet on this socket, and the acks if due.
    async fn write_queued(&mut self, ws: &mut Socket) -> Result<(), End> {
        let mut wrote = false;
        for pending in self.pending.values_mut().filter(|p| !p.written) {
            feed(ws, pending.frame.clone()).await?;
            pending.written = true;
            wrote = true;
        }
        for (n, pending) in self.durable_acks.iter_mut().filter(|(_, p)| !p.written) {
            let reference = format!("a-{n}");
            let frame = ClientFrame::Ack {
                reference: Some(&reference),
                ids: &pending.ids,
            };
            feed(ws, frame.to_text()).await?;
            pending.written = true;
            wrote = true;
        }
        let due = self
            .ack_due
            .is_none_or(|at| at <= Instant::now() || self.acks.len() >= ACK_BATCH);
        if due && !self.acks.is_empty() {
            for chunk in self.acks.chunks(ACK_BATCH) {
                let frame = ClientFrame::Ack {
                    reference: None,
                    ids: chunk,
                };
                feed(ws, frame.to_text()).await?;
            }
            self.acks.clear();
            self.ack_due = None;
            wrote = true;
        }
        if wrote {
            ws.flush().await.map_err(|e| retry(None, &e.to_string()))?;
        }
        Ok(())
    }

    async fn on_frame(&mut self, text: &str) {
        let frame = match serde_json::from_str::<ServerFrame>(text) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable frame from the server");
                return;
            }
        };
        match frame {
            ServerFrame::Message(message) => {
                let id = message.id;
                let received = self.inbox.receive(message).await;
                if received.ack {
                    self.queue_acks([id]);
                }
                if let Some(event) = received.event {
                    self.emit(event).await;
                }
            }
            ServerFrame::Drained => {
                self.attempt = 0;
                self.emit(Event::Drained).await;
            }
            ServerFrame::Sent {
                reference,
                id,
                sent_at,
                delivered,
            } => {
                if let Some(pending) = self.reply_to(reference.as_deref()) {
                    let _ = pending.reply.send(Ok(SendReply {
                        id,
                        sent_at,
                        delivered,
                    }));
                }
            }
            ServerFrame::Acked { reference, .. } => {
                if let Some(pending) = self.durable_ack(&reference) {
                    let _ = pending.reply.send(Ok(()));
                }
            }
            ServerFrame::Error { reference, error } => {
                if let Some(pending) = reference.as_deref().and_then(|r| self.durable_ack(r)) {
                    let _ = pending.reply.send(Err(error.into_error(None)));
                    return;
                }
                match self.reply_to(reference.as_deref()) {
                    Some(pending) => {
                        let _ = pending.reply.send(Err(error.into_error(None)));
                    }
                    // An `auth` refused (the token in force stays), or an
                    // ack that could not be stored (it is redelivered).
                    None => tracing::warn!(
                        code = %error.code, message = %error.message, "the server refused a frame"
                    ),
                }
            }
            ServerFrame::Authed { expires_at, .. } => {
                self.emit(Event::Renewed { expires_at }).await;
            }
            ServerFrame::Receipt { id, to, device_id } => {
                self.emit(Event::Receipt { id, to, device_id }).await;
            }
            ServerFrame::DevicesChanged {
                device_id, reason, ..
            } => {
                let change = device_id
                    .zip(reason)
                    .map(|(device_id, reason)| DeviceChange {
                        device_id,
                        reason: DeviceChangeReason::parse(&reason),
                    });
                match self.inner.own_devices_changed(change).await {
                    Ok(event) => self.emit(event).await,
                    Err(e) => tracing::warn!(error = %e, "cannot fetch this account's devices"),
                }
            }
            ServerFrame::Ready { .. } | ServerFrame::Unknown => {}
        }
    }

    fn durable_ack(&mut self, reference: &str) -> Option<PendingAck> {
        let n = reference.strip_prefix("a-")?.parse().ok()?;
        self.durable_acks.remove(&n)
    }

    fn reply_to(&mut self, reference: Option<&str>) -> Option<Pending> {
        let n = reference?.strip_prefix("s-")?.parse().ok()?;
        self.pending.remove(&n)
    }

    /// What a close frame means for this client.
    async fn closed(&mut self, frame: Option<CloseFrame>, in_force: u64) -> End {
        let code = frame.as_ref().map(|f| u16::from(f.code));
        let reason = frame
            .map(|f| f.reason.to_string())
            .unwrap_or_else(|| "closed without a code".into());
        match code {
            Some(4401) => match self.inner.session.refreshed_after(in_force).await {
                // Once at once; a server that keeps refusing gets backoff.
                Ok(_) => End::Retry {
                    code,
                    reason,
                    at_once: self.attempt == 0,
                },
                Err(e @ Error::Unauthorized(_)) => stop_session(e),
                Err(_) => retry(code, &reason),
            },
            Some(4409 | 4429 | 1008 | 1009) => End::Stop {
                code,
                reason,
                error: |code, reason| Error::Closed { code, reason },
            },
            _ => retry(code, &reason),
        }
    }
}

async fn feed(ws: &mut Socket, frame: String) -> Result<(), End> {
    ws.feed(Message::text(frame))
        .await
        .map_err(|e| retry(None, &e.to_string()))
}

fn retry(code: Option<u16>, reason: &str) -> End {
    End::Retry {
        code,
        reason: reason.to_owned(),
        at_once: false,
    }
}

fn stop_session(error: Error) -> End {
    End::Stop {
        code: Some(4401),
        reason: error.to_string(),
        error: |_, reason| Error::Unauthorized(reason),
    }
}
