//! The sweeper: deletes messages older than the message TTL, delivered or
//! not, and refresh tokens past their expiry.
//!
//! It runs every `SEALPOST_SWEEP_INTERVAL` and deletes in bounded batches, so
//! no statement holds locks long enough to stall the committer, and it stops
//! between batches when the server shuts down.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::store::{self, Store, StoreResult};

/// Rows per delete statement.
const BATCH: u32 = 1000;

pub async fn run(
    store: Arc<dyn Store>,
    ttl: Duration,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                if let Err(err) = sweep(store.as_ref(), ttl, &shutdown).await {
                    tracing::warn!(error = %err, "sweep failed; retrying next interval");
                }
            }
        }
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
    shutdown: &CancellationToken,
) -> StoreResult<u64> {
    let now = store::now();
    let before = store::first_id_at(store::sub(now, ttl));
    let messages = in_batches(shutdown, || store.delete_before(before, BATCH)).await?;
    let tokens = in_batches(shutdown, || store.purge_refresh_tokens(now, BATCH)).await?;
    if messages > 0 || tokens > 0 {
        tracing::info!(messages, refresh_tokens = tokens, "swept expired rows");
    } else {
        tracing::debug!("sweep found nothing expired");
    }
    Ok(messages)
}
