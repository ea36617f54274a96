//! The cap on HTTP connections open at once from one address
//! (`SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP`), counted by the accept loop
//! ([`crate::http1::serve`]) before a connection gets a task.
//!
//! Each connection may hold a request head for the head timeout, and a
//! body (up to its route's limit) for the body timeout: the per-connection
//! bounds make one connection cheap, this makes one address's share of
//! them small (nginx's `limit_conn`).
//!
//! An address is the TCP peer's [`limit_key`] (an IPv6 client counts per
//! /64): `X-Forwarded-For` is not read yet when a connection is accepted.
//! Trusted proxies are exempt, since every client behind them shares their
//! address; the proxy is where such a cap belongs then. A connection
//! upgraded to a WebSocket stops counting when it is handed over (its task
//! here ends); `SEALPOST_MAX_CONNECTIONS_PER_IP` counts it from then on.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::client_ip::{TrustedProxies, limit_key};

/// Open HTTP connections per address. The map holds only addresses with a
/// connection open (an entry goes at zero), so it is bounded by the open
/// connections, and those by the process's file descriptors.
pub struct HttpConnections {
    per_ip: usize,
    proxies: TrustedProxies,
    open: DashMap<IpAddr, usize>,
}

impl HttpConnections {
    /// `per_ip` 0 turns the cap off.
    pub fn new(per_ip: u32, proxies: TrustedProxies) -> Arc<Self> {
        Arc::new(Self {
            per_ip: per_ip as usize,
            proxies,
            open: DashMap::new(),
        })
    }

    /// Counts a connection accepted from `peer`, or `None` when its address
    /// has as many open as it may.
    pub fn open(self: &Arc<Self>, peer: IpAddr) -> Option<ConnectionPermit> {
        if self.per_ip == 0 || self.proxies.trusts(peer) {
            return Some(ConnectionPermit {
                counts: self.clone(),
                key: None,
            });
        }
        let key = limit_key(peer);
        match self.open.entry(key) {
            Entry::Occupied(mut open) => {
                if *open.get() >= self.per_ip {
                    return None;
                }
                *open.get_mut() += 1;
            }
            Entry::Vacant(slot) => {
                slot.insert(1);
            }
        }
        Some(ConnectionPermit {
            counts: self.clone(),
            key: Some(key),
        })
    }

    /// Connections counted for `peer`'s address (for tests).
    pub fn open_from(&self, peer: IpAddr) -> usize {
        self.open.get(&limit_key(peer)).map_or(0, |n| *n)
    }
}

/// One counted connection; dropping it gives its count back.
pub struct ConnectionPermit {
    counts: Arc<HttpConnections>,
    /// `None` when not counted (no cap, a trusted proxy).
    key: Option<IpAddr>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(key) = self.key
            && let Entry::Occupied(mut open) = self.counts.open.entry(key)
        {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ipnet::IpNet;

    use super::*;

    #[test]
    fn the_cap_refuses_the_next_and_frees_on_drop() {
        let caps = HttpConnections::new(2, TrustedProxies::default());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = caps.open(ip).unwrap();
        let _b = caps.open(ip).unwrap();
        assert!(caps.open(ip).is_none());
        assert!(caps.open("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert_eq!(caps.open_from(ip), 1);
        assert!(caps.open(ip).is_some());
    }

    #[test]
    fn an_ipv6_64_shares_one_count() {
        let caps = HttpConnections::new(1, TrustedProxies::default());
        let _a = caps.open("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(caps.open("2001:db8:1:2:ffff::9".parse().unwrap()).is_none());
        assert!(caps.open("2001:db8:1:3::1".parse().unwrap()).is_some());
    }

    #[test]
    fn trusted_proxies_are_not_counted() {
        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let caps = HttpConnections::new(1, TrustedProxies::new(&[IpNet::from(proxy)]));
        let permits: Vec<_> = (0..3).map(|_| caps.open(proxy)).collect();
        assert!(permits.iter().all(Option::is_some), "a proxy was refused");
        assert_eq!(permits.len(), 3);
        assert_eq!(caps.open_from(proxy), 0);
    }
}
