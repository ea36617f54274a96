//! Session revocation. A session is one login: its refresh-token family,
//! whose id every access token of the session carries as `sid`.
//!
//! Revoking a session (logout, logout-all, password change, account
//! deletion, refresh-token reuse) records it in the store, deletes its
//! refresh tokens, refuses its access tokens from then on, and closes its
//! live sockets on this node with 4401. Access tokens are checked against
//! an in-memory set, so authentication costs no query; the set is loaded at
//! start-up from the revocations younger than one access-token lifetime
//! (older ones cannot match an unexpired token) and pruned by the sweeper.
//!
//! Other nodes of a cluster learn of a revocation only at their next start;
//! until a broker carries revocations, a deployment of several nodes keeps
//! the access-token lifetime short. (Refresh tokens are revoked everywhere
//! at once: they live in the shared database.)

use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use uuid::Uuid;

use crate::error::Result;
use crate::hub::{Hub, Kick};
use crate::store::{self, Store};

pub struct Revocations {
    /// Revoked session → when it was revoked.
    revoked: DashMap<Uuid, DateTime<Utc>>,
    access_ttl: Duration,
}

/// Which sessions of a user to revoke.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    One(Uuid),
    All,
}

impl Revocations {
    /// Loads the revocations that may still match an unexpired token.
    pub async fn load(store: &dyn Store, access_ttl: Duration) -> Result<Self> {
        let now = store::now();
        let since = store::sub(now, access_ttl);
        let revoked = store
            .revoked_sessions(since)
            .await?
            .into_iter()
            .map(|id| (id, now))
            .collect();
        Ok(Self {
            revoked,
            access_ttl,
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
    }

    /// Forgets revocations older than one access-token lifetime: every token
    /// they could refuse has expired.
    pub fn prune(&self) {
        let cutoff = store::sub(store::now(), self.access_ttl);
        self.revoked.retain(|_, at| *at >= cutoff);
    }
}
