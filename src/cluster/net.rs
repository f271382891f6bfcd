//! Node links on the wire: our own accept loop (so port 0 works and TLS is ours) handing
//! streams to the `ractor_cluster` NodeServer, and dialling peers (plain or mutually
//! authenticated TLS with `ring`).
use crate::actors::inspect::Tell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ractor::ActorRef;
use ractor_cluster::{NetworkStream, NodeServerMessage};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;

/// TLS material for node links, when configured.
#[derive(Clone)]
pub struct LinkTls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

fn certs(path: &str) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let f = std::fs::File::open(path).with_context(|| format!("cluster TLS file {path}"))?;
    rustls_pemfile::certs(&mut std::io::BufReader::new(f))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cluster TLS file {path}"))
}

impl LinkTls {
    pub fn load(cfg: &ClusterConfig) -> anyhow::Result<Option<LinkTls>> {
        if cfg.tls_cert.is_empty() {
            return Ok(None);
        }
        crate::net::install_crypto();
        let chain = certs(&cfg.tls_cert)?;
        let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
            std::fs::File::open(&cfg.tls_key).with_context(|| format!("cluster TLS key {}", cfg.tls_key))?,
        ))?
        .with_context(|| format!("no private key in {}", cfg.tls_key))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&cfg.tls_ca)? {
            roots.add(c).context("cluster TLS CA")?;
        }
        let roots = Arc::new(roots);
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone()).build().context("cluster TLS client verifier")?;
        let server = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("cluster TLS certificate/key")?;
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .context("cluster TLS client certificate")?;
        Ok(Some(LinkTls { acceptor: TlsAcceptor::from(Arc::new(server)), connector: TlsConnector::from(Arc::new(client)) }))
    }
}

/// Largest ractor_cluster message a peer may announce. ractor_cluster allocates whatever
/// length prefix it reads (before authentication, too), so every link's read half is wrapped
/// in a [`FrameGuard`] that closes the link on a larger one instead.
const MAX_LINK_FRAME: u64 = (super::wire::MAX_FRAME as u64) + (16 << 20);
/// A peer sends at most this many frames before the cookie handshake is over (name and
/// challenge reply to a server; status, challenge and acknowledgement to a client) ...
const PRE_AUTH_FRAMES: u32 = 3;
/// ... each at most this large: a stranger on the cluster port cannot make the node reserve
/// more than this per connection.
const PRE_AUTH_MAX_FRAME: u64 = 64 << 10;

/// Watches the `u64` big-endian length prefixes of ractor_cluster's framing in a byte stream
/// and fails the read on a frame above `MAX_LINK_FRAME`; the bytes pass through unchanged.
pub struct FrameGuard<R> {
    inner: R,
    header: [u8; 8],
    have: usize,
    remaining: u64,
    /// Frames seen so far (the first [`PRE_AUTH_FRAMES`] have the smaller bound).
    frames: u32,
    /// An oversized frame was announced: the stream reads as ended from then on.
    poisoned: bool,
}

impl<R> FrameGuard<R> {
    pub fn new(inner: R) -> Self {
        FrameGuard { inner, header: [0; 8], have: 0, remaining: 0, frames: 0, poisoned: false }
    }

    /// Account for bytes read; an error if they announce an oversized frame.
    fn scan(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining.min(bytes.len() as u64)) as usize;
                self.remaining -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let n = (8 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 8 {
                self.have = 0;
                let len = u64::from_be_bytes(self.header);
                let max = if self.frames < PRE_AUTH_FRAMES { PRE_AUTH_MAX_FRAME } else { MAX_LINK_FRAME };
                self.frames = self.frames.saturating_add(1);
                if len > max {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("cluster peer announced a {len}-byte frame")));
                }
                self.remaining = len;
            }
        }
        Ok(())
    }
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FrameGuard<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // ractor_cluster retries a read after any error but "unexpected end of file", on which it
        // drops the link: so a refused frame ends the stream, for good.
        let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cluster link closed: oversized frame");
        if self.poisoned {
            return std::task::Poll::Ready(Err(eof()));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            let new = buf.filled()[before..].to_vec();
            if let Err(e) = self.scan(&new) {
                tracing::warn!(error = %e, "closing cluster link");
                self.poisoned = true;
                return std::task::Poll::Ready(Err(eof()));
            }
        }
        r
    }
}

/// Hand a connected (and, with TLS, handshaken) stream to the NodeServer, read half guarded.
fn open<S>(ns: &ActorRef<NodeServerMessage>, stream: S, peer: SocketAddr, local: SocketAddr, is_server: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let stream = NetworkStream::External {
        peer_label: Some(peer.to_string()),
        local_label: Some(local.to_string()),
        reader: Box::new(FrameGuard::new(rd)),
        writer: Box::new(wr),
    };
    let _ = ns.tell(NodeServerMessage::ConnectionOpened { stream: Box::new(stream), is_server });
}

/// Accept node links until `stop` and hand each to the NodeServer (which authenticates the cookie).
pub async fn accept_loop(l: TcpListener, ns: ActorRef<NodeServerMessage>, tls: Option<LinkTls>, stop: CancellationToken) {
    while let Some((s, peer_addr)) = crate::net::accept_next(&l, &stop).await {
        let Ok(local_addr) = s.local_addr() else { continue };
        let ns = ns.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => open(&ns, s, peer_addr, local_addr, true),
                Some(t) => match tokio::time::timeout(Duration::from_secs(10), t.acceptor.accept(s)).await {
                    Ok(Ok(stream)) => open(&ns, stream, peer_addr, local_addr, true),
                    Ok(Err(e)) => tracing::warn!(peer = %peer_addr, error = %e, "cluster TLS handshake failed"),
                    Err(_) => tracing::warn!(peer = %peer_addr, "cluster TLS handshake timed out"),
                },
            }
        });
    }
}

/// Open a link to `addr` (`host:port`); the handshake then continues inside ractor_cluster.
pub async fn dial(ns: &ActorRef<NodeServerMessage>, addr: &str, tls: Option<&LinkTls>) -> anyhow::Result<()> {
    let fut = async {
        let s = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        let (peer, local) = (s.peer_addr()?, s.local_addr()?);
        match tls {
            None => open(ns, s, peer, local, false),
            Some(t) => {
                let host = addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(addr);
                let name = rustls::pki_types::ServerName::try_from(host.to_string()).context("server name")?;
                let stream = t.connector.connect(name, s).await.context("cluster TLS handshake")?;
                open(ns, stream, peer, local, false);
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), fut).await.context("dial timed out")?
}

/// The address peers should dial: `advertise`, or the bound address if it is specific.
pub fn advertise(cfg: &ClusterConfig, bound: SocketAddr) -> anyhow::Result<String> {
    if !cfg.advertise.is_empty() {
        return Ok(cfg.advertise.clone());
    }
    anyhow::ensure!(
        !bound.ip().is_unspecified(),
        "cluster.listen is {bound}: set cluster.advertise to the host:port other nodes can reach"
    );
    Ok(bound.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_follows_frames_and_refuses_huge_ones() {
        let mut g = FrameGuard::new(());
        let mut ok = 5u64.to_be_bytes().to_vec();
        ok.extend_from_slice(b"hello");
        ok.extend_from_slice(&0u64.to_be_bytes());
        ok.extend_from_slice(&3u64.to_be_bytes());
        // Split anywhere: the state carries over between reads.
        for cut in 0..ok.len() {
            let mut g2 = FrameGuard::new(());
            g2.scan(&ok[..cut]).unwrap();
            g2.scan(&ok[cut..]).unwrap();
        }
        g.scan(&ok).unwrap();
        g.scan(b"abc").unwrap();
        assert!(g.scan(&u64::MAX.to_be_bytes()).is_err());
        // Before the handshake is over only small frames pass; after it, large ones do.
        let mut g = FrameGuard::new(());
        assert!(g.scan(&(1u64 << 20).to_be_bytes()).is_err());
        let mut g = FrameGuard::new(());
        for _ in 0..PRE_AUTH_FRAMES {
            g.scan(&0u64.to_be_bytes()).unwrap();
        }
        g.scan(&(1u64 << 20).to_be_bytes()).unwrap();
    }
}
