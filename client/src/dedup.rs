//! Bounded memory of what was already handed to the application, to drop
//! what the server delivers twice.
//!
//! Two lists, in [`crate::inbox::Inbox`]: server message ids (a copy
//! redelivered after a reconnect before its ack settled), and (sender,
//! client message id) pairs (a send stored twice under two server ids: its
//! sender retried after a lost reply without a `client_id`, or sent the
//! message anew). Each keeps the most recent
//! [`REMEMBERED`] entries: 4,096 × (16 + 32 bytes and the set's overhead),
//! about half a MiB for both. A duplicate older than that is shown again;
//! the server redelivers only unacknowledged copies, and a sender retries
//! within seconds, so either is far inside the window.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// Entries each list keeps.
pub(crate) const REMEMBERED: usize = 4096;

/// A set that forgets its oldest entry past its capacity.
pub(crate) struct Seen<K> {
    set: HashSet<K>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone> Seen<K> {
    pub fn new(capacity: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub fn contains(&self, key: &K) -> bool {
        self.set.contains(key)
    }

    /// Remembers `key`; `false` if it was already there.
    pub fn insert(&mut self, key: K) -> bool {
        if !self.set.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_latest_and_forgets_the_oldest() {
        let mut seen = Seen::new(3);
        assert!(seen.insert(1));
        assert!(!seen.insert(1));
        for k in 2..=4 {
            assert!(seen.insert(k));
        }
        assert!(!seen.contains(&1), "the oldest went");
        assert!((2..=4).all(|k| seen.contains(&k)));
        assert_eq!(seen.set.len(), 3);
    }
}
