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
//!
//! An application that stores the session to resume it later
//! ([`SessionTokens`], [`Client::resume`](crate::Client::resume)) is told
//! of every new pair by a listener the refresher calls before it uses the
//! new access token: a process stopped right after a refresh has already
//! stored the refresh token that replaced the spent one. This process still
//! presents a refresh token from the refresher alone.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use crate::error::{Error, Result};
use crate::rest::{RefreshError, Rest};
use crate::wire::TokenPair;

/// A session as an application stores it to resume later without the
/// password ([`Client::resume`](crate::Client::resume)): keep it where only
/// this device's user can read it, and store it again whenever it changes
/// ([`Client::on_session_tokens`](crate::Client::on_session_tokens)): each
/// refresh spends the refresh token, and presenting a spent one again ends
/// every session of the account. One process at a time may use it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionTokens {
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token ends.
    pub expires_at: DateTime<Utc>,
}

impl SessionTokens {
    pub(crate) fn from_pair(pair: TokenPair) -> Self {
        let life = i64::try_from(pair.expires_in)
            .ok()
            .and_then(chrono::TimeDelta::try_seconds)
            .unwrap_or(chrono::TimeDelta::MAX);
        Self {
            access_token: pair.access_token,
            refresh_token: pair.refresh_token,
            expires_at: Utc::now()
                .checked_add_signed(life)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }

    /// How long the access token has left (zero once it has ended).
    pub fn remaining(&self) -> Duration {
        (self.expires_at - Utc::now()).to_std().unwrap_or_default()
    }
}

impl fmt::Debug for SessionTokens {
    // Never the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTokens")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Called with every new pair; see [`Session::set_listener`].
pub(crate) type Listener = Box<dyn Fn(&SessionTokens) + Send + Sync>;

/// The pair in force, for the application to store, and who to tell when
/// it changes. Locked only in synchronous code, never across an `.await`.
struct Stored {
    tokens: SessionTokens,
    listener: Option<Listener>,
}

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
    stored: Arc<Mutex<Stored>>,
}

impl Session {
    /// Spawns the refresher for the session of `tokens`; it stops when
    /// `shutdown` changes or every handle is dropped.
    pub fn start(rest: Rest, tokens: SessionTokens, shutdown: watch::Receiver<bool>) -> Self {
        let (publish, state) = watch::channel(TokenState {
            access: Some(tokens.access_token.as_str().into()),
            generation: 0,
            failures: 0,
        });
        let (asks, asked) = mpsc::channel(ASKS);
        let stored = Arc::new(Mutex::new(Stored {
            tokens: tokens.clone(),
            listener: None,
        }));
        let refresher = Refresher {
            rest,
            refresh_token: tokens.refresh_token.clone(),
            due: due_after(tokens.remaining()),
            publish,
            asked,
            shutdown,
            stored: stored.clone(),
        };
        tokio::spawn(refresher.run());
        Self {
            state,
            asks,
            stored,
        }
    }

    /// The pair in force, to store.
    pub fn tokens(&self) -> SessionTokens {
        lock(&self.stored).tokens.clone()
    }

    /// Calls `listener` with the pair in force now, then with every new
    /// one, under the lock the refresher takes to publish it: no refresh
    /// falls between the two.
    pub fn set_listener(&self, listener: Listener) {
        let mut stored = lock(&self.stored);
        listener(&stored.tokens);
        stored.listener = Some(listener);
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

fn lock(stored: &Mutex<Stored>) -> std::sync::MutexGuard<'_, Stored> {
    // A listener that panicked leaves the pair whole.
    stored.lock().unwrap_or_else(|p| p.into_inner())
}

fn ended() -> Error {
    Error::Unauthorized("the session has ended; log in again".into())
}

/// When to refresh a token that lives `life` from now: at 80% of it, and
/// at least [`EXPIRY_SLACK`] before its end. The slack matters for short
/// lifetimes: the token's `exp` is whole seconds, so it may end up to a
/// second before `expires_in` says, and the `auth` frame must reach the
/// server before then. A resumed token's `life` is what it has left.
fn due_after(life: Duration) -> Instant {
    let millis = u64::try_from(life.as_millis()).unwrap_or(u64::MAX);
    let wait = Duration::from_micros(millis.saturating_mul(REFRESH_AT_PER_MILLE))
        .min(life.saturating_sub(EXPIRY_SLACK));
    Instant::now() + wait.max(Duration::from_millis(100))
}

struct Refresher {
    rest: Rest,
    /// The refresh token this process presents: nothing else in it does.
    /// (`stored` holds a copy for the application to keep, never sent.)
    refresh_token: String,
    due: Instant,
    publish: watch::Sender<TokenState>,
    asked: mpsc::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    stored: Arc<Mutex<Stored>>,
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
                    let tokens = SessionTokens::from_pair(pair);
                    self.refresh_token = tokens.refresh_token.clone();
                    self.due = due_after(tokens.remaining());
                    let access: Arc<str> = tokens.access_token.as_str().into();
                    {
                        // Stored before it is used, so that a process
                        // stopped from here on has it.
                        let mut stored = lock(&self.stored);
                        if let Some(listener) = &stored.listener {
                            listener(&tokens);
                        }
                        stored.tokens = tokens;
                    }
                    self.publish.send_modify(|s| {
                        s.access = Some(access);
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
