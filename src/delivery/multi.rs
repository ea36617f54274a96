//! The multi-recipient send: one message to many accounts (a group
//! message), checked, stored and pushed all or nothing, under one id.
//!
//! It comes in two forms ([`Multi`]): an envelope per recipient device, or
//! one shared body with a few bytes of key material per device. A shared
//! body is one allocation in memory however many copies carry it, crosses
//! to another node once per account, and is stored once
//! ([`crate::store::SealedBody`]); each copy's row holds only its key.
//!
//! **All or nothing.** Every recipient account's devices are checked
//! before anything is charged to a queue, pushed or stored, and every
//! mismatch is reported at once ([`Error::RecipientsChanged`],
//! [`Error::UnknownRecipients`]), so that a client fixes its group in one
//! round trip. The copies of all accounts are then one insert for the
//! committer: one transaction, one answer.
//!
//! **Order.** The message takes its id, is staged and is pushed under the
//! same order lock as a single send ([`Delivery::accept`]), so each
//! sender device's messages, single and multi mixed, reach each recipient
//! device in id order, live and from the backlog. Its copies are grouped
//! by recipient, which is how the committer hands them to its listeners
//! (one publish per account to the other nodes).

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Accepted, Address, Delivery, Ephemeral, within};
use crate::cluster::Push;
use crate::devices;
use crate::error::{Error, Mismatch, Result};
use crate::limits::queue::Charge;
use crate::metrics::{Kind, Limited};
use crate::seal;
use crate::store::{self, DeviceId, Message};
use crate::wire::{self, parse_id};

/// What one multi-recipient send may carry (`SEALPOST_MAX_RECIPIENTS_PER_SEND`,
/// `SEALPOST_MAX_DEVICES_PER_SEND`, `SEALPOST_MAX_KEY_BYTES`).
#[derive(Debug, Clone, Copy)]
pub struct MultiLimits {
    pub max_recipients: usize,
    pub max_devices: usize,
    pub max_key_bytes: usize,
}

/// A decoded multi-recipient send.
pub struct Multi {
    /// The shared body, for the shared form.
    shared: Option<Bytes>,
    /// Each recipient account, in the order given, with its devices'
    /// envelopes (or, with `shared`, key material), in device order.
    recipients: Vec<(Uuid, Vec<(DeviceId, Bytes)>)>,
    /// Whether acks send receipts.
    receipts: bool,
}

impl Multi {
    /// Copies the send makes.
    fn devices(&self) -> usize {
        self.recipients.iter().map(|(_, e)| e.len()).sum()
    }

    /// Whether its rows need the flagged format (a key, or no receipts).
    fn flagged(&self) -> bool {
        self.shared.is_some() || !self.receipts
    }

    /// The body bytes it holds in memory: the shared body once, each
    /// envelope or key.
    fn bytes(&self) -> usize {
        self.shared.as_ref().map_or(0, Bytes::len)
            + self
                .recipients
                .iter()
                .flat_map(|(_, e)| e.iter().map(|(_, b)| b.len()))
                .sum::<usize>()
    }

    /// What a retry must match: SHA-256 over the form, the shared body,
    /// `receipts` and every entry, each length-prefixed.
    fn digest(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update(b"multi");
        match &self.shared {
            Some(shared) => {
                hash.update([1]);
                hash.update((shared.len() as u64).to_be_bytes());
                hash.update(shared);
            }
            None => hash.update([0]),
        }
        hash.update([u8::from(self.receipts)]);
        for (to, entries) in &self.recipients {
            hash.update(to.as_bytes());
            hash.update((entries.len() as u64).to_be_bytes());
            for (device, bytes) in entries {
                hash.update(device.to_be_bytes());
                hash.update((bytes.len() as u64).to_be_bytes());
                hash.update(bytes);
            }
        }
        hash.finalize().to_vec()
    }

    /// The message's copies under `id`, grouped by recipient in the order
    /// given, each group in device order.
    fn stamp(&self, from: Address, id: Uuid, sent_at: DateTime<Utc>) -> Vec<Arc<Message>> {
        let mut copies = Vec::with_capacity(self.devices());
        for (to, entries) in &self.recipients {
            for (device, bytes) in entries {
                let (body, key) = match &self.shared {
                    Some(shared) => (shared.clone(), Some(bytes.clone())),
                    None => (bytes.clone(), None),
                };
                copies.push(Arc::new(Message {
                    id,
                    recipient: *to,
                    device: *device,
                    sender: from.user,
                    sender_device: from.device,
                    body,
                    key,
                    receipts: self.receipts,
                    sent_at,
                }));
            }
        }
        copies
    }
}

impl Delivery {
    /// Decodes and checks a multi-recipient send as it came over the wire:
    /// its form, its sizes and the limits, before anything is looked up.
    pub fn decode_multi(&self, send: &wire::MultiSend) -> Result<Multi> {
        let limits = self.multi;
        if send.recipients.is_empty() {
            return Err(Error::field("recipients", "must name at least one account"));
        }
        if send.recipients.len() > limits.max_recipients {
            return Err(Error::field(
                "recipients",
                format!("at most {} accounts per send", limits.max_recipients),
            ));
        }
        let named: usize = send
            .recipients
            .iter()
            .map(|r| r.envelopes.as_ref().map_or(0, Vec::len) + r.keys.as_ref().map_or(0, Vec::len))
            .sum();
        if named > limits.max_devices {
            return Err(Error::field(
                "recipients",
                format!("at most {} devices per send", limits.max_devices),
            ));
        }
        let shared = send
            .shared
            .as_deref()
            .map(|shared| self.decode_body("shared", shared))
            .transpose()?
            .map(Bytes::from);
        let mut seen = HashSet::with_capacity(send.recipients.len());
        let mut recipients = Vec::with_capacity(send.recipients.len());
        for recipient in &send.recipients {
            let to = parse_id("to", &recipient.to)?;
            if !seen.insert(to) {
                return Err(Error::field(
                    "recipients",
                    format!("names account {to} twice"),
                ));
            }
            let mut entries = match (&shared, &recipient.envelopes, &recipient.keys) {
                (None, Some(envelopes), None) => envelopes
                    .iter()
                    .map(|e| Ok((e.device_id, self.decode_body("envelopes", &e.body)?.into())))
                    .collect::<Result<Vec<(DeviceId, Bytes)>>>()?,
                (Some(_), None, Some(keys)) => keys
                    .iter()
                    .map(|k| Ok((k.device_id, self.decode_key(&k.key)?)))
                    .collect::<Result<Vec<(DeviceId, Bytes)>>>()?,
                (None, _, Some(_)) => {
                    return Err(Error::field("shared", "`keys` need a `shared` body"));
                }
                (Some(_), Some(_), _) => {
                    return Err(Error::field(
                        "recipients",
                        "with a `shared` body every recipient has `keys`, not `envelopes`",
                    ));
                }
                _ => {
                    return Err(Error::field(
                        "recipients",
                        "every recipient has `envelopes` (or, with `shared`, `keys`)",
                    ));
                }
            };
            if entries.is_empty() {
                return Err(Error::field(
                    "recipients",
                    format!("the entry for {to} names no device"),
                ));
            }
            entries.sort_unstable_by_key(|(device, _)| *device);
            if entries.windows(2).any(|pair| pair[0].0 == pair[1].0) {
                let field = if shared.is_some() {
                    "keys"
                } else {
                    "envelopes"
                };
                return Err(Error::field(field, "names a device more than once"));
            }
            recipients.push((to, entries));
        }
        Ok(Multi {
            shared,
            recipients,
            receipts: send.receipts,
        })
    }

    /// One device's key material: base64, 1 to `max_key_bytes` bytes.
    fn decode_key(&self, encoded: &str) -> Result<Bytes> {
        let max = self.multi.max_key_bytes;
        let too_long = || Error::field("keys", format!("a key is at most {max} bytes"));
        if encoded.len() > max.div_ceil(3) * 4 {
            return Err(too_long());
        }
        let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded)
            .map_err(|_| {
                Error::field("keys", "must be standard base64 (RFC 4648, with padding)")
            })?;
        if key.is_empty() {
            return Err(Error::field("keys", "must not be empty"));
        }
        if key.len() > max {
            return Err(too_long());
        }
        Ok(key.into())
    }

    /// Checks every recipient's entry against its current devices: all
    /// mismatches and unknown accounts at once. Returns each recipient's
    /// device list as the directory holds it, to check again under the
    /// order lock.
    async fn check_recipients(
        &self,
        from: Address,
        multi: &Multi,
    ) -> Result<Vec<(Uuid, Arc<[DeviceId]>)>> {
        let mut listed = Vec::with_capacity(multi.recipients.len());
        let (mut unknown, mut changed) = (Vec::new(), Vec::new());
        for (to, entries) in &multi.recipients {
            let devices = self.directory.devices(*to).await?;
            if devices.is_empty() {
                unknown.push(*to);
                continue;
            }
            let covered = super::covered(from, *to, &devices);
            let given: Vec<DeviceId> = entries.iter().map(|(d, _)| *d).collect();
            if let Some((missing, extra)) = devices::mismatch(&covered, &given) {
                changed.push(Mismatch {
                    to: *to,
                    missing,
                    extra,
                });
            }
            listed.push((*to, devices));
        }
        if !unknown.is_empty() {
            return Err(Error::UnknownRecipients(unknown));
        }
        if !changed.is_empty() {
            return Err(Error::RecipientsChanged(changed));
        }
        Ok(listed)
    }

    /// Takes the send from the sender's budget, one token per recipient
    /// account, and one from its budget towards each.
    fn check_multi_budget(&self, from: Address, multi: &Multi) -> Result<()> {
        let accounts = u32::try_from(multi.recipients.len()).unwrap_or(u32::MAX);
        self.budget
            .check_n(from.user, accounts)
            .inspect_err(|_| self.metrics.rate_limited(Limited::Send))?;
        for (to, _) in &multi.recipients {
            self.pairs
                .check(from.user, *to)
                .inspect_err(|_| self.metrics.rate_limited(Limited::Pair))?;
        }
        Ok(())
    }

    /// Accepts a multi-recipient send and returns once it is durable.
    pub async fn send_multi(
        &self,
        from: Address,
        multi: Multi,
        client_id: Option<String>,
        urgent: bool,
    ) -> Result<Accepted> {
        let mut accepted = self.accept_multi(from, multi, client_id, urgent).await?;
        (&mut accepted.durable).await?;
        Ok(accepted)
    }

    /// Accepts a multi-recipient send: checks every recipient, charges
    /// every device's queue, assigns the one id, enqueues all the copies as
    /// one insert and pushes each to its device's online connections, as
    /// [`Delivery::accept`] does for one recipient. Any refusal leaves
    /// nothing behind: no queue charge, no push, no row.
    pub async fn accept_multi(
        &self,
        from: Address,
        multi: Multi,
        client_id: Option<String>,
        urgent: bool,
    ) -> Result<Accepted> {
        self.check_multi_budget(from, &multi)?;
        let expires = tokio::time::Instant::now() + self.deadline;
        let claim = match client_id {
            None => None,
            Some(client_id) => match self.claim(from, multi.digest(), client_id, expires).await? {
                Ok(claim) => Some(claim),
                Err(id) => {
                    self.metrics.sends_repeated.increment(1);
                    return Ok(Accepted {
                        id,
                        sent_at: store::id_time(id),
                        durable: Box::pin(std::future::ready(Ok(()))),
                    });
                }
            },
        };
        let flagged = multi.flagged();
        // What each recipient's copies take in the store, for the caps.
        let stored: Vec<(Uuid, Vec<(DeviceId, u64)>)> = multi
            .recipients
            .iter()
            .map(|(to, entries)| {
                let sizes = entries
                    .iter()
                    .map(|(d, b)| (*d, seal::row_bytes(b.len(), flagged)))
                    .collect();
                (*to, sizes)
            })
            .collect();
        let stored = Arc::new(stored);
        // Gives back the charges of the copies not stored: all, or those
        // named (recipient, device).
        let release = {
            let (queues, keys, stored) = (self.queues.clone(), self.keys.clone(), stored.clone());
            move |only: Option<&[(Uuid, DeviceId)]>| {
                for (to, sizes) in stored.iter() {
                    let tag = keys.sender_tag(from.user, *to);
                    let charges: Vec<Charge> = sizes
                        .iter()
                        .filter(|(d, _)| only.is_none_or(|only| only.contains(&(*to, *d))))
                        .map(|&(device, bytes)| Charge {
                            device,
                            tag: Some(tag),
                            bytes,
                        })
                        .collect();
                    if !charges.is_empty() {
                        queues.release(*to, charges);
                    }
                }
            }
        };
        // As for a single send: a device list changes a few times in an
        // account's life, so three rounds that all race a change are 503.
        for _ in 0..3 {
            let listed = self.check_recipients(from, &multi).await?;
            for (reserved, (to, sizes)) in stored.iter().enumerate() {
                let tag = self.keys.sender_tag(from.user, *to);
                if let Err(err) = self
                    .queues
                    .reserve(self.queue.as_ref(), *to, tag, sizes)
                    .await
                {
                    let done: Vec<(Uuid, DeviceId)> = stored[..reserved]
                        .iter()
                        .flat_map(|(to, sizes)| sizes.iter().map(move |(d, _)| (*to, *d)))
                        .collect();
                    release(Some(&done));
                    return Err(err);
                }
            }
            let slot = match self.committer.reserve(multi.bytes(), expires).await {
                Ok(slot) => slot,
                Err(err) => {
                    release(None);
                    return Err(err);
                }
            };
            let order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
            if !listed
                .iter()
                .all(|(to, devices)| self.directory.is_current(*to, devices))
            {
                drop(order);
                drop(slot);
                release(None);
                continue;
            }
            let id = Uuid::now_v7();
            let sent_at = store::id_time(id);
            let messages = multi.stamp(from, id, sent_at);
            let key = claim.map(|claim| claim.bind(id));
            let staged = slot.stage(messages.clone(), SystemTime::now(), urgent, key);
            let reached: usize = messages
                .chunk_by(|a, b| a.recipient == b.recipient)
                .map(|copies| self.push_here(copies[0].recipient, copies.to_vec(), false))
                .sum();
            let insert = staged.enqueue(reached > 0);
            drop(order);
            let metrics = self.metrics.clone();
            let durable = within(expires, async move {
                match insert.await {
                    Ok(()) => {
                        metrics.accepted(Kind::Stored);
                        Ok(())
                    }
                    Err(unstored) => {
                        release(unstored.devices.as_deref());
                        Err(unstored.error)
                    }
                }
            });
            return Ok(Accepted {
                id,
                sent_at,
                durable,
            });
        }
        tracing::warn!("the recipients' devices kept changing during a multi-recipient send");
        Err(Error::Unavailable)
    }

    /// Pushes a multi-recipient message to the recipient devices'
    /// connections online now, on this node and the others, storing
    /// nothing; `delivered` once any connection took it. Checked as a
    /// stored one is, all or nothing.
    pub async fn send_multi_ephemeral(&self, from: Address, multi: Multi) -> Result<Ephemeral> {
        self.check_recipients(from, &multi).await?;
        self.check_multi_budget(from, &multi)?;
        let (id, sent_at, pushes, delivered) = {
            let _order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
            let id = Uuid::now_v7();
            let sent_at = store::id_time(id);
            let messages = multi.stamp(from, id, sent_at);
            let mut pushes = Vec::new();
            let mut delivered = 0;
            for copies in messages.chunk_by(|a, b| a.recipient == b.recipient) {
                if !self.broker.alone() {
                    pushes.extend(Push::of(copies, SystemTime::now(), true));
                }
                delivered += self.push_here(copies[0].recipient, copies.to_vec(), true);
            }
            (id, sent_at, pushes, delivered > 0)
        };
        let mut delivered = delivered;
        for push in pushes {
            // Ask only while no socket has taken it yet.
            delivered = self.broker.ephemeral(push, !delivered).await || delivered;
        }
        self.metrics.accepted(Kind::Ephemeral);
        Ok(Ephemeral {
            id,
            sent_at,
            delivered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn multi(shared: Option<&[u8]>, receipts: bool) -> Multi {
        Multi {
            shared: shared.map(Bytes::copy_from_slice),
            recipients: vec![
                (Uuid::from_u128(1), vec![(1, Bytes::from_static(b"a"))]),
                (
                    Uuid::from_u128(2),
                    vec![(1, Bytes::from_static(b"b")), (2, Bytes::from_static(b"c"))],
                ),
            ],
            receipts,
        }
    }

    #[test]
    fn a_retry_must_repeat_the_whole_send() {
        let base = multi(Some(b"shared"), true).digest();
        assert_eq!(base, multi(Some(b"shared"), true).digest());
        assert_ne!(base, multi(Some(b"other"), true).digest());
        assert_ne!(base, multi(None, true).digest());
        assert_ne!(base, multi(Some(b"shared"), false).digest());
        let mut reordered = multi(Some(b"shared"), true);
        reordered.recipients.reverse();
        assert_ne!(base, reordered.digest());
    }

    #[test]
    fn copies_share_one_body_and_carry_their_own_keys() {
        let send = multi(Some(b"the shared body"), false);
        let id = Uuid::now_v7();
        let from = Address {
            user: Uuid::from_u128(9),
            device: 1,
        };
        let copies = send.stamp(from, id, store::id_time(id));
        assert_eq!(copies.len(), 3);
        assert!(copies.iter().all(|c| c.id == id && !c.receipts));
        assert!(
            copies
                .iter()
                .all(|c| c.body.as_ptr() == copies[0].body.as_ptr())
        );
        let keys: Vec<&[u8]> = copies.iter().map(|c| c.key.as_deref().unwrap()).collect();
        assert_eq!(keys, [b"a", b"b", b"c"]);
        // Grouped by recipient, in the order given.
        let groups: Vec<Uuid> = copies
            .chunk_by(|a, b| a.recipient == b.recipient)
            .map(|g| g[0].recipient)
            .collect();
        assert_eq!(groups, [Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert_eq!(super::super::body_bytes(&copies), send.bytes());
    }
}
