//! The client's IP address, as rate limits and connection caps count it.
//!
//! It is the TCP peer, unless the peer is a trusted proxy
//! (`SEALPOST_TRUSTED_PROXIES`): then `X-Forwarded-For` is read from the
//! right, skipping trusted hops, and the first untrusted address is the
//! client. Anyone can write the header, so it is believed only as far as
//! the chain of trusted proxies that appended to it reaches.
//!
//! Limits count a client by [`limit_key`]: its IPv4 address, or the /64 an
//! IPv6 address lies in. An IPv6 host is routinely given a whole /64 (RFC
//! 6177, SLAAC privacy addresses), so keying on the full address would give
//! one host 2^64 fresh shares of every per-address limit.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Request};
use ipnet::IpNet;
use tower_governor::GovernorError;
use tower_governor::key_extractor::KeyExtractor;

use crate::error::Error;
use crate::state::AppState;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(std::sync::Arc<[IpNet]>);

impl TrustedProxies {
    pub fn new(nets: &[IpNet]) -> Self {
        Self(nets.into())
    }

    /// Whether `ip` is one of the trusted proxies.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client address of a request that arrived from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Several headers are one list, in order (RFC 9110 §5.3).
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // Garbage where an address should be: the chain of trust
                // ends at the last trusted hop.
                return client;
            };
            client = ip;
            if !self.trusts(ip) {
                return ip;
            }
        }
        client
    }
}

/// The key per-address limits count a client under: an IPv4 address as it
/// is, an IPv6 address cut to its /64 (see the module header).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !(u128::MAX >> 64);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

impl TrustedProxies {
    /// [`limit_key`] of [`TrustedProxies::client_ip`]: who a per-address
    /// limit charges for a request that arrived from `peer`.
    pub fn client_key(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        limit_key(self.client_ip(peer, headers))
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (IPv6 in
/// brackets then).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// The [`limit_key`] of a request's client, for a handler: whom a
/// per-address share (of the hashing queue, say) is counted against.
#[derive(Debug, Clone, Copy)]
pub struct ClientKey(pub IpAddr);

impl FromRequestParts<AppState> for ClientKey {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        // Always there: `http1` serves every connection with its peer.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("request without a peer address")))?;
        Ok(Self(state.proxies.client_key(peer, &parts.headers)))
    }
}

/// tower-governor's key: the client IP of the request.
#[derive(Debug, Clone)]
pub struct ClientIpKey(pub TrustedProxies);

impl KeyExtractor for ClientIpKey {
    type Key = IpAddr;

    fn extract<T>(&self, req: &Request<T>) -> Result<IpAddr, GovernorError> {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
            .ok_or(GovernorError::UnableToExtractKey)?;
        Ok(self.0.client_key(peer, req.headers()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn proxies(nets: &[&str]) -> TrustedProxies {
        let parse = |n: &&str| {
            n.parse::<IpNet>()
                .unwrap_or_else(|_| IpNet::from(n.parse::<IpAddr>().unwrap()))
        };
        TrustedProxies::new(&nets.iter().map(parse).collect::<Vec<_>>())
    }

    const PROXY: &str = "10.0.0.5";

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_claim() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(p.client_ip(peer, &headers(&["198.51.100.1"])), peer);
    }

    #[test]
    fn a_trusted_proxy_names_the_client() {
        let p = proxies(&["10.0.0.0/8"]);
        let got = p.client_ip(PROXY.parse().unwrap(), &headers(&["198.51.100.1"]));
        assert_eq!(got, "198.51.100.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn spoofed_entries_left_of_the_real_client_are_ignored() {
        let p = proxies(&["10.0.0.0/8"]);
        let got = p.client_ip(
            PROXY.parse().unwrap(),
            &headers(&["1.1.1.1, 198.51.100.1", "10.0.0.7"]),
        );
        assert_eq!(got, "198.51.100.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbage_or_absent_header_falls_back_to_the_last_trusted_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer: IpAddr = PROXY.parse().unwrap();
        assert_eq!(p.client_ip(peer, &headers(&[])), peer);
        assert_eq!(p.client_ip(peer, &headers(&["not-an-ip"])), peer);
        let got = p.client_ip(peer, &headers(&["[2001:db8::1]:443"]));
        assert_eq!(got, "2001:db8::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn ipv6_clients_are_keyed_on_their_64() {
        let p = proxies(&[]);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:eeee:dddd:cccc".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let key = p.client_key(a, &headers(&[]));
        assert_eq!(key, "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_eq!(p.client_key(b, &headers(&[])), key);
        assert_ne!(p.client_key(other, &headers(&[])), key);
        // IPv4, and IPv4 mapped into IPv6, stay whole addresses.
        let v4: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(limit_key(v4), v4);
        assert_eq!(limit_key("::ffff:198.51.100.7".parse().unwrap()), v4);
    }

    #[test]
    fn mapped_ipv4_peers_match_ipv4_ranges() {
        let p = proxies(&["127.0.0.1"]);
        let peer: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let got = p.client_ip(peer, &headers(&["198.51.100.1"]));
        assert_eq!(got, "198.51.100.1".parse::<IpAddr>().unwrap());
    }
}
