//! The retained store: owns the node's retained messages and publishes an immutable snapshot
//! that SUBSCRIBE handling reads.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::message::{now_ms, Message};

/// One level of the retained-topic trie. Persistent maps make a snapshot an O(1) clone. As in
/// the subscription trie (`shard::Node`), a node without children holds no map (imbl allocates
/// a full node, ~2 KiB here, even for an empty one: every device's status message is a leaf)
/// and children sit behind an `Arc` (a map slot holds a pointer; a changed child is copied on
/// write). The map is boxed: a leaf (every device's status message is one) would otherwise
/// carry its ~32 bytes of room.
#[derive(Clone, Default)]
struct RNode {
    children: Option<Box<super::shard::Map<Arc<str>, Arc<RNode>>>>,
    msg: Option<Arc<Message>>,
}

// Two pointers: a node's size is paid once per retained topic (one per device).
const _: () = assert!(std::mem::size_of::<RNode>() <= 16);

impl RNode {
    fn is_empty(&self) -> bool {
        self.msg.is_none() && self.children.is_none()
    }

    fn kids(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<RNode>)> {
        self.children.iter().flat_map(|m| m.iter())
    }

    fn child(&self, level: &str) -> Option<&RNode> {
        self.children.as_ref()?.get(level).map(|c| &**c)
    }

    /// Set or clear the message at `levels`; returns the message it replaced.
    fn set(&mut self, levels: &[&str], msg: Option<Arc<Message>>) -> Option<Arc<Message>> {
        match levels.split_first() {
            None => std::mem::replace(&mut self.msg, msg),
            Some((first, rest)) => {
                if msg.is_none() {
                    let kids = self.children.as_mut()?;
                    let child = Arc::make_mut(kids.get_mut(*first)?);
                    let old = child.set(rest, None);
                    if child.is_empty() {
                        kids.remove(*first);
                        if kids.is_empty() {
                            self.children = None;
                        }
                    }
                    return old;
                }
                let kids = self.children.get_or_insert_with(Default::default);
                Arc::make_mut(kids.entry(Arc::from(*first)).or_default()).set(rest, msg)
            }
        }
    }

    fn all(&self, out: &mut Vec<Arc<Message>>) {
        out.extend(self.msg.iter().cloned());
        for (_, c) in self.kids() {
            c.all(out);
        }
    }

    /// Collect messages whose topic matches the filter `levels` (MQTT rules: `$` topics are not
    /// matched by a wildcard in the first level).
    fn matching(&self, levels: &[&str], first: bool, out: &mut Vec<Arc<Message>>) {
        let Some((lvl, rest)) = levels.split_first() else {
            out.extend(self.msg.iter().cloned());
            return;
        };
        match *lvl {
            "#" => {
                // `a/#` also matches `a` itself.
                out.extend(self.msg.iter().filter(|_| !first).cloned());
                for (k, c) in self.kids() {
                    if !(first && k.starts_with('$')) {
                        c.all(out);
                    }
                }
            }
            "+" => {
                for (k, c) in self.kids() {
                    if !(first && k.starts_with('$')) {
                        c.matching(rest, false, out);
                    }
                }
            }
            literal => {
                if let Some(c) = self.child(literal) {
                    c.matching(rest, false, out);
                }
            }
        }
    }
}

/// Immutable view of the retained messages: a trie by topic level, so a wildcard SUBSCRIBE visits
/// only the matching branches.
#[derive(Clone, Default)]
pub struct RetainedSet {
    root: RNode,
    len: usize,
    /// Grows on every change; the persister writes when it moved.
    pub version: u64,
}

impl RetainedSet {
    /// Set (or, with an empty payload, delete) the retained message of its topic.
    pub fn apply(&mut self, m: Arc<Message>) {
        let topic = m.topic.clone();
        if crate::protocols::mqtt::topic::levels(&topic) > crate::protocols::mqtt::topic::MAX_LEVELS {
            // Clients are refused such topics at PUBLISH/CONNECT; this guards what peers and
            // old state files bring.
            tracing::warn!(len = topic.len(), "retained message with a topic deeper than the node allows; ignored");
            return;
        }
        let levels: Vec<&str> = topic.split('/').collect();
        let new = if m.payload.is_empty() { None } else { Some(m) };
        let adding = new.is_some();
        match (self.root.set(&levels, new).is_some(), adding) {
            (false, true) => self.len += 1,
            (true, false) => self.len -= 1,
            _ => {}
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every retained message.
    pub fn messages(&self) -> Vec<Arc<Message>> {
        let mut out = Vec::with_capacity(self.len);
        self.root.all(&mut out);
        out
    }

    /// The retained messages worth keeping across a restart (not the regenerated `$SYS` ones).
    pub fn durable_messages(&self) -> Vec<Arc<Message>> {
        let mut out = Vec::with_capacity(self.len);
        for (k, c) in self.root.kids() {
            if &**k != "$SYS" {
                c.all(&mut out);
            }
        }
        out
    }

    /// The retained message of exactly `topic`.
    pub fn get(&self, topic: &str) -> Option<Arc<Message>> {
        let mut n = &self.root;
        for l in topic.split('/') {
            n = n.child(l)?;
        }
        n.msg.clone()
    }

    /// Retained messages matching a (valid, non-shared) filter, unexpired.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        self.root.matching(&levels, true, &mut out);
        let now = now_ms();
        out.retain(|m| !m.expired(now));
        out
    }

    /// Remove expired messages; returns their topics.
    fn sweep(&mut self, now: u64) -> Vec<Arc<str>> {
        let expired: Vec<Arc<str>> = self.messages().into_iter().filter(|m| m.expired(now)).map(|m| m.topic.clone()).collect();
        for t in &expired {
            let levels: Vec<&str> = t.split('/').collect();
            if self.root.set(&levels, None).is_some() {
                self.len -= 1;
            }
        }
        expired
    }
}

pub struct RetainedActor;

pub enum RetainedMessage {
    /// Set (or, with an empty payload, delete) the retained message of each topic, in order.
    Set(Vec<Arc<Message>>, RpcReplyPort<()>),
    /// Drop expired messages.
    Sweep,
    Count(RpcReplyPort<usize>),
}

pub struct RetainedState {
    set: RetainedSet,
    snapshot: Arc<ArcSwap<RetainedSet>>,
    /// Every change is written here as it is applied (`$SYS` values are regenerated instead).
    store: Arc<crate::storage::state::StateStore>,
}

static VERSION: AtomicU64 = AtomicU64::new(1);

impl Actor for RetainedActor {
    type Msg = RetainedMessage;
    type State = RetainedState;
    type Arguments = (Arc<ArcSwap<RetainedSet>>, Arc<crate::storage::state::StateStore>);

    async fn pre_start(&self, me: ActorRef<Self::Msg>, (snapshot, store): Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        me.send_interval(Duration::from_secs(30), || RetainedMessage::Sweep);
        let set = RetainedSet::clone(&snapshot.load());
        Ok(RetainedState { set, snapshot, store })
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            RetainedMessage::Set(msgs, reply) => {
                for m in msgs {
                    // `$SYS` statistics are regenerated at start, so they do not make the set dirty.
                    let durable = !m.topic.starts_with("$SYS");
                    if durable {
                        st.store.put_retained(&m);
                    }
                    st.set.apply(m);
                    if durable {
                        st.set.version = VERSION.fetch_add(1, Ordering::Relaxed);
                    }
                }
                st.snapshot.store(Arc::new(st.set.clone()));
                let _ = reply.send(());
            }
            RetainedMessage::Sweep => {
                let gone = st.set.sweep(now_ms());
                for t in &gone {
                    st.store.remove_retained(t);
                }
                if !gone.is_empty() {
                    st.set.version = VERSION.fetch_add(1, Ordering::Relaxed);
                    st.snapshot.store(Arc::new(st.set.clone()));
                }
            }
            RetainedMessage::Count(reply) => {
                let _ = reply.send(st.set.len());
            }
        }
        Ok(())
    }
}

impl ractor::Message for RetainedMessage {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::mqtt::{topic, QoS};
    use proptest::prelude::*;

    fn msg(t: &str, payload: &'static str) -> Arc<Message> {
        Arc::new(Message {
            id: crate::message::next_id(),
            topic: Arc::from(t),
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtMostOnce,
            retain: true,
            props: None,
            expires_at: None,
            publisher: None,
            not_to_own_device: false,
        })
    }

    /// A leaf holds no map, emptied branches are pruned back to no map, and a snapshot taken
    /// before a change keeps what it saw (children are copied on write).
    #[test]
    fn leaves_hold_no_map_and_snapshots_keep_their_view() {
        let mut set = RetainedSet::default();
        set.apply(msg("devices/status/d1", "online"));
        set.apply(msg("devices/status/d2", "online"));
        let leaf = set.root.child("devices").and_then(|n| n.child("status")).and_then(|n| n.child("d1")).unwrap();
        assert!(leaf.children.is_none() && leaf.msg.is_some());
        let before = set.clone();
        set.apply(msg("devices/status/d1", ""));
        set.apply(msg("devices/status/d2", ""));
        assert!(set.root.children.is_none(), "every branch pruned");
        assert_eq!(before.get("devices/status/d1").map(|m| m.payload.clone()), Some(bytes::Bytes::from_static(b"online")));
        assert_eq!((set.len(), before.len()), (0, 2));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![Just("a".to_string()), Just("b".to_string()), Just("".to_string()), Just("$s".to_string()), "[ab]{1,2}"]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]
        /// The trie answers exactly what a linear scan with the topic matcher answers.
        #[test]
        fn trie_agrees_with_scan(
            topics in proptest::collection::vec(proptest::collection::vec(level(), 1..4).prop_map(|v| v.join("/")), 0..20),
            deletes in proptest::collection::vec(any::<prop::sample::Index>(), 0..5),
            filter in proptest::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_string())], 1..4)
                .prop_flat_map(|v| (Just(v), any::<bool>()))
                .prop_map(|(mut v, hash)| { if hash { v.push("#".into()); } v.join("/") })
                .prop_filter("valid", |f| topic::valid_filter(f)),
        ) {
            let mut set = RetainedSet::default();
            let mut reference = std::collections::BTreeMap::new();
            for t in &topics {
                set.apply(msg(t, "x"));
                reference.insert(t.clone(), ());
            }
            for d in deletes {
                if topics.is_empty() { break; }
                let t = &topics[d.index(topics.len())];
                set.apply(msg(t, ""));
                reference.remove(t);
            }
            prop_assert_eq!(set.len(), reference.len());
            let mut got: Vec<String> = set.matching(&filter).iter().map(|m| m.topic.to_string()).collect();
            got.sort();
            let want: Vec<String> = reference.keys().filter(|t| topic::matches(&filter, t)).cloned().collect();
            prop_assert_eq!(got, want);
        }
    }
}
