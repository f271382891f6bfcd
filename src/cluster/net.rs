//! Node links on the wire: our own accept loop (so port 0 works and TLS is ours) handing
//! streams to the `ractor_cluster` NodeServer, and dialling peers (plain or mutually
//! authenticated TLS with `ring`).
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
    rustls_pemfile::certs(&mut std::io::BufReader::new(f)).collect::<Result<Vec<_>, _>>().with_context(|| format!("cluster TLS file {path}"))
}

impl LinkTls {
    pub fn load(cfg: &ClusterConfig) -> anyhow::Result<Option<LinkTls>> {
        if cfg.tls_cert.is_empty() {
            return Ok(None);
        }
        crate::server::install_crypto();
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

/// Accept node links until `stop` and hand each to the NodeServer (which authenticates the cookie).
pub async fn accept_loop(l: TcpListener, ns: ActorRef<NodeServerMessage>, tls: Option<LinkTls>, stop: CancellationToken) {
    loop {
        let (s, peer_addr) = tokio::select! {
            _ = stop.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = s.set_nodelay(true);
        let Ok(local_addr) = s.local_addr() else { continue };
        let ns = ns.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream = match tls {
                None => NetworkStream::Raw { peer_addr, local_addr, stream: s },
                Some(t) => match tokio::time::timeout(Duration::from_secs(10), t.acceptor.accept(s)).await {
                    Ok(Ok(stream)) => NetworkStream::TlsServer { peer_addr, local_addr, stream },
                    Ok(Err(e)) => return tracing::warn!(peer = %peer_addr, error = %e, "cluster TLS handshake failed"),
                    Err(_) => return tracing::warn!(peer = %peer_addr, "cluster TLS handshake timed out"),
                },
            };
            let _ = ns.cast(NodeServerMessage::ConnectionOpened { stream: Box::new(stream), is_server: true });
        });
    }
}

/// Open a link to `addr` (`host:port`); the handshake then continues inside ractor_cluster.
pub async fn dial(ns: &ActorRef<NodeServerMessage>, addr: &str, tls: Option<&LinkTls>) -> anyhow::Result<()> {
    let fut = async {
        match tls {
            None => ractor_cluster::client_connect(ns, addr).await.map_err(|e| anyhow::anyhow!("{e:?}")),
            Some(t) => {
                let host = addr.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(addr);
                let name = rustls::pki_types::ServerName::try_from(host.to_string()).context("server name")?;
                ractor_cluster::client_connect_enc(ns, addr, t.connector.clone(), name).await.map_err(|e| anyhow::anyhow!("{e:?}"))
            }
        }
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
