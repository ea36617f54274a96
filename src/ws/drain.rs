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

use std::sync::Arc;

use futures_util::future::BoxFuture;
use uuid::Uuid;

use crate::delivery::{Address, Delivery, PageBudget};
use crate::error::Result;
use crate::store::Message;

/// Backlog messages per database read (at most
/// [`MAX_PAGE`](crate::delivery::MAX_PAGE)): fewer, larger reads drain
/// faster, and a page is bounded in bytes too.
const PAGE: u32 = 500;

/// Ids in one clustered snapshot: 160 KiB while a socket drains, the
/// default cap on one device's queue.
const SNAPSHOT: u32 = 10_000;

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

pub(super) fn read(
    delivery: Arc<Delivery>,
    device: Address,
    cursor: Cursor,
) -> BoxFuture<'static, Result<Chunk>> {
    Box::pin(async move {
        if !delivery.clustered() {
            let (messages, next, budget) = delivery
                .drain_page(device, cursor.after, PAGE)
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
            .drain_page(device, cursor.after, PAGE)
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
