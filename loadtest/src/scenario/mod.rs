//! The scenarios. Each runs one shard of a [`Plan`]: a setup phase, the
//! [`Gate`], then the measured phase, and returns what it measured after the
//! gate (the setup report goes to the gate).

pub mod connect;
pub mod drain;
pub mod pairs;
pub mod poll;
pub mod storm;

use crate::stats::Report;
use crate::{Gate, Plan, Shard, Spec};

pub async fn run(plan: &Plan, shard: Shard, gate: &mut Gate) -> anyhow::Result<Report> {
    match &plan.spec {
        Spec::Connect { conns, .. } => connect::run(plan, shard, gate, *conns).await,
        Spec::Pairs(traffic, fanout) => pairs::run(plan, shard, gate, traffic, fanout).await,
        Spec::Drain { users, per_user } => drain::run(plan, shard, gate, *users, *per_user).await,
        Spec::Poll(traffic) => poll::run(plan, shard, gate, traffic).await,
        Spec::Storm { conns, timeout, .. } => storm::run(plan, shard, gate, *conns, *timeout).await,
    }
}

/// The n-th socket of a run: which account, target and source address it
/// uses. Spreading by index keeps every shard's share even.
pub fn slot(
    plan: &Plan,
    n: usize,
) -> (
    &crate::client::Account,
    &crate::client::Target,
    Option<std::net::IpAddr>,
) {
    (
        &plan.accounts[n % plan.accounts.len()],
        &plan.targets[n % plan.targets.len()],
        plan.sources[n % plan.sources.len()],
    )
}

/// Sockets opened at once per shard: enough to connect thousands per second,
/// few enough not to flood the server's accept queue.
pub const CONNECT_CONCURRENCY: usize = 256;

/// A message body that carries its send time and sequence number, padded to
/// `size` bytes.
pub fn stamp(seq: u64, size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size.max(16));
    body.extend_from_slice(&crate::stats::now_nanos().to_be_bytes());
    body.extend_from_slice(&seq.to_be_bytes());
    body.resize(size.max(16), 0x5a);
    body
}

/// The (send time, sequence) a [`stamp`] carries.
pub fn unstamp(body: &[u8]) -> Option<(u64, u64)> {
    let nanos = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let seq = u64::from_be_bytes(body.get(8..16)?.try_into().ok()?);
    Some((nanos, seq))
}

/// Checks one stream of sequence numbers from one sender: counts
/// duplicates, reorderings and, given the confirmed set, losses.
#[derive(Default)]
pub struct Sequence {
    seen: std::collections::HashSet<u64>,
    highest: Option<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl Sequence {
    pub fn observe(&mut self, seq: u64) {
        if !self.seen.insert(seq) {
            self.duplicates += 1;
            return;
        }
        if self.highest.is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
    }

    pub fn unique(&self) -> u64 {
        self.seen.len() as u64
    }

    /// How many of `confirmed` never arrived.
    pub fn lost(&self, confirmed: &[u64]) -> u64 {
        confirmed.iter().filter(|s| !self.seen.contains(s)).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_sequences_are_checked() {
        let body = stamp(42, 256);
        assert_eq!(body.len(), 256);
        assert_eq!(unstamp(&body).unwrap().1, 42);
        let mut seq = Sequence::default();
        for s in [0, 1, 3, 2, 3] {
            seq.observe(s);
        }
        assert_eq!((seq.duplicates, seq.out_of_order, seq.unique()), (1, 1, 4));
        assert_eq!(seq.lost(&[0, 1, 2, 3, 4]), 1);
    }
}
