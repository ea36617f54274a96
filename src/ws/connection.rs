//! One WebSocket connection, from authentication to close, in one task.
//!
//! After authentication the connection subscribes (see
//! [`Delivery::subscribe`](crate::delivery::Delivery::subscribe)): it
//! registers in the hub *before* it reads its backlog, so pushes that arrive
//! meanwhile wait in its queue, and its first read waits until every message
//! accepted before it registered is committed. It then sends the backlog
//! page by page, says `drained`, and flushes the queued pushes, skipping any
//! whose id the backlog already carried. Ids are committed in id order, so a
//! push that is not in the backlog has a larger id than everything that is:
//! nothing is missed, nothing is sent twice, and the order is the order of
//! acceptance.
//!
//! In a cluster, messages of other nodes arrive through the broker, whose
//! subscription for the account is active before the backlog is read; the
//! backlog is read by snapshot ([`super::drain`]) and repeats are dropped
//! by exact id ([`super::seen`]), as ids of several nodes interleave. When
//! broker traffic was lost, the node asks its sockets to read their
//! backlog again ([`Event::Reread`]); they send what they have not sent.
//!
//! The socket belongs to one device of its account (the token's `dev`): it
//! drains and acknowledges that device's queue, gets the pushes of that
//! device, and the notices of the whole account (receipts, a change of the
//! account's devices). One opened with `?exclusive=true` closes the older
//! sockets of its device with 4409 once it is authenticated.
//!
//! An idle socket's memory is mostly this task, so its future is kept
//! small: a task is as large as its largest await point and lives as long
//! as its socket. The awaits of work done now and then (opening the
//! connection, a frame's handling, a backlog page, a batch of events, the
//! close, a write that must wait) are boxed; what the upgrade hands over
//! comes boxed ([`Start`]), since an async fn's arguments stay in its
//! future for its whole life; and replies wait encoded (a `WsMessage`, not
//! a `ServerFrame`). With the 1 KiB read buffer and the hub's lazily
//! allocated queue, an idle socket went from 12.1 to 4.6 KiB of server
//! memory (10,000 sockets, BENCHMARKS.md).
//!
//! Writes are fed to the socket's buffer and flushed once nothing else is
//! ready (at the latest every [`COALESCED`] frames): a `sent` reply and the
//! receipt that arrives with it, or a burst of pushes, go out in one
//! syscall.
//!
//! A `send` is accepted (id, enqueue, push) before the next frame is read,
//! so one connection's messages keep their order; its `sent` reply waits
//! for durability without holding up the socket, up to [`MAX_IN_FLIGHT`]
//! at once.

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;
use tungstenite::Message as WsMessage;
use tungstenite::protocol::CloseFrame;
use uuid::Uuid;

use super::Socket;
use super::deadline::TimedOut;
use super::drain::{self, Chunk, Cursor, Pace};
use super::frame::{self, ClientFrame, MultiFrame, ServerFrame, close};
use super::seen::Seen;
use crate::auth::{self, token::Claims};
use crate::cluster::Interest;
use crate::delivery::{Accepted, Address, Subscription, idempotency};
use crate::error::{Error, Result};
use crate::hub::{Event, Kick, Outbound, Registration};
use crate::limits::sockets::SocketPermit;
use crate::metrics::{AuthFailure, Closed, Source};
use crate::push::targets::TargetState;
use crate::state::AppState;
use crate::wire::{self, Envelope, parse_id};

/// Sends awaiting durability (and acks awaiting commit) per connection.
/// Past this the connection stops reading until some complete: a client
/// cannot queue unbounded work. Signal-Server allows 256 in flight too.
const MAX_IN_FLIGHT: usize = 256;

/// Frames fed to the socket before a flush at the latest: with frames of a
/// few hundred bytes, a few write buffers' worth. A connection flushes once
/// nothing else is ready, so under load its frames (pushes, `sent`
/// replies, receipts) go out a buffer at a time rather than a syscall
/// each; idle, a frame goes at once. The bound keeps a socket whose input
/// never runs dry from sitting on its replies.
const COALESCED: u8 = 64;

/// A write that takes longer than this means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for a close frame, and for confirming in-flight sends at
/// shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Malformed frames tolerated per window before the connection is closed
/// with 1008: a buggy client gets error frames, a hostile one gets cut off.
const MAX_STRIKES: usize = 10;
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// Why a write failed.
enum Stop {
    /// The peer is gone or stopped reading: nothing more can be written.
    Gone,
    /// The hub gave up on this connection: its queue overflowed.
    Kicked,
}

/// What the upgrade hands a connection, boxed: an argument of an async fn
/// is stored in its future for the future's whole life, so the socket task
/// would carry these (and the socket) twice over if they came by value.
pub struct Start {
    pub state: AppState,
    /// The upgrade request's bearer token, checked.
    pub header: Option<Result<Claims>>,
    /// The client's address, keyed as per-address limits key it: its
    /// backlog pages are charged to it.
    pub client: IpAddr,
    /// The connection's place in the per-address count, held for its life,
    /// and its waiting slot until it authenticates.
    pub permit: SocketPermit,
    /// Whether it takes over from the older sockets of its device.
    pub exclusive: bool,
}

pub async fn run(socket: Box<Socket>, start: Box<Start>) {
    let metrics = start.state.metrics.clone();
    let closed = match Box::pin(open(socket, start)).await {
        Ok(mut conn) => {
            let closed = conn.serve().await;
            // Its device may not come back soon (a phone's app suspended):
            // wake it later for what it was sent and did not ack. Not at
            // shutdown: its clients reconnect to the next server at once.
            if closed != Closed::Shutdown && conn.owes_acks() {
                let device = conn.device;
                conn.state.scheduler.closed(device.user, device.device);
            }
            closed
        }
        Err(closed) => closed,
    };
    metrics.ws_closed(closed);
}

/// Authenticates, subscribes and says `ready`; returns the connection to
/// serve, or why it ended. Boxed by its caller: none of its state outlives
/// it, and an idle socket's task should not hold room for it.
async fn open(mut socket: Box<Socket>, start: Box<Start>) -> Result<Box<Connection>, Closed> {
    let Start {
        state,
        header,
        client,
        mut permit,
        exclusive,
    } = *start;
    let authenticated = Box::pin(authenticate(&mut socket, &state, header)).await;
    // Authenticated or refused, the socket waits no more: its slot is free
    // before the close handshake, which a client that never answers drags
    // out for the whole close timeout.
    permit.stop_waiting();
    let claims = match authenticated {
        Ok(claims) => claims,
        Err(Flow::Close(closed, code, reason)) => {
            send_close(&mut socket, code, reason).await;
            return Err(closed);
        }
        Err(_) => return Err(Closed::Gone),
    };
    let device = Address {
        user: claims.sub,
        device: claims.dev,
    };
    let subscribed = Box::pin(state.delivery.subscribe(device, claims.sid, exclusive)).await;
    let Subscription {
        registration,
        interest,
        barrier,
    } = match subscribed {
        Ok(subscribed) => subscribed,
        Err(Error::TooManyConnections(reason)) => {
            send_close(&mut socket, close::TOO_MANY_CONNECTIONS, reason).await;
            return Err(Closed::TooManyConnections);
        }
        Err(_) => {
            send_close(
                &mut socket,
                close::INTERNAL,
                "server unavailable; reconnect",
            )
            .await;
            return Err(Closed::Error);
        }
    };
    // Read once registered: a change after this reaches the socket as a
    // `devices_changed` frame, after `ready`.
    let devices = match state.delivery.devices(claims.sub).await {
        Ok(devices) => devices,
        Err(_) => {
            send_close(
                &mut socket,
                close::INTERNAL,
                "server unavailable; reconnect",
            )
            .await;
            return Err(Closed::Error);
        }
    };
    // A revocation between the token check and the registration kicked no
    // one: it is in the revoked set by now, so look again.
    if state.revocations.is_revoked(claims.sid) {
        state.metrics.auth_failed(AuthFailure::RevokedSession);
        send_close(&mut socket, close::UNAUTHORIZED, "session has been revoked").await;
        return Err(Closed::Revoked);
    }
    let first_page: BoxFuture<'static, Result<Chunk>> = {
        let page = drain::read(
            state.delivery.clone(),
            device,
            client,
            Cursor::default(),
            Pace::default().bytes(),
        );
        Box::pin(async move {
            barrier.await?;
            page.await
        })
    };
    let mut conn = Box::new(Connection {
        fetch: Some(first_page),
        pace: Pace::default(),
        client,
        draining: true,
        reread: None,
        seen: state.delivery.clustered().then(Seen::default),
        _interest: interest,
        socket,
        device,
        expires_at: expiry_time(claims.exp),
        expiry: Box::pin(tokio::time::sleep_until(until(claims.exp))),
        session: claims.sid,
        registration,
        pending: FuturesUnordered::new(),
        backlog_last: None,
        unacked: 0,
        awaiting_pong: false,
        unflushed: 0,
        strikes: VecDeque::new(),
        _permit: permit,
        state,
    });
    // It is here: a wake-up pending for it is not needed.
    conn.state
        .scheduler
        .showed_up(conn.device.user, conn.device.device);
    // From the targets cache: no query for a device of an account seen
    // before. A failure to read it costs only the hint, never the socket.
    let push_dropped = match conn.state.targets.state(claims.sub, claims.dev).await {
        Ok(target) => target == TargetState::Dropped,
        Err(err) => {
            tracing::debug!(error = %err, "could not read the push target for `ready`");
            false
        }
    };
    tracing::debug!(user.id = %conn.device.user, "socket ready");
    let ready = ServerFrame::Ready {
        user_id: conn.device.user,
        device_id: claims.dev,
        expires_at: conn.expires_at,
        devices,
        push_dropped,
    };
    match conn.send(&ready).await {
        Ok(()) => Ok(conn),
        Err(_) => Err(Closed::Gone),
    }
}

/// The token from the upgrade header, or else from an `auth` frame that must
/// arrive within the configured timeout. Fails with how to close.
async fn authenticate(
    socket: &mut Socket,
    state: &AppState,
    header: Option<Result<Claims>>,
) -> Result<Claims, Flow> {
    const REFUSED: Flow = Flow::Close(
        Closed::Unauthenticated,
        close::UNAUTHORIZED,
        "missing, invalid or expired access token",
    );
    // `auth::verify` counts a bad token; this counts a missing one.
    let no_token = || {
        state.metrics.auth_failed(AuthFailure::MissingToken);
        REFUSED
    };
    if let Some(claims) = header {
        return claims.map_err(|_| REFUSED);
    }
    let first_auth = async {
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Text(text))) => {
                    let max_depth = state.config.max_json_depth as usize;
                    return match frame::parse(&text, max_depth).frame {
                        Ok(ClientFrame::Auth { token }) => {
                            auth::verify(state, &token).map_err(|_| REFUSED)
                        }
                        _ => Err(no_token()),
                    };
                }
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                Some(Err(err)) => return Err(read_error(err)),
                Some(Ok(_)) => return Err(no_token()),
                None => return Err(Flow::Drop),
            }
        }
    };
    // A shutdown does not wait for sockets that have not authenticated.
    tokio::select! {
        authenticated = tokio::time::timeout(state.config.ws_auth_timeout, first_auth) => {
            authenticated.unwrap_or_else(|_| Err(no_token()))
        }
        () = state.shutdown.cancelled() => Err(Flow::Close(
            Closed::Shutdown,
            close::GOING_AWAY,
            "server shutting down",
        )),
    }
}

fn expiry_time(exp: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(exp, 0).unwrap_or_default()
}

/// The instant at which a token with `exp` (Unix seconds) expires.
fn until(exp: i64) -> tokio::time::Instant {
    let left = exp.saturating_mul(1000) - Utc::now().timestamp_millis();
    tokio::time::Instant::now() + Duration::from_millis(left.max(0) as u64)
}

/// The closing handshake: send a close frame, then read (and discard) until
/// the peer's close or EOF. Dropping a socket with unread input makes the
/// kernel answer with RST, which can destroy the close frame before the peer
/// reads it; draining first gets a clean FIN. Frames discarded here were not
/// accepted: no `sent` was written for them.
async fn send_close(socket: &mut Socket, code: u16, reason: &'static str) {
    let frame = WsMessage::Close(Some(CloseFrame {
        code: code.into(),
        reason: reason.into(),
    }));
    let handshake = async {
        socket.send(frame).await.ok()?;
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, WsMessage::Close(_)) {
                break;
            }
        }
        Some(())
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, handshake).await;
}

struct Connection {
    socket: Box<Socket>,
    state: AppState,
    /// The account and device the socket belongs to; renewals must keep
    /// both.
    device: Address,
    /// The session of the token in force; renewals must keep it.
    session: Uuid,
    expires_at: DateTime<Utc>,
    /// Fires when the access token in force expires.
    expiry: Pin<Box<Sleep>>,
    registration: Registration,
    /// Replies that wait on the committer: `sent` for sends, `acked` (or an
    /// error) for acks.
    /// Each encoded as it completes: a `WsMessage` is a fifth of a
    /// `ServerFrame`, and the serve loop's state holds one.
    pending: FuturesUnordered<BoxFuture<'static, Option<WsMessage>>>,
    /// The backlog read in progress: the drain at connect, or a re-read.
    fetch: Option<BoxFuture<'static, Result<Chunk>>>,
    /// How large its next backlog page may be.
    pace: Pace,
    /// Its address, which its backlog pages are charged to.
    client: IpAddr,
    /// Until the drain at connect has said `drained`.
    draining: bool,
    /// A re-read asked for while a read runs: from the earliest.
    reread: Option<Uuid>,
    /// On one node: the last id the backlog carried, up to which queued
    /// pushes are repeats (ids are in commit order there).
    backlog_last: Option<Uuid>,
    /// In a cluster: the ids sent, which are the only sign of a repeat.
    seen: Option<Seen>,
    /// Stored messages written to the socket less ids acked: above zero,
    /// the socket closing leaves its device with something to be woken
    /// for. A client acking ids it was not sent only lowers it for itself.
    unacked: u32,
    /// The account's subscription at the broker, held for the socket's
    /// life.
    _interest: Interest,
    awaiting_pong: bool,
    /// Frames fed since the last flush, at most [`COALESCED`].
    unflushed: u8,
    /// When recent malformed frames arrived, within the strike window.
    strikes: VecDeque<Instant>,
    /// Held for the connection's life: its place in the per-IP count.
    _permit: SocketPermit,
}

/// What the connection does after a frame.
enum Flow {
    Continue,
    /// Close with a close frame (code and reason) and handshake.
    Close(Closed, u16, &'static str),
    /// Drop the socket: the peer is gone, a close frame would not arrive.
    Drop,
    /// The hub gave up on this connection; close as its reason says.
    Kicked,
}

impl Connection {
    /// Serves until the connection ends; returns why it did.
    async fn serve(&mut self) -> Closed {
        let period = self.state.config.ws_ping_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Made once, not per turn of the loop: a fresh `cancelled()` each
        // turn registered with (and left) the token's waiter list every time.
        let shutdown = self.state.shutdown.clone().cancelled_owned();
        let kicked = self.registration.kicked.clone().cancelled_owned();
        tokio::pin!(shutdown, kicked);
        loop {
            let flow = if self.unflushed >= COALESCED {
                flow(self.flush().await)
            } else {
                tokio::select! {
                    biased;
                    () = &mut shutdown => {
                        Box::pin(self.finish_in_flight()).await;
                        Flow::Close(Closed::Shutdown, close::GOING_AWAY, "server shutting down")
                    }
                    () = &mut kicked => Flow::Kicked,
                    () = &mut self.expiry => {
                        Flow::Close(Closed::TokenExpired, close::UNAUTHORIZED, "access token expired")
                    }
                    _ = ping.tick() => {
                        if self.awaiting_pong {
                            tracing::debug!(user.id = %self.device.user, "peer stopped answering pings");
                            return Closed::Gone;
                        }
                        self.awaiting_pong = true;
                        flow(self.write(WsMessage::Ping(Default::default())).await)
                    }
                    Some(reply) = self.pending.next(), if !self.pending.is_empty() => {
                        match reply {
                            Some(message) => flow(self.feed_ws(message).await),
                            None => Flow::Continue,
                        }
                    }
                    page = async { self.fetch.as_mut().expect("guarded").await }, if self.fetch.is_some() => {
                        match page {
                            Ok(page) => Box::pin(self.backlog(page)).await,
                            Err(err) => {
                                self.state.delivery.backlog_failed(self.device.user, &err);
                                Flow::Close(Closed::Error, close::INTERNAL, "backlog unavailable; reconnect")
                            }
                        }
                    }
                    pushed = self.registration.rx.recv(), if self.fetch.is_none() => match pushed {
                        Some(event) => Box::pin(self.events(event)).await,
                        None => Flow::Kicked,
                    },
                    inbound = self.socket.next(), if self.pending.len() < MAX_IN_FLIGHT => match inbound {
                        Some(Ok(message)) => {
                            self.awaiting_pong = false;
                            Box::pin(self.inbound(message)).await
                        }
                        Some(Err(err)) => read_error(err),
                        None => return Closed::Gone,
                    },
                    // Last, so only when nothing above is ready.
                    () = std::future::ready(()), if self.unflushed > 0 => flow(self.flush().await),
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Close(closed, code, reason) => {
                    Box::pin(send_close(&mut self.socket, code, reason)).await;
                    return closed;
                }
                Flow::Kicked => {
                    let (closed, code, reason) = match self.registration.kick_reason() {
                        Some(Kick::Revoked) => (
                            Closed::Revoked,
                            close::UNAUTHORIZED,
                            "session has been revoked",
                        ),
                        Some(Kick::Displaced) => (
                            Closed::Displaced,
                            close::CONNECTED_ELSEWHERE,
                            "connected elsewhere",
                        ),
                        // Overflow, or unregistered after one.
                        _ => (
                            Closed::Overflow,
                            close::TRY_AGAIN_LATER,
                            "connection fell behind; reconnect to resume",
                        ),
                    };
                    Box::pin(send_close(&mut self.socket, code, reason)).await;
                    return closed;
                }
                Flow::Drop => return Closed::Gone,
            }
        }
    }

    /// Writes one frame and flushes, giving up on a peer that stopped
    /// reading or that the hub has kicked.
    async fn write(&mut self, message: WsMessage) -> Result<(), Stop> {
        bounded(self.socket.send(message), &self.registration.kicked).await?;
        self.unflushed = 0;
        Ok(())
    }

    /// Hands one frame to the socket's write buffer; it goes out at the
    /// next [`Connection::flush`], or earlier once the buffer holds
    /// [`WRITE_BUFFER`](super::WRITE_BUFFER).
    async fn feed(&mut self, frame: &ServerFrame) -> Result<(), Stop> {
        self.feed_ws(frame.to_ws()).await
    }

    async fn feed_ws(&mut self, message: WsMessage) -> Result<(), Stop> {
        bounded(self.socket.feed(message), &self.registration.kicked).await?;
        self.unflushed = self.unflushed.saturating_add(1);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        bounded(self.socket.flush(), &self.registration.kicked).await?;
        self.unflushed = 0;
        Ok(())
    }

    async fn send(&mut self, frame: &ServerFrame) -> Result<(), Stop> {
        self.write(frame.to_ws()).await
    }

    /// Writes a page of the backlog in as few writes as the write buffer
    /// allows, then flushes it; at the end of the drain at connect, says
    /// `drained`; then starts a re-read asked for meanwhile.
    ///
    /// The page must be written within `SEALPOST_WS_PAGE_WRITE_TIMEOUT`:
    /// a socket that reads more slowly would hold the page's share of the
    /// drain budget as long as it pleased, a write at a time. Past it the
    /// socket is closed (1013) and the page dropped, which gives its bytes
    /// back; its messages stay queued for the next connection.
    async fn backlog(&mut self, page: Chunk) -> Flow {
        let limit = self.state.config.ws_page_write_timeout;
        let started = Instant::now();
        match tokio::time::timeout(limit, self.write_page(&page)).await {
            Ok(Ok(())) => {}
            Ok(Err(stop)) => return flow(Err(stop)),
            Err(_) => {
                tracing::debug!(user.id = %self.device.user, "backlog page not written in time");
                return Flow::Close(
                    Closed::Slow,
                    close::TRY_AGAIN_LATER,
                    "too slow to read the backlog; reconnect to resume",
                );
            }
        }
        self.pace.written(page.bytes(), started.elapsed(), limit);
        if let Some(next) = page.next {
            self.read(next);
            return Flow::Continue;
        }
        self.fetch = None;
        if std::mem::take(&mut self.draining)
            && let Err(stop) = self.feed(&ServerFrame::Drained).await
        {
            return flow(Err(stop));
        }
        if let Some(after) = self.reread.take() {
            self.read(Cursor::after(after));
        }
        flow(self.flush().await)
    }

    /// Feeds a page's messages, but those already sent, and flushes them.
    async fn write_page(&mut self, page: &Chunk) -> Result<(), Stop> {
        for message in &page.messages {
            if let Some(seen) = &mut self.seen
                && !seen.insert(message.id)
            {
                continue;
            }
            let frame = ServerFrame::message(message, false);
            self.feed(&frame).await?;
            self.unacked = self.unacked.saturating_add(1);
            self.state.metrics.pushed(Source::Backlog);
            if self.draining {
                self.backlog_last = Some(message.id);
            }
        }
        self.flush().await
    }

    fn read(&mut self, cursor: Cursor) {
        self.fetch = Some(drain::read(
            self.state.delivery.clone(),
            self.device,
            self.client,
            cursor,
            self.pace.bytes(),
        ));
    }

    /// The node lost broker traffic: read the backlog again after `after`,
    /// now or once the read in progress is done.
    fn reread(&mut self, after: Uuid) {
        if self.fetch.is_some() {
            self.reread = Some(self.reread.map_or(after, |r| r.min(after)));
        } else {
            self.read(Cursor::after(after));
        }
    }

    /// Feeds `first` and whatever else its queue holds already, up to
    /// [`COALESCED`] frames unflushed; the serve loop flushes them.
    async fn events(&mut self, first: Event) -> Flow {
        let mut next = Some(first);
        while let Some(event) = next {
            if let Event::Reread(after) = event {
                // What is queued behind it waits for the re-read.
                self.reread(after);
                break;
            }
            if let Err(stop) = self.feed_event(event).await {
                return flow(Err(stop));
            }
            next = if self.unflushed < COALESCED {
                self.registration.rx.try_recv()
            } else {
                None
            };
        }
        Flow::Continue
    }

    async fn feed_event(&mut self, event: Event) -> Result<(), Stop> {
        match event {
            Event::Message(outbound) => self.feed_push(&outbound).await,
            Event::Receipt(receipt) => self.feed(&ServerFrame::receipt(&receipt)).await,
            // The device a change is about knows of it.
            Event::DevicesChanged(change) if !change.tells(self.device.device) => Ok(()),
            Event::DevicesChanged(change) => {
                self.feed(&ServerFrame::devices_changed(*change)).await
            }
            // Handled by `events`, which stops at one.
            Event::Reread(after) => {
                self.reread(after);
                Ok(())
            }
        }
    }

    async fn feed_push(&mut self, outbound: &Outbound) -> Result<(), Stop> {
        let id = outbound.message.id;
        let repeat = !outbound.ephemeral
            && match &mut self.seen {
                Some(seen) => !seen.insert(id),
                None => self.backlog_last.is_some_and(|last| id <= last),
            };
        if repeat {
            return Ok(());
        }
        self.feed(&ServerFrame::message(&outbound.message, outbound.ephemeral))
            .await?;
        if !outbound.ephemeral {
            self.unacked = self.unacked.saturating_add(1);
        }
        let metrics = &self.state.metrics;
        metrics.pushed(Source::Live);
        metrics.push_latency.record(outbound.accepted.elapsed());
        Ok(())
    }

    async fn inbound(&mut self, message: WsMessage) -> Flow {
        match message {
            WsMessage::Text(text) => {
                let inbound = frame::parse(&text, self.state.config.max_json_depth as usize);
                match inbound.frame {
                    Ok(client_frame) => self.handle(inbound.reference, client_frame).await,
                    Err(err) => self.strike(inbound.reference, &err).await,
                }
            }
            WsMessage::Binary(_) => {
                let err =
                    Error::malformed("binary frames are not supported: send JSON in text frames");
                self.strike(None, &err).await
            }
            // tungstenite queues the pong; flush so an idle socket answers now.
            WsMessage::Ping(_) => flow(self.flush().await),
            WsMessage::Pong(_) => Flow::Continue,
            WsMessage::Close(_) => Flow::Close(Closed::Client, 1000, ""),
            // Only ever written, never read.
            WsMessage::Frame(_) => Flow::Continue,
        }
    }

    /// Answers a malformed frame, closing with 1008 when they come too fast.
    async fn strike(&mut self, reference: Option<String>, err: &Error) -> Flow {
        // A sliding window: the times of the last MAX_STRIKES + 1 strikes.
        let now = Instant::now();
        while self
            .strikes
            .front()
            .is_some_and(|t| now - *t > STRIKE_WINDOW)
        {
            self.strikes.pop_front();
        }
        self.strikes.push_back(now);
        if self.strikes.len() > MAX_STRIKES {
            return Flow::Close(
                Closed::Malformed,
                close::POLICY,
                "too many malformed frames",
            );
        }
        flow(self.feed(&ServerFrame::error(reference, err)).await)
    }

    async fn handle(&mut self, reference: Option<String>, frame: ClientFrame) -> Flow {
        let reply = match frame {
            ClientFrame::Auth { token } => Some(match self.renew(&token) {
                Ok(expires_at) => ServerFrame::Authed {
                    reference,
                    expires_at,
                },
                Err(err) => ServerFrame::error(reference, &err),
            }),
            ClientFrame::Send {
                to,
                body,
                envelopes,
                ephemeral,
                client_id,
                urgent,
            } => match self
                .accept(
                    &reference,
                    &to,
                    body.as_deref(),
                    envelopes.as_deref(),
                    ephemeral,
                    client_id.as_deref(),
                    urgent,
                )
                .await
            {
                Ok(reply) => reply,
                Err(err) => {
                    self.state.metrics.rejected(&err);
                    Some(ServerFrame::error(reference, &err))
                }
            },
            ClientFrame::SendMulti(frame) => match self.accept_multi(&reference, *frame).await {
                Ok(reply) => reply,
                Err(err) => {
                    self.state.metrics.rejected(&err);
                    Some(ServerFrame::error(reference, &err))
                }
            },
            ClientFrame::Ack { ids } => match self.ack(&reference, &ids) {
                Ok(()) => None,
                Err(err) => Some(ServerFrame::error(reference, &err)),
            },
        };
        match reply {
            Some(frame) => flow(self.feed(&frame).await),
            None => Flow::Continue,
        }
    }

    /// Replaces the token in force with a fresh one of the same user;
    /// returns its expiry.
    fn renew(&mut self, token: &str) -> Result<DateTime<Utc>> {
        let claims = auth::verify(&self.state, token)?;
        if claims.sub != self.device.user {
            return Err(Error::Unauthorized("token is for another user"));
        }
        if claims.dev != self.device.device {
            return Err(Error::Unauthorized("token is for another device"));
        }
        if claims.sid != self.session {
            // A token of a newer login: revoking that session must find
            // this socket from now on. A revocation that slipped in between
            // the check above and the move kicked no one: look again.
            self.state.hub.rebind(&self.registration, claims.sid);
            self.session = claims.sid;
            if self.state.revocations.is_revoked(claims.sid) {
                self.state.metrics.auth_failed(AuthFailure::RevokedSession);
                self.state
                    .hub
                    .kick(self.device.user, Some(claims.sid), Kick::Revoked);
                return Err(Error::Unauthorized("session has been revoked"));
            }
        }
        self.expires_at = expiry_time(claims.exp);
        self.expiry.as_mut().reset(until(claims.exp));
        Ok(self.expires_at)
    }

    /// Accepts a send now; a stored message's `sent` follows once durable.
    /// An ephemeral send never reaches the committer, and so never wakes
    /// anyone: its `urgent` is ignored.
    #[allow(clippy::too_many_arguments)]
    async fn accept(
        &mut self,
        reference: &Option<String>,
        to: &str,
        body: Option<&str>,
        envelopes: Option<&[Envelope]>,
        ephemeral: bool,
        client_id: Option<&str>,
        urgent: bool,
    ) -> Result<Option<ServerFrame>> {
        let delivery = &self.state.delivery;
        let to = parse_id("to", to)?;
        let content = delivery.decode_content(body, wire::envelopes(envelopes))?;
        let client_id = client_id.map(idempotency::client_id).transpose()?;
        if ephemeral {
            // Never stored, so there is nothing to repeat: a key is
            // checked and otherwise ignored.
            let sent = delivery.send_ephemeral(self.device, to, content).await?;
            return Ok(Some(ServerFrame::Sent {
                reference: reference.clone(),
                id: sent.id,
                sent_at: sent.sent_at,
                delivered: Some(sent.delivered),
            }));
        }
        let accepted = delivery
            .accept(self.device, to, content, client_id, urgent)
            .await?;
        self.confirm(reference, accepted);
        Ok(None)
    }

    /// A `send_multi`: as [`Self::accept`], for several accounts.
    async fn accept_multi(
        &mut self,
        reference: &Option<String>,
        frame: MultiFrame,
    ) -> Result<Option<ServerFrame>> {
        let delivery = &self.state.delivery;
        let MultiFrame { send, ephemeral } = frame;
        let multi = delivery.decode_multi(&send)?;
        let client_id = send
            .client_id
            .as_deref()
            .map(idempotency::client_id)
            .transpose()?;
        if ephemeral {
            let sent = delivery.send_multi_ephemeral(self.device, multi).await?;
            return Ok(Some(ServerFrame::Sent {
                reference: reference.clone(),
                id: sent.id,
                sent_at: sent.sent_at,
                delivered: Some(sent.delivered),
            }));
        }
        let accepted = delivery
            .accept_multi(self.device, multi, client_id, send.urgent)
            .await?;
        self.confirm(reference, accepted);
        Ok(None)
    }

    /// Answers an accepted send with `sent` once it is durable (or an
    /// `error`), without holding up the frames behind it.
    fn confirm(&mut self, reference: &Option<String>, accepted: Accepted) {
        let (reference, metrics) = (reference.clone(), self.state.metrics.clone());
        self.pending.push(Box::pin(async move {
            let reply = match accepted.durable.await {
                Ok(()) => ServerFrame::Sent {
                    reference,
                    id: accepted.id,
                    sent_at: accepted.sent_at,
                    delivered: None,
                },
                Err(err) => {
                    metrics.rejected(&err);
                    ServerFrame::error(reference, &err)
                }
            };
            Some(reply.to_ws())
        }));
    }

    /// Settles ids. A failure is answered; with a `ref`, so is success,
    /// by `acked` once the ack is durable (committed: a read of the queue
    /// from then on no longer has the copies).
    fn ack(&mut self, reference: &Option<String>, ids: &[String]) -> Result<()> {
        let parsed = ids
            .iter()
            .map(|id| parse_id("ids", id))
            .collect::<Result<Vec<_>>>()?;
        // The ids as given, first spelling of each: what the client will
        // match against its own list.
        let acked = reference.clone().map(|reference| {
            let mut seen = std::collections::HashSet::with_capacity(parsed.len());
            let ids = ids
                .iter()
                .zip(&parsed)
                .filter(|(_, id)| seen.insert(**id))
                .map(|(given, _)| given.clone())
                .collect();
            ServerFrame::Acked { reference, ids }
        });
        let distinct = parsed
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        self.unacked = self
            .unacked
            .saturating_sub(u32::try_from(distinct).unwrap_or(u32::MAX));
        let (delivery, device, reference) =
            (self.state.delivery.clone(), self.device, reference.clone());
        self.pending.push(Box::pin(async move {
            match delivery.ack(device, parsed).await {
                Ok(_) => acked.map(|frame| frame.to_ws()),
                Err(err) => Some(ServerFrame::error(reference, &err).to_ws()),
            }
        }));
        Ok(())
    }

    /// Whether the socket ends with stored messages its device has not
    /// acked: sent and not acked, pushed and not yet written, or a backlog
    /// not read to its end.
    fn owes_acks(&mut self) -> bool {
        if self.unacked > 0 || self.fetch.is_some() || self.draining {
            return true;
        }
        while let Some(event) = self.registration.rx.try_recv() {
            if matches!(&event, Event::Message(outbound) if !outbound.ephemeral) {
                return true;
            }
        }
        false
    }

    /// At shutdown: confirm every send already accepted before closing.
    async fn finish_in_flight(&mut self) {
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, self.pending.next()).await {
            if let Some(message) = reply
                && self.write(message).await.is_err()
            {
                return;
            }
        }
    }
}

/// Runs one write of the socket, giving up on a peer that stopped reading
/// or that the hub has kicked. A write that completes at once (into the
/// buffer, or a flush the kernel takes whole: the usual case) is done
/// without a timer or the token; only one that must wait pays for them, in
/// a box, so that the socket task carries none of it while idle.
async fn bounded<F>(write: F, kicked: &CancellationToken) -> Result<(), Stop>
where
    F: Future<Output = Result<(), tungstenite::Error>>,
{
    let mut write = std::pin::pin!(write);
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    let written = match first {
        Poll::Ready(written) => written,
        Poll::Pending => {
            let waited = Box::pin(async {
                tokio::select! {
                    written = tokio::time::timeout(WRITE_TIMEOUT, write) => {
                        written.map_err(|_| Stop::Gone)
                    }
                    () = kicked.cancelled() => Err(Stop::Kicked),
                }
            });
            waited.await?
        }
    };
    written.map_err(|_| Stop::Gone)
}

fn flow(written: Result<(), Stop>) -> Flow {
    match written {
        Ok(()) => Flow::Continue,
        Err(Stop::Kicked) => Flow::Kicked,
        Err(Stop::Gone) => Flow::Drop,
    }
}

/// A read error: a frame that breaks the protocol is answered with 1002, a
/// text message that is not UTF-8 with 1007, a message left unfinished too
/// long with 1008, an oversized frame with 1009; anything else (a reset,
/// EOF without a close) means the peer is gone.
fn read_error(err: tungstenite::Error) -> Flow {
    use tungstenite::error::{Error as WsError, ProtocolError};
    match err {
        WsError::Capacity(_) => Flow::Close(Closed::TooBig, close::TOO_BIG, "frame too large"),
        WsError::Utf8(_) => Flow::Close(
            Closed::Malformed,
            close::INVALID_PAYLOAD,
            "text frames must be UTF-8",
        ),
        WsError::Io(err) if TimedOut::is(&err) => Flow::Close(
            Closed::Malformed,
            close::POLICY,
            "message not finished in time",
        ),
        WsError::Protocol(violation)
            if !matches!(violation, ProtocolError::ResetWithoutClosingHandshake) =>
        {
            tracing::debug!(error = %violation, "protocol violation");
            Flow::Close(Closed::Malformed, close::PROTOCOL, "protocol violation")
        }
        err => {
            tracing::debug!(error = %err, "socket read failed");
            Flow::Close(Closed::Gone, close::GOING_AWAY, "")
        }
    }
}
