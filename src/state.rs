//! [`AppState`]: the one piece of state shared by every handler.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::confirm::Confirmations;
use crate::auth::password::Passwords;
use crate::auth::sessions::Revocations;
use crate::auth::token::Tokens;
use crate::clock::Clock;
use crate::cluster::Broker;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::hub::Hub;
use crate::limits::client_ip::TrustedProxies;
use crate::limits::rate::AuthLimit;
use crate::limits::sockets::SocketCaps;
use crate::metrics::Metrics;
use crate::push::guard::AllowHosts;
use crate::push::provider::Providers;
use crate::push::scheduler::Scheduler;
use crate::push::targets::Targets;
use crate::seal::KeyRing;
use crate::store::Store;

/// Cheap to clone: every field is an `Arc`. There is no global state.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<dyn Store>,
    pub tokens: Arc<Tokens>,
    pub passwords: Arc<Passwords>,
    /// The lockout and budget of password checks by signed-in accounts.
    pub confirmations: Arc<Confirmations>,
    pub delivery: Arc<Delivery>,
    pub hub: Arc<Hub>,
    pub revocations: Arc<Revocations>,
    /// The other nodes of a cluster (a no-op broker on one node).
    pub broker: Arc<dyn Broker>,
    /// This node's name (`SEALPOST_NODE_ID`, or generated at start).
    pub node_id: Arc<str>,
    /// Caps on sockets per IP and on unauthenticated sockets.
    pub socket_caps: Arc<SocketCaps>,
    /// Whose `X-Forwarded-For` to believe when telling clients apart.
    pub proxies: TrustedProxies,
    /// The per-IP limit of the auth routes (`None` when off): the router
    /// applies its layer, the sweeper prunes its state.
    pub auth_limit: Option<AuthLimit>,
    /// What the server counts about itself; no-ops when metrics are off.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server begins to shut down: every WebSocket task
    /// finishes its in-flight work and closes with 1001.
    pub shutdown: CancellationToken,
    /// The WebSocket tasks, which axum's graceful shutdown does not track
    /// once a connection is upgraded.
    pub sockets: TaskTracker,
    /// The storage keys: push targets are sealed with them, as queued
    /// messages are.
    pub keys: Arc<KeyRing>,
    /// Which devices have push targets (listings, `ready`, wake-ups).
    pub targets: Arc<Targets>,
    /// The push services configured; a kind without one is refused.
    pub providers: Providers,
    /// Hosts exempt from the SSRF guard (`SEALPOST_PUSH_ALLOW_HOSTS`).
    pub push_allow: Arc<AllowHosts>,
    /// Wake-ups of offline devices: told when a device shows up (connects,
    /// polls, acks) and when a socket closes owing acks.
    pub scheduler: Arc<Scheduler>,
    /// The wall clock (a dependency, so that time-driven logic is tested
    /// without sleeping).
    pub clock: Arc<dyn Clock>,
}
