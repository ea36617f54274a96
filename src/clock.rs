//! [`Clock`]: the wall clock as a dependency.
//!
//! What is written to the database as a time (a wake-up's `due_at`, when
//! one was sent) comes from a [`Clock`], so that the logic deciding it can
//! be tested without sleeping: [`SystemClock`] in production; in unit
//! tests, [`TestClock`] follows tokio's clock, which a test pauses and
//! advances (`#[tokio::test(start_paused = true)]`), so that timers and
//! the times written agree. Waiting itself is tokio's (`sleep`,
//! `interval`).

use chrono::{DateTime, Utc};

pub trait Clock: Send + Sync {
    /// Now, at the precision the stores keep (milliseconds).
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        crate::store::now()
    }
}

/// A clock that starts at a fixed time and moves with tokio's (paused)
/// clock.
#[cfg(test)]
pub struct TestClock {
    base: DateTime<Utc>,
    start: tokio::time::Instant,
}

#[cfg(test)]
impl TestClock {
    pub fn new() -> Self {
        Self {
            base: DateTime::from_timestamp_millis(1_800_000_000_000).expect("in range"),
            start: tokio::time::Instant::now(),
        }
    }
}

#[cfg(test)]
impl Default for TestClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = chrono::TimeDelta::from_std(self.start.elapsed()).unwrap_or_default();
        let t = self.base + elapsed;
        DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
    }
}
