//! One client connection: reads and validates packets, handles CONNECT, routes inbound PUBLISH,
//! and hands everything that touches session state to the session actor.
mod acker;
mod authorise;
mod handshake;
mod publish;
use authorise::*;
use handshake::handshake;

use crate::actors::inspect::Tell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ractor::ActorRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::writer::Out;
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

/// A read side that can wait until it has something to read without holding a buffer (a quiet
/// client then costs no read buffer); streams that cannot tell are always ready.
pub trait ReadReady {
    fn ready(&mut self) -> impl std::future::Future<Output = ()> + Send;
}

impl ReadReady for tokio::net::tcp::OwnedReadHalf {
    async fn ready(&mut self) {
        let _ = self.readable().await;
    }
}

impl<T: Send> ReadReady for tokio::io::ReadHalf<T> {
    async fn ready(&mut self) {}
}

/// Serve one client over any byte stream (TCP, TLS, WebSocket bridge).
///
/// Not an `async fn`: one would keep its own copy of every argument (and the span's fields)
/// beside the packet loop's future for the connection's whole life.
pub fn serve<R, W>(
    broker: Arc<Broker>,
    rd: R,
    wr: W,
    peer: SocketAddr,
    ctx: ConnCtx,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()>
where
    R: AsyncRead + ReadReady + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let node = &broker.config.node.name;
    let span = tracing::info_span!("conn", %peer, %node, client_id = tracing::field::Empty, device = tracing::field::Empty);
    serve_inner(broker, rd, wr, peer, ctx, shutdown).instrument(span)
}

/// What the CONNECT exchange leaves for the packet loop.
struct Established<W> {
    conn: Conn,
    kicked: Arc<std::sync::atomic::AtomicU8>,
    conn_id: u64,
    keep_alive: u16,
    cancel: CancellationToken,
    /// The write half: this task writes what the session and the packet loop queue.
    out: Out<W>,
    _gauge: Gauge,
}

async fn serve_inner<R, W>(broker: Arc<Broker>, mut rd: R, wr: W, peer: SocketAddr, ctx: ConnCtx, shutdown: CancellationToken)
where
    R: AsyncRead + ReadReady + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let m = &broker.metrics;
    let max = broker.config.mqtt.max_packet_size as usize;
    let mut buf = BytesMut::new();
    // Taken apart at once: a named `Established` would keep its own (moved-from) room in this
    // future, which every idle connection carries.
    let Some(Established { mut conn, kicked, conn_id, keep_alive, cancel, mut out, _gauge }) =
        Box::pin(handshake(&broker, &mut rd, wr, &mut buf, peer, ctx, &shutdown)).await
    else {
        Box::pin(linger(&mut rd)).await;
        return;
    };
    let protocol = conn.protocol;
    let ka = if keep_alive == 0 { None } else { Some(Duration::from_millis(keep_alive as u64 * 1500)) };
    // One keep-alive timer for the connection's life, moved only when it fires early (a timer
    // per read cost a registration and a removal in the runtime's timer wheel per packet).
    let mut last_read = tokio::time::Instant::now();
    let alarm = tokio::time::sleep(ka.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(alarm);
    let mut read_hint = 256usize;
    let will = loop {
        // Handle every complete packet already buffered, then read more.
        let step = loop {
            // The packet moves into its boxed handling before anything is awaited: a decoded
            // `Packet` (384 bytes) held across the await would take its room in every
            // connection's future, idle or not.
            let handling = match next_packet(&mut conn, &mut buf, protocol, max) {
                Ok(Some(p)) => Box::pin(conn.handle(p)),
                Ok(None) => break None,
                Err(w) => break Some(w),
            };
            if let Some(w) = drive(&mut out, handling).await {
                break Some(w);
            }
        };
        if let Some(w) = step {
            break w;
        }
        if conn.session_lost {
            tracing::error!("session actor is gone; closing the connection");
            break conn.close(reason::UNSPECIFIED_ERROR);
        }
        if out.done {
            // The socket failed, or a DISCONNECT the session queued (a kick) was written.
            break WillAction::Publish;
        }
        // Writing first: answers and deliveries go out before more is read (a client waiting
        // for its acknowledgements is not kept waiting behind its own next packets); a
        // connection with nothing to write reads. The read waits across writes: it is not set
        // up again for each one.
        // A queued PUBACK waits at most `acker::DURABLE_WAIT`: the alarm fires by then (moved
        // only when it would fire later: once per such span in a steady stream).
        if let Some(at) = conn.held_acks.deadline().filter(|at| alarm.deadline() > *at) {
            alarm.as_mut().reset(at);
        }
        let ended = {
            let read = read_more(&mut rd, &mut buf, read_hint);
            // Set up once per read, not once per write (each took and released the tokens' locks).
            let (cut, stopping) = (cancel.cancelled(), shutdown.cancelled());
            tokio::pin!(read, cut, stopping);
            loop {
                tokio::select! {
                    biased;
                    // Queued PUBACKs whose message copies were taken (`acker`): written next.
                    _ = conn.held_acks.head_done(), if conn.held_acks.has_queued() => Box::pin(ready_acks(&mut conn, &mut out)).await,
                    more = out.step() => if !more { break Some(WillAction::Publish) },
                    r = &mut read => match r {
                        Ok((0, _)) | Err(_) => break Some(WillAction::Publish),
                        Ok((n, room)) => {
                            if ka.is_some() {
                                last_read = tokio::time::Instant::now();
                            }
                            Metrics::add(&m.bytes_received, n as u64);
                            read_hint = if n >= room { (read_hint * 2).min(64 * 1024) } else { read_hint };
                            break None;
                        }
                    },
                    // (Reading is cancel safe: bytes are only taken into `buf` by a completed read.)
                    _ = &mut alarm, if ka.is_some() || conn.held_acks.has_queued() => {
                        match Box::pin(alarm_rang(&mut conn, &mut out, ka.map(|ka| last_read + ka))).await {
                            Ok(next) => alarm.as_mut().reset(next),
                            Err(w) => break Some(w),
                        }
                    }
                    _ = &mut cut => break Some(WillAction::Publish),
                    _ = &mut stopping => break Some(conn.close(reason::SERVER_SHUTTING_DOWN)),
                }
            }
        };
        if let Some(w) = ended {
            break w;
        }
    };
    // The rare and the last steps are boxed: the future is as large as its largest wait, and
    // every connection carries it for its whole life (see `loadtest/README.md`).
    Box::pin(last_acks(&mut conn, &mut out, &cancel)).await;
    Box::pin(conn.ended(will, &kicked, conn_id)).await;
    // Write what is still queued (e.g. a DISCONNECT), bounded in time — unless the session
    // cut the connection (`cancel`: its queue was full of packets the client did not read).
    if !cancel.is_cancelled() {
        let _ = Box::pin(tokio::time::timeout(Duration::from_secs(5), out.finish())).await;
    }
    drop(out);
    Box::pin(linger(&mut rd)).await;
}

impl Conn {
    /// The connection is over: detach from the session, count why it ended, tell the webhooks
    /// and the device registry.
    async fn ended(self, will: WillAction, kicked: &std::sync::atomic::AtomicU8, conn_id: u64) {
        let m = &self.broker.metrics;
        let _ = self.session.tell(SessionMessage::Detach { conn_id, will, expiry: self.new_expiry });
        // Why it ended, for /metrics: the session's kick (takeover, operator, device disabled)
        // comes first, then what this task decided, else the socket went away.
        match (kicked.load(Ordering::Relaxed), self.end.load(Ordering::Relaxed)) {
            (k, _) if k != 0 => m.disconnects_server.add(k as usize, 1),
            (_, 0) => Metrics::add(&m.connections_lost, 1),
            (_, e) if e & 0x200 != 0 => m.disconnects_client.add((e & 0xff) as usize, 1),
            (_, e) => m.disconnects_server.add((e & 0xff) as usize, 1),
        }
        if let Some(h) = self.svc.hooks.as_ref() {
            // A session taken over lives on elsewhere: neither offline nor gone.
            if kicked.load(Ordering::Relaxed) != reason::SESSION_TAKEN_OVER {
                let hook = if self.new_expiry.unwrap_or(self.expiry) > 0 { "on_client_offline" } else { "on_client_gone" };
                // These two have no _m5 variants in VerneMQ.
                h.notify(hook, false, || crate::webhooks::body::client(&self.shown));
            }
        }
        if let Some(i) = self.principal.device() {
            let d = &self.svc.devices;
            let taken_over = kicked.load(Ordering::Relaxed) == reason::SESSION_TAKEN_OVER;
            Box::pin(d.disconnected(&i.device_number, conn_id, taken_over)).await;
        }
    }
}

/// The next buffered packet to handle (PUBACKs are collected for the session on the way):
/// `Ok(None)` once more must be read, `Err` when the connection closes (invalid packet).
fn next_packet(conn: &mut Conn, buf: &mut BytesMut, protocol: Protocol, max: usize) -> Result<Option<Packet>, WillAction> {
    loop {
        let before = buf.len();
        let decoded = decode(buf, protocol, max);
        if let Ok(Some(p)) = &decoded {
            conn.saw(p, before - buf.len());
        }
        match decoded {
            Ok(Some(Packet::PubAck(a))) => conn.acks.push(a.pkid),
            Ok(Some(p)) => {
                conn.flush_acks();
                return Ok(Some(p));
            }
            Ok(None) => {
                conn.flush_acks();
                return Ok(None);
            }
            Err(e) => {
                conn.flush_acks();
                Metrics::add(&conn.broker.metrics.protocol_errors, 1);
                tracing::info!(error = %e, "invalid packet; closing");
                return Err(conn.close(e.code));
            }
        }
    }
}

/// The connection's one timer rang: for the keep-alive (due at `keep_alive`, if any) or a
/// queued PUBACK's bound (`acker::DURABLE_WAIT`). When to ring next, or how the connection ends.
async fn alarm_rang<W: AsyncWrite + Unpin>(
    conn: &mut Conn,
    out: &mut Out<W>,
    keep_alive: Option<tokio::time::Instant>,
) -> Result<tokio::time::Instant, WillAction> {
    let now = tokio::time::Instant::now();
    if keep_alive.is_some_and(|d| now >= d) {
        tracing::info!("keep-alive timeout");
        return Err(conn.close(reason::KEEP_ALIVE_TIMEOUT));
    }
    // PUBACKs past their wait go out anyway (logged).
    drive(out, conn.send_ready_acks()).await;
    let next = keep_alive.into_iter().chain(conn.held_acks.deadline()).min();
    Ok(next.unwrap_or(now + Duration::from_secs(86_400)))
}

/// Queue the PUBACKs whose wait is over, writing meanwhile.
async fn ready_acks<W: AsyncWrite + Unpin>(conn: &mut Conn, out: &mut Out<W>) {
    drive(out, conn.send_ready_acks()).await;
}

/// The connection ends: the PUBACKs still waiting for their copies (see `Conn::last_acks`),
/// unless nothing more can be written.
async fn last_acks<W: AsyncWrite + Unpin>(conn: &mut Conn, out: &mut Out<W>, cancel: &CancellationToken) {
    if !out.done && conn.held_acks.has_queued() {
        drive(out, conn.last_acks(cancel)).await;
    }
}

/// Await a packet's handling while writing what is queued: the handling may wait for room in
/// the outbound queue, which only this task empties.
async fn drive<W: AsyncWrite + Unpin, T>(out: &mut Out<W>, handling: impl std::future::Future<Output = T>) -> T {
    let mut handling = std::pin::pin!(handling);
    loop {
        tokio::select! {
            biased;
            r = &mut handling => return r,
            _ = out.step(), if !out.done => {}
        }
    }
}

/// Read more of the client's bytes into `buf`, `hint` at a time: (bytes read, room the read
/// had). Busy connections grow their buffer (bounded) as reads fill it; a quiet one gives it
/// back and waits for bytes without one.
async fn read_more<R: AsyncRead + ReadReady + Unpin>(rd: &mut R, buf: &mut BytesMut, hint: usize) -> std::io::Result<(usize, usize)> {
    if buf.is_empty() {
        // Polled once, not awaited: the future is gone before this one waits, so it takes no
        // room in it.
        let quiet = {
            let probe = std::pin::pin!(rd.ready());
            std::future::Future::poll(probe, &mut std::task::Context::from_waker(std::task::Waker::noop())).is_pending()
        };
        if quiet || buf.capacity() > 64 * 1024 {
            *buf = BytesMut::new();
        }
        if quiet {
            rd.ready().await;
        }
    }
    buf.reserve(hint);
    let room = buf.capacity() - buf.len();
    Ok((rd.read_buf(buf).await?, room))
}

/// A lingering close: our side is shut (the writer sent what it had, e.g. a DISCONNECT or a
/// refusing CONNACK, then FIN); read and discard what the client still sends until it closes
/// too, for at most a second and 1 MiB. Closing with its packets unread would make the kernel
/// answer with a reset, and a client that was still writing would get a broken pipe instead
/// of reading our reason code.
async fn linger<R: AsyncRead + Unpin>(rd: &mut R) {
    let mut scratch = vec![0u8; 16 * 1024];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while left > 0 {
            match rd.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

struct Conn {
    /// The CONNECT's username (webhook bodies).
    username: Option<Arc<str>>,
    broker: Arc<Broker>,
    svc: Arc<Services>,
    client_id: Arc<str>,
    session: ActorRef<SessionMessage>,
    tx: crate::queue::Sender<Outbound>,
    protocol: Protocol,
    aliases: HashMap<u16, String>,
    expiry: u32,
    new_expiry: Option<u32>,
    /// PUBACKs read but not yet passed to the session (sent as one message per read batch).
    acks: Vec<u16>,
    /// QoS 2 publishes handed to the session but not yet routed by it (bounded so that
    /// backpressure, checked here, stays close to what the session routes: high-water (at most
    /// max_queued / 2) plus this read-ahead (at most max_queued / 4) stays under max_queued).
    /// Made at the first QoS 2 PUBLISH (most connections never send one).
    qos2_routing: Option<Arc<tokio::sync::Semaphore>>,
    session_lost: bool,
    /// QoS 1 acknowledgements that wait (in order, without stopping the read loop) until
    /// their message is durable and its telemetry written (see [`acker`]).
    held_acks: acker::AckChain,
    /// The negotiated keep-alive (seconds; 0: none).
    keep_alive: u16,
    /// Who the client is: its ACL, and for a device its identity at login.
    principal: Principal,
    /// A device's identity as it is now (`Devices::refresh_identity`): payload checks use it.
    identity: Option<Arc<arc_swap::ArcSwap<crate::devices::Identity>>>,
    /// The client id as the client sent it (traces).
    shown: Arc<str>,
    /// Why the connection ends: 0 = not decided, else 0x100 | (0x200 if the client closed it) | reason code.
    end: Arc<std::sync::atomic::AtomicU16>,
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

    /// Wait until the session has handled everything told before (its mailbox is in order).
    async fn settled(&mut self) {
        // A session that takes longer is not waited for beyond 10 s; one that is gone ends this.
        if self.session.ask(SessionMessage::Barrier, Some(Duration::from_secs(10))).await.is_err() {
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
        if let Err(crate::queue::TrySendError::Full(d)) = self.tx.try_send(Outbound::Disconnect(code)) {
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
                self.tell(SessionMessage::PubRec(Box::new(a), r));
            }
            Packet::PubRel(a) => {
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                self.tell(SessionMessage::PubRel(a.pkid, r));
            }
            Packet::PubComp(a) => {
                self.tell(SessionMessage::PubComp(a.pkid));
            }
            Packet::Subscribe(mut s) => {
                for (f, _) in s.filters.iter_mut() {
                    mount_in(&self.principal, f);
                }
                // Read: other clients' publishes read from now on wait for this change
                // (`actors::pending`), also while a webhook judges it — only for filters the
                // client's ACL allows, so a device cannot hold up publishers with `#`.
                let acl = self.principal.acl();
                let read = s.filters.iter().map(|(f, _)| f).filter(|f| acl.is_none_or(|a| a.may_subscribe(f))).cloned().collect();
                let ticket = self.broker.router.pending.begin(read);
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                let mut denied = Vec::new();
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
                    let granted: Vec<(String, u8)> = granted(&s, &denied).map(|(f, o)| (f.clone(), o.qos as u8)).collect();
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
                if judged || !denied.is_empty() {
                    ticket.refilter(granted(&s, &denied).map(|(f, _)| f.clone()).collect());
                }
                self.tell(SessionMessage::Subscribe(Box::new(s), denied, r, then, ticket));
                // Packets are processed in order: a PUBLISH read after this SUBSCRIBE (from this
                // client, or routed by it to anyone) must see the subscription in place. Other
                // clients' publishes read meanwhile wait for the ticket (`actors::pending`).
                self.settled().await;
            }
            Packet::Unsubscribe(mut u) => {
                for f in u.filters.iter_mut() {
                    mount_in(&self.principal, f);
                }
                let ticket = self.broker.router.pending.begin(u.filters.clone());
                let Some(r) = self.reply().await else { return Some(WillAction::Publish) };
                if let Some(h) = self.svc.hooks.as_ref() {
                    h.notify("on_unsubscribe", v5, || {
                        crate::webhooks::body::unsubscribe(self.username.as_deref(), &self.shown, &u.filters, v5)
                    });
                }
                self.tell(SessionMessage::Unsubscribe(Box::new(u), r, ticket));
                self.settled().await;
            }
            // Behind any acknowledgement still waiting: a PINGRESP confirms what came before.
            Packet::PingReq => {
                if self.held_acks.waiting() {
                    let c = self.ack_ctx();
                    c.ping(&mut self.held_acks).await;
                } else {
                    self.send(Packet::PingResp).await;
                }
            }
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

/// The filters of a SUBSCRIBE that are granted: all but the `denied` positions (after a
/// webhook may have rewritten them).
fn granted<'a>(
    s: &'a crate::protocols::mqtt::Subscribe,
    denied: &'a [usize],
) -> impl Iterator<Item = &'a (String, crate::protocols::mqtt::SubOptions)> + 'a {
    s.filters.iter().enumerate().filter(|(i, _)| !denied.contains(i)).map(|(_, x)| x)
}
