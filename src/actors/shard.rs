//! Topic shard actors: each owns part of the subscription index (a trie of filters) and publishes
//! an immutable snapshot after every change, so publishers match without locks or round-trips.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::session::SessionMessage;
use crate::cluster::Cluster;
use crate::protocols::mqtt::{topic, SubOptions};

/// One subscriber's entry under a filter.
#[derive(Clone, Debug)]
pub struct Sub {
    pub session: ActorRef<SessionMessage>,
    pub opts: SubOptions,
    pub sub_id: Option<u32>,
    /// The session's load gauge (online flag, queue depth) for routing and backpressure.
    pub load: Arc<super::load::Load>,
}

/// Members of one shared-subscription group under a filter.
#[derive(Clone, Debug, Default)]
pub struct Group {
    /// The full `$share/{group}/{filter}` this group was subscribed with.
    pub filter: Arc<str>,
    pub members: imbl::Vector<(Arc<str>, Sub)>,
    cursor: Arc<AtomicUsize>,
}

impl Group {
    /// Pick one member, round-robin, preferring online members; `skip` excludes one session.
    pub fn pick(&self, skip: Option<ActorId>) -> Option<&Sub> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for i in 0..n {
            let (_, s) = &self.members[(start + i) % n];
            if Some(s.session.get_id()) == skip || s.session.get_status() != ractor::ActorStatus::Running {
                continue;
            }
            if s.load.online.load(Ordering::Relaxed) {
                return Some(s);
            }
            fallback.get_or_insert(s);
        }
        fallback
    }
}

/// A persistent hash map keyed by topic levels and client ids, hashed with foldhash (SipHash,
/// the standard library's, was ~6 % of a node's CPU routing publishes). Seeded at random per
/// map, so clients that choose topic names cannot aim at collisions.
pub type Map<K, V> = imbl::GenericHashMap<K, V, foldhash::quality::RandomState, imbl::shared_ptr::DefaultSharedPtr>;

type Subs = Map<Arc<str>, Sub>;
type Groups = Map<Arc<str>, Group>;

/// What a node without subscribers or groups lends its readers (imbl allocates a full node even
/// for an empty map, so empty ones are not stored).
static NO_SUBS: std::sync::LazyLock<Subs> = std::sync::LazyLock::new(Subs::new);
static NO_GROUPS: std::sync::LazyLock<Groups> = std::sync::LazyLock::new(Groups::new);

/// A trie node; cloning is O(1) (persistent maps), which is what makes snapshots cheap. Every
/// device subscription is a path of these, so a node holds only the maps it uses (imbl
/// allocates a full node even for an empty map) and its children behind an `Arc` (a map slot
/// holds a pointer, not a node; a changed child is copied on write).
#[derive(Clone, Debug, Default)]
pub struct Node {
    children: Option<Map<Arc<str>, Arc<Node>>>,
    subs: Option<Subs>,
    groups: Option<Groups>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_none() && self.subs.is_none() && self.groups.is_none()
    }

    fn insert(&mut self, levels: &[&str], client: Arc<str>, group: Option<(&str, &str)>, sub: Sub) -> bool {
        match levels.split_first() {
            None => match group {
                None => self.subs.get_or_insert_with(Subs::new).insert(client, sub).is_some(),
                Some((g, full)) => {
                    let grp = self
                        .groups
                        .get_or_insert_with(Groups::new)
                        .entry(Arc::from(g))
                        .or_insert_with(|| Group { filter: Arc::from(full), ..Group::default() });
                    if let Some(i) = grp.members.iter().position(|(c, _)| *c == client) {
                        grp.members.set(i, (client, sub));
                        true
                    } else {
                        grp.members.push_back((client, sub));
                        false
                    }
                }
            },
            Some((first, rest)) => {
                let kids = self.children.get_or_insert_with(Default::default);
                Arc::make_mut(kids.entry(Arc::from(*first)).or_default()).insert(rest, client, group, sub)
            }
        }
    }

    fn remove(&mut self, levels: &[&str], client: &str, group: Option<&str>, owner: ActorId) -> bool {
        match levels.split_first() {
            None => match group {
                None => {
                    let Some(subs) = self.subs.as_mut() else { return false };
                    let removed = match subs.get(client) {
                        Some(s) if s.session.get_id() == owner => subs.remove(client).is_some(),
                        _ => false,
                    };
                    if subs.is_empty() {
                        self.subs = None;
                    }
                    removed
                }
                Some(g) => {
                    let Some(groups) = self.groups.as_mut() else { return false };
                    let Some(grp) = groups.get_mut(g) else { return false };
                    let Some(i) = grp.members.iter().position(|(c, s)| &**c == client && s.session.get_id() == owner) else {
                        return false;
                    };
                    grp.members.remove(i);
                    if grp.members.is_empty() {
                        groups.remove(g);
                    }
                    if groups.is_empty() {
                        self.groups = None;
                    }
                    true
                }
            },
            Some((first, rest)) => {
                let Some(kids) = self.children.as_mut() else { return false };
                let Some(child) = kids.get_mut(*first) else { return false };
                let child = Arc::make_mut(child);
                let removed = child.remove(rest, client, group, owner);
                if child.is_empty() {
                    kids.remove(*first);
                }
                if kids.is_empty() {
                    self.children = None;
                }
                removed
            }
        }
    }

    fn kids(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Node>)> {
        self.children.iter().flat_map(|c| c.iter())
    }

    /// Every subscription under this node: (filter, session key, entry, shared group).
    pub fn each<'a>(&'a self, path: &mut Vec<&'a str>, f: &mut impl FnMut(&str, &str, &Sub, Option<&str>)) {
        if !self.subs().is_empty() {
            let filter = path.join("/");
            for (c, s) in self.subs().iter() {
                f(&filter, c, s, None);
            }
        }
        for g in self.groups().values() {
            for (c, s) in g.members.iter() {
                f(&g.filter, c, s, Some(&g.filter));
            }
        }
        for (k, c) in self.kids() {
            path.push(k);
            c.each(path, f);
            path.pop();
        }
    }

    pub fn count(&self) -> usize {
        self.subs().len()
            + self.groups().values().map(|g| g.members.len()).sum::<usize>()
            + self.kids().map(|(_, c)| c.count()).sum::<usize>()
    }

    /// Visit every subscription entry matching the topic `levels`.
    pub fn visit<'a>(&'a self, levels: &[&str], first: bool, dollar: bool, f: &mut impl FnMut(&'a Node)) {
        topic::visit_matches(self, levels, first, dollar, f)
    }

    pub fn subs(&self) -> &Subs {
        self.subs.as_ref().unwrap_or(&NO_SUBS)
    }
    pub fn groups(&self) -> &Groups {
        self.groups.as_ref().unwrap_or(&NO_GROUPS)
    }

    /// Every route key under this node (filters with non-shared subscribers, `$share/g/…` keys),
    /// with whether a persistent session subscribes (as announced to the cluster).
    pub fn route_keys(&self, path: &mut Vec<Arc<str>>, out: &mut Vec<(Arc<str>, bool)>) {
        let filter = || path.iter().map(|l| &**l).collect::<Vec<&str>>().join("/");
        if !self.subs().is_empty() {
            out.push((Arc::from(filter()), self.subs().values().any(|s| s.load.persistent.load(Ordering::Relaxed))));
        }
        for g in self.groups().values() {
            out.push((g.filter.clone(), true));
        }
        for (k, c) in self.kids() {
            path.push(k.clone());
            c.route_keys(path, out);
            path.pop();
        }
    }

    /// The node at exactly `levels` (no wildcard matching).
    pub fn at(&self, levels: &[&str]) -> Option<&Node> {
        match levels.split_first() {
            None => Some(self),
            Some((first, rest)) => self.children.as_ref()?.get(*first)?.at(rest),
        }
    }
}

pub struct ShardActor;

pub enum ShardMessage {
    /// Add or replace a subscription; replies whether it already existed (once the other
    /// nodes acknowledged a new route). `inserted` is answered as soon as it is in this
    /// node's routes.
    Subscribe { client: Arc<str>, filter: String, sub: Sub, reply: RpcReplyPort<bool>, inserted: Option<RpcReplyPort<()>> },
    /// Remove `client`'s subscription if it is owned by `owner`; replies whether one was removed.
    Unsubscribe { client: Arc<str>, filter: String, owner: ActorId, reply: Option<RpcReplyPort<bool>> },
}

pub struct ShardState {
    root: Node,
    snapshot: Arc<ArcSwap<Node>>,
    cluster: Option<Arc<Cluster>>,
}

/// Whether this node has any subscriber for the route key (`filter`, or one shared group of it).
fn has_key(root: &Node, path: &[&str], group: Option<&str>) -> bool {
    root.at(path).is_some_and(|n| match group {
        None => !n.subs().is_empty(),
        Some(g) => n.groups().contains_key(g),
    })
}

/// Whether a persistent session subscribes to the route key (its forwards must be durable
/// before the publisher's acknowledgement). Shared groups always count as durable.
fn durable_key(root: &Node, path: &[&str], group: Option<&str>) -> bool {
    root.at(path).is_some_and(|n| match group {
        None => n.subs().values().any(|s| s.load.persistent.load(Ordering::Relaxed)),
        Some(g) => n.groups().contains_key(g),
    })
}

/// Split a (valid) filter into its trie path and optional shared group.
pub fn filter_path(filter: &str) -> (Option<&str>, Vec<&str>) {
    match topic::parse_shared(filter) {
        Some((g, f)) => (Some(g), f.split('/').collect()),
        None => (None, filter.split('/').collect()),
    }
}

impl Actor for ShardActor {
    type Msg = ShardMessage;
    type State = ShardState;
    type Arguments = (Arc<ArcSwap<Node>>, Option<Arc<Cluster>>);

    async fn pre_start(&self, _me: ActorRef<Self::Msg>, (snapshot, cluster): Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        // After a restart, resume from the last snapshot this shard published.
        let root = Node::clone(&snapshot.load());
        Ok(ShardState { root, snapshot, cluster })
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMessage::Subscribe { client, filter, sub, reply, inserted } => {
                let (group, path) = filter_path(&filter);
                let had = has_key(&st.root, &path, group);
                let was_durable = durable_key(&st.root, &path, group);
                let existed = st.root.insert(&path, client, group.map(|g| (g, filter.as_str())), sub);
                st.snapshot.store(Arc::new(st.root.clone()));
                if let Some(i) = inserted {
                    let _ = i.send(());
                }
                // The first subscriber of a key on this node (or its first persistent one):
                // other nodes must know the route before the SUBACK, so the reply waits for
                // their acknowledgement.
                let durable = durable_key(&st.root, &path, group);
                let announce = !had || (durable && !was_durable);
                match st.cluster.as_ref().filter(|_| announce).and_then(|c| c.add_route(Arc::from(filter.as_str()), durable)) {
                    Some(acked) => {
                        tokio::spawn(async move {
                            let _ = acked.await;
                            let _ = reply.send(existed);
                        });
                    }
                    None => {
                        let _ = reply.send(existed);
                    }
                }
            }
            ShardMessage::Unsubscribe { client, filter, owner, reply } => {
                let (group, path) = filter_path(&filter);
                let removed = st.root.remove(&path, &client, group, owner);
                if removed {
                    st.snapshot.store(Arc::new(st.root.clone()));
                    if let Some(c) = st.cluster.as_ref().filter(|_| !has_key(&st.root, &path, group)) {
                        c.del_route(Arc::from(filter.as_str()));
                    }
                }
                if let Some(r) = reply {
                    let _ = r.send(removed);
                }
            }
        }
        Ok(())
    }
}

impl topic::FilterTrie for Node {
    fn child(&self, level: &str) -> Option<&Node> {
        self.children.as_ref()?.get(level).map(|c| &**c)
    }
}

impl ractor::Message for ShardMessage {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_paths() {
        assert_eq!(filter_path("$share/g/a/+"), (Some("g"), vec!["a", "+"]));
        assert_eq!(filter_path("a/#"), (None, vec!["a", "#"]));
    }
}
