//! The Rust client of sealpost, a push relay for end-to-end encrypted
//! messengers: accounts and devices, sealed text messages to every device
//! of a peer or of a group's members, and a stream of the ones that arrive, over the relay's
//! WebSocket or by polling its REST API.
//!
//! Messages are sealed on the device in the body format every client of the
//! project shares (`protocol.md`, "Client body format"): libsodium's
//! `crypto_box_easy` from this device's key to each recipient device's key,
//! around a small JSON plaintext. The server sees only ciphertext.
//!
//! # Example
//!
//! ```no_run
//! use sealpost_client::{Client, ConnectOptions, DeviceKeys, Event};
//!
//! # async fn run() -> Result<(), sealpost_client::Error> {
//! // A new account; keep the keys (they serialise with serde) and the
//! // device id to log in again later with `Client::login`.
//! let keys = DeviceKeys::generate();
//! let alice = Client::register("http://127.0.0.1:8080", "alice", "correct horse battery", keys).await?;
//!
//! let mut events = alice.connect(ConnectOptions::default())?;
//! let bob = alice.find_user("bob").await?;
//! let sent = alice.send(bob.id, "hello, Bob").await?;
//! println!("stored as {}", sent.id);
//!
//! while let Some(event) = events.next().await {
//!     match event {
//!         Event::Message(message) => {
//!             println!("{}: {}", message.from, message.text);
//!             // Acknowledge once stored: the server then deletes its copy.
//!             alice.ack(&[message.id]).await?;
//!         }
//!         Event::Receipt { id, device_id, .. } => println!("{id} reached device {device_id}"),
//!         Event::State(state) => println!("socket: {state}"),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! - **A send is stored or refused.** [`Client::send`] returns once the
//!   server holds the message durably for every device of the recipient. A
//!   socket that drops before the reply is not a failure: the send is
//!   written again on the next socket. Every send carries a `client_id` of
//!   its own and is retried with it and the same ciphertext (over REST
//!   too, after a 5xx or a lost answer), so one the server had taken is
//!   answered with its first id and not stored twice.
//! - **At least once, shown once.** The server redelivers a message until
//!   it is acknowledged; the client hands it over once (by server id, and
//!   by sender and client message id for a send stored twice by a sender
//!   that retried without a `client_id` or sent it anew), within a
//!   memory of the last 4,096 of each. Acknowledge every
//!   [`Event::Message`] with [`Client::ack`] once it is safe.
//! - **Tokens stay fresh.** The access token is refreshed at 80% of its
//!   life and renewed on the live socket, which stays open across the
//!   expiry.
//! - **Sessions resume.** Store [`Client::session_tokens`] (and again on
//!   every [`Client::on_session_tokens`] call) with the device's keys, and
//!   [`Client::resume`] signs in without the password while the session
//!   lives.
//! - **Limits are checked before sealing.** A message the server would
//!   refuse as too large ([`Client::limits`], from `GET /v1/limits`) is
//!   refused by [`Client::send`] before anything is sent.
//!
//! # Layout
//!
//! - [`client`]: [`Client`], the shared state, sending.
//! - `session`: the access token, refreshed by the one task that holds the
//!   refresh token; [`SessionTokens`], what an application stores.
//! - `socket`: the WebSocket task: reconnect, resume, pipelined sends,
//!   batched acks, renewal in place.
//! - `poll`: the REST polling task, for hosts that cannot hold a socket.
//! - `inbox`: a delivered copy to an [`Event`]: open, read, de-duplicate.
//! - `seal`: the body format. `group`: [`Group`] and the shared form of
//!   group messages. `keys`: [`DeviceKeys`].
//! - `directory`: the cache of peers' devices and keys. `dedup`: bounded
//!   memory of what was shown.
//! - `rest`: one method per endpoint. `wire`: the JSON shapes.
//! - `tls`: the `rustls` feature's settings (ring).
//! - [`error`]: [`Error`], one variant per wire code.
//! - `event`: [`Event`], [`Incoming`], [`ConnectionState`], [`Events`].
//!
//! # Group messages
//!
//! A group is nothing on the server: [`Client::new_group`] makes one up
//! (an id, a name, its members, this account among them) and
//! [`Client::send_group`] sends to it in the shared form (`protocol.md`,
//! "Group messages (shared form)"): the text sealed once under a fresh
//! content key with `crypto_secretbox`, stored once by the server, and for
//! each device of every other member (and each other device of this
//! account, their sync copy) that key and the body's SHA-256 sealed with
//! `crypto_box`, all in one send with one server id. Every copy reaches
//! the application as an [`Event::Message`] whose [`Incoming::group`]
//! names the group (id, name, members): file it under `group.id`, and
//! answer with [`Client::send_group`] to that [`Group`]. A copy whose key
//! was sealed for another body ([`Unreadable::WrongBody`]) is not shown.
//!
//! ```no_run
//! # async fn run(alice: sealpost_client::Client, bob: uuid::Uuid, carol: uuid::Uuid)
//! #     -> Result<(), sealpost_client::Error> {
//! let friends = alice.new_group("friends", [bob, carol])?;
//! alice.send_group(&friends, "hello, both of you").await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Waking the device: push targets
//!
//! A phone app's sockets are suspended in the background; the server wakes
//! such a device through its platform's push service when a message waits
//! for it and it holds no socket. Register the device's token or
//! subscription with [`Client::set_push_target`] ([`PushTarget::apns`],
//! [`PushTarget::fcm`], [`PushTarget::web_push`] with
//! [`Client::vapid_public_key`] as the `applicationServerKey`), again
//! whenever the platform rotates it, and again after
//! [`Event::PushTargetDropped`]; [`Client::delete_push_target`] stops the
//! wake-ups. A wake-up carries nothing: the app (its notification service
//! extension, its background handler) resumes the session, reads the
//! queue over REST ([`Client::poll`], or a login and one round) and shows
//! what it opens. [`OwnDevice::push`] shows each device's target kind.
//!
//! Sends are urgent by default (the recipient's offline devices are woken
//! at once); [`Client::send_with`] and [`SendOptions::urgent`] send one
//! that can wait (woken at low priority, at most once per device in the
//! server's quiet interval). The sync copy of a send to your other
//! devices is always sent non-urgent.
//!
//! # TLS
//!
//! `https://` and `wss://` servers need the `rustls` feature: rustls on
//! the `ring` provider with the operating system's certificate verifier,
//! configured by the client itself (no process-wide provider needed).

mod backoff;
pub mod client;
mod dedup;
mod directory;
pub mod error;
mod event;
mod group;
mod inbox;
mod keys;
mod poll;
mod rest;
mod seal;
mod session;
mod socket;
#[cfg(feature = "rustls")]
mod tls;
mod wire;

pub use client::{Client, SendOptions, Sent};
pub use error::{Error, Result};
pub use event::{
    ConnectionState, DeviceChange, DeviceChangeReason, Event, Events, Incoming, TYPING_SHOWN,
};
pub use group::{Group, MAX_GROUP_NAME_CHARS};
pub use keys::DeviceKeys;
pub use poll::PollOptions;
pub use seal::{MAX_TEXT_CHARS, Unreadable};
pub use session::SessionTokens;
pub use socket::{ACK_DELAY, ConnectOptions};
pub use wire::{
    ApnsEnvironment, Limits, OwnDevice, PushInfo, PushKind, PushTarget, User, WebPushKeys,
};
