//! Attach, detach, takeover, wills, expiry, and the session's persistent snapshot.
use super::*;
use crate::actors::inspect::Tell;
use crate::message::now_ms;

impl SessionState {
    /// An operator's kick: the connection ends and detaches as usual (will, expiry), or with
    /// `discard` the session ends too. Returns whether a client was connected.
    pub(super) async fn kick_by_operator(&mut self, me: &ActorRef<SessionMessage>, discard: bool) -> bool {
        let had = self.conn.is_some();
        if discard {
            if let Some(c) = self.conn.take() {
                kick(&c, reason::ADMINISTRATIVE_ACTION);
            }
            Box::pin(self.publish_will()).await;
            self.end(me);
        } else if let Some(c) = &self.conn {
            kick(c, reason::ADMINISTRATIVE_ACTION);
        }
        had
    }

    pub(super) async fn attach(&mut self, me: &ActorRef<SessionMessage>, a: AttachArgs) -> bool {
        if let Some(old) = self.conn.take() {
            kick(&old, reason::SESSION_TAKEN_OVER);
            // The old connection closed abnormally; a delayed will is cancelled by this resume.
            if self.will.as_ref().is_some_and(|w| w.props.will_delay_interval.unwrap_or(0) == 0) {
                self.publish_will().await;
            }
        }
        let present = !a.clean_start;
        self.from_disk = false;
        tracing::debug!(client_id = %self.client_id, present, pending = self.pending.len(), inflight = self.inflight.len(), subs = self.subs.len(), "attach");
        self.protocol = a.conn.protocol;
        self.will = a.will;
        self.will_due = None;
        self.expiry = a.expiry;
        self.load.persistent.store(self.expiry > 0, Ordering::Relaxed);
        if self.persistent() {
            self.store_unstored();
        }
        self.generation += 1;
        self.disconnected_at = None;
        self.load.online.store(true, Ordering::Relaxed);
        self.drop_logged = false;
        self.kicked = false;
        let mut connack = a.connack;
        connack.session_present = present;
        let _ = a.conn.tx.try_send(Outbound::Packet(Box::new(Packet::ConnAck(connack))));
        self.conn = Some(a.conn);
        // Resume: retransmit unacknowledged messages with DUP, and PUBRELs, in their original order.
        let resend: Vec<(u16, bool, Delivery)> = self.inflight.iter().map(|f| (f.pkid, f.released, f.d.clone())).collect();
        for (pkid, released, d) in resend {
            if released {
                self.send_packet(Packet::PubRel(Ack::new(pkid, 0)));
            } else if let Sent::Full = self.send_publish(&d, pkid, true) {
                self.schedule_flush(me);
            }
        }
        self.drain(me);
        self.save_meta();
        self.mark_dirty(me);
        present
    }

    pub(super) async fn detach(&mut self, me: &ActorRef<SessionMessage>, conn_id: u64, will: WillAction, expiry: Option<u32>) {
        if self.conn.as_ref().map(|c| c.id) != Some(conn_id) {
            return; // a connection that was already replaced
        }
        self.conn = None;
        self.load.online.store(false, Ordering::Relaxed);
        self.load.progressed(self.pending.len(), 0);
        self.load.drained.notify_waiters();
        self.generation += 1;
        self.disconnected_at = Some(now_ms());
        if let Some(e) = expiry {
            self.expiry = e;
            self.load.persistent.store(e > 0, Ordering::Relaxed);
        }
        self.redistribute_shared(me);
        match will {
            WillAction::Discard => self.will = None,
            WillAction::Publish => {
                let delay = self.will.as_ref().map_or(0, |w| w.props.will_delay_interval.unwrap_or(0));
                if delay == 0 || self.expiry == 0 {
                    self.publish_will().await;
                } else {
                    let secs = delay.min(self.expiry);
                    self.will_due = Some(now_ms() + secs as u64 * 1000);
                    self.schedule_will(me);
                }
            }
        }
        if self.expiry == 0 {
            self.end(me);
            return;
        }
        if self.expiry != u32::MAX {
            let g = self.generation;
            me.send_after(Duration::from_secs(self.expiry as u64), move || SessionMessage::Expire(g));
        }
        self.persist();
    }

    /// Hand QoS 1 in-flight and queued shared-subscription messages to other group members.
    pub(super) fn redistribute_shared(&mut self, me: &ActorRef<SessionMessage>) {
        let router = &self.broker.router;
        let id = me.get_id();
        let mut keep = VecDeque::with_capacity(self.inflight.len());
        let mut given = Vec::new();
        for f in self.inflight.drain(..) {
            if f.d.shared.is_some() && f.d.qos == QoS::AtLeastOnce && router.redeliver_shared(f.d.clone(), id) {
                given.push(f.d);
                continue;
            }
            keep.push_back(f);
        }
        self.inflight = keep;
        let mut pend = VecDeque::with_capacity(self.pending.len());
        for d in self.pending.drain(..) {
            if d.shared.is_some() && router.redeliver_shared(d.clone(), id) {
                given.push(d);
                continue;
            }
            pend.push_back(d);
        }
        self.pending = pend;
        for d in given {
            self.forget(&d);
        }
    }

    /// Arm the timer for a delayed will that is due at `will_due`.
    fn schedule_will(&self, me: &ActorRef<SessionMessage>) {
        if let Some(due) = self.will_due {
            let g = self.generation;
            let after = Duration::from_millis(due.saturating_sub(now_ms()));
            me.send_after(after, move || SessionMessage::WillDue(g));
        }
    }

    pub(super) async fn publish_will(&mut self) {
        self.will_due = None;
        let Some(w) = self.will.take() else { return };
        let mut props = w.props;
        let expires_at = props.message_expiry_interval.take().map(|s| now_ms() + s as u64 * 1000);
        props.will_delay_interval = None;
        let msg = Arc::new(Message {
            id: crate::message::next_id(),
            topic: Arc::from(w.topic.as_str()),
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            props: if props.is_empty() { None } else { Some(Box::new(props)) },
            expires_at,
            publisher: Some(self.client_id.clone()),
            not_to_own_device: false,
        });
        if msg.retain {
            self.broker.retain(msg.clone()).await;
        }
        self.broker.publish(msg);
    }

    /// The session ends: drop its routes and stored state, tell the registry, stop.
    pub(super) fn end(&mut self, me: &ActorRef<SessionMessage>) {
        self.redistribute_shared(me);
        let filters: Vec<String> = self.subs.keys().cloned().collect();
        for f in filters {
            self.remove_route(me, &f);
        }
        self.subs.clear();
        // Deliveries that raced with the end are dropped with the session.
        let _ = self.load.take();
        self.drop_backup();
        self.clear_stored();
        if let Some(r) = self.broker.registry() {
            let _ = r.tell(RegistryMessage::SessionEnded { client_id: self.client_id.clone(), id: me.get_id() });
        }
        self.expiry = 0;
        self.load.persistent.store(false, Ordering::Relaxed);
        me.stop(None);
    }

    /// Store the session's own record: subscriptions, expiry, will (its queue and inbound
    /// ids are records of their own, written as they change).
    pub(super) fn save_meta(&mut self) {
        if !self.persistent() || self.moving.is_some() {
            return;
        }
        let meta = SessionSnapshot {
            client_id: self.client_id.to_string(),
            protocol: self.protocol,
            expiry_secs: self.expiry,
            disconnected_at_ms: self.disconnected_at,
            subscriptions: self.subs.iter().map(|(f, (o, id))| (f.clone(), *o, *id)).collect(),
            inflight: Vec::new(),
            queue: Vec::new(),
            incoming_qos2: Vec::new(),
            will: self.will.as_deref().cloned(),
            will_due_ms: self.will_due,
        };
        self.on_disk = true;
        self.broker.state.put_session(&meta);
    }

    /// Store the session's record and, in a cluster, refresh its replica on the backup node.
    pub(super) fn persist(&mut self) {
        if !self.persistent() || self.moving.is_some() {
            return;
        }
        self.save_meta();
        self.replicate_state();
    }

    /// Send the whole state to the backup node now (a persistent session in a cluster; a new
    /// backup drops the old one's copy).
    pub(super) fn replicate_state(&mut self) {
        let Some(c) = self.broker.cluster.get() else { return };
        let Some(to) = c.backup_for(&self.client_id) else {
            self.backup = None;
            return;
        };
        if self.backup.as_deref() != Some(&*to) {
            if let Some(old) = self.backup.take() {
                c.backup_drop(old, self.client_id.clone());
            }
            self.backup = Some(to.clone());
        }
        c.backup_state(to, self.client_id.clone(), Box::new(self.full_snapshot()));
    }

    /// `SessionMessage::PeersChanged`: replicate to the new backup node, if it changed (not a
    /// copy restored from disk and not attached since: see `from_disk`).
    pub(super) fn backup_moved(&mut self, gone: Option<Arc<str>>) {
        let Some(c) = self.broker.cluster.get() else { return };
        if !self.persistent() || self.moving.is_some() || self.from_disk {
            return;
        }
        let lost = gone.is_some() && gone == self.backup;
        if lost || c.backup_for(&self.client_id).as_deref() != self.backup.as_deref() {
            self.replicate_state();
        }
    }

    /// Durable sessions: append this round's QoS>0 deliveries to the backup node (sending the
    /// full state first when the backup is new). The publishers' tokens travel along and are
    /// released when the backup acknowledges.
    pub(super) fn replicate(&mut self) {
        let (deliveries, tokens) = self.to_backup.take();
        let Some(c) = self.broker.cluster.get() else { return };
        let Some(to) = c.backup_for(&self.client_id) else {
            self.backup = None; // alone: nothing to replicate to
            return;
        };
        if self.backup.as_deref() != Some(&*to) {
            if let Some(old) = self.backup.take() {
                c.backup_drop(old, self.client_id.clone());
            }
            c.backup_state(to.clone(), self.client_id.clone(), Box::new(self.full_snapshot()));
            self.backup = Some(to.clone());
        }
        if !deliveries.is_empty() {
            c.backup_append(to, self.client_id.clone(), deliveries, tokens);
        }
    }

    /// The replica elsewhere is no longer needed (the session ended or moved).
    fn drop_backup(&mut self) {
        self.to_backup.clear();
        if let (Some(to), Some(c)) = (self.backup.take(), self.broker.cluster.get()) {
            c.backup_drop(to, self.client_id.clone());
        }
    }

    /// The session's state with the part of its queue held in memory.
    pub(super) fn snapshot(&self) -> SessionSnapshot {
        SessionSnapshot {
            client_id: self.client_id.to_string(),
            protocol: self.protocol,
            expiry_secs: self.expiry,
            disconnected_at_ms: self.disconnected_at,
            subscriptions: self.subs.iter().map(|(f, (o, id))| (f.clone(), *o, *id)).collect(),
            inflight: self.inflight.iter().map(|f| (f.pkid, f.released, f.d.clone())).collect(),
            queue: self.pending.iter().cloned().collect(),
            incoming_qos2: self.incoming_qos2.iter().copied().collect(),
            will: self.will.as_deref().cloned(),
            will_due_ms: self.will_due,
        }
    }

    /// A `HandOver`. The answer is the commit point: the state leaves only if it is received
    /// (asked again after it moved, the session has nothing left to give).
    pub(super) async fn answer_hand_over(
        &mut self,
        me: &ActorRef<SessionMessage>,
        gen: u64,
        to: String,
        clean: bool,
        reply: RpcReplyPort<Option<Box<SessionSnapshot>>>,
    ) {
        if let Some(d) = crate::faults::handover_delay() {
            tokio::time::sleep(d).await;
        }
        if self.moving.is_some() {
            let _ = reply.send(None);
        } else if reply.is_closed() {
            self.stay(me, gen, false);
        } else {
            match self.hand_over(me, clean).await {
                Some(snap) => match reply.send(Some(snap)) {
                    Ok(()) => {
                        self.moved(me, gen, to);
                        self.answered(me, gen, false);
                    }
                    Err(_) => self.stay(me, gen, true),
                },
                None => {
                    let _ = reply.send(None);
                }
            }
        }
    }

    /// Another node takes the client over. The connection is closed (0x8E); the old
    /// connection's will is published unless delayed (the resume elsewhere cancels a delayed
    /// one); with Clean Start the session ends here. Otherwise its state is returned — still
    /// held here until [`Self::moved`] says the answer left (else [`Self::stay`]).
    async fn hand_over(&mut self, me: &ActorRef<SessionMessage>, clean: bool) -> Option<Box<SessionSnapshot>> {
        if let Some(old) = self.conn.take() {
            kick(&old, reason::SESSION_TAKEN_OVER);
        }
        self.load.online.store(false, Ordering::Relaxed);
        self.generation += 1; // cancels this node's will and expiry timers
        if clean || self.will.as_ref().is_some_and(|w| w.props.will_delay_interval.unwrap_or(0) == 0) {
            self.publish_will().await;
        }
        self.will = None;
        self.will_due = None;
        if clean {
            self.end(me);
            return None;
        }
        Some(Box::new(self.full_snapshot()))
    }

    /// The state from [`Self::hand_over`] is on its way to the new owner: nothing of it stays
    /// to be redelivered or persisted here; the session keeps collecting deliveries (its
    /// routes stay) until the new owner's routes are in place.
    fn moved(&mut self, me: &ActorRef<SessionMessage>, gen: u64, to: String) {
        self.drop_backup();
        self.inflight.clear();
        self.pending.clear();
        self.clear_stored();
        self.moving = Some(Box::new(Moving { gen, to, buffer: Vec::new() }));
        me.send_after(HANDOVER_WAIT, move || SessionMessage::Release(gen));
    }

    /// The node that asked for the hand-over gave up waiting before this session answered
    /// (the registrar refuses the claim; the client retries): the session stays here with
    /// its state and is this node's again. A connection already closed for the hand-over
    /// leaves it disconnected (its expiry runs from now).
    fn stay(&mut self, me: &ActorRef<SessionMessage>, gen: u64, kicked: bool) {
        tracing::warn!(client_id = %self.client_id, kicked, "hand-over answered too late: the session stays on this node");
        if kicked {
            self.disconnected_at = Some(now_ms());
            if self.expiry != u32::MAX {
                let g = self.generation;
                me.send_after(Duration::from_secs(self.expiry as u64), move || SessionMessage::Expire(g));
            }
        }
        self.answered(me, gen, true);
        self.save_meta();
        self.mark_dirty(me);
    }

    fn answered(&self, me: &ActorRef<SessionMessage>, gen: u64, stays: bool) {
        if let Some(r) = self.broker.registry() {
            let _ = r.tell(RegistryMessage::Answered { client: self.client_id.clone(), id: me.get_id(), gen, stays });
        }
    }

    /// The new owner's routes are in place: stop routing here, wait until every peer has
    /// delivered what it sent before (barrier), then ship what was collected and end.
    pub(super) async fn release(&mut self, me: &ActorRef<SessionMessage>) {
        let filters: Vec<String> = self.subs.drain().map(|(f, _)| f).collect();
        let router = &self.broker.router;
        for f in filters {
            if let Some(shard) = router.shard(router.shard_of_filter(&f)) {
                let (client, owner) = (self.client_id.clone(), me.get_id());
                let _ = shard
                    .ask(|r| ShardMessage::Unsubscribe { client, filter: f, owner, reply: Some(r) }, Some(Duration::from_secs(5)))
                    .await;
            }
        }
        let Some(mut m) = self.moving.take() else { return };
        if let Some(c) = self.broker.cluster.get() {
            c.barrier().await;
            m.buffer.extend(self.load.take());
            tracing::debug!(client_id = %self.client_id, gen = m.gen, to = %m.to, collected = m.buffer.len(), "hand-over: flushing to the new owner");
            c.flush(self.client_id.clone(), m.gen, m.to, m.buffer);
        }
        self.end(me);
    }

    /// A healed partition: the copy the other side kept joins this one. Its deliveries this
    /// session does not hold yet are queued (ids this session saw recently are skipped); what
    /// the other node collected meanwhile arrives with `HandOverFlush` for `gen`.
    pub(super) fn merge(&mut self, me: &ActorRef<SessionMessage>, gen: u64, from: Option<String>, state: Option<Box<SessionSnapshot>>) {
        let r = self.recent.get_or_insert_with(Box::default);
        for d in self.pending.iter().chain(self.inflight.iter().map(|f| &f.d)) {
            if r.0.insert(d.msg.id) {
                r.1.push_back(d.msg.id);
            }
        }
        let mut merged = 0;
        if let Some(s) = state {
            for d in s.inflight.into_iter().map(|(_, _, d)| d).chain(s.queue) {
                merged += 1;
                self.deliver(me, d);
            }
            // Subscriptions stay this session's: the copy was adopted from this node's replica
            // and no client changed them there.
        }
        tracing::info!(client_id = %self.client_id, merged, "merged the copy another node kept during a partition");
        if from.is_some() {
            self.held = Some(Box::new(Held { gen, buffer: Vec::new() }));
            me.send_after(HANDOVER_WAIT, move || SessionMessage::HeldTimeout(gen));
        }
        self.save_meta();
        self.mark_dirty(me);
    }

    /// The previous owner's flush arrived (or the wait ended): deliver its messages, then what
    /// arrived here meanwhile that it did not already carry, in order; let the next claim go.
    pub(super) fn end_held(&mut self, me: &ActorRef<SessionMessage>, gen: u64, flushed: Vec<Delivery>) {
        if self.held.as_ref().is_none_or(|h| h.gen != gen) {
            return;
        }
        let Some(held) = self.held.take() else { return };
        tracing::debug!(client_id = %self.client_id, gen, flushed = flushed.len(), held = held.buffer.len(), "hand-over: held deliveries released");
        let seen: HashSet<u64> = flushed.iter().map(|d| d.msg.id).collect();
        for d in flushed {
            self.deliver(me, d);
        }
        for d in held.buffer {
            if !seen.contains(&d.msg.id) {
                self.deliver(me, d);
            }
        }
        self.save_meta();
        self.mark_dirty(me);
        if let Some(c) = self.broker.cluster.get() {
            c.claim_done(self.client_id.clone(), gen);
        }
    }

    /// Start from a snapshot: this node's store (`queue` says where its queue stands, the
    /// rest of it is on disk) or another node's copy (stored here anew).
    pub(super) async fn restore(&mut self, me: &ActorRef<SessionMessage>, s: SessionSnapshot, queue: Option<QueueInfo>) {
        self.protocol = s.protocol;
        self.expiry = s.expiry_secs;
        self.load.persistent.store(self.expiry > 0, Ordering::Relaxed);
        // In this node's routes before the session starts (messages re-routed from a lost node
        // find an adopted session); the other nodes' acknowledgements are awaited aside, so
        // whoever starts sessions (the registry) does not wait a cluster round trip for each.
        // An attach answers once they are in (`Routed`).
        let mut acks = Vec::with_capacity(s.subscriptions.len());
        for (f, o, id) in s.subscriptions {
            if let Some(ack) = self.route_here(me, &f, o, id).await {
                acks.push(ack);
                self.subs.insert(f, (o, id));
            }
        }
        if !acks.is_empty() {
            self.routing = Some(Box::default());
            let me = me.clone();
            tokio::spawn(async move {
                for a in acks {
                    let _ = tokio::time::timeout(Duration::from_secs(5), a).await;
                }
                let _ = me.send_message(SessionMessage::Routed);
            });
        }
        self.inflight = s.inflight.into_iter().map(|(pkid, released, d)| Inflight { pkid, released, d }).collect();
        self.pending = s.queue.into();
        self.incoming_qos2 = s.incoming_qos2.into_iter().collect();
        if let Some(r) = self.recent.as_mut() {
            // A re-routed copy of something the state already holds is not queued twice.
            for d in self.pending.iter().chain(self.inflight.iter().map(|f| &f.d)) {
                if r.0.insert(d.msg.id) {
                    r.1.push_back(d.msg.id);
                }
            }
        }
        match queue {
            Some(q) => {
                self.q = q;
                self.on_disk = true;
                self.from_disk = true;
                let last = self.pending.iter().chain(self.inflight.iter().map(|f| &f.d)).map(|d| d.seq).max();
                self.loaded_upto = last.unwrap_or(0);
                if self.q.spilled > 0 && self.pending.is_empty() {
                    self.loaded_upto = 0;
                }
            }
            None => self.adopt_queue(),
        }
        let now = now_ms();
        let since = s.disconnected_at_ms.unwrap_or(now);
        self.disconnected_at = Some(since);
        // A will whose client was connected when the node stopped starts its delay now.
        self.will = s.will.map(Box::new);
        self.will_due = match (&self.will, s.will_due_ms) {
            (None, _) => None,
            (Some(_), Some(due)) => Some(due),
            (Some(w), None) => Some(now + w.props.will_delay_interval.unwrap_or(0) as u64 * 1000),
        };
        self.schedule_will(me);
        if queue.is_none() {
            self.save_meta();
        }
        if self.expiry != u32::MAX {
            let left = (self.expiry as u64 * 1000).saturating_sub(now.saturating_sub(since));
            let g = self.generation;
            me.send_after(Duration::from_millis(left), move || SessionMessage::Expire(g));
        }
    }
}
