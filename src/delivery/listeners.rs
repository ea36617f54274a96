//! Post-commit listeners: who hears of a message once its copies are
//! durable.
//!
//! The committer tells each listener, in the order they were given, of
//! every message it wrote, one message at a time in commit order, before it
//! answers anyone. Two listen today: the broker (other nodes push the
//! copies to their sockets: [`BrokerListener`]) and the wake-up scheduler
//! ([`crate::push::scheduler`]). A new feature that needs the same moment
//! adds a listener rather than a call in the committer.
//!
//! Only copies that were written are told: a copy acked inside its ack
//! window was never written, and no listener hears of it (no other node
//! needs it, no device needs waking for it).
//!
//! A listener runs on the committer's task: it must return at once (hand
//! the work to a task of its own through a bounded queue, or drop it and
//! count), never wait.

use std::sync::Arc;
use std::time::SystemTime;

use crate::cluster::{Broker, Push};
use crate::store::Message;

/// What the committer knows of a written message beside its copies.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    /// When the delivery core accepted it: the start of the latencies the
    /// listeners measure (cross-node push, wake-up).
    pub accepted: SystemTime,
    /// The send's `"urgent"` (true unless the sender said otherwise):
    /// whether an offline device is woken at once and at high priority.
    pub urgent: bool,
}

/// Told of every message the committer writes.
pub trait CommitListener: Send + Sync {
    /// `copies` are the written copies of one message (one recipient, one
    /// id, at least one copy), in device order. Never waits.
    fn committed(&self, copies: &[Arc<Message>], meta: &Committed);
}

/// The broker's publish: other nodes hear of a message only after it is
/// durable, and in this node's commit order ([`crate::cluster`]). Given to
/// the committer only when there are other nodes.
pub struct BrokerListener(pub Arc<dyn Broker>);

impl CommitListener for BrokerListener {
    fn committed(&self, copies: &[Arc<Message>], meta: &Committed) {
        if let Some(push) = Push::of(copies, meta.accepted, false) {
            self.0.committed(push);
        }
    }
}

/// The listeners of a node: the broker's publish (when not alone), then
/// `others`.
pub fn with_broker(
    broker: &Arc<dyn Broker>,
    others: impl IntoIterator<Item = Arc<dyn CommitListener>>,
) -> Vec<Arc<dyn CommitListener>> {
    let mut listeners: Vec<Arc<dyn CommitListener>> = Vec::new();
    if !broker.alone() {
        listeners.push(Arc::new(BrokerListener(broker.clone())));
    }
    listeners.extend(others);
    listeners
}
