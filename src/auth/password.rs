//! Password hashing with argon2id, off the async runtime, bounded, and
//! shared fairly between callers.
//!
//! Each hash takes a core for tens of milliseconds and 19 MiB of memory
//! (OWASP's argon2id parameters, the `argon2` crate's defaults: [`Cost`]
//! says when anything else is used). Hashes run on
//! tokio's blocking pool behind a semaphore of about the core count, so a
//! login flood waits its turn instead of starving message delivery or
//! exhausting memory.
//!
//! That semaphore is first come, first served, so one caller with many
//! requests in flight would fill its queue and make everyone else's login
//! wait until it timed out. Every hash is therefore done for a [`Caller`]
//! (an account, or a client address), and a caller has at most one hash
//! queued or running: the queue holds one entry per caller, and a flood
//! from one caller waits behind itself (an address, which many users may
//! share behind a NAT) or is refused (an account, which has no reason to
//! confirm two passwords at once).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, Params};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

use crate::error::Error;
use crate::metrics::{Limited, Metrics};

/// How long a request waits for a hashing slot before it is refused with
/// 503: under a login flood, queueing longer only piles up requests. It
/// covers the wait behind the caller's own earlier hash too.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// What an account told its hash is busy waits before it tries again: about
/// the time a hash takes when the queue is short.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// The argon2id parameters new hashes are made with. A stored hash names
/// its own (a PHC string), and is verified with those, whatever the cost
/// now: a change of cost never locks anyone out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// OWASP's argon2id parameters (m=19456 KiB, t=2, p=1): the floor for
    /// real accounts, and the only cost a release build uses.
    Owasp,
    /// argon2's smallest parameters (m=8 KiB, t=1, p=1), microseconds a
    /// hash: for the test suite, which signs up thousands of accounts and
    /// would otherwise spend most of its time hashing. Reachable only
    /// through `SEALPOST_INSECURE_TEST_HASHING`, which release builds
    /// refuse (see `Config::insecure_test_hashing`).
    InsecureForTests,
}

impl Cost {
    fn params(self) -> Params {
        match self {
            Cost::Owasp => Params::default(),
            Cost::InsecureForTests => Params::new(Params::MIN_M_COST, Params::MIN_T_COST, 1, None)
                .expect("argon2's own minimum parameters"),
        }
    }
}

/// Whom a hash is done for: the queue holds at most one hash per caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A signed-in account confirming its password. A second hash while
    /// its first is queued or running is refused (429): a client confirms
    /// one password at a time, and a guesser must not get its guesses
    /// checked in parallel past the lockout (see [`crate::auth::confirm`]).
    Account(Uuid),
    /// A client address, keyed as per-address limits key it (sign-up,
    /// login, device addition). A second hash waits behind the first: many
    /// users may share one address (a NAT, a proxy).
    Address(IpAddr),
}

pub struct Passwords {
    /// One permit per hash allowed to run. The permit moves into the
    /// blocking task, so it is held while the hash runs even if the client
    /// hangs up and its request is dropped.
    permits: Arc<Semaphore>,
    /// The callers with a hash queued or running, each with the one-permit
    /// semaphore its next hash waits on. An entry lives as long as a
    /// request of its caller holds a [`Place`], so the map is bounded by
    /// the requests in flight (connection caps, per-address rate limits).
    lanes: Arc<DashMap<Caller, Lane>>,
    /// A hash of a random password with the live parameters: unknown
    /// usernames are verified against it so that they take as long to reject
    /// as a wrong password and do not reveal which accounts exist.
    dummy_hash: Arc<str>,
    /// Records how long each caller waited for a permit.
    metrics: Arc<Metrics>,
    /// What new hashes cost.
    cost: Cost,
}

/// One caller's line: at most one of its hashes holds `turn` at a time.
struct Lane {
    turn: Arc<Semaphore>,
    /// Requests of this caller holding a [`Place`].
    members: usize,
}

/// A request's place in its caller's lane; leaving the lane when dropped
/// (the hash has run, or the request gave up) removes the lane once empty.
struct Place {
    lanes: Arc<DashMap<Caller, Lane>>,
    caller: Caller,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Entry::Occupied(mut lane) = self.lanes.entry(self.caller) {
            lane.get_mut().members -= 1;
            if lane.get().members == 0 {
                lane.remove();
            }
        }
    }
}

/// What a running hash holds until it is done: its caller's place and turn,
/// and a hashing permit. It moves into the blocking task.
struct Slot {
    _permit: OwnedSemaphorePermit,
    _turn: OwnedSemaphorePermit,
    _place: Place,
}

impl Passwords {
    /// Computes the dummy hash, so call it once at start-up.
    pub fn new(concurrency: usize, cost: Cost, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let random: [u8; 32] = rand::random();
        let dummy_hash = hash(cost, &random)?.into();
        Ok(Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            lanes: Arc::new(DashMap::new()),
            dummy_hash,
            metrics,
            cost,
        })
    }

    /// Joins `caller`'s lane, or refuses an account whose lane is taken.
    fn join(&self, caller: Caller) -> Result<(Place, Arc<Semaphore>), Error> {
        let mut lane = self.lanes.entry(caller).or_insert_with(|| Lane {
            turn: Arc::new(Semaphore::new(1)),
            members: 0,
        });
        if lane.members > 0 && matches!(caller, Caller::Account(_)) {
            drop(lane);
            self.metrics.rate_limited(Limited::Password);
            return Err(Error::RateLimited {
                retry_after: BUSY_RETRY,
            });
        }
        lane.members += 1;
        let turn = lane.turn.clone();
        drop(lane);
        let place = Place {
            lanes: self.lanes.clone(),
            caller,
        };
        Ok((place, turn))
    }

    /// Waits for `caller`'s turn, then for a hashing permit.
    async fn slot(&self, caller: Caller) -> Result<Slot, Error> {
        let (place, turn) = self.join(caller)?;
        let queued = Instant::now();
        let permits = self.permits.clone();
        let acquired = tokio::time::timeout(QUEUE_TIMEOUT, async move {
            // The caller's own turn first: only then does it take a place
            // in the shared queue, one per caller.
            let turn = turn.acquire_owned().await?;
            let permit = permits.acquire_owned().await?;
            Ok::<_, tokio::sync::AcquireError>((turn, permit))
        })
        .await;
        // A refused caller waited too: it lands in the last bucket.
        self.metrics.hash_wait.record(queued.elapsed());
        match acquired {
            Ok(Ok((turn, permit))) => Ok(Slot {
                _permit: permit,
                _turn: turn,
                _place: place,
            }),
            Ok(Err(_)) => Err(Error::Internal(anyhow::anyhow!("hasher closed"))),
            Err(_) => {
                tracing::warn!("password hashing queue full: refusing a request");
                Err(Error::Unavailable)
            }
        }
    }

    /// Hashes `password` into a PHC string with a fresh random salt.
    pub async fn hash(&self, caller: Caller, password: String) -> Result<String, Error> {
        let slot = self.slot(caller).await?;
        let cost = self.cost;
        let hashed = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            hash(cost, password.as_bytes())
        })
        .await
        .context("hash task failed")??;
        Ok(hashed)
    }

    /// Whether `password` matches `stored`. With no stored hash (unknown
    /// user) it burns the same time against the dummy hash and says no.
    pub async fn verify(
        &self,
        caller: Caller,
        password: String,
        stored: Option<String>,
    ) -> Result<bool, Error> {
        let slot = self.slot(caller).await?;
        let known = stored.is_some();
        let phc: Arc<str> = stored.map_or_else(|| self.dummy_hash.clone(), Into::into);
        let matches = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            verify(password.as_bytes(), &phc)
        })
        .await
        .context("verify task failed")??;
        Ok(known && matches)
    }
}

fn hash(cost: Cost, password: &[u8]) -> anyhow::Result<String> {
    let phc = Argon2::from(cost.params())
        .hash_password(password)
        .map_err(|e| anyhow::anyhow!("argon2 hash failed: {e}"))?;
    Ok(phc.to_string())
}

/// Checks `password` against `phc` with the parameters `phc` names.
fn verify(password: &[u8], phc: &str) -> anyhow::Result<bool> {
    let parsed =
        PasswordHash::new(phc).map_err(|e| anyhow::anyhow!("stored hash unreadable: {e}"))?;
    Ok(Argon2::default().verify_password(password, &parsed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passwords(concurrency: usize) -> Arc<Passwords> {
        Arc::new(Passwords::new(concurrency, Cost::Owasp, Arc::new(Metrics::disabled())).unwrap())
    }

    #[tokio::test]
    async fn each_cost_verifies_the_others_hashes() {
        let owasp = passwords(1);
        let cheap =
            Passwords::new(1, Cost::InsecureForTests, Arc::new(Metrics::disabled())).unwrap();
        let caller = Caller::Account(Uuid::new_v4());
        let cheap_phc = cheap.hash(caller, "pw".into()).await.unwrap();
        assert!(
            cheap_phc.starts_with("$argon2id$v=19$m=8,t=1,p=1$"),
            "{cheap_phc}"
        );
        let owasp_phc = owasp.hash(caller, "pw".into()).await.unwrap();
        for (verifier, phc) in [(&*owasp, &cheap_phc), (&cheap, &owasp_phc)] {
            assert!(
                verifier
                    .verify(caller, "pw".into(), Some(phc.clone()))
                    .await
                    .unwrap()
            );
            assert!(
                !verifier
                    .verify(caller, "no".into(), Some(phc.clone()))
                    .await
                    .unwrap()
            );
        }
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_fail() {
        let passwords = passwords(2);
        let caller = Caller::Account(Uuid::new_v4());
        let phc = passwords
            .hash(caller, "correct horse".into())
            .await
            .unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            passwords
                .verify(caller, "correct horse".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        assert!(
            !passwords
                .verify(caller, "wrong horse".into(), Some(phc))
                .await
                .unwrap()
        );
        let address = Caller::Address([192, 0, 2, 1].into());
        assert!(
            !passwords
                .verify(address, "anything".into(), None)
                .await
                .unwrap()
        );
        assert!(passwords.lanes.is_empty(), "a lane outlived its hashes");
    }

    #[tokio::test]
    async fn an_account_hashes_one_at_a_time() {
        let passwords = passwords(2);
        let caller = Caller::Account(Uuid::new_v4());
        let first = tokio::spawn({
            let passwords = passwords.clone();
            async move { passwords.verify(caller, "guess one".into(), None).await }
        });
        // The first holds the account's lane until its hash has run.
        while passwords.lanes.is_empty() {
            tokio::task::yield_now().await;
        }
        match passwords.verify(caller, "guess two".into(), None).await {
            Err(Error::RateLimited { retry_after }) => assert_eq!(retry_after, BUSY_RETRY),
            other => panic!("expected rate_limited, got {other:?}"),
        }
        // Another account is not held up.
        let other = Caller::Account(Uuid::new_v4());
        assert!(!passwords.verify(other, "x".into(), None).await.unwrap());
        assert!(!first.await.unwrap().unwrap());
        // Done: the account may hash again.
        assert!(
            !passwords
                .verify(caller, "guess three".into(), None)
                .await
                .unwrap()
        );
        assert!(passwords.lanes.is_empty());
    }

    #[tokio::test]
    async fn a_flood_from_one_address_waits_behind_itself() {
        // One hash at a time, so the order of completion is the queue's.
        let passwords = passwords(1);
        let flood = Caller::Address([198, 51, 100, 1].into());
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for n in 0..8 {
            let (passwords, done) = (passwords.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                passwords.verify(flood, "x".into(), None).await.unwrap();
                done.lock().unwrap().push(format!("flood {n}"));
            }));
        }
        while passwords
            .lanes
            .get(&flood)
            .is_none_or(|lane| lane.members < 8)
        {
            tokio::task::yield_now().await;
        }
        let other = Caller::Address([203, 0, 113, 7].into());
        assert!(!passwords.verify(other, "x".into(), None).await.unwrap());
        done.lock().unwrap().push("other".to_owned());
        for task in tasks {
            task.await.unwrap();
        }
        let done = done.lock().unwrap().clone();
        assert_eq!(done.len(), 9, "{done:?}");
        // Behind at most the flood's running hash and the one that had
        // already taken its place in the queue, not behind all eight.
        let position = done.iter().position(|d| d == "other").unwrap();
        assert!(
            position <= 2,
            "the other address waited behind the flood: {done:?}"
        );
        assert!(passwords.lanes.is_empty());
    }
}
