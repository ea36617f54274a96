//! Rate limits, both token buckets from `governor` (GCRA, a few bytes of
//! state per key):
//!
//! - [`AuthLimit`]: sign-up, login and refresh per client IP (tower-governor
//!   in front of those routes). A password guesser gets
//!   `SEALPOST_AUTH_RATE_PER_MINUTE` tries a minute per address.
//!   The routes that check a signed-in caller's password (password change,
//!   account and device deletion) sit behind the same layer.
//! - [`SendBudget`]: messages per sending user, checked by the delivery core
//!   so that REST and WebSocket sends draw on one budget.
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
struct Buckets<K: Hash + Eq + Clone>(Option<DefaultKeyedRateLimiter<K>>);

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(quota: Option<Quota>) -> Self {
        Self(quota.map(RateLimiter::keyed))
    }

    fn check(&self, key: &K) -> Result<(), Error> {
        let Some(limiter) = &self.0 else {
            return Ok(());
        };
        limiter
            .check_key(key)
            .map_err(|not_until| Error::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Forgets keys whose buckets are full again.
    fn prune(&self) {
        if let Some(limiter) = &self.0 {
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
        let quota = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(burst)
        });
        Self(Buckets::new(quota))
    }

    /// Takes one send from `user`'s budget.
    pub fn check(&self, user: Uuid) -> Result<(), Error> {
        self.0.check(&user)
    }

    /// Forgets users whose buckets are full again.
    pub fn prune(&self) {
        self.0.prune();
    }
}

/// Password checks per signed-in account.
pub struct PasswordBudget(Buckets<Uuid>);

impl PasswordBudget {
    /// `per_minute` 0 turns the budget off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        let quota = NonZeroU32::new(per_minute).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            Quota::per_minute(rate).allow_burst(burst)
        });
        Self(Buckets::new(quota))
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

    #[test]
    fn zero_turns_the_budget_off() {
        let budget = SendBudget::new(0, 1);
        let user = Uuid::new_v4();
        for _ in 0..1000 {
            budget.check(user).unwrap();
        }
    }
}
