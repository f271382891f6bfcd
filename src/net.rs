//! Sockets and TLS shared by the node's listeners (`server`) and its cluster links
//! (`cluster`): the accept loop and the one crypto provider. Depends on nothing of ours.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Install the one rustls crypto provider we use (`ring`) before any TLS use.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
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

/// The next accepted socket (TCP_NODELAY set), or `None` once `stop` fires. Accept errors
/// (usually EMFILE) are logged and retried after a short pause instead of spinning.
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
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}
