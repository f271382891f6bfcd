//! The node's handle on the cluster (`Cluster`, shared through the broker): routes and peers'
//! snapshots, per-peer publish links (`Link`, drained in batches by `forward_loop`), forwards
//! parked for a lost node, and the calls actors make into the cluster actor.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use ractor::{ActorCell, ActorRef};
use ractor_cluster::NodeServerMessage;
use tokio::sync::{broadcast, mpsc, Notify};

use super::*;

/// One peer's outgoing publish queue, drained in batches by a task.
pub struct Link {
    pub name: Arc<str>,
    pub(super) tx: mpsc::UnboundedSender<(Forward, Option<Arc<Durable>>)>,
    pub(super) depth: Arc<AtomicUsize>,
    pub(super) drained: Arc<Notify>,
    /// Frames sent and not yet acknowledged (their forwards, and the publishers waiting for
    /// them), by frame number: if the peer dies they are re-routed, not forgotten.
    pub(super) unacked: std::sync::Mutex<HashMap<u64, Parked>>,
    /// Frames sent and not yet acknowledged, and a wake-up when one is.
    pub(super) in_flight: AtomicUsize,
    pub(super) credit: Notify,
    /// The peer is down: the sender task parks what is left and stops.
    pub(super) closed: std::sync::atomic::AtomicBool,
    /// Forwards per frame at most (the backpressure high-water mark).
    pub(super) batch_max: usize,
    /// Forwards queued at most before new ones nobody waits for are dropped (see `send`).
    pub(super) cap: usize,
    pub(super) dropped: Arc<AtomicU64>,
    pub(super) parked: Arc<std::sync::Mutex<Vec<Parked>>>,
    /// The wire version agreed with the peer (its member's; it changes while the link lives).
    pub(super) wire: Arc<std::sync::atomic::AtomicU16>,
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

    pub(super) fn acked(&self, batch: u64) {
        let frame = self.unacked.lock().ok().and_then(|mut m| m.remove(&batch));
        for d in frame.into_iter().flat_map(|p| p.waiters) {
            d.done();
        }
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        self.credit.notify_one();
    }

    /// Wait (bounded) for room among the frames in flight.
    pub(super) async fn room(&self) {
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
    pub(super) fn close(&self) {
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
    /// This node is stopping (`drain`): work it owned by rendezvous goes to the others.
    pub draining: std::sync::atomic::AtomicBool,
    /// The running cluster actor (replaced when the supervisor restarts it).
    pub(super) actor: arc_swap::ArcSwapOption<ActorRef<ClusterMessage>>,
    /// What the cluster actor is (re)started with: NodeServer, advertised address, link TLS.
    pub(super) setup: OnceLock<(ActorRef<NodeServerMessage>, String, Option<net::LinkTls>)>,
    pub(super) cursor: AtomicUsize,
    /// Names of the live peers (for backup choice without a round-trip).
    pub(super) peers: ArcSwap<Vec<Arc<str>>>,
    /// Lost nodes whose routes are kept until their sessions are adopted elsewhere
    /// (publishes matching them are parked, then re-routed to the adopted sessions).
    pub(super) ghosts: ArcSwap<HashMap<NodeIdx, Arc<str>>>,
    pub(super) parked: Arc<std::sync::Mutex<Vec<Parked>>>,
    /// The node's feature frame handler (set once at start-up; frames before it are dropped).
    pub(super) features: OnceLock<Arc<dyn Features>>,
    /// Route changes and retained updates waiting for the cluster actor, which takes all of
    /// them at once (`Local::Outbox`): a burst — a fleet reconnecting, a node announcing its
    /// devices' status — goes out as a few frames per peer, not one frame (and one
    /// acknowledgement) per subscription or status message.
    pub(super) outbox: std::sync::Mutex<Outbox>,
}

#[derive(Default)]
pub(super) struct Outbox {
    pub(super) routes: Vec<RouteOp>,
    pub(super) retained: Vec<Arc<Message>>,
    /// A `Local::Outbox` is in the cluster actor's mailbox.
    pub(super) scheduled: bool,
}

/// A change of this node's routes, in the order the shards made them.
pub(super) enum RouteOp {
    Add(Arc<str>, bool, RpcReplyPort<()>),
    Del(Arc<str>),
}

/// Rendezvous (highest random weight) score of `node` for `client`: the live node with the
/// highest score is the client's registrar (public for tests that need a given layout).
pub fn rendezvous(node: &str, client: &str) -> u64 {
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
            draining: std::sync::atomic::AtomicBool::new(false),
            received: AtomicU64::new(0),
            actor: arc_swap::ArcSwapOption::empty(),
            setup: OnceLock::new(),
            cursor: AtomicUsize::new(0),
            peers: ArcSwap::from_pointee(Vec::new()),
            ghosts: ArcSwap::from_pointee(HashMap::new()),
            parked: Default::default(),
            features: OnceLock::new(),
            outbox: Default::default(),
        }
    }

    /// Queue a route change or retained update for the cluster actor, waking it if it was not
    /// already due to take the queue. False if there is no running actor (a restarted one
    /// takes what is queued when it starts).
    fn enqueue(&self, put: impl FnOnce(&mut Outbox)) -> bool {
        let Some(a) = self.actor.load_full() else { return false };
        let mut o = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        put(&mut o);
        if !o.scheduled {
            o.scheduled = a.tell(ClusterMessage::Local(Local::Outbox)).is_ok();
        }
        true
    }

    /// What is queued for the cluster actor (it is no longer due to take it).
    pub(super) fn take_outbox(&self) -> (Vec<RouteOp>, Vec<Arc<Message>>) {
        let mut o = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
        o.scheduled = false;
        (std::mem::take(&mut o.routes), std::mem::take(&mut o.retained))
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

    pub(super) fn cast(&self, l: Local) {
        if let Some(a) = self.actor.load_full() {
            let _ = a.tell(ClusterMessage::Local(l));
        }
    }

    /// Announce a new local route; the receiver fires once every live peer has it (bounded by
    /// `route_ack_timeout_ms`). Queued at once, so announcements keep the caller's order.
    pub fn add_route(&self, key: Arc<str>, durable: bool) -> Option<ractor::concurrency::OneshotReceiver<()>> {
        let (tx, rx) = ractor::concurrency::oneshot();
        self.enqueue(|o| o.routes.push(RouteOp::Add(key, durable, tx.into()))).then_some(rx)
    }

    /// Tell every live peer about a device change.
    pub fn device_notice(&self, n: wire::DeviceNotice) {
        self.cast(Local::Notice(n));
    }

    pub fn del_route(&self, key: Arc<str>) {
        self.enqueue(|o| o.routes.push(RouteOp::Del(key)));
    }

    pub fn retained_changed(&self, msg: Arc<Message>) {
        if !msg.topic.starts_with("$SYS") {
            self.enqueue(|o| o.retained.push(msg));
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

    /// A graceful stop begins: the peers take over this node's registrar, backup and
    /// ownership duties before its clients are disconnected (bounded wait for them).
    pub async fn drain(&self) {
        if let Some(a) = self.actor.load_full() {
            let _ = a.ask(|r| ClusterMessage::Local(Local::Drain(r)), Some(Duration::from_secs(5))).await;
        }
    }

    pub async fn leave(&self) {
        if let Some(a) = self.actor.load_full() {
            let _ = a.ask(|r| ClusterMessage::Local(Local::Leave(r)), Some(Duration::from_secs(5))).await;
        }
    }

    /// Close the links (the NodeServer and its sessions) once the node has left: it is not
    /// linked to the node's supervisor, and a stopping node waits for every actor name to be
    /// free (without this, 5 s of every cluster node's shutdown — a rolling restart's cost).
    pub fn stop_links(&self) {
        if let Some((ns, _, _)) = self.setup.get() {
            ns.stop(Some("node stopping".into()));
        }
    }

    /// Ask the client's registrar for ownership (bounded; alone or without an answer, the
    /// client is simply served here).
    pub async fn claim(&self, client: Arc<str>, clean: bool) -> Claimed {
        let Some(a) = self.actor.load_full() else { return Claimed::default() };
        match a.ask(|reply| ClusterMessage::Local(Local::Claim { client, clean, reply }), Some(CLAIM_HOLD + Duration::from_secs(4))).await {
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

    /// The registry's answer to a `HandOver`.
    pub fn handed_over(&self, answer: HandOverAnswer) {
        self.cast(Local::HandedOver(answer));
    }

    /// The live peers (this node not included), as a shared snapshot.
    pub fn live_peers(&self) -> Arc<Vec<Arc<str>>> {
        self.peers.load_full()
    }

    /// The node that owns `key` among this node and its live peers (rendezvous hash; ties go
    /// to the greater name, as for registrars), e.g. which node runs an alert rule.
    /// A draining node owns nothing while another node is up.
    pub fn owner_of(&self, key: &str) -> Arc<str> {
        let peers = self.peers.load();
        let me_too = !self.draining.load(Ordering::Relaxed) || peers.is_empty();
        let mut best: Option<(u64, Arc<str>)> = me_too.then(|| (rendezvous(&self.name, key), self.name.clone()));
        for n in peers.iter() {
            let sc = rendezvous(n, key);
            if best.as_ref().is_none_or(|(b, bn)| sc > *b || (sc == *b && n > bn)) {
                best = Some((sc, n.clone()));
            }
        }
        best.map_or_else(|| self.name.clone(), |b| b.1)
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
    /// Returns the lost node's name, or `None` when `n` is not such a node.
    pub fn park(&self, n: NodeIdx, f: Forward, durable: Option<Arc<Durable>>) -> Option<Arc<str>> {
        let dead = self.ghosts.load().get(&n).cloned()?;
        if f.msg.qos == crate::protocols::mqtt::QoS::AtMostOnce {
            return Some(dead); // at most once: not kept
        }
        if let Some(d) = &durable {
            d.add();
        }
        if let Ok(mut p) = self.parked.lock() {
            p.push(Parked { dead: dead.clone(), forwards: vec![f], waiters: durable.into_iter().collect() });
        }
        Some(dead)
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

pub(super) async fn forward_loop(
    me: Arc<str>,
    cell: ActorCell,
    mut rx: mpsc::UnboundedReceiver<(Forward, Option<Arc<Durable>>)>,
    link: Arc<Link>,
) {
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
        let frame = wire::encode(link.wire.load(Ordering::Relaxed), &me, &Body::Publish { batch: std::mem::take(&mut batch), ack });
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
