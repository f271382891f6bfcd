//! The outbound path: queue deliveries, fill the in-flight window, hand packets to the writer.
use tokio::sync::mpsc::error::TrySendError;

use super::*;
use crate::message::now_ms;
use crate::protocols::mqtt::publish_len;

impl SessionState {
    /// PUBACKs from the client (batched by the connection) free their window slots.
    pub(super) fn on_pubacks(&mut self, me: &ActorRef<SessionMessage>, pkids: Vec<u16>) {
        let mut freed = false;
        for pkid in pkids {
            // Acks usually come in send order, so the match is near the front.
            if let Some(i) = self.inflight.iter().position(|f| f.pkid == pkid && !f.released && f.d.qos == QoS::AtLeastOnce) {
                if let Some(f) = self.inflight.remove(i) {
                    self.forget(&f.d);
                }
                freed = true;
            }
        }
        if freed {
            self.drain(me);
        }
    }

    /// A PUBREC: release the message (answered PUBREL) or, refused, free its slot.
    pub(super) fn on_pubrec(&mut self, me: &ActorRef<SessionMessage>, ack: Ack, reply: Reply) {
        match self.inflight.iter().position(|f| f.pkid == ack.pkid && f.d.qos == QoS::ExactlyOnce) {
            Some(i) if ack.code >= 0x80 => {
                if let Some(f) = self.inflight.remove(i) {
                    self.forget(&f.d);
                }
                self.drain(me);
            }
            Some(i) => {
                self.inflight[i].released = true;
                let d = self.inflight[i].d.clone();
                self.record_pkid(&d, ack.pkid, true);
                answer(reply, Packet::PubRel(Ack::new(ack.pkid, 0)));
                self.mark_dirty(me);
            }
            None => answer(reply, Packet::PubRel(Ack::new(ack.pkid, reason::PACKET_ID_NOT_FOUND))),
        }
    }

    /// A PUBCOMP ends a released QoS 2 delivery.
    pub(super) fn on_pubcomp(&mut self, me: &ActorRef<SessionMessage>, pkid: u16) {
        if let Some(i) = self.inflight.iter().position(|f| f.pkid == pkid && f.released) {
            if let Some(f) = self.inflight.remove(i) {
                self.forget(&f.d);
            }
            self.drain(me);
        }
    }

    pub(super) fn publish_props(&self, d: &Delivery, now: u64) -> Option<Box<Properties>> {
        if self.protocol != Protocol::V5 {
            return None;
        }
        let expiry = d.msg.remaining_expiry(now);
        if d.msg.props.is_none() && d.sub_ids.is_empty() && expiry.is_none() {
            return None;
        }
        let mut p = d.msg.props.as_deref().cloned().unwrap_or_default();
        p.subscription_identifiers = d.sub_ids.clone();
        p.message_expiry_interval = expiry;
        Some(Box::new(p))
    }

    pub(super) fn send_publish(&mut self, d: &Delivery, pkid: u16, dup: bool) -> Sent {
        let Some(c) = &self.conn else { return Sent::Full };
        let now = now_ms();
        let props = self.publish_props(d, now);
        let size =
            publish_len(self.protocol, d.msg.topic.len(), d.qos, props.as_deref().unwrap_or(Properties::empty()), d.msg.payload.len());
        if size > c.max_packet as usize {
            // 5.0: a packet larger than the client accepts is discarded as if delivered.
            self.broker.metrics.dropped(crate::metrics::Dropped::TooLargeForClient);
            return Sent::Dropped;
        }
        let out = OutPublish { msg: d.msg.clone(), qos: d.qos, retain: d.retain, dup, pkid, props };
        match c.tx.try_send(Outbound::Publish(out)) {
            Ok(()) => Sent::Ok,
            Err(TrySendError::Full(_)) => Sent::Full,
            Err(TrySendError::Closed(_)) => Sent::Full,
        }
    }

    pub(super) fn schedule_flush(&mut self, me: &ActorRef<SessionMessage>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            me.send_after(Duration::from_millis(5), || SessionMessage::Flush);
        }
    }

    /// Queue a delivery (bounded) and send what the window and the socket queue allow. QoS 0
    /// waits in the same queue while the socket is busy, so it counts towards backpressure.
    pub(super) fn deliver(&mut self, me: &ActorRef<SessionMessage>, mut d: Delivery) {
        // A publisher may be waiting for this copy to reach the backup node (see `replicate`);
        // dropping the token without replicating releases it.
        let token = d.durable.take();
        if d.msg.expired(now_ms()) {
            crate::metrics::Metrics::add(&self.broker.metrics.messages_expired, 1);
            return;
        }
        // While held or moving, duplicates are sorted out when the buffer is delivered.
        if let Some(r) = self.recent.as_mut().filter(|_| self.moving.is_none() && self.held.is_none()) {
            if !r.0.insert(d.msg.id) {
                return; // already delivered (re-routed after a node loss)
            }
            r.1.push_back(d.msg.id);
            if r.1.len() > 4096 {
                if let Some(old) = r.1.pop_front() {
                    r.0.remove(&old);
                }
            }
        }
        if self.persistent() && d.qos != QoS::AtMostOnce && self.moving.is_none() && self.broker.cluster.get().is_some() {
            self.to_backup.push(d.clone(), token.clone());
        }
        // During a cross-node hand-over, deliveries wait for the other side, bounded like the
        // whole queue (a hand-over after a node loss can take a second or two of a stream).
        let cap = self.broker.config.mqtt.queue_max_messages.max(1);
        if let Some(buf) = self.moving.as_mut().map(|m| &mut m.buffer).or(self.held.as_mut().map(|h| &mut h.buffer)) {
            if buf.len() < cap {
                buf.push(d);
            } else {
                if let Some(t) = token {
                    t.refuse();
                }
                self.broker.metrics.dropped(crate::metrics::Dropped::HandoverFull);
            }
            return;
        }
        if self.conn.is_none() && d.qos == QoS::AtMostOnce && !self.broker.config.mqtt.queue_qos0_offline {
            return;
        }
        self.enqueue(d, token);
        if self.conn.is_some() {
            self.drain(me);
        } else {
            self.mark_dirty(me);
        }
    }

    /// Move queued messages into the in-flight window while there is room.
    pub(super) fn drain(&mut self, me: &ActorRef<SessionMessage>) {
        if self.conn.is_none() {
            return;
        }
        let now = now_ms();
        loop {
            self.refill();
            let Some(d) = self.pending.front() else { break };
            if d.msg.expired(now) {
                if let Some(d) = self.pending.pop_front() {
                    self.forget(&d);
                }
                crate::metrics::Metrics::add(&self.broker.metrics.messages_expired, 1);
                continue;
            }
            if d.qos == QoS::AtMostOnce {
                let d = d.clone();
                match self.send_publish(&d, 0, false) {
                    Sent::Full => {
                        self.schedule_flush(me);
                        return;
                    }
                    _ => {
                        self.pending.pop_front();
                    }
                }
                continue;
            }
            if self.inflight.len() >= self.window() {
                return;
            }
            let d = d.clone();
            let pkid = self.alloc_pkid();
            match self.send_publish(&d, pkid, false) {
                Sent::Ok => {
                    self.pending.pop_front();
                    self.record_pkid(&d, pkid, false);
                    self.inflight.push_back(Inflight { pkid, released: false, d });
                }
                Sent::Dropped => {
                    self.pending.pop_front();
                    self.forget(&d);
                }
                Sent::Full => {
                    self.schedule_flush(me);
                    return;
                }
            }
        }
        self.mark_dirty(me);
    }
}
