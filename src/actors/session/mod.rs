//! Session actor: one per client id. Owns subscriptions, the outbound in-flight window and queue,
//! inbound QoS 2 state, the will and the expiry; outlives its connection when persistent.
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio_util::sync::CancellationToken;

use super::load::Load;
use super::pending::Ticket;
use super::registry::RegistryMessage;
use super::shard::{ShardMessage, Sub};
use crate::broker::Broker;
use crate::message::{Delivery, Message};
use crate::protocols::mqtt::{
    reason, topic, Ack, ConnAck, Packet, Properties, Protocol, QoS, RetainHandling, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe,
    Will,
};
use crate::storage::state::{QueueInfo, SessionSnapshot};

/// What a session writes to its connection's bounded outbound queue.
#[derive(Debug)]
pub enum Outbound {
    Packet(Box<Packet>),
    /// PUBACK (packet id, reason code): the hot path's answer, without a boxed `Packet`.
    PubAck(u16, u8),
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
pub type Reply = crate::queue::OwnedPermit<Outbound>;

fn answer(reply: Reply, p: Packet) {
    reply.send(Outbound::Packet(Box::new(p)));
}

/// The session's view of its current connection.
pub struct ConnHandle {
    pub id: u64,
    pub tx: crate::queue::Sender<Outbound>,
    pub cancel: CancellationToken,
    pub protocol: Protocol,
    /// Client's Receive Maximum.
    pub recv_max: u16,
    /// Client's Maximum Packet Size.
    pub max_packet: u32,
    /// The reason the session closed this connection with (0 = it did not).
    pub kicked: Arc<std::sync::atomic::AtomicU8>,
    /// The client's address (after the PROXY protocol, if any) and when it connected.
    pub peer: String,
    pub connected_at_ms: u64,
}

/// What `thingsctl sessions show` tells about a session.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionInfo {
    pub client_id: String,
    pub connected: bool,
    pub protocol: Option<String>,
    pub peer: Option<String>,
    pub connected_at_ms: Option<u64>,
    pub disconnected_at_ms: Option<u64>,
    pub expiry_secs: u32,
    pub subscriptions: Vec<SubscriptionInfo>,
    /// Outbound QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// Deliveries waiting: the queue (in memory and on disk) plus the inbox not yet taken.
    pub queued: usize,
    pub will: bool,
    pub generation: u64,
    /// The node holding this session's replica (cluster, persistent sessions).
    pub backup: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SubscriptionInfo {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub identifier: Option<u32>,
}

pub struct AttachArgs {
    pub conn: ConnHandle,
    /// CONNACK to send first; the session fills in Session Present.
    pub connack: ConnAck,
    pub clean_start: bool,
    pub will: Option<Box<Will>>,
    pub expiry: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WillAction {
    Publish,
    Discard,
}

/// A session key as operators see it: (device number, client id). Device sessions live in
/// their own namespace, `{device_number}\0{client id}`.
pub fn display_client(key: &str) -> (Option<&str>, &str) {
    match key.split_once('\0') {
        Some((d, c)) => (Some(d), c),
        None => (None, key),
    }
}

/// Run by the session after a SUBSCRIBE granted at least one filter.
pub type OnGranted = Box<dyn FnOnce() + Send>;

pub enum SessionMessage {
    /// A restored session's routes are acknowledged by the other nodes: answer the attaches
    /// that waited for it.
    Routed,
    /// A connection takes this session (replies Session Present once its routes are in).
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
    /// Packets with properties are boxed: the message's size is every mailbox slot's and every
    /// handling future's (a session's idle task held three inline copies of 440 bytes).
    PubRec(Box<Ack>, Reply),
    PubComp(u16),
    PubRel(u16, Reply),
    /// `_routing` bounds how far the connection may read ahead of the session's routing.
    InboundQos2 {
        pkid: u16,
        msg: Arc<Message>,
        /// The platform took it (a device's stored uplink): a success even without subscribers.
        taken: bool,
        reply: Reply,
        _routing: tokio::sync::OwnedSemaphorePermit,
    },
    /// A SUBSCRIBE; the listed filter indexes were refused by the ACL (answered 0x87 / 0x80).
    /// The callback runs once a filter is granted and routed (the device platform sends a
    /// device what was queued for it): the session knows nothing of devices.
    /// The ticket is given back once the change is in the routes (publishers read after
    /// the SUBSCRIBE wait for it: `actors::pending`).
    Subscribe(Box<Subscribe>, Vec<usize>, Reply, Option<OnGranted>, Ticket),
    Unsubscribe(Box<Unsubscribe>, Reply, Ticket),
    /// A QoS 2 message from this client could not be kept by some subscriber: its packet id is
    /// free again (the PUBREC said 0x97; a 3.1.1 client is disconnected instead).
    Qos2Refused(u16),
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
    /// The cluster's members changed (this one went down, if any): a persistent session whose
    /// backup node is now another (its backup left, drains, or a node that ranks higher for it
    /// came up — a restarted one holds no replicas), or went down, sends its whole state there.
    PeersChanged(Option<Arc<str>>),
    Persist(Option<RpcReplyPort<()>>),
    /// Another node takes this client over (see `lifecycle.rs`): close, give the state up —
    /// unless the asking side stopped waiting (its reply port closed): then the session stays.
    HandOver {
        gen: u64,
        to: String,
        clean: bool,
        reply: RpcReplyPort<Option<Box<SessionSnapshot>>>,
    },
    /// The new owner's routes are in place (or the wait timed out): flush to it and end.
    Release(u64),
    /// What the previous owner collected during the hand-over; ends the held phase.
    HandOverFlush {
        gen: u64,
        deliveries: Vec<Delivery>,
    },
    HeldTimeout(u64),
    /// Another node owns this client: end quietly (no will, the client did not go away).
    Discard(RpcReplyPort<()>),
    /// The other copy of this (connected) session, claimed back after a partition healed:
    /// its queue joins this one (by message id), and what its node collected meanwhile
    /// follows with `HandOverFlush` when `from` is set.
    Merge {
        gen: u64,
        from: Option<String>,
        state: Option<Box<SessionSnapshot>>,
    },
    /// For the inspector.
    Info(RpcReplyPort<SessionInfo>),
    /// Answered once everything sent before is handled (the connection keeps packet order).
    Barrier(RpcReplyPort<()>),
    /// An operator disconnects the client (DISCONNECT 0x98); `discard` also ends the session
    /// (its will is published). Replies whether a connection was closed.
    Kick {
        discard: bool,
        reply: RpcReplyPort<bool>,
    },
}

pub struct SessionArgs {
    pub client_id: Arc<str>,
    pub broker: Arc<Broker>,
    pub restored: Option<SessionSnapshot>,
    /// Restored from this node's state store: where its queue stands (the snapshot holds the
    /// head). `None` with a snapshot: it came from another node and is stored anew.
    pub queue: Option<QueueInfo>,
    /// Taken over from another node: hold new deliveries until its flush (generation, node).
    pub held: Option<(u64, String)>,
    /// Adopted from this lost node's replica.
    pub adopted_from: Option<Arc<str>>,
    /// Its load gauge, also held by the registry (which reads `online` without asking).
    pub load: Arc<Load>,
}

/// A session handed to another node: deliveries are collected for it until release.
pub(super) struct Moving {
    gen: u64,
    to: String,
    buffer: Vec<Delivery>,
}

/// A session taken over from another node: new deliveries wait behind the previous owner's.
pub(super) struct Held {
    gen: u64,
    buffer: Vec<Delivery>,
}

/// How long either side of a hand-over waits for the other before going on alone.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(10);

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
    incoming_qos2: sparse::PacketIds,
    /// Boxed: most sessions have none, and a `Will` carries a full property set.
    will: Option<Box<Will>>,
    /// When a delayed will is due (Unix ms), while its timer runs.
    will_due: Option<u64>,
    expiry: u32,
    generation: u64,
    disconnected_at: Option<u64>,
    persist_scheduled: bool,
    flush_scheduled: bool,
    drop_logged: bool,
    /// The current connection was already told to go (log and kick once).
    kicked: bool,
    moving: Option<Box<Moving>>,
    held: Option<Box<Held>>,
    /// Durable sessions (cluster): the node holding this session's replica, and the QoS>0
    /// deliveries (with their publishers' wait tokens) still to append there.
    backup: Option<Arc<str>>,
    /// Restored from this node's store and not attached since: possibly a stale copy of a
    /// session another node adopted meanwhile (until `NotYours` ends it), so membership
    /// changes do not make it replicate over the live copy's replica.
    from_disk: bool,
    to_backup: sparse::ToBackup,
    /// Adopted sessions: ids of recent deliveries, because a message re-routed from the lost
    /// node may also have reached the session directly.
    recent: Option<Box<(HashSet<u64>, VecDeque<u64>)>>,
    /// The last PUBREC still waiting for durability (the next one waits for it: order).
    last_pubrec: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The queue as the state store sees it (see `queue.rs`), and the sequence number of the
    /// last delivery taken into memory: spilled records follow it.
    q: QueueInfo,
    loaded_upto: u64,
    /// The state store holds records of this session.
    on_disk: bool,
    /// This turn's writes to the state store (one commit at the end of the turn).
    writes: Option<Box<crate::storage::state::Batch>>,
    refuse_logged: bool,
    /// Restored routes not yet acknowledged: attaches answered once they are (`Routed`).
    routing: Option<Box<Attaches>>,
}

// A session's state lives in its actor's task for the session's whole life, and tokio
// allocates that task in 128-byte steps: at 408 bytes the task is 768 (656-byte future), one
// more field makes it 896 for every session. Rarely used fields go behind boxes
// (`sparse.rs`) before this bound is raised (measure with `-Zprint-type-sizes`, see
// loadtest/README.md).
const _: () = assert!(std::mem::size_of::<SessionState>() <= 408, "SessionState grew: see the comment above");

/// Attaches waiting for a restored session's routes: each reply port and Session Present.
type Attaches = Vec<(RpcReplyPort<bool>, bool)>;

pub(super) enum Sent {
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
            load: args.load,
            subs: HashMap::new(),
            inflight: VecDeque::new(),
            pending: VecDeque::new(),
            next_pkid: 1,
            incoming_qos2: sparse::PacketIds::default(),
            will: None,
            will_due: None,
            expiry: 0,
            generation: 0,
            disconnected_at: None,
            persist_scheduled: false,
            flush_scheduled: false,
            drop_logged: false,
            kicked: false,
            moving: None,
            held: None,
            backup: None,
            from_disk: false,
            to_backup: sparse::ToBackup::default(),
            recent: None,
            last_pubrec: None,
            q: QueueInfo { next_seq: 1, ..QueueInfo::default() },
            loaded_upto: 0,
            on_disk: false,
            writes: None,
            refuse_logged: false,
            routing: None,
        };
        // Adopted from a lost node's replica, or taken over from another node (perhaps from
        // the adopter of a lost node's session): messages re-routed from a lost node reach it,
        // and the ids it saw recently catch the copies it already had.
        match args.adopted_from {
            Some(n) => {
                let _ = st.load.adopted_from.set(n);
                st.recent = Some(Box::default());
            }
            None if args.held.is_some() => {
                let _ = st.load.adopted_from.set(Arc::from("*"));
                st.recent = Some(Box::default());
            }
            None => {}
        }
        if let Some((gen, _from)) = args.held {
            st.held = Some(Box::new(Held { gen, buffer: Vec::new() }));
            me.send_after(HANDOVER_WAIT, move || SessionMessage::HeldTimeout(gen));
        }
        if let Some(snap) = args.restored {
            Box::pin(st.restore(&me, snap, args.queue)).await;
        }
        st.flush_writes();
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
            SessionMessage::PubAcks(pkids) => st.on_pubacks(&me, pkids),
            SessionMessage::PubRec(ack, reply) => st.on_pubrec(&me, *ack, reply),
            SessionMessage::PubComp(pkid) => st.on_pubcomp(&me, pkid),
            SessionMessage::InboundQos2 { pkid, msg, taken, reply, _routing } => st.inbound_qos2(&me, pkid, msg, taken, reply),
            SessionMessage::Qos2Refused(pkid) => {
                st.incoming_qos2.remove(&pkid);
                if st.persistent() {
                    st.broker.state.remove_qos2(&st.client_id, pkid);
                }
                if st.protocol != Protocol::V5 {
                    if let Some(c) = st.conn.as_ref() {
                        st.broker.metrics.publishes_refused.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(client_id = %st.client_id, pkid, "a subscriber's queue could not take the message; 3.1.1 publisher disconnected unacknowledged");
                        kick(c, reason::QUOTA_EXCEEDED);
                    }
                } else {
                    st.broker.metrics.publishes_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
            SessionMessage::PubRel(pkid, reply) => {
                let code = if st.incoming_qos2.remove(&pkid) { 0 } else { reason::PACKET_ID_NOT_FOUND };
                if code == 0 && st.persistent() {
                    st.broker.state.remove_qos2(&st.client_id, pkid);
                }
                answer(reply, Packet::PubComp(Ack::new(pkid, code)));
            }
            SessionMessage::Subscribe(s, denied, reply, then, ticket) => Box::pin(st.subscribe(&me, *s, denied, reply, then, ticket)).await,
            SessionMessage::Unsubscribe(u, reply, ticket) => Box::pin(st.unsubscribe(&me, *u, reply, ticket)).await,
            SessionMessage::Attach(a, reply) => {
                let present = Box::pin(st.attach(&me, *a)).await;
                st.attached(reply, present);
            }
            SessionMessage::Routed => st.routed(),
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
                    st.save_meta();
                }
            }
            SessionMessage::Expire(g) => {
                if g == st.generation && st.conn.is_none() {
                    Box::pin(st.publish_will()).await;
                    st.end(&me);
                }
            }
            SessionMessage::PeersChanged(gone) => st.backup_moved(gone),
            SessionMessage::Flush => {
                st.flush_scheduled = false;
                st.drain(&me);
            }
            SessionMessage::HandOver { gen, to, clean, reply } => Box::pin(st.answer_hand_over(&me, gen, to, clean, reply)).await,
            SessionMessage::Release(gen) => {
                if st.moving.as_ref().is_some_and(|m| m.gen == gen) {
                    Box::pin(st.release(&me)).await;
                }
            }
            SessionMessage::HandOverFlush { gen, deliveries } => st.end_held(&me, gen, deliveries),
            SessionMessage::HeldTimeout(gen) => {
                if st.held.is_some() {
                    tracing::warn!(client_id = %st.client_id, "previous owner did not flush in time; delivering without it");
                }
                st.end_held(&me, gen, Vec::new());
            }
            SessionMessage::Discard(reply) => {
                if let Some(old) = st.conn.take() {
                    kick(&old, reason::SESSION_TAKEN_OVER);
                }
                st.will = None;
                st.end(&me);
                let _ = reply.send(());
            }
            SessionMessage::Merge { gen, from, state } => st.merge(&me, gen, from, state),
            SessionMessage::Info(reply) => {
                let _ = reply.send(st.info());
            }
            SessionMessage::Barrier(reply) => {
                let _ = reply.send(());
            }
            SessionMessage::Kick { discard, reply } => {
                let had = Box::pin(st.kick_by_operator(&me, discard)).await;
                let _ = reply.send(had);
            }
            SessionMessage::Persist(reply) => st.persist_now(reply),
        }
        st.flush_writes();
        if !st.to_backup.is_empty() {
            st.replicate();
        }
        st.load.set_pending(st.pending.len());
        if delivery || st.load.pressed() {
            let low = st.broker.high_water() / 2;
            st.load.progressed(st.pending.len(), low);
        }
        Ok(())
    }
}

/// A session that ends while a connection is attached (it crashed or was killed; a normal end
/// detaches first) takes the connection down with it, so the client reconnects.
impl Drop for SessionState {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.broker.serving.load(Ordering::Relaxed) {
                tracing::error!(client_id = %self.client_id, "session ended with a live connection; closing it");
                kick(&c, reason::UNSPECIFIED_ERROR);
            } else {
                // The node stops: its sessions may stop before their connections' last detach.
                tracing::debug!(client_id = %self.client_id, "node stopping; closing the session's connection");
                kick(&c, reason::SERVER_SHUTTING_DOWN);
            }
        }
    }
}

/// Ask a connection to close with `code` (DISCONNECT in 5.0); if its queue is full, cut it.
pub fn kick(conn: &ConnHandle, code: u8) {
    conn.kicked.store(code, std::sync::atomic::Ordering::Relaxed);
    if conn.tx.try_send(Outbound::Disconnect(code)).is_err() {
        conn.cancel.cancel();
    }
}

mod lifecycle;
mod outbound;
mod queue;
mod requests;
mod sparse;

impl SessionState {
    pub(super) fn window(&self) -> usize {
        let cfg = self.broker.config.mqtt.max_inflight.max(1) as usize;
        match &self.conn {
            Some(c) => (c.recv_max as usize).min(cfg),
            None => 0,
        }
    }

    pub(super) fn persistent(&self) -> bool {
        self.expiry > 0
    }

    /// The session's replica on its backup node (cluster) is refreshed within the interval.
    /// Answer an attach: now, or once the restored routes are acknowledged (`routed`).
    fn attached(&mut self, reply: RpcReplyPort<bool>, present: bool) {
        match self.routing.as_mut() {
            Some(waiting) => waiting.push((reply, present)),
            None => {
                let _ = reply.send(present);
            }
        }
    }

    /// The periodic (or a stopping node's) persist; `reply` once it is handed on.
    fn persist_now(&mut self, reply: Option<RpcReplyPort<()>>) {
        self.persist_scheduled = false;
        self.persist();
        if let Some(r) = reply {
            let _ = r.send(());
        }
    }

    fn routed(&mut self) {
        for (reply, present) in self.routing.take().map(|w| *w).unwrap_or_default() {
            let _ = reply.send(present);
        }
    }

    pub(super) fn mark_dirty(&mut self, me: &ActorRef<SessionMessage>) {
        if self.persistent() && !self.persist_scheduled && self.broker.cluster.get().is_some() {
            self.persist_scheduled = true;
            let ms = self.broker.config.node.persist_interval_ms.max(1);
            me.send_after(Duration::from_millis(ms), || SessionMessage::Persist(None));
        }
    }

    pub(super) fn send_packet(&mut self, p: Packet) {
        if let Some(c) = &self.conn {
            if c.tx.try_send(Outbound::Packet(Box::new(p))).is_err() {
                // The queue is full of packets the client is not reading: cut it rather than grow.
                tracing::warn!(client_id = %self.client_id, "outbound queue full on a control packet; closing connection");
                c.cancel.cancel();
            }
        }
    }

    fn info(&self) -> SessionInfo {
        let mut subscriptions: Vec<SubscriptionInfo> = self
            .subs
            .iter()
            .map(|(f, (o, id))| SubscriptionInfo {
                filter: f.clone(),
                qos: o.qos as u8,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling as u8,
                identifier: *id,
            })
            .collect();
        subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
        let c = self.conn.as_ref();
        SessionInfo {
            client_id: self.client_id.to_string(),
            connected: c.is_some(),
            protocol: c.map(|c| if c.protocol == Protocol::V5 { "5.0" } else { "3.1.1" }.to_string()),
            peer: c.map(|c| c.peer.clone()),
            connected_at_ms: c.map(|c| c.connected_at_ms),
            disconnected_at_ms: self.disconnected_at,
            expiry_secs: self.expiry,
            subscriptions,
            inflight: self.inflight.len(),
            queued: self.pending.len() + self.q.spilled + self.load.mailbox.load(Ordering::Relaxed),
            will: self.will.is_some(),
            generation: self.generation,
            backup: self.backup.as_ref().map(|b| b.to_string()),
        }
    }

    pub(super) fn alloc_pkid(&mut self) -> u16 {
        loop {
            let id = self.next_pkid;
            self.next_pkid = if self.next_pkid == u16::MAX { 1 } else { self.next_pkid + 1 };
            if !self.inflight.iter().any(|f| f.pkid == id) {
                return id;
            }
        }
    }
}

impl ractor::Message for SessionMessage {}
