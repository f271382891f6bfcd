//! CoAP (RFC 7252) over UDP for devices: the HTTP device API's resources under
//! `/api/v1/{token}/…` — `POST telemetry`, `POST|GET attributes`, `POST events`,
//! `GET rpc` and `POST rpc/{id}` — with confirmable and non-confirmable requests (duplicates
//! of a confirmable request get the cached answer) and Observe (RFC 7641) on `attributes`
//! (shared attribute updates) and `rpc` (commands pushed as confirmable notifications,
//! retransmitted until acknowledged). Messages are parsed by `coap-lite`.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, ContentFormat, MessageClass, MessageType, Packet, RequestType, ResponseType};
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::devices::{downlink, uplink, AuthError, Devices, EventKind, Identity};
use crate::storage::meta::{CommandKind, MetaError};

/// How long a confirmable request's answer is kept for duplicates (EXCHANGE_LIFETIME is 247 s;
/// bounded by count too).
const DEDUP_FOR: Duration = Duration::from_secs(60);
const DEDUP_MAX: usize = 20_000;
const MAX_OBSERVERS: usize = 50_000;
const MAX_DATAGRAM: usize = 65_535;
/// Requests handled at once; beyond it datagrams are dropped (confirmable ones are retransmitted
/// by the client), so a flood cannot grow memory without bound.
const MAX_IN_FLIGHT: usize = 1024;

/// A peer's message id.
type Exchange = (SocketAddr, u16);

struct Server {
    sock: UdpSocket,
    devices: Arc<Devices>,
    /// Answers to recent confirmable requests: (peer, message id) → bytes.
    recent: Mutex<HashMap<Exchange, (Instant, Vec<u8>)>>,
    /// Confirmable notifications waiting for their ACK (true) or RST (false).
    acks: Mutex<HashMap<(SocketAddr, u16), oneshot::Sender<bool>>>,
    /// Observations: (peer, token) → the observation.
    observers: Mutex<HashMap<(SocketAddr, Vec<u8>), Observing>>,
    /// Order of registrations (the oldest of a device makes way for its newest).
    registered: std::sync::atomic::AtomicU64,
    next_mid: std::sync::atomic::AtomicU16,
    stop: CancellationToken,
}

/// Serve CoAP on `sock` until `shutdown`.
pub async fn serve(sock: UdpSocket, devices: Arc<Devices>, shutdown: CancellationToken) {
    let srv = Arc::new(Server {
        sock,
        devices,
        recent: Mutex::default(),
        acks: Mutex::default(),
        observers: Mutex::default(),
        registered: std::sync::atomic::AtomicU64::new(0),
        next_mid: std::sync::atomic::AtomicU16::new(rand::random()),
        stop: shutdown.clone(),
    });
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut shed_logged = Instant::now() - Duration::from_secs(60);
    loop {
        let (n, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = srv.sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "CoAP receive failed");
                    continue;
                }
            },
        };
        let packet = match Packet::from_bytes(&buf[..n]) {
            Ok(p) => p,
            Err(e) => {
                // Not answerable without a header we can trust; a CON with a readable header
                // gets a Reset so the client stops retransmitting.
                tracing::debug!(%peer, error = %e, "undecodable CoAP message");
                if n >= 4 && buf[0] >> 6 == 1 && (buf[0] >> 4) & 3 == 0 {
                    let _ = srv.sock.send_to(&[0x70, 0x00, buf[2], buf[3]], peer).await;
                }
                continue;
            }
        };
        match packet.header.get_type() {
            MessageType::Acknowledgement | MessageType::Reset => {
                let ok = packet.header.get_type() == MessageType::Acknowledgement;
                if let Some(tx) = srv.acks.lock().ok().and_then(|mut m| m.remove(&(peer, packet.header.message_id))) {
                    let _ = tx.send(ok);
                }
            }
            MessageType::Confirmable | MessageType::NonConfirmable => {
                if !matches!(packet.header.code, MessageClass::Request(_)) {
                    // A CON ping (empty) gets a Reset, as RFC 7252 §4.3 says.
                    if packet.header.get_type() == MessageType::Confirmable {
                        let mut rst = Packet::new();
                        rst.header.set_type(MessageType::Reset);
                        rst.header.message_id = packet.header.message_id;
                        srv.send(&rst, peer).await;
                    }
                    continue;
                }
                if packet.header.get_type() == MessageType::Confirmable {
                    let cached = srv.recent.lock().ok().and_then(|m| m.get(&(peer, packet.header.message_id)).map(|(_, b)| b.clone()));
                    if let Some(b) = cached {
                        let _ = srv.sock.send_to(&b, peer).await;
                        continue;
                    }
                }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    if shed_logged.elapsed() > Duration::from_secs(60) {
                        shed_logged = Instant::now();
                        tracing::warn!(limit = MAX_IN_FLIGHT, "CoAP requests over the in-flight limit are dropped (logged once a minute)");
                    }
                    continue;
                };
                let s = srv.clone();
                tokio::spawn(async move {
                    s.request(packet, peer).await;
                    drop(permit);
                });
            }
        }
    }
    let observers: Vec<CancellationToken> = match srv.observers.lock() {
        Ok(mut m) => m.drain().map(|(_, o)| o.cancel).collect(),
        Err(_) => vec![],
    };
    observers.iter().for_each(CancellationToken::cancel);
}

/// An answer: code and JSON body (empty for `Value::Null`).
struct Answer(ResponseType, Value);

fn err(code: ResponseType, kind: &str, message: impl Into<String>) -> Answer {
    Answer(code, json!({"error": {"code": kind, "message": message.into()}}))
}

fn meta_err(e: MetaError) -> Answer {
    match e {
        MetaError::NotFound(m) => err(ResponseType::NotFound, "not_found", m),
        MetaError::Invalid(m) => err(ResponseType::BadRequest, "invalid", m),
        MetaError::Conflict(m) => err(ResponseType::Conflict, "conflict", m),
        MetaError::Db(e) => {
            tracing::error!(error = %e, "meta store error serving CoAP");
            err(ResponseType::ServiceUnavailable, "unavailable", "the device registry is unavailable")
        }
    }
}

impl Server {
    fn mid(&self) -> u16 {
        self.next_mid.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    async fn send(&self, p: &Packet, peer: SocketAddr) -> Option<Vec<u8>> {
        match p.to_bytes_with_limit(16 * 1024) {
            Ok(b) => {
                let _ = self.sock.send_to(&b, peer).await;
                Some(b)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a CoAP answer");
                None
            }
        }
    }

    fn response(&self, req: &Packet, a: &Answer) -> Packet {
        let mut p = Packet::new();
        if req.header.get_type() == MessageType::Confirmable {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = req.header.message_id;
        } else {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = self.mid();
        }
        p.set_token(req.get_token().to_vec());
        p.header.code = MessageClass::Response(a.0);
        if !a.1.is_null() {
            p.set_content_format(ContentFormat::ApplicationJSON);
            p.payload = a.1.to_string().into_bytes();
        }
        p
    }

    async fn request(self: Arc<Self>, req: Packet, peer: SocketAddr) {
        let (answer, observe) = self.route(&req, peer).await;
        let mut resp = self.response(&req, &answer);
        // A source that did not authenticate gets no answer larger than its request (a
        // forged UDP source must not turn the node into an amplifier): the code alone.
        if matches!(answer.0, ResponseType::Unauthorized | ResponseType::TooManyRequests | ResponseType::NotFound)
            && resp.to_bytes().map_or(0, |b| b.len()) > req.to_bytes().map_or(0, |b| b.len())
        {
            resp.payload.clear();
            resp.clear_option(CoapOption::ContentFormat);
        }
        if let Some((seq, _)) = &observe {
            resp.set_observe_value(*seq);
        }
        // Registered before the answer leaves: once a device hears its registration
        // acknowledged, its older observations beyond the cap have ended.
        let observing = observe.map(|(_, obs)| {
            let cancel = self.register_observer(&obs, req.get_token().to_vec(), peer);
            (obs, cancel)
        });
        if let Some(b) = self.send(&resp, peer).await {
            if req.header.get_type() == MessageType::Confirmable {
                if let Ok(mut m) = self.recent.lock() {
                    if m.len() >= DEDUP_MAX {
                        m.retain(|_, (t, _)| t.elapsed() < DEDUP_FOR);
                        if m.len() >= DEDUP_MAX {
                            m.clear();
                        }
                    }
                    m.insert((peer, req.header.message_id), (Instant::now(), b));
                }
            }
        }
        if let Some((obs, Some(cancel))) = observing {
            // Its own task: an observation outlives the request (and its in-flight permit).
            tokio::spawn(self.clone().observe(obs, req.get_token().to_vec(), peer, cancel));
        }
    }

    /// The answer, and for an Observe registration the first sequence number and what to watch.
    async fn route(&self, req: &Packet, peer: SocketAddr) -> (Answer, Option<(u32, Observation)>) {
        let path: Vec<String> = req
            .get_option(CoapOption::UriPath)
            .map(|l| l.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
            .unwrap_or_default();
        let query: Vec<String> = req
            .get_option(CoapOption::UriQuery)
            .map(|l| l.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
            .unwrap_or_default();
        let method = match req.header.code {
            MessageClass::Request(m) => m,
            _ => RequestType::UnKnown,
        };
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        let (token, rest) = match p.as_slice() {
            ["api", "v1", token, rest @ ..] if !rest.is_empty() => (*token, rest),
            _ => return (err(ResponseType::NotFound, "not_found", "no resource here"), None),
        };
        let d = &self.devices;
        let ident = match d.authenticate_token_udp(peer.ip(), token).await {
            Ok(i) => {
                d.reported(&i.device_number).await;
                i
            }
            Err(AuthError::RateLimited) => return (err(ResponseType::TooManyRequests, "rate_limited", "too many failed logins"), None),
            Err(AuthError::NotAuthorized) => return (err(ResponseType::Forbidden, "forbidden", "device disabled"), None),
            Err(AuthError::Unavailable) => {
                return (err(ResponseType::ServiceUnavailable, "unavailable", "the device registry is unavailable"), None)
            }
            Err(AuthError::BadCredentials) => return (err(ResponseType::Unauthorized, "unauthorized", "unknown access token"), None),
        };
        let observe = matches!(req.get_observe_value(), Some(Ok(0)));
        let deregister = matches!(req.get_observe_value(), Some(Ok(1)));
        if deregister {
            if let Some(o) = self.observers.lock().ok().and_then(|mut m| m.remove(&(peer, req.get_token().to_vec()))) {
                o.cancel.cancel();
            }
        }
        match (method, rest) {
            (RequestType::Post, ["telemetry"]) => (self.uplink(&ident, EventKind::Telemetry, None, &req.payload).await, None),
            (RequestType::Post, ["attributes"]) => (self.uplink(&ident, EventKind::Attributes, None, &req.payload).await, None),
            (RequestType::Post, ["events"]) => (self.uplink(&ident, EventKind::Event, None, &req.payload).await, None),
            (RequestType::Post, ["rpc", id]) => {
                (self.uplink(&ident, EventKind::CommandResponse, Some(id.to_string()), &req.payload).await, None)
            }
            (RequestType::Get, ["attributes"]) => {
                let keys: Vec<String> = query
                    .iter()
                    .filter_map(|q| q.strip_prefix("keys="))
                    .flat_map(|v| v.split(','))
                    .filter(|k| !k.is_empty())
                    .map(str::to_string)
                    .collect();
                match d.attributes_doc(ident.device_id, &keys).await {
                    Ok(doc) => (
                        Answer(ResponseType::Content, doc),
                        observe.then_some((0, Observation { ident, kinds: &[CommandKind::AttributeSet] })),
                    ),
                    Err(e) => (meta_err(e), None),
                }
            }
            (RequestType::Get, ["rpc"]) => {
                if observe {
                    // The registration answer is empty; commands come as notifications.
                    return (
                        Answer(ResponseType::Content, Value::Null),
                        Some((
                            0,
                            Observation { ident, kinds: &[CommandKind::Command, CommandKind::AttributeGet, CommandKind::TelemetryControl] },
                        )),
                    );
                }
                match d
                    .take_pending_of(ident.device_id, &[CommandKind::Command, CommandKind::AttributeGet, CommandKind::TelemetryControl])
                    .await
                {
                    Ok(Some(c)) => (Answer(ResponseType::Content, downlink::as_rpc(&c)), None),
                    Ok(None) => (Answer(ResponseType::Content, Value::Null), None),
                    Err(e) => (meta_err(e), None),
                }
            }
            (_, ["telemetry" | "attributes" | "events" | "rpc"] | ["rpc", _]) => {
                (err(ResponseType::MethodNotAllowed, "method_not_allowed", "method not allowed here"), None)
            }
            _ => (err(ResponseType::NotFound, "not_found", "no resource here"), None),
        }
    }

    async fn uplink(&self, ident: &Arc<Identity>, kind: EventKind, mid: Option<String>, payload: &[u8]) -> Answer {
        let d = &self.devices;
        let now = crate::message::now_ms() as i64;
        let m = uplink::Incoming { kind, gateway: false, message_id: mid, payload, protocol: "coap" };
        match uplink::parse(ident, m, &d.config.devices, now) {
            Err(why) => {
                d.rejected(&ident.device_number, "coap", &why);
                let code = match why {
                    uplink::Reject::TooLarge(_) => ResponseType::RequestEntityTooLarge,
                    _ => ResponseType::BadRequest,
                };
                err(code, why.code(), why.to_string())
            }
            Ok(events) => match d.ingest(events, None, std::time::Duration::from_millis(d.config.telemetry.wait_ms)).await {
                Ok(_) => Answer(ResponseType::Changed, Value::Null),
                Err(crate::devices::IngestError::Meta(e)) => meta_err(e),
                Err(crate::devices::IngestError::Busy) => err(ResponseType::ServiceUnavailable, "busy", "telemetry storage is busy; retry"),
                Err(crate::devices::IngestError::Refused(why)) => {
                    err(ResponseType::UnprocessableEntity, "refused_by_store", format!("the time-series store refuses these values: {why}"))
                }
            },
        }
    }

    /// Register an observation (ending the device's oldest beyond the cap, and an earlier one
    /// of the same peer and token); `None` when the node's observer table is full.
    fn register_observer(&self, obs: &Observation, token: Vec<u8>, peer: SocketAddr) -> Option<CancellationToken> {
        let cancel = self.stop.child_token();
        {
            let Ok(mut m) = self.observers.lock() else { return None };
            if m.len() >= MAX_OBSERVERS && !m.contains_key(&(peer, token.clone())) {
                tracing::warn!(%peer, "CoAP observer limit reached; not observing");
                return None;
            }
            let key = (peer, token.clone());
            let device = obs.ident.device_id;
            // A device that registers again (a new source port after NAT rebinding, a reboot)
            // leaves its old observations behind: beyond the cap, the oldest ends.
            let cap = self.devices.config.devices.coap_max_observations.max(1);
            let mut own: Vec<(u64, (SocketAddr, Vec<u8>))> =
                m.iter().filter(|(k, o)| o.device == device && **k != key).map(|(k, o)| (o.order, k.clone())).collect();
            if own.len() >= cap {
                own.sort_unstable();
                for (_, k) in own.iter().take(own.len() + 1 - cap) {
                    if let Some(o) = m.remove(k) {
                        tracing::info!(device = %obs.ident.device_number, peer = %k.0, cap, "CoAP observations of this device at their limit; ending the oldest");
                        o.cancel.cancel();
                    }
                }
            }
            let order = self.registered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some(old) = m.insert(key, Observing { device, order, cancel: cancel.clone() }) {
                old.cancel.cancel();
            }
        }
        Some(cancel)
    }

    /// Push downlinks of `kinds` to a registered observer as confirmable notifications until
    /// it deregisters, resets, stops acknowledging, a newer observation replaces it, or the
    /// node stops.
    async fn observe(self: Arc<Self>, obs: Observation, token: Vec<u8>, peer: SocketAddr, cancel: CancellationToken) {
        let d = self.devices.clone();
        let notify = d.waiter(&obs.ident.device_number);
        let mut seq = 1u32;
        loop {
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let next = match d.peek_pending_of(obs.ident.device_id, obs.kinds).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "CoAP observer cannot read downlinks");
                    None
                }
            };
            // Ended meanwhile (a newer observation beyond the cap, a deregistration): this
            // task may start, or finish reading, after that — it must not notify then.
            if cancel.is_cancelled() {
                break;
            }
            if let Some(c) = next {
                let body = if c.kind == CommandKind::AttributeSet { c.payload.clone() } else { downlink::as_rpc(&c) };
                let mut p = Packet::new();
                p.header.set_type(MessageType::Confirmable);
                p.header.code = MessageClass::Response(ResponseType::Content);
                p.set_token(token.clone());
                p.set_observe_value(seq);
                seq = seq.wrapping_add(1) & 0x00ff_ffff;
                p.set_content_format(ContentFormat::ApplicationJSON);
                p.payload = body.to_string().into_bytes();
                if !self.confirm(p, peer, &cancel).await {
                    tracing::info!(%peer, device = %obs.ident.device_number, "CoAP observer gone (reset or no acknowledgement)");
                    break;
                }
                // Acknowledged by the device: sent (it stays pending for other paths otherwise).
                if let Err(e) = d.delivered(c.id).await {
                    tracing::warn!(error = %e, "cannot mark a downlink sent");
                }
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = &mut woken => {}
                // A periodic look covers a lost wake-up and expiring observations.
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
        if let Ok(mut m) = self.observers.lock() {
            if m.get(&(peer, token.clone())).is_some_and(|o| o.cancel.is_cancelled() || o.cancel == cancel) {
                m.remove(&(peer, token));
            }
        }
    }

    /// Send a confirmable message, retransmitting (2 s doubling, 4 times) until ACK; false on
    /// RST, no answer, or cancellation.
    async fn confirm(&self, mut p: Packet, peer: SocketAddr, cancel: &CancellationToken) -> bool {
        let mid = self.mid();
        p.header.message_id = mid;
        let (tx, mut rx) = oneshot::channel();
        if let Ok(mut m) = self.acks.lock() {
            m.insert((peer, mid), tx);
        }
        let mut wait = Duration::from_secs(2);
        let mut result = false;
        for _ in 0..5 {
            if self.send(&p, peer).await.is_none() {
                break;
            }
            tokio::select! {
                r = &mut rx => {
                    result = r.unwrap_or(false);
                    break;
                }
                _ = tokio::time::sleep(wait) => wait *= 2,
                _ = cancel.cancelled() => break,
            }
        }
        if let Ok(mut m) = self.acks.lock() {
            m.remove(&(peer, mid));
        }
        result
    }
}

/// A registered observation.
struct Observing {
    device: i64,
    order: u64,
    cancel: CancellationToken,
}

/// What an observer watches: downlinks of these kinds for this device.
struct Observation {
    ident: Arc<Identity>,
    kinds: &'static [CommandKind],
}
