//! Session actor: one per client id. Owns subscriptions, the outbound in-flight window and queue,
//! inbound QoS 2 state, the will and the expiry; outlives its connection when persistent.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;

use super::load::Load;
use super::registry::RegistryMessage;
use super::shard::{ShardMessage, Sub};
use crate::broker::Broker;
use crate::message::{now_ms, Delivery, Message};
use crate::protocols::mqtt::{
    publish_len, reason, topic, Ack, ConnAck, Packet, Properties, Protocol, QoS, RetainHandling, SubAck, SubOptions, Subscribe, UnsubAck,
    Unsubscribe, Will,
};
use crate::storage::local::SessionSnapshot;

/// What a session writes to its connection's bounded outbound queue.
#[derive(Debug)]
pub enum Outbound {
    Packet(Box<Packet>),
    Publish(OutPublish),
    /// Send DISCONNECT with this reason (5.0 only), then close the connection.
    Disconnect(u8),
}

/// An outgoing PUBLISH, encoded by the writer (which also applies topic aliases).
#[derive(Debug)]
pub struct OutPublish {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    /// Final 5.0 properties (forwarded ones, subscription ids, remaining expiry).
    pub props: Option<Box<Properties>>,
}

/// A reserved slot in a connection's outbound queue for one answer.
pub type Reply = mpsc::OwnedPermit<Outbound>;

fn answer(reply: Reply, p: Packet) {
    reply.send(Outbound::Packet(Box::new(p)));
}

/// The session's view of its current connection.
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Outbound>,
    pub cancel: CancellationToken,
    pub protocol: Protocol,
    /// Client's Receive Maximum.
    pub recv_max: u16,
    /// Client's Maximum Packet Size.
    pub max_packet: u32,
}

pub struct AttachArgs {
    pub conn: ConnHandle,
    /// CONNACK to send first; the session fills in Session Present.
    pub connack: ConnAck,
    pub clean_start: bool,
    pub will: Option<Will>,
    pub expiry: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAction {
    Publish,
    Discard,
}

pub enum SessionMessage {
    /// A connection takes this session (replies Session Present).
    Attach(Box<AttachArgs>, RpcReplyPort<bool>),
    /// End the session now (a Clean Start connect replaces it).
    Terminate(RpcReplyPort<()>),
    /// Deliveries are waiting in this session's inbox (see `Load`).
    Drain,
    /// Retained messages for a new subscription, and other deliveries made by the session itself.
    Deliver(Delivery),
    /// Consecutive PUBACKs from the client, batched by the connection.
    PubAcks(Vec<u16>),
    /// Requests that need an answer carry a reserved slot in their connection's outbound queue,
    /// so the answer always fits and a client that does not read simply stops being read.
    PubRec(Ack, Reply),
    PubComp(u16),
    PubRel(u16, Reply),
    InboundQos2 {
        pkid: u16,
        msg: Arc<Message>,
        reply: Reply,
    },
    Subscribe(Subscribe, Reply),
    Unsubscribe(Unsubscribe, Reply),
    /// The connection `conn_id` ended; `expiry` is a 5.0 DISCONNECT's new Session Expiry Interval.
    Detach {
        conn_id: u64,
        will: WillAction,
        expiry: Option<u32>,
    },
    WillDue(u64),
    Expire(u64),
    /// Retry sending after the outbound queue was full.
    Flush,
    Persist(Option<RpcReplyPort<()>>),
}

pub struct SessionArgs {
    pub client_id: Arc<str>,
    pub broker: Arc<Broker>,
    pub restored: Option<SessionSnapshot>,
}

struct Inflight {
    pkid: u16,
    /// PUBREL sent; awaiting PUBCOMP.
    released: bool,
    d: Delivery,
}

pub struct SessionState {
    client_id: Arc<str>,
    broker: Arc<Broker>,
    protocol: Protocol,
    conn: Option<ConnHandle>,
    load: Arc<Load>,
    subs: HashMap<String, (SubOptions, Option<u32>)>,
    inflight: VecDeque<Inflight>,
    pending: VecDeque<Delivery>,
    next_pkid: u16,
    incoming_qos2: HashSet<u16>,
    will: Option<Will>,
    expiry: u32,
    generation: u64,
    disconnected_at: Option<u64>,
    persist_scheduled: bool,
    flush_scheduled: bool,
    drop_logged: bool,
}

enum Sent {
    Ok,
    Full,
    Dropped,
}

pub struct SessionActor;

impl Actor for SessionActor {
    type Msg = SessionMessage;
    type State = SessionState;
    type Arguments = SessionArgs;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, args: SessionArgs) -> Result<SessionState, ActorProcessingErr> {
        let mut st = SessionState {
            client_id: args.client_id,
            broker: args.broker,
            protocol: Protocol::V5,
            conn: None,
            load: Arc::new(Load::default()),
            subs: HashMap::new(),
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            next_pkid: 1,
            incoming_qos2: HashSet::new(),
            will: None,
            expiry: 0,
            generation: 0,
            disconnected_at: None,
            persist_scheduled: false,
            flush_scheduled: false,
            drop_logged: false,
        };
        if let Some(snap) = args.restored {
            Box::pin(st.restore(&me, snap)).await;
        }
        Ok(st)
    }

    async fn handle(&self, me: ActorRef<Self::Msg>, msg: SessionMessage, st: &mut SessionState) -> Result<(), ActorProcessingErr> {
        let delivery = matches!(msg, SessionMessage::Drain);
        match msg {
            SessionMessage::Drain => {
                for d in st.load.take() {
                    st.deliver(&me, d);
                }
            }
            SessionMessage::Deliver(d) => st.deliver(&me, d),
            SessionMessage::PubAcks(pkids) => {
                let mut freed = false;
                for pkid in pkids {
                    // Acks usually come in send order, so the match is near the front.
                    if let Some(i) = st.inflight.iter().position(|f| f.pkid == pkid && !f.released && f.d.qos == QoS::AtLeastOnce) {
                        st.inflight.remove(i);
                        freed = true;
                    }
                }
                if freed {
                    st.drain(&me);
                }
            }
            SessionMessage::PubRec(ack, reply) => {
                match st.inflight.iter().position(|f| f.pkid == ack.pkid && f.d.qos == QoS::ExactlyOnce) {
                    Some(i) if ack.code >= 0x80 => {
                        st.inflight.remove(i);
                        st.drain(&me);
                    }
                    Some(i) => {
                        st.inflight[i].released = true;
                        answer(reply, Packet::PubRel(Ack::new(ack.pkid, 0)));
                        st.mark_dirty(&me);
                    }
                    None => answer(reply, Packet::PubRel(Ack::new(ack.pkid, reason::PACKET_ID_NOT_FOUND))),
                }
            }
            SessionMessage::PubComp(pkid) => {
                if let Some(i) = st.inflight.iter().position(|f| f.pkid == pkid && f.released) {
                    st.inflight.remove(i);
                    st.drain(&me);
                }
            }
            SessionMessage::InboundQos2 { pkid, msg, reply } => st.inbound_qos2(pkid, msg, reply),
            SessionMessage::PubRel(pkid, reply) => {
                let code = if st.incoming_qos2.remove(&pkid) { 0 } else { reason::PACKET_ID_NOT_FOUND };
                answer(reply, Packet::PubComp(Ack::new(pkid, code)));
            }
            SessionMessage::Subscribe(s, reply) => Box::pin(st.subscribe(&me, s, reply)).await,
            SessionMessage::Unsubscribe(u, reply) => st.unsubscribe(&me, u, reply),
            SessionMessage::Attach(a, reply) => {
                let present = Box::pin(st.attach(&me, *a)).await;
                let _ = reply.send(present);
            }
            SessionMessage::Terminate(reply) => {
                if let Some(old) = st.conn.take() {
                    kick(&old, reason::SESSION_TAKEN_OVER);
                }
                Box::pin(st.publish_will()).await;
                st.end(&me);
                let _ = reply.send(());
            }
            SessionMessage::Detach { conn_id, will, expiry } => Box::pin(st.detach(&me, conn_id, will, expiry)).await,
            SessionMessage::WillDue(g) => {
                if g == st.generation && st.conn.is_none() {
                    Box::pin(st.publish_will()).await;
                }
            }
            SessionMessage::Expire(g) => {
                if g == st.generation && st.conn.is_none() {
                    Box::pin(st.publish_will()).await;
                    st.end(&me);
                }
            }
            SessionMessage::Flush => {
                st.flush_scheduled = false;
                st.drain(&me);
            }
            SessionMessage::Persist(reply) => {
                st.persist_scheduled = false;
                st.persist();
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
        }
        if delivery || st.load.pressure.load(Ordering::Relaxed) {
            let low = st.broker.high_water() / 2;
            st.load.progressed(st.pending.len(), low);
        }
        Ok(())
    }
}

/// Ask a connection to close with `code` (DISCONNECT in 5.0); if its queue is full, cut it.
pub fn kick(conn: &ConnHandle, code: u8) {
    if conn.tx.try_send(Outbound::Disconnect(code)).is_err() {
        conn.cancel.cancel();
    }
}

impl SessionState {
    fn window(&self) -> usize {
        let cfg = self.broker.config.mqtt.max_inflight.max(1) as usize;
        match &self.conn {
            Some(c) => (c.recv_max as usize).min(cfg),
            None => 0,
        }
    }

    fn persistent(&self) -> bool {
        self.expiry > 0
    }

    fn mark_dirty(&mut self, me: &ActorRef<SessionMessage>) {
        if self.persistent() && !self.persist_scheduled {
            self.persist_scheduled = true;
            let ms = self.broker.config.node.persist_interval_ms.max(1);
            me.send_after(Duration::from_millis(ms), || SessionMessage::Persist(None));
        }
    }

    fn send_packet(&mut self, p: Packet) {
        if let Some(c) = &self.conn {
            if c.tx.try_send(Outbound::Packet(Box::new(p))).is_err() {
                // The queue is full of packets the client is not reading: cut it rather than grow.
                tracing::warn!(client_id = %self.client_id, "outbound queue full on a control packet; closing connection");
                c.cancel.cancel();
            }
        }
    }

    fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if self.next_pkid == u16::MAX { 1 } else { self.next_pkid + 1 };
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }

    fn publish_props(&self, d: &Delivery, now: u64) -> Option<Box<Properties>> {
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

    fn send_publish(&mut self, d: &Delivery, pkid: u16, dup: bool) -> Sent {
        let Some(c) = &self.conn else { return Sent::Full };
        let now = now_ms();
        let props = self.publish_props(d, now);
        let size =
            publish_len(self.protocol, d.msg.topic.len(), d.qos, props.as_deref().unwrap_or(Properties::empty()), d.msg.payload.len());
        if size > c.max_packet as usize {
            // 5.0: a packet larger than the client accepts is discarded as if delivered.
            crate::metrics::Metrics::add(&self.broker.metrics.messages_dropped, 1);
            return Sent::Dropped;
        }
        let out = OutPublish { msg: d.msg.clone(), qos: d.qos, retain: d.retain, dup, pkid, props };
        match c.tx.try_send(Outbound::Publish(out)) {
            Ok(()) => Sent::Ok,
            Err(TrySendError::Full(_)) => Sent::Full,
            Err(TrySendError::Closed(_)) => Sent::Full,
        }
    }

    fn schedule_flush(&mut self, me: &ActorRef<SessionMessage>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            me.send_after(Duration::from_millis(5), || SessionMessage::Flush);
        }
    }

    /// Queue a delivery (bounded) and send what the window and the socket queue allow. QoS 0
    /// waits in the same queue while the socket is busy, so it counts towards backpressure.
    fn deliver(&mut self, me: &ActorRef<SessionMessage>, d: Delivery) {
        if d.msg.expired(now_ms()) {
            return;
        }
        if self.conn.is_none() && d.qos == QoS::AtMostOnce && !self.broker.config.mqtt.queue_qos0_offline {
            return;
        }
        self.enqueue(d);
        if self.conn.is_some() {
            self.drain(me);
        } else {
            self.mark_dirty(me);
        }
    }

    fn count_drop(&mut self) {
        crate::metrics::Metrics::add(&self.broker.metrics.messages_dropped, 1);
        if !self.drop_logged {
            self.drop_logged = true;
            tracing::warn!(client_id = %self.client_id, "slow or offline subscriber: dropping messages beyond its bound");
        }
    }

    fn enqueue(&mut self, d: Delivery) {
        if self.pending.len() >= self.broker.config.mqtt.max_queued {
            self.count_drop();
            return;
        }
        self.pending.push_back(d);
    }

    /// Move queued messages into the in-flight window while there is room.
    fn drain(&mut self, me: &ActorRef<SessionMessage>) {
        if self.conn.is_none() {
            return;
        }
        let now = now_ms();
        while let Some(d) = self.pending.front() {
            if d.msg.expired(now) {
                self.pending.pop_front();
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
                    self.inflight.push_back(Inflight { pkid, released: false, d });
                }
                Sent::Dropped => {
                    self.pending.pop_front();
                }
                Sent::Full => {
                    self.schedule_flush(me);
                    return;
                }
            }
        }
        self.mark_dirty(me);
    }

    fn inbound_qos2(&mut self, pkid: u16, msg: Arc<Message>, reply: Reply) {
        if self.incoming_qos2.contains(&pkid) {
            // A retransmission: acknowledge again, deliver nothing (exactly once).
            answer(reply, Packet::PubRec(Ack::new(pkid, 0)));
            return;
        }
        if self.incoming_qos2.len() >= self.broker.config.mqtt.max_inflight as usize {
            if let Some(c) = &self.conn {
                tracing::info!(client_id = %self.client_id, "client exceeded Receive Maximum");
                kick(c, reason::RECEIVE_MAXIMUM_EXCEEDED);
            }
            return;
        }
        self.incoming_qos2.insert(pkid);
        // Clients may not inject broker statistics.
        let n = if msg.topic.starts_with("$SYS") { 0 } else { self.broker.publish(msg) };
        let code = if n == 0 && self.protocol == Protocol::V5 { reason::NO_MATCHING_SUBSCRIBERS } else { 0 };
        answer(reply, Packet::PubRec(Ack::new(pkid, code)));
    }

    fn sub_entry(&self, me: &ActorRef<SessionMessage>, opts: SubOptions, sub_id: Option<u32>) -> Sub {
        Sub { session: me.clone(), opts, sub_id, load: self.load.clone() }
    }

    async fn add_route(&self, me: &ActorRef<SessionMessage>, filter: &str, opts: SubOptions, sub_id: Option<u32>) -> bool {
        let router = &self.broker.router;
        let Some(shard) = router.shard(router.shard_of_filter(filter)) else { return false };
        let sub = self.sub_entry(me, opts, sub_id);
        let client = self.client_id.clone();
        let filter = filter.to_string();
        shard
            .call(|reply| ShardMessage::Subscribe { client, filter, sub, reply }, Some(Duration::from_secs(5)))
            .await
            .map(|r| r.is_success())
            .unwrap_or(false)
    }

    fn remove_route(&self, me: &ActorRef<SessionMessage>, filter: &str) {
        let router = &self.broker.router;
        if let Some(shard) = router.shard(router.shard_of_filter(filter)) {
            let _ = shard.cast(ShardMessage::Unsubscribe {
                client: self.client_id.clone(),
                filter: filter.to_string(),
                owner: me.get_id(),
                reply: None,
            });
        }
    }

    async fn subscribe(&mut self, me: &ActorRef<SessionMessage>, s: Subscribe, reply: Reply) {
        let v5 = self.protocol == Protocol::V5;
        let sub_id = s.props.subscription_identifiers.first().copied();
        let cfg = &self.broker.config.mqtt;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for (filter, opts) in s.filters {
            let fail = |v5_code: u8| if v5 { v5_code } else { 0x80 };
            if !topic::valid_filter(&filter) || topic::levels(&filter) > cfg.max_topic_levels {
                codes.push(fail(reason::TOPIC_FILTER_INVALID));
                continue;
            }
            let existed = self.subs.contains_key(&filter);
            if !existed && self.subs.len() >= cfg.max_subscriptions_per_session {
                codes.push(fail(reason::QUOTA_EXCEEDED));
                continue;
            }
            if !self.add_route(me, &filter, opts, sub_id).await {
                codes.push(fail(reason::UNSPECIFIED_ERROR));
                continue;
            }
            self.subs.insert(filter.clone(), (opts, sub_id));
            codes.push(opts.qos as u8);
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
                    });
                }
            }
        }
        answer(reply, Packet::SubAck(SubAck { pkid: s.pkid, codes, props: Properties::default() }));
        for d in retained {
            self.deliver(me, d);
        }
        self.mark_dirty(me);
    }

    fn unsubscribe(&mut self, me: &ActorRef<SessionMessage>, u: Unsubscribe, reply: Reply) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in u.filters {
            if !topic::valid_filter(&f) {
                codes.push(reason::TOPIC_FILTER_INVALID);
            } else if self.subs.remove(&f).is_some() {
                self.remove_route(me, &f);
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        answer(reply, Packet::UnsubAck(UnsubAck { pkid: u.pkid, codes, props: Properties::default() }));
        self.mark_dirty(me);
    }

    async fn attach(&mut self, me: &ActorRef<SessionMessage>, a: AttachArgs) -> bool {
        if let Some(old) = self.conn.take() {
            kick(&old, reason::SESSION_TAKEN_OVER);
            // The old connection closed abnormally; a delayed will is cancelled by this resume.
            if self.will.as_ref().is_some_and(|w| w.props.will_delay_interval.unwrap_or(0) == 0) {
                self.publish_will().await;
            }
        }
        let present = !a.clean_start;
        self.protocol = a.conn.protocol;
        self.will = a.will;
        self.expiry = a.expiry;
        self.generation += 1;
        self.disconnected_at = None;
        self.load.online.store(true, Ordering::Relaxed);
        self.drop_logged = false;
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
        self.mark_dirty(me);
        present
    }

    async fn detach(&mut self, me: &ActorRef<SessionMessage>, conn_id: u64, will: WillAction, expiry: Option<u32>) {
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
        }
        self.redistribute_shared(me);
        match will {
            WillAction::Discard => self.will = None,
            WillAction::Publish => {
                let delay = self.will.as_ref().map_or(0, |w| w.props.will_delay_interval.unwrap_or(0));
                if delay == 0 || self.expiry == 0 {
                    self.publish_will().await;
                } else {
                    let g = self.generation;
                    let secs = delay.min(self.expiry);
                    me.send_after(Duration::from_secs(secs as u64), move || SessionMessage::WillDue(g));
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
    fn redistribute_shared(&mut self, me: &ActorRef<SessionMessage>) {
        let router = &self.broker.router;
        let id = me.get_id();
        let mut keep = VecDeque::with_capacity(self.inflight.len());
        for f in self.inflight.drain(..) {
            if f.d.shared.is_some() && f.d.qos == QoS::AtLeastOnce && router.redeliver_shared(f.d.clone(), id) {
                continue;
            }
            keep.push_back(f);
        }
        self.inflight = keep;
        let mut pend = VecDeque::with_capacity(self.pending.len());
        for d in self.pending.drain(..) {
            if d.shared.is_some() && router.redeliver_shared(d.clone(), id) {
                continue;
            }
            pend.push_back(d);
        }
        self.pending = pend;
    }

    async fn publish_will(&mut self) {
        let Some(w) = self.will.take() else { return };
        let mut props = w.props;
        let expires_at = props.message_expiry_interval.take().map(|s| now_ms() + s as u64 * 1000);
        props.will_delay_interval = None;
        let msg = Arc::new(Message {
            topic: Arc::from(w.topic.as_str()),
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            props: if props.is_empty() { None } else { Some(Box::new(props)) },
            expires_at,
            publisher: Some(self.client_id.clone()),
        });
        if msg.retain {
            self.broker.retain(msg.clone()).await;
        }
        self.broker.publish(msg);
    }

    /// The session ends: drop its routes and stored state, tell the registry, stop.
    fn end(&mut self, me: &ActorRef<SessionMessage>) {
        self.redistribute_shared(me);
        let filters: Vec<String> = self.subs.keys().cloned().collect();
        for f in filters {
            self.remove_route(me, &f);
        }
        self.subs.clear();
        // Deliveries that raced with the end are dropped with the session.
        let _ = self.load.take();
        self.broker.store.remove_session(&self.client_id);
        if let Some(r) = self.broker.registry() {
            let _ = r.cast(RegistryMessage::SessionEnded { client_id: self.client_id.clone(), id: me.get_id() });
        }
        self.expiry = 0;
        me.stop(None);
    }

    fn persist(&mut self) {
        if !self.persistent() {
            return;
        }
        let snap = SessionSnapshot {
            client_id: self.client_id.to_string(),
            protocol: self.protocol,
            expiry_secs: self.expiry,
            disconnected_at_ms: self.disconnected_at,
            subscriptions: self.subs.iter().map(|(f, (o, id))| (f.clone(), *o, *id)).collect(),
            inflight: self.inflight.iter().map(|f| (f.pkid, f.released, f.d.clone())).collect(),
            queue: self.pending.iter().cloned().collect(),
            incoming_qos2: self.incoming_qos2.iter().copied().collect(),
        };
        self.broker.store.put_session(snap);
    }

    async fn restore(&mut self, me: &ActorRef<SessionMessage>, s: SessionSnapshot) {
        self.protocol = s.protocol;
        self.expiry = s.expiry_secs;
        for (f, o, id) in s.subscriptions {
            if self.add_route(me, &f, o, id).await {
                self.subs.insert(f, (o, id));
            }
        }
        self.inflight = s.inflight.into_iter().map(|(pkid, released, d)| Inflight { pkid, released, d }).collect();
        self.pending = s.queue.into();
        self.incoming_qos2 = s.incoming_qos2.into_iter().collect();
        let now = now_ms();
        let since = s.disconnected_at_ms.unwrap_or(now);
        self.disconnected_at = Some(since);
        if self.expiry != u32::MAX {
            let left = (self.expiry as u64 * 1000).saturating_sub(now.saturating_sub(since));
            let g = self.generation;
            me.send_after(Duration::from_millis(left), move || SessionMessage::Expire(g));
        }
    }
}
