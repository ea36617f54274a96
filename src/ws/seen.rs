//! The ids a clustered connection has already sent, to drop a message that
//! arrives a second time (see [`crate::cluster`]): a message from another
//! node can be in the backlog read and also arrive live, and a re-read
//! after lost broker traffic finds messages already pushed. Ids of
//! different nodes interleave, so "at most the last backlog id" is not a
//! repeat there; only the exact id tells.
//!
//! Bounded by age and count. An id is kept while its time (a UUIDv7's
//! first 48 bits) is within [`WINDOW`]: a live copy arrives within
//! milliseconds of its commit, and a re-read starts at most the length of
//! the outage plus [`crate::cluster::REREAD_MARGIN`] back. Past [`CAP`]
//! ids, the older half goes. A repeat that outlives either (an outage of
//! minutes, a socket sent thousands of messages in a minute) is sent
//! again; clients de-duplicate by id as they do across reconnects.
//! An idle socket's set holds nothing and allocates nothing.

use std::collections::HashSet;
use std::time::Duration;

use uuid::Uuid;

use crate::store;

/// How long an id is remembered, by its own time.
const WINDOW: Duration = Duration::from_secs(120);

/// The most ids remembered: about 400 KiB at most, for a socket receiving
/// more than a hundred messages a second.
const CAP: usize = 16 * 1024;

#[derive(Default)]
pub(super) struct Seen {
    ids: HashSet<Uuid>,
    /// The size at which the next insert prunes.
    prune_at: usize,
}

impl Seen {
    #[cfg(test)]
    fn contains(&self, id: Uuid) -> bool {
        self.ids.contains(&id)
    }

    /// Remembers `id`; returns false if it was already there.
    pub(super) fn insert(&mut self, id: Uuid) -> bool {
        if self.ids.len() >= self.prune_at {
            self.prune(chrono::Utc::now() - WINDOW);
        }
        self.ids.insert(id)
    }

    fn prune(&mut self, cutoff: chrono::DateTime<chrono::Utc>) {
        self.ids.retain(|id| store::id_time(*id) >= cutoff);
        if self.ids.len() >= CAP {
            // Keep the newer half.
            let mut times: Vec<i64> = self
                .ids
                .iter()
                .map(|id| store::id_time(*id).timestamp_millis())
                .collect();
            let middle = times.len() / 2;
            let (_, median, _) = times.select_nth_unstable(middle);
            let median = *median;
            self.ids
                .retain(|id| store::id_time(*id).timestamp_millis() >= median);
            if self.ids.len() >= CAP {
                // Most ids in one millisecond: drop that one too.
                self.ids
                    .retain(|id| store::id_time(*id).timestamp_millis() > median);
            }
        }
        if self.ids.is_empty() {
            self.ids.shrink_to_fit();
        }
        self.prune_at = (self.ids.len() * 2).clamp(256, CAP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id_at(millis_ago: i64) -> Uuid {
        let millis = (chrono::Utc::now().timestamp_millis() - millis_ago) as u128;
        Uuid::from_u128((millis << 80) | (0x7 << 76) | (rand::random::<u64>() as u128))
    }

    #[test]
    fn remembers_recent_ids_and_forgets_old_ones() {
        let mut seen = Seen::default();
        let old = id_at(WINDOW.as_millis() as i64 + 60_000);
        assert!(seen.insert(old));
        assert!(!seen.insert(old));
        for _ in 0..300 {
            seen.insert(id_at(0));
        }
        // The prune at 256 dropped the old id, not the recent ones.
        assert!(!seen.contains(old));
        assert!(seen.ids.len() >= 299);
    }

    #[test]
    fn never_holds_more_than_the_cap() {
        let mut seen = Seen::default();
        for n in 0..(3 * CAP) {
            seen.insert(id_at((3 * CAP - n) as i64 / 100));
        }
        assert!(seen.ids.len() <= CAP);
    }
}
