//! The rules for confirming a signed-in caller's password (password change,
//! account deletion, device removal): what keeps a stolen access token from
//! guessing the password, and one account from spending the server's
//! hashing.
//!
//! Before a hash, an account may be refused (429, with the time to wait):
//! while it is locked out after wrong passwords, or when its budget of
//! checks (`SEALPOST_PASSWORD_RATE_PER_MINUTE`) is spent. After a wrong
//! password its strikes grow, and so does the lockout that follows; the
//! [`END_SESSION_AFTER`]th strike in a row ends the session that made it. A
//! right password clears the strikes.
//!
//! Strikes are the account's, whichever session makes them: a thief holding
//! several sessions gets no more guesses, and each of its sessions ends at
//! its first wrong guess past the threshold. Only the account itself can
//! strike it (the routes take its token), so no one can lock out another.
//! Login is not covered here: it is limited per address, and a lockout per
//! account there would let anyone lock anyone out.

use std::time::{Duration, Instant};

use dashmap::DashMap;
use uuid::Uuid;

use crate::error::Error;
use crate::limits::rate::PasswordBudget;

/// Wrong passwords in a row after which the session that made the last one
/// ends (its tokens refused, its sockets closed). A user who mistypes four
/// times stays signed in; a thief with one stolen token gets five guesses,
/// not the ~140 a second it had, and must then steal another.
pub const END_SESSION_AFTER: u32 = 5;

/// Strikes that cost no wait: one typo, retyped at once.
const FREE_STRIKES: u32 = 1;

/// The longest lockout, however many strikes: long enough to make guessing
/// pointless, short enough that the owner is not kept out for a day.
const MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);

/// How long an account's strikes are remembered after its last wrong
/// password. A day: a guesser who waits for the count to reset gets at most
/// four guesses a day per account, and the map holds only the accounts
/// that got a password wrong that day.
const FORGET_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// What a wrong password leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused as wrong; the caller may try again after any lockout.
    Wrong,
    /// Too many in a row: the session that sent it must end.
    EndSession,
}

pub struct Confirmations {
    budget: PasswordBudget,
    /// Accounts with recent wrong passwords. Bounded by the accounts that
    /// got one wrong in the last [`FORGET_AFTER`] (only a signed-in account
    /// strikes itself, and sign-ups are rate-limited per address), a few
    /// dozen bytes each; the sweeper forgets older ones.
    strikes: DashMap<Uuid, Strikes>,
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    /// Wrong passwords in a row.
    count: u32,
    last: Instant,
    /// No check before this.
    locked_until: Instant,
}

impl Confirmations {
    /// A budget of `per_minute` checks per account with `burst` at once;
    /// `per_minute` 0 turns the budget (not the lockout) off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            budget: PasswordBudget::new(per_minute, burst),
            strikes: DashMap::new(),
        }
    }

    /// Whether `user` may have a password checked now: not while locked
    /// out, and only within its budget. Call before any hash.
    pub fn admit(&self, user: Uuid) -> Result<(), Error> {
        self.admit_at(user, Instant::now())
    }

    fn admit_at(&self, user: Uuid, now: Instant) -> Result<(), Error> {
        // Copied out, so that no shard lock is held past this line.
        let locked_until = self.strikes.get(&user).map(|s| s.locked_until);
        if let Some(until) = locked_until.filter(|until| *until > now) {
            return Err(Error::RateLimited {
                retry_after: until - now,
            });
        }
        self.budget.check(user)
    }

    /// Records a wrong password of `user`.
    pub fn wrong(&self, user: Uuid) -> Verdict {
        self.wrong_at(user, Instant::now())
    }

    fn wrong_at(&self, user: Uuid, now: Instant) -> Verdict {
        let mut strikes = self.strikes.entry(user).or_insert(Strikes {
            count: 0,
            last: now,
            locked_until: now,
        });
        if now.saturating_duration_since(strikes.last) >= FORGET_AFTER {
            strikes.count = 0;
        }
        strikes.count = strikes.count.saturating_add(1);
        strikes.last = now;
        strikes.locked_until = now + lockout(strikes.count);
        if strikes.count >= END_SESSION_AFTER {
            Verdict::EndSession
        } else {
            Verdict::Wrong
        }
    }

    /// Records a right password of `user`: its strikes are cleared.
    pub fn right(&self, user: Uuid) {
        self.strikes.remove(&user);
    }

    /// Forgets strikes older than [`FORGET_AFTER`] and full budgets.
    pub fn prune(&self) {
        let now = Instant::now();
        self.strikes
            .retain(|_, s| now.saturating_duration_since(s.last) < FORGET_AFTER);
        self.budget.prune();
    }
}

/// The wait after the `count`th wrong password in a row: none for the
/// first, then 1 s, doubling, up to [`MAX_LOCKOUT`].
fn lockout(count: u32) -> Duration {
    let Some(doublings) = count.checked_sub(FREE_STRIKES + 1) else {
        return Duration::ZERO;
    };
    Duration::from_secs(1u64 << doublings.min(20)).min(MAX_LOCKOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry_after(result: Result<(), Error>) -> Duration {
        match result {
            Err(Error::RateLimited { retry_after }) => retry_after,
            other => panic!("expected rate_limited, got {other:?}"),
        }
    }

    #[test]
    fn lockouts_grow_from_the_second_strike() {
        let waits: Vec<u64> = (1..=6).map(|n| lockout(n).as_secs()).collect();
        assert_eq!(waits, [0, 1, 2, 4, 8, 16]);
        assert_eq!(lockout(40), MAX_LOCKOUT);
        assert_eq!(lockout(u32::MAX), MAX_LOCKOUT);
    }

    #[test]
    fn strikes_lock_out_then_end_the_session() {
        let rules = Confirmations::new(0, 1);
        let (user, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut now = Instant::now();
        rules.admit_at(user, now).unwrap();
        assert_eq!(rules.wrong_at(user, now), Verdict::Wrong);
        // The first is free: a typo is retyped at once.
        rules.admit_at(user, now).unwrap();
        for strike in 2..END_SESSION_AFTER {
            assert_eq!(rules.wrong_at(user, now), Verdict::Wrong);
            let wait = retry_after(rules.admit_at(user, now));
            assert_eq!(wait, lockout(strike), "after strike {strike}");
            // Another account is not locked out.
            rules.admit_at(other, now).unwrap();
            now += wait;
            rules.admit_at(user, now).unwrap();
        }
        assert_eq!(rules.wrong_at(user, now), Verdict::EndSession);
        // Every further wrong password ends its session too.
        now += lockout(END_SESSION_AFTER);
        assert_eq!(rules.wrong_at(user, now), Verdict::EndSession);
        // The right password clears the strikes.
        rules.right(user);
        rules.admit_at(user, now).unwrap();
        assert_eq!(rules.wrong_at(user, now), Verdict::Wrong);
    }

    #[test]
    fn strikes_are_forgotten_after_a_quiet_day() {
        let rules = Confirmations::new(0, 1);
        let user = Uuid::new_v4();
        let mut now = Instant::now();
        for _ in 1..END_SESSION_AFTER {
            assert_eq!(rules.wrong_at(user, now), Verdict::Wrong);
        }
        now += FORGET_AFTER;
        rules.admit_at(user, now).unwrap();
        assert_eq!(rules.wrong_at(user, now), Verdict::Wrong);
    }

    #[test]
    fn the_budget_refuses_past_its_burst() {
        let rules = Confirmations::new(6, 2);
        let user = Uuid::new_v4();
        rules.admit(user).unwrap();
        rules.admit(user).unwrap();
        let wait = retry_after(rules.admit(user));
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
    }
}
