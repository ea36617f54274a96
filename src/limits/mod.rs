//! Rate limits and resource caps: what one client, one user or one address
//! may take from the server.
//!
//! - [`client_ip`]: who the client is, believing `X-Forwarded-For` only
//!   from trusted proxies.
//! - [`connections`]: the cap on HTTP connections per address, counted as
//!   they are accepted.
//! - [`rate`]: per-IP limits on the auth endpoints and the other routes that
//!   hash a password (tower-governor), the per-account budget of password
//!   checks, and the per-user and per-pair send budgets shared by REST and
//!   WebSocket.
//! - [`queue`]: the caps on what is queued for one recipient: messages per
//!   device, a sender's share of them, bytes per account.
//! - [`sockets`]: caps on WebSockets per IP and on unauthenticated sockets.
//!   (The per-device cap lives in the hub, which counts a device's
//!   sockets.)
//!
//! Every limit answers with an [`Error`](crate::error::Error) whose code
//! names it (`rate_limited`, `queue_full`, `too_many_connections`); none
//! drops or loses anything already accepted. The one exception is
//! [`connections`], which refuses before there is a request to answer: it
//! closes the connection.

pub mod client_ip;
pub mod connections;
pub mod queue;
pub mod rate;
pub mod sockets;
