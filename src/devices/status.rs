//! Online/offline status and last-seen per device. A device is online while it has a
//! connection on any node: the node where it connects publishes `devices/status/{number}`
//! (retained, so replicated to every node, last writer wins) with `{"online":true,"ts":..}`;
//! the node where its last connection closes publishes `false` — unless the connection was
//! taken over by a newer one (the device moved, it did not go away). A device that reports
//! over HTTP or CoAP has no connection: it is online from a report until it has not reported
//! for `devices.report_online_secs`.
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Devices, Kick};
use crate::message::{now_ms, Message};
use crate::protocols::mqtt::QoS;

/// How long Redis keeps a device's last activity.
const SEEN_KEPT: Duration = Duration::from_secs(30 * 86_400);

/// The cache key of a device's last activity (written by `seen`, read by `seen_shared`).
fn seen_key(number: &str) -> String {
    format!("seen:{number}")
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Status {
    pub online: bool,
    /// When the status last changed (Unix ms), if known.
    pub since: Option<u64>,
    /// Last message or connection (Unix ms), if known.
    pub last_seen: Option<u64>,
}

/// Status messages written to the retained store in one update at most.
const STATUS_BATCH: usize = 1024;

pub fn status_topic(number: &str) -> String {
    format!("devices/status/{number}")
}

impl Devices {
    /// A device connection is up on this node.
    pub async fn connected(&self, number: &Arc<str>, id: u64, kick: Kick) {
        self.register(number, id, kick);
        // Always announce: another node may have published offline for an older connection.
        // No last-seen write: a connected device is seen now (`status`), and its disconnect
        // records the time (a reconnect storm costs no cache write per device).
        self.publish_status(number, true).await;
    }

    /// A device connection closed; `taken_over`: a newer connection of the same session exists.
    pub async fn disconnected(&self, number: &Arc<str>, id: u64, taken_over: bool) {
        let last = self.unregister(number, id);
        self.seen(number).await;
        if last && !taken_over {
            self.publish_status(number, false).await;
        }
    }

    /// A device's HTTP or CoAP request: online now (unless it already shows online), and
    /// offline once it stops reporting (see `spawn_report_sweeper`).
    pub async fn reported(&self, number: &Arc<str>) {
        if self.config.devices.report_online_secs == 0 {
            return;
        }
        if let Ok(mut m) = self.reporting.lock() {
            m.insert(number.clone(), now_ms());
        }
        self.seen(number).await;
        if !self.presence(number).online {
            self.publish_status(number, true).await;
        }
    }

    /// Mark offline the devices that reported over HTTP or CoAP here and then stopped: not
    /// connected over MQTT here, not seen (through the shared cache) within the window.
    pub(super) fn spawn_report_sweeper(me: &Arc<Devices>) {
        let window = me.config.devices.report_online_secs.saturating_mul(1000);
        if window == 0 {
            return;
        }
        let weak = Arc::downgrade(me);
        let every = Duration::from_millis((window / 4).clamp(250, 30_000));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(d) = weak.upgrade() else { return };
                let now = now_ms();
                let quiet: Vec<Arc<str>> = match d.reporting.lock() {
                    Ok(mut m) => {
                        let q: Vec<Arc<str>> =
                            m.iter().filter(|(_, t)| now.saturating_sub(**t) >= window).map(|(n, _)| n.clone()).collect();
                        for n in &q {
                            m.remove(n);
                        }
                        q
                    }
                    Err(_) => Vec::new(),
                };
                for n in quiet {
                    let connected = d.conns.lock().is_ok_and(|m| m.contains_key(&n));
                    let seen = d.seen_shared(&n).await;
                    // `seen` is written at most every 10 s: a report on another node counts.
                    let elsewhere = seen.is_some_and(|t| now.saturating_sub(t) + 10_000 < window);
                    if !connected && !elsewhere && d.presence(&n).online {
                        d.publish_status(&n, false).await;
                    }
                }
            }
        });
    }

    /// Queue a status change; a worker publishes them in order, coalescing changes of one
    /// device (a reconnect storm costs one retained write per device, not two per connection,
    /// and never holds up a CONNECT).
    async fn publish_status(&self, number: &str, online: bool) {
        let mut q = self.status_queue.lock().unwrap_or_else(|e| e.into_inner());
        q.insert(Arc::from(number), (online, now_ms()));
        drop(q);
        self.status_wake.notify_one();
    }

    /// Drain the status queue until the platform is dropped.
    pub(super) fn spawn_status_worker(me: &Arc<Devices>) {
        let weak = Arc::downgrade(me);
        let wake = me.status_wake.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                let Some(d) = weak.upgrade() else { return };
                loop {
                    let batch: Vec<(Arc<str>, (bool, u64))> = {
                        let mut q = d.status_queue.lock().unwrap_or_else(|e| e.into_inner());
                        std::mem::take(&mut *q).into_iter().collect()
                    };
                    if batch.is_empty() {
                        break;
                    }
                    // In slices: one retained-store update, commit wait and cluster frame per
                    // slice, not per device (a node announcing 20,000 devices after a peer came
                    // up wrote them one commit at a time).
                    for slice in batch.chunks(STATUS_BATCH) {
                        d.write_statuses(slice).await;
                    }
                }
            }
        });
    }

    async fn write_statuses(&self, batch: &[(Arc<str>, (bool, u64))]) {
        let Some(b) = self.broker() else { return };
        let mut msgs = Vec::with_capacity(batch.len());
        for (number, (online, ts)) in batch {
            let (number, online, ts) = (&**number, *online, *ts);
            // `node`: who wrote it, so the survivors can mark a crashed node's devices offline.
            // The retained message is the status (replicated to every node, read by `presence`).
            let payload = serde_json::json!({"online": online, "ts": ts, "node": &*b.config.node.name}).to_string();
            if self.live.watched() {
                let data = serde_json::json!({"online": online});
                self.live.publish(crate::live::LiveEvent {
                    kind: "status".into(),
                    device: number.to_string(),
                    tenant_id: None,
                    ts: ts as i64,
                    data,
                });
            }
            msgs.push(Arc::new(Message::from_node(status_topic(number), payload, QoS::AtLeastOnce, true)));
        }
        b.retain_all(msgs.clone()).await;
        for msg in msgs {
            b.publish(msg);
        }
    }

    /// Follow cluster membership: when a node is declared down, the devices it said were online
    /// (and that are not connected here) are marked offline by their rendezvous owner among the
    /// survivors, so `offline_secs` rules fire; when a node comes (back) up, this node says
    /// again which devices are connected to it (after a partition the other side may have
    /// marked them offline).
    pub(super) fn watch_members(me: &Arc<Devices>) {
        let Some(c) = me.broker().and_then(|b| b.cluster.get().cloned()) else { return };
        let mut rx = c.events.subscribe();
        let weak = Arc::downgrade(me);
        tokio::spawn(async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                };
                let Some(d) = weak.upgrade() else { return };
                match ev {
                    crate::cluster::ClusterEvent::MemberDown { name, .. } => d.orphaned(&c, &name).await,
                    crate::cluster::ClusterEvent::MemberUp { .. } => {
                        let here: Vec<Arc<str>> = d.conns.lock().map(|m| m.keys().cloned().collect()).unwrap_or_default();
                        for n in here {
                            d.publish_status(&n, true).await;
                        }
                    }
                }
            }
        });
    }

    /// Mark offline the devices node `dead` last said were online on it.
    async fn orphaned(&self, c: &crate::cluster::Cluster, dead: &str) {
        let Some(b) = self.broker() else { return };
        let statuses = b.retained.load().matching("devices/status/+");
        let mut n = 0;
        for m in statuses {
            let Some(number) = m.topic.strip_prefix("devices/status/") else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) else { continue };
            if v["online"] != true || v["node"] != dead {
                continue;
            }
            let local = self.conns.lock().is_ok_and(|m| m.contains_key(number));
            if !local && *c.owner_of(number) == *b.config.node.name {
                self.publish_status(number, false).await;
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(node = dead, devices = n, "marked the devices of a lost node offline");
        }
    }

    /// Record activity (written to the shared cache at most every 10 s per device; no
    /// allocation on the hot path otherwise). Without Redis `seen_local` is the record: a copy
    /// in the in-process cache would be a second entry per device for no reader.
    pub async fn seen(&self, number: &Arc<str>) {
        let now = now_ms();
        if self.seen_local.get(number).is_some_and(|last| now.saturating_sub(last) < 10_000) {
            return;
        }
        self.seen_local.insert(number.clone(), now);
        if self.cache.is_redis() {
            self.cache.set(&seen_key(number), &now.to_string(), SEEN_KEPT).await;
        }
    }

    /// Last activity another node recorded (through Redis; nothing without it).
    async fn seen_shared(&self, number: &str) -> Option<u64> {
        if !self.cache.is_redis() {
            return None;
        }
        self.cache.get(&seen_key(number)).await.and_then(|v| v.parse::<u64>().ok())
    }

    /// Status as this node knows it: the replicated retained status message, and last-seen
    /// from the cache (shared through Redis; per node in-process).
    pub async fn status(&self, number: &str) -> Status {
        let mut s = self.presence(number);
        let cached = self.seen_shared(number).await;
        let local = self.seen_local.get(&Arc::<str>::from(number));
        s.last_seen = [cached, local, s.since].into_iter().flatten().max();
        if s.online {
            // Connected right now: seen now.
            s.last_seen = Some(now_ms());
        }
        s
    }

    /// Online and since when, from the replicated retained status message only (no cache
    /// round trip: alert rules ask this every tick).
    pub fn presence(&self, number: &str) -> Status {
        let mut s = Status::default();
        if let Some(b) = self.broker() {
            if let Some(m) = b.retained.load().get(&status_topic(number)) {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                    s.online = v.get("online").and_then(|o| o.as_bool()).unwrap_or(false);
                    s.since = v.get("ts").and_then(|t| t.as_u64());
                }
            }
        }
        s
    }
}
