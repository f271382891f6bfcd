//! The cluster: node membership over `ractor_cluster`, replicated route tables, forwarding of
//! publishes to nodes with matching subscribers, and retained-message replication.
//!
//! One [`ClusterActor`] per node is joined to the `ractor::pg` group [`GROUP`]; `ractor_cluster`
//! syncs that group across linked nodes, so every node learns its peers' actors from it. All
//! node-to-node traffic is [`ClusterMessage::Wire`] bytes in our own versioned codec (`wire.rs`).
//! Publishes leave through one [`Link`] per peer: a task that batches whatever is queued into
//! one frame, keeping per-peer order.
mod frames;
mod ghosts;
mod handle;
mod membership;
mod messages;
pub mod net;
mod registrar;
mod retained;
pub mod routes;
pub mod wire;

use crate::actors::inspect::Tell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::NodeServerMessage;
use rand::Rng;
use tokio::sync::{mpsc, Notify};

use crate::actors::registry::RegistryMessage;
use crate::actors::retained::RetainedMessage;
use crate::broker::Broker;
use crate::message::{now_ms, Delivery, Durable, DurableToken, Message};
use crate::storage::state::SessionSnapshot;
use routes::{NodeIdx, RouteNode};
use wire::{Body, Forward, Hlc, RetainedEntry};

/// The process group every node's cluster actor joins.
pub const GROUP: &str = "thingsd.cluster";
/// Forwards per frame at most (a frame also stops growing past ~1 MiB of payload, and past the
/// backpressure high-water mark: what is in flight to a peer must fit a subscriber's queue).
const BATCH: usize = 512;
/// Frames of forwards a peer has not acknowledged yet, at most. While they are out, new
/// forwards accumulate into the next (larger) frame: batching follows load, and a slow peer
/// slows its publishers (through the link depth) instead of overflowing its subscribers.
const FRAMES_IN_FLIGHT: usize = 2;
const BATCH_BYTES: usize = 1 << 20;
/// Tombstones of deleted retained messages are kept this long for convergence.
const TOMBSTONE_TTL: Duration = Duration::from_secs(3600);

pub use messages::{ClusterMessage, HandOverAnswer, Local};

/// The registrar's answer to a claim.
#[derive(Debug, Default)]
pub struct Claimed {
    pub gen: u64,
    /// The node the session came from (it buffers deliveries until released).
    pub from: Option<String>,
    pub state: Option<Box<SessionSnapshot>>,
    /// The previous owner kept the session (it did not hand it over in time): the client is
    /// refused and retries; nothing was claimed.
    pub refused: bool,
}

/// Registrar bookkeeping for one client id.
#[derive(Default)]
struct Reg {
    owner: Option<Arc<str>>,
    gen: u64,
    /// A claim in progress (until ClaimDone or the deadline); later claims queue.
    busy_until: Option<Instant>,
    /// Claimant, request and previous owner, awaiting that owner's HandedOver.
    waiting: Option<(Arc<str>, u64, Arc<str>)>,
    /// The owner before the claim in progress (it is again if the claim is refused).
    before: Option<Arc<str>>,
    queue: std::collections::VecDeque<(Arc<str>, u64, bool)>,
}

/// How long a claim may hold its client id (hand-over, flush) before the next one proceeds.
const CLAIM_HOLD: Duration = Duration::from_secs(10);

/// Membership changes, for actors that care (`Cluster::events`).
#[derive(Clone, Debug)]
pub enum ClusterEvent {
    MemberUp { name: Arc<str>, addr: String },
    MemberDown { name: Arc<str>, reason: String },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MemberInfo {
    pub name: String,
    pub addr: String,
    pub up: bool,
    pub routes: usize,
    /// Replicas of its persistent sessions this node holds (this node: all it holds).
    pub replicas: usize,
    /// The cluster wire version this node writes to it (for this node: the newest it speaks).
    pub wire: u16,
    /// The member's index in route tables (this node: 0).
    #[serde(skip)]
    pub idx: NodeIdx,
}

use handle::{forward_loop, RouteOp};
pub use handle::{rendezvous, Cluster, Features, Link, Parked};

/// What this node knows of another.
struct Member {
    name: Arc<str>,
    idx: NodeIdx,
    addr: String,
    cell: Option<ActorCell>,
    incarnation: u64,
    last_seen: Instant,
    up: bool,
    /// Down, but its routes still stand until its sessions are adopted (see `unghost`).
    ghost: bool,
    /// When it was last seen going down (a registrar's guess for client ids nobody announced).
    lost_at: Option<Instant>,
    /// Stopping (`Body::Draining`): up, but no longer a registrar, backup or owner of new work.
    draining: bool,
    /// Its route keys, and whether a persistent session subscribes to each.
    routes: HashMap<Arc<str>, bool>,
    /// The wire version frames to it are written in (shared with its publish link): the
    /// oldest until it says it speaks more (`Body::Versions`), again after it restarts.
    wire: Arc<AtomicU16>,
}

struct Dial {
    next_at: Instant,
    backoff: Duration,
    inflight: bool,
}

struct Pending {
    waiting: HashSet<Arc<str>>,
    replies: Vec<RpcReplyPort<()>>,
    deadline: Instant,
}

impl Pending {
    fn answer(self) {
        for r in self.replies {
            let _ = r.send(());
        }
    }
}

/// Route changes or retained entries per frame at most (a burst goes out as several).
const PER_FRAME: usize = 2048;

pub struct ClusterArgs {
    pub broker: Arc<Broker>,
    pub handle: Arc<Cluster>,
    pub node_server: ActorRef<NodeServerMessage>,
    pub advertise: String,
    pub tls: Option<net::LinkTls>,
}

pub struct ClusterState {
    a: ClusterArgs,
    incarnation: u64,
    members: HashMap<Arc<str>, Member>,
    next_idx: NodeIdx,
    dials: HashMap<String, Dial>,
    local_routes: HashMap<Arc<str>, bool>,
    seq: u64,
    pending: HashMap<u64, Pending>,
    clock: Hlc,
    retained: HashMap<Arc<str>, Hlc>,
    tombstones: HashMap<Arc<str>, (Hlc, Instant)>,
    refused: HashSet<String>,
    registrar: HashMap<Arc<str>, Reg>,
    /// Our pending claims: reply, deadline, the registrar asked, client id, Clean Start.
    claims: HashMap<u64, PendingClaim>,
    /// Replicas of sessions owned by other nodes.
    replicas: HashMap<Arc<str>, Replica>,
    /// After a membership change, peers re-announce the sessions (and orphaned replicas) they
    /// hold to their registrars; claims for client ids this registrar does not know wait for
    /// those announcements (bounded by `settle_until`).
    settling: HashSet<Arc<str>>,
    settle_until: Instant,
    deferred: Vec<(Arc<str>, Arc<str>, u64, bool)>,
    /// Appends sent to backups, awaiting their acknowledgement: (node, tokens, deadline).
    backup_waits: HashMap<u64, BackupWait>,
    /// Operator requests sent to peers, awaiting `AdminReply`.
    admin: HashMap<u64, (RpcReplyPort<Result<String, String>>, Instant)>,
    /// This node left the cluster on an operator's order (until `Join`).
    departed: bool,
    /// This node is stopping (`Local::Drain`): its duties went to the others.
    draining: bool,
    /// When the last tick handled was queued: peers are heard in mailbox time (see
    /// `membership::mailbox_tick`).
    heard: Instant,
}

struct PendingClaim {
    reply: RpcReplyPort<Claimed>,
    deadline: Instant,
    registrar: Arc<str>,
    client: Arc<str>,
    clean: bool,
}

/// An append sent to a backup node: the node, the publishers' tokens, and until when to wait.
type BackupWait = (Arc<str>, Vec<Arc<DurableToken>>, Instant);

/// A replica of a session owned by another node: its last full state and what was delivered since.
struct Replica {
    owner: Arc<str>,
    state: Box<SessionSnapshot>,
    log: Vec<Delivery>,
}

impl Replica {
    /// The session as the owner last had it: state plus logged deliveries it does not show.
    fn into_snapshot(self) -> Box<SessionSnapshot> {
        let mut s = self.state;
        let known: HashSet<u64> = s.inflight.iter().map(|(_, _, d)| d.msg.id).chain(s.queue.iter().map(|d| d.msg.id)).collect();
        s.queue.extend(self.log.into_iter().filter(|d| !known.contains(&d.msg.id)));
        s.disconnected_at_ms.get_or_insert_with(now_ms);
        s
    }
}

pub struct ClusterActor;

impl ClusterState {
    /// Take what the shards and the retained store queued (`Cluster::outbox`) and tell the
    /// peers in as few frames as it fits.
    fn flush_outbox(&mut self) {
        let (routes, retained) = self.a.handle.take_outbox();
        if !routes.is_empty() {
            self.local_routes_changed(routes);
        }
        if !retained.is_empty() {
            self.local_retained(retained);
        }
    }

    /// Apply route changes in order; peers hold a set of keys per node, so each key's last
    /// change is what they need. Additions are acknowledged (their SUBACKs wait for it).
    fn local_routes_changed(&mut self, ops: Vec<RouteOp>) {
        let mut last: HashMap<Arc<str>, Option<bool>> = HashMap::with_capacity(ops.len());
        let mut order = Vec::with_capacity(ops.len());
        let mut replies = Vec::new();
        for op in ops {
            let (key, now) = match op {
                RouteOp::Add(key, durable, reply) => {
                    self.local_routes.insert(key.clone(), durable);
                    replies.push(reply);
                    (key, Some(durable))
                }
                RouteOp::Del(key) if self.local_routes.remove(&key).is_some() => (key, None),
                RouteOp::Del(_) => continue,
            };
            if last.insert(key.clone(), now).is_none() {
                order.push(key);
            }
        }
        let (mut add, mut del) = (Vec::new(), Vec::new());
        for key in order {
            match last.get(&key).copied().flatten() {
                Some(durable) => add.push((key, durable)),
                None => del.push(key),
            }
        }
        for chunk in del.chunks(PER_FRAME) {
            self.broadcast(&Body::Routes { reset: false, add: vec![], del: chunk.to_vec(), ack: None });
        }
        if add.is_empty() {
            // Added and removed again in the same burst: nothing for the peers to have.
            for r in replies {
                let _ = r.send(());
            }
            return;
        }
        // Frames to a peer arrive in order: the last one's acknowledgement covers them all.
        let mut chunks: Vec<Vec<(Arc<str>, bool)>> = add.chunks(PER_FRAME).map(<[_]>::to_vec).collect();
        let final_chunk = chunks.pop().unwrap_or_default();
        for chunk in chunks {
            self.broadcast(&Body::Routes { reset: false, add: chunk, del: vec![], ack: None });
        }
        self.broadcast_acked(|seq| Body::Routes { reset: false, add: final_chunk, del: vec![], ack: Some(seq) }, replies);
    }

    /// Retained messages stored (or deleted) here: stamp each and tell every peer.
    fn local_retained(&mut self, msgs: Vec<Arc<Message>>) {
        let mut entries = Vec::with_capacity(msgs.len());
        for msg in msgs {
            let hlc = self.tick_clock();
            let topic = msg.topic.clone();
            let msg = if msg.payload.is_empty() {
                self.retained.remove(&topic);
                self.tombstones.insert(topic.clone(), (hlc, Instant::now()));
                None
            } else {
                self.tombstones.remove(&topic);
                self.retained.insert(topic.clone(), hlc);
                Some(msg)
            };
            entries.push(RetainedEntry { topic, hlc, msg });
        }
        for chunk in entries.chunks(PER_FRAME) {
            self.broadcast(&Body::Retained(chunk.to_vec()));
        }
    }

    /// Our sessions, and replicas whose owner is gone (we answer for those now), to their
    /// registrars; every live node gets an announcement, if only an empty one.
    fn send_owned(&mut self, mut list: Vec<(Arc<str>, u64)>) {
        // Our sessions, and replicas whose owner is gone (we answer for those now), to
        // their registrars; every live node gets an announcement, if only an empty one.
        list.extend(self.replicas.iter().filter(|(_, r)| !self.is_live(&r.owner)).map(|(c, _)| (c.clone(), 0)));
        let mut by: HashMap<Arc<str>, Vec<(Arc<str>, u64)>> = HashMap::new();
        for m in self.members.values().filter(|m| m.up) {
            by.insert(m.name.clone(), Vec::new());
        }
        for (c, g) in list {
            by.entry(self.registrar_of(&c)).or_default().push((c, g));
        }
        for (reg, entries) in by {
            if entries.is_empty() {
                self.to(&reg, &Body::Owned(Vec::new()));
            }
            for chunk in entries.chunks(4096) {
                self.to(&reg, &Body::Owned(chunk.to_vec()));
            }
        }
    }

    fn cfg(&self) -> &crate::config::ClusterConfig {
        &self.a.broker.config.cluster
    }

    fn me(&self) -> &str {
        &self.a.handle.name
    }

    /// The newest wire version this node speaks (`cluster.wire_version`).
    fn newest(&self) -> u16 {
        match self.cfg().wire_version {
            0 => wire::VERSION,
            v => v,
        }
    }

    /// Send to a member's cluster actor, in the wire version agreed with it.
    fn send_to(&self, m: &Member, body: &Body) {
        if let Some(c) = &m.cell {
            let r: ActorRef<ClusterMessage> = c.clone().into();
            let _ = r.tell(ClusterMessage::Wire(wire::encode(m.wire.load(Ordering::Relaxed), self.me(), body)));
        }
    }

    fn send(&self, to: &str, body: &Body) {
        if let Some(m) = self.members.get(to) {
            self.send_to(m, body);
        }
    }

    /// Send `body` to the members `which` selects, encoding it once per wire version in use.
    fn send_each(&self, body: &Body, which: impl Fn(&Member) -> bool) {
        let mut frames: Vec<(u16, Vec<u8>)> = Vec::with_capacity(1);
        for m in self.members.values().filter(|m| which(m)) {
            let Some(c) = &m.cell else { continue };
            let v = m.wire.load(Ordering::Relaxed);
            let i = match frames.iter().position(|(fv, _)| *fv == v) {
                Some(i) => i,
                None => {
                    frames.push((v, wire::encode(v, self.me(), body)));
                    frames.len() - 1
                }
            };
            let r: ActorRef<ClusterMessage> = c.clone().into();
            let _ = r.tell(ClusterMessage::Wire(frames[i].1.clone()));
        }
    }

    fn broadcast(&self, body: &Body) {
        self.send_each(body, |m| m.up);
    }

    /// Broadcast `body(seq)` to the live peers and reply once each has acknowledged `seq`
    /// (`peer_acked`), went down, or `route_ack_timeout_ms` passed. Returns how many it waits for.
    fn broadcast_acked(&mut self, body: impl FnOnce(u64) -> Body, replies: Vec<RpcReplyPort<()>>) -> usize {
        self.send_acked(body, replies, |m| m.up)
    }

    /// `broadcast_acked` to the members `which` selects.
    fn send_acked(&mut self, body: impl FnOnce(u64) -> Body, replies: Vec<RpcReplyPort<()>>, which: impl Fn(&Member) -> bool) -> usize {
        self.seq += 1;
        let seq = self.seq;
        let waiting: HashSet<Arc<str>> = self.members.values().filter(|m| which(m)).map(|m| m.name.clone()).collect();
        self.send_each(&body(seq), which);
        let n = waiting.len();
        let deadline = Instant::now() + Duration::from_millis(self.cfg().route_ack_timeout_ms);
        let p = Pending { waiting, replies, deadline };
        if p.waiting.is_empty() {
            p.answer();
        } else {
            self.pending.insert(seq, p);
        }
        n
    }

    /// `from` acknowledged the broadcast `seq`.
    fn peer_acked(&mut self, seq: u64, from: &str) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.waiting.remove(from);
            if p.waiting.is_empty() {
                if let Some(p) = self.pending.remove(&seq) {
                    p.answer();
                }
            }
        }
    }

    /// Send to a node by name; to ourselves through our own mailbox (same code path).
    fn to(&self, node: &str, body: &Body) {
        if node == self.me() {
            if let Some(a) = self.a.handle.actor() {
                let _ = a.tell(ClusterMessage::Wire(wire::encode(self.newest(), self.me(), body)));
            }
        } else {
            self.send(node, body);
        }
    }

    fn member_mut(&mut self, name: &str) -> &mut Member {
        if !self.members.contains_key(name) {
            let idx = self.next_idx;
            self.next_idx += 1;
            let name: Arc<str> = Arc::from(name);
            self.members.insert(
                name.clone(),
                Member {
                    name,
                    idx,
                    addr: String::new(),
                    cell: None,
                    incarnation: 0,
                    last_seen: self.heard,
                    up: false,
                    ghost: false,
                    lost_at: None,
                    draining: false,
                    routes: HashMap::new(),
                    wire: Arc::new(AtomicU16::new(wire::OLDEST)),
                },
            );
        }
        self.members.get_mut(name).expect("inserted above")
    }
}

/// ractor_cluster names peers `name@host`; ours is the part before `@`.
fn peer_name(full: &str) -> String {
    full.split('@').next().unwrap_or(full).to_string()
}

impl Actor for ClusterActor {
    type Msg = ClusterMessage;
    type State = ClusterState;
    type Arguments = ClusterArgs;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, a: ClusterArgs) -> Result<Self::State, ActorProcessingErr> {
        a.handle.actor.store(Some(Arc::new(me.clone())));
        let cfg = a.broker.config.cluster.clone();
        let now = Instant::now();
        let dials = cfg
            .seeds
            .iter()
            .filter(|s| **s != a.advertise)
            .map(|s| (s.clone(), Dial { next_at: now, backoff: Duration::ZERO, inflight: false }))
            .collect();
        let node_hash = a.handle.name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        // After a restart: the routes this node has are in the shards' snapshots.
        let mut local_routes = HashMap::new();
        for snap in &a.broker.router.snapshots {
            let mut keys = Vec::new();
            snap.load().route_keys(&mut Vec::new(), &mut keys);
            local_routes.extend(keys);
        }
        if cfg.seeds.iter().all(|s| *s == a.advertise) {
            a.handle.joined.store(true, Ordering::Relaxed);
        }
        ractor::pg::join(GROUP.to_string(), vec![me.get_cell()]);
        ractor::pg::monitor(GROUP.to_string(), me.get_cell());
        me.send_interval(Duration::from_millis(cfg.heartbeat_ms.max(10)), || ClusterMessage::Local(Local::Tick(Instant::now())));
        let mut st = ClusterState {
            a,
            incarnation: now_ms().max(1),
            members: HashMap::new(),
            next_idx: 1,
            dials,
            local_routes: HashMap::new(),
            seq: 0,
            pending: HashMap::new(),
            clock: Hlc { ms: 0, counter: 0, node: node_hash },
            retained: HashMap::new(),
            tombstones: HashMap::new(),
            refused: HashSet::new(),
            registrar: HashMap::new(),
            claims: HashMap::new(),
            replicas: HashMap::new(),
            backup_waits: HashMap::new(),
            settling: HashSet::new(),
            settle_until: now,
            deferred: Vec::new(),
            admin: HashMap::new(),
            departed: false,
            draining: false,
            heard: Instant::now(),
        };
        st.local_routes = local_routes;
        // Peers already linked (a restart): introduce ourselves; they answer with their state.
        st.resolve_cells().await;
        // Queued while no actor ran (the routes are in `local_routes` already, from the shards).
        st.flush_outbox();
        Ok(st)
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMessage::Wire(bytes) => st.on_frame(bytes).await,
            ClusterMessage::Local(Local::Tick(queued)) => st.on_tick(queued),
            ClusterMessage::Local(Local::Outbox) => st.flush_outbox(),
            ClusterMessage::Local(Local::Dialed { addr, ok: _ }) => {
                if let Some(d) = st.dials.get_mut(&addr) {
                    d.inflight = false;
                }
            }
            ClusterMessage::Local(Local::Drain(reply)) => st.drain(reply),
            ClusterMessage::Local(Local::Leave(reply)) => {
                let peers = st.broadcast_acked(|ack| Body::Leave { ack }, vec![reply]);
                tracing::info!(peers, "leaving the cluster");
            }
            ClusterMessage::Local(Local::Claim { client, clean, reply }) => {
                st.seq += 1;
                let req = st.seq;
                let registrar = st.registrar_of(&client);
                st.to(&registrar, &Body::Claim { client: client.clone(), req, clean });
                // Longer than the registrar holds the claim: its answer (or refusal) comes first.
                let deadline = Instant::now() + CLAIM_HOLD + Duration::from_secs(2);
                st.claims.insert(req, PendingClaim { reply, deadline, registrar, client, clean });
            }
            ClusterMessage::Local(Local::ClaimDone { client, gen }) => {
                let registrar = st.registrar_of(&client);
                st.to(&registrar, &Body::ClaimDone { client, gen });
            }
            ClusterMessage::Local(Local::Release { client, gen, to }) => st.to(&to, &Body::Release { client, gen }),
            ClusterMessage::Local(Local::HandedOver(answer)) => st.handed_over(answer),
            ClusterMessage::Local(Local::BackupState { to, client, state }) => st.to(&to, &Body::BackupState { client, state }),
            ClusterMessage::Local(Local::BackupAppend { to, client, deliveries, tokens }) => {
                st.seq += 1;
                let ack = st.seq;
                let deadline = Instant::now() + Duration::from_secs(5);
                st.to(&to, &Body::BackupAppend { client, deliveries, ack });
                st.backup_waits.insert(ack, (to, tokens, deadline));
            }
            ClusterMessage::Local(Local::BackupDrop { to, client }) => st.to(&to, &Body::BackupDrop { client }),
            ClusterMessage::Local(Local::Notice(n)) => st.broadcast(&Body::Device(n)),
            ClusterMessage::Local(Local::Flush { client, gen, to, deliveries }) => st.to(&to, &Body::Flush { client, gen, deliveries }),
            // An empty acknowledged route update: each peer answers after everything it sent before.
            ClusterMessage::Local(Local::Barrier(reply)) => {
                st.flush_outbox();
                st.broadcast_acked(|seq| Body::Routes { reset: false, add: vec![], del: vec![], ack: Some(seq) }, vec![reply]);
            }
            ClusterMessage::Local(Local::Owned(list, sent)) => {
                st.send_owned(list);
                if let Some(r) = sent {
                    let _ = r.send(());
                }
            }
            ClusterMessage::Local(Local::Send { to, body }) => st.to(&to, &body),
            ClusterMessage::Local(Local::Admin { to, req, reply }) => {
                if !st.is_live(&to) {
                    let _ = reply.send(Err(format!("node {to:?} is not a live member")));
                } else {
                    st.seq += 1;
                    let id = st.seq;
                    st.to(&to, &Body::Admin { id, req });
                    st.admin.insert(id, (reply, Instant::now() + Duration::from_secs(30)));
                }
            }
            ClusterMessage::Local(Local::Join(addr)) => {
                st.departed = false;
                if addr != st.a.advertise {
                    tracing::info!(%addr, "joining the cluster through this address (operator)");
                    st.dials.insert(addr, Dial { next_at: Instant::now(), backoff: Duration::ZERO, inflight: false });
                    st.redial(Instant::now());
                }
            }
            ClusterMessage::Local(Local::Depart(reply)) => Box::pin(st.depart(reply)).await,
            ClusterMessage::Local(Local::Disowned { client, gen }) => {
                let registrar = st.registrar_of(&client);
                st.to(&registrar, &Body::Disowned { client, gen });
            }
            ClusterMessage::Local(Local::Members(reply)) => {
                let _ = reply.send(st.members_info());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _me: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(change) = evt {
            match change {
                ractor::pg::GroupChangeMessage::Join(_, _, cells) => {
                    tracing::debug!(cells = ?cells.iter().map(|c| c.get_id()).collect::<Vec<_>>(), "cluster actors joined");
                    if cells.iter().any(|c| !c.get_id().is_local()) {
                        st.resolve_cells().await;
                    }
                }
                ractor::pg::GroupChangeMessage::Leave(_, _, cells) => {
                    tracing::debug!(cells = ?cells.iter().map(|c| c.get_id()).collect::<Vec<_>>(), "cluster actors left");
                    let gone: Vec<Arc<str>> = st
                        .members
                        .values()
                        .filter(|m| m.cell.as_ref().is_some_and(|c| cells.iter().any(|x| x.get_id() == c.get_id())))
                        .map(|m| m.name.clone())
                        .collect();
                    for name in gone {
                        if let Some(m) = st.members.get_mut(&name) {
                            m.cell = None;
                        }
                        st.down(&name, "link closed");
                    }
                }
            }
        }
        Ok(())
    }
}

/// Start the node's cluster links: NodeServer and link listener. Returns the handle and the
/// address peers dial (advertised).
pub async fn start(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<(Arc<Cluster>, String)> {
    use anyhow::Context;
    let cfg = &broker.config.cluster;
    let bound = listener.local_addr()?;
    check_cookie(cfg, bound)?;
    anyhow::ensure!(
        cfg.wire_version == 0 || (wire::OLDEST..=wire::VERSION).contains(&cfg.wire_version),
        "cluster.wire_version is {}: this build speaks cluster wire versions {} to {}",
        cfg.wire_version,
        wire::OLDEST,
        wire::VERSION
    );
    let advertise = net::advertise(cfg, bound)?;
    let tls = net::LinkTls::load(cfg)?;
    let name = broker.config.node.name.clone();
    let server = ractor_cluster::NodeServer::new(0, cfg.cookie.clone(), name.clone(), "thingsd".into(), None, None)
        .with_listen_addr(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let (ns, _) = Actor::spawn(Some(format!("cluster-server:{name}")), server, ()).await.context("start cluster node server")?;
    tokio::spawn(net::accept_loop(listener, ns.clone(), tls.clone(), stop));
    let handle = broker.cluster.get_or_init(|| Arc::new(Cluster::new(&name))).clone();
    let _ = handle.setup.set((ns, advertise.clone(), tls));
    // The cluster actor itself is started (and restarted) by the node's root supervisor.
    Ok((handle, advertise))
}

pub use crate::config::DEFAULT_COOKIE;
/// Shorter cookies are refused: the cookie is the only thing between a stranger and the mesh.
pub const MIN_COOKIE_LEN: usize = 16;

/// Refuse a cookie a stranger could know or guess: shorter than [`MIN_COOKIE_LEN`], or the
/// shipped default on a listener other hosts can reach.
pub fn check_cookie(cfg: &crate::config::ClusterConfig, bound: std::net::SocketAddr) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.cookie.chars().count() >= MIN_COOKIE_LEN,
        "cluster.cookie must have at least {MIN_COOKIE_LEN} characters (a random secret shared by every node)"
    );
    anyhow::ensure!(
        cfg.cookie != DEFAULT_COOKIE || bound.ip().is_loopback(),
        "cluster.cookie is the shipped default and cluster.listen ({bound}) is not on loopback: set a random secret shared by every node (THINGSD_CLUSTER__COOKIE)"
    );
    Ok(())
}
