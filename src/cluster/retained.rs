//! Retained messages across the cluster: a hybrid logical clock per change, last writer wins,
//! tombstones, and the digest exchanged on link-up.
use super::*;
use crate::actors::inspect::Tell;

impl ClusterState {
    pub(super) fn tick_clock(&mut self) -> Hlc {
        let now = now_ms();
        if now > self.clock.ms {
            self.clock.ms = now;
            self.clock.counter = 0;
        } else {
            self.clock.counter += 1;
        }
        self.clock
    }

    pub(super) fn observe(&mut self, h: Hlc) {
        if (h.ms, h.counter) > (self.clock.ms, self.clock.counter) {
            self.clock.ms = h.ms;
            self.clock.counter = h.counter;
        }
    }

    pub(super) fn digest(&self) -> Vec<(Arc<str>, Hlc)> {
        let set = self.a.broker.retained.load();
        let mut out: Vec<(Arc<str>, Hlc)> = set
            .durable_messages()
            .into_iter()
            .map(|m| (m.topic.clone(), self.retained.get(&m.topic).copied().unwrap_or_default()))
            .collect();
        out.extend(self.tombstones.iter().map(|(t, (h, _))| (t.clone(), *h)));
        out
    }

    pub(super) fn entry(&self, topic: &Arc<str>) -> Option<RetainedEntry> {
        if let Some((h, _)) = self.tombstones.get(topic) {
            return Some(RetainedEntry { topic: topic.clone(), hlc: *h, msg: None });
        }
        let msg = self.a.broker.retained.load().get(topic)?;
        Some(RetainedEntry { topic: topic.clone(), hlc: self.retained.get(topic).copied().unwrap_or_default(), msg: Some(msg) })
    }

    pub(super) fn known_hlc(&self, topic: &Arc<str>) -> Option<Hlc> {
        if let Some((h, _)) = self.tombstones.get(topic) {
            return Some(*h);
        }
        if let Some(h) = self.retained.get(topic) {
            return Some(*h);
        }
        self.a.broker.retained.load().get(topic).map(|_| Hlc::default())
    }

    /// Apply a peer's retained changes (those newer than what this node has), in one update
    /// of the retained store.
    pub(super) fn apply_retained(&mut self, entries: Vec<RetainedEntry>) {
        let mut msgs = Vec::with_capacity(entries.len());
        for e in entries {
            if self.known_hlc(&e.topic).is_some_and(|h| h >= e.hlc) {
                continue;
            }
            self.observe(e.hlc);
            msgs.push(match e.msg {
                Some(m) => {
                    self.tombstones.remove(&e.topic);
                    self.retained.insert(e.topic.clone(), e.hlc);
                    m
                }
                None => {
                    self.retained.remove(&e.topic);
                    self.tombstones.insert(e.topic.clone(), (e.hlc, Instant::now()));
                    Arc::new(Message {
                        id: crate::message::next_id(),
                        topic: e.topic,
                        payload: bytes::Bytes::new(),
                        qos: crate::protocols::mqtt::QoS::AtMostOnce,
                        retain: true,
                        props: None,
                        expires_at: None,
                        publisher: None,
                        not_to_own_device: false,
                    })
                }
            });
        }
        if msgs.is_empty() {
            return;
        }
        if let Some(r) = self.a.broker.retained_actor.load_full() {
            let (tx, _rx) = ractor::concurrency::oneshot();
            let _ = r.tell(RetainedMessage::Set(msgs, tx.into()));
        }
    }
}
