//! The scheduler's rules against the in-memory store, a scripted provider
//! and tokio's paused clock: no test sleeps for real, and every time is
//! exact.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;
use crate::clock::TestClock;
use crate::metrics::Metrics;
use crate::push::provider::{Outcome, Provider, Urgency};
use crate::store::memory::MemPush;

const COOLDOWN: Duration = Duration::from_secs(30);
const QUIET: Duration = Duration::from_secs(20 * 60);
const AFTER_CLOSE: Duration = Duration::from_secs(60);

fn timing() -> Timing {
    Timing {
        after_close: AFTER_CLOSE,
        cooldown: COOLDOWN,
        quiet: QUIET,
        push_timeout: Duration::from_secs(10),
        clustered: false,
        per_host: 16,
    }
}

/// The targets as the store has them, uncached; counts `changed`.
struct StoreTargets {
    store: Arc<MemPush>,
    changed: AtomicUsize,
}

#[async_trait]
impl TargetDirectory for StoreTargets {
    async fn live(&self, user: Uuid, device: DeviceId) -> crate::error::Result<Option<Kind>> {
        Ok(self.store.live(user, device).map(|(kind, _)| kind))
    }

    fn changed(&self, _user: Uuid) {
        self.changed.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Sockets(Mutex<HashSet<(Uuid, DeviceId)>>);

#[async_trait]
impl Presence for Sockets {
    async fn present(&self, user: Uuid, device: DeviceId) -> bool {
        self.0.lock().unwrap().contains(&(user, device))
    }
}

/// Targets stored as plain JSON (the sealing is tested with the store).
struct Plain;

impl OpenTarget for Plain {
    fn open(&self, _user: Uuid, _device: DeviceId, stored: &StoredTarget) -> Option<Target> {
        serde_json::from_slice(&stored.sealed).ok()
    }
}

/// One request the fake provider received.
#[derive(Debug, Clone)]
struct Call {
    endpoint: String,
    urgency: Urgency,
    at: Instant,
}

/// Answers from a script (then `Sent`), and hangs for endpoints told to.
#[derive(Default)]
struct Scripted {
    answers: Mutex<VecDeque<Outcome>>,
    hang: Mutex<HashMap<String, Duration>>,
    calls: Mutex<Vec<Call>>,
}

impl Scripted {
    fn answer(&self, outcomes: impl IntoIterator<Item = Outcome>) {
        self.answers.lock().unwrap().extend(outcomes);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Provider for Scripted {
    fn kind(&self) -> Kind {
        Kind::WebPush
    }

    async fn wake(&self, target: &Target, urgency: Urgency) -> Outcome {
        let Target::WebPush { endpoint, .. } = target else {
            panic!("a web push provider given {target:?}");
        };
        self.calls.lock().unwrap().push(Call {
            endpoint: endpoint.clone(),
            urgency,
            at: Instant::now(),
        });
        let hang = self.hang.lock().unwrap().get(endpoint).copied();
        if let Some(hang) = hang {
            tokio::time::sleep(hang).await;
        }
        self.answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Outcome::Sent)
    }
}

struct Harness {
    store: Arc<MemPush>,
    targets: Arc<StoreTargets>,
    sockets: Arc<Sockets>,
    provider: Arc<Scripted>,
    scheduler: Arc<Scheduler>,
    clock: Arc<TestClock>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tasks: Option<Tasks>,
}

impl Harness {
    fn new(timing: Timing) -> Self {
        let store = Arc::new(MemPush::default());
        let targets = Arc::new(StoreTargets {
            store: store.clone(),
            changed: AtomicUsize::new(0),
        });
        let sockets = Arc::new(Sockets::default());
        let provider = Arc::new(Scripted::default());
        let clock = Arc::new(TestClock::new());
        let metrics = Arc::new(Metrics::new(true));
        let stop = CancellationToken::new();
        let parts = Parts {
            store: store.clone(),
            targets: targets.clone(),
            presence: sockets.clone(),
            opener: Arc::new(Plain),
            providers: Providers {
                webpush: Some(provider.clone()),
                ..Providers::default()
            },
            metrics: metrics.clone(),
            clock: clock.clone(),
        };
        let (scheduler, tasks) = Scheduler::spawn(parts, timing, stop.clone());
        Self {
            store,
            targets,
            sockets,
            provider,
            scheduler,
            clock,
            metrics,
            stop,
            tasks: Some(tasks),
        }
    }

    /// A device with a Web Push target at `endpoint`.
    async fn device(&self, endpoint: &str) -> (Uuid, DeviceId) {
        let user = Uuid::new_v4();
        self.register(user, 1, endpoint).await;
        (user, 1)
    }

    async fn register(&self, user: Uuid, device: DeviceId, endpoint: &str) {
        let target = Target::WebPush {
            endpoint: endpoint.into(),
            p256dh: vec![4; 65],
            auth: vec![1; 16],
        };
        let sealed = serde_json::to_vec(&target).unwrap();
        self.store
            .set_target(user, device, Kind::WebPush, &sealed, self.clock.now())
            .await
            .unwrap();
    }

    /// A message from another account's device 1, committed.
    fn message(&self, (user, device): (Uuid, DeviceId), urgent: bool) {
        let copy = Arc::new(Message {
            id: Uuid::now_v7(),
            recipient: user,
            device,
            sender: Uuid::new_v4(),
            sender_device: 1,
            body: (b"sealed".to_vec()).into(),
            key: None,
            receipts: true,
            sent_at: crate::store::now(),
        });
        let meta = Committed {
            accepted: SystemTime::now(),
            urgent,
        };
        CommitListener::committed(&*self.scheduler, &[copy], &meta);
    }

    fn count(&self, outcome: &str) -> u64 {
        let needle =
            format!("sealpost_wakeups_total{{provider=\"webpush\",outcome=\"{outcome}\"}} ");
        let text = self.metrics.render();
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    async fn stop(mut self) {
        self.stop.cancel();
        self.tasks.take().unwrap().join().await;
    }
}

/// Lets the worker and the sender run: virtual time passes.
async fn after(d: Duration) {
    tokio::time::sleep(d).await;
}

const ENDPOINT: &str = "https://push.example/sub/1";

#[tokio::test(start_paused = true)]
async fn twenty_messages_make_one_wakeup() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    for i in 0..20 {
        h.message(device, true);
        if i % 5 == 0 {
            after(Duration::from_millis(200)).await;
        }
    }
    after(Duration::from_secs(5)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].urgency, Urgency::High);
    assert_eq!(h.count("sent"), 1);
    assert!(h.count("coalesced") >= 1);
    // Sent, and cooling.
    let row = h.store.wakeup(device.0, device.1).unwrap();
    assert!(row.due_at.is_none() && row.sent_at.is_some(), "{row:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_device_is_not_woken_again_until_the_cooldown_passes() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    assert_eq!(h.provider.calls().len(), 1);
    h.message(device, true);
    after(COOLDOWN - Duration::from_secs(5)).await;
    assert_eq!(h.provider.calls().len(), 1, "woken again while cooling");
    after(Duration::from_secs(5)).await;
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].at - calls[0].at >= COOLDOWN);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn showing_up_ends_the_cooldown() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    h.scheduler.showed_up(device.0, device.1);
    after(Duration::from_secs(1)).await;
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    assert_eq!(h.provider.calls().len(), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn non_urgent_sends_wake_at_low_priority_once_per_quiet_interval() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.message(device, false);
    after(Duration::from_secs(2)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].urgency, Urgency::Low);
    // Past the cool-down, within the quiet interval: not again, even after
    // the device showed up.
    after(COOLDOWN * 2).await;
    h.scheduler.showed_up(device.0, device.1);
    after(Duration::from_secs(1)).await;
    h.message(device, false);
    after(Duration::from_secs(2)).await;
    assert_eq!(
        h.provider.calls().len(),
        1,
        "a second low one within the quiet interval"
    );
    // An urgent one is not held back by it.
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].urgency, Urgency::High);
    // And past the quiet interval, a low one wakes again.
    after(QUIET).await;
    h.scheduler.showed_up(device.0, device.1);
    after(Duration::from_secs(1)).await;
    h.message(device, false);
    after(Duration::from_secs(2)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[2].urgency, Urgency::Low);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn gone_drops_the_target_and_nothing_more_is_sent() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.provider.answer([Outcome::Gone]);
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    assert_eq!(h.provider.calls().len(), 1);
    assert!(h.store.live(device.0, device.1).is_none(), "target kept");
    assert_eq!(h.targets.changed.load(Ordering::Relaxed), 1);
    assert_eq!(h.count("gone"), 1);
    after(COOLDOWN * 2).await;
    h.scheduler.showed_up(device.0, device.1);
    h.message(device, true);
    after(Duration::from_secs(5)).await;
    assert_eq!(h.provider.calls().len(), 1, "sent to a dropped target");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_target_registered_again_meanwhile_is_kept_and_woken() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    // The first answer takes a while; the device registers a new target
    // meanwhile.
    h.provider
        .hang
        .lock()
        .unwrap()
        .insert(ENDPOINT.into(), Duration::from_secs(3));
    h.provider.answer([Outcome::Gone]);
    h.message(device, true);
    after(Duration::from_secs(1)).await;
    let fresh = "https://push.example/sub/2";
    h.register(device.0, device.1, fresh).await;
    after(Duration::from_secs(5)).await;
    let (kind, _) = h
        .store
        .live(device.0, device.1)
        .expect("the new target kept");
    assert_eq!(kind, Kind::WebPush);
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1].endpoint, fresh);
    assert_eq!(h.count("gone"), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn throttled_is_tried_again_after_retry_after() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.provider
        .answer([Outcome::Throttled(Some(Duration::from_secs(7)))]);
    h.message(device, true);
    after(Duration::from_secs(20)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    let waited = calls[1].at - calls[0].at;
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(9),
        "{waited:?}"
    );
    assert_eq!((h.count("retried"), h.count("sent")), (1, 1));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_then_give_up() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.provider
        .answer((0..=sender::MAX_RETRIES).map(|_| Outcome::Transient("503".into())));
    h.message(device, true);
    after(Duration::from_secs(120)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 1 + sender::MAX_RETRIES as usize, "{calls:?}");
    let gaps: Vec<u64> = calls
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs())
        .collect();
    // 1, 2, 4, 8, 16 s, give or take the second a poll may add.
    for (gap, want) in gaps.iter().zip([1, 2, 4, 8, 16]) {
        assert!((want..=want + 1).contains(gap), "{gaps:?}");
    }
    assert_eq!(h.count("retried"), 5);
    assert_eq!(h.count("failed"), 1);
    let row = h.store.wakeup(device.0, device.1).unwrap();
    assert!(row.due_at.is_none() && row.sent_at.is_none(), "{row:?}");
    // Given up, not cooling: the next message wakes it.
    h.message(device, true);
    after(Duration::from_secs(2)).await;
    assert_eq!(h.provider.calls().len(), 2 + sender::MAX_RETRIES as usize);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn config_errors_are_counted_and_given_up_keeping_the_target() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.provider.answer([Outcome::Config("403".into())]);
    h.message(device, true);
    after(Duration::from_secs(10)).await;
    assert_eq!(h.provider.calls().len(), 1);
    assert_eq!(h.count("config_error"), 1);
    assert!(h.store.live(device.0, device.1).is_some());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_device_online_anywhere_is_not_woken() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.sockets.0.lock().unwrap().insert(device);
    h.message(device, true);
    after(Duration::from_secs(5)).await;
    assert!(h.provider.calls().is_empty());
    assert!(h.store.wakeup(device.0, device.1).is_none());
    // The sender's own sending device is never woken for its own send.
    h.sockets.0.lock().unwrap().clear();
    let own = Arc::new(Message {
        id: Uuid::now_v7(),
        recipient: device.0,
        device: device.1,
        sender: device.0,
        sender_device: device.1,
        body: (b"sealed".to_vec()).into(),
        key: None,
        receipts: true,
        sent_at: crate::store::now(),
    });
    h.scheduler.committed(&[own], true);
    after(Duration::from_secs(5)).await;
    assert!(h.provider.calls().is_empty());
    // A device without a target is not considered either.
    h.message((Uuid::new_v4(), 1), true);
    after(Duration::from_secs(5)).await;
    assert!(h.provider.calls().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_device_that_comes_back_before_its_send_is_not_woken() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    // Scheduled by a close: due after the delay; the device is back by
    // then (on another node: only presence says so).
    h.scheduler.closed(device.0, device.1);
    after(Duration::from_secs(1)).await;
    h.sockets.0.lock().unwrap().insert(device);
    after(AFTER_CLOSE + Duration::from_secs(5)).await;
    assert!(h.provider.calls().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_close_is_scheduled_while_the_closing_socket_still_counts_as_present() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    // The socket tells the scheduler it closed before it leaves the hub,
    // and the other nodes hear of its going later still: the worker may
    // look while presence still counts it.
    h.sockets.0.lock().unwrap().insert(device);
    h.scheduler.closed(device.0, device.1);
    after(Duration::from_secs(1)).await;
    h.sockets.0.lock().unwrap().clear();
    after(AFTER_CLOSE + Duration::from_secs(5)).await;
    assert_eq!(h.provider.calls().len(), 1, "the close woke nothing");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_close_wakes_after_its_delay_unless_the_device_shows_up() {
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    h.scheduler.closed(device.0, device.1);
    after(AFTER_CLOSE - Duration::from_secs(2)).await;
    assert!(h.provider.calls().is_empty(), "woken before the delay");
    after(Duration::from_secs(4)).await;
    let calls = h.provider.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].urgency, Urgency::High);

    let other = h.device("https://push.example/sub/3").await;
    h.scheduler.closed(other.0, other.1);
    after(Duration::from_secs(10)).await;
    h.scheduler.showed_up(other.0, other.1);
    after(AFTER_CLOSE * 2).await;
    assert_eq!(h.provider.calls().len(), 1, "woken after it showed up");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hanging_endpoint_delays_no_other() {
    let h = Harness::new(timing());
    let slow = "https://slow.example/sub";
    h.provider
        .hang
        .lock()
        .unwrap()
        .insert(slow.into(), Duration::from_secs(8));
    // More devices on the hanging host than its share.
    let mut hanging = Vec::new();
    for _ in 0..timing().per_host + 4 {
        hanging.push(h.device(slow).await);
    }
    for &device in &hanging {
        h.message(device, true);
    }
    after(Duration::from_secs(2)).await;
    let fast = h.device(ENDPOINT).await;
    let started = Instant::now();
    h.message(fast, true);
    after(Duration::from_secs(2)).await;
    let calls = h.provider.calls();
    let woken = calls
        .iter()
        .find(|c| c.endpoint == ENDPOINT)
        .expect("the other host's wake-up was sent");
    assert!(woken.at - started < Duration::from_secs(2));
    // The hanging host never had more than its share at once (the rest
    // wait for their turn).
    let to_slow = calls.iter().filter(|c| c.endpoint == slow).count();
    assert_eq!(to_slow, timing().per_host, "{to_slow}");
    // Those that waited go as soon as the first answers come back (at 8 s,
    // inside the provider's timeout: no retry).
    after(Duration::from_secs(6)).await;
    let to_slow = h
        .provider
        .calls()
        .iter()
        .filter(|c| c.endpoint == slow)
        .count();
    assert_eq!(to_slow, hanging.len(), "{to_slow}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_lease_brings_back_what_a_dead_sender_took() {
    // A node that took a row and died: the row comes due after the lease,
    // and this node's sender sends it.
    let h = Harness::new(timing());
    let device = h.device(ENDPOINT).await;
    let now = h.clock.now();
    h.store
        .schedule(device.0, device.1, now, true, now, timing().rules())
        .await
        .unwrap();
    let taken = h.store.take_due(now, 10, timing().lease()).await.unwrap();
    assert_eq!(taken.len(), 1);
    after(timing().lease() - Duration::from_secs(2)).await;
    assert!(h.provider.calls().is_empty(), "sent while leased");
    after(Duration::from_secs(4)).await;
    assert_eq!(h.provider.calls().len(), 1);
    h.stop().await;
}

#[test]
fn backoff_doubles_then_gives_up() {
    let waits: Vec<_> = (1..=6).map(backoff).collect();
    assert_eq!(
        waits,
        [1, 2, 4, 8, 16]
            .map(|s| Some(Duration::from_secs(s)))
            .into_iter()
            .chain([None])
            .collect::<Vec<_>>()
    );
    assert_eq!(backoff(0), None);
}

#[test]
fn the_memo_covers_by_urgency_and_forgets_when_full() {
    let mut memo = memo::Memo::default();
    let now = Instant::now();
    let key = (Uuid::new_v4(), 1);
    memo.set(key, false, now + COOLDOWN, None);
    assert!(memo.covers(key, false, now));
    assert!(
        !memo.covers(key, true, now),
        "a low one covers an urgent one"
    );
    memo.set(key, true, now + COOLDOWN, None);
    assert!(memo.covers(key, true, now));
    assert!(!memo.covers(key, true, now + COOLDOWN));
    for i in 0..memo::MAX_ENTRIES as u32 {
        memo.set(
            (Uuid::from_u128(u128::from(i)), 1),
            true,
            now + COOLDOWN,
            None,
        );
    }
    assert!(memo.len() <= memo::MAX_ENTRIES);
}
