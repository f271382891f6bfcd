//! The client's address behind reverse proxies. A request from a proxy listed in
//! `api.trusted_proxies` carries the client in `X-Forwarded-For`; every hop appends the address
//! it saw, so the list is read from the right, skipping trusted proxies, and the first address
//! that is not one of them is the client. A request from anyone else is taken at its socket
//! address: a client cannot forge its address by sending the header itself.
//!
//! The middleware rewrites the request's `ConnectInfo<SocketAddr>`, so every handler (login
//! limits and the audit log, the device HTTP API's address checks) sees the client without
//! knowing about proxies.
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;

pub use crate::config::IpNet;

/// Hops read from the right before giving up (a longer chain is not believed further).
const MAX_HOPS: usize = 16;

/// The client's address, given the socket peer, the request headers and the trusted proxies.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.iter().any(|n| n.contains(peer)) {
        return peer;
    }
    // Several X-Forwarded-For headers are one list, in order.
    let hops = headers.get_all("x-forwarded-for").iter().flat_map(|v| v.to_str().unwrap_or("").split(','));
    let hops: Vec<&str> = hops.collect();
    let mut client = peer;
    for hop in hops.iter().rev().take(MAX_HOPS) {
        let Some(ip) = parse_hop(hop) else {
            // Garbage in the chain: the last address a trusted proxy vouched for stands.
            return client;
        };
        client = ip;
        if !trusted.iter().any(|n| n.contains(ip)) {
            return ip;
        }
    }
    client
}

/// One hop: `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]:4711` or `192.0.2.1:4711`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = IpAddr::from_str(hop) {
        return Some(ip.to_canonical());
    }
    SocketAddr::from_str(hop).ok().map(|s| s.ip().to_canonical())
}

/// Middleware: replace the socket peer by the forwarded client when the peer is trusted.
pub async fn rewrite(trusted: Arc<Vec<IpNet>>, mut req: Request, next: Next) -> Response {
    if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() {
        let ip = client_ip(peer.ip(), req.headers(), &trusted);
        if ip != peer.ip() {
            req.extensions_mut().insert(ConnectInfo(SocketAddr::new(ip, 0)));
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(v: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in v {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("10.1.200.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped IPv6 peers are their IPv4 address");
        let n: IpNet = "192.0.2.128/25".parse().unwrap();
        assert!(n.contains(ip("192.0.2.200")) && !n.contains(ip("192.0.2.127")));
        let n: IpNet = "fd00::/8".parse().unwrap();
        assert!(n.contains(ip("fd12::1")) && !n.contains(ip("fe80::1")) && !n.contains(ip("10.0.0.1")));
        assert!("0.0.0.0/0".parse::<IpNet>().unwrap().contains(ip("8.8.8.8")));
        assert!("127.0.0.1".parse::<IpNet>().unwrap().contains(ip("127.0.0.1")));
        for bad in ["", "10.0.0.0/33", "::/129", "10.0.0/8", "x/8", "10.0.0.0/-1"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        assert_eq!("10.1.2.3/8".parse::<IpNet>().unwrap().to_string(), "10.1.2.3/8");
    }

    #[test]
    fn only_trusted_peers_are_believed() {
        let t = nets(&["127.0.0.1", "10.0.0.0/8"]);
        // An untrusted peer's header is ignored.
        assert_eq!(client_ip(ip("203.0.113.9"), &xff(&["1.2.3.4"]), &t), ip("203.0.113.9"));
        // A trusted proxy: the right-most untrusted hop; a forged left part is ignored.
        assert_eq!(client_ip(ip("127.0.0.1"), &xff(&["6.6.6.6, 198.51.100.4"]), &t), ip("198.51.100.4"));
        // Chains of trusted proxies are skipped; several headers are one list.
        assert_eq!(client_ip(ip("127.0.0.1"), &xff(&["198.51.100.4", "10.0.0.2"]), &t), ip("198.51.100.4"));
        assert_eq!(client_ip(ip("127.0.0.1"), &xff(&["[2001:db8::5]:4000, 10.1.1.1:80"]), &t), ip("2001:db8::5"));
        // No header, or only trusted hops: the last trusted address.
        assert_eq!(client_ip(ip("127.0.0.1"), &HeaderMap::new(), &t), ip("127.0.0.1"));
        assert_eq!(client_ip(ip("127.0.0.1"), &xff(&["10.0.0.3"]), &t), ip("10.0.0.3"));
        // Garbage stops the walk at what the trusted proxies vouched for.
        assert_eq!(client_ip(ip("127.0.0.1"), &xff(&["198.51.100.4, nonsense, 10.0.0.2"]), &t), ip("10.0.0.2"));
        // Nothing trusted: never read the header.
        assert_eq!(client_ip(ip("127.0.0.1"), &xff(&["1.2.3.4"]), &[]), ip("127.0.0.1"));
    }
}
