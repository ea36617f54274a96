//! Full-jitter exponential backoff (the AWS architecture blog's "full
//! jitter"): wait a uniformly random time between zero and
//! `min(cap, base * 2^attempt)`, so that many clients cut off at once (a
//! server restart) come back spread over the window instead of together.

use std::time::Duration;

use crypto_box::aead::OsRng;
use crypto_box::aead::rand_core::RngCore;

/// The wait before retry number `attempt` (0 for the first retry).
pub(crate) fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap);
    let millis = ceiling.as_millis() as u64;
    if millis == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(OsRng.next_u64() % (millis + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_the_growing_window_and_the_cap() {
        let (base, cap) = (Duration::from_millis(250), Duration::from_secs(30));
        for attempt in 0..40 {
            let ceiling = (base * 2u32.saturating_pow(attempt.min(20))).min(cap);
            for _ in 0..50 {
                assert!(full_jitter(base, cap, attempt) <= ceiling);
            }
        }
        // Spread, not a fixed wait.
        let waits: std::collections::HashSet<_> =
            (0..50).map(|_| full_jitter(base, cap, 10)).collect();
        assert!(waits.len() > 10);
    }
}
