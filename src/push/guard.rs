//! The SSRF guard: a push endpoint is a URL a client chose, and the server
//! sends requests to it. Without a guard, any account could make the
//! server reach its own network (a metadata service, an admin port, the
//! database). The rules, from Sygnal's allow-list and the usual SSRF
//! advice:
//!
//! - `https` only, at most [`MAX_ENDPOINT_BYTES`], no user info;
//! - never to an address that is not public ([`forbidden`]): checked on the
//!   literal host when the client registers, on every address its name
//!   resolves to when it registers, and again on the addresses resolved
//!   when each request connects (`push::http`), so a name that later
//!   resolves elsewhere (DNS rebinding) is refused then;
//! - hosts an operator lists (`SEALPOST_PUSH_ALLOW_HOSTS`) are exempt from
//!   both the scheme and the address rule: tests, and a push service of
//!   the operator's own on a private network.
//!
//! Redirects are never followed and every request has a timeout
//! (`push::http`).

use std::net::{IpAddr, Ipv4Addr};

/// The longest endpoint accepted: real ones (FCM, Mozilla, Apple, the
/// UnifiedPush distributors) are under 500 bytes.
pub const MAX_ENDPOINT_BYTES: usize = 1000;

/// Hosts exempt from the guard, each with or without a port.
#[derive(Debug, Clone, Default)]
pub struct AllowHosts {
    /// Lowercase host (IPv6 without brackets), and the port if one was
    /// given.
    entries: Vec<(String, Option<u16>)>,
}

impl AllowHosts {
    /// Parses `host` or `host:port` entries (`[v6]:port` for IPv6 with a
    /// port). Empty entries are skipped.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let mut entries = Vec::new();
        for raw in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (host, port) = split_host_port(raw)
                .ok_or_else(|| format!("`{raw}` is not a host or host:port"))?;
            entries.push((host.to_ascii_lowercase(), port));
        }
        Ok(Self { entries })
    }

    /// Whether `host` on `port` is listed (an entry without a port allows
    /// every port).
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.entries
            .iter()
            .any(|(h, p)| h.eq_ignore_ascii_case(host) && p.is_none_or(|p| p == port))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn split_host_port(raw: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = raw.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match raw.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => Some((raw, None)),
        Some((host, port)) if !host.is_empty() => Some((host, Some(port.parse().ok()?))),
        Some(_) => None,
        None => Some((raw, None)),
    }
}

/// Whether a request may never go to `ip` (unless its host is allowed):
/// every address that is not globally routable unicast.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Unique local fc00::/7, link-local fe80::/10, site-local fec0::/10.
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                // IPv4-compatible ::/96 (deprecated), NAT64 64:ff9b::/96 (the
                // v4 address behind it may be private), documentation
                // 2001:db8::/32, 6to4 2002::/16 (wraps a v4 address), Teredo
                // 2001::/32.
                || (s[0..6] == [0, 0, 0, 0, 0, 0])
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || s[0] == 0x2002
                || (s[0] == 0x2001 && s[1] == 0)
        }
    }
}

fn forbidden_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_private()
        || v4.is_loopback()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        // 0.0.0.0/8 "this network", 100.64.0.0/10 shared (CGNAT),
        // 192.0.0.0/24 protocol assignments, 198.18.0.0/15 benchmarking,
        // 240.0.0.0/4 reserved.
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240
}

/// A URL's parts the guard needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// Lowercase; IPv6 without brackets.
    pub host: String,
    pub port: u16,
}

/// Checks a client-chosen URL without resolving it: the scheme, the
/// length, no user info, and a literal address that is public (unless the
/// host is allowed). Err is a message for the client.
pub fn check_static(url: &str, allow: &AllowHosts) -> Result<Endpoint, String> {
    if url.len() > MAX_ENDPOINT_BYTES {
        return Err(format!("must be at most {MAX_ENDPOINT_BYTES} bytes"));
    }
    let uri: http::Uri = url.parse().map_err(|_| "is not a URL".to_owned())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must be an https URL".into()),
    };
    let authority = uri.authority().ok_or("must be an https URL with a host")?;
    if authority.as_str().contains('@') {
        return Err("must not carry a user name or password".into());
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    if host.is_empty() {
        return Err("must have a host".into());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let allowed = allow.allows(&host, port);
    if !https && !allowed {
        return Err("must be an https URL".into());
    }
    if !allowed {
        if let Ok(ip) = host.parse::<IpAddr>()
            && forbidden(ip)
        {
            return Err("must not point at a private, loopback or link-local address".into());
        }
        if host == "localhost" || host.ends_with(".localhost") {
            return Err("must not point at a private, loopback or link-local address".into());
        }
    }
    Ok(Endpoint { https, host, port })
}

/// [`check_static`], then the addresses the host resolves to: every one
/// must be public (unless the host is allowed). Resolution is bounded by
/// `timeout`; a name that does not resolve is refused.
pub async fn check_endpoint(
    url: &str,
    allow: &AllowHosts,
    timeout: std::time::Duration,
) -> Result<Endpoint, String> {
    let endpoint = check_static(url, allow)?;
    if allow.allows(&endpoint.host, endpoint.port) || endpoint.host.parse::<IpAddr>().is_ok() {
        return Ok(endpoint);
    }
    let lookup = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port));
    let addrs: Vec<_> = match tokio::time::timeout(timeout, lookup).await {
        Ok(Ok(addrs)) => addrs.collect(),
        _ => return Err("has a host that does not resolve".into()),
    };
    if addrs.is_empty() {
        return Err("has a host that does not resolve".into());
    }
    if addrs.iter().any(|a| forbidden(a.ip())) {
        return Err("must not point at a private, loopback or link-local address".into());
    }
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_forbidden() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2002:a00:1::",
        ] {
            assert!(forbidden(ip(s)), "{s} should be forbidden");
        }
        for s in ["8.8.8.8", "142.250.74.106", "2a00:1450:4001:82b::200a"] {
            assert!(!forbidden(ip(s)), "{s} should be allowed");
        }
    }

    #[test]
    fn static_rules() {
        let none = AllowHosts::default();
        assert!(check_static("https://push.example.com/x", &none).is_ok());
        for bad in [
            "http://push.example.com/x",
            "ftp://push.example.com/x",
            "https://127.0.0.1/x",
            "https://[::1]:8443/x",
            "https://[::ffff:192.168.0.1]/x",
            "https://169.254.169.254/latest",
            "https://localhost/x",
            "https://a.localhost/x",
            "https://user:pw@push.example.com/x",
            "not a url",
            "/relative",
        ] {
            assert!(check_static(bad, &none).is_err(), "{bad} should be refused");
        }
        let long = format!("https://push.example.com/{}", "a".repeat(1000));
        assert!(check_static(&long, &none).is_err());
    }

    #[test]
    fn allowed_hosts_pass_with_their_port() {
        let allow = AllowHosts::parse(&[
            "127.0.0.1:9000".into(),
            "Push.Internal".into(),
            "[::1]:7".into(),
        ])
        .unwrap();
        assert!(check_static("http://127.0.0.1:9000/x", &allow).is_ok());
        assert!(check_static("http://127.0.0.1:9001/x", &allow).is_err());
        assert!(check_static("http://push.internal:1234/x", &allow).is_ok());
        assert!(check_static("http://[::1]:7/x", &allow).is_ok());
        assert!(allow.allows("::1", 7));
        assert!(!allow.allows("::1", 8));
        assert!(AllowHosts::parse(&["host:notaport".into()]).is_err());
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused() {
        let none = AllowHosts::default();
        let timeout = std::time::Duration::from_secs(5);
        // `localhost` is refused by name; a name that resolves to loopback
        // through the resolver is refused by address.
        assert!(
            check_endpoint("https://localhost/x", &none, timeout)
                .await
                .is_err()
        );
        assert!(
            check_endpoint("https://does-not-exist.invalid/x", &none, timeout)
                .await
                .is_err()
        );
    }
}
