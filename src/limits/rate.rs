//! Rate limits, both token buckets from `governor` (GCRA, a few bytes of
//! state per key):
//!
//! - [`AuthLimit`]: sign-up, login and refresh per client IP (tower-governor
//!   in front of those routes). A password guesser gets
//!   `SEALPOST_AUTH_RATE_PER_MINUTE` tries a minute per address.
//!   The routes that check a signed-in caller's password (password change,
//!   account and device deletion) sit behind the same layer.
//! - [`SendBudget`]: messages per sending user, checked by the delivery core
//!   so that REST and WebSocket sends draw on one budget. A stored send
//!   takes one token per copy it stores (one per recipient device), so a
//!   send to a ten-device account costs what ten sends to one device cost.
//! - [`PairBudget`]: sends from one user to one recipient, stored and
//!   ephemeral together: what one sender may pour into one account's
//!   queues, and how often it may ask whether the account is online (an
//!   ephemeral send's `delivered`).
//! - [`PasswordBudget`]: password checks per signed-in account, checked by
//!   [`crate::auth::confirm`] before a hash, so that one account cannot
//!   spend the server's hashing however many addresses it comes from.
//!
//! Over a limit the caller gets [`Error::RateLimited`] with the time to
//! wait; nothing is queued, so nothing is lost.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::{GovernorError, GovernorLayer};
use uuid::Uuid;

use super::client_ip::{ClientIpKey, TrustedProxies};
use crate::error::Error;
use crate::metrics::{Limited, Metrics};

pub type AuthLayer = GovernorLayer<ClientIpKey, NoOpMiddleware, Body>;

/// The per-IP limit of the auth routes: the layer for the router, and a
/// handle to its state for pruning.
#[derive(Clone)]
pub struct AuthLimit {
    pub layer: AuthLayer,
    limiter: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

impl AuthLimit {
    /// `None` when `per_minute` is 0 (limit off).
    pub fn new(
        per_minute: u32,
        burst: u32,
        proxies: TrustedProxies,
        metrics: Arc<Metrics>,
    ) -> Option<Self> {
        if per_minute == 0 {
            return None;
        }
        let config = GovernorConfigBuilder::default()
            .period(Duration::from_secs(60) / per_minute)
            .burst_size(burst.max(1))
            .key_extractor(ClientIpKey(proxies))
            .finish()?;
        let limiter = config.limiter().clone();
        let layer = GovernorLayer::new(config).error_handler(move |error| match error {
            GovernorError::TooManyRequests { wait_time, .. } => {
                metrics.rate_limited(Limited::Auth);
                Error::RateLimited {
                    retry_after: Duration::from_secs(wait_time.max(1)),
                }
                .into_response()
            }
            // No peer address: only possible if the server were run without
            // connect info, which `Server::run` always provides.
            _ => Error::Internal(anyhow::anyhow!("rate limiter could not tell the client"))
                .into_response(),
        });
        Some(Self { layer, limiter })
    }

    /// Forgets addresses whose buckets are full again.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// A token bucket per key, or none when the limit is off.
struct Buckets<K: Hash + Eq + Clone> {
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    /// The bucket's size: the most one check may take.
    burst: NonZeroU32,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// `rate` 0 turns the limit off; `burst` 0 means a burst of `rate`.
    fn new(rate: u32, burst: u32, quota: fn(NonZeroU32) -> Quota) -> Self {
        let burst = NonZeroU32::new(burst)
            .or(NonZeroU32::new(rate))
            .unwrap_or(NonZeroU32::MIN);
        let limiter =
            NonZeroU32::new(rate).map(|rate| RateLimiter::keyed(quota(rate).allow_burst(burst)));
        Self { limiter, burst }
    }

    fn check(&self, key: &K) -> Result<(), Error> {
        self.check_n(key, 1)
    }

    /// Takes `n` tokens (at most the burst: a request larger than the whole
    /// bucket takes all of it), or none.
    fn check_n(&self, key: &K, n: u32) -> Result<(), Error> {
        let (Some(limiter), Some(n)) = (&self.limiter, NonZeroU32::new(n)) else {
            return Ok(());
        };
        match limiter.check_key_n(key, n.min(self.burst)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Error::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }),
            // Ruled out by the `min` above.
            Err(_) => Err(Error::RateLimited {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Forgets keys whose buckets are full again: the map holds only the
    /// keys that used the limit lately, so it is bounded by the rate of
    /// requests between prunes.
    fn prune(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// Messages per sending user, shared by REST and WebSocket sends.
pub struct SendBudget(Buckets<Uuid>);

impl SendBudget {
    /// `per_second` 0 turns the budget off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self(Buckets::new(per_second, burst, Quota::per_second))
    }

    /// Takes one send from `user`'s budget.
    pub fn check(&self, user: Uuid) -> Result<(), Error> {
        self.0.check(&user)
    }

    /// Takes `n` tokens from `user`'s budget (at most the burst: a send
    /// larger than the whole bucket takes all of it), or none.
    pub fn check_n(&self, user: Uuid, n: u32) -> Result<(), Error> {
        self.0.check_n(&user, n)
    }

    /// Forgets users whose buckets are full again.
    pub fn prune(&self) {
        self.0.prune();
    }
}

/// Sends from one user to one recipient, REST and WebSocket, stored and
/// ephemeral together. Sends to your own account (syncing your devices)
/// are not counted: they reach no one else.
pub struct PairBudget(Buckets<(Uuid, Uuid)>);

impl PairBudget {
    /// `per_second` 0 turns the limit off.
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self(Buckets::new(per_second, burst, Quota::per_second))
    }

    /// Takes one send from `from` to `to`.
    pub fn check(&self, from: Uuid, to: Uuid) -> Result<(), Error> {
        if from == to {
            return Ok(());
        }
        self.0.check(&(from, to))
    }

    /// Forgets pairs whose buckets are full again.
    pub fn prune(&self) {
        self.0.prune();
    }
}

/// Password checks per signed-in account.
pub struct PasswordBudget(Buckets<Uuid>);

impl PasswordBudget {
    /// `per_minute` 0 turns the budget off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self(Buckets::new(per_minute, burst, Quota::per_minute))
    }

    /// Takes one password check from `user`'s budget.
    pub fn check(&self, user: Uuid) -> Result<(), Error> {
        self.0.check(&user)
    }

    /// Forgets accounts whose buckets are full again.
    pub fn prune(&self) {
        self.0.prune();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_passes_then_the_budget_refuses_with_a_wait() {
        let budget = SendBudget::new(1, 3);
        let user = Uuid::new_v4();
        for _ in 0..3 {
            budget.check(user).unwrap();
        }
        match budget.check(user) {
            Err(Error::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
        // Budgets are per user.
        budget.check(Uuid::new_v4()).unwrap();
    }

    #[test]
    fn a_send_takes_a_token_per_copy_at_most_the_burst() {
        let budget = SendBudget::new(1, 10);
        let user = Uuid::new_v4();
        budget.check_n(user, 5).unwrap();
        budget.check_n(user, 5).unwrap();
        assert!(budget.check_n(user, 5).is_err());
        // Larger than the bucket: takes all of it, once it is full.
        let other = Uuid::new_v4();
        budget.check_n(other, 50).unwrap();
        assert!(budget.check(other).is_err());
    }

    #[test]
    fn pairs_are_limited_apart_and_self_sends_not_at_all() {
        let pairs = PairBudget::new(1, 2);
        let (alice, bob, carol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        pairs.check(alice, bob).unwrap();
        pairs.check(alice, bob).unwrap();
        assert!(pairs.check(alice, bob).is_err());
        pairs.check(alice, carol).unwrap();
        pairs.check(carol, bob).unwrap();
        for _ in 0..10 {
            pairs.check(alice, alice).unwrap();
        }
    }

    #[test]
    fn zero_turns_the_budget_off() {
        let budget = SendBudget::new(0, 1);
        let user = Uuid::new_v4();
        for _ in 0..1000 {
            budget.check(user).unwrap();
        }
    }

    #[test]
    fn password_checks_are_budgeted_per_account_per_minute() {
        let budget = PasswordBudget::new(6, 2);
        let user = Uuid::new_v4();
        budget.check(user).unwrap();
        budget.check(user).unwrap();
        match budget.check(user) {
            Err(Error::RateLimited { retry_after }) => {
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(10));
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
        budget.check(Uuid::new_v4()).unwrap();
        let off = PasswordBudget::new(0, 1);
        for _ in 0..100 {
            off.check(user).unwrap();
        }
    }
}
