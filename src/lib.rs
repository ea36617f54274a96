//! sealpost: a real-time push relay for end-to-end encrypted messengers.
//!
//! Clients encrypt on the device; sealpost only moves sealed envelopes
//! between accounts and keeps them until the recipient acknowledges them.
//!
//! # Layout
//!
//! - [`config`]: every setting, from flags or the environment.
//! - [`server`]: start-up, serving and orderly shutdown.
//! - [`state`]: [`state::AppState`], the only state shared by handlers.
//! - [`error`]: the one error type and its mapping to the wire codes.
//! - [`auth`]: argon2id passwords, access and refresh tokens, the signing
//!   secret, and the `AuthUser` extractor.
//! - [`api`]: the REST endpoints, one file per resource; thin handlers.
//! - [`delivery`]: the core that accepts, lists and acknowledges messages,
//!   and its [`delivery::committer`], which batches every write to the queue
//!   into group commits.
//! - [`store`]: the `Store` trait and its PostgreSQL and SQLite backends.
//! - [`sweeper`]: expiry of old messages and refresh tokens.
//!
//! The path of a message: `POST /v1/messages` → [`delivery::Delivery::send`]
//! (validation, recipient check) → committer (id, batched insert) → `201`.
//! A recipient polls with `GET /v1/messages` and settles with an ack, which
//! travels the same committer as a batched delete.

pub mod api;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod error;
pub mod hub;
pub mod server;
pub mod state;
pub mod store;
pub mod sweeper;
pub mod ws;

pub use config::Config;
pub use server::Server;
