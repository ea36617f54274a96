//! The sweeper: deletes messages older than the message TTL, delivered or
//! not, refresh tokens past their expiry and revocations no token can match
//! any more, and prunes the in-memory limiter state.
//!
//! It runs every `SEALPOST_SWEEP_INTERVAL` and deletes in bounded batches, so
//! no statement holds locks long enough to stall the committer, and it stops
//! between batches when the server shuts down.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;
use crate::store::{self, Store, StoreResult};

/// Rows per delete statement.
const BATCH: u32 = 1000;

pub async fn run(state: AppState, shutdown: CancellationToken) {
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
                    Ok(messages) if messages > 0 => state.delivery.recount_queues(),
                    Ok(_) => {}
                    Err(err) => tracing::warn!(error = %err, "sweep failed; retrying next interval"),
                }
                forget_idle(&state);
            }
        }
    }
}

/// Prunes in-memory limiter and revocation state that no longer matters:
/// full token buckets, and revocations older than any unexpired token.
fn forget_idle(state: &AppState) {
    state.revocations.prune();
    state.delivery.prune_send_budgets();
    if let Some(limit) = &state.auth_limit {
        limit.prune();
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
    let tokens = in_batches(shutdown, || store.purge_refresh_tokens(now, BATCH)).await?;
    // A revocation outlives every access token of its session by then.
    let revoked_before = store::sub(now, access_ttl);
    let revocations = in_batches(shutdown, || {
        store.purge_revoked_sessions(revoked_before, BATCH)
    })
    .await?;
    if messages > 0 || tokens > 0 || revocations > 0 {
        tracing::info!(
            messages,
            refresh_tokens = tokens,
            revocations,
            "swept expired rows"
        );
    } else {
        tracing::debug!("sweep found nothing expired");
    }
    Ok(messages)
}
