//! Sockets and TLS shared by the node's listeners (`server`) and its cluster links
//! (`cluster`): the accept loop and the one crypto provider. Depends only on `metrics` (its
//! throttled log line).
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Install the one rustls crypto provider we use (`ring`) before any TLS use.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The block of addresses one client is taken to control, for per-address limits (login
/// failures, CONNECTs in progress): an IPv4 address, or an IPv6 /64 — what one host or
/// customer line is given, so counting single IPv6 addresses would let one host past any limit.
pub fn address_block(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// Pending connections a listener holds before the kernel drops SYNs (capped by
/// `net.core.somaxconn`). The standard library's 128 overflowed under a reconnect storm: 200
/// devices dialling at once left the rest to retransmit their SYN a second later, so a fleet
/// reconnected at a few hundred per second whatever the node could take.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with `LISTEN_BACKLOG` (address reuse on, as the standard
/// library's bind does on Unix, so a restarted node rebinds past TIME_WAIT).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// Descriptors kept free of client connections for everything else a node opens: store
/// files, database and cache pools, cluster links, HTTP clients (webhooks), logs.
pub const RESERVED_FILES: u64 = 512;

/// Raise this process's open-file limit to its hard limit and say how many client
/// connections fit under it (`None`: the limit could not be read, or is unlimited).
pub fn connections_that_fit() -> Option<usize> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        let raised = rustix::process::Rlimit { current: l.maximum, maximum: l.maximum };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            l = raised;
        }
    }
    l.current.map(|n| n.saturating_sub(RESERVED_FILES) as usize)
}

/// Log an accept error at most once every ten seconds, with how many there were between.
fn report_accept_error(e: &std::io::Error) {
    static EVERY: crate::metrics::LogEvery = crate::metrics::LogEvery::new();
    if let Some(between) = EVERY.hit(Duration::from_secs(10)) {
        tracing::warn!(error = %e, failed_since_last_report = between, "accept failed");
    }
}

/// The next accepted socket (TCP_NODELAY set), or `None` once `stop` fires. Accept errors
/// (usually EMFILE) are retried after a short pause instead of spinning, and logged at most
/// once every ten seconds (with how many happened).
pub async fn accept_next(listener: &TcpListener, stop: &CancellationToken) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    return Some((s, peer));
                }
                Err(e) => {
                    report_accept_error(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::address_block;

    #[test]
    fn an_address_block_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let b = |s: &str| address_block(s.parse().unwrap()).to_string();
        assert_eq!(b("192.0.2.7"), "192.0.2.7");
        assert_eq!(b("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(b("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(b("2001:db8:1:2::1"), b("2001:db8:1:2:ffff::9"));
        assert_ne!(b("2001:db8:1:2::1"), b("2001:db8:1:3::1"));
    }
}
