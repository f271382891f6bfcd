//! Live events for the API's websocket (`/api/v1/ws`): device telemetry and attributes,
//! device status changes and alert changes. Events are produced on the node where they happen;
//! a node with websocket clients asks its peers for theirs (renewed every few seconds, expiring
//! when no longer renewed), so a client sees the whole cluster whichever node it reached.
//! Nothing is serialised or sent while nobody watches.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::broker::Broker;
use crate::cluster::wire::Body;

/// One live event, as websocket clients receive it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LiveEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub device: String,
    /// Known for alerts; looked up by device for the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<i64>,
    pub ts: i64,
    pub data: Value,
}

const RENEW: Duration = Duration::from_secs(5);
const EXPIRE: Duration = Duration::from_secs(15);

pub struct Live {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    clients: AtomicUsize,
    /// Peers that asked for our events, and when they last asked.
    wanted_by: Mutex<HashMap<String, Instant>>,
    /// When the last peer asked (ms since start; 0 = never): lets `watched` skip the lock.
    last_wanted: std::sync::atomic::AtomicU64,
    started: Instant,
    broker: Weak<Broker>,
}

/// Held by a websocket client: counts it (the node asks its peers while any is held).
pub struct Watching(Arc<Live>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Live {
    pub fn start(broker: &Arc<Broker>) -> Arc<Live> {
        let live = Arc::new(Live {
            tx: broadcast::channel(4096).0,
            clients: AtomicUsize::new(0),
            wanted_by: Mutex::default(),
            last_wanted: Default::default(),
            started: Instant::now(),
            broker: Arc::downgrade(broker),
        });
        // Ask the peers for their events while clients watch here.
        let weak = Arc::downgrade(&live);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW).await;
                let Some(l) = weak.upgrade() else { return };
                if l.clients.load(Ordering::Relaxed) > 0 {
                    l.ask_peers();
                }
            }
        });
        live
    }

    fn ask_peers(&self) {
        if let Some(c) = self.broker.upgrade().and_then(|b| b.cluster.get().cloned()) {
            for p in c.peer_names() {
                c.send(&p, Body::LiveWant);
            }
        }
    }

    /// A websocket client starts watching: events from now on.
    pub fn watch(self: &Arc<Self>) -> (broadcast::Receiver<Arc<LiveEvent>>, Watching) {
        if self.clients.fetch_add(1, Ordering::Relaxed) == 0 {
            self.ask_peers();
        }
        (self.tx.subscribe(), Watching(self.clone()))
    }

    /// Does anyone, here or on a peer, watch? (Two atomic loads: asked for every device event.)
    pub fn watched(&self) -> bool {
        let last = self.last_wanted.load(Ordering::Relaxed);
        self.clients.load(Ordering::Relaxed) > 0
            || (last > 0 && (self.started.elapsed().as_millis() as u64).saturating_sub(last) < EXPIRE.as_millis() as u64)
    }

    /// An event that happened on this node: to local clients and to peers that asked.
    pub fn publish(&self, ev: LiveEvent) {
        let peers: Vec<String> = {
            let mut w = self.wanted_by.lock().unwrap_or_else(|e| e.into_inner());
            w.retain(|_, at| at.elapsed() < EXPIRE);
            w.keys().cloned().collect()
        };
        if !peers.is_empty() {
            if let (Some(c), Ok(json)) = (self.broker.upgrade().and_then(|b| b.cluster.get().cloned()), serde_json::to_string(&ev)) {
                for p in peers {
                    c.send(&p, Body::Live { event: json.clone() });
                }
            }
        }
        if self.clients.load(Ordering::Relaxed) > 0 {
            let _ = self.tx.send(Arc::new(ev));
        }
    }

    /// A peer's event (for the clients here only).
    pub fn from_peer(&self, json: &str) {
        if self.clients.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Ok(ev) = serde_json::from_str::<LiveEvent>(json) {
            let _ = self.tx.send(Arc::new(ev));
        }
    }

    /// A peer has websocket clients: send it our events for a while.
    pub fn peer_wants(&self, peer: &str) {
        self.wanted_by.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.to_string(), Instant::now());
        self.last_wanted.store((self.started.elapsed().as_millis() as u64).max(1), Ordering::Relaxed);
    }
}
