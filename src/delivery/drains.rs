//! The drain budget: stored bytes of backlog pages in memory, server-wide
//! (`SEALPOST_DRAIN_BUDGET_BYTES`), and the share of it one account and one
//! client address may hold (`SEALPOST_DRAIN_SHARE_BYTES`).
//!
//! A page holds its bytes until it is written (a socket's) or encoded (a
//! poll's). Without shares, sockets that read slowly held the whole budget
//! with a few large pages, and every other device's poll and drain waited
//! for room until it was refused. With them, a client that holds its share
//! waits on its own share only: room in the budget is left to the others.
//! A page takes its account's share, then its address's, then the budget;
//! it holds the three until it is dropped.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use uuid::Uuid;

/// The share of the budget one holder gets when none is configured: a
/// sixteenth, so that it takes sixteen accounts on sixteen addresses to
/// fill the budget, while one holder still drains a maximal 4 MiB page at
/// the default 64 MiB.
pub const DEFAULT_SHARE_DIVISOR: usize = 16;

/// Who a page is charged to, besides the server-wide budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Holder {
    Account(Uuid),
    /// A client's address, keyed as per-address limits key it (an IPv6
    /// address on its /64).
    Address(IpAddr),
}

pub struct DrainBudget {
    total: Arc<Semaphore>,
    /// What one holder may take, at most the budget.
    share: usize,
    /// The share of each holder that holds or waits for some: an entry
    /// lives only while one of its pages is in memory or waits for room, so
    /// the map is bounded by the pages in memory and the reads waiting (one
    /// per socket, one per poll).
    shares: Arc<DashMap<Holder, Arc<Semaphore>>>,
}

/// A share taken: given back, and its holder forgotten if no one else uses
/// it, when dropped.
struct Share {
    // Before `entry`: fields drop in order, and the entry is forgotten only
    // once no permit refers to it.
    _permit: OwnedSemaphorePermit,
    _entry: Entry,
}

/// A holder's semaphore, in use.
struct Entry {
    holder: Holder,
    /// `None` only while it is dropped.
    semaphore: Option<Arc<Semaphore>>,
    shares: Arc<DashMap<Holder, Arc<Semaphore>>>,
}

impl Entry {
    fn semaphore(&self) -> Arc<Semaphore> {
        self.semaphore.clone().expect("set until dropped")
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // Every permit and every waiter holds a clone; the map holds one.
        // Checked under the shard's lock, which every new user takes to
        // clone it, so no one can pick it up while it goes.
        drop(self.semaphore.take());
        self.shares
            .remove_if(&self.holder, |_, s| Arc::strong_count(s) == 1);
    }
}

/// What a page holds of the budget and of its holders' shares.
pub struct Held {
    _shares: Vec<Share>,
    _total: OwnedSemaphorePermit,
}

/// Shares taken, waiting for the budget.
pub struct Shares(Vec<Share>);

impl DrainBudget {
    /// A budget of `budget` bytes; `share` bytes per holder (0 for
    /// [`DEFAULT_SHARE_DIVISOR`]), at most the budget.
    pub fn new(budget: usize, share: usize) -> Self {
        let budget = budget.clamp(1, Semaphore::MAX_PERMITS);
        let share = if share == 0 {
            budget / DEFAULT_SHARE_DIVISOR
        } else {
            share
        };
        Self {
            total: Arc::new(Semaphore::new(budget)),
            share: share.clamp(1, budget),
            shares: Arc::default(),
        }
    }

    /// What one holder may take; the most a page may weigh.
    pub fn share(&self) -> usize {
        self.share
    }

    /// The budget not taken now.
    pub fn available(&self) -> usize {
        self.total.available_permits()
    }

    fn entry(&self, holder: Holder) -> Entry {
        let semaphore = self
            .shares
            .entry(holder)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)))
            .clone();
        Entry {
            holder,
            semaphore: Some(semaphore),
            shares: self.shares.clone(),
        }
    }

    /// Takes `weight` (at most a share) from each holder's share if they
    /// have it now; `None` if one of them does not.
    pub fn try_shares(&self, holders: &[Holder], weight: u32) -> Option<Shares> {
        let mut taken = Vec::with_capacity(holders.len());
        for &holder in holders {
            let entry = self.entry(holder);
            match entry.semaphore().try_acquire_many_owned(weight) {
                Ok(permit) => taken.push(Share {
                    _permit: permit,
                    _entry: entry,
                }),
                Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => return None,
            }
        }
        Some(Shares(taken))
    }

    /// Waits for `weight` of each holder's share, in the order given (the
    /// same for every page, so no two pages wait on each other).
    pub async fn shares(&self, holders: &[Holder], weight: u32) -> Shares {
        let mut taken = Vec::with_capacity(holders.len());
        for &holder in holders {
            let entry = self.entry(holder);
            let permit = entry
                .semaphore()
                .acquire_many_owned(weight)
                .await
                .expect("a share is never closed");
            taken.push(Share {
                _permit: permit,
                _entry: entry,
            });
        }
        Shares(taken)
    }

    /// Waits for `weight` of the budget, for a page that holds `shares`.
    pub async fn take(&self, shares: Shares, weight: u32) -> Held {
        let total = self
            .total
            .clone()
            .acquire_many_owned(weight)
            .await
            .expect("the budget is never closed");
        Held {
            _shares: shares.0,
            _total: total,
        }
    }

    /// Holders with a share in use or awaited.
    #[cfg(test)]
    fn holders(&self) -> usize {
        self.shares.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(last: u8) -> Holder {
        Holder::Address(IpAddr::from([192, 0, 2, last]))
    }

    #[test]
    fn the_default_share_is_a_sixteenth_and_never_more_than_the_budget() {
        assert_eq!(DrainBudget::new(64 << 20, 0).share(), 4 << 20);
        assert_eq!(DrainBudget::new(1 << 20, 8 << 20).share(), 1 << 20);
        assert_eq!(DrainBudget::new(1 << 20, 4096).share(), 4096);
    }

    #[tokio::test]
    async fn one_holder_at_its_share_leaves_the_budget_to_others() {
        let budget = DrainBudget::new(1000, 100);
        let attacker = [Holder::Account(Uuid::from_u128(1)), addr(1)];
        let held = budget
            .take(budget.try_shares(&attacker, 100).unwrap(), 100)
            .await;
        // Another page of the same account, from another address: over
        // the account's share.
        let same_account = [attacker[0], addr(2)];
        assert!(budget.try_shares(&same_account, 1).is_none());
        // Another account on the same address: over the address's share.
        let same_address = [Holder::Account(Uuid::from_u128(2)), addr(1)];
        assert!(budget.try_shares(&same_address, 1).is_none());
        let waiting = budget.shares(&same_address, 50);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), waiting)
                .await
                .is_err()
        );
        // Anyone else has the rest of the budget.
        let other = [Holder::Account(Uuid::from_u128(3)), addr(3)];
        let other_page = budget.try_shares(&other, 100).unwrap();
        let other_held = budget.take(other_page, 100).await;
        assert_eq!(budget.available(), 800);
        drop(held);
        assert!(budget.try_shares(&same_account, 100).is_some());
        drop(other_held);
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test]
    async fn holders_are_forgotten_once_nothing_holds_or_awaits_their_share() {
        let budget = DrainBudget::new(1000, 100);
        let holders = [Holder::Account(Uuid::from_u128(1)), addr(1)];
        let held = budget.take(budget.shares(&holders, 60).await, 60).await;
        assert_eq!(budget.holders(), 2);
        // A waiter that gives up leaves nothing behind either.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), budget.shares(&holders, 60)).await;
        assert!(gave_up.is_err());
        assert!(budget.try_shares(&holders, 60).is_none());
        assert_eq!(budget.holders(), 2);
        drop(held);
        assert_eq!(budget.holders(), 0);
        assert_eq!(budget.available(), 1000);
    }
}
