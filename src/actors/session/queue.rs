//! The session's queue across memory and the node's state store. Every QoS>0 delivery gets a
//! sequence number; a persistent session stores each one before its publisher is acknowledged
//! (the store's group commit releases the publisher's token), any session keeps at most
//! `max_queued` deliveries in memory and spills the rest to disk, reading them back as the
//! head drains. The whole queue is bounded by count and bytes; beyond that `mqtt.queue_full`
//! decides, and a refused copy is reported to its publisher, never dropped silently.
use super::*;
use crate::config::QueueFull;
use crate::message::DurableToken;
use crate::metrics::Dropped;
use crate::storage::state::{delivery_bytes, Batch, QueueInfo, Waiter};

/// This turn's writes (committed together at its end, see `flush_writes`).
fn writes<'a>(w: &'a mut Option<Box<Batch>>, state: &Arc<crate::storage::state::StateStore>) -> &'a mut Batch {
    w.get_or_insert_with(|| Box::new(state.batch()))
}

impl SessionState {
    fn mem_full(&self) -> bool {
        self.q.spilled > 0 || self.pending.len() >= self.broker.config.mqtt.max_queued.max(1)
    }

    /// Take a delivery into the queue; `token` is its publisher's wait for this copy.
    pub(super) fn enqueue(&mut self, mut d: Delivery, token: Option<Arc<DurableToken>>) {
        if d.qos == QoS::AtMostOnce {
            if self.mem_full() {
                self.broker.metrics.dropped(Dropped::Qos0QueueFull);
                self.log_drop();
            } else {
                self.pending.push_back(d);
            }
            return;
        }
        let bytes = delivery_bytes(&d);
        loop {
            let cfg = &self.broker.config.mqtt;
            let full = self.q.count >= cfg.queue_max_messages.max(1) || (self.q.count > 0 && self.q.bytes + bytes > cfg.queue_max_bytes);
            if !full {
                break;
            }
            if cfg.queue_full == QueueFull::Refuse || !self.drop_oldest() {
                self.refuse(token, Dropped::RefusedQueueFull);
                return;
            }
        }
        d.seq = self.q.next_seq;
        self.q.next_seq += 1;
        let to_memory = !self.mem_full();
        if self.persistent() || !to_memory {
            writes(&mut self.writes, &self.broker.state).put_entry(&self.client_id, &d, 0, false);
            d.stored = true;
            self.on_disk = true;
        }
        self.q.count += 1;
        self.q.bytes += bytes;
        if to_memory {
            self.loaded_upto = d.seq;
            self.pending.push_back(d);
        } else {
            self.q.spilled += 1;
        }
        if let Some(t) = token.filter(|_| self.persistent()) {
            writes(&mut self.writes, &self.broker.state).wait(Waiter::Token(t));
        }
    }

    /// Commit this turn's writes; the publishers waiting for them are released by the next
    /// group commit (or refused, if the store failed).
    pub(super) fn flush_writes(&mut self) {
        if let Some(b) = self.writes.take() {
            if self.broker.state.commit(*b) {
                return;
            }
            self.broker.metrics.dropped(Dropped::StoreFailed);
        }
    }

    fn refuse(&mut self, token: Option<Arc<DurableToken>>, why: Dropped) {
        if let Some(t) = token {
            t.refuse();
        }
        self.broker.metrics.dropped(why);
        if !self.refuse_logged {
            self.refuse_logged = true;
            tracing::warn!(client_id = %self.client_id, queued = self.q.count, bytes = self.q.bytes, reason = ?why, "session queue cannot take more; refusing to publishers");
        }
    }

    pub(super) fn log_drop(&mut self) {
        if !self.drop_logged {
            self.drop_logged = true;
            tracing::warn!(client_id = %self.client_id, "slow or offline subscriber: dropping QoS 0 messages beyond its bound");
        }
    }

    /// `drop_oldest`: discard the oldest delivery not in flight. False if there is none.
    fn drop_oldest(&mut self) -> bool {
        let victim = match self.pending.iter().position(|d| d.qos != QoS::AtMostOnce) {
            Some(i) => self.pending.remove(i),
            None if self.q.spilled > 0 => {
                let d = self.broker.state.read_queue(&self.client_id, self.loaded_upto, 1).pop();
                if let Some(d) = &d {
                    self.q.spilled -= 1;
                    self.loaded_upto = d.seq;
                }
                d
            }
            None => None,
        };
        let Some(d) = victim else { return false };
        self.forget(&d);
        self.broker.metrics.dropped(Dropped::QueueFullOldest);
        true
    }

    /// A QoS>0 delivery left the queue (acknowledged, expired, discarded, given away).
    pub(super) fn forget(&mut self, d: &Delivery) {
        if d.qos == QoS::AtMostOnce || d.seq == 0 {
            return;
        }
        self.q.count = self.q.count.saturating_sub(1);
        self.q.bytes = self.q.bytes.saturating_sub(delivery_bytes(d));
        if d.stored {
            writes(&mut self.writes, &self.broker.state).remove_entry(&self.client_id, d.seq);
        }
    }

    /// Read spilled deliveries back once the head in memory is half empty.
    pub(super) fn refill(&mut self) {
        let max = self.broker.config.mqtt.max_queued.max(1);
        if self.q.spilled == 0 || self.pending.len() > max / 2 {
            return;
        }
        let want = (max - self.pending.len()).min(self.q.spilled);
        let got = self.broker.state.read_queue(&self.client_id, self.loaded_upto, want);
        if got.is_empty() {
            tracing::error!(client_id = %self.client_id, spilled = self.q.spilled, "queued messages missing from the state store");
            self.q.count = self.q.count.saturating_sub(self.q.spilled);
            self.q.spilled = 0;
            return;
        }
        self.q.spilled -= got.len().min(self.q.spilled);
        for d in got {
            self.loaded_upto = d.seq;
            self.pending.push_back(d);
        }
    }

    /// A QoS 2 delivery of a persistent session was sent under `pkid` (or released): a
    /// restart resends it under the same id, or its PUBREL.
    pub(super) fn record_pkid(&mut self, d: &Delivery, pkid: u16, released: bool) {
        if d.stored && d.qos == QoS::ExactlyOnce {
            writes(&mut self.writes, &self.broker.state).put_entry(&self.client_id, d, pkid, released);
        }
    }

    /// The session became persistent (a resume with an expiry): store what it holds.
    pub(super) fn store_unstored(&mut self) {
        let client = self.client_id.clone();
        let state = self.broker.state.clone();
        self.on_disk = true;
        for f in self.inflight.iter_mut().filter(|f| f.d.qos != QoS::AtMostOnce && !f.d.stored) {
            let pkid = if f.d.qos == QoS::ExactlyOnce { f.pkid } else { 0 };
            f.d.stored = state.put_entry(&client, &f.d, pkid, f.released);
        }
        for d in self.pending.iter_mut().filter(|d| d.qos != QoS::AtMostOnce && !d.stored) {
            d.stored = state.put_entry(&client, d, 0, false);
        }
    }

    /// Number (and, for a persistent session, store) what a snapshot from another node brought.
    pub(super) fn adopt_queue(&mut self) {
        let mut q = QueueInfo { next_seq: 1, ..QueueInfo::default() };
        let persistent = self.persistent();
        self.on_disk |= persistent;
        let (client, state) = (self.client_id.clone(), self.broker.state.clone());
        let mut number = |d: &mut Delivery, pkid: u16, released: bool| {
            if d.qos == QoS::AtMostOnce {
                return;
            }
            d.seq = q.next_seq;
            q.next_seq += 1;
            q.count += 1;
            q.bytes += delivery_bytes(d);
            d.stored = persistent && state.put_entry(&client, d, pkid, released);
        };
        for f in self.inflight.iter_mut() {
            let pkid = if f.d.qos == QoS::ExactlyOnce { f.pkid } else { 0 };
            number(&mut f.d, pkid, f.released);
        }
        for d in self.pending.iter_mut() {
            number(d, 0, false);
        }
        if persistent {
            for id in self.incoming_qos2.iter() {
                state.add_qos2(&client, *id);
            }
        }
        self.loaded_upto = q.next_seq - 1;
        self.q = q;
    }

    /// Everything the queue holds, the part on disk included (a takeover, a new replica).
    pub(super) fn full_snapshot(&self) -> SessionSnapshot {
        let mut snap = self.snapshot();
        if self.q.spilled > 0 {
            snap.queue.extend(self.broker.state.read_queue(&self.client_id, self.loaded_upto, usize::MAX));
        }
        snap
    }

    /// Drop the session's records (it ends or moves away).
    pub(super) fn clear_stored(&mut self) {
        self.flush_writes();
        if std::mem::take(&mut self.on_disk) {
            self.broker.state.remove_session(&self.client_id);
        }
        self.q = QueueInfo { next_seq: self.q.next_seq, ..QueueInfo::default() };
    }
}
