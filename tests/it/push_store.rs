//! The contract of [`PushStore`], the same on every backend: targets and
//! their versions, and the wake-up rows' life (pending, leased, cooling,
//! quiet, cancelled), against the store alone, each test on a fresh
//! database.

#[cfg(sealpost_pg_tests)]
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use sealpost::push::target::Kind;
use sealpost::store::{
    self, AddDevice, Coalescing, Device, DeviceId, NewSession, Scheduled, Store, StoreOptions,
    User, Verified,
};
use uuid::Uuid;

use crate::backend_tests;
use crate::common::{Backend, TestDb};

backend_tests!(
    targets_have_growing_versions_and_drop_only_at_their_version,
    a_schedule_coalesces_into_the_pending_wakeup,
    a_taken_wakeup_is_leased_until_the_lease_passes,
    after_a_wakeup_the_device_cools_and_non_urgent_ones_keep_quiet,
    showing_up_cancels_pending_and_cooling_but_not_quiet,
    retries_and_abandonment,
    rows_go_with_their_device_and_account,
);

#[cfg(sealpost_pg_tests)]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_takers_never_take_the_same_wakeup() {
    concurrent_takers(Backend::Postgres).await
}

const RULES: Coalescing = Coalescing {
    cooldown: Duration::from_secs(30),
    quiet: Duration::from_secs(1200),
};
const LEASE: Duration = Duration::from_secs(60);

struct Fixture {
    store: Arc<dyn Store>,
    db: TestDb,
    /// Fixed, so that every rule is checked against a chosen time.
    t0: DateTime<Utc>,
}

fn secs(t: DateTime<Utc>, s: i64) -> DateTime<Utc> {
    t + TimeDelta::seconds(s)
}

impl Fixture {
    async fn new(backend: Backend) -> Self {
        let db = TestDb::new(backend).await;
        let store = store::connect(&StoreOptions {
            url: db.url.clone(),
            pool_size: 4,
        })
        .await
        .unwrap();
        store.migrate().await.unwrap();
        Self {
            store,
            db,
            t0: store::now(),
        }
    }

    /// A new account with `devices` devices (1..=devices).
    async fn account(&self, devices: u32) -> Uuid {
        let now = store::now();
        let user = User {
            id: Uuid::new_v4(),
            username: format!("u{}", &Uuid::new_v4().simple().to_string()[..12]),
            created_at: now,
        };
        let device = Device {
            id: 1,
            public_key: vec![1; 32],
            key_updated_at: now,
            name: None,
            created_at: now,
            last_seen_at: now,
        };
        let session = || NewSession {
            hash: rand_hash(),
            family_id: Uuid::new_v4(),
            expires_at: secs(now, 3600),
        };
        self.store
            .create_user(&user, "hash", &device, &session())
            .await
            .unwrap();
        for _ in 1..devices {
            let verified = Verified {
                user_id: user.id,
                credentials: 0,
            };
            let added = self
                .store
                .add_device(verified, &[2; 32], None, 100, &session(), now)
                .await
                .unwrap();
            assert!(matches!(added, AddDevice::Added(_)), "{added:?}");
        }
        user.id
    }

    async fn target(&self, user: Uuid, device: DeviceId) -> DateTime<Utc> {
        self.store
            .set_target(user, device, Kind::WebPush, b"sealed", store::now())
            .await
            .unwrap()
            .expect("the device exists")
    }

    async fn schedule(&self, user: Uuid, urgent: bool, at: DateTime<Utc>) -> Scheduled {
        self.store
            .schedule(user, 1, at, urgent, at, RULES)
            .await
            .unwrap()
    }

    /// The (user, device, urgent, attempts) of what `take_due` takes at `at`.
    async fn take(&self, at: DateTime<Utc>) -> Vec<(Uuid, DeviceId, bool, u32)> {
        self.store
            .take_due(at, 100, LEASE)
            .await
            .unwrap()
            .into_iter()
            .map(|w| (w.user, w.device, w.urgent, w.attempts))
            .collect()
    }

    /// Rows in `table`, read with SQL of its own.
    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM {table}");
        if self.db.is_postgres() {
            let pool = sqlx::PgPool::connect(&self.db.url).await.unwrap();
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        } else {
            let pool = sqlx::SqlitePool::connect(&self.db.url).await.unwrap();
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }
    }
}

fn rand_hash() -> [u8; 32] {
    let mut hash = [0; 32];
    hash[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    hash[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    hash
}

async fn targets_have_growing_versions_and_drop_only_at_their_version(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(2).await;
    let store = &f.store;
    assert!(store.target_summaries(user).await.unwrap().is_empty());
    // No such device: nothing stored.
    let none = store
        .set_target(user, 9, Kind::Fcm, b"x", f.t0)
        .await
        .unwrap();
    assert_eq!(none, None);
    // Set twice at the same instant: the version still grows.
    let v1 = store
        .set_target(user, 1, Kind::Fcm, b"one", f.t0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v1, f.t0);
    let v2 = store
        .set_target(user, 1, Kind::Apns, b"two", f.t0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v2, f.t0 + TimeDelta::milliseconds(1));
    let summaries = store.target_summaries(user).await.unwrap();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(
        (
            summaries[0].device,
            summaries[0].kind,
            summaries[0].updated_at
        ),
        (1, Some(Kind::Apns), v2)
    );
    assert!(!summaries[0].dropped);
    assert_eq!(store.count_targets().await.unwrap(), vec![(Kind::Apns, 1)]);
    // A "gone" for the target before this one drops nothing.
    assert!(!store.drop_target(user, 1, v1).await.unwrap());
    assert!(store.drop_target(user, 1, v2).await.unwrap());
    assert!(!store.drop_target(user, 1, v2).await.unwrap(), "once");
    let dropped = &store.target_summaries(user).await.unwrap()[0];
    assert_eq!((dropped.kind, dropped.dropped), (None, true));
    assert!(store.count_targets().await.unwrap().is_empty());
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::NoTarget);
    // Registering again clears `dropped`, at a later version.
    let v3 = store
        .set_target(user, 1, Kind::Fcm, b"three", f.t0)
        .await
        .unwrap()
        .unwrap();
    assert!(v3 > v2);
    let again = &store.target_summaries(user).await.unwrap()[0];
    assert_eq!((again.kind, again.dropped), (Some(Kind::Fcm), false));
    // Deleting removes the row, dropped or not; a second time finds none.
    assert!(store.delete_target(user, 1).await.unwrap());
    assert!(!store.delete_target(user, 1).await.unwrap());
    assert!(store.target_summaries(user).await.unwrap().is_empty());
}

async fn a_schedule_coalesces_into_the_pending_wakeup(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(1).await;
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::NoTarget);
    assert!(f.take(secs(f.t0, 1)).await.is_empty());
    f.target(user, 1).await;
    // A non-urgent one due in 10 s, then an urgent one due now: one row,
    // urgent, due now.
    let scheduled = f
        .store
        .schedule(user, 1, secs(f.t0, 10), false, f.t0, RULES)
        .await
        .unwrap();
    assert_eq!(scheduled, Scheduled::Pending);
    assert_eq!(f.schedule(user, false, f.t0).await, Scheduled::Coalesced);
    assert!(f.take(f.t0).await.is_empty(), "not due yet");
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::Coalesced);
    assert_eq!(f.take(f.t0).await, vec![(user, 1, true, 0)]);
    assert_eq!(f.count("wakeups").await, 1);
}

async fn a_taken_wakeup_is_leased_until_the_lease_passes(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(1).await;
    let version = f.target(user, 1).await;
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::Pending);
    let taken = f.store.take_due(f.t0, 10, LEASE).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].target.sealed, b"sealed");
    assert_eq!(taken[0].target.kind, Kind::WebPush);
    assert_eq!(taken[0].target.updated_at, version);
    // Leased: not taken again, however often asked, until the lease passes.
    assert!(f.take(f.t0).await.is_empty());
    assert!(f.take(secs(f.t0, 59)).await.is_empty());
    // Still pending meanwhile: a schedule coalesces into it.
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 30)).await,
        Scheduled::Coalesced
    );
    // The lease passed (its taker died): due again.
    assert_eq!(f.take(secs(f.t0, 60)).await, vec![(user, 1, true, 0)]);
}

async fn after_a_wakeup_the_device_cools_and_non_urgent_ones_keep_quiet(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(1).await;
    f.target(user, 1).await;
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::Pending);
    assert_eq!(f.take(f.t0).await.len(), 1);
    f.store.wakeup_sent(user, 1, true, f.t0).await.unwrap();
    assert!(
        f.take(secs(f.t0, 3600)).await.is_empty(),
        "sent: not pending"
    );
    // Cooling for 30 s.
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 29)).await,
        Scheduled::Coalesced
    );
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 30)).await,
        Scheduled::Pending
    );
    // A non-urgent one sent at t0 + 40 s: another non-urgent one waits the
    // quiet interval (20 min), even after the cool-down; an urgent one
    // only the cool-down.
    let sent = secs(f.t0, 40);
    assert_eq!(f.take(sent).await.len(), 1);
    f.store.wakeup_sent(user, 1, false, sent).await.unwrap();
    assert_eq!(
        f.schedule(user, false, secs(sent, 31)).await,
        Scheduled::Coalesced
    );
    assert_eq!(
        f.schedule(user, false, secs(sent, 1199)).await,
        Scheduled::Coalesced
    );
    assert_eq!(
        f.schedule(user, true, secs(sent, 31)).await,
        Scheduled::Pending
    );
    // An urgent wake-up sent later leaves the quiet interval where it was.
    let urgent_sent = secs(sent, 31);
    assert_eq!(f.take(urgent_sent).await.len(), 1);
    f.store
        .wakeup_sent(user, 1, true, urgent_sent)
        .await
        .unwrap();
    assert_eq!(
        f.schedule(user, false, secs(sent, 1200)).await,
        Scheduled::Pending
    );
}

async fn showing_up_cancels_pending_and_cooling_but_not_quiet(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(1).await;
    f.target(user, 1).await;
    // Pending, cancelled: nothing to take.
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::Pending);
    f.store.cancel_wakeups(user, 1).await.unwrap();
    assert!(f.take(secs(f.t0, 3600)).await.is_empty());
    // Cooling, cancelled: the next one is pending at once.
    assert_eq!(f.schedule(user, true, f.t0).await, Scheduled::Pending);
    assert_eq!(f.take(f.t0).await.len(), 1);
    f.store.wakeup_sent(user, 1, true, f.t0).await.unwrap();
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 1)).await,
        Scheduled::Coalesced
    );
    f.store.cancel_wakeups(user, 1).await.unwrap();
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 1)).await,
        Scheduled::Pending
    );
    // A non-urgent one sent, then the device shows up: the quiet interval
    // stays (it limits what may be sent, not what is pending).
    assert_eq!(f.take(secs(f.t0, 1)).await.len(), 1);
    f.store
        .wakeup_sent(user, 1, false, secs(f.t0, 2))
        .await
        .unwrap();
    f.store.cancel_wakeups(user, 1).await.unwrap();
    assert_eq!(
        f.schedule(user, false, secs(f.t0, 3)).await,
        Scheduled::Coalesced
    );
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 3)).await,
        Scheduled::Pending
    );
}

async fn retries_and_abandonment(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(1).await;
    f.target(user, 1).await;
    assert_eq!(f.schedule(user, false, f.t0).await, Scheduled::Pending);
    assert_eq!(f.take(f.t0).await, vec![(user, 1, false, 0)]);
    f.store
        .wakeup_retry(user, 1, secs(f.t0, 5), 1)
        .await
        .unwrap();
    assert!(f.take(secs(f.t0, 4)).await.is_empty());
    assert_eq!(f.take(secs(f.t0, 5)).await, vec![(user, 1, false, 1)]);
    // Given up: neither pending nor cooling, so the next one is pending.
    f.store.wakeup_abandoned(user, 1).await.unwrap();
    assert!(f.take(secs(f.t0, 3600)).await.is_empty());
    assert_eq!(
        f.schedule(user, true, secs(f.t0, 6)).await,
        Scheduled::Pending
    );
    // A dropped target takes its pending wake-up with it.
    let version = f.store.target_summaries(user).await.unwrap()[0].updated_at;
    assert!(f.store.drop_target(user, 1, version).await.unwrap());
    assert!(f.take(secs(f.t0, 3600)).await.is_empty());
    f.target(user, 1).await;
    assert!(
        f.take(secs(f.t0, 3600)).await.is_empty(),
        "not revived by a new target"
    );
}

async fn rows_go_with_their_device_and_account(backend: Backend) {
    let f = Fixture::new(backend).await;
    let user = f.account(2).await;
    let other = f.account(1).await;
    for (user, device) in [(user, 1), (user, 2), (other, 1)] {
        f.target(user, device).await;
        let scheduled = f
            .store
            .schedule(user, device, f.t0, true, f.t0, RULES)
            .await
            .unwrap();
        assert_eq!(scheduled, Scheduled::Pending);
    }
    assert_eq!(
        (f.count("push_targets").await, f.count("wakeups").await),
        (3, 3)
    );
    let removed = f.store.remove_device(user, 2, store::now()).await.unwrap();
    assert!(
        matches!(removed, store::RemoveDevice::Removed { .. }),
        "{removed:?}"
    );
    assert_eq!(
        (f.count("push_targets").await, f.count("wakeups").await),
        (2, 2)
    );
    let devices: Vec<_> = f
        .store
        .target_summaries(user)
        .await
        .unwrap()
        .iter()
        .map(|s| s.device)
        .collect();
    assert_eq!(devices, vec![1]);
    f.store
        .delete_user(user, store::now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (f.count("push_targets").await, f.count("wakeups").await),
        (1, 1)
    );
    assert!(f.store.target_summaries(user).await.unwrap().is_empty());
    // The other account's are untouched.
    assert_eq!(f.take(f.t0).await, vec![(other, 1, true, 0)]);
}

/// Four takers at once over 60 due wake-ups: each is taken exactly once.
#[cfg(sealpost_pg_tests)]
async fn concurrent_takers(backend: Backend) {
    let f = Fixture::new(backend).await;
    let mut due = HashSet::new();
    for _ in 0..6 {
        let user = f.account(10).await;
        for device in 1..=10 {
            f.target(user, device).await;
            let scheduled = f
                .store
                .schedule(user, device, f.t0, true, f.t0, RULES)
                .await
                .unwrap();
            assert_eq!(scheduled, Scheduled::Pending);
            due.insert((user, device));
        }
    }
    let takers: Vec<_> = (0..4)
        .map(|_| {
            let store = f.store.clone();
            let at = f.t0;
            tokio::spawn(async move {
                let mut taken = Vec::new();
                // Bounded: 60 rows, at least one per round while any are left.
                for _ in 0..100 {
                    let batch = store.take_due(at, 3, LEASE).await.unwrap();
                    if batch.is_empty() {
                        break;
                    }
                    taken.extend(batch.into_iter().map(|w| (w.user, w.device)));
                }
                taken
            })
        })
        .collect();
    let mut all = Vec::new();
    for taker in takers {
        all.extend(taker.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a wake-up was taken twice");
    assert_eq!(distinct, due, "every due wake-up was taken");
}
