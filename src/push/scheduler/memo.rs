//! What this node remembers of the wake-ups it scheduled: enough to not
//! write the database again for a device that has one pending or cooling
//! (50 messages to an offline phone are one write, not 50).
//!
//! The database is the truth ([`crate::store::push`]); the memo only spares
//! it writes. An entry forgotten early (expired, evicted) costs one write
//! that the store answers "coalesced". An entry kept too long would hide a
//! wake-up, so entries are short-lived: they end when the device shows up
//! here, when a wake-up is given up or its target dropped, and at the
//! latest after their time to live (see [`super::Timing::memo_ttl`]).

use std::collections::HashMap;
use std::time::SystemTime;

use tokio::time::Instant;
use uuid::Uuid;

use crate::store::DeviceId;

pub type Key = (Uuid, DeviceId);

/// Devices remembered at most. An entry is about 64 bytes, so 100,000 is
/// some 6 MiB; past it expired entries are dropped, and if none has expired
/// everything is forgotten (each device then costs one more write, which
/// the store coalesces).
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Not written again before this.
    until: Instant,
    /// Whether what is pending or cooling is urgent: a non-urgent one does
    /// not cover an urgent send (which must upgrade it).
    urgent: bool,
    /// The first commit it was scheduled for, for the commit-to-answer
    /// latency.
    since: Option<SystemTime>,
}

#[derive(Default)]
pub struct Memo {
    entries: HashMap<Key, Entry>,
}

impl Memo {
    /// Whether a wake-up of at least this urgency is known pending or
    /// cooling at `now`.
    pub fn covers(&self, key: Key, urgent: bool, now: Instant) -> bool {
        self.entries
            .get(&key)
            .is_some_and(|e| e.until > now && (e.urgent || !urgent))
    }

    /// Remembers a wake-up pending or cooling until `until`. Keeps the
    /// earlier `since`, and an urgent entry stays urgent.
    pub fn set(&mut self, key: Key, urgent: bool, until: Instant, since: Option<SystemTime>) {
        if self.entries.len() >= MAX_ENTRIES && !self.entries.contains_key(&key) {
            let now = Instant::now();
            self.entries.retain(|_, e| e.until > now);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        let entry = self.entries.entry(key).or_insert(Entry {
            until,
            urgent,
            since,
        });
        entry.until = entry.until.max(until);
        entry.urgent |= urgent;
        entry.since = match (entry.since, since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// The wake-up was answered: its latency's start, which is taken (a
    /// later wake-up of the device measures from its own commit).
    pub fn take_since(&mut self, key: Key) -> Option<SystemTime> {
        self.entries.get_mut(&key).and_then(|e| e.since.take())
    }

    /// Extends an entry (a wake-up just sent cools from now).
    pub fn cool(&mut self, key: Key, urgent: bool, until: Instant) {
        self.set(key, urgent, until, None);
    }

    pub fn forget(&mut self, key: Key) {
        self.entries.remove(&key);
    }

    /// Drops expired entries.
    pub fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.until > now);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}
