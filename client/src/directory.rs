//! The device directory cache: for each account this client writes to or
//! reads from, its device ids and `crypto_box` keys
//! (`GET /v1/users/{id}/devices`), so that a send needs no lookup.
//!
//! The cache is only a cache: a send refused with `devices_changed`
//! refetches its recipient's entry, a body that does not open refetches
//! its sender's, and a `devices_changed` frame refetches the account's own.
//! It is bounded by [`MAX_USERS`]; past it an arbitrary entry goes, and
//! costs one lookup when next needed. Beside the devices it keeps the
//! usernames learnt, to name peers, under the same bound. Its lock is a plain mutex held only
//! to copy an `Arc` in or out, never across an `.await`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crypto_box::PublicKey;
use uuid::Uuid;

/// Accounts kept. A chat client talks to far fewer; a bot to thousands of
/// users pays one lookup per user it has not written to lately.
pub(crate) const MAX_USERS: usize = 1024;

/// One device of an account, as a sender needs it.
#[derive(Clone)]
pub(crate) struct PeerDevice {
    pub device_id: u32,
    /// `None` for a key that is not 32 bytes: a device of another body
    /// format, which this client can neither write to nor read from.
    pub key: Option<PublicKey>,
}

#[derive(Default)]
pub(crate) struct DirectoryCache {
    users: Mutex<HashMap<Uuid, Arc<[PeerDevice]>>>,
    /// Usernames learnt (lookups by name, the directory's `username`), to
    /// name peers; bounded as `users` is.
    names: Mutex<HashMap<Uuid, String>>,
}

impl DirectoryCache {
    pub fn get(&self, user: Uuid) -> Option<Arc<[PeerDevice]>> {
        self.lock().get(&user).cloned()
    }

    pub fn put(&self, user: Uuid, devices: Arc<[PeerDevice]>) {
        let mut users = self.lock();
        if users.len() >= MAX_USERS
            && !users.contains_key(&user)
            && let Some(evicted) = users.keys().next().copied()
        {
            users.remove(&evicted);
        }
        users.insert(user, devices);
    }

    pub fn name(&self, user: Uuid) -> Option<String> {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user)
            .cloned()
    }

    pub fn put_name(&self, user: Uuid, name: &str) {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if names.len() >= MAX_USERS
            && !names.contains_key(&user)
            && let Some(evicted) = names.keys().next().copied()
        {
            names.remove(&evicted);
        }
        names.insert(user, name.to_owned());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<[PeerDevice]>>> {
        // A panic while holding it cannot leave the map half-written.
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_bound() {
        let cache = DirectoryCache::default();
        for _ in 0..MAX_USERS + 10 {
            cache.put(Uuid::new_v4(), Arc::from(Vec::new()));
        }
        assert_eq!(cache.lock().len(), MAX_USERS);
        let user = Uuid::new_v4();
        cache.put(
            user,
            Arc::from(vec![PeerDevice {
                device_id: 3,
                key: None,
            }]),
        );
        assert_eq!(cache.get(user).unwrap()[0].device_id, 3);
    }

    #[test]
    fn names_stay_within_their_bound() {
        let cache = DirectoryCache::default();
        let first = Uuid::new_v4();
        cache.put_name(first, "alice");
        assert_eq!(cache.name(first).as_deref(), Some("alice"));
        for i in 0..MAX_USERS + 10 {
            cache.put_name(Uuid::new_v4(), &format!("user{i}"));
        }
        assert_eq!(cache.names.lock().unwrap().len(), MAX_USERS);
    }
}
