//! The retained store: owns the node's retained messages and publishes an immutable snapshot
//! that SUBSCRIBE handling reads.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::message::{now_ms, Message};
use crate::protocols::mqtt::topic;

/// Immutable view of the retained messages, keyed by topic.
#[derive(Clone, Default)]
pub struct RetainedSet {
    pub map: imbl::OrdMap<Arc<str>, Arc<Message>>,
    /// Grows on every change; the persister writes when it moved.
    pub version: u64,
}

impl RetainedSet {
    /// Retained messages matching a (non-shared) filter, unexpired.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let now = now_ms();
        if !topic::has_wildcard(filter) {
            return self.map.get(filter).filter(|m| !m.expired(now)).cloned().into_iter().collect();
        }
        self.map.iter().filter(|(t, m)| topic::matches(filter, t) && !m.expired(now)).map(|(_, m)| m.clone()).collect()
    }
}

pub struct RetainedActor;

pub enum RetainedMessage {
    /// Set (or, with an empty payload, delete) the retained message of a topic.
    Set(Arc<Message>, RpcReplyPort<()>),
    /// Drop expired messages.
    Sweep,
    Count(RpcReplyPort<usize>),
}

pub struct RetainedState {
    set: RetainedSet,
    snapshot: Arc<ArcSwap<RetainedSet>>,
}

static VERSION: AtomicU64 = AtomicU64::new(1);

impl Actor for RetainedActor {
    type Msg = RetainedMessage;
    type State = RetainedState;
    type Arguments = Arc<ArcSwap<RetainedSet>>;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, snapshot: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        me.send_interval(Duration::from_secs(30), || RetainedMessage::Sweep);
        let set = RetainedSet::clone(&snapshot.load());
        Ok(RetainedState { set, snapshot })
    }

    async fn handle(&self, _me: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            RetainedMessage::Set(m, reply) => {
                if m.payload.is_empty() {
                    st.set.map.remove(&*m.topic);
                } else {
                    st.set.map.insert(m.topic.clone(), m);
                }
                st.set.version = VERSION.fetch_add(1, Ordering::Relaxed);
                st.snapshot.store(Arc::new(st.set.clone()));
                let _ = reply.send(());
            }
            RetainedMessage::Sweep => {
                let now = now_ms();
                let before = st.set.map.len();
                let expired: Vec<Arc<str>> = st.set.map.iter().filter(|(_, m)| m.expired(now)).map(|(k, _)| k.clone()).collect();
                for k in expired {
                    st.set.map.remove(&k);
                }
                if st.set.map.len() != before {
                    st.set.version = VERSION.fetch_add(1, Ordering::Relaxed);
                    st.snapshot.store(Arc::new(st.set.clone()));
                }
            }
            RetainedMessage::Count(reply) => {
                let _ = reply.send(st.set.map.len());
            }
        }
        Ok(())
    }
}
