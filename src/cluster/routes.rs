//! Remote routes: for every filter some other node has subscribers for, which nodes. Nodes are
//! small integers ([`super::NodeIdx`]); the trie is persistent (imbl), so the cluster actor
//! publishes an O(1) snapshot after each change and publishers match without locks.
use std::sync::Arc;

use crate::actors::shard::filter_path;

pub type NodeIdx = u32;

/// A set of node indexes — a cluster has few nodes: a sorted vector, nothing allocated while
/// empty (imbl's sets allocate a full node even for one entry).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeSet(Vec<NodeIdx>);

impl NodeSet {
    pub fn insert(&mut self, n: NodeIdx) {
        if let Err(i) = self.0.binary_search(&n) {
            self.0.insert(i, n);
        }
    }

    pub fn remove(&mut self, n: &NodeIdx) {
        if let Ok(i) = self.0.binary_search(n) {
            self.0.remove(i);
        }
    }

    pub fn contains(&self, n: &NodeIdx) -> bool {
        self.0.binary_search(n).is_ok()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, NodeIdx> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One level of the route trie. Every route is a path of these (each device's command topic is
/// one), so a node costs nothing it does not use: children and shared groups only once there
/// are some, children behind an `Arc` (a map slot holds a pointer, not a whole node; a changed
/// child is copied on write).
#[derive(Clone, Debug, Default)]
pub struct RouteNode {
    children: Option<crate::actors::shard::Map<Arc<str>, Arc<RouteNode>>>,
    /// Nodes with non-shared subscribers of the filter ending here.
    pub nodes: NodeSet,
    /// Of those, nodes where a persistent session subscribes: forwards there are acknowledged
    /// only once durable (the others right away).
    pub durable: NodeSet,
    /// Shared groups (full `$share/g/filter` key) ending here → nodes with members.
    groups: Option<crate::actors::shard::Map<Arc<str>, NodeSet>>,
}

impl RouteNode {
    fn is_empty(&self) -> bool {
        self.children.is_none() && self.nodes.is_empty() && self.groups.is_none()
    }

    /// Shared groups ending here and the nodes with members.
    pub fn groups(&self) -> impl Iterator<Item = (&Arc<str>, &NodeSet)> {
        self.groups.iter().flat_map(|g| g.iter())
    }

    pub fn insert(&mut self, key: &Arc<str>, node: NodeIdx, durable: bool) {
        let (group, path) = filter_path(key);
        if path.len() > crate::protocols::mqtt::topic::MAX_LEVELS {
            // No client can subscribe so deep; a peer announcing it is not walked.
            tracing::warn!(len = key.len(), "route from a peer deeper than the node allows; ignored");
            return;
        }
        self.insert_at(&path, group.is_some().then(|| key.clone()), node, durable);
    }

    fn insert_at(&mut self, levels: &[&str], group: Option<Arc<str>>, node: NodeIdx, durable: bool) {
        match levels.split_first() {
            None => match group {
                None => {
                    self.nodes.insert(node);
                    if durable {
                        self.durable.insert(node);
                    } else {
                        self.durable.remove(&node);
                    }
                }
                Some(k) => {
                    self.groups.get_or_insert_with(Default::default).entry(k).or_default().insert(node);
                }
            },
            Some((first, rest)) => {
                let kids = self.children.get_or_insert_with(Default::default);
                Arc::make_mut(kids.entry(Arc::from(*first)).or_default()).insert_at(rest, group, node, durable)
            }
        }
    }

    pub fn remove(&mut self, key: &str, node: NodeIdx) {
        let (group, path) = filter_path(key);
        self.remove_at(&path, group.map(|_| key), node);
    }

    fn remove_at(&mut self, levels: &[&str], group: Option<&str>, node: NodeIdx) {
        match levels.split_first() {
            None => match group {
                None => {
                    self.nodes.remove(&node);
                    self.durable.remove(&node);
                }
                Some(k) => {
                    let Some(groups) = self.groups.as_mut() else { return };
                    if let Some(set) = groups.get_mut(k) {
                        set.remove(&node);
                        if set.is_empty() {
                            groups.remove(k);
                        }
                    }
                    if groups.is_empty() {
                        self.groups = None;
                    }
                }
            },
            Some((first, rest)) => {
                let Some(kids) = self.children.as_mut() else { return };
                let Some(child) = kids.get_mut(*first) else { return };
                let child = Arc::make_mut(child);
                child.remove_at(rest, group, node);
                if child.is_empty() {
                    kids.remove(*first);
                }
                if kids.is_empty() {
                    self.children = None;
                }
            }
        }
    }

    /// Visit every trie node whose filter matches the topic `levels` (same rules as the shards:
    /// `$` topics are not matched by a leading wildcard).
    pub fn visit<'a>(&'a self, levels: &[&str], first: bool, dollar: bool, f: &mut impl FnMut(&'a RouteNode)) {
        crate::protocols::mqtt::topic::visit_matches(self, levels, first, dollar, f)
    }

    /// Every route: (filter or `$share/…` key, nodes).
    pub fn entries(&self, path: &mut Vec<String>, out: &mut Vec<(String, Vec<NodeIdx>)>) {
        if !self.nodes.is_empty() {
            out.push((path.join("/"), self.nodes.iter().copied().collect()));
        }
        for (k, n) in self.groups() {
            out.push((k.to_string(), n.iter().copied().collect()));
        }
        for (k, c) in self.children.iter().flat_map(|c| c.iter()) {
            path.push(k.to_string());
            c.entries(path, out);
            path.pop();
        }
    }

    pub fn is_empty_table(&self) -> bool {
        self.is_empty()
    }
}

impl crate::protocols::mqtt::topic::FilterTrie for RouteNode {
    fn child(&self, level: &str) -> Option<&RouteNode> {
        self.children.as_ref()?.get(level).map(|c| &**c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::mqtt::topic;
    use proptest::prelude::*;

    fn matched(t: &RouteNode, topic: &str) -> (Vec<NodeIdx>, Vec<(String, Vec<NodeIdx>)>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut nodes = std::collections::BTreeSet::new();
        let mut groups = std::collections::BTreeMap::new();
        t.visit(&levels, true, topic.starts_with('$'), &mut |n| {
            nodes.extend(n.nodes.iter().copied());
            for (k, s) in n.groups() {
                groups.insert(k.to_string(), s.iter().copied().collect::<Vec<_>>());
            }
        });
        (nodes.into_iter().collect(), groups.into_iter().collect())
    }

    #[test]
    fn shared_and_plain() {
        let mut t = RouteNode::default();
        t.insert(&Arc::from("a/+"), 1, true);
        t.insert(&Arc::from("$share/g/a/#"), 2, false);
        t.insert(&Arc::from("$share/g/a/#"), 3, false);
        assert_eq!(matched(&t, "a/b"), (vec![1], vec![("$share/g/a/#".into(), vec![2, 3])]));
        t.remove("$share/g/a/#", 2);
        t.remove("a/+", 1);
        assert_eq!(matched(&t, "a/b"), (vec![], vec![("$share/g/a/#".into(), vec![3])]));
        t.remove("$share/g/a/#", 3);
        assert!(t.is_empty_table());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// Matching agrees with a linear scan using the topic matcher, after adds and removes.
        #[test]
        fn agrees_with_scan(
            ops in proptest::collection::vec((prop_oneof![Just("a"), Just("b"), Just("+"), Just("#"), Just("$s")], 1..4usize, 0..3u32, any::<bool>()), 0..30),
            topic in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("$s"), Just("")], 1..4).prop_map(|v| v.join("/")),
        ) {
            let mut t = RouteNode::default();
            let mut reference = std::collections::BTreeSet::new();
            for (lvl, n, node, add) in ops {
                let f = vec![lvl; n].join("/");
                if !topic::valid_filter(&f) { continue; }
                let key: Arc<str> = Arc::from(f.as_str());
                if add { t.insert(&key, node, false); reference.insert((f, node)); } else { t.remove(&key, node); reference.remove(&(f, node)); }
            }
            let want: std::collections::BTreeSet<NodeIdx> = reference.iter().filter(|(f, _)| topic::matches(f, &topic)).map(|(_, n)| *n).collect();
            prop_assert_eq!(matched(&t, &topic).0, want.into_iter().collect::<Vec<_>>());
        }
    }
}
