//! Sends made safe to retry: the key a client gives a send (`client_id`).
//!
//! A send whose answer was lost (a dropped connection; a 503 from a commit
//! whose deadline passed although it went through) is retried under the
//! same key and answered with the id the first attempt got, instead of
//! being stored and pushed a second time. A key is scoped to the sending
//! device and remembered for [`SEND_KEY_WINDOW`]; a retry must carry the
//! same recipient and bodies (their [`digest`]), or it is refused with
//! `conflict`.
//!
//! Where a key is known, and so what guarantees a single message:
//! - **In flight here**: [`Flights`] holds every keyed send this process is
//!   accepting, from before its store lookup until its commit has answered
//!   (the committer's [`super::pending::Insert`] holds the claim from the
//!   moment the message has its id), whether or not its requester is still
//!   there. A second send under the key waits for the first's outcome and
//!   shares it.
//! - **Written**: the committer writes the key in the transaction that
//!   writes the message's copies (and writes it even when every copy was
//!   acknowledged before it was written), and the sender's answer waits for
//!   that transaction. So the store knows a key exactly when its message
//!   was accepted, after a restart too.
//!
//! **At rest** a key tells nobody who wrote to whom: the store holds the
//! keyed hash of (sender, device, `client_id`), the keyed hash of the sender
//! (for deleting the account's keys with it) and the answer (message id,
//! digest) sealed, under the storage key ([`crate::seal::KeyRing::seal_key`]),
//! and expires it by a coarse time of its own ([`expires_at`]), not by its
//! message's id: nothing in it joins to the queue.
//!
//! The limit: two attempts under one key in flight at the same moment on
//! *different* nodes both miss the store and are both delivered (the later
//! key replaces the earlier). A retry follows a lost answer, by which time
//! the first attempt has committed or failed, so this takes a client that
//! sends twice at once through two nodes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use uuid::Uuid;

use super::Content;
use crate::error::{Error, Result};
use crate::store::{SendKey, SentKey};

/// A key as the store answered it, opened: the message id and digest.
pub type Recorded = (Uuid, Vec<u8>);

/// How long a send key is remembered: a day covers a client that retries
/// after a night offline, and a day of keys is a small table beside the
/// week of messages the queue keeps.
pub const SEND_KEY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// When a key written at `now` expires: [`SEND_KEY_WINDOW`] later, rounded
/// up to the hour. The hour keeps the stored time from pointing at the
/// message it answers (queued rows carry their send time to the
/// millisecond); a key is kept one day to one day and an hour.
pub fn expires_at(now: DateTime<Utc>) -> DateTime<Utc> {
    const HOUR_MS: i64 = 60 * 60 * 1000;
    let at = crate::store::add(now, SEND_KEY_WINDOW).timestamp_millis();
    let rounded = at
        .div_euclid(HOUR_MS)
        .saturating_add(1)
        .saturating_mul(HOUR_MS);
    DateTime::from_timestamp_millis(rounded).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The longest `client_id`: room for a UUID in any notation, or a
/// counter prefixed by a device name, without storing arbitrary blobs.
pub const MAX_CLIENT_ID: usize = 64;

/// Checks a client's key: 1 to [`MAX_CLIENT_ID`] printable ASCII
/// characters (no spaces), so that it logs and compares without surprises.
pub fn client_id(value: &str) -> Result<String> {
    let valid =
        (1..=MAX_CLIENT_ID).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
    if !valid {
        return Err(Error::field(
            "client_id",
            format!("must be 1-{MAX_CLIENT_ID} printable ASCII characters without spaces"),
        ));
    }
    Ok(value.to_owned())
}

/// What a retry must match: SHA-256 over the recipient and the bodies,
/// each body length-prefixed so that no two sends share an encoding.
pub fn digest(to: Uuid, content: &Content) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(to.as_bytes());
    match content {
        Content::Same(body) => {
            hash.update([0]);
            hash.update((body.len() as u64).to_be_bytes());
            hash.update(body);
        }
        Content::PerDevice(envelopes) => {
            hash.update([1]);
            for (device, body) in envelopes {
                hash.update(device.to_be_bytes());
                hash.update((body.len() as u64).to_be_bytes());
                hash.update(body);
            }
        }
    }
    hash.finalize().to_vec()
}

/// The refusal of a key reused for another send.
fn reused() -> Error {
    Error::Conflict("client_id was already used for a different send")
}

/// How a keyed send in flight ended, for the sends waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    /// Durable under this id.
    Sent(Uuid),
    /// Not stored (or not yet known to be): the waiter is told to retry.
    Failed,
}

/// The keyed sends this process is accepting.
#[derive(Default)]
pub struct Flights {
    flights: DashMap<SendKey, Flight>,
}

struct Flight {
    digest: Vec<u8>,
    outcome: watch::Receiver<Outcome>,
}

/// A send under a key: the first one in flight here, or one to wait for.
pub enum Joined {
    First(Claim),
    Earlier(Earlier),
}

impl Flights {
    /// Enters a send under `key`, unless one is in flight already: then
    /// the same send (same digest) waits for it, another is refused.
    pub fn join(self: &Arc<Self>, key: SendKey, digest: Vec<u8>) -> Result<Joined> {
        match self.flights.entry(key.clone()) {
            Entry::Occupied(flight) if flight.get().digest != digest => Err(reused()),
            Entry::Occupied(flight) => Ok(Joined::Earlier(Earlier(flight.get().outcome.clone()))),
            Entry::Vacant(vacant) => {
                let (tx, outcome) = watch::channel(Outcome::Pending);
                vacant.insert(Flight {
                    digest: digest.clone(),
                    outcome,
                });
                Ok(Joined::First(Claim {
                    flights: self.clone(),
                    key,
                    digest,
                    tx,
                }))
            }
        }
    }

    /// Whether no keyed send is in flight; for the tests.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }
}

/// The first send under a key in flight here. Dropped unfinished (an
/// error before its commit, its requester gone before the lookup ended),
/// it tells its waiters to retry and leaves the map.
pub struct Claim {
    flights: Arc<Flights>,
    key: SendKey,
    digest: Vec<u8>,
    tx: watch::Sender<Outcome>,
}

impl Claim {
    pub fn key(&self) -> &SendKey {
        &self.key
    }

    /// A record of this key in the store, as [`Self::check`] accepts it:
    /// the id it names, or the refusal of a different send.
    pub fn check(&self, (message, digest): &Recorded) -> Result<Uuid> {
        if *digest == self.digest {
            Ok(*message)
        } else {
            Err(reused())
        }
    }

    /// The claim of the message that got `id`, with what the committer
    /// writes for it.
    pub fn bind(self, id: Uuid) -> Keyed {
        Keyed {
            record: SentKey {
                key: self.key.clone(),
                message: id,
                digest: self.digest.clone(),
            },
            claim: self,
        }
    }

    /// The send is durable under `id`.
    pub fn sent(self, id: Uuid) {
        self.tx.send_replace(Outcome::Sent(id));
    }
}

/// A claimed key and the message it was given to, on its way to the store
/// with that message (see [`super::pending::Insert`]).
pub struct Keyed {
    /// The row the committer writes with the copies.
    pub record: SentKey,
    claim: Claim,
}

impl Keyed {
    /// The message is durable: the key's waiters get its id.
    pub fn sent(self) {
        self.claim.sent(self.record.message);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        // Failed unless `sent` said otherwise; then out of the map, where
        // the next send under the key looks in the store instead.
        self.tx.send_if_modified(|outcome| {
            let pending = *outcome == Outcome::Pending;
            if pending {
                *outcome = Outcome::Failed;
            }
            pending
        });
        self.flights.flights.remove(&self.key);
    }
}

/// A send under a key already in flight here.
pub struct Earlier(watch::Receiver<Outcome>);

impl Earlier {
    /// The id the earlier send is durable under, once it is; `unavailable`
    /// if it failed, so that the client retries.
    pub async fn wait(mut self) -> Result<Uuid> {
        match self.0.wait_for(|o| *o != Outcome::Pending).await.as_deref() {
            Ok(Outcome::Sent(id)) => Ok(*id),
            _ => Err(Error::Unavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client_id: &str) -> SendKey {
        SendKey {
            sender: Uuid::nil(),
            device: 1,
            client_id: client_id.into(),
        }
    }

    #[test]
    fn a_key_expires_a_day_later_on_the_hour() {
        let now = DateTime::parse_from_rfc3339("2026-12-07T13:21:05.123Z")
            .unwrap()
            .to_utc();
        let at = expires_at(now);
        assert_eq!(at.to_rfc3339(), "2026-12-08T14:00:00+00:00");
        assert!(at - now >= chrono::TimeDelta::from_std(SEND_KEY_WINDOW).unwrap());
    }

    #[test]
    fn client_ids_are_short_printable_ascii() {
        for good in ["a", "7f3c-01", &"x".repeat(MAX_CLIENT_ID), "msg:42/phone"] {
            assert_eq!(client_id(good).unwrap(), good);
        }
        for bad in ["", " ", "a b", "é", "tab\t", &"x".repeat(MAX_CLIENT_ID + 1)] {
            assert_eq!(client_id(bad).unwrap_err().code(), "invalid", "{bad:?}");
        }
    }

    #[test]
    fn the_digest_tells_sends_apart() {
        let to = Uuid::new_v4();
        let same = |b: &[u8]| digest(to, &Content::Same(b.to_vec()));
        assert_eq!(same(b"hi"), same(b"hi"));
        assert_ne!(same(b"hi"), same(b"ho"));
        assert_ne!(
            same(b"hi"),
            digest(Uuid::new_v4(), &Content::Same(b"hi".to_vec()))
        );
        // The same bytes split differently between devices differ.
        let split = |a: &[u8], b: &[u8]| {
            digest(
                to,
                &Content::PerDevice(vec![(1, a.to_vec()), (2, b.to_vec())]),
            )
        };
        assert_ne!(split(b"ab", b"c"), split(b"a", b"bc"));
        assert_ne!(
            same(b"hi"),
            digest(to, &Content::PerDevice(vec![(1, b"hi".to_vec())]))
        );
    }

    #[tokio::test]
    async fn a_second_send_waits_for_the_first_and_shares_its_id() {
        let flights = Arc::new(Flights::default());
        let Joined::First(first) = flights.join(key("k"), vec![1]).unwrap() else {
            panic!("the first send is first");
        };
        let Joined::Earlier(second) = flights.join(key("k"), vec![1]).unwrap() else {
            panic!("the second waits");
        };
        assert_eq!(
            flights.join(key("k"), vec![2]).err().unwrap().code(),
            "conflict"
        );
        // Another key, or the same key of another device, is another send.
        assert!(matches!(
            flights.join(key("other"), vec![1]).unwrap(),
            Joined::First(_)
        ));
        let id = Uuid::now_v7();
        first.sent(id);
        assert_eq!(second.wait().await.unwrap(), id);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_claim_dropped_unfinished_tells_its_waiters_to_retry() {
        let flights = Arc::new(Flights::default());
        let Joined::First(first) = flights.join(key("k"), vec![1]).unwrap() else {
            panic!("first");
        };
        let Joined::Earlier(second) = flights.join(key("k"), vec![1]).unwrap() else {
            panic!("second");
        };
        drop(first);
        assert_eq!(second.wait().await.unwrap_err().code(), "unavailable");
        assert!(matches!(
            flights.join(key("k"), vec![1]).unwrap(),
            Joined::First(_)
        ));
    }
}
