//! Reading a connection's backlog, page by page: at connect (the drain
//! that ends with `drained`) and again when broker traffic was lost.
//!
//! On one node a page is simply the next rows by id: ids are taken in
//! commit order there, so a row committed later has a larger id than any
//! row already read. In a cluster, nodes' commits interleave, and a row of
//! another node can commit below the cursor after its page was read; the
//! next page would pass over it, and it would arrive live after rows that
//! were sent after it by its own sender. So a clustered read first takes
//! the ids of up to [`SNAPSHOT`] rows in one statement, and its pages send
//! only those: in one snapshot each node's rows are a prefix of its
//! commits, and every row committed after it arrives live, in its node's
//! order (see [`crate::cluster`]). A queue deeper than a snapshot is read
//! one snapshot after another; at those boundaries the order across nodes
//! is as on one page boundary, which only queues of more than
//! [`SNAPSHOT`] messages meet.
//!
//! A socket's pages are sized by its [`Pace`]: small at first, larger as
//! the socket writes them quickly, smaller again when it writes one slowly.
//! A page holds its bytes of the drain budget until it is written, so a
//! slow reader holds less of it, and for less time.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::delivery::{Address, Delivery, MAX_PAGE_BYTES, PageBudget};
use crate::error::Result;
use crate::store::Message;

/// Backlog messages per database read (at most
/// [`MAX_PAGE`](crate::delivery::MAX_PAGE)): fewer, larger reads drain
/// faster, and a page is bounded in bytes too.
const PAGE: u32 = 500;

/// Ids in one clustered snapshot: 160 KiB while a socket drains, the
/// default cap on one device's queue.
const SNAPSHOT: u32 = 10_000;

/// Stored bytes of a socket's first backlog page: what a link of about
/// 90 kbit/s writes (in base64, in frames) within the default
/// `SEALPOST_WS_PAGE_WRITE_TIMEOUT` of 30 s. A backlog of small messages
/// fills its 500-message pages long before this.
const FIRST_PAGE_BYTES: usize = 256 * 1024;

/// The smallest bound on a socket's page, however slow it was; a page
/// always carries at least one message.
const MIN_PAGE_BYTES: usize = 16 * 1024;

/// How many stored bytes a socket's next backlog page may carry, from how
/// long its last pages took to write. A page written within a quarter of
/// the page-write timeout, and at least half full, doubles the next, up to
/// [`MAX_PAGE_BYTES`]; one that took more than half of it halves the next.
/// At a steady rate a page then takes between a quarter and half the
/// timeout, or is written at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Pace {
    bytes: usize,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            bytes: FIRST_PAGE_BYTES,
        }
    }
}

impl Pace {
    pub(super) fn bytes(self) -> usize {
        self.bytes
    }

    /// A page of `bytes` took `took` to write, of the `limit` it had.
    pub(super) fn written(&mut self, bytes: usize, took: Duration, limit: Duration) {
        if took > limit / 2 {
            self.bytes = (self.bytes / 2).max(MIN_PAGE_BYTES);
        } else if took <= limit / 4 && bytes >= self.bytes / 2 {
            self.bytes = self.bytes.saturating_mul(2).min(MAX_PAGE_BYTES);
        }
    }
}

/// Where a read goes on from.
#[derive(Clone, Default)]
pub(super) struct Cursor {
    after: Option<Uuid>,
    /// The ids this clustered read sends, ascending; `None` to take them.
    snapshot: Option<Arc<[Uuid]>>,
}

impl Cursor {
    pub(super) fn after(id: Uuid) -> Self {
        Self {
            after: Some(id),
            snapshot: None,
        }
    }
}

/// One page of a read.
pub(super) struct Chunk {
    pub messages: Vec<Message>,
    /// Where the next page starts; `None` when the read is done.
    pub next: Option<Cursor>,
    /// The page's share of the drain budget: drop the chunk once its
    /// messages are written.
    pub _budget: PageBudget,
}

impl Chunk {
    /// The bytes of its bodies: about its stored bytes, which its
    /// [`Pace`] bounded.
    pub(super) fn bytes(&self) -> usize {
        self.messages.iter().map(|m| m.body.len()).sum()
    }
}

/// Reads the page at `cursor` of `device`'s backlog for a socket at
/// address `client` (its per-address limit key), of at most `max_bytes`
/// stored bytes (its [`Pace`]).
pub(super) fn read(
    delivery: Arc<Delivery>,
    device: Address,
    client: IpAddr,
    cursor: Cursor,
    max_bytes: usize,
) -> BoxFuture<'static, Result<Chunk>> {
    Box::pin(async move {
        if !delivery.clustered() {
            let (messages, next, budget) = delivery
                .drain_page(device, client, cursor.after, PAGE, max_bytes)
                .await?
                .into_parts();
            return Ok(Chunk {
                messages,
                next: next.map(Cursor::after),
                _budget: budget,
            });
        }
        let snapshot = match cursor.snapshot {
            Some(snapshot) => snapshot,
            None => {
                let ids = delivery.backlog_ids(device, cursor.after, SNAPSHOT).await?;
                Arc::from(ids)
            }
        };
        let Some(&last) = snapshot.last() else {
            return Ok(Chunk {
                messages: Vec::new(),
                next: None,
                _budget: PageBudget::none(),
            });
        };
        let (mut messages, next, budget) = delivery
            .drain_page(device, client, cursor.after, PAGE, max_bytes)
            .await?
            .into_parts();
        messages.retain(|m| m.id <= last && snapshot.binary_search(&m.id).is_ok());
        let next = match next {
            Some(next) if next < last => Some(Cursor {
                after: Some(next),
                snapshot: Some(snapshot.clone()),
            }),
            // The snapshot is done: a full one may have more behind it.
            _ if snapshot.len() == SNAPSHOT as usize => Some(Cursor::after(last)),
            _ => None,
        };
        Ok(Chunk {
            messages,
            next,
            _budget: budget,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(30);

    #[test]
    fn a_socket_that_writes_full_pages_fast_gets_larger_ones_up_to_the_most() {
        let mut pace = Pace::default();
        let quick = Duration::from_millis(10);
        pace.written(pace.bytes(), quick, LIMIT);
        assert_eq!(pace.bytes(), 2 * FIRST_PAGE_BYTES);
        for _ in 0..10 {
            pace.written(pace.bytes(), quick, LIMIT);
        }
        assert_eq!(pace.bytes(), MAX_PAGE_BYTES);
    }

    #[test]
    fn a_small_page_written_fast_proves_nothing() {
        let mut pace = Pace::default();
        pace.written(1000, Duration::from_millis(1), LIMIT);
        assert_eq!(pace.bytes(), FIRST_PAGE_BYTES);
    }

    #[test]
    fn a_slow_page_halves_the_next_down_to_the_least() {
        let mut pace = Pace::default();
        pace.written(pace.bytes(), Duration::from_secs(16), LIMIT);
        assert_eq!(pace.bytes(), FIRST_PAGE_BYTES / 2);
        // Between a quarter and half the limit: kept.
        pace.written(pace.bytes(), Duration::from_secs(10), LIMIT);
        assert_eq!(pace.bytes(), FIRST_PAGE_BYTES / 2);
        for _ in 0..20 {
            pace.written(pace.bytes(), Duration::from_secs(20), LIMIT);
        }
        assert_eq!(pace.bytes(), MIN_PAGE_BYTES);
    }
}
