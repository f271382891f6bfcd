//! Requests from the client that the session answers: QoS 2 publishes, SUBSCRIBE, UNSUBSCRIBE.
use super::*;
use crate::actors::inspect::Tell;

impl SessionState {
    pub(super) fn inbound_qos2(&mut self, me: &ActorRef<SessionMessage>, pkid: u16, msg: Arc<Message>, taken: bool, reply: Reply) {
        if self.incoming_qos2.contains(&pkid) {
            // A retransmission: acknowledge again, deliver nothing (exactly once).
            answer(reply, Packet::PubRec(Ack::new(pkid, 0)));
            return;
        }
        // 5.0 only: Receive Maximum is ours to enforce. (3.1.1 has no such limit; its set is
        // bounded by the 16-bit packet id space.)
        if self.protocol == Protocol::V5 && self.incoming_qos2.len() >= self.broker.config.mqtt.max_inflight as usize {
            if let Some(c) = self.conn.as_ref().filter(|_| !self.kicked) {
                tracing::info!(client_id = %self.client_id, "client exceeded Receive Maximum");
                kick(c, reason::RECEIVE_MAXIMUM_EXCEEDED);
                self.kicked = true;
            }
            return;
        }
        self.incoming_qos2.insert(pkid);
        // Clients may not inject broker statistics.
        let (n, mut durable) = if msg.topic.starts_with("$SYS") { (0, None) } else { self.broker.publish_durable(msg) };
        if self.persistent() {
            // The id is part of the promise the PUBREC makes (exactly once across a restart).
            let d = durable.get_or_insert_with(Default::default);
            let token = crate::message::DurableToken::new(d);
            if self.broker.state.add_qos2(&self.client_id, pkid) {
                self.on_disk = true;
                self.broker.state.after_commit(crate::storage::state::Waiter::Token(token));
            } else {
                token.refuse();
            }
        }
        let code = if n == 0 && self.protocol == Protocol::V5 && !taken { reason::NO_MATCHING_SUBSCRIBERS } else { 0 };
        let rec = Packet::PubRec(Ack::new(pkid, code));
        // In a cluster the PUBREC waits until the message is durable (persistent copies on their
        // backups); PUBRECs keep their order: each waits for the previous one.
        let mut prev = self.last_pubrec.take();
        if prev.as_mut().is_some_and(|r| !matches!(r.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty))) {
            prev = None; // the previous one is out already
        }
        if durable.as_ref().is_none_or(|d| d.is_done() && !d.refused()) && prev.is_none() {
            answer(reply, rec);
            return;
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        self.last_pubrec = Some(done_rx);
        let (v5, me) = (self.protocol == Protocol::V5, me.clone());
        tokio::spawn(async move {
            if let Some(p) = prev {
                let _ = p.await;
            }
            let mut rec = rec;
            if let Some(d) = durable {
                Broker::wait_durable(&d).await;
                if d.refused() {
                    // Not kept by some subscriber's queue: 0x97, and the id is free again
                    // (3.1.1 has no negative PUBREC: the publisher is disconnected unanswered
                    // and sends it again).
                    let _ = me.cast(SessionMessage::Qos2Refused(pkid));
                    if !v5 {
                        let _ = done_tx.send(());
                        return;
                    }
                    rec = Packet::PubRec(Ack::new(pkid, reason::QUOTA_EXCEEDED));
                }
            }
            answer(reply, rec);
            let _ = done_tx.send(());
        });
    }

    pub(super) fn sub_entry(&self, me: &ActorRef<SessionMessage>, opts: SubOptions, sub_id: Option<u32>) -> Sub {
        Sub { session: me.clone(), opts, sub_id, load: self.load.clone() }
    }

    /// Add a route, waiting only until this node's shard has it: the returned receiver
    /// answers once, for a new key, the other nodes acknowledged it too (`None`: not routed).
    pub(super) async fn route_here(
        &self,
        me: &ActorRef<SessionMessage>,
        filter: &str,
        opts: SubOptions,
        sub_id: Option<u32>,
    ) -> Option<ractor::concurrency::OneshotReceiver<bool>> {
        let router = &self.broker.router;
        let shard = router.shard(router.shard_of_filter(filter))?;
        let (tx, acked) = ractor::concurrency::oneshot();
        let (itx, inserted) = ractor::concurrency::oneshot();
        let sub = self.sub_entry(me, opts, sub_id);
        let msg = ShardMessage::Subscribe {
            client: self.client_id.clone(),
            filter: filter.to_string(),
            sub,
            reply: tx.into(),
            inserted: Some(itx.into()),
        };
        shard.send_message(msg).ok()?;
        tokio::time::timeout(Duration::from_secs(5), inserted).await.ok()?.ok()?;
        Some(acked)
    }

    pub(super) async fn add_route(&self, me: &ActorRef<SessionMessage>, filter: &str, opts: SubOptions, sub_id: Option<u32>) -> bool {
        let router = &self.broker.router;
        let Some(shard) = router.shard(router.shard_of_filter(filter)) else { return false };
        let sub = self.sub_entry(me, opts, sub_id);
        let client = self.client_id.clone();
        let filter = filter.to_string();
        shard
            .ask(|reply| ShardMessage::Subscribe { client, filter, sub, reply, inserted: None }, Some(Duration::from_secs(5)))
            .await
            .map(|r| r.is_success())
            .unwrap_or(false)
    }

    pub(super) fn remove_route(&self, me: &ActorRef<SessionMessage>, filter: &str) {
        let router = &self.broker.router;
        if let Some(shard) = router.shard(router.shard_of_filter(filter)) {
            let _ = shard.tell(ShardMessage::Unsubscribe {
                client: self.client_id.clone(),
                filter: filter.to_string(),
                owner: me.get_id(),
                reply: None,
            });
        }
    }

    pub(super) async fn subscribe(
        &mut self,
        me: &ActorRef<SessionMessage>,
        s: Subscribe,
        denied: Vec<usize>,
        reply: Reply,
        then: Option<super::OnGranted>,
        ticket: Ticket,
    ) {
        let v5 = self.protocol == Protocol::V5;
        let sub_id = s.props.subscription_identifiers.first().copied();
        let cfg = &self.broker.config.mqtt;
        let fail = |v5_code: u8| if v5 { v5_code } else { 0x80 };
        let mut codes = Vec::with_capacity(s.filters.len());
        // The filters that may be granted, each with what it replaces; taken into the session
        // first, so a persistent session's replica (below) carries them.
        let mut taken = Vec::with_capacity(s.filters.len());
        for (i, (filter, opts)) in s.filters.into_iter().enumerate() {
            if denied.contains(&i) {
                codes.push(fail(reason::NOT_AUTHORIZED));
                continue;
            }
            if !topic::valid_filter(&filter) || topic::levels(&filter) > cfg.max_topic_levels {
                codes.push(fail(reason::TOPIC_FILTER_INVALID));
                continue;
            }
            let existed = self.subs.contains_key(&filter);
            if !existed && self.subs.len() >= cfg.max_subscriptions_per_session {
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            let old = self.subs.insert(filter.clone(), (opts, sub_id));
            taken.push((codes.len(), filter, opts, old));
            codes.push(0);
        }
        // A persistent session's backup node gets the new state before the routes are
        // announced: the SUBACK waits for every peer's acknowledgement of a new route, and a
        // peer handles frames in order, so a crash of this node after the SUBACK does not lose
        // the subscription (its backup adopts it).
        if !taken.is_empty() && self.persistent() {
            self.replicate_state();
        }
        let mut retained = Vec::new();
        let mut granted = false;
        for (at, filter, opts, old) in taken {
            let existed = old.is_some();
            if !self.add_route(me, &filter, opts, sub_id).await {
                match old {
                    Some(o) => self.subs.insert(filter, o),
                    None => self.subs.remove(&filter),
                };
                codes[at] = fail(reason::UNSPECIFIED_ERROR);
                continue;
            }
            codes[at] = opts.qos as u8;
            granted = true;
            let send = match opts.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
            if send && topic::parse_shared(&filter).is_none() {
                for m in self.broker.retained.load().matching(&filter) {
                    retained.push(Delivery {
                        qos: m.qos.min(opts.qos),
                        msg: m,
                        retain: true,
                        sub_ids: sub_id.into_iter().collect(),
                        shared: None,
                        durable: None,
                        seq: 0,
                        stored: false,
                    });
                }
            }
        }
        // In the routes: publishers waiting for this change go on (not behind the commit).
        drop(ticket);
        if granted && self.persistent() {
            // A persistent session's SUBACK promises the subscription survives a restart.
            self.save_meta();
            self.broker.state.committed().await;
        }
        answer(reply, Packet::SubAck(SubAck { pkid: s.pkid, codes, props: Properties::default() }));
        for d in retained {
            self.deliver(me, d);
        }
        self.mark_dirty(me);
        if let Some(then) = then.filter(|_| granted) {
            then();
        }
    }

    pub(super) async fn unsubscribe(&mut self, me: &ActorRef<SessionMessage>, u: Unsubscribe, reply: Reply, ticket: Ticket) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in u.filters {
            if !topic::valid_filter(&f) {
                codes.push(reason::TOPIC_FILTER_INVALID);
            } else if self.subs.remove(&f).is_some() {
                // Gone from the routes before the UNSUBACK (and before the connection reads on).
                let router = &self.broker.router;
                if let Some(shard) = router.shard(router.shard_of_filter(&f)) {
                    let (client, owner) = (self.client_id.clone(), me.get_id());
                    let _ = shard
                        .ask(|r| ShardMessage::Unsubscribe { client, filter: f, owner, reply: Some(r) }, Some(Duration::from_secs(5)))
                        .await;
                }
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        drop(ticket);
        self.save_meta();
        if self.persistent() {
            // Its backup forgets the filters too (a crash here must not bring them back).
            self.replicate_state();
        }
        answer(reply, Packet::UnsubAck(UnsubAck { pkid: u.pkid, codes, props: Properties::default() }));
        self.mark_dirty(me);
    }
}
