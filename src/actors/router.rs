//! The router: the read side of the topic shards (`shard.rs` owns the write side). A publish
//! is matched against the immutable trie snapshots the shards publish — no lock, no actor
//! round-trip — and pushed into each matching session's inbox; copies for other nodes are
//! forwarded once per node with a match (`forward`), and a message that was on its way to a
//! lost node is re-routed to the sessions adopted from it (`reroute`).
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use ractor::{ActorId, ActorRef};

use crate::actors::load::Load;
use crate::actors::session::SessionMessage;
use crate::actors::shard::{filter_path, Node, ShardMessage, Sub};
use crate::cluster::routes::{NodeIdx, RouteNode};
use crate::cluster::wire::Forward;
use crate::cluster::Cluster;
use crate::message::{Delivery, Durable, DurableToken, Message};
use crate::protocols::mqtt::{topic, QoS};

/// Read side of the topic shards.
pub struct Router {
    pub shards: Vec<ArcSwapOption<ActorRef<ShardMessage>>>,
    pub snapshots: Vec<Arc<ArcSwap<Node>>>,
    /// Subscription changes read but not yet in the snapshots.
    pub pending: Arc<crate::actors::pending::Pending>,
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
    pub fn new(n: usize, inbox_cap: usize) -> Router {
        Router {
            inbox_cap,
            pending: Arc::default(),
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
        // A device's sessions are keyed `{number}\0{client id}`.
        let own_device = publisher.filter(|_| msg.not_to_own_device).and_then(|p| p.split_once('\0')).map(|(d, _)| d);
        let of_own_device = |client: &str| own_device.is_some_and(|d| client.strip_prefix(d).is_some_and(|r| r.starts_with('\0')));
        let mut visit = |node: &Node| {
            for (client, sub) in node.subs().iter() {
                let no_local = sub.opts.no_local && publisher == Some(&**client);
                if !(no_local || of_own_device(client)) {
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
                let (chosen, parked_for);
                (chosen, remote_n, parked_for) = forward(c, &msg, &levels, dollar, &groups, durable);
                for g in groups.iter().filter(|g| chosen.contains(&g.filter)) {
                    if let Some(sub) = g.pick(None) {
                        targets.push(target(sub, Some(g.filter.clone())));
                    }
                }
                // A copy parked for a lost node reaches the sessions adopted from it when it is
                // re-routed, behind the older ones parked before it: not directly, ahead of them.
                if !parked_for.is_empty() {
                    targets.retain(|t| t.load.adopted_from.get().is_none_or(|n| !parked_for.contains(n)));
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
            // Sessions adopted from `dead`, and sessions that took one over from its adopter
            // ("*": the copy may have been on its way to the session before it moved).
            targets.retain(|t| t.shared.is_none() && t.load.adopted_from.get().is_some_and(|n| &**n == dead || &**n == "*"));
        }
        let n = targets.len() + remote_n;
        let mut worst: Option<Arc<Load>> = None;
        for t in targets {
            // Every QoS>0 copy: the session answers for it (stored, or refused when its queue
            // is full), and a persistent session's copy waits for the state store.
            let durable = durable.filter(|_| t.qos != QoS::AtMostOnce).map(DurableToken::new);
            let d = Delivery {
                msg: msg.clone(),
                qos: t.qos,
                retain: t.retain,
                sub_ids: t.sub_ids,
                shared: t.shared,
                durable,
                seq: 0,
                stored: false,
            };
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
        let d = Delivery { qos: d.msg.qos.min(sub.opts.qos), sub_ids: sub.sub_id.into_iter().collect(), seq: 0, stored: false, ..d };
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
) -> (Vec<Arc<str>>, usize, Vec<Arc<str>>) {
    let table: Arc<RouteNode> = c.routes.load_full();
    if msg.topic.starts_with("$SYS") {
        return (local.iter().map(|g| g.filter.clone()).collect(), 0, Vec::new());
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
        for (k, set) in n.groups() {
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
    let mut parked_for = Vec::new();
    if !nodes.is_empty() {
        let links = c.links.load();
        for (idx, shared, must) in nodes {
            // Only copies for persistent sessions (or shared groups) hold the acknowledgement.
            let durable = durable.filter(|_| must).cloned();
            if let Some(l) = links.get(&idx) {
                l.send(Forward { msg: msg.clone(), shared, adopted_from: None }, durable);
                sent += 1;
            } else if let Some(dead) = c.park(idx, Forward { msg: msg.clone(), shared, adopted_from: None }, durable) {
                parked_for.push(dead);
                sent += 1;
            }
        }
        c.forwarded.fetch_add(sent as u64, std::sync::atomic::Ordering::Relaxed);
    }
    (mine, sent, parked_for)
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
