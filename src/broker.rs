//! The node's shared context: configuration, counters, and the read side of the actors'
//! snapshots (subscription index, retained set) that the hot path uses without round-trips.
use crate::actors::inspect::Tell;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::{ArcSwap, ArcSwapOption};
use ractor::{ActorId, ActorRef};

use crate::actors::load::Load;
use crate::actors::registry::RegistryMessage;
use crate::actors::retained::{RetainedMessage, RetainedSet};
use crate::actors::session::SessionMessage;
use crate::actors::shard::{filter_path, Node, ShardMessage, Sub};
use crate::cluster::routes::{NodeIdx, RouteNode};
use crate::cluster::wire::Forward;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::message::{Delivery, Durable, DurableToken, Message};
use crate::metrics::Metrics;
use crate::protocols::mqtt::{topic, QoS};
use crate::storage::local::LocalStore;

/// Everything a connection or actor of this node shares.
pub struct Broker {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub router: Router,
    pub retained: Arc<ArcSwap<RetainedSet>>,
    pub retained_actor: ArcSwapOption<ActorRef<RetainedMessage>>,
    pub registry: ArcSwapOption<ActorRef<RegistryMessage>>,
    pub store: Arc<LocalStore>,
    /// Set when clustering is enabled.
    pub cluster: std::sync::OnceLock<Arc<Cluster>>,
    pub started: Instant,
    /// Live packet traces (`thingsctl trace`).
    pub tracer: crate::actors::trace::Tracer,
    /// Every listener accepts (set once start-up is complete).
    pub serving: std::sync::atomic::AtomicBool,
    connect_bucket: std::sync::Mutex<(f64, Instant)>,
}

impl Broker {
    pub fn new(config: Arc<Config>, store: Arc<LocalStore>) -> Broker {
        let shards = config.mqtt.shards.max(1);
        let started = Instant::now();
        let connect_rate = config.mqtt.max_connect_rate as f64;
        let cluster = std::sync::OnceLock::new();
        if config.cluster.enabled {
            let _ = cluster.set(Arc::new(Cluster::new(&config.node.name)));
        }
        Broker {
            cluster,
            router: Router::new(shards, (config.mqtt.max_queued * 4).max(1024)),
            config,
            metrics: Metrics::default(),
            retained: Arc::new(ArcSwap::from_pointee(RetainedSet::default())),
            retained_actor: ArcSwapOption::empty(),
            registry: ArcSwapOption::empty(),
            store,
            started,
            tracer: Default::default(),
            serving: Default::default(),
            // The bucket starts full: a burst of `rate` connects, then `rate` per second.
            connect_bucket: std::sync::Mutex::new((connect_rate, started)),
        }
    }

    /// Take one token from the node's CONNECT rate bucket; false when the rate is exceeded.
    pub fn admit_connect(&self) -> bool {
        let rate = self.config.mqtt.max_connect_rate as f64;
        if rate == 0.0 {
            return true;
        }
        let Ok(mut b) = self.connect_bucket.lock() else { return true };
        let now = Instant::now();
        let (tokens, last) = *b;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(rate);
        if tokens >= 1.0 {
            *b = (tokens - 1.0, now);
            true
        } else {
            *b = (tokens, now);
            false
        }
    }

    /// Subscriptions on this node (each shared-group member counted), from the shard snapshots.
    pub fn subscription_count(&self) -> usize {
        self.router.snapshots.iter().map(|s| s.load().count()).sum()
    }

    pub fn registry(&self) -> Option<Arc<ActorRef<RegistryMessage>>> {
        self.registry.load_full()
    }

    /// Store (or delete, on an empty payload) a retained message; returns once the retained
    /// store has applied it, so a later SUBSCRIBE from anyone sees it.
    pub async fn retain(&self, msg: Arc<Message>) {
        let topic = msg.topic.clone();
        let msg_for_cluster = msg.clone();
        let applied = match self.retained_actor.load_full() {
            Some(r) => matches!(
                r.ask(|reply| RetainedMessage::Set(msg, reply), Some(std::time::Duration::from_secs(5))).await,
                Ok(ractor::rpc::CallResult::Success(()))
            ),
            None => false,
        };
        if !applied {
            // Only while the retained store restarts; the message is still routed to subscribers.
            tracing::warn!(%topic, "retained store unavailable; retained update not applied");
        } else if let Some(c) = self.cluster.get() {
            c.retained_changed(msg_for_cluster);
        }
    }

    /// Queue depth above which an online subscriber pauses its publishers: below the point
    /// where its queue would start dropping.
    pub fn high_water(&self) -> usize {
        let m = &self.config.mqtt;
        m.backpressure_high_water.min(m.max_queued / 2).max(1)
    }

    /// Route a message to every matching subscriber; returns how many sessions it was given to.
    pub fn publish(&self, msg: Arc<Message>) -> usize {
        self.router.publish(msg, usize::MAX, self.scope(), None).0
    }

    /// Route without waiting; in a cluster, a QoS>0 message also returns what its
    /// acknowledgement must wait for (see `publish_routed`).
    pub fn publish_durable(&self, msg: Arc<Message>) -> (usize, Option<Arc<Durable>>) {
        let durable = (self.cluster.get().is_some() && msg.qos != QoS::AtMostOnce).then(|| Arc::new(Durable::default()));
        let n = self.router.publish(msg, usize::MAX, self.scope(), durable.as_ref()).0;
        (n, durable)
    }

    /// Publishes from this node's clients reach the cluster; `$SYS` stays on its node.
    fn scope(&self) -> Scope<'_> {
        match self.cluster.get() {
            Some(c) => Scope::Cluster(c),
            None => Scope::Local,
        }
    }

    /// Route, then wait (bounded) while an online subscriber is congested: a fast publisher is
    /// slowed to its subscribers' pace instead of overflowing their queues. In a cluster, also
    /// wait until the message is durable (see `publish_routed`).
    pub async fn publish_with_backpressure(&self, msg: Arc<Message>) -> usize {
        let (n, durable) = self.publish_routed(msg).await;
        if let Some(d) = durable {
            Broker::wait_durable(&d).await;
        }
        n
    }

    /// Route with backpressure; in a cluster, a QoS>0 message also returns what its
    /// acknowledgement must wait for: every persistent session's copy on that session's backup
    /// node, and forwarded copies acknowledged by their nodes (which includes their backups).
    pub async fn publish_routed(&self, msg: Arc<Message>) -> (usize, Option<Arc<Durable>>) {
        let high = self.high_water();
        let durable = (self.cluster.get().is_some() && msg.qos != QoS::AtMostOnce).then(|| Arc::new(Durable::default()));
        let (n, worst) = self.router.publish(msg, high, self.scope(), durable.as_ref());
        self.wait_for(worst).await;
        if let Some(c) = self.cluster.get() {
            // Queued for a peer beyond the high-water mark: the publisher waits, as for a local
            // congested subscriber (frames in flight are bounded separately).
            c.pace(high, std::time::Duration::from_millis(self.config.mqtt.slow_subscriber_ms)).await;
        }
        (n, durable)
    }

    /// Wait (bounded) for a message to be durable; a timeout is logged and the caller goes on.
    pub async fn wait_durable(d: &Durable) {
        if !d.wait(std::time::Duration::from_secs(5)).await {
            tracing::warn!("replication to backup nodes timed out; acknowledging anyway");
        }
    }

    /// Wait (bounded) while an online subscriber of `topic` is congested.
    pub async fn pace(&self, topic: &str) {
        let worst = self.router.congested(topic, self.high_water());
        self.wait_for(worst).await;
    }

    pub async fn wait_for(&self, worst: Option<Arc<Load>>) {
        if let Some(load) = worst {
            load.wait_below(self.high_water(), std::time::Duration::from_millis(self.config.mqtt.slow_subscriber_ms)).await;
        }
    }
}

/// Read side of the topic shards.
pub struct Router {
    pub shards: Vec<ArcSwapOption<ActorRef<ShardMessage>>>,
    pub snapshots: Vec<Arc<ArcSwap<Node>>>,
    /// Hard bound of a session's delivery inbox (see `Load::push`).
    inbox_cap: usize,
}

fn fnv(s: &str) -> usize {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as usize
}

/// Keep in `worst` the most congested online subscriber above `high` seen so far.
fn keep_worst(worst: &mut Option<Arc<Load>>, l: &Arc<Load>, high: usize) {
    if l.congested(high) && worst.as_ref().is_none_or(|w| w.depth() < l.depth()) {
        *worst = Some(l.clone());
    }
}

/// Where a publish goes besides this node's subscribers.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// This node only.
    Local,
    /// Published here: also forward to nodes with matching routes.
    Cluster(&'a Cluster),
    /// Forwarded by another node: local subscribers, and of the shared groups only those named
    /// (the origin chose this node for them). With `adopted_from`, only sessions adopted
    /// from that lost node (a re-routed message).
    Remote { shared: &'a [Arc<str>], adopted_from: Option<&'a str> },
    /// A message that was on its way to the lost node `dead`: to the sessions adopted from it,
    /// here and on the other nodes.
    Reroute(&'a Cluster, &'a str),
}

struct Target {
    session: ActorRef<SessionMessage>,
    load: Arc<Load>,
    qos: QoS,
    retain: bool,
    sub_ids: Vec<u32>,
    shared: Option<Arc<str>>,
}

impl Router {
    fn new(n: usize, inbox_cap: usize) -> Router {
        Router {
            inbox_cap,
            shards: (0..=n).map(|_| ArcSwapOption::empty()).collect(),
            snapshots: (0..=n).map(|_| Arc::new(ArcSwap::from_pointee(Node::default()))).collect(),
        }
    }

    fn wildcard_shard(&self) -> usize {
        self.snapshots.len() - 1
    }

    fn shard_for_level(&self, first: &str) -> usize {
        fnv(first) % (self.snapshots.len() - 1)
    }

    /// Which shard owns a (valid) filter.
    pub fn shard_of_filter(&self, filter: &str) -> usize {
        let (_, path) = filter_path(filter);
        match path.first() {
            Some(&"+") | Some(&"#") => self.wildcard_shard(),
            Some(first) => self.shard_for_level(first),
            None => self.wildcard_shard(),
        }
    }

    pub fn shard(&self, i: usize) -> Option<Arc<ActorRef<ShardMessage>>> {
        self.shards.get(i).and_then(|s| s.load_full())
    }

    /// Route `msg`; returns the number of sessions it went to and the most congested online
    /// subscriber above `high` (the caller may wait for it: backpressure).
    pub fn publish(&self, msg: Arc<Message>, high: usize, scope: Scope<'_>, durable: Option<&Arc<Durable>>) -> (usize, Option<Arc<Load>>) {
        let topic_s: &str = &msg.topic;
        let levels: Vec<&str> = topic_s.split('/').collect();
        let dollar = topic_s.starts_with('$');
        let mut targets: Vec<Target> = Vec::new();
        let publisher = msg.publisher.as_deref();
        let target = |sub: &Sub, shared: Option<Arc<str>>| Target {
            session: sub.session.clone(),
            load: sub.load.clone(),
            qos: msg.qos.min(sub.opts.qos),
            retain: msg.retain && sub.opts.retain_as_published,
            sub_ids: sub.sub_id.into_iter().collect(),
            shared,
        };
        let mut groups: Vec<crate::actors::shard::Group> = Vec::new();
        let mut remote_n = 0;
        let mut visit = |node: &Node| {
            for (client, sub) in node.subs().iter() {
                if !(sub.opts.no_local && publisher == Some(&**client)) {
                    targets.push(target(sub, None));
                }
            }
            groups.extend(node.groups().values().cloned());
        };
        self.visit(&levels, dollar, &mut visit);
        match scope {
            Scope::Local => {
                for g in &groups {
                    if let Some(sub) = g.pick(None) {
                        targets.push(target(sub, Some(g.filter.clone())));
                    }
                }
            }
            Scope::Remote { adopted_from: Some(_), .. } => {}
            Scope::Reroute(c, dead) => {
                remote_n = reroute(c, &msg, &levels, dollar, dead, durable);
            }
            Scope::Remote { shared: names, adopted_from: None } => {
                for g in groups.iter().filter(|g| names.contains(&g.filter)) {
                    if let Some(sub) = g.pick(None) {
                        targets.push(target(sub, Some(g.filter.clone())));
                    }
                }
            }
            Scope::Cluster(c) => {
                let chosen;
                (chosen, remote_n) = forward(c, &msg, &levels, dollar, &groups, durable);
                for g in groups.iter().filter(|g| chosen.contains(&g.filter)) {
                    if let Some(sub) = g.pick(None) {
                        targets.push(target(sub, Some(g.filter.clone())));
                    }
                }
            }
        }
        if targets.len() > 1 {
            // One delivery per session for overlapping non-shared subscriptions: highest QoS, all ids.
            targets.sort_by_key(|t| (t.shared.is_some(), t.session.get_id()));
            targets.dedup_by(|b, a| {
                if a.shared.is_none() && b.shared.is_none() && a.session.get_id() == b.session.get_id() {
                    a.qos = a.qos.max(b.qos);
                    a.retain |= b.retain;
                    a.sub_ids.append(&mut b.sub_ids);
                    true
                } else {
                    false
                }
            });
        }
        if let Scope::Reroute(_, dead) | Scope::Remote { adopted_from: Some(dead), .. } = scope {
            targets.retain(|t| t.shared.is_none() && t.load.adopted_from.get().is_some_and(|n| &**n == dead));
        }
        let n = targets.len() + remote_n;
        let mut worst: Option<Arc<Load>> = None;
        for t in targets {
            let durable = durable
                .filter(|_| t.qos != QoS::AtMostOnce && t.load.persistent.load(std::sync::atomic::Ordering::Relaxed))
                .map(DurableToken::new);
            let d = Delivery { msg: msg.clone(), qos: t.qos, retain: t.retain, sub_ids: t.sub_ids, shared: t.shared, durable };
            if t.load.push(&t.session, d, self.inbox_cap) {
                keep_worst(&mut worst, &t.load, high);
            }
        }
        (n, worst)
    }

    /// Visit every trie node whose filters match the topic `levels`: the topic's own shard, and the
    /// wildcard shard unless the topic starts with `$`.
    fn visit(&self, levels: &[&str], dollar: bool, f: &mut impl FnMut(&Node)) {
        let first = levels.first().copied().unwrap_or("");
        let snap = self.snapshots[self.shard_for_level(first)].load();
        snap.visit(levels, true, dollar, &mut |n| f(n));
        if !dollar {
            let snap = self.snapshots[self.wildcard_shard()].load();
            snap.visit(levels, true, dollar, &mut |n| f(n));
        }
    }

    /// Client ids of this node's sessions subscribed to `topic` (shared groups excluded).
    pub fn local_subscribers(&self, topic: &str) -> Vec<Arc<str>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        self.visit(&levels, topic.starts_with('$'), &mut |n: &Node| out.extend(n.subs().keys().cloned()));
        out
    }

    /// The most congested online subscriber of `topic` above `high`, if any (for publishes that
    /// are routed elsewhere, e.g. QoS 2 by the publisher's session, but paced by the connection).
    pub fn congested(&self, topic: &str, high: usize) -> Option<Arc<Load>> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut worst: Option<Arc<Load>> = None;
        self.visit(&levels, topic.starts_with('$'), &mut |node| {
            for sub in node.subs().values() {
                keep_worst(&mut worst, &sub.load, high);
            }
            for grp in node.groups().values() {
                for (_, sub) in grp.members.iter() {
                    keep_worst(&mut worst, &sub.load, high);
                }
            }
        });
        worst
    }

    /// Give a shared-subscription delivery to another member of its group (not `skip`).
    /// Returns false when no other member exists.
    pub fn redeliver_shared(&self, d: Delivery, skip: ActorId) -> bool {
        let Some(filter) = d.shared.clone() else { return false };
        if !topic::valid_filter(&filter) {
            return false;
        }
        let (group, path) = filter_path(&filter);
        let Some(group) = group else { return false };
        let snap = self.snapshots[self.shard_of_filter(&filter)].load();
        let Some(sub) = snap.at(&path).and_then(|n| n.groups().get(group)).and_then(|g| g.pick(Some(skip))) else {
            return false;
        };
        let d = Delivery { qos: d.msg.qos.min(sub.opts.qos), sub_ids: sub.sub_id.into_iter().collect(), ..d };
        sub.load.push(&sub.session, d, self.inbox_cap)
    }
}

/// Forward `msg` to every node with a matching route, choosing one node per shared group
/// (this one included, when it has members: `local`). Returns the local groups chosen here.
fn forward(
    c: &Cluster,
    msg: &Arc<Message>,
    levels: &[&str],
    dollar: bool,
    local: &[crate::actors::shard::Group],
    durable: Option<&Arc<Durable>>,
) -> (Vec<Arc<str>>, usize) {
    let table: Arc<RouteNode> = c.routes.load_full();
    if msg.topic.starts_with("$SYS") {
        return (local.iter().map(|g| g.filter.clone()).collect(), 0);
    }
    // (node, shared groups it serves for this message, whether its copy must be durable first)
    let mut nodes: Vec<(NodeIdx, Vec<Arc<str>>, bool)> = Vec::new();
    let mut remote_groups: Vec<(Arc<str>, Vec<NodeIdx>)> = Vec::new();
    table.visit(levels, true, dollar, &mut |n| {
        for idx in n.nodes.iter() {
            let durable = n.durable.contains(idx);
            match nodes.iter_mut().find(|(i, _, _)| i == idx) {
                Some(e) => e.2 |= durable,
                None => nodes.push((*idx, Vec::new(), durable)),
            }
        }
        for (k, set) in n.groups.iter() {
            remote_groups.push((k.clone(), set.iter().copied().collect()));
        }
    });
    let mut mine: Vec<Arc<str>> = Vec::new();
    for g in local {
        if !remote_groups.iter().any(|(k, _)| *k == g.filter) {
            mine.push(g.filter.clone());
        }
    }
    for (key, members) in remote_groups {
        let here = local.iter().any(|g| g.filter == key) as usize;
        let pick = c.next_pick() % (members.len() + here);
        if pick < here {
            mine.push(key);
            continue;
        }
        let idx = members[pick - here];
        match nodes.iter_mut().find(|(i, _, _)| *i == idx) {
            Some((_, v, d)) => {
                v.push(key);
                *d = true;
            }
            None => nodes.push((idx, vec![key], true)),
        }
    }
    let mut sent = 0;
    if !nodes.is_empty() {
        let links = c.links.load();
        for (idx, shared, must) in nodes {
            // Only copies for persistent sessions (or shared groups) hold the acknowledgement.
            let durable = durable.filter(|_| must).cloned();
            if let Some(l) = links.get(&idx) {
                l.send(Forward { msg: msg.clone(), shared, adopted_from: None }, durable);
                sent += 1;
            } else if c.park(idx, Forward { msg: msg.clone(), shared, adopted_from: None }, durable) {
                sent += 1;
            }
        }
        c.forwarded.fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
    }
    (mine, sent)
}

/// Forward a re-routed message (it was on its way to the lost node `dead`) to every node with a
/// matching route; each delivers it only to sessions adopted from `dead`.
fn reroute(c: &Cluster, msg: &Arc<Message>, levels: &[&str], dollar: bool, dead: &str, durable: Option<&Arc<Durable>>) -> usize {
    let table: Arc<RouteNode> = c.routes.load_full();
    let mut nodes: Vec<NodeIdx> = Vec::new();
    table.visit(levels, true, dollar, &mut |n| {
        for idx in n.nodes.iter() {
            if !nodes.contains(idx) {
                nodes.push(*idx);
            }
        }
    });
    let links = c.links.load();
    let dead: Arc<str> = Arc::from(dead);
    let mut sent = 0;
    for idx in nodes {
        if let Some(l) = links.get(&idx) {
            l.send(Forward { msg: msg.clone(), shared: vec![], adopted_from: Some(dead.clone()) }, durable.cloned());
            sent += 1;
        }
    }
    sent
}
