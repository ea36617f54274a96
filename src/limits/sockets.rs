//! Caps on WebSockets before a user is known: per client address
//! (`SEALPOST_MAX_CONNECTIONS_PER_IP`), and on sockets that have not
//! authenticated yet, server-wide (`SEALPOST_MAX_UNAUTHENTICATED_SOCKETS`)
//! and per client address (`SEALPOST_MAX_UNAUTHENTICATED_SOCKETS_PER_IP`).
//! All are checked before the upgrade, so a refused client gets an HTTP 429
//! and costs no socket task. The per-device cap is the hub's (it counts a
//! device's sockets under the same lock that registers them).
//!
//! The server-wide pool of waiting slots protects the server from everyone
//! and no one from anyone: one address could take all of it and lock every
//! new socket that authenticates by frame out. Its share per address keeps
//! that to a botnet's worth of addresses. A socket whose upgrade carries a
//! valid token never waits (the caller checks the header first), and one
//! that fails to authenticate gives its slot back before its close
//! handshake, which a client that never answers it drags out.
//!
//! Addresses are the caller's limit keys: IPv6 clients share one count per
//! /64 ([`crate::limits::client_ip::limit_key`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::error::{Error, Result};

pub struct SocketCaps {
    per_ip: usize,
    waiting: usize,
    waiting_per_ip: usize,
    /// Live addresses only: an entry is removed when its last socket goes,
    /// so the map is bounded by the open sockets.
    by_ip: DashMap<IpAddr, Counts>,
    /// Sockets waiting to authenticate, server-wide.
    pending: AtomicUsize,
}

/// The sockets of one address.
#[derive(Default)]
struct Counts {
    open: usize,
    waiting: usize,
}

impl SocketCaps {
    /// Caps on open sockets per address, waiting sockets server-wide, and
    /// waiting sockets per address; 0 turns a cap off.
    pub fn new(per_ip: u32, waiting: u32, waiting_per_ip: u32) -> Arc<Self> {
        Arc::new(Self {
            per_ip: per_ip as usize,
            waiting: waiting as usize,
            waiting_per_ip: waiting_per_ip as usize,
            by_ip: DashMap::new(),
            pending: AtomicUsize::new(0),
        })
    }

    /// Counts a new socket from `ip` as open and, unless it has already
    /// `authenticated` (a valid header token), as waiting; or refuses it.
    /// The permit gives its counts back when dropped.
    pub fn open(self: &Arc<Self>, ip: IpAddr, authenticated: bool) -> Result<SocketPermit> {
        let waiting = !authenticated;
        if waiting {
            let pending = self.pending.fetch_add(1, Ordering::AcqRel);
            if self.waiting != 0 && pending >= self.waiting {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                return Err(Error::TooManyConnections(
                    "too many connections are waiting to authenticate; retry shortly",
                ));
            }
        }
        let refused = {
            let mut counts = self.by_ip.entry(ip).or_default();
            if self.per_ip != 0 && counts.open >= self.per_ip {
                Some("too many connections from this address")
            } else if waiting && self.waiting_per_ip != 0 && counts.waiting >= self.waiting_per_ip {
                Some(
                    "too many connections from this address are waiting to authenticate; \
                     retry shortly",
                )
            } else {
                counts.open += 1;
                counts.waiting += usize::from(waiting);
                None
            }
        };
        if let Some(reason) = refused {
            if waiting {
                self.pending.fetch_sub(1, Ordering::AcqRel);
            }
            // Removes the entry the check may have made.
            self.uncount(ip, 0, 0);
            return Err(Error::TooManyConnections(reason));
        }
        Ok(SocketPermit {
            caps: self.clone(),
            ip,
            waiting,
        })
    }

    /// Sockets open from `ip` (for tests and metrics).
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).map_or(0, |n| n.open)
    }

    /// Sockets from `ip` waiting to authenticate (for tests).
    pub fn waiting_from(&self, ip: IpAddr) -> usize {
        self.by_ip.get(&ip).map_or(0, |n| n.waiting)
    }

    /// Takes `open` and `waiting` sockets off `ip`'s counts; drops its entry
    /// once it has no socket left.
    fn uncount(&self, ip: IpAddr, open: usize, waiting: usize) {
        if let Entry::Occupied(mut entry) = self.by_ip.entry(ip) {
            let counts = entry.get_mut();
            counts.open -= open;
            counts.waiting -= waiting;
            if counts.open == 0 {
                entry.remove();
            }
        }
    }
}

/// One counted socket; dropping it gives its counts back.
pub struct SocketPermit {
    caps: Arc<SocketCaps>,
    ip: IpAddr,
    /// Holds a waiting slot, server-wide and of its address.
    waiting: bool,
}

impl SocketPermit {
    /// The socket no longer waits to authenticate: it did, or it failed to
    /// and is being closed. Its waiting slot is free for the next.
    pub fn stop_waiting(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.caps.pending.fetch_sub(1, Ordering::AcqRel);
            self.caps.uncount(self.ip, 0, 1);
        }
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.stop_waiting();
        self.caps.uncount(self.ip, 1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: &str = "192.0.2.1";
    const OTHER: &str = "192.0.2.2";

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn per_ip_cap_refuses_the_next_and_frees_on_drop() {
        let caps = SocketCaps::new(2, 0, 0);
        let a = caps.open(ip(IP), true).unwrap();
        let _b = caps.open(ip(IP), false).unwrap();
        assert!(matches!(
            caps.open(ip(IP), true),
            Err(Error::TooManyConnections(_))
        ));
        assert!(caps.open(ip(OTHER), false).is_ok());
        drop(a);
        assert!(caps.open(ip(IP), true).is_ok());
    }

    #[test]
    fn pending_cap_counts_only_waiting_sockets() {
        let caps = SocketCaps::new(0, 1, 0);
        let mut a = caps.open(ip(IP), false).unwrap();
        assert!(caps.open(ip(OTHER), false).is_err());
        // A socket that authenticated by header never waits.
        let _authed = caps.open(ip(OTHER), true).unwrap();
        a.stop_waiting();
        let _b = caps.open(ip(IP), false).unwrap();
        assert_eq!(caps.open_from(ip(IP)), 2);
        drop(a);
        assert_eq!(caps.open_from(ip(IP)), 1);
        assert_eq!(caps.pending.load(Ordering::Acquire), 1);
    }

    #[test]
    fn each_address_has_a_share_of_the_waiting_slots() {
        let caps = SocketCaps::new(0, 10, 2);
        let mut held: Vec<_> = (0..2).map(|_| caps.open(ip(IP), false).unwrap()).collect();
        assert!(caps.open(ip(IP), false).is_err());
        assert_eq!(caps.waiting_from(ip(IP)), 2);
        // Others still get theirs; the full address can still come in with
        // a valid header token.
        let _other = caps.open(ip(OTHER), false).unwrap();
        let _authed = caps.open(ip(IP), true).unwrap();
        // A refused attempt left nothing behind.
        assert_eq!(caps.pending.load(Ordering::Acquire), 3);
        assert_eq!(caps.open_from(ip(IP)), 3);
        held[0].stop_waiting();
        assert_eq!(caps.waiting_from(ip(IP)), 1);
        let _next = caps.open(ip(IP), false).unwrap();
        held.clear();
        assert_eq!(caps.waiting_from(ip(IP)), 1);
        assert_eq!(caps.open_from(ip(IP)), 2);
    }

    #[test]
    fn an_address_without_sockets_leaves_the_map() {
        let caps = SocketCaps::new(1, 1, 1);
        let mut a = caps.open(ip(IP), false).unwrap();
        assert!(caps.open(ip(IP), false).is_err());
        a.stop_waiting();
        drop(a);
        assert!(caps.by_ip.is_empty());
        assert_eq!(caps.pending.load(Ordering::Acquire), 0);
    }
}
