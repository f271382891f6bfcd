//! `thingsctl trace <client id>`: a client's packets, live, from whichever node it is on.
//!
//! The node the operator asks starts a trace on every node (so it follows the client across
//! takeovers); each node's connections check one atomic per packet (`Tracer::on`) and, only
//! while some trace is running, look their client id up and emit a JSON line per packet. Lines
//! go to the asking node over the cluster link (`Body::Trace`, batched) and out as an NDJSON
//! stream. Queues are bounded: a client faster than the operator's terminal loses trace lines
//! (counted in a `{"dropped": n}` line), never packets.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::actors::session::OutPublish;
use crate::message::now_ms;
use crate::protocols::mqtt::{Packet, Protocol};

/// Trace lines buffered per sink before they are dropped.
const SINK_QUEUE: usize = 10_000;

struct Sink {
    id: u64,
    tx: mpsc::Sender<String>,
    dropped: Arc<AtomicU64>,
}

/// Where a trace's lines go, and its count of lines dropped for lack of room.
type Listener = (mpsc::Sender<String>, Arc<AtomicU64>);

#[derive(Default)]
pub struct Tracer {
    /// Number of traced client ids on this node: the per-packet check.
    active: AtomicUsize,
    by_client: RwLock<HashMap<String, Vec<Sink>>>,
    /// Local receivers of traces started here (remote nodes' lines arrive for these ids).
    local: RwLock<HashMap<u64, Listener>>,
    next: AtomicU64,
}

impl Tracer {
    #[inline]
    pub fn on(&self) -> bool {
        self.active.load(Relaxed) > 0
    }

    /// Allocate a trace id unique in the cluster (the asking node's name is part of the key).
    pub fn new_id(&self) -> u64 {
        (now_ms() << 16) ^ self.next.fetch_add(1, Relaxed)
    }

    /// Start tracing `client` here, sending lines to `tx`.
    pub fn add(&self, client: &str, id: u64, tx: mpsc::Sender<String>, dropped: Arc<AtomicU64>) {
        if let Ok(mut m) = self.by_client.write() {
            let v = m.entry(client.to_string()).or_default();
            if v.is_empty() {
                self.active.fetch_add(1, Relaxed);
            }
            v.push(Sink { id, tx, dropped });
        }
    }

    /// Stop the trace `id` (every client it covers).
    pub fn remove(&self, id: u64) {
        if let Ok(mut m) = self.by_client.write() {
            m.retain(|_, v| {
                v.retain(|s| s.id != id);
                if v.is_empty() {
                    self.active.fetch_sub(1, Relaxed);
                }
                !v.is_empty()
            });
        }
        if let Ok(mut l) = self.local.write() {
            l.remove(&id);
        }
    }

    /// Register the receiver of trace `id` started on this node (lines from other nodes).
    pub fn listen(&self, id: u64, tx: mpsc::Sender<String>, dropped: Arc<AtomicU64>) {
        if let Ok(mut l) = self.local.write() {
            l.insert(id, (tx, dropped));
        }
    }

    /// Lines from another node for a trace started here.
    pub fn deliver(&self, id: u64, events: Vec<String>) {
        let Some((tx, dropped)) = self.local.read().ok().and_then(|l| l.get(&id).cloned()) else { return };
        for e in events {
            if tx.try_send(e).is_err() {
                dropped.fetch_add(1, Relaxed);
            }
        }
    }

    fn emit(&self, client: &str, line: impl FnOnce() -> Value) {
        let Ok(m) = self.by_client.read() else { return };
        let Some(sinks) = m.get(client) else { return };
        let line = line().to_string();
        for s in sinks {
            if s.tx.try_send(line.clone()).is_err() {
                s.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// A packet read from (`in`) or written to (`out`) the client.
    pub fn packet(&self, node: &str, client: &str, dir: &str, p: &Packet, protocol: Protocol) {
        self.emit(client, || describe(node, client, dir, p, protocol));
    }

    /// An outgoing PUBLISH (encoded by the writer from this).
    pub fn publish_out(&self, node: &str, client: &str, p: &OutPublish) {
        self.emit(client, || {
            json!({
                "ts_ms": now_ms(), "node": node, "client_id": client, "dir": "out", "type": "PUBLISH",
                "topic": &*p.msg.topic, "qos": p.qos as u8, "retain": p.retain, "dup": p.dup,
                "pkid": p.pkid, "payload_len": p.msg.payload.len(), "payload": preview(&p.msg.payload),
            })
        });
    }
}

/// A new bounded channel for a trace's lines, with its drop counter.
pub fn channel() -> (mpsc::Sender<String>, mpsc::Receiver<String>, Arc<AtomicU64>) {
    let (tx, rx) = mpsc::channel(SINK_QUEUE);
    (tx, rx, Arc::new(AtomicU64::new(0)))
}

/// The first 64 bytes of a payload, as text (lossy).
fn preview(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned()
}

fn describe(node: &str, client: &str, dir: &str, p: &Packet, protocol: Protocol) -> Value {
    let mut v = json!({ "ts_ms": now_ms(), "node": node, "client_id": client, "dir": dir, "type": p.name().to_uppercase() });
    let o = v.as_object_mut().expect("object");
    match p {
        Packet::Connect(c) => {
            o.insert("protocol".into(), json!(if c.protocol == Protocol::V5 { "5.0" } else { "3.1.1" }));
            o.insert("clean_start".into(), json!(c.clean_start));
            o.insert("keep_alive".into(), json!(c.keep_alive));
            o.insert("username".into(), json!(c.username.is_some()));
            o.insert("will".into(), json!(c.will.as_ref().map(|w| w.topic.clone())));
        }
        Packet::ConnAck(a) => {
            o.insert("code".into(), json!(a.code));
            o.insert("session_present".into(), json!(a.session_present));
        }
        Packet::Publish(p) => {
            o.insert("topic".into(), json!(p.topic));
            o.insert("qos".into(), json!(p.qos as u8));
            o.insert("retain".into(), json!(p.retain));
            o.insert("dup".into(), json!(p.dup));
            o.insert("pkid".into(), json!(p.pkid));
            o.insert("payload_len".into(), json!(p.payload.len()));
            o.insert("payload".into(), json!(preview(&p.payload)));
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            o.insert("pkid".into(), json!(a.pkid));
            if protocol == Protocol::V5 {
                o.insert("code".into(), json!(a.code));
            }
        }
        Packet::Subscribe(s) => {
            o.insert("pkid".into(), json!(s.pkid));
            o.insert(
                "filters".into(),
                json!(s.filters.iter().map(|(f, opt)| json!({"filter": f, "qos": opt.qos as u8})).collect::<Vec<_>>()),
            );
        }
        Packet::SubAck(s) => {
            o.insert("pkid".into(), json!(s.pkid));
            o.insert("codes".into(), json!(s.codes));
        }
        Packet::Unsubscribe(u) => {
            o.insert("pkid".into(), json!(u.pkid));
            o.insert("filters".into(), json!(u.filters));
        }
        Packet::UnsubAck(u) => {
            o.insert("pkid".into(), json!(u.pkid));
        }
        Packet::Disconnect(d) => {
            o.insert("code".into(), json!(d.code));
        }
        Packet::PingReq | Packet::PingResp | Packet::Auth(_) => {}
    }
    v
}
