//! One client connection: reads and validates packets, handles CONNECT, routes inbound PUBLISH,
//! and hands everything that touches session state to the session actor.
use crate::actors::inspect::Tell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ractor::ActorRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::actors::registry::{RegistryMessage, Takeover};
use crate::actors::session::{AttachArgs, ConnHandle, Outbound, Reply, SessionMessage, WillAction};
use crate::broker::Broker;
use crate::devices::{uplink, AuthError, Credentials, Principal};
use crate::message::{now_ms, Message};
use crate::metrics::Metrics;
use crate::protocols::mqtt::{
    decode, encode, reason, topic, Ack, ConnAck, Connect, DecodeError, Packet, Properties, Protocol, Publish, QoS,
};
use crate::services::Services;
use crate::webhooks::Verdict;

static CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Decrements the connected-clients gauge when the connection ends.
struct Gauge(Arc<Broker>);
impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.metrics.clients_connected.fetch_sub(1, Ordering::Relaxed);
    }
}

enum ReadErr {
    Eof,
    Io,
    Decode(DecodeError),
}

async fn read_packet<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    protocol: Protocol,
    max: usize,
    m: &Metrics,
) -> Result<Packet, ReadErr> {
    loop {
        match decode(buf, protocol, max) {
            Ok(Some(p)) => return Ok(p),
            Ok(None) => {}
            Err(e) => return Err(ReadErr::Decode(e)),
        }
        buf.reserve(256);
        match rd.read_buf(buf).await {
            Ok(0) => return Err(ReadErr::Eof),
            Ok(n) => Metrics::add(&m.bytes_received, n as u64),
            Err(_) => return Err(ReadErr::Io),
        }
    }
}

async fn write_raw<W: AsyncWrite + Unpin>(wr: &mut W, p: &Packet, protocol: Protocol, m: &Metrics) {
    let mut b = BytesMut::new();
    encode(p, protocol, &mut b);
    m.packets_out.add(p.type_code(), 1);
    m.packet_bytes_out.add(p.type_code(), b.len() as u64);
    Metrics::add(&m.bytes_sent, b.len() as u64);
    if let Packet::ConnAck(a) = p {
        m.connacks.add(a.code as usize, 1);
    }
    let _ = wr.write_all(&b).await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

fn connack(code: u8) -> Packet {
    Packet::ConnAck(ConnAck { session_present: false, code, props: Properties::default() })
}

/// What the listener knows about a connection before its CONNECT.
#[derive(Clone)]
pub struct ConnCtx {
    /// The listener accepts clients without credentials.
    pub allow_anonymous: bool,
    /// SHA-256 (hex) of the client certificate (TLS listeners with `client_ca`).
    pub cert_fingerprint: Option<String>,
    /// The device platform and webhooks this connection answers to.
    pub services: Arc<Services>,
}

/// Serve one client over any byte stream (TCP, TLS, WebSocket bridge).
pub async fn serve<R, W>(broker: Arc<Broker>, rd: R, wr: W, peer: SocketAddr, ctx: ConnCtx, shutdown: CancellationToken)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let node = broker.config.node.name.clone();
    let span = tracing::info_span!("conn", %peer, %node, client_id = tracing::field::Empty, device = tracing::field::Empty);
    serve_inner(broker, rd, wr, peer, ctx, shutdown).instrument(span).await
}

/// What the CONNECT exchange leaves for the packet loop.
struct Established {
    conn: Conn,
    kicked: Arc<std::sync::atomic::AtomicU8>,
    conn_id: u64,
    keep_alive: u16,
    cancel: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    _gauge: Gauge,
}

/// CONNECT, validation, session attach. Kept out of the packet loop's future so an idle
/// connection does not carry the CONNECT packet and handshake state.
async fn handshake<R, W>(
    broker: &Arc<Broker>,
    rd: &mut R,
    mut wr: W,
    buf: &mut BytesMut,
    peer: SocketAddr,
    ctx: ConnCtx,
    shutdown: &CancellationToken,
) -> Option<Established>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = broker.config.clone();
    let m = &broker.metrics;
    let max = cfg.mqtt.max_packet_size as usize;
    let first = tokio::select! {
        r = Box::pin(tokio::time::timeout(Duration::from_secs(cfg.mqtt.connect_timeout_secs), read_packet(rd, buf, Protocol::V5, max, m))) => r,
        _ = shutdown.cancelled() => return None,
    };
    let mut c: Connect = match first {
        Err(_) => {
            tracing::debug!("no CONNECT within the connect timeout; closing");
            return None;
        }
        Ok(Ok(Packet::Connect(c))) => {
            m.packets_in.add(1, 1);
            *c
        }
        Ok(Ok(p)) => {
            tracing::info!(packet = p.name(), "first packet is not CONNECT; closing");
            return None;
        }
        Ok(Err(ReadErr::Decode(e))) => {
            Metrics::add(&m.protocol_errors, 1);
            tracing::info!(error = %e, "bad CONNECT; closing");
            // An unsupported level is answered in the 3.1.1 format below level 5 (return code 1) and
            // in the 5.0 format above; a bad 5.0 CONNECT is told why (0x81, 0x82, ...).
            let answer_in = match (e.code, e.level) {
                (reason::UNSUPPORTED_PROTOCOL_VERSION, l) if l < 5 => Some(Protocol::V4),
                (reason::UNSUPPORTED_PROTOCOL_VERSION, _) | (_, 5) => Some(Protocol::V5),
                _ => None,
            };
            if let Some(p) = answer_in {
                Box::pin(write_raw(&mut wr, &connack(e.code), p, m)).await;
            }
            return None;
        }
        Ok(Err(_)) => return None,
    };
    let protocol = c.protocol;
    let v5 = protocol == Protocol::V5;
    // Every log line of this connection carries its client id from here on.
    tracing::Span::current().record("client_id", c.client_id.as_str());

    // Refuse over the connection limit with a proper CONNACK rather than failing later.
    let connected = m.clients_connected.fetch_add(1, Ordering::Relaxed);
    let gauge = Gauge(broker.clone());

    Metrics::add(&m.connections_total, 1);
    if connected as usize >= cfg.mqtt.max_connections {
        tracing::warn!(limit = cfg.mqtt.max_connections, "connection limit reached; refusing");
        Box::pin(write_raw(&mut wr, &connack(reason::QUOTA_EXCEEDED), protocol, m)).await;
        return None;
    }
    if !broker.admit_connect() {
        tracing::warn!(limit = cfg.mqtt.max_connect_rate, "connect rate exceeded; refusing");
        Box::pin(write_raw(&mut wr, &connack(reason::CONNECTION_RATE_EXCEEDED), protocol, m)).await;
        return None;
    }
    if v5 && c.props.authentication_method.is_some() {
        tracing::info!("enhanced authentication requested but none is configured");
        Box::pin(write_raw(&mut wr, &connack(reason::BAD_AUTHENTICATION_METHOD), protocol, m)).await;
        return None;
    }
    // An `auth_on_register` webhook is asked first: `ok` admits, an error refuses, `next`
    // leaves it to the registry.
    let mut admitted = false;
    let svc = ctx.services.clone();
    if let Some(h) = svc.hooks.as_ref().filter(|h| h.has("auth_on_register", v5)) {
        let body = crate::webhooks::body::register(peer, c.username.as_deref(), c.password.as_deref(), &c.client_id, c.clean_start, v5);
        match Box::pin(h.auth("auth_on_register", v5, body)).await {
            Verdict::Ok(_) => admitted = true,
            Verdict::Next => {}
            Verdict::Error(e) => {
                tracing::info!(error = %e, username = c.username.as_deref().unwrap_or(""), "CONNECT refused by webhook");
                Box::pin(write_raw(&mut wr, &connack(reason::NOT_AUTHORIZED), protocol, m)).await;
                return None;
            }
        }
    }
    // Who is it? Devices are checked against the registry; wrong credentials get 0x86/0x87
    // (3.1.1: 4/5), and an address with too many failures is refused for a while.
    let principal = if admitted {
        Principal::External
    } else {
        {
            let d = &svc.devices;
            let creds = Credentials {
                username: c.username.as_deref(),
                password: c.password.as_deref(),
                cert_fingerprint: ctx.cert_fingerprint.as_deref(),
            };
            match Box::pin(d.authenticate(peer.ip(), &creds, ctx.allow_anonymous)).await {
                Ok(p) => p,
                Err(e) => {
                    let code = match e {
                        AuthError::BadCredentials => reason::BAD_USERNAME_OR_PASSWORD,
                        AuthError::NotAuthorized => reason::NOT_AUTHORIZED,
                        AuthError::RateLimited => reason::CONNECTION_RATE_EXCEEDED,
                        AuthError::Unavailable => reason::SERVER_UNAVAILABLE,
                    };
                    tracing::info!(reason = ?e, username = c.username.as_deref().unwrap_or(""), "CONNECT refused");
                    Box::pin(write_raw(&mut wr, &connack(code), protocol, m)).await;
                    return None;
                }
            }
        }
    };
    let mut props = Properties::default();
    let client_id: Arc<str> = if c.client_id.is_empty() {
        if !v5 && !c.clean_start {
            Box::pin(write_raw(&mut wr, &connack(reason::CLIENT_ID_NOT_VALID), protocol, m)).await;
            return None;
        }
        let id = format!("auto-{:016x}", rand::random::<u64>());
        if v5 {
            props.assigned_client_identifier = Some(id.clone());
        }
        Arc::from(id)
    } else {
        Arc::from(c.client_id.as_str())
    };
    tracing::Span::current().record("client_id", &*client_id);
    let shown = client_id.clone();
    if broker.tracer.on() {
        broker.tracer.packet(&cfg.node.name, &shown, "in", &Packet::Connect(Box::new(c.clone())), protocol);
    }
    // A device's sessions live in its own client-id namespace, and so do a service account's
    // ("@" never occurs in a device number): nobody inherits another principal's session by
    // reusing its client id.
    let device = principal.device().cloned();
    let client_id = match (&device, &principal) {
        (Some(i), _) => {
            tracing::Span::current().record("device", &*i.device_number);
            crate::devices::session_key(&i.device_number, &client_id)
        }
        (None, Principal::Service(_)) => crate::devices::session_key(&format!("@{}", c.username.as_deref().unwrap_or("")), &client_id),
        (None, _) => client_id,
    };

    // The will must be something this client may publish: checked now, never stored otherwise.
    let mut will = c.will.take();
    if let Some(w) = will.as_mut() {
        let asker = Asker { broker, svc: &svc, principal: &principal, username: c.username.as_deref(), client: &shown, v5 };
        if let Err(code) = Box::pin(admit_will(&asker, w)).await {
            Box::pin(write_raw(&mut wr, &connack(code), protocol, m)).await;
            return None;
        }
    }

    let mut keep_alive = c.keep_alive;
    let max_ka = cfg.mqtt.max_keepalive_secs;
    if v5 && max_ka > 0 && (keep_alive == 0 || keep_alive > max_ka) {
        keep_alive = max_ka;
        props.server_keep_alive = Some(max_ka);
    }
    let max_expiry = cfg.mqtt.max_session_expiry_secs;
    let expiry = if v5 {
        let asked = c.props.session_expiry_interval.unwrap_or(0);
        if asked > max_expiry {
            props.session_expiry_interval = Some(max_expiry);
        }
        asked.min(max_expiry)
    } else if c.clean_start {
        0
    } else {
        cfg.mqtt.v311_session_expiry_secs.min(max_expiry)
    };
    if v5 {
        props.receive_maximum = Some(cfg.mqtt.max_inflight.max(1));
        props.maximum_packet_size = Some(cfg.mqtt.max_packet_size);
        props.topic_alias_maximum = Some(cfg.mqtt.topic_alias_max);
    }
    let client_alias_max = c.props.topic_alias_maximum.unwrap_or(0);
    // Room for a full in-flight window of resends plus answers, whatever `outbound_queue` says.
    let (tx, rx) = mpsc::channel(cfg.mqtt.outbound_queue.max(cfg.mqtt.max_inflight as usize * 2 + 16));
    let cancel = CancellationToken::new();
    let conn_id = CONN_ID.fetch_add(1, Ordering::Relaxed);
    let kicked = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let handle = ConnHandle {
        kicked: kicked.clone(),
        id: conn_id,
        tx: tx.clone(),
        cancel: cancel.clone(),
        protocol,
        recv_max: c.props.receive_maximum.unwrap_or(u16::MAX),
        max_packet: c.props.maximum_packet_size.unwrap_or(u32::MAX),
        peer: peer.to_string(),
        connected_at_ms: now_ms(),
    };
    let attach = Box::new(AttachArgs {
        conn: handle,
        connack: ConnAck { session_present: false, code: reason::SUCCESS, props },
        clean_start: c.clean_start,
        will: will.map(Box::new),
        expiry,
    });
    let mount = device.as_ref().map(|i| Arc::<str>::from(format!("v1/devices/{}/", i.device_number)));
    let username: Option<Arc<str>> = c.username.as_deref().map(Arc::from);
    let writer = tokio::spawn(super::writer::run(
        wr,
        rx,
        protocol,
        client_alias_max,
        cancel.clone(),
        broker.clone(),
        svc.hooks.clone(),
        mount,
        (shown.clone(), username.clone()),
    ));
    let registry = broker.registry()?;
    let room = registry
        .ask(
            |reply| RegistryMessage::Room { client: client_id.clone(), cap: cfg.mqtt.max_sessions_per_principal, reply },
            Some(Duration::from_secs(15)),
        )
        .await;
    if !matches!(room, Ok(ractor::rpc::CallResult::Success(true))) {
        tracing::info!(cap = cfg.mqtt.max_sessions_per_principal, "CONNECT refused: every session of this principal is connected");
        let _ = tx.try_send(Outbound::Packet(Box::new(connack(reason::QUOTA_EXCEEDED))));
        let _ = tx.try_send(Outbound::Disconnect(reason::QUOTA_EXCEEDED));
        drop(tx);
        let _ = writer.await;
        return None;
    }
    let cid = client_id.clone();
    // In a cluster, the client id's registrar serialises connects cluster-wide and hands the
    // session over from the node that had it.
    let claim = match broker.cluster.get() {
        Some(cl) => Some(Box::pin(cl.claim(client_id.clone(), c.clean_start)).await),
        None => None,
    };
    let after = claim.as_ref().map(|t| (t.gen, t.from.clone()));
    let takeover = claim.map(|t| Takeover { gen: t.gen, from: t.from, state: t.state });
    let session = match Box::pin(registry.ask(
        |reply| RegistryMessage::Connect { client_id: cid, clean_start: c.clean_start, attach, takeover, reply },
        Some(Duration::from_secs(15)),
    ))
    .await
    {
        Ok(ractor::rpc::CallResult::Success(Ok(s))) => {
            // Routes are in place: the previous owner may flush (the session then ends the
            // claim), or the claim ends now.
            if let (Some(cl), Some((gen, from))) = (broker.cluster.get(), after) {
                match from {
                    Some(node) => cl.release(client_id.clone(), gen, node),
                    None => cl.claim_done(client_id.clone(), gen),
                }
            }
            s
        }
        other => {
            let why = match other {
                Ok(ractor::rpc::CallResult::Success(Err(e))) => e,
                _ => "registry did not answer".into(),
            };
            tracing::error!(error = %why, "cannot attach session");
            let _ = tx.try_send(Outbound::Packet(Box::new(connack(reason::SERVER_UNAVAILABLE))));
            let _ = tx.try_send(Outbound::Disconnect(reason::SERVER_UNAVAILABLE));
            drop(tx);
            let _ = writer.await;
            return None;
        }
    };
    tracing::debug!(?protocol, clean_start = c.clean_start, keep_alive, "client connected");
    if let Some(i) = &device {
        let d = &svc.devices;
        let kick = crate::devices::Kick { tx: Some(tx.clone()), cancel: cancel.clone() };
        Box::pin(d.connected(&i.device_number, conn_id, kick)).await;
        // Queued downlinks for a session that kept its subscriptions.
        let (d, n) = (d.clone(), i.device_number.clone());
        tokio::spawn(async move { d.flush_pending(&n).await });
    }
    let acker = broker.cluster.get().map(|_| {
        let (atx, arx) = mpsc::channel(broker.config.mqtt.max_inflight.max(1) as usize);
        tokio::spawn(ack_in_order(arx, tx.clone()));
        atx
    });
    if let Some(h) = svc.hooks.as_ref() {
        h.notify("on_register", v5, || crate::webhooks::body::registered(peer, username.as_deref(), &shown, v5));
    }
    let conn = Conn {
        username,
        broker: broker.clone(),
        svc: svc.clone(),
        client_id,
        session,
        tx,
        protocol,
        aliases: HashMap::new(),
        expiry,
        new_expiry: None,
        acks: Vec::new(),
        session_lost: false,
        qos2_routing: Arc::new(tokio::sync::Semaphore::new((broker.config.mqtt.max_queued / 4).clamp(1, 32))),
        acker,
        principal,
        shown,
        end: std::sync::atomic::AtomicU16::new(0),
    };
    Some(Established { conn, kicked, conn_id, keep_alive, cancel, writer, _gauge: gauge })
}

async fn serve_inner<R, W>(broker: Arc<Broker>, mut rd: R, wr: W, peer: SocketAddr, ctx: ConnCtx, shutdown: CancellationToken)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let m = &broker.metrics;
    let max = broker.config.mqtt.max_packet_size as usize;
    let mut buf = BytesMut::new();
    let Some(est) = Box::pin(handshake(&broker, &mut rd, wr, &mut buf, peer, ctx, &shutdown)).await else { return };
    let Established { mut conn, kicked, conn_id, keep_alive, cancel, writer, _gauge } = est;
    let session = conn.session.clone();
    let protocol = conn.protocol;
    let ka = if keep_alive == 0 { None } else { Some(Duration::from_millis(keep_alive as u64 * 1500)) };
    let mut read_hint = 256usize;
    let will = loop {
        // Handle every complete packet already buffered, then read more.
        let step = loop {
            let before = buf.len();
            let decoded = decode(&mut buf, protocol, max);
            if let Ok(Some(p)) = &decoded {
                conn.saw(p, before - buf.len());
            }
            match decoded {
                Ok(Some(Packet::PubAck(a))) => conn.acks.push(a.pkid),
                Ok(Some(p)) => {
                    conn.flush_acks();
                    if let Some(w) = Box::pin(conn.handle(p)).await {
                        break Some(w);
                    }
                }
                Ok(None) => {
                    conn.flush_acks();
                    break None;
                }
                Err(e) => {
                    conn.flush_acks();
                    Metrics::add(&m.protocol_errors, 1);
                    tracing::info!(error = %e, "invalid packet; closing");
                    break Some(conn.close(e.code));
                }
            }
        };
        if let Some(w) = step {
            break w;
        }
        if conn.session_lost {
            tracing::error!("session actor is gone; closing the connection");
            break conn.close(reason::UNSPECIFIED_ERROR);
        }
        // Idle connections hold a small buffer; busy ones grow it (bounded) as reads fill it.
        if buf.is_empty() && buf.capacity() > 64 * 1024 {
            buf = BytesMut::new();
        }
        buf.reserve(read_hint);
        let before = buf.len();
        let room = buf.capacity() - before;
        let read = async {
            match ka {
                Some(d) => tokio::time::timeout(d, rd.read_buf(&mut buf)).await.ok(),
                None => Some(rd.read_buf(&mut buf).await),
            }
        };
        tokio::select! {
            r = read => match r {
                None => {
                    tracing::info!("keep-alive timeout");
                    break conn.close(reason::KEEP_ALIVE_TIMEOUT);
                }
                Some(Ok(0)) | Some(Err(_)) => break WillAction::Publish,
                Some(Ok(n)) => {
                    Metrics::add(&m.bytes_received, n as u64);
                    read_hint = if n >= room { (read_hint * 2).min(64 * 1024) } else { read_hint };
                }
            },
            _ = cancel.cancelled() => break WillAction::Publish,
            _ = shutdown.cancelled() => break conn.close(reason::SERVER_SHUTTING_DOWN),
        }
    };
    let _ = session.tell(SessionMessage::Detach { conn_id, will, expiry: conn.new_expiry });
    // Why it ended, for /metrics: the session's kick (takeover, operator, device disabled)
    // comes first, then what this task decided, else the socket went away.
    match (kicked.load(Ordering::Relaxed), conn.end.load(Ordering::Relaxed)) {
        (k, _) if k != 0 => m.disconnects_server.add(k as usize, 1),
        (_, 0) => Metrics::add(&m.connections_lost, 1),
        (_, e) if e & 0x200 != 0 => m.disconnects_client.add((e & 0xff) as usize, 1),
        (_, e) => m.disconnects_server.add((e & 0xff) as usize, 1),
    }
    if let Some(h) = conn.svc.hooks.as_ref() {
        // A session taken over lives on elsewhere: neither offline nor gone.
        if kicked.load(Ordering::Relaxed) != reason::SESSION_TAKEN_OVER {
            let hook = if conn.new_expiry.unwrap_or(conn.expiry) > 0 { "on_client_offline" } else { "on_client_gone" };
            // These two have no _m5 variants in VerneMQ.
            h.notify(hook, false, || crate::webhooks::body::client(&conn.shown));
        }
    }
    if let Some(i) = conn.principal.device() {
        let d = &conn.svc.devices;
        let taken_over = kicked.load(Ordering::Relaxed) == reason::SESSION_TAKEN_OVER;
        Box::pin(d.disconnected(&i.device_number, conn_id, taken_over)).await;
    }
    drop(conn);
    // Let the writer flush what is queued (e.g. a DISCONNECT), bounded in time.
    if tokio::time::timeout(Duration::from_secs(5), writer).await.is_err() {
        cancel.cancel();
    }
}

struct Conn {
    /// The CONNECT's username (webhook bodies).
    username: Option<Arc<str>>,
    broker: Arc<Broker>,
    svc: Arc<Services>,
    client_id: Arc<str>,
    session: ActorRef<SessionMessage>,
    tx: mpsc::Sender<Outbound>,
    protocol: Protocol,
    aliases: HashMap<u16, String>,
    expiry: u32,
    new_expiry: Option<u32>,
    /// PUBACKs read but not yet passed to the session (sent as one message per read batch).
    acks: Vec<u16>,
    /// QoS 2 publishes handed to the session but not yet routed by it (bounded so that
    /// backpressure, checked here, stays close to what the session routes: high-water (at most
    /// max_queued / 2) plus this read-ahead (at most max_queued / 4) stays under max_queued).
    qos2_routing: Arc<tokio::sync::Semaphore>,
    session_lost: bool,
    /// In a cluster: QoS 1 acknowledgements wait (in order, without stopping the read loop)
    /// until their message is durable.
    acker: Option<mpsc::Sender<(Packet, Option<Arc<crate::message::Durable>>)>>,
    /// Who the client is: its ACL, and for a device its identity.
    principal: Principal,
    /// The client id as the client sent it (traces).
    shown: Arc<str>,
    /// Why the connection ends: 0 = not decided, else 0x100 | (0x200 if the client closed it) | reason code.
    end: std::sync::atomic::AtomicU16,
}

/// Send PUBACKs in order, each once its message is durable.
async fn ack_in_order(mut rx: mpsc::Receiver<(Packet, Option<Arc<crate::message::Durable>>)>, tx: mpsc::Sender<Outbound>) {
    while let Some((p, d)) = rx.recv().await {
        if let Some(d) = d {
            Broker::wait_durable(&d).await;
        }
        if tx.send(Outbound::Packet(Box::new(p))).await.is_err() {
            return;
        }
    }
}

impl Conn {
    /// Count (and trace, while a trace runs) a packet read from the client.
    fn saw(&self, p: &Packet, bytes: usize) {
        let m = &self.broker.metrics;
        let t = p.type_code();
        m.packets_in.add(t, 1);
        m.packet_bytes_in.add(t, bytes as u64);
        if let Packet::Publish(p) = p {
            m.publish_in.add(p.qos as usize, 1);
        }
        if self.broker.tracer.on() {
            self.broker.tracer.packet(&self.broker.config.node.name, &self.shown, "in", p, self.protocol);
        }
    }

    /// Pass a message to the session; if the session actor is gone (it crashed), remember it so
    /// the connection closes instead of running on without a session.
    fn tell(&mut self, m: SessionMessage) {
        if self.session.tell(m).is_err() {
            self.session_lost = true;
        }
    }

    fn flush_acks(&mut self) {
        if !self.acks.is_empty() {
            let acks = std::mem::take(&mut self.acks);
            self.tell(SessionMessage::PubAcks(acks));
        }
    }

    /// Server-initiated close with a reason (sent as DISCONNECT in 5.0).
    fn close(&self, code: u8) -> WillAction {
        let _ = self.end.compare_exchange(0, 0x100 | code as u16, Ordering::Relaxed, Ordering::Relaxed);
        if let Err(mpsc::error::TrySendError::Full(d)) = self.tx.try_send(Outbound::Disconnect(code)) {
            // Queue full: hand the DISCONNECT to a task that waits for room (bounded in time).
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), tx.send(d)).await;
            });
        }
        WillAction::Publish
    }

    /// Queue an answer; waits for room (a client that does not read stops being read).
    async fn send(&self, p: Packet) {
        let _ = self.tx.send(Outbound::Packet(Box::new(p))).await;
    }

    /// Reserve room for an answer the session will send.
    async fn reply(&self) -> Option<Reply> {
        self.tx.clone().reserve_owned().await.ok()
    }

    /// Handle one packet; `Some` ends the connection with that will action.
    async fn handle(&mut self, p: Packet) -> Option<WillAction> {
        let v5 = self.protocol == Protocol::V5;
        match p {
            Packet::Publish(p) => return self.publish(p).await,
            Packet::PubAck(a) => {
                self.tell(SessionMessage::PubAcks(vec![a.pkid]));
            }
            Packet::PubRec(a) => {
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                self.tell(SessionMessage::PubRec(a, r));
            }
            Packet::PubRel(a) => {
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                self.tell(SessionMessage::PubRel(a.pkid, r));
            }
            Packet::PubComp(a) => {
                self.tell(SessionMessage::PubComp(a.pkid));
            }
            Packet::Subscribe(mut s) => {
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                let mut denied = Vec::new();
                for (f, _) in s.filters.iter_mut() {
                    mount_in(&self.principal, f);
                }
                let judged = match self.svc.hooks.clone() {
                    Some(h) if h.has("auth_on_subscribe", v5) => Box::pin(self.subscribe_hook(&h, &mut s, &mut denied)).await,
                    _ => false,
                };
                for (i, (f, _)) in s.filters.iter().enumerate() {
                    if !judged && self.principal.acl().is_some_and(|a| !a.may_subscribe(f)) {
                        tracing::info!(filter = %f, "SUBSCRIBE denied by ACL");
                        count_denied(&self.svc);
                        denied.push(i);
                    }
                }
                if let Some(h) = self.svc.hooks.as_ref() {
                    let granted: Vec<(String, u8)> = s
                        .filters
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !denied.contains(i))
                        .map(|(_, (f, o))| (f.clone(), o.qos as u8))
                        .collect();
                    h.notify("on_subscribe", v5, || crate::webhooks::body::subscribe(self.username.as_deref(), &self.shown, granted, v5));
                }
                // A device subscribed to its downlink topics: send what was queued for it.
                let then = match self.principal.device() {
                    Some(i) => {
                        let d = &self.svc.devices;
                        let (d, number) = (d.clone(), i.device_number.to_string());
                        Some(Box::new(move || {
                            tokio::spawn(async move { d.flush_pending(&number).await });
                        }) as crate::actors::session::OnGranted)
                    }
                    _ => None,
                };
                self.tell(SessionMessage::Subscribe(s, denied, r, then));
            }
            Packet::Unsubscribe(mut u) => {
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                for f in u.filters.iter_mut() {
                    mount_in(&self.principal, f);
                }
                if let Some(h) = self.svc.hooks.as_ref() {
                    h.notify("on_unsubscribe", v5, || {
                        crate::webhooks::body::unsubscribe(self.username.as_deref(), &self.shown, &u.filters, v5)
                    });
                }
                self.tell(SessionMessage::Unsubscribe(u, r));
            }
            Packet::PingReq => self.send(Packet::PingResp).await,
            Packet::Disconnect(d) => {
                if let Some(e) = d.props.session_expiry_interval {
                    if self.expiry == 0 && e != 0 {
                        tracing::info!("DISCONNECT sets a session expiry after CONNECT set 0: protocol error");
                        return Some(self.close(reason::PROTOCOL_ERROR));
                    }
                    self.new_expiry = Some(e.min(self.broker.config.mqtt.max_session_expiry_secs));
                }
                self.end.store(0x300 | d.code as u16, Ordering::Relaxed);
                return Some(if v5 && d.code == reason::DISCONNECT_WITH_WILL { WillAction::Publish } else { WillAction::Discard });
            }
            Packet::Connect(_) => {
                tracing::info!("second CONNECT: protocol error");
                return Some(self.close(reason::PROTOCOL_ERROR));
            }
            Packet::Auth(_) => {
                tracing::info!("AUTH without enhanced authentication in progress");
                return Some(self.close(reason::PROTOCOL_ERROR));
            }
            other => {
                tracing::info!(packet = other.name(), "server-to-client packet sent by client");
                return Some(self.close(reason::PROTOCOL_ERROR));
            }
        }
        None
    }

    /// Answer a PUBLISH that is not routed: the reason code in 5.0; in 3.1.1 (which has no
    /// negative acknowledgement) the message is dropped but still acknowledged, so the client
    /// does not resend it forever.
    async fn refuse(&self, qos: QoS, pkid: u16, code: u8) {
        let code = if self.protocol == Protocol::V5 { code } else { reason::SUCCESS };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(Packet::PubAck(Ack::new(pkid, code))).await,
            // 3.1.1: the PUBREL that follows is answered by the session (PUBCOMP).
            QoS::ExactlyOnce => self.send(Packet::PubRec(Ack::new(pkid, code))).await,
        }
    }

    /// A device's uplink message: checked, turned into events and applied. `Some(code)`:
    /// refused (the message is not routed).
    async fn uplink(
        &mut self,
        ident: &Arc<crate::devices::Identity>,
        kind: uplink::EventKind,
        gateway: bool,
        mid: Option<String>,
        payload: &[u8],
        props: Option<&Properties>,
    ) -> Option<u8> {
        let d = self.svc.devices.clone();
        let m = uplink::Incoming { kind, gateway, message_id: mid, payload, protocol: "mqtt" };
        match uplink::parse(ident, m, &d.config.devices, now_ms() as i64) {
            Err(why) => {
                d.rejected(&ident.device_number, "mqtt", &why);
                // MQTT 5.0: the device may have asked for answers on a response topic.
                if let Some(rt) = props.and_then(|p| p.response_topic.clone()) {
                    if self.principal.acl().is_some_and(|a| a.may_subscribe(&rt)) {
                        let body = serde_json::json!({"error": {"code": why.code(), "message": why.to_string()}});
                        self.answer(rt, body, props.and_then(|p| p.correlation_data.clone()));
                    }
                }
                Some(match why {
                    uplink::Reject::TooLarge(_) => reason::QUOTA_EXCEEDED,
                    _ => reason::PAYLOAD_FORMAT_INVALID,
                })
            }
            Ok(events) => match d
                .ingest(
                    events,
                    Some(crate::devices::ReplyTo { family: if gateway { "gateway" } else { "devices" }, number: &ident.device_number }),
                    // MQTT devices wait longer: holding the acknowledgement back is the protocol's
                    // own flow control.
                    std::time::Duration::from_millis(d.config.telemetry.wait_ms.saturating_mul(10)),
                )
                .await
            {
                Ok(answers) => {
                    for a in answers {
                        self.answer(a.topic, a.payload, None);
                    }
                    None
                }
                Err(crate::devices::IngestError::Busy) => {
                    tracing::warn!(device = %ident.device_number, "telemetry storage busy: disconnecting the device unacknowledged (it resends)");
                    Some(reason::SERVER_BUSY)
                }
                // Logged once by the writer that tried it.
                Err(crate::devices::IngestError::Refused(_)) => Some(reason::PAYLOAD_FORMAT_INVALID),
                Err(e) => {
                    tracing::error!(error = %e, "cannot store a device message");
                    Some(reason::UNSPECIFIED_ERROR)
                }
            },
        }
    }

    /// Publish a platform answer to the device (QoS 1, routed like any message).
    fn answer(&self, topic: String, body: serde_json::Value, correlation: Option<bytes::Bytes>) {
        let mut msg = Message::from_node(topic, body.to_string(), QoS::AtLeastOnce, false);
        msg.props = correlation.map(|c| Box::new(Properties { correlation_data: Some(c), ..Properties::default() }));
        self.broker.publish(Arc::new(msg));
    }

    async fn publish(&mut self, p: Publish) -> Option<WillAction> {
        let m = &self.broker.metrics;
        Metrics::add(&m.messages_received, 1);
        let broker = self.broker.clone();
        let cfg = &broker.config.mqtt;
        let v5 = self.protocol == Protocol::V5;
        let mut props = p.props.map(|b| *b);
        let alias = props.as_mut().and_then(|pr| pr.topic_alias.take());
        let topic: String = match alias {
            None => p.topic,
            Some(a) if a > cfg.topic_alias_max => return Some(self.close(reason::TOPIC_ALIAS_INVALID)),
            Some(a) if p.topic.is_empty() => match self.aliases.get(&a) {
                Some(t) => t.clone(),
                None => return Some(self.close(reason::PROTOCOL_ERROR)),
            },
            Some(a) => {
                self.aliases.insert(a, p.topic.clone());
                p.topic
            }
        };
        let mut asked = Asked { topic, payload: p.payload, qos: p.qos, retain: p.retain };
        mount_in(&self.principal, &mut asked.topic);
        let asker = Asker {
            broker: &broker,
            svc: &self.svc,
            principal: &self.principal,
            username: self.username.as_deref(),
            client: &self.shown,
            v5,
        };
        if let Err(code) = Box::pin(authorise(&asker, &mut asked)).await {
            if code == reason::TOPIC_NAME_INVALID && !v5 {
                // 3.1.1 has no negative acknowledgement for a topic it cannot take.
                return Some(self.close(code));
            }
            self.refuse(p.qos, p.pkid, code).await;
            return None;
        }
        let Asked { topic, payload, qos: qos_out, retain } = asked;
        // A device's uplink the platform took (stored, answered) has a receiver: it is
        // acknowledged as a success even when no subscriber matched (not 0x10).
        let mut taken = false;
        if let Some(ident) = self.principal.device().cloned() {
            if let Some((kind, gateway, mid)) = uplink::classify(&topic, &ident.device_number) {
                taken = true;
                if let Some(code) = Box::pin(self.uplink(&ident, kind, gateway, mid, &payload, props.as_ref())).await {
                    if code == reason::SERVER_BUSY {
                        // Not acknowledged: the device sends it again when it reconnects.
                        return Some(self.close(reason::SERVER_BUSY));
                    }
                    self.refuse(p.qos, p.pkid, code).await;
                    return None;
                }
            }
            // Subscribers (platform services) learn which device sent it.
            props.get_or_insert_with(Properties::default).user_properties.push(("device_number".into(), ident.device_number.to_string()));
        }
        let expires_at = props.as_mut().and_then(|pr| pr.message_expiry_interval.take()).map(|s| now_ms() + s as u64 * 1000);
        if let Some(pr) = props.as_mut() {
            pr.subscription_identifiers.clear();
        }
        let props = props.filter(|pr| !pr.is_empty()).map(Box::new);
        // Clients may not inject broker statistics.
        let routable = !topic.starts_with("$SYS");
        if let Some(h) = self.svc.hooks.as_ref() {
            h.notify("on_publish", v5, || {
                let pl = h.payload("on_publish", v5, &payload);
                crate::webhooks::body::publish(self.username.as_deref(), &self.shown, qos_out as u8, &topic, pl, retain, v5)
            });
        }
        let msg = Arc::new(Message {
            id: crate::message::next_id(),
            topic: Arc::from(topic),
            payload,
            qos: qos_out,
            retain,
            props,
            expires_at,
            publisher: Some(self.client_id.clone()),
        });
        if msg.retain && routable {
            self.broker.retain(msg.clone()).await;
        }
        match p.qos {
            QoS::AtMostOnce => {
                if routable {
                    self.broker.publish_with_backpressure(msg).await;
                }
            }
            QoS::AtLeastOnce => {
                let (n, durable) = if routable { self.broker.publish_routed(msg).await } else { (0, None) };
                let code = if n == 0 && v5 && !taken { reason::NO_MATCHING_SUBSCRIBERS } else { reason::SUCCESS };
                let ack = Packet::PubAck(Ack::new(p.pkid, code));
                match &self.acker {
                    Some(a) => {
                        let _ = a.send((ack, durable)).await;
                    }
                    None => self.send(ack).await,
                }
            }
            QoS::ExactlyOnce => {
                // Through the session even when not routable: it owns the exactly-once state.
                let Some(reply) = self.reply().await else { return Some(WillAction::Publish) };
                let Ok(routing) = self.qos2_routing.clone().acquire_owned().await else { return Some(WillAction::Publish) };
                let topic = msg.topic.clone();
                self.tell(SessionMessage::InboundQos2 { pkid: p.pkid, msg, taken, reply, _routing: routing });
                // The session routes it (it owns exactly-once); pacing is the connection's job.
                self.broker.pace(&topic).await;
            }
        }
        None
    }
}

impl Conn {
    /// Ask the `auth_on_subscribe` webhooks; true when they decided (the ACL is then not
    /// asked). Their `topics` answer rewrites the filters (QoS 128 refuses one).
    async fn subscribe_hook(
        &self,
        h: &crate::webhooks::Webhooks,
        s: &mut crate::protocols::mqtt::Subscribe,
        denied: &mut Vec<usize>,
    ) -> bool {
        let v5 = self.protocol == Protocol::V5;
        let topics: Vec<(String, u8)> = s.filters.iter().map(|(f, o)| (f.clone(), o.qos as u8)).collect();
        let body = crate::webhooks::body::subscribe(self.username.as_deref(), &self.shown, topics, v5);
        match h.auth("auth_on_subscribe", v5, body).await {
            Verdict::Ok(answer) => {
                if let Some(list) = answer.get("topics").and_then(|t| t.as_array()) {
                    if list.len() != s.filters.len() {
                        tracing::warn!("auth_on_subscribe webhook answered a different number of topics; refusing them");
                        denied.extend(0..s.filters.len());
                        return true;
                    }
                    for (i, t) in list.iter().enumerate() {
                        let qos = t.get("qos").and_then(|q| q.as_u64()).unwrap_or(s.filters[i].1.qos as u64);
                        match (t.get("topic").and_then(|x| x.as_str()), QoS::from_u8(qos.min(255) as u8)) {
                            _ if qos == 128 => denied.push(i),
                            (Some(f), Some(q)) if crate::protocols::mqtt::topic::valid_filter(f) => {
                                s.filters[i].0 = f.to_string();
                                s.filters[i].1.qos = q;
                            }
                            _ => {
                                tracing::warn!(answer = %t, "auth_on_subscribe webhook answered an unusable topic; refusing it");
                                denied.push(i);
                            }
                        }
                    }
                }
                true
            }
            Verdict::Next => false,
            Verdict::Error(e) => {
                tracing::info!(error = %e, "SUBSCRIBE denied by webhook");
                count_denied(&self.svc);
                denied.extend(0..s.filters.len());
                true
            }
        }
    }
}

/// What a client asks the broker to publish: a PUBLISH, or the will of its CONNECT. Both pass
/// the same checks ([`authorise`]), so a will can never reach a topic its client could not
/// publish on.
struct Asked {
    topic: String,
    payload: bytes::Bytes,
    qos: QoS,
    retain: bool,
}

/// Who asks, as hooks and the ACL see it.
struct Asker<'a> {
    broker: &'a Broker,
    svc: &'a Services,
    principal: &'a Principal,
    username: Option<&'a str>,
    client: &'a str,
    v5: bool,
}

/// Rewrite ThingsBoard's `v1/devices/me/…` to the device's own `v1/devices/{number}/…`
/// (and back on the way out, in the writer), so devices cannot see each other's `me`.
fn mount_in(principal: &Principal, t: &mut String) {
    if let Some(i) = principal.device() {
        if let Some(rest) = t.strip_prefix("v1/devices/me/") {
            *t = format!("v1/devices/{}/{rest}", i.device_number);
        }
    }
}

fn count_denied(svc: &Services) {
    svc.devices.metrics.acl_denied.fetch_add(1, Ordering::Relaxed);
}

/// The checks every client message passes before it is routed, retained or kept as a will:
/// the topic's depth (before anything walks it), then the `auth_on_publish` webhook (which may
/// modify the message) or else the principal's ACL. `Err(reason)` refuses it.
async fn authorise(a: &Asker<'_>, m: &mut Asked) -> Result<(), u8> {
    let max_levels = a.broker.config.mqtt.max_topic_levels;
    if topic::levels(&m.topic) > max_levels {
        tracing::info!(levels = topic::levels(&m.topic), max_levels, "topic too deep; refused");
        return Err(reason::TOPIC_NAME_INVALID);
    }
    if let Some(h) = a.svc.hooks.clone().filter(|h| h.has("auth_on_publish", a.v5)) {
        let body = crate::webhooks::body::publish(
            a.username,
            a.client,
            m.qos as u8,
            &m.topic,
            h.payload("auth_on_publish", a.v5, &m.payload),
            m.retain,
            a.v5,
        );
        match Box::pin(h.auth("auth_on_publish", a.v5, body)).await {
            Verdict::Ok(answer) => {
                if let Some(mods) = answer.get("modifiers").filter(|m| m.is_object()) {
                    if let Err(why) = modified(&h, a.v5, mods, &mut m.topic, &mut m.payload, &mut m.qos, &mut m.retain) {
                        tracing::warn!(error = %why, "auth_on_publish webhook answered unusable modifiers; refusing the message");
                        return Err(reason::IMPLEMENTATION_SPECIFIC);
                    }
                    if topic::levels(&m.topic) > max_levels {
                        tracing::warn!("auth_on_publish webhook answered a topic deeper than mqtt.max_topic_levels; refusing the message");
                        return Err(reason::TOPIC_NAME_INVALID);
                    }
                }
                return Ok(());
            }
            Verdict::Next => {}
            Verdict::Error(e) => {
                tracing::info!(topic = %m.topic, error = %e, "message denied by webhook");
                count_denied(a.svc);
                return Err(reason::NOT_AUTHORIZED);
            }
        }
    }
    if a.principal.acl().is_some_and(|acl| !acl.may_publish(&m.topic)) {
        tracing::info!(topic = %m.topic, "message denied by ACL");
        count_denied(a.svc);
        return Err(reason::NOT_AUTHORIZED);
    }
    Ok(())
}

/// A CONNECT's will, checked now as its PUBLISH would be when it fires: the same
/// [`authorise`] step, no `$` topic, and for a device a payload its uplink topic accepts. The
/// will kept is the one authorised (a webhook may have modified it), marked with the device.
async fn admit_will(a: &Asker<'_>, w: &mut crate::protocols::mqtt::Will) -> Result<(), u8> {
    let mut m = Asked { topic: std::mem::take(&mut w.topic), payload: w.payload.clone(), qos: w.qos, retain: w.retain };
    mount_in(a.principal, &mut m.topic);
    authorise(a, &mut m).await?;
    // Clients never publish on the server's own `$` topics (`$SYS`, …).
    if m.topic.starts_with('$') {
        tracing::info!(topic = %m.topic, "will on a $ topic refused");
        count_denied(a.svc);
        return Err(reason::NOT_AUTHORIZED);
    }
    if let (Some(ident), Some(d)) = (a.principal.device(), Some(&a.svc.devices)) {
        if let Some((kind, gateway, mid)) = uplink::classify(&m.topic, &ident.device_number) {
            let incoming = uplink::Incoming { kind, gateway, message_id: mid, payload: &m.payload, protocol: "mqtt" };
            if let Err(why) = uplink::parse(ident, incoming, &d.config.devices, now_ms() as i64) {
                tracing::info!(topic = %m.topic, error = %why, "will payload refused");
                return Err(match why {
                    uplink::Reject::TooLarge(_) => reason::PACKET_TOO_LARGE,
                    _ => reason::PAYLOAD_FORMAT_INVALID,
                });
            }
        }
        w.props.user_properties.push(("device_number".into(), ident.device_number.to_string()));
    }
    (w.topic, w.payload, w.qos, w.retain) = (m.topic, m.payload, m.qos, m.retain);
    Ok(())
}

/// Apply an `auth_on_publish` answer's modifiers (topic, payload, qos, retain).
fn modified(
    h: &crate::webhooks::Webhooks,
    v5: bool,
    m: &serde_json::Value,
    topic: &mut String,
    payload: &mut bytes::Bytes,
    qos: &mut QoS,
    retain: &mut bool,
) -> Result<(), String> {
    if let Some(t) = m.get("topic") {
        let t = t.as_str().ok_or("topic is not a string")?;
        if !crate::protocols::mqtt::topic::valid_topic_name(t) {
            return Err(format!("{t:?} is not a topic name"));
        }
        *topic = t.to_string();
    }
    if let Some(p) = m.get("payload") {
        *payload = h.decode_payload("auth_on_publish", v5, p.as_str().ok_or("payload is not a string")?).ok_or("payload is not base64")?;
    }
    if let Some(q) = m.get("qos") {
        *qos = q.as_u64().and_then(|q| QoS::from_u8(q.min(255) as u8)).ok_or("qos is 0, 1 or 2")?;
    }
    if let Some(r) = m.get("retain") {
        *retain = r.as_bool().ok_or("retain is a boolean")?;
    }
    Ok(())
}
