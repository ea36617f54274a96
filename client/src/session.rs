//! The session: the access token in force, kept fresh by one task that
//! alone holds the refresh token.
//!
//! Refresh tokens are single-use, and presenting a spent one revokes every
//! session of the user, so exactly one owner may ever present it: the
//! refresher task spawned by [`Session::start`]. Everyone else reads the
//! access token from a `watch` channel and, on a `401`, asks the task for a
//! token newer than the one refused ([`Session::refreshed_after`]). Asks for
//! the same refused generation collapse into one refresh, so a burst of
//! `401`s costs one round trip and never races two refreshes.
//!
//! Without asking, the task refreshes at 80% of the access token's lifetime
//! (earlier for lifetimes of a few seconds, see `due_after`),
//! so that the socket can renew in place ([`crate::socket`]) before the
//! server closes it at expiry.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use crate::error::{Error, Result};
use crate::rest::{RefreshError, Rest};
use crate::wire::TokenPair;

/// Refresh once this share of the lifetime has passed (in per mille).
const REFRESH_AT_PER_MILLE: u64 = 800;
/// Refresh at least this long before the token's nominal end.
const EXPIRY_SLACK: Duration = Duration::from_millis(1500);
/// Backoff between refreshes that did not reach the server.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(30);
/// Pending asks. One per refused generation is enough: more collapse.
const ASKS: usize = 8;

/// What the refresher last published.
#[derive(Clone)]
pub(crate) struct TokenState {
    /// The access token in force; `None` once the session has ended.
    pub access: Option<Arc<str>>,
    /// Bumped by every successful refresh.
    pub generation: u64,
    /// Bumped by every failed refresh, so that waiters stop waiting.
    pub failures: u64,
}

impl fmt::Debug for TokenState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenState")
            .field("live", &self.access.is_some())
            .field("generation", &self.generation)
            .field("failures", &self.failures)
            .finish()
    }
}

/// A handle on the refresher; cheap to clone.
#[derive(Clone)]
pub(crate) struct Session {
    state: watch::Receiver<TokenState>,
    asks: mpsc::Sender<u64>,
}

impl Session {
    /// Spawns the refresher for the session of `pair`; it stops when
    /// `shutdown` changes or every handle is dropped.
    pub fn start(rest: Rest, pair: TokenPair, shutdown: watch::Receiver<bool>) -> Self {
        let (publish, state) = watch::channel(TokenState {
            access: Some(pair.access_token.into()),
            generation: 0,
            failures: 0,
        });
        let (asks, asked) = mpsc::channel(ASKS);
        let refresher = Refresher {
            rest,
            refresh_token: pair.refresh_token,
            due: due_after(pair.expires_in),
            publish,
            asked,
            shutdown,
        };
        tokio::spawn(refresher.run());
        Self { state, asks }
    }

    /// The access token in force and its generation.
    pub fn current(&self) -> Result<(Arc<str>, u64)> {
        let state = self.state.borrow();
        match &state.access {
            Some(token) => Ok((token.clone(), state.generation)),
            None => Err(ended()),
        }
    }

    /// A token newer than generation `refused`: refreshes if nobody has
    /// since. Fails if the refresh fails.
    pub async fn refreshed_after(&self, refused: u64) -> Result<(Arc<str>, u64)> {
        let mut state = self.state.clone();
        let failures = state.borrow().failures;
        // Full: a refresh is already asked for.
        let _ = self.asks.try_send(refused);
        loop {
            {
                let now = state.borrow_and_update();
                match &now.access {
                    None => return Err(ended()),
                    Some(token) if now.generation > refused => {
                        return Ok((token.clone(), now.generation));
                    }
                    Some(_) if now.failures > failures => {
                        return Err(Error::Unavailable("the token refresh failed".into()));
                    }
                    Some(_) => {}
                }
            }
            state.changed().await.map_err(|_| Error::Shutdown)?;
        }
    }

    /// Every change of the token, for the socket to renew in place.
    pub fn watch(&self) -> watch::Receiver<TokenState> {
        self.state.clone()
    }
}

fn ended() -> Error {
    Error::Unauthorized("the session has ended; log in again".into())
}

/// When to refresh a token that lives `expires_in` seconds: at 80% of
/// its life, and at least [`EXPIRY_SLACK`] before its end. The slack
/// matters for short lifetimes: the token's `exp` is whole seconds, so it
/// may end up to a second before `expires_in` says, and the `auth` frame
/// must reach the server before then.
fn due_after(expires_in: u64) -> Instant {
    let life = Duration::from_secs(expires_in);
    let wait = Duration::from_millis(expires_in.saturating_mul(REFRESH_AT_PER_MILLE))
        .min(life.saturating_sub(EXPIRY_SLACK));
    Instant::now() + wait.max(Duration::from_millis(100))
}

struct Refresher {
    rest: Rest,
    /// The only copy of the refresh token in the process.
    refresh_token: String,
    due: Instant,
    publish: watch::Sender<TokenState>,
    asked: mpsc::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

impl Refresher {
    async fn run(mut self) {
        let mut failed_attempts = 0u32;
        let mut lost_once = false;
        loop {
            tokio::select! {
                _ = sleep_until(self.due) => {}
                ask = self.asked.recv() => match ask {
                    None => return,
                    // Already refreshed past the refused token.
                    Some(refused) if refused < self.publish.borrow().generation => continue,
                    Some(_) => {}
                },
                _ = self.shutdown.changed() => return,
            }
            match self.rest.refresh(&self.refresh_token).await {
                Ok(pair) => {
                    failed_attempts = 0;
                    lost_once = false;
                    self.refresh_token = pair.refresh_token;
                    self.due = due_after(pair.expires_in);
                    self.publish.send_modify(|s| {
                        s.access = Some(pair.access_token.into());
                        s.generation += 1;
                    });
                    tracing::debug!("access token refreshed");
                }
                Err(RefreshError::NotSent(e)) => self.retry_later(&e, &mut failed_attempts),
                // The one retry `protocol.md` allows after a lost reply.
                Err(RefreshError::Lost(e)) if !lost_once => {
                    lost_once = true;
                    self.retry_later(&e, &mut failed_attempts);
                }
                Err(RefreshError::Lost(e) | RefreshError::Refused(e)) => {
                    tracing::warn!(error = %e, "the session cannot be refreshed; log in again");
                    self.publish.send_modify(|s| s.access = None);
                    return;
                }
            }
        }
    }

    fn retry_later(&mut self, error: &Error, attempts: &mut u32) {
        let wait = match error {
            Error::RateLimited { retry_after } => *retry_after,
            _ => crate::backoff::full_jitter(RETRY_BASE, RETRY_CAP, *attempts),
        };
        *attempts = attempts.saturating_add(1);
        tracing::warn!(error = %error, ?wait, "token refresh failed; retrying");
        self.due = Instant::now() + wait;
        self.publish.send_modify(|s| s.failures += 1);
    }
}
