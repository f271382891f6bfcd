//! The cluster: node membership over `ractor_cluster`, replicated route tables, forwarding of
//! publishes to nodes with matching subscribers, and retained-message replication.
//!
//! One [`ClusterActor`] per node is joined to the `ractor::pg` group [`GROUP`]; `ractor_cluster`
//! syncs that group across linked nodes, so every node learns its peers' actors from it. All
//! node-to-node traffic is [`ClusterMessage::Wire`] bytes in our own versioned codec (`wire.rs`).
//! Publishes leave through one [`Link`] per peer: a task that batches whatever is queued into
//! one frame, keeping per-peer order.
mod ghosts;
mod membership;
pub mod net;
mod registrar;
mod retained;
pub mod routes;
pub mod wire;

use crate::actors::inspect::Tell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use ractor::message::{BoxedDowncastErr, SerializedMessage};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use ractor_cluster::NodeServerMessage;
use rand::Rng;
use tokio::sync::{broadcast, mpsc, Notify};

use crate::actors::registry::RegistryMessage;
use crate::actors::retained::RetainedMessage;
use crate::broker::Broker;
use crate::message::{now_ms, Delivery, Durable, DurableToken, Message};
use crate::storage::local::SessionSnapshot;
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

pub enum ClusterMessage {
    /// A frame from another node (or to it, when sent to a remote actor).
    Wire(Vec<u8>),
    Local(Local),
}

impl ractor::Message for ClusterMessage {
    fn serializable() -> bool {
        true
    }
    fn serialize(self) -> Result<SerializedMessage, BoxedDowncastErr> {
        match self {
            ClusterMessage::Wire(args) => Ok(SerializedMessage::Cast { variant: "w".into(), args, metadata: None }),
            ClusterMessage::Local(_) => Err(BoxedDowncastErr),
        }
    }
    fn deserialize(m: SerializedMessage) -> Result<Self, BoxedDowncastErr> {
        match m {
            SerializedMessage::Cast { args, .. } => Ok(ClusterMessage::Wire(args)),
            _ => Err(BoxedDowncastErr),
        }
    }
}

pub enum Local {
    Tick,
    /// A shard got the first local subscriber of `key` (or its first persistent one:
    /// `durable`); reply once live peers have the route.
    AddRoute {
        key: Arc<str>,
        durable: bool,
        reply: RpcReplyPort<()>,
    },
    /// A shard lost the last local subscriber of `key`.
    DelRoute(Arc<str>),
    /// Broadcast a device notice.
    Notice(wire::DeviceNotice),
    /// A retained message was stored (or deleted) locally.
    Retained(Arc<Message>),
    Dialed {
        addr: String,
        ok: bool,
    },
    /// Say goodbye to every peer (graceful leave).
    Leave(RpcReplyPort<()>),
    Members(RpcReplyPort<Vec<MemberInfo>>),
    /// A client connects here: ask its registrar (replies with generation and handed-over state).
    Claim {
        client: Arc<str>,
        clean: bool,
        reply: RpcReplyPort<Claimed>,
    },
    ClaimDone {
        client: Arc<str>,
        gen: u64,
    },
    /// The new session's routes are in place: tell the previous owner to flush and let go.
    Release {
        client: Arc<str>,
        gen: u64,
        to: String,
    },
    /// The registry gave up (or did not have) a session the registrar asked for.
    HandedOver {
        client: Arc<str>,
        gen: u64,
        registrar: String,
        clean: bool,
        state: Option<Box<SessionSnapshot>>,
    },
    BackupState {
        to: Arc<str>,
        client: Arc<str>,
        state: Box<SessionSnapshot>,
    },
    BackupAppend {
        to: Arc<str>,
        client: Arc<str>,
        deliveries: Vec<Delivery>,
        tokens: Vec<Arc<DurableToken>>,
    },
    BackupDrop {
        to: Arc<str>,
        client: Arc<str>,
    },
    /// A moving session's last deliveries, for its new owner.
    Flush {
        client: Arc<str>,
        gen: u64,
        to: String,
        deliveries: Vec<Delivery>,
    },
    /// Reply once every live peer has processed everything it sent us before now.
    Barrier(RpcReplyPort<()>),
    /// Sessions this node owns (sent to their registrars after membership changes).
    Owned(Vec<(Arc<str>, u64)>),
    Disowned {
        client: Arc<str>,
        gen: u64,
    },
    /// Send a frame to a node (from a task).
    Send {
        to: String,
        body: Box<Body>,
    },
    /// An operator's request for another node (JSON of `ops::Query`); the reply is its JSON answer.
    Admin {
        to: String,
        req: String,
        reply: RpcReplyPort<Result<String, String>>,
    },
    /// Dial this address (an operator's `cluster join`); also ends a `leave`.
    Join(String),
    /// Leave the cluster for good (an operator's `cluster leave`): peers adopt this node's
    /// sessions and stop dialling it; this node forgets its peers and runs alone.
    Depart(RpcReplyPort<usize>),
}

/// The registrar's answer to a claim.
#[derive(Debug, Default)]
pub struct Claimed {
    pub gen: u64,
    /// The node the session came from (it buffers deliveries until released).
    pub from: Option<String>,
    pub state: Option<Box<SessionSnapshot>>,
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
    /// The member's index in route tables (this node: 0).
    #[serde(skip)]
    pub idx: NodeIdx,
}

/// One peer's outgoing publish queue, drained in batches by a task.
pub struct Link {
    pub name: Arc<str>,
    tx: mpsc::UnboundedSender<(Forward, Option<Arc<Durable>>)>,
    depth: Arc<AtomicUsize>,
    drained: Arc<Notify>,
    /// Frames sent and not yet acknowledged (their forwards, and the publishers waiting for
    /// them), by frame number: if the peer dies they are re-routed, not forgotten.
    unacked: std::sync::Mutex<HashMap<u64, Parked>>,
    /// Frames sent and not yet acknowledged, and a wake-up when one is.
    in_flight: AtomicUsize,
    credit: Notify,
    /// The peer is down: the sender task parks what is left and stops.
    closed: std::sync::atomic::AtomicBool,
    /// Forwards per frame at most (the backpressure high-water mark).
    batch_max: usize,
    /// Forwards queued at most before new ones nobody waits for are dropped (see `send`).
    cap: usize,
    dropped: Arc<AtomicU64>,
    parked: Arc<std::sync::Mutex<Vec<Parked>>>,
}

/// Forwards that did not reach a lost node, waiting until its sessions are adopted elsewhere.
pub struct Parked {
    /// The lost node they were for.
    pub dead: Arc<str>,
    pub forwards: Vec<Forward>,
    pub waiters: Vec<Arc<Durable>>,
}

impl Link {
    /// Queue a forward; with `durable`, the publisher waits for the peer's acknowledgement.
    pub fn send(&self, f: Forward, durable: Option<Arc<Durable>>) {
        if let Some(d) = &durable {
            d.add();
        }
        if self.closed.load(Ordering::Acquire) {
            // Raced with the peer's loss: parked like the frames it did not acknowledge.
            if f.msg.qos != crate::protocols::mqtt::QoS::AtMostOnce {
                if let Ok(mut p) = self.parked.lock() {
                    p.push(Parked { dead: self.name.clone(), forwards: vec![f], waiters: durable.into_iter().collect() });
                    return;
                }
            }
            if let Some(d) = durable {
                d.done();
            }
            return;
        }
        // The hard bound behind `pace`: a peer that stops reading cannot grow this queue
        // without limit. A forward some publisher waits for (`durable`) is still queued — those
        // are bounded by the publishers' in-flight windows, and dropping one would break an
        // acknowledgement; one nobody waits for is dropped and counted.
        if durable.is_none() && self.depth.load(Ordering::Relaxed) >= self.cap {
            if self.dropped.fetch_add(1, Ordering::Relaxed).is_multiple_of(10_000) {
                tracing::warn!(peer = %self.name, cap = self.cap, "peer's forward queue is full; dropping forwards (cluster.max_forward_queue)");
            }
            return;
        }
        self.depth.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.send((f, durable)) {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            if let Some(d) = e.0 .1 {
                d.done();
            }
        }
    }

    fn acked(&self, batch: u64) {
        let frame = self.unacked.lock().ok().and_then(|mut m| m.remove(&batch));
        for d in frame.into_iter().flat_map(|p| p.waiters) {
            d.done();
        }
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.credit.notify_one();
    }

    /// Wait (bounded) for room among the frames in flight.
    async fn room(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let n = self.credit.notified();
                if self.in_flight.load(Ordering::Acquire) < FRAMES_IN_FLIGHT || self.closed.load(Ordering::Acquire) {
                    return;
                }
                n.await;
            }
        })
        .await;
    }

    /// The peer is gone: what it did not acknowledge is parked for re-routing.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.credit.notify_waiters();
        let frames: Vec<Parked> = self.unacked.lock().map(|mut m| m.drain().map(|(_, p)| p).collect()).unwrap_or_default();
        if let Ok(mut p) = self.parked.lock() {
            p.extend(frames);
        }
        self.drained.notify_waiters();
    }
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }
}

/// What handles the frames of the features above the broker core (operators' queries, live
/// and alert events): registered once at start-up, so the cluster names no feature.
pub trait Features: Send + Sync + 'static {
    /// A feature frame from peer `from`; answers go back through [`Cluster::send`].
    fn frame(&self, from: Arc<str>, body: Body);
}

/// The node's handle on the cluster, shared through [`Broker`].
pub struct Cluster {
    pub name: Arc<str>,
    /// Remote routes: filter → nodes (snapshot, replaced on every change).
    pub routes: ArcSwap<RouteNode>,
    /// Live peers' publish queues.
    pub links: ArcSwap<HashMap<NodeIdx, Arc<Link>>>,
    pub events: broadcast::Sender<ClusterEvent>,
    /// Device notices from other nodes.
    pub notices: broadcast::Sender<wire::DeviceNotice>,
    pub forwarded: AtomicU64,
    pub received: AtomicU64,
    /// Forwards dropped because a peer's queue was at `cluster.max_forward_queue`.
    pub forward_dropped: Arc<AtomicU64>,
    /// A peer link came up at least once (or there is no seed to join): for readiness.
    pub joined: std::sync::atomic::AtomicBool,
    /// The running cluster actor (replaced when the supervisor restarts it).
    actor: arc_swap::ArcSwapOption<ActorRef<ClusterMessage>>,
    /// What the cluster actor is (re)started with: NodeServer, advertised address, link TLS.
    setup: OnceLock<(ActorRef<NodeServerMessage>, String, Option<net::LinkTls>)>,
    cursor: AtomicUsize,
    /// Names of the live peers (for backup choice without a round-trip).
    peers: ArcSwap<Vec<Arc<str>>>,
    /// Lost nodes whose routes are kept until their sessions are adopted elsewhere
    /// (publishes matching them are parked, then re-routed to the adopted sessions).
    ghosts: ArcSwap<HashMap<NodeIdx, Arc<str>>>,
    parked: Arc<std::sync::Mutex<Vec<Parked>>>,
    /// The node's feature frame handler (set once at start-up; frames before it are dropped).
    features: OnceLock<Arc<dyn Features>>,
}

/// Rendezvous (highest random weight) score of `node` for `client`.
fn rendezvous(node: &str, client: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in node.bytes().chain([0u8]).chain(client.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^ (h >> 29)
}

impl Cluster {
    pub fn new(name: &str) -> Cluster {
        Cluster {
            name: Arc::from(name),
            routes: ArcSwap::from_pointee(RouteNode::default()),
            links: ArcSwap::from_pointee(HashMap::new()),
            events: broadcast::channel(256).0,
            notices: broadcast::channel(1024).0,
            forwarded: AtomicU64::new(0),
            forward_dropped: Arc::new(AtomicU64::new(0)),
            joined: std::sync::atomic::AtomicBool::new(false),
            received: AtomicU64::new(0),
            actor: arc_swap::ArcSwapOption::empty(),
            setup: OnceLock::new(),
            cursor: AtomicUsize::new(0),
            peers: ArcSwap::from_pointee(Vec::new()),
            ghosts: ArcSwap::from_pointee(HashMap::new()),
            parked: Default::default(),
            features: OnceLock::new(),
        }
    }

    /// Register the handler of feature frames (once; later calls are ignored).
    pub fn on_features(&self, f: Arc<dyn Features>) {
        let _ = self.features.set(f);
    }

    pub fn actor(&self) -> Option<Arc<ActorRef<ClusterMessage>>> {
        self.actor.load_full()
    }

    /// Arguments to (re)start the cluster actor, once `start` has set the links up.
    pub fn args(self: &Arc<Self>, broker: Arc<Broker>) -> Option<ClusterArgs> {
        let (node_server, advertise, tls) = self.setup.get()?.clone();
        Some(ClusterArgs { broker, handle: self.clone(), node_server, advertise, tls })
    }

    fn cast(&self, l: Local) {
        if let Some(a) = self.actor.load_full() {
            let _ = a.tell(ClusterMessage::Local(l));
        }
    }

    /// Announce a new local route; the receiver fires once every live peer has it (bounded by
    /// `route_ack_timeout_ms`). Enqueued at once, so announcements keep the caller's order.
    pub fn add_route(&self, key: Arc<str>, durable: bool) -> Option<ractor::concurrency::OneshotReceiver<()>> {
        let a = self.actor.load_full()?;
        let (tx, rx) = ractor::concurrency::oneshot();
        a.tell(ClusterMessage::Local(Local::AddRoute { key, durable, reply: tx.into() })).ok()?;
        Some(rx)
    }

    /// Tell every live peer about a device change.
    pub fn device_notice(&self, n: wire::DeviceNotice) {
        self.cast(Local::Notice(n));
    }

    pub fn del_route(&self, key: Arc<str>) {
        self.cast(Local::DelRoute(key));
    }

    pub fn retained_changed(&self, msg: Arc<Message>) {
        if !msg.topic.starts_with("$SYS") {
            self.cast(Local::Retained(msg));
        }
    }

    pub async fn members(&self) -> Vec<MemberInfo> {
        match self.actor.load_full() {
            Some(a) => match a.ask(|r| ClusterMessage::Local(Local::Members(r)), Some(Duration::from_secs(5))).await {
                Ok(ractor::rpc::CallResult::Success(v)) => v,
                _ => vec![],
            },
            None => vec![],
        }
    }

    /// Ask node `to` (a live peer) the operator request `req`; bounded by `timeout`.
    pub async fn admin(&self, to: &str, req: String, timeout: Duration) -> Result<String, String> {
        let Some(a) = self.actor.load_full() else { return Err("cluster actor not running".into()) };
        let to = to.to_string();
        match a.ask(|reply| ClusterMessage::Local(Local::Admin { to, req, reply }), Some(timeout)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(ractor::rpc::CallResult::Timeout) => Err("timed out".into()),
            _ => Err("no answer".into()),
        }
    }

    /// Names of the live peers.
    pub fn peer_names(&self) -> Vec<Arc<str>> {
        self.peers.load().to_vec()
    }

    /// Send a frame to a node from outside the cluster actor.
    pub fn send(&self, to: &str, body: Body) {
        self.cast(Local::Send { to: to.to_string(), body: Box::new(body) });
    }

    pub fn join(&self, addr: String) {
        self.cast(Local::Join(addr));
    }

    /// Leave the cluster for good (see `Local::Depart`); returns how many peers acknowledged.
    pub async fn depart(&self) -> usize {
        match self.actor.load_full() {
            Some(a) => match a.ask(|r| ClusterMessage::Local(Local::Depart(r)), Some(Duration::from_secs(10))).await {
                Ok(ractor::rpc::CallResult::Success(n)) => n,
                _ => 0,
            },
            None => 0,
        }
    }

    pub async fn leave(&self) {
        if let Some(a) = self.actor.load_full() {
            let _ = a.ask(|r| ClusterMessage::Local(Local::Leave(r)), Some(Duration::from_secs(5))).await;
        }
    }

    /// Ask the client's registrar for ownership (bounded; alone or without an answer, the
    /// client is simply served here).
    pub async fn claim(&self, client: Arc<str>, clean: bool) -> Claimed {
        let Some(a) = self.actor.load_full() else { return Claimed::default() };
        match a.ask(|reply| ClusterMessage::Local(Local::Claim { client, clean, reply }), Some(CLAIM_HOLD + Duration::from_secs(2))).await {
            Ok(ractor::rpc::CallResult::Success(c)) => c,
            _ => Claimed::default(),
        }
    }

    pub fn claim_done(&self, client: Arc<str>, gen: u64) {
        self.cast(Local::ClaimDone { client, gen });
    }

    pub fn release(&self, client: Arc<str>, gen: u64, to: String) {
        self.cast(Local::Release { client, gen, to });
    }

    pub fn handed_over(&self, client: Arc<str>, gen: u64, registrar: String, clean: bool, state: Option<Box<SessionSnapshot>>) {
        self.cast(Local::HandedOver { client, gen, registrar, clean, state });
    }

    /// The node that owns `key` among this node and its live peers (rendezvous hash; ties go
    /// to the greater name, as for registrars), e.g. which node runs an alert rule.
    pub fn owner_of(&self, key: &str) -> Arc<str> {
        let mut best = (rendezvous(&self.name, key), self.name.clone());
        for n in self.peers.load().iter() {
            let sc = rendezvous(n, key);
            if sc > best.0 || (sc == best.0 && *n > best.1) {
                best = (sc, n.clone());
            }
        }
        best.1
    }

    /// The backup node of a session owned here: rendezvous hash over the live peers.
    pub fn backup_for(&self, client: &str) -> Option<Arc<str>> {
        self.peers.load().iter().max_by_key(|n| rendezvous(n, client)).cloned()
    }

    pub fn backup_state(&self, to: Arc<str>, client: Arc<str>, state: Box<SessionSnapshot>) {
        self.cast(Local::BackupState { to, client, state });
    }

    pub fn backup_append(&self, to: Arc<str>, client: Arc<str>, deliveries: Vec<Delivery>, tokens: Vec<Arc<DurableToken>>) {
        self.cast(Local::BackupAppend { to, client, deliveries, tokens });
    }

    pub fn backup_drop(&self, to: Arc<str>, client: Arc<str>) {
        self.cast(Local::BackupDrop { to, client });
    }

    pub fn flush(&self, client: Arc<str>, gen: u64, to: String, deliveries: Vec<Delivery>) {
        self.cast(Local::Flush { client, gen, to, deliveries });
    }

    pub fn disowned(&self, client: Arc<str>, gen: u64) {
        self.cast(Local::Disowned { client, gen });
    }

    /// Wait until every live peer has processed everything it sent this node before the call.
    pub async fn barrier(&self) {
        if let Some(a) = self.actor.load_full() {
            let _ = a.ask(|r| ClusterMessage::Local(Local::Barrier(r)), Some(Duration::from_secs(10))).await;
        }
    }

    /// Round-robin position for choosing among a shared group's nodes.
    pub fn next_pick(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    pub fn link(&self, n: NodeIdx) -> Option<Arc<Link>> {
        self.links.load().get(&n).cloned()
    }

    /// A forward for a lost node (still routed to while its sessions are adopted): park it.
    /// Returns false when `n` is not such a node.
    pub fn park(&self, n: NodeIdx, f: Forward, durable: Option<Arc<Durable>>) -> bool {
        let Some(dead) = self.ghosts.load().get(&n).cloned() else { return false };
        if f.msg.qos == crate::protocols::mqtt::QoS::AtMostOnce {
            return true; // at most once: not kept
        }
        if let Some(d) = &durable {
            d.add();
        }
        if let Ok(mut p) = self.parked.lock() {
            p.push(Parked { dead, forwards: vec![f], waiters: durable.into_iter().collect() });
        }
        true
    }

    /// Wait (bounded) while a peer's queue is above `high`: cross-node backpressure.
    pub async fn pace(&self, high: usize, max: Duration) {
        let congested = self.links.load().values().find(|l| l.depth() > high).cloned();
        if let Some(l) = congested {
            let _ = tokio::time::timeout(max, async {
                while l.depth() > high {
                    let n = l.drained.notified();
                    if l.depth() <= high {
                        break;
                    }
                    n.await;
                }
            })
            .await;
        }
    }
}

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
    /// Its route keys, and whether a persistent session subscribes to each.
    routes: HashMap<Arc<str>, bool>,
}

struct Dial {
    next_at: Instant,
    backoff: Duration,
    inflight: bool,
}

struct Pending {
    waiting: HashSet<Arc<str>>,
    reply: RpcReplyPort<()>,
    deadline: Instant,
}

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
    fn cfg(&self) -> &crate::config::ClusterConfig {
        &self.a.broker.config.cluster
    }

    fn me(&self) -> &str {
        &self.a.handle.name
    }

    fn send_cell(&self, cell: &ActorCell, body: &Body) {
        let bytes = wire::encode(self.me(), body);
        let r: ActorRef<ClusterMessage> = cell.clone().into();
        let _ = r.tell(ClusterMessage::Wire(bytes));
    }

    fn send(&self, to: &str, body: &Body) {
        if let Some(c) = self.members.get(to).and_then(|m| m.cell.as_ref()) {
            self.send_cell(c, body);
        }
    }

    fn broadcast(&self, body: &Body) {
        let bytes = wire::encode(self.me(), body);
        for m in self.members.values().filter(|m| m.up) {
            if let Some(c) = &m.cell {
                let r: ActorRef<ClusterMessage> = c.clone().into();
                let _ = r.tell(ClusterMessage::Wire(bytes.clone()));
            }
        }
    }

    /// Broadcast route additions and reply once every live peer has acknowledged them (bounded).
    fn acked_routes(&mut self, add: Vec<(Arc<str>, bool)>, reply: RpcReplyPort<()>) {
        self.broadcast_acked(|seq| Body::Routes { reset: false, add, del: vec![], ack: Some(seq) }, reply);
    }

    /// Broadcast `body(seq)` to the live peers and reply once each has acknowledged `seq`
    /// (`peer_acked`), went down, or `route_ack_timeout_ms` passed. Returns how many it waits for.
    fn broadcast_acked(&mut self, body: impl FnOnce(u64) -> Body, reply: RpcReplyPort<()>) -> usize {
        self.seq += 1;
        let seq = self.seq;
        let waiting: HashSet<Arc<str>> = self.members.values().filter(|m| m.up).map(|m| m.name.clone()).collect();
        self.broadcast(&body(seq));
        let n = waiting.len();
        if waiting.is_empty() {
            let _ = reply.send(());
        } else {
            let deadline = Instant::now() + Duration::from_millis(self.cfg().route_ack_timeout_ms);
            self.pending.insert(seq, Pending { waiting, reply, deadline });
        }
        n
    }

    /// `from` acknowledged the broadcast `seq`.
    fn peer_acked(&mut self, seq: u64, from: &str) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.waiting.remove(from);
            if p.waiting.is_empty() {
                if let Some(p) = self.pending.remove(&seq) {
                    let _ = p.reply.send(());
                }
            }
        }
    }

    /// Send to a node by name; to ourselves through our own mailbox (same code path).
    fn to(&self, node: &str, body: &Body) {
        if node == self.me() {
            if let Some(a) = self.a.handle.actor() {
                let _ = a.tell(ClusterMessage::Wire(wire::encode(self.me(), body)));
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
                    last_seen: Instant::now(),
                    up: false,
                    ghost: false,
                    routes: HashMap::new(),
                },
            );
        }
        self.members.get_mut(name).expect("inserted above")
    }

    async fn on_frame(&mut self, bytes: Vec<u8>) {
        let (from, body) = match wire::decode(&bytes) {
            Ok(x) => x,
            Err(e @ wire::WireError::Version { .. }) => {
                let key = e.to_string();
                if self.refused.insert(key.clone()) {
                    tracing::error!("refusing cluster peer: {key}");
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "dropping undecodable cluster frame");
                return;
            }
        };
        if let Some(m) = self.members.get_mut(from.as_str()) {
            m.last_seen = Instant::now();
        }
        match body {
            Body::Publish { batch, ack } => {
                let c = &self.a.handle;
                c.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                // Acknowledge once subscribers kept up (bounded) and persistent copies are on
                // their backups; the sender keeps only a few frames unacknowledged.
                let durable = Arc::new(Durable::default());
                let broker = self.a.broker.clone();
                let high = broker.high_water();
                let mut worst: Option<Arc<crate::actors::load::Load>> = None;
                for f in batch {
                    let scope = crate::broker::Scope::Remote { shared: &f.shared, adopted_from: f.adopted_from.as_deref() };
                    let (_, w) = broker.router.publish(f.msg, high, scope, Some(&durable));
                    if let Some(w) = w.filter(|w| worst.as_ref().is_none_or(|x| x.depth() < w.depth())) {
                        worst = Some(w);
                    }
                }
                let handle = self.a.handle.clone();
                if worst.is_none() && durable.is_done() {
                    self.to(&from, &Body::ForwardAck(ack));
                } else {
                    tokio::spawn(async move {
                        broker.wait_for(worst).await;
                        durable.wait(Duration::from_secs(5)).await;
                        handle.cast(Local::Send { to: from, body: Box::new(Body::ForwardAck(ack)) });
                    });
                }
            }
            Body::ForwardAck(seq) => {
                let idx = self.members.get(from.as_str()).map(|m| m.idx);
                if let Some(l) = idx.and_then(|i| self.a.handle.link(i)) {
                    l.acked(seq);
                }
            }
            Body::Hello { incarnation, addr, members, reply } => {
                if self.members.get(from.as_str()).and_then(|m| m.cell.as_ref()).is_none() {
                    self.resolve_cells().await;
                }
                let restarted = {
                    let m = self.member_mut(&from);
                    let restarted = m.incarnation != 0 && m.incarnation != incarnation;
                    m.incarnation = incarnation;
                    m.addr = addr;
                    restarted
                };
                if restarted {
                    self.down(&from, "restarted");
                }
                for (name, addr) in members {
                    if name != *self.me() && addr != self.a.advertise {
                        self.dials.entry(addr).or_insert(Dial { next_at: Instant::now(), backoff: Duration::ZERO, inflight: false });
                    }
                }
                if reply {
                    self.send(&from, &self.hello(false));
                }
                self.up(&from);
            }
            Body::Heartbeat { incarnation } => {
                let known = self.members.get(from.as_str()).map(|m| (m.up, m.incarnation));
                match known {
                    Some((true, inc)) if inc == incarnation => {}
                    _ => {
                        // A peer we consider down (or do not know yet) is alive: (re)introduce us.
                        if self.members.get(from.as_str()).and_then(|m| m.cell.as_ref()).is_none() {
                            self.resolve_cells().await;
                        }
                        self.send(&from, &self.hello(true));
                    }
                }
            }
            Body::Routes { reset, add, del, ack } => {
                if let Some(m) = self.members.get_mut(from.as_str()).filter(|m| m.up) {
                    if reset {
                        m.routes.clear();
                    }
                    for k in del {
                        m.routes.remove(&k);
                    }
                    m.routes.extend(add);
                    self.set_routes();
                }
                if let Some(seq) = ack {
                    self.send(&from, &Body::RouteAck(seq));
                }
            }
            Body::RouteAck(seq) => self.peer_acked(seq, &from),
            Body::Retained(entries) => {
                for e in entries {
                    self.apply_retained(e);
                }
            }
            Body::RetainedDigest(theirs) => {
                let theirs: HashMap<Arc<str>, Hlc> = theirs.into_iter().collect();
                let mine = self.digest();
                let newer: Vec<RetainedEntry> =
                    mine.into_iter().filter(|(t, h)| theirs.get(t).is_none_or(|th| th < h)).filter_map(|(t, _)| self.entry(&t)).collect();
                for chunk in newer.chunks(256) {
                    self.send(&from, &Body::Retained(chunk.to_vec()));
                }
            }
            Body::Leave { ack } => {
                self.send(&from, &Body::LeaveAck(ack));
                self.down(&from, "left the cluster");
            }
            Body::Departed => {
                if let Some(m) = self.members.get(from.as_str()) {
                    tracing::info!(node = %from, "node departs from the cluster (operator); no longer dialled");
                    let addr = m.addr.clone();
                    self.dials.remove(&addr);
                }
            }
            Body::AdminReply { id, ok, body } => {
                if let Some((reply, _)) = self.admin.remove(&id) {
                    let _ = reply.send(if ok { Ok(body) } else { Err(body) });
                }
            }
            Body::Trace { id, events } => self.a.broker.tracer.deliver(id, events),
            feature @ (Body::Admin { .. } | Body::LiveWant | Body::Live { .. } | Body::AlertEvent { .. } | Body::AlertEvents { .. }) => {
                if let Some(f) = self.a.handle.features.get() {
                    f.frame(Arc::from(from.as_str()), feature);
                }
            }
            Body::LeaveAck(seq) => self.peer_acked(seq, &from),
            Body::NotYours { client } => {
                if let Some(r) = self.a.broker.registry() {
                    let _ = r.tell(RegistryMessage::Discard(client));
                }
            }
            Body::Claim { client, req, clean } => self.on_claim(Arc::from(from.as_str()), client, req, clean),
            Body::Claimed { client: _, req, gen, from: prev, state } => {
                if let Some(c) = self.claims.remove(&req) {
                    let _ = c.reply.send(Claimed { gen, from: prev, state });
                }
            }
            Body::ClaimDone { client, gen } => {
                if self.registrar.get(&client).is_some_and(|r| r.gen == gen) {
                    self.next_claim(&client);
                }
            }
            Body::HandOver { client, gen, to, clean } => {
                let registrar = from.clone();
                let (broker, handle) = (self.a.broker.clone(), self.a.handle.clone());
                tokio::spawn(async move {
                    let state = match broker.registry() {
                        Some(r) => match r
                            .ask(
                                |reply| RegistryMessage::HandOver { client: client.clone(), gen, to, clean, reply },
                                Some(Duration::from_secs(5)),
                            )
                            .await
                        {
                            Ok(ractor::rpc::CallResult::Success(s)) => s,
                            _ => None,
                        },
                        None => None,
                    };
                    handle.handed_over(client, gen, registrar, clean, state);
                });
            }
            Body::HandedOver { client, gen, state, moving } => {
                let waiting = self.registrar.get_mut(&client).filter(|r| r.gen == gen).and_then(|r| r.waiting.take());
                if let Some((claimant, req, _)) = waiting {
                    let prev = moving.then(|| from.clone());
                    self.to(&claimant, &Body::Claimed { client, req, gen, from: prev, state });
                }
            }
            Body::Release { client, gen } => {
                if let Some(r) = self.a.broker.registry() {
                    let _ = r.tell(RegistryMessage::Release { client, gen });
                }
            }
            Body::Flush { client, gen, deliveries } => {
                if let Some(r) = self.a.broker.registry() {
                    let _ = r.tell(RegistryMessage::Flush { client, gen, deliveries });
                }
            }
            Body::Owned(entries) => {
                let owner: Arc<str> = Arc::from(from.as_str());
                let settled = self.settling.remove(from.as_str()) && self.settling.is_empty();
                for (client, gen) in entries {
                    let live = |n: &Arc<str>| &**n == self.me() || self.members.get(n).is_some_and(|m| m.up);
                    let current = self.registrar.get(&client).and_then(|r| r.owner.clone());
                    let current_live = current.as_ref().is_some_and(live);
                    let reg = self.registrar.entry(client.clone()).or_default();
                    if reg.owner.is_none() || reg.gen < gen || !current_live {
                        reg.owner = Some(owner.clone());
                        reg.gen = reg.gen.max(gen);
                        // A live copy elsewhere lost to a newer generation: it goes.
                        if let Some(old) = current.filter(|o| current_live && **o != *owner) {
                            self.to(&old, &Body::NotYours { client });
                        }
                    } else if current.as_deref() != Some(&*owner) && reg.busy_until.is_none() {
                        // A stale copy (e.g. restored from disk by a node that came back after its
                        // sessions were adopted elsewhere): one owner at a time.
                        self.to(&from, &Body::NotYours { client });
                    }
                }
                if settled {
                    self.settled();
                }
            }
            Body::BackupState { client, state } => {
                let owner: Arc<str> = Arc::from(from.as_str());
                self.replicas.insert(client, Replica { owner, state, log: Vec::new() });
            }
            Body::BackupAppend { client, deliveries, ack } => {
                let cap = self.a.broker.config.mqtt.max_queued * 4 + 1024;
                if let Some(r) = self.replicas.get_mut(&client).filter(|r| *r.owner == *from) {
                    let room = cap.saturating_sub(r.log.len());
                    r.log.extend(deliveries.into_iter().take(room));
                }
                self.to(&from, &Body::BackupAck(ack));
            }
            Body::BackupAck(seq) => {
                self.backup_waits.remove(&seq);
            }
            Body::Device(n) => {
                let _ = self.a.handle.notices.send(n);
            }
            Body::BackupDrop { client } => {
                if self.replicas.get(&client).is_some_and(|r| *r.owner == *from) {
                    self.replicas.remove(&client);
                }
            }
            Body::Disowned { client, gen } => {
                let gone = self
                    .registrar
                    .get(&client)
                    .is_some_and(|r| r.gen == gen && r.busy_until.is_none() && r.owner.as_deref() == Some(from.as_str()));
                if gone {
                    self.registrar.remove(&client);
                }
            }
        }
    }
}

/// ractor_cluster names peers `name@host`; ours is the part before `@`.
fn peer_name(full: &str) -> String {
    full.split('@').next().unwrap_or(full).to_string()
}

async fn forward_loop(me: Arc<str>, cell: ActorCell, mut rx: mpsc::UnboundedReceiver<(Forward, Option<Arc<Durable>>)>, link: Arc<Link>) {
    let (depth, drained) = (link.depth.clone(), link.drained.clone());
    let target: ActorRef<ClusterMessage> = cell.into();
    let batch_max = BATCH.min(link.batch_max).max(1);
    let mut batch = Vec::with_capacity(batch_max);
    let mut waiters = Vec::new();
    let mut seq = 0u64;
    while let Some((f, d)) = rx.recv().await {
        link.room().await;
        if link.closed.load(Ordering::Acquire) {
            batch.push(f);
            waiters.extend(d);
            break;
        }
        let mut bytes = f.msg.payload.len();
        batch.push(f);
        waiters.extend(d);
        while batch.len() < batch_max && bytes < BATCH_BYTES {
            match rx.try_recv() {
                Ok((f, d)) => {
                    bytes += f.msg.payload.len();
                    batch.push(f);
                    waiters.extend(d);
                }
                Err(_) => break,
            }
        }
        let n = batch.len();
        seq += 1;
        let ack = seq;
        // QoS 0 forwards are not kept for re-routing (at most once).
        let keep: Vec<Forward> = batch.iter().filter(|f| f.msg.qos != crate::protocols::mqtt::QoS::AtMostOnce).cloned().collect();
        if let Ok(mut m) = link.unacked.lock() {
            m.insert(seq, Parked { dead: link.name.clone(), forwards: keep, waiters: std::mem::take(&mut waiters) });
        }
        link.in_flight.fetch_add(1, Ordering::AcqRel);
        let frame = wire::encode(&me, &Body::Publish { batch: std::mem::take(&mut batch), ack });
        depth.fetch_sub(n, Ordering::Relaxed);
        drained.notify_waiters();
        if target.tell(ClusterMessage::Wire(frame)).is_err() {
            break;
        }
    }
    // The peer is gone: what was still queued is parked with the unacknowledged frames.
    while let Ok((f, d)) = rx.try_recv() {
        batch.push(f);
        waiters.extend(d);
    }
    batch.retain(|f| f.msg.qos != crate::protocols::mqtt::QoS::AtMostOnce);
    if let Ok(mut p) = link.parked.lock() {
        p.push(Parked { dead: link.name.clone(), forwards: batch, waiters });
    }
    link.close();
    depth.store(0, Ordering::Relaxed);
    drained.notify_waiters();
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
        me.send_interval(Duration::from_millis(cfg.heartbeat_ms.max(10)), || ClusterMessage::Local(Local::Tick));
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
        };
        st.local_routes = local_routes;
        // Peers already linked (a restart): introduce ourselves; they answer with their state.
        st.resolve_cells().await;
        Ok(st)
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMessage::Wire(bytes) => st.on_frame(bytes).await,
            ClusterMessage::Local(Local::Tick) => st.on_tick(),
            ClusterMessage::Local(Local::AddRoute { key, durable, reply }) => {
                st.local_routes.insert(key.clone(), durable);
                st.acked_routes(vec![(key, durable)], reply);
            }
            ClusterMessage::Local(Local::DelRoute(key)) => {
                if st.local_routes.remove(&key).is_some() {
                    st.broadcast(&Body::Routes { reset: false, add: vec![], del: vec![key], ack: None });
                }
            }
            ClusterMessage::Local(Local::Retained(msg)) => {
                let hlc = st.tick_clock();
                let topic = msg.topic.clone();
                let msg = if msg.payload.is_empty() {
                    st.retained.remove(&topic);
                    st.tombstones.insert(topic.clone(), (hlc, Instant::now()));
                    None
                } else {
                    st.tombstones.remove(&topic);
                    st.retained.insert(topic.clone(), hlc);
                    Some(msg)
                };
                st.broadcast(&Body::Retained(vec![RetainedEntry { topic, hlc, msg }]));
            }
            ClusterMessage::Local(Local::Dialed { addr, ok: _ }) => {
                if let Some(d) = st.dials.get_mut(&addr) {
                    d.inflight = false;
                }
            }
            ClusterMessage::Local(Local::Leave(reply)) => {
                let peers = st.broadcast_acked(|ack| Body::Leave { ack }, reply);
                tracing::info!(peers, "leaving the cluster");
            }
            ClusterMessage::Local(Local::Claim { client, clean, reply }) => {
                st.seq += 1;
                let req = st.seq;
                let registrar = st.registrar_of(&client);
                st.to(&registrar, &Body::Claim { client: client.clone(), req, clean });
                st.claims.insert(req, PendingClaim { reply, deadline: Instant::now() + CLAIM_HOLD, registrar, client, clean });
            }
            ClusterMessage::Local(Local::ClaimDone { client, gen }) => {
                let registrar = st.registrar_of(&client);
                st.to(&registrar, &Body::ClaimDone { client, gen });
            }
            ClusterMessage::Local(Local::Release { client, gen, to }) => st.to(&to, &Body::Release { client, gen }),
            ClusterMessage::Local(Local::HandedOver { client, gen, registrar, clean, state }) => {
                // No live session here: a replica (its owner died) serves instead.
                let moving = state.is_some();
                let replica = st.replicas.remove(&client);
                tracing::debug!(%client, has_state = state.is_some(), replica = ?replica.as_ref().map(|r| (r.log.len(), r.state.queue.len(), r.state.inflight.len(), r.state.subscriptions.len())), "hand-over answer");
                let state = match (state, replica) {
                    (Some(s), _) => Some(s),
                    (None, Some(r)) if !clean => Some(r.into_snapshot()),
                    _ => None,
                };
                st.to(&registrar, &Body::HandedOver { client, gen, state, moving });
            }
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
            ClusterMessage::Local(Local::Barrier(reply)) => st.acked_routes(vec![], reply),
            ClusterMessage::Local(Local::Owned(mut list)) => {
                // Our sessions, and replicas whose owner is gone (we answer for those now), to
                // their registrars; every live node gets an announcement, if only an empty one.
                list.extend(st.replicas.iter().filter(|(_, r)| !st.is_live(&r.owner)).map(|(c, _)| (c.clone(), 0)));
                let mut by: HashMap<Arc<str>, Vec<(Arc<str>, u64)>> = HashMap::new();
                for m in st.members.values().filter(|m| m.up) {
                    by.insert(m.name.clone(), Vec::new());
                }
                for (c, g) in list {
                    by.entry(st.registrar_of(&c)).or_default().push((c, g));
                }
                for (reg, entries) in by {
                    if entries.is_empty() {
                        st.to(&reg, &Body::Owned(Vec::new()));
                    }
                    for chunk in entries.chunks(4096) {
                        st.to(&reg, &Body::Owned(chunk.to_vec()));
                    }
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
                let mut v: Vec<MemberInfo> = st
                    .members
                    .values()
                    .map(|m| MemberInfo { name: m.name.to_string(), addr: m.addr.clone(), up: m.up, routes: m.routes.len(), idx: m.idx })
                    .collect();
                v.push(MemberInfo {
                    name: st.me().to_string(),
                    addr: st.a.advertise.clone(),
                    up: true,
                    routes: st.local_routes.len(),
                    idx: 0,
                });
                v.sort_by(|a, b| a.name.cmp(&b.name));
                let _ = reply.send(v);
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
                    if cells.iter().any(|c| !c.get_id().is_local()) {
                        st.resolve_cells().await;
                    }
                }
                ractor::pg::GroupChangeMessage::Leave(_, _, cells) => {
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
