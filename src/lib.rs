//! sealpost: a real-time push relay for end-to-end encrypted messengers.
//!
//! Clients encrypt on the device; sealpost only moves sealed envelopes
//! between accounts and keeps them until the recipient acknowledges them.
//!
//! # Layout
//!
//! - [`config`]: every setting, from flags or the environment.
//! - [`logging`]: log format and level, the loggers of payloads and
//!   credentials no level lets through, and the throttle on lines that
//!   come in floods.
//! - [`server`]: start-up, serving and orderly shutdown.
//! - [`http1`]: HTTP/1.1 connections, of the API and of the metrics: the
//!   accept loop, the limits on a request head (time and size), and the
//!   drain at shutdown.
//! - [`linger`]: the lingering close that lets an answer given before the
//!   request body was read reach its client.
//! - [`tls`]: TLS termination: certificate loading and a listener that
//!   handshakes off the accept loop.
//! - [`state`]: [`state::AppState`], the only state shared by handlers.
//! - [`clock`]: the wall clock as a dependency, controlled in unit tests.
//! - [`error`]: the one error type and its mapping to the wire codes.
//! - [`auth`]: argon2id passwords (a hashing queue shared fairly between
//!   callers), the rules for confirming a signed-in caller's password
//!   (lockout, the session ended after wrong guesses), access and refresh
//!   tokens, the signing secret, session revocation, and the `AuthUser`
//!   extractor.
//! - [`limits`]: rate limits (auth per IP, password checks per account,
//!   sends per user and per pair) and resource caps (HTTP connections and
//!   sockets per IP, sockets per device, unauthenticated sockets
//!   server-wide and per IP, messages queued per device and per sender,
//!   bytes queued per account).
//! - [`nesting`]: the cap on JSON nesting depth, checked on every request
//!   body and WebSocket frame before it is parsed.
//! - [`wire`]: the wire types REST and WebSocket share (ids, timestamps,
//!   the message view, a send's envelopes).
//! - [`api`]: the REST endpoints, one file per resource; thin handlers; the
//!   security headers and CORS policy on every response; and each route's
//!   body limit and the deadline on reading a body ([`api::body`]).
//! - [`delivery`]: the core that accepts, lists and acknowledges messages,
//!   its [`delivery::committer`], which batches every write to the queue
//!   into group commits, [`delivery::idempotency`], which makes a send
//!   under a client's key safe to retry, and [`delivery::drains`], the
//!   budget for backlog pages in memory and each account's and address's
//!   share of it.
//! - [`devices`]: the devices of an account: the directory of device
//!   numbers every send is checked against, and the rules for names.
//! - [`cluster`]: several nodes on one database: the broker seam (a local
//!   broker for one node, NATS for a cluster), what crosses it, and the
//!   delivery guarantees restated for a cluster.
//! - [`hub`]: the connection hub: which connections of which device are
//!   online, and the push to them. Routing only; it owns no durability.
//! - [`ws`]: the WebSocket endpoint and one task per connection (auth,
//!   backlog drain, push, sends, acks, renewal, close), and the deadline on
//!   a message left unfinished.
//! - [`store`]: durable storage, one trait per concern (the queue; accounts
//!   and devices; sessions; operator queries), and its PostgreSQL and SQLite
//!   backends.
//! - [`seal`]: the storage keys, and the sealing of each queued message's
//!   sender and body at rest.
//! - [`keyfile`]: secrets generated beside an SQLite database when none is
//!   configured (the JWT secret, the storage key).
//! - [`sweeper`]: expiry of old messages, refresh tokens and revocations,
//!   and sealing again of legacy and old-key rows.
//! - [`metrics`]: the Prometheus metrics every part records into, and their
//!   own listener (`SEALPOST_METRICS_ADDR`).
//! - [`admin`]: the operator commands beside `serve` and `migrate`:
//!   `check-config`, `user`, `stats`, `healthcheck`.
//!
//! The path of a message: a `send` frame or `POST /v1/messages` →
//! [`delivery::Delivery::accept`] (validation, the envelopes checked against
//! the recipient's devices; then, under one lock, its id, the insert of one
//! copy per device into the committer's queue and the push of each copy to
//! its device's connections) → the committer seals the batch and inserts it
//! → `sent` or `201`. Each recipient device gets the push at once, or its
//! backlog on connect, or polls `GET /v1/messages`; its ack travels the same
//! committer as a batched delete of its own copy, and the sender hears of it
//! (a receipt).

pub mod admin;
pub mod api;
pub mod auth;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod devices;
pub mod error;
pub mod http1;
pub mod hub;
pub mod keyfile;
pub mod limits;
pub mod linger;
pub mod logging;
pub mod metrics;
pub mod nesting;
pub mod push;
pub mod seal;
pub mod server;
pub mod state;
pub mod store;
pub mod sweeper;
pub mod tls;
pub mod wire;
pub mod ws;

pub use config::Config;
pub use server::Server;
