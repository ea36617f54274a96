//! Devices: the rules for a device's name, the [`Directory`] of each
//! account's device numbers that the delivery core checks every send
//! against, and the [`DevicesChange`] an account's sockets are told of.
//!
//! A send must carry one envelope per current device of its recipient
//! ([`mismatch`] says which are missing and which are extra), so every send
//! needs the recipient's device numbers. The directory keeps them in memory:
//! an online recipient costs no query, as it did before devices.
//!
//! The cache is exact on one node: every change to an account's devices
//! made by this process (add, remove, account deletion) calls
//! [`Directory::changed`] after the change commits, under the delivery
//! core's order lock, and a send checks under that lock that the list it
//! was admitted against is still the cached one. A load racing a change
//! cannot put a stale list back: a load is kept only if no change was
//! announced since it began (the `epoch` below), checked under the same
//! shard lock that `changed` takes to remove the entry.
//!
//! A change made by another node of a cluster reaches this one through the
//! broker within its latency (milliseconds): the delivery core announces
//! every add, removal and deletion, and each node drops the entry (and, for
//! a removal, purges the copies it had in flight). A change made by
//! `sealpost user delete`, or one whose announcement the broker lost,
//! arrives through the revocations every node polls (every removal and
//! deletion records one), within `SEALPOST_REVOCATION_POLL_INTERVAL`.
//! Until then a send may be checked against the old list.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::{DeviceId, DeviceIds};

/// The most characters of a device name: room for "Alice's work laptop
/// (2026)" in any script, small enough for a directory row.
pub const MAX_NAME_CHARS: usize = 64;

/// Checks a device name: 1 to [`MAX_NAME_CHARS`] characters, no control
/// characters (they would let a name fake lines in a client's list) and no
/// format characters (general category Cf: the bidi controls such as U+202E
/// RIGHT-TO-LEFT OVERRIDE, which make "laptop\u{202E}exe.txt" read
/// "laptoptxt.exe", and invisible ones that make two names look alike). The
/// zero-width joiner and non-joiner stay: emoji sequences and Persian and
/// Indic text need them, and they reorder nothing.
pub fn validate_name(name: &str) -> Result<()> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.chars().any(refused_in_name) {
        return Err(Error::field(
            "name",
            format!(
                "must be 1-{MAX_NAME_CHARS} characters, none of them control or format (bidi) characters"
            ),
        ));
    }
    Ok(())
}

fn refused_in_name(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.is_control()
        || (c.general_category() == GeneralCategory::Format
            && !matches!(c, '\u{200C}' | '\u{200D}'))
}

/// What happened to a device of an account, as its other devices are
/// told (`devices_changed`): the ways someone holding the password can
/// put a device of theirs in the account, or take one over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeReason {
    /// A device was added (`POST /v1/devices`).
    Added,
    /// A device was removed, with its sessions and queue.
    Removed,
    /// A device's key was replaced: peers now encrypt to the new one.
    Key,
    /// A new session of an existing device was opened with the password.
    Login,
}

/// A change of one of an account's devices, for the account's sockets.
/// The sockets of the device it is about are not told: it knows.
#[derive(Debug, Clone)]
pub struct DevicesChange {
    /// The account's device numbers after the change, ascending.
    pub devices: Arc<[DeviceId]>,
    /// The device the change is about, and what happened to it; `None`
    /// from a node of before they were carried (a rolling upgrade).
    pub about: Option<(DeviceId, ChangeReason)>,
}

impl DevicesChange {
    /// Whether a socket of `device` is told of it: every device but the
    /// one it is about.
    pub fn tells(&self, device: DeviceId) -> bool {
        self.about.is_none_or(|(about, _)| about != device)
    }
}

/// Accounts whose device lists are kept. Each entry is an id and a few
/// numbers, under 100 bytes: 100,000 entries are about 10 MiB. Past the
/// bound the whole cache is dropped and refilled on demand, which costs one
/// indexed query per account next sent to.
const CACHE_BOUND: usize = 100_000;

pub struct Directory {
    accounts: Arc<dyn DeviceIds>,
    /// Account → its device numbers in ascending order.
    cache: DashMap<Uuid, Arc<[DeviceId]>>,
    /// Bumped by every [`Directory::changed`], before the entry is removed.
    epoch: AtomicU64,
}

impl Directory {
    pub fn new(accounts: Arc<dyn DeviceIds>) -> Self {
        Self {
            accounts,
            cache: DashMap::new(),
            epoch: AtomicU64::new(0),
        }
    }

    /// The account's device numbers in ascending order; empty if there is
    /// no such account.
    pub async fn devices(&self, user: Uuid) -> Result<Arc<[DeviceId]>> {
        if let Some(devices) = self.cache.get(&user) {
            return Ok(devices.clone());
        }
        let began = self.epoch.load(Ordering::Acquire);
        let devices: Arc<[DeviceId]> = self.accounts.device_ids(user).await?.into();
        // Unknown accounts are not cached: a name that does not exist yet
        // may be registered a moment later.
        if !devices.is_empty() {
            if self.cache.len() >= CACHE_BOUND {
                self.cache.clear();
            }
            let entry = self.cache.entry(user);
            if self.epoch.load(Ordering::Acquire) == began {
                entry.insert(devices.clone());
            }
        }
        Ok(devices)
    }

    /// Whether `listed`, read by [`Directory::devices`], is still the
    /// account's list here: no change was announced since (an uncached
    /// list never is, and is read again).
    pub fn is_current(&self, user: Uuid, listed: &Arc<[DeviceId]>) -> bool {
        self.cache
            .get(&user)
            .is_some_and(|cached| Arc::ptr_eq(&cached, listed))
    }

    /// The account's devices changed (committed): forget its list.
    pub fn changed(&self, user: Uuid) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.remove(&user);
    }
}

/// How the devices a send addresses differ from the devices it must
/// address, both ascending and without repeats: `None` if they are the
/// same, else the missing and the extra ones.
pub fn mismatch(expected: &[DeviceId], given: &[DeviceId]) -> Option<(Vec<u32>, Vec<u32>)> {
    if expected == given {
        return None;
    }
    let missing = expected
        .iter()
        .filter(|d| given.binary_search(d).is_err())
        .copied()
        .collect();
    let extra = given
        .iter()
        .filter(|d| expected.binary_search(d).is_err())
        .copied()
        .collect();
    Some((missing, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_name_both_sides() {
        assert_eq!(mismatch(&[1, 2], &[1, 2]), None);
        assert_eq!(mismatch(&[], &[]), None);
        assert_eq!(mismatch(&[1, 2, 3], &[2, 5]), Some((vec![1, 3], vec![5])));
        assert_eq!(mismatch(&[1], &[]), Some((vec![1], vec![])));
        assert_eq!(mismatch(&[], &[4]), Some((vec![], vec![4])));
    }

    #[test]
    fn names() {
        for ok in [
            "phone",
            "Alice's laptop",
            "Телефон",
            &"x".repeat(64),
            "\u{1F469}\u{200D}\u{1F4BB} work",
            "می\u{200C}خواهم",
        ] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "tab\there",
            "line\nbreak",
            &"x".repeat(65),
            "\u{7f}",
            "laptop\u{202E}exe.txt",
            "\u{2066}isolate\u{2069}",
            "left\u{200E}mark",
            "zero\u{200B}width",
            "bom\u{FEFF}",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
