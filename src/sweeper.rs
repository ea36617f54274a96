//! The sweeper: deletes messages older than the message TTL, delivered or
//! not, send keys past their expiry (a day after their send, on the hour:
//! [`expires_at`](crate::delivery::idempotency::expires_at)), refresh tokens
//! past their expiry and revocations no token can match any more; prunes the in-memory limiter state; and seals again, under the
//! current storage key, every queued row that is not yet sealed under it
//! (plaintext rows of an earlier release, rows of a retired key).
//!
//! It runs every `SEALPOST_SWEEP_INTERVAL`, first at start-up, and works in
//! bounded batches, so no statement holds locks long enough to stall the
//! committer, and it stops between batches when the server shuts down.
//!
//! With metrics on, each round also samples the queue's depth for them.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::seal::KeyRing;
use crate::state::AppState;
use crate::store::{self, Store, StoreResult};

/// Rows per delete statement.
const BATCH: u32 = 1000;

/// Rows read and sealed again per round: each row is held in memory with its
/// body (up to `SEALPOST_MAX_BODY_BYTES`), so fewer than a delete batch.
const RESEAL_BATCH: u32 = 256;

pub async fn run(state: AppState, keys: Arc<KeyRing>, shutdown: CancellationToken) {
    let config = state.config.clone();
    let mut ticker = tokio::time::interval(config.sweep_interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                let swept = sweep(
                    state.store.as_ref(),
                    config.message_ttl,
                    config.access_token_ttl,
                    &shutdown,
                )
                .await;
                match swept {
                    // Expiry deleted rows behind the queue caps' counters.
                    Ok(messages) if messages > 0 => {
                        state.metrics.expired.increment(messages);
                        state.delivery.recount_queues();
                    }
                    Ok(_) => {}
                    Err(err) => tracing::warn!(error = %err, "sweep failed; retrying next interval"),
                }
                if let Err(err) = reseal(state.store.as_ref(), &keys, &shutdown).await {
                    tracing::warn!(error = %err, "sealing rows again failed; retrying next interval");
                }
                if let Err(err) = reseal_targets(state.store.as_ref(), &keys, &shutdown).await {
                    tracing::warn!(error = %err, "sealing push targets again failed; retrying next interval");
                }
                forget_idle(&state);
                sample_queue_depth(&state).await;
            }
        }
    }
}

/// Prunes in-memory limiter and revocation state that no longer matters:
/// full token buckets, revocations older than any unexpired token, and
/// wrong-password strikes older than a day.
fn forget_idle(state: &AppState) {
    state.revocations.prune();
    state.confirmations.prune();
    state.delivery.prune_send_budgets();
    if let Some(limit) = &state.auth_limit {
        limit.prune();
    }
}

/// Sets the queue-depth gauges from the store, when metrics are on. A
/// failure leaves them at their last sample.
async fn sample_queue_depth(state: &AppState) {
    if !state.metrics.enabled() {
        return;
    }
    match state.store.queue_depth().await {
        Ok(depth) => {
            state.metrics.queued_messages.set(depth.total as f64);
            state
                .metrics
                .queued_max_per_user
                .set(depth.max_per_device as f64);
            state.metrics.devices.set(depth.devices as f64);
        }
        Err(err) => tracing::warn!(error = %err, "sampling the queue depth failed"),
    }
}

/// Runs `delete` until it deletes less than a batch (or shutdown); returns
/// the total.
async fn in_batches<F, Fut>(shutdown: &CancellationToken, mut delete: F) -> StoreResult<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<u64>>,
{
    let mut total = 0;
    loop {
        let deleted = delete().await?;
        total += deleted;
        if deleted < u64::from(BATCH) || shutdown.is_cancelled() {
            return Ok(total);
        }
    }
}

/// One sweep. Returns the number of messages deleted.
pub async fn sweep(
    store: &dyn Store,
    ttl: Duration,
    access_ttl: Duration,
    shutdown: &CancellationToken,
) -> StoreResult<u64> {
    let now = store::now();
    let before = store::first_id_at(store::sub(now, ttl));
    let messages = in_batches(shutdown, || store.delete_before(before, BATCH)).await?;
    // Shared bodies whose copies all went without their ack deleting
    // them (two acks committed at once on two nodes; purged devices).
    let bodies = in_batches(shutdown, || store.delete_orphan_bodies(BATCH)).await?;
    let send_keys = in_batches(shutdown, || store.forget_expired_keys(now, BATCH)).await?;
    let tokens = in_batches(shutdown, || store.purge_refresh_tokens(now, BATCH)).await?;
    // A revocation outlives every access token of its session by then.
    let revoked_before = store::sub(now, access_ttl);
    let revocations = in_batches(shutdown, || {
        store.purge_revoked_sessions(revoked_before, BATCH)
    })
    .await?;
    if messages > 0 || bodies > 0 || send_keys > 0 || tokens > 0 || revocations > 0 {
        tracing::info!(
            messages,
            shared_bodies = bodies,
            send_keys,
            refresh_tokens = tokens,
            revocations,
            "swept expired rows"
        );
    } else {
        tracing::debug!("sweep found nothing expired");
    }
    Ok(messages)
}

/// Seals every push target not sealed under the current key again, in
/// (user, device) order and bounded batches: a target lives as long as its
/// device, so without this, retiring an old storage key would leave every
/// device registered before the rotation unable to be woken. One that does
/// not open is left as it is (the sender logs it when it is due) and
/// counted; one replaced or removed meanwhile is skipped. Returns how many
/// were sealed again.
pub async fn reseal_targets(
    store: &dyn Store,
    keys: &KeyRing,
    shutdown: &CancellationToken,
) -> StoreResult<u64> {
    let (mut resealed, mut unopenable) = (0, 0);
    let mut after = (Uuid::nil(), 0);
    loop {
        let targets = store
            .stale_targets(keys.current(), after, RESEAL_BATCH)
            .await?;
        let Some(&(user, device, _)) = targets.last() else {
            break;
        };
        let full = targets.len() == RESEAL_BATCH as usize;
        after = (user, device);
        for (user, device, sealed) in targets {
            match keys.reseal_target(user, device, &sealed) {
                Ok(again) => {
                    if store.reseal_target(user, device, &sealed, &again).await? {
                        resealed += 1;
                    }
                }
                Err(_) => unopenable += 1,
            }
        }
        if !full || shutdown.is_cancelled() {
            break;
        }
    }
    if resealed > 0 {
        tracing::info!(
            targets = resealed,
            key_id = keys.current(),
            "sealed push targets again under the current storage key"
        );
    }
    if unopenable > 0 {
        tracing::error!(
            targets = unopenable,
            "push targets do not open with SEALPOST_STORAGE_KEYS; their devices cannot be \
             woken until the key that sealed them is configured again or they register again"
        );
    }
    Ok(resealed)
}

/// Seals every row not sealed under the current key again, in id order and
/// bounded batches. A row that does not open (its key is not configured, or
/// it was altered) is left as it is and counted; it is retried next time.
/// Returns how many rows were sealed again.
pub async fn reseal(
    store: &dyn Store,
    keys: &KeyRing,
    shutdown: &CancellationToken,
) -> StoreResult<u64> {
    let (mut resealed, mut unopenable) = (0, 0);
    let mut after = Uuid::nil();
    loop {
        let rows = store
            .stale_rows(keys.current(), after, RESEAL_BATCH)
            .await?;
        let Some(last) = rows.last().map(|row| row.id()) else {
            break;
        };
        let full = rows.len() == RESEAL_BATCH as usize;
        after = last;
        let mut sealed = Vec::with_capacity(rows.len());
        for row in rows {
            match keys.reseal(row) {
                Ok(row) => sealed.push(row),
                Err(err) => {
                    unopenable += 1;
                    tracing::debug!(error = %err, "row left as it is");
                }
            }
        }
        resealed += store.reseal(sealed).await?;
        if !full || shutdown.is_cancelled() {
            break;
        }
    }
    // The shared bodies, which their rows do not carry.
    let mut after = Uuid::nil();
    loop {
        let bodies = store
            .stale_bodies(keys.current(), after, RESEAL_BATCH)
            .await?;
        let Some(last) = bodies.last().map(|body| body.id) else {
            break;
        };
        let full = bodies.len() == RESEAL_BATCH as usize;
        after = last;
        let mut sealed = Vec::with_capacity(bodies.len());
        for body in bodies {
            match keys.reseal_body(body) {
                Ok(body) => sealed.push(body),
                Err(err) => {
                    unopenable += 1;
                    tracing::debug!(error = %err, "shared body left as it is");
                }
            }
        }
        resealed += store.reseal_bodies(sealed).await?;
        if !full || shutdown.is_cancelled() {
            break;
        }
    }
    if resealed > 0 {
        tracing::info!(
            rows = resealed,
            key_id = keys.current(),
            "sealed queued rows again under the current storage key"
        );
    }
    if unopenable > 0 {
        tracing::error!(
            rows = unopenable,
            "queued rows do not open with SEALPOST_STORAGE_KEYS; they are kept, and their \
             recipients' reads fail until the key that sealed them is configured again"
        );
    }
    Ok(resealed)
}
