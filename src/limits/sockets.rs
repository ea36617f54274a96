//! Caps on WebSockets before a user is known: per client IP
//! (`SEALPOST_MAX_CONNECTIONS_PER_IP`) and server-wide on sockets that have
//! not authenticated yet (`SEALPOST_MAX_UNAUTHENTICATED_SOCKETS`). Both are
//! checked before the upgrade, so a refused client gets an HTTP 429 and
//! costs no socket task. The per-user cap is the hub's (it counts a user's
//! sockets under the same lock that registers them).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::error::{Error, Result};

pub struct SocketCaps {
    per_ip: usize,
    unauthenticated: usize,
    by_ip: DashMap<IpAddr, usize>,
    pending: AtomicUsize,
}

impl SocketCaps {
    /// 0 turns a cap off.
    pub fn new(per_ip: u32, unauthenticated: u32) -> Arc<Self> {
        Arc::new(Self {
            per_ip: per_ip as usize,
            unauthenticated: unauthenticated as usize,
            by_ip: DashMap::new(),
            pending: AtomicUsize::new(0),
        })
    }

    /// Counts a new socket from `ip` as open and unauthenticated, or refuses
    /// it. The permit gives both back when dropped.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<SocketPermit> {
        let pending = self.pending.fetch_add(1, Ordering::AcqRel);
        let mut permit = SocketPermit {
            caps: self.clone(),
            ip: None,
            pending: true,
        };
        if self.unauthenticated != 0 && pending >= self.unauthenticated {
            return Err(Error::TooManyConnections(
                "too many connections are waiting to authenticate; retry shortly",
            ));
        }
        match self.by_ip.entry(ip) {
            Entry::Occupied(mut open) => {
                if self.per_ip != 0 && *open.get() >= self.per_ip {
                    return Err(Error::TooManyConnections(
                        "too many connections from this address",
                    ));
                }
                *open.get_mut() += 1;
            }
            Entry::Vacant(slot) => {
                slot.insert(1);
            }
        }
        permit.ip = Some(ip);
        Ok(permit)
    }

    /// Sockets open from `ip` (for tests and metrics).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).map_or(0, |n| *n)
    }
}

/// One counted socket; dropping it gives its counts back.
pub struct SocketPermit {
    caps: Arc<SocketCaps>,
    ip: Option<IpAddr>,
    pending: bool,
}

impl SocketPermit {
    /// The socket authenticated: it no longer counts as pending.
    pub fn authenticated(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.caps.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.authenticated();
        if let Some(ip) = self.ip {
            // Remove the entry at zero so the map holds only live addresses.
            if let Entry::Occupied(mut open) = self.caps.by_ip.entry(ip) {
                *open.get_mut() -= 1;
                if *open.get() == 0 {
                    open.remove();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_cap_refuses_the_next_and_frees_on_drop() {
        let caps = SocketCaps::new(2, 0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = caps.open(ip).unwrap();
        let _b = caps.open(ip).unwrap();
        assert!(matches!(caps.open(ip), Err(Error::TooManyConnections(_))));
        assert!(caps.open("192.0.2.2".parse().unwrap()).is_ok());
        drop(a);
        assert!(caps.open(ip).is_ok());
    }

    #[test]
    fn pending_cap_counts_only_unauthenticated_sockets() {
        let caps = SocketCaps::new(0, 1);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut a = caps.open(ip).unwrap();
        assert!(caps.open(ip).is_err());
        a.authenticated();
        let _b = caps.open(ip).unwrap();
        assert_eq!(caps.open_from(ip), 2);
        drop(a);
        assert_eq!(caps.open_from(ip), 1);
    }
}
