//! Password hashing with argon2id, off the async runtime and bounded.
//!
//! Each hash takes a core for tens of milliseconds and 19 MiB of memory
//! (OWASP's argon2id parameters, the `argon2` crate's defaults). Hashes run on
//! tokio's blocking pool behind a semaphore of about the core count, so a
//! login flood waits its turn instead of starving message delivery or
//! exhausting memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;
use crate::metrics::Metrics;

/// How long a request waits for a hashing slot before it is refused with
/// 503: under a login flood, queueing longer only piles up requests.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Passwords {
    /// One permit per hash allowed to run. The permit moves into the
    /// blocking task, so it is held while the hash runs even if the client
    /// hangs up and its request is dropped.
    permits: Arc<Semaphore>,
    /// A hash of a random password with the live parameters: unknown
    /// usernames are verified against it so that they take as long to reject
    /// as a wrong password and do not reveal which accounts exist.
    dummy_hash: Arc<str>,
    /// Records how long each caller waited for a permit.
    metrics: Arc<Metrics>,
}

impl Passwords {
    /// Computes the dummy hash, so call it once at start-up.
    pub fn new(concurrency: usize, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let random: [u8; 32] = rand::random();
        let dummy_hash = hash(&random)?.into();
        Ok(Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy_hash,
            metrics,
        })
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, Error> {
        let queued = Instant::now();
        let permit =
            tokio::time::timeout(QUEUE_TIMEOUT, self.permits.clone().acquire_owned()).await;
        // A refused caller waited too: it lands in the last bucket.
        self.metrics.hash_wait.record(queued.elapsed());
        match permit {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::Internal(anyhow::anyhow!("hasher closed"))),
            Err(_) => {
                tracing::warn!("password hashing queue full: refusing a request");
                Err(Error::Unavailable)
            }
        }
    }

    /// Hashes `password` into a PHC string with a fresh random salt.
    pub async fn hash(&self, password: String) -> Result<String, Error> {
        let permit = self.permit().await?;
        let hashed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            hash(password.as_bytes())
        })
        .await
        .context("hash task failed")??;
        Ok(hashed)
    }

    /// Whether `password` matches `stored`. With no stored hash (unknown
    /// user) it burns the same time against the dummy hash and says no.
    pub async fn verify(&self, password: String, stored: Option<String>) -> Result<bool, Error> {
        let permit = self.permit().await?;
        let known = stored.is_some();
        let phc: Arc<str> = stored.map_or_else(|| self.dummy_hash.clone(), Into::into);
        let matches = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            verify(password.as_bytes(), &phc)
        })
        .await
        .context("verify task failed")??;
        Ok(known && matches)
    }
}

fn hash(password: &[u8]) -> anyhow::Result<String> {
    let phc = Argon2::default()
        .hash_password(password)
        .map_err(|e| anyhow::anyhow!("argon2 hash failed: {e}"))?;
    Ok(phc.to_string())
}

fn verify(password: &[u8], phc: &str) -> anyhow::Result<bool> {
    let parsed =
        PasswordHash::new(phc).map_err(|e| anyhow::anyhow!("stored hash unreadable: {e}"))?;
    Ok(Argon2::default().verify_password(password, &parsed).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_fail() {
        let passwords = Passwords::new(2, Arc::new(Metrics::disabled())).unwrap();
        let phc = passwords.hash("correct horse".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            passwords
                .verify("correct horse".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        assert!(
            !passwords
                .verify("wrong horse".into(), Some(phc))
                .await
                .unwrap()
        );
        assert!(!passwords.verify("anything".into(), None).await.unwrap());
    }
}
