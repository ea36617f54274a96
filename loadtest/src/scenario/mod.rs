//! The scenarios. Each runs one shard of a [`Plan`]: a setup phase, the
//! [`Gate`], then the measured phase, and returns what it measured after the
//! gate (the setup report goes to the gate).

pub mod attack;
pub mod connect;
pub mod drain;
pub mod groups;
pub mod pairs;
pub mod poll;
pub mod soak;
pub mod storm;
pub mod wakeups;

use crate::stats::Report;
use crate::{Gate, Plan, Shard, Spec};

pub async fn run(plan: &Plan, shard: Shard, gate: &mut Gate) -> anyhow::Result<Report> {
    match &plan.spec {
        Spec::Connect { conns, .. } => connect::run(plan, shard, gate, *conns).await,
        Spec::Pairs(traffic, fanout, kill) => {
            pairs::run(plan, shard, gate, traffic, fanout, kill).await
        }
        Spec::Drain { users, per_user } => drain::run(plan, shard, gate, *users, *per_user).await,
        Spec::Poll(traffic) => poll::run(plan, shard, gate, traffic).await,
        Spec::Storm { conns, timeout, .. } => storm::run(plan, shard, gate, *conns, *timeout).await,
        Spec::Soak(soak) => soak::run(plan, shard, gate, soak).await,
        Spec::Wakeups(load) => wakeups::run(plan, shard, gate, load).await,
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

/// Which of the run's nodes (`--url`, in order) the n-th socket of [`slot`]
/// goes to.
pub fn node_of(plan: &Plan, n: usize) -> usize {
    n % plan.targets.len()
}

/// The set-up of `what` ("pair", "sender"), one result per unit: the
/// units ready, and the setup report for the gate, counting
/// `{what}s_ready` and `fail_{what}_setup` (the first failure printed, not
/// every one of thousands).
pub fn ready<T, E: std::fmt::Display>(
    what: &str,
    opened: impl IntoIterator<Item = Result<T, E>>,
) -> (Vec<T>, Report) {
    let failed = format!("fail_{what}_setup");
    let mut setup = Report::default();
    let mut ready = Vec::new();
    for unit in opened {
        match unit {
            Ok(unit) => ready.push(unit),
            Err(e) => {
                if setup.count(&failed) == 0 {
                    eprintln!("{what} setup failed: {e:#}");
                }
                setup.add(&failed, 1);
            }
        }
    }
    setup.add(&format!("{what}s_ready"), ready.len() as u64);
    (ready, setup)
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

/// Where pair `pair`'s sockets go among `nodes` targets: its receiver's
/// device `k` (0 for device 1) and its sender. With several nodes the
/// receiver (device 1) is on node i = pair mod n and the sender on node
/// i + 1, so every push crosses between nodes; further devices go on
/// nodes i - 1, i - 2, ..., away from the sender's as long as there are
/// nodes to spare. One node: everything on it.
pub fn pair_nodes(pair: usize, nodes: usize, devices: usize) -> (Vec<usize>, usize) {
    let nodes = nodes.max(1);
    let home = pair % nodes;
    let receivers = (0..devices)
        .map(|k| (home + nodes - k % nodes) % nodes)
        .collect();
    (receivers, (home + 1) % nodes)
}

/// How a message arrived at a receiving device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Its first arrival.
    First,
    /// Again, on the same connection: the server sent it twice.
    Duplicate,
    /// Again, on a later connection of the device: expected for a message
    /// whose ack went to a node that died before committing it.
    Redelivered,
}

/// Checks one stream of sequence numbers from one sender: counts
/// duplicates, reorderings and, given the confirmed set, losses. A device
/// that reconnects numbers its connections, so a copy it gets again on a
/// later one is told apart from a duplicate.
#[derive(Default)]
pub struct Sequence {
    /// Each sequence number seen, with the connection it first came on.
    seen: std::collections::HashMap<u64, u32>,
    highest: Option<u64>,
    pub duplicates: u64,
    pub redelivered: u64,
    pub out_of_order: u64,
}

impl Sequence {
    pub fn observe(&mut self, seq: u64) {
        self.arrive(seq, 0);
    }

    /// Records `seq` arriving on connection number `connection`.
    pub fn arrive(&mut self, seq: u64, connection: u32) -> Arrival {
        if let Some(&first) = self.seen.get(&seq) {
            return if first == connection {
                self.duplicates += 1;
                Arrival::Duplicate
            } else {
                self.redelivered += 1;
                Arrival::Redelivered
            };
        }
        self.seen.insert(seq, connection);
        if self.highest.is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.highest = Some(self.highest.map_or(seq, |h| h.max(seq)));
        Arrival::First
    }

    /// Records a late first arrival (read from the queue after the run)
    /// without judging its order; returns whether it was new.
    pub fn recover(&mut self, seq: u64, connection: u32) -> bool {
        if self.seen.contains_key(&seq) {
            return false;
        }
        self.seen.insert(seq, connection);
        true
    }

    pub fn unique(&self) -> u64 {
        self.seen.len() as u64
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.seen.contains_key(&seq)
    }

    /// How many of `confirmed` never arrived.
    pub fn lost(&self, confirmed: &[u64]) -> u64 {
        confirmed.iter().filter(|s| !self.contains(**s)).count() as u64
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

    #[test]
    fn a_copy_on_a_later_connection_is_a_redelivery_not_a_duplicate() {
        let mut seq = Sequence::default();
        assert_eq!(seq.arrive(0, 0), Arrival::First);
        assert_eq!(seq.arrive(1, 0), Arrival::First);
        assert_eq!(seq.arrive(1, 0), Arrival::Duplicate);
        // Connection 1: the backlog brings 1 again (its ack was lost), then 2.
        assert_eq!(seq.arrive(1, 1), Arrival::Redelivered);
        assert_eq!(seq.arrive(2, 1), Arrival::First);
        assert_eq!(
            (seq.duplicates, seq.redelivered, seq.out_of_order),
            (1, 1, 0)
        );
        // A late one read from the queue is new once, and not out of order.
        assert!(seq.recover(3, 2) && !seq.recover(3, 2) && !seq.recover(0, 2));
        assert_eq!((seq.unique(), seq.out_of_order), (4, 0));
    }

    #[test]
    fn pairs_cross_nodes_when_there_are_several() {
        // One node: everything on it.
        assert_eq!(pair_nodes(5, 1, 2), (vec![0, 0], 0));
        // Receiver on node i, sender on i + 1, for every pair.
        for nodes in 2..=4 {
            for pair in 0..10 {
                let (receivers, sender) = pair_nodes(pair, nodes, 1);
                assert_eq!(receivers, vec![pair % nodes]);
                assert_eq!(sender, (pair + 1) % nodes);
                assert_ne!(receivers[0], sender);
            }
        }
        // Three nodes, two devices: both away from the sender's node.
        let (receivers, sender) = pair_nodes(0, 3, 2);
        assert_eq!((receivers, sender), (vec![0, 2], 1));
        // The pairs' receivers spread evenly over the nodes.
        let mut per_node = [0; 3];
        for pair in 0..300 {
            per_node[pair_nodes(pair, 3, 1).0[0]] += 1;
        }
        assert_eq!(per_node, [100, 100, 100]);
    }
}
