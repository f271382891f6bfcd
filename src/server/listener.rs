//! Accept loops for TCP, TLS and WebSocket listeners.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::connection::{serve, ConnCtx};
use crate::broker::Broker;
pub use crate::net::accept_next;
use crate::services::Services;

/// What kind of listener a bound socket is.
pub enum Kind {
    Tcp,
    Tls(TlsAcceptor),
    Ws { path: String },
}

/// Per-listener options.
#[derive(Debug, Clone, Copy, Default)]
pub struct Opts {
    /// Expect a PROXY protocol header first.
    pub proxy: bool,
    /// Accept clients without credentials.
    pub allow_anonymous: bool,
}

/// Accept until `shutdown`; every connection task is tracked so shutdown can wait for it.
pub async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    opts: Opts,
    broker: Arc<Broker>,
    services: Arc<Services>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let kind = Arc::new(kind);
    while let Some((stream, peer)) = accept_next(&listener, &shutdown).await {
        let (b, s, svc) = (broker.clone(), shutdown.clone(), services.clone());
        if let Kind::Tcp = *kind {
            // A plain TCP connection's task is its packet loop: the loop's future lives in the
            // task's own allocation, not in a box beside a 512-byte task (one allocation for
            // the connection's whole life instead of two).
            tracker.spawn(tcp(stream, peer, opts, b, svc, s));
        } else {
            let k = kind.clone();
            tracker.spawn(async move { handle(stream, peer, &k, opts, b, svc, s).await });
        }
    }
}

/// Read the PROXY protocol header when the listener expects one: false if the connection is
/// to be closed. Boxed: its 240 bytes would otherwise stay in every connection's task.
async fn proxy_header(stream: &mut TcpStream, peer: &mut SocketAddr, within: Duration) -> bool {
    match Box::pin(tokio::time::timeout(within, super::proxy::read_header(stream))).await {
        Ok(Ok(Some(client))) => *peer = client,
        Ok(Ok(None)) => {} // the balancer's own check
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "closing connection");
            return false;
        }
        Err(_) => {
            tracing::info!(%peer, "PROXY protocol header timed out");
            return false;
        }
    }
    true
}

/// A plain TCP connection, for its whole life.
async fn tcp(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    opts: Opts,
    broker: Arc<Broker>,
    services: Arc<Services>,
    shutdown: CancellationToken,
) {
    let handshake = Duration::from_secs(broker.config.mqtt.connect_timeout_secs);
    if opts.proxy && !proxy_header(&mut stream, &mut peer, handshake).await {
        return;
    }
    let ctx = ConnCtx { allow_anonymous: opts.allow_anonymous, cert_fingerprint: None, services };
    let (rd, wr) = stream.into_split();
    serve(broker, rd, wr, peer, ctx, shutdown).await
}

/// A TLS or WebSocket connection: its (large) stream and packet loop sit in a box.
async fn handle(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    kind: &Kind,
    opts: Opts,
    broker: Arc<Broker>,
    services: Arc<Services>,
    shutdown: CancellationToken,
) {
    if let Kind::Tcp = kind {
        // `accept_loop` spawns `tcp` itself (its future then lives in the task).
        return Box::pin(tcp(stream, peer, opts, broker, services, shutdown)).await;
    }
    let handshake = Duration::from_secs(broker.config.mqtt.connect_timeout_secs);
    if opts.proxy && !proxy_header(&mut stream, &mut peer, handshake).await {
        return;
    }
    let ctx = ConnCtx { allow_anonymous: opts.allow_anonymous, cert_fingerprint: None, services };
    match kind {
        Kind::Tcp => {} // above
        // Boxed: a TLS stream is large and would otherwise sit in every connection's task.
        Kind::Tls(acceptor) => Box::pin(tls(stream, peer, acceptor, ctx, broker, shutdown, handshake)).await,
        Kind::Ws { path } => Box::pin(ws(stream, peer, path, ctx, broker, shutdown, handshake)).await,
    }
}

async fn tls(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: &TlsAcceptor,
    mut ctx: ConnCtx,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    handshake: Duration,
) {
    match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            // A verified client certificate names its device by fingerprint.
            ctx.cert_fingerprint =
                tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| crate::devices::sha256_hex(c.as_ref()));
            let (rd, wr) = tokio::io::split(tls);
            Box::pin(serve(broker, rd, wr, peer, ctx, shutdown)).await
        }
        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
    }
}

async fn ws(
    stream: TcpStream,
    peer: SocketAddr,
    path: &str,
    ctx: ConnCtx,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    handshake: Duration,
) {
    let want = path.to_string();
    #[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
    let callback = move |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != want {
            let mut e = ErrorResponse::new(Some("no MQTT endpoint at this path".into()));
            *e.status_mut() = StatusCode::NOT_FOUND;
            return Err(e);
        }
        // "mqtt" is the registered name; some older clients offer "mqttv3.1".
        let offered: Vec<String> = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_string())
            .collect();
        if let Some(p) = ["mqtt", "mqttv3.1"].into_iter().find(|p| offered.iter().any(|o| o == p)) {
            resp.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
        }
        Ok(resp)
    };
    // A WebSocket message carries MQTT packets: none may be larger than the largest packet the
    // node accepts (tungstenite's own default is 64 MiB, allocated before CONNECT is even seen).
    let max = (broker.config.mqtt.max_packet_size as usize).saturating_add(8);
    let limits = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
    let accept = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(limits));
    let ws = match tokio::time::timeout(handshake, accept).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return tracing::info!(%peer, error = %e, "WebSocket handshake failed"),
        Err(_) => return tracing::info!(%peer, "WebSocket handshake timed out"),
    };
    // Bridge WebSocket frames to a byte stream so the MQTT connection code is transport-agnostic.
    let (mine, theirs) = tokio::io::duplex(16 * 1024);
    let (mut sink, mut source) = ws.split();
    let (mut brd, mut bwr) = tokio::io::split(mine);
    let inbound = async move {
        // An oversized frame or message ends the stream with an error: the connection closes.
        while let Some(Ok(msg)) = source.next().await {
            match msg {
                WsMessage::Binary(b) if bwr.write_all(&b).await.is_err() => break,
                WsMessage::Binary(_) => {}
                WsMessage::Close(_) => break,
                _ => {}
            }
        }
        let _ = bwr.shutdown().await;
    };
    let outbound = async move {
        // Small while idle; each read hands its bytes to one WebSocket frame without copying.
        let mut buf = bytes::BytesMut::new();
        loop {
            buf.reserve(4096);
            match brd.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if sink.send(WsMessage::Binary(buf.split().freeze())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    };
    let (rd, wr) = tokio::io::split(theirs);
    let conn = serve(broker, rd, wr, peer, ctx, shutdown);
    let inbound = tokio::spawn(inbound);
    tokio::join!(outbound, conn);
    inbound.abort();
}
