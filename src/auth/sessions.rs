//! Session revocation. A session is one login: its refresh-token family,
//! whose id every access token of the session carries as `sid`.
//!
//! Revoking a session (logout, logout-all, password change, account
//! deletion, refresh-token reuse, an operator disabling or deleting the
//! account) records it in the store, deletes its refresh tokens, refuses its
//! access tokens from then on, and closes its live sockets with 4401. Access
//! tokens are checked against an in-memory set, so authentication costs no
//! query; the set is loaded at start-up from the revocations younger than
//! one access-token lifetime (older ones cannot match an unexpired token)
//! and pruned by the sweeper.
//!
//! A revocation made by this process applies here at once, and is announced
//! to the other nodes of a cluster through the broker, which apply it as
//! it arrives ([`Revocations::learn_remote`]). Every revocation is also in
//! the store: [`Revocations::follow`] reads the new ones every
//! `SEALPOST_REVOCATION_POLL_INTERVAL` and applies those not known yet,
//! which covers `sealpost user disable` and `delete` (they write to the
//! database directly) and anything the broker lost.
//! (Refresh tokens are revoked everywhere at once: they live in the shared
//! database.)

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cluster::{Announce, Broker};
use crate::error::Result;
use crate::hub::{Hub, Kick};
use crate::store::{self, DeviceId, Revoked, Sessions, Store};

/// How far before its last look [`Revocations::follow`] reads again. A
/// revocation is stamped before its transaction commits, and by the clock of
/// whichever process made it; a row stamped before the last look but
/// committed after it, or stamped by a clock running behind, would be
/// missed by a read from the last look on. A minute covers a slow commit
/// (the pool's acquire timeout is 5 s) and any sane clock skew; rows read
/// twice are recognised and skipped. Each read returns every revocation of
/// its window: at 100 logouts a second cluster-wide, some 6,500 ids per
/// look, read through the `revoked_at` index.
const LOOKBACK: Duration = Duration::from_secs(60);

pub struct Revocations {
    /// Revoked session → when it was revoked.
    revoked: DashMap<Uuid, DateTime<Utc>>,
    access_ttl: Duration,
    /// When `load` read the store: where `follow` reads on from.
    loaded_at: DateTime<Utc>,
    /// The other nodes, told of every revocation made here.
    broker: Arc<dyn Broker>,
}

/// Which sessions of a user to revoke.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    One(Uuid),
    All,
}

impl Revocations {
    /// Loads the revocations that may still match an unexpired token.
    pub async fn load(
        store: &dyn Store,
        access_ttl: Duration,
        broker: Arc<dyn Broker>,
    ) -> Result<Self> {
        let now = store::now();
        let since = store::sub(now, access_ttl);
        let revoked = store
            .revoked_sessions(since)
            .await?
            .into_iter()
            .map(|r| (r.session, now))
            .collect();
        Ok(Self {
            revoked,
            access_ttl,
            loaded_at: now,
            broker,
        })
    }

    pub fn is_revoked(&self, session: Uuid) -> bool {
        self.revoked.contains_key(&session)
    }

    /// Revokes `scope` of `user`'s sessions everywhere it can: in the store,
    /// in this node's memory, and on this node's sockets.
    pub async fn revoke(
        &self,
        store: &dyn Store,
        hub: &Hub,
        user: Uuid,
        scope: Scope,
    ) -> Result<()> {
        let only = match scope {
            Scope::One(session) => Some(session),
            Scope::All => None,
        };
        let sessions = store.revoke_sessions(user, only, store::now()).await?;
        self.revoked_elsewhere(hub, user, scope, &sessions);
        Ok(())
    }

    /// Applies revocations the store has already recorded (by a password
    /// change, an account deletion or a reuse detection, each in its own
    /// transaction) to memory and sockets.
    pub fn revoked_elsewhere(&self, hub: &Hub, user: Uuid, scope: Scope, sessions: &[Uuid]) {
        let now = store::now();
        for session in sessions {
            self.revoked.insert(*session, now);
        }
        // Memory first, sockets second: a socket authenticating right now
        // either registers before the kick (and is kicked) or checks the set
        // after registering (and sees the revocation).
        let session = match scope {
            Scope::One(session) => Some(session),
            Scope::All => None,
        };
        let closed = hub.kick(user, session, Kick::Revoked);
        tracing::info!(user.id = %user, sessions = sessions.len(), sockets = closed, "sessions revoked");
        self.announce(user, sessions, None);
    }

    /// Tells the other nodes. They close the sockets of exactly these
    /// sessions: a socket of a session made after this revocation (the new
    /// login of a password change) may already be open there.
    fn announce(&self, user: Uuid, sessions: &[Uuid], device: Option<DeviceId>) {
        if sessions.is_empty() && device.is_none() {
            return;
        }
        self.broker.announce(Announce::Revoked {
            user,
            sessions: sessions.to_vec(),
            device,
        });
    }

    /// Applies the revocation of a removed device's sessions, which the
    /// store recorded with the removal: its tokens are refused and every
    /// socket of that device (and only of that device) closes with 4401.
    pub fn device_removed(&self, hub: &Hub, user: Uuid, device: DeviceId, sessions: &[Uuid]) {
        let now = store::now();
        for session in sessions {
            self.revoked.insert(*session, now);
        }
        // Memory first, sockets second, as in `revoked_elsewhere`.
        let closed = hub.kick_device(user, device, Kick::Revoked);
        tracing::info!(user.id = %user, device, sessions = sessions.len(), sockets = closed, "device's sessions revoked");
        self.announce(user, sessions, Some(device));
    }

    /// Applies a revocation another node announced: remembers its sessions
    /// and closes their sockets here (with a device, every socket of that
    /// device), memory first as everywhere else.
    pub fn learn_remote(&self, hub: &Hub, user: Uuid, sessions: &[Uuid], device: Option<DeviceId>) {
        let now = store::now();
        for session in sessions {
            self.revoked.insert(*session, now);
        }
        let mut closed: usize = sessions
            .iter()
            .map(|s| hub.kick(user, Some(*s), Kick::Revoked))
            .sum();
        if let Some(device) = device {
            closed += hub.kick_device(user, device, Kick::Revoked);
        }
        tracing::info!(user.id = %user, device, sessions = sessions.len(), sockets = closed, "sessions revoked on another node");
    }

    /// Applies revocations read from the store that this process does not
    /// know yet (made by another process): remembers them and closes their
    /// sockets, as [`Revocations::revoked_elsewhere`] does for its own.
    /// Returns how many were new.
    pub fn learn(&self, hub: &Hub, revoked: &[Revoked]) -> usize {
        let now = store::now();
        let (mut learnt, mut closed) = (0, 0);
        for r in revoked {
            // Memory first, sockets second, as in `revoked_elsewhere`. A
            // known session was revoked here, or learnt before: skip it.
            let new = match self.revoked.entry(r.session) {
                Entry::Vacant(entry) => {
                    entry.insert(now);
                    true
                }
                Entry::Occupied(_) => false,
            };
            if new {
                learnt += 1;
                closed += hub.kick(r.user_id, Some(r.session), Kick::Revoked);
            }
        }
        if learnt > 0 {
            tracing::info!(
                sessions = learnt,
                sockets = closed,
                "sessions revoked by another process"
            );
        }
        learnt
    }

    /// Reads the revocations other processes record, every `interval` until
    /// `shutdown`, and [`learn`](Revocations::learn)s them. Each read starts
    /// [`LOOKBACK`] before the previous one (and never earlier than an
    /// access-token lifetime ago, beyond which no token is left to refuse);
    /// a failed read is retried at the next tick from the same point.
    ///
    /// An account another process revoked sessions of may have lost devices
    /// or been deleted there (`sealpost user delete`): `changed` is told of
    /// each, so that this process reads its device list afresh.
    pub async fn follow(
        self: Arc<Self>,
        store: Arc<dyn Sessions>,
        hub: Arc<Hub>,
        changed: impl Fn(Uuid) + Send + 'static,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick completes at once, and `load` read everything.
        ticker.tick().await;
        let mut last_look = self.loaded_at;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = store::now();
            let since = store::sub(last_look, LOOKBACK).max(store::sub(now, self.access_ttl));
            match store.revoked_sessions(since).await {
                Ok(revoked) => {
                    if self.learn(&hub, &revoked) > 0 {
                        let mut users: Vec<Uuid> = revoked.iter().map(|r| r.user_id).collect();
                        users.sort_unstable();
                        users.dedup();
                        users.into_iter().for_each(&changed);
                    }
                    last_look = now;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reading revocations failed; retrying next interval");
                }
            }
        }
    }

    /// Forgets revocations older than one access-token lifetime: every token
    /// they could refuse has expired.
    pub fn prune(&self) {
        let cutoff = store::sub(store::now(), self.access_ttl);
        self.revoked.retain(|_, at| *at >= cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learnt_revocations_close_their_sockets_once() {
        let hub = Hub::new(4, 0, Arc::new(crate::metrics::Metrics::disabled()));
        let revocations = Revocations {
            revoked: DashMap::new(),
            access_ttl: Duration::from_secs(60),
            loaded_at: store::now(),
            broker: Arc::new(crate::cluster::local::LocalBroker),
        };
        let (user, session, other) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let revoked_socket = hub.register(user, 1, session).unwrap();
        let other_socket = hub.register(user, 1, other).unwrap();
        let read = [Revoked {
            session,
            user_id: user,
        }];
        assert_eq!(revocations.learn(&hub, &read), 1);
        assert!(revocations.is_revoked(session));
        assert!(!revocations.is_revoked(other));
        assert_eq!(revoked_socket.kick_reason(), Some(Kick::Revoked));
        assert!(!other_socket.kicked.is_cancelled());
        // Read again by the next look: already known, nothing to do.
        assert_eq!(revocations.learn(&hub, &read), 0);
    }
}
