//! Session registry: maps client ids to session actors and serialises connects for the same
//! client id (takeover, Clean Start). It supervises the session actors.
use crate::actors::inspect::glob;
use crate::actors::inspect::Tell;
use crate::actors::session::display_client;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use super::load::Load;
use super::session::{AttachArgs, SessionActor, SessionArgs, SessionMessage};
use crate::broker::Broker;
use crate::storage::state::SessionSnapshot;

pub struct RegistryActor;

/// What the cluster's registrar said about a connecting client.
pub struct Takeover {
    pub gen: u64,
    /// The node the session comes from; it buffers deliveries until released.
    pub from: Option<String>,
    pub state: Option<Box<SessionSnapshot>>,
}

/// A session as `RegistryMessage::List` tells it: key, actor, and whether it is connected.
pub type Listed = (Arc<str>, ActorRef<SessionMessage>, bool);

pub enum RegistryMessage {
    /// Attach a new connection to the client's session (creating or replacing it).
    Connect {
        client_id: Arc<str>,
        clean_start: bool,
        attach: Box<AttachArgs>,
        takeover: Option<Takeover>,
        /// Answered by the session once the connection is attached (Session Present); the
        /// registry only hands the attach on, in order, and does not wait for it.
        attached: RpcReplyPort<bool>,
        reply: RpcReplyPort<Result<ActorRef<SessionMessage>, String>>,
    },
    /// Another node takes the client over: close it here and give up its state (`None`: no
    /// session here, or Clean Start). The session keeps collecting deliveries until `Release`.
    HandOver {
        client: Arc<str>,
        gen: u64,
        to: String,
        clean: bool,
        reply: RpcReplyPort<Option<Box<SessionSnapshot>>>,
    },
    /// A session asked to hand itself over answered: its state left (`stays: false`), or it
    /// stays here because the asking side gave up waiting (see `SessionMessage::HandOver`).
    Answered {
        client: Arc<str>,
        id: ActorId,
        /// The generation of the hand-over it answered.
        gen: u64,
        stays: bool,
    },
    /// The new owner's routes are in place: the moving session flushes and ends.
    Release {
        client: Arc<str>,
        gen: u64,
    },
    /// Deliveries the previous owner collected during a hand-over.
    Flush {
        client: Arc<str>,
        gen: u64,
        deliveries: Vec<crate::message::Delivery>,
    },
    /// Client ids and ownership generations of the sessions on this node.
    Owned(RpcReplyPort<Vec<(Arc<str>, u64)>>),
    /// Bring a session of a lost node (named) to life here from its replica.
    Adopt(Box<SessionSnapshot>, Arc<str>),
    /// Another node owns this client's session: end the copy here (no will: it is not the
    /// client's end) — unless its client is connected here (a healed partition, where the other
    /// side adopted a copy): then this node claims it back and merges the other copy in.
    Discard(Arc<str>),
    /// The other copy of a connected session, claimed back (see `Discard`).
    Merge {
        client: Arc<str>,
        claimed: crate::cluster::Claimed,
    },
    /// A device was deleted: end every session of its client-id namespace here (no will), so a
    /// new device given the same number starts clean.
    DiscardDevice(Arc<str>),
    /// Make room for the session `client` of a principal's namespace (`…\0id` keys) within
    /// `cap`: true when it exists, fits, or fits after ending the namespace's
    /// longest-disconnected session; false when every session there is connected.
    Room {
        client: Arc<str>,
        cap: usize,
        reply: RpcReplyPort<bool>,
    },
    SessionEnded {
        client_id: Arc<str>,
        id: ActorId,
    },
    /// Recreate the persistent sessions the store holds.
    Restore,
    /// Have every session write its persistent state to the store (used at shutdown).
    PersistAll(RpcReplyPort<()>),
    /// The cluster's members changed (this one went down, if any): persistent sessions check
    /// where their replica belongs.
    PeersChanged(Option<Arc<str>>),
    /// How many sessions handed to other nodes have not flushed yet (a stopping node waits).
    Moving(RpcReplyPort<usize>),
    Count(RpcReplyPort<usize>),
    /// Sessions whose client id (or session key) matches the glob pattern (`*`, `?`).
    List(Option<String>, RpcReplyPort<Vec<Listed>>),
}

/// The node's sessions by client key, indexed so no CONNECT or session end scans them all:
/// by actor id (a stopped actor's entry) and by principal (a device's sessions, for its cap).
#[derive(Default)]
struct Sessions {
    /// Each session with its load gauge (whose `online` says whether it is connected).
    map: HashMap<Arc<str>, (ActorRef<SessionMessage>, Arc<Load>)>,
    ids: HashMap<ractor::ActorId, Arc<str>>,
    /// Keys of each principal's namespace (`{device_number}\0`; client ids without one are not
    /// indexed). A list, not a set: a principal has one session or a few (at most
    /// `max_sessions_per_principal`), and a set's smallest table took ~100 bytes per device.
    principals: HashMap<Arc<str>, Vec<Arc<str>>>,
}

/// Whether a session has a live connection (its load gauge's flag, set by the session).
fn connected(l: &Load) -> bool {
    l.online.load(std::sync::atomic::Ordering::Relaxed)
}

/// The principal namespace of a session key (up to and including its NUL), if any.
fn namespace(key: &str) -> Option<&str> {
    key.find('\u{0}').map(|cut| &key[..=cut])
}

impl Sessions {
    fn insert(&mut self, key: Arc<str>, s: ActorRef<SessionMessage>, load: Arc<Load>) {
        if let Some((old, _)) = self.map.insert(key.clone(), (s.clone(), load)) {
            self.ids.remove(&old.get_id());
        }
        self.ids.insert(s.get_id(), key.clone());
        if let Some(ns) = namespace(&key) {
            let keys = self.principals.entry(Arc::from(ns)).or_insert_with(|| Vec::with_capacity(1));
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<ActorRef<SessionMessage>> {
        self.take(key).map(|(s, _)| s)
    }

    /// `remove`, with the session's load gauge.
    fn take(&mut self, key: &str) -> Option<(ActorRef<SessionMessage>, Arc<Load>)> {
        let (s, load) = self.map.remove(key)?;
        self.ids.remove(&s.get_id());
        if let Some(ns) = namespace(key) {
            if let Some(set) = self.principals.get_mut(ns) {
                set.retain(|k| **k != *key);
                if set.is_empty() {
                    self.principals.remove(ns);
                }
            }
        }
        Some((s, load))
    }

    /// The entry of a stopped actor, if it is still the one under its key.
    fn remove_actor(&mut self, id: ractor::ActorId) {
        if let Some(key) = self.ids.get(&id).cloned() {
            if self.map.get(&key).is_some_and(|(s, _)| s.get_id() == id) {
                self.remove(&key);
            } else {
                self.ids.remove(&id);
            }
        }
    }

    fn get(&self, key: &str) -> Option<&ActorRef<SessionMessage>> {
        self.map.get(key).map(|(s, _)| s)
    }

    /// Sessions whose key or client id matches the glob `pattern` (all without one).
    fn list(&self, pattern: Option<&str>) -> Vec<Listed> {
        let hit = |k: &str| pattern.is_none_or(|p| glob(p, k) || glob(p, display_client(k).1));
        self.map.iter().filter(|(k, _)| hit(k)).map(|(k, (s, l))| (k.clone(), s.clone(), connected(l))).collect()
    }

    fn online(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|(_, l)| connected(l))
    }

    fn contains_key(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// The keys of a principal's namespace (`{device_number}\0`).
    fn of_principal(&self, ns: &str) -> Vec<Arc<str>> {
        self.principals.get(ns).cloned().unwrap_or_default()
    }
}

pub struct RegistryState {
    broker: Arc<Broker>,
    sessions: Sessions,
    /// Sessions asked to hand themselves over to another node, until they have flushed (or
    /// they stay: see `Moving`).
    moving: HashMap<Arc<str>, Moving>,
    /// Cluster ownership generation of each session (0: restored from disk or standalone).
    gens: HashMap<Arc<str>, u64>,
}

/// A session asked to hand itself over: what it needs to come back under its key if it stays.
struct Moving {
    s: ActorRef<SessionMessage>,
    load: Arc<Load>,
    gen: Option<u64>,
    /// The generation of the latest hand-over it was asked for.
    asked: u64,
    /// Its state has left: it only flushes what it collects, then ends.
    moved: bool,
}

const CALL: Option<Duration> = Some(Duration::from_secs(10));

/// Wait (bounded) until no actor holds `name`. Polls: ractor's `wait()` misses an exit that
/// happened before the waiter registered, and this is only the rare replace path.
async fn name_free(name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while ractor::registry::where_is(name.to_string()).is_some() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl RegistryState {
    async fn spawn(
        &mut self,
        me: &ActorRef<RegistryMessage>,
        client_id: Arc<str>,
        restored: Option<SessionSnapshot>,
        (held, adopted_from): (Option<(u64, String)>, Option<Arc<str>>),
        queue: Option<crate::storage::state::QueueInfo>,
    ) -> Result<ActorRef<SessionMessage>, String> {
        let load = Arc::new(Load::default());
        let args = SessionArgs {
            client_id: client_id.clone(),
            broker: self.broker.clone(),
            restored,
            queue,
            held,
            adopted_from,
            load: load.clone(),
        };
        let name = format!("session:{client_id}");
        // A session handed to another node finishes its flush first (bounded). One still
        // answering the hand-over may stay here with its state: never replaced (the client
        // is refused and retries).
        if let Some(m) = self.moving.get(&client_id) {
            let (id, moved) = (m.s.get_id(), m.moved);
            name_free(&name).await;
            if !moved && ractor::registry::where_is(name.clone()).is_some_and(|a| a.get_id() == id) {
                return Err("the previous session is still handing itself over".into());
            }
        }
        // A session that is ending (Clean Start replaced it, or its registry crashed) may hold
        // the name for a moment.
        if let Some(old) = ractor::registry::where_is(name.clone()) {
            old.stop(Some("replaced".into()));
            name_free(&name).await;
        }
        let (s, _) = Actor::spawn_linked(Some(name), super::inspect::Instrumented(SessionActor, "session"), args, me.get_cell())
            .await
            .map_err(|e| e.to_string())?;
        self.sessions.insert(client_id, s.clone(), load);
        Ok(s)
    }
}

impl RegistryState {
    /// A CONNECT: attach to the session here (resumed unless Clean Start or state came from
    /// another node, which replaces whatever stale copy this node has), or a new one.
    async fn connect(
        &mut self,
        me: &ActorRef<RegistryMessage>,
        client_id: Arc<str>,
        clean_start: bool,
        mut attach: Box<AttachArgs>,
        takeover: Option<Takeover>,
        attached: RpcReplyPort<bool>,
    ) -> Result<ActorRef<SessionMessage>, String> {
        let remote = takeover.as_ref().is_some_and(|t| t.from.is_some() || t.state.is_some());
        if let Some(t) = &takeover {
            self.gens.insert(client_id.clone(), t.gen);
        }
        // The attach goes to the session's mailbox in the order connects came here (the
        // newest connection wins); the caller waits for it, not this actor: a restored
        // session announces its routes to the cluster first, a round trip per session.
        let attach_to = |s: &ActorRef<SessionMessage>, attach| {
            s.send_message(SessionMessage::Attach(attach, attached)).map_err(|_| "session did not answer".to_string())
        };
        if let Some(s) = self.sessions.get(&client_id).cloned() {
            if !clean_start && !remote {
                return attach_to(&s, attach).map(|_| s);
            }
            let _ = s.ask(SessionMessage::Terminate, CALL).await;
            self.sessions.remove(&client_id);
        }
        let (restored, held) = match takeover {
            Some(t) if remote && !clean_start => (t.state.map(|b| *b), t.from.map(|f| (t.gen, f))),
            _ => (None, None),
        };
        // A fresh session is never "present"; one handed over from another node is.
        attach.clean_start = restored.is_none();
        let s = self.spawn(me, client_id, restored, (held, None), None).await?;
        attach_to(&s, attach).map(|_| s)
    }

    /// Adopt a replica whose owner is gone (a live session here wins over it).
    async fn adopt(&mut self, me: &ActorRef<RegistryMessage>, snap: SessionSnapshot, from: Arc<str>) {
        let id: Arc<str> = Arc::from(snap.client_id.as_str());
        if self.sessions.contains_key(&id) {
            return;
        }
        match self.spawn(me, id.clone(), Some(snap), (None, Some(from)), None).await {
            // An adoption outranks every generation handed out so far (registrars count
            // up from 1) and copies restored from disk (0): a node that comes back, or a
            // registrar that has not yet seen the loss, yields to it. Later claims count
            // up from here.
            Ok(_) => {
                self.gens.insert(id, (1u64 << 40) + crate::message::now_ms());
            }
            Err(e) => tracing::error!(client_id = %id, error = %e, "cannot adopt session"),
        }
    }

    /// The persistent sessions the node's store kept, each started again.
    async fn restore(&mut self, me: &ActorRef<RegistryMessage>) {
        // What the store held at start; after a restart of this registry, read again.
        let mut restored = self.broker.restored.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        if restored.is_empty() {
            restored = match self.broker.state.sessions(self.broker.config.mqtt.max_queued) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read persistent sessions");
                    Vec::new()
                }
            };
        }
        if !restored.is_empty() {
            tracing::info!(sessions = restored.len(), "restoring persistent sessions");
        }
        for r in restored {
            let id: Arc<str> = Arc::from(r.snap.client_id.as_str());
            if self.sessions.contains_key(&id) {
                continue;
            }
            if let Err(e) = self.spawn(me, id.clone(), Some(r.snap), (None, None), Some(r.queue)).await {
                tracing::error!(client_id = %id, error = %e, "cannot restore session");
            }
        }
    }

    /// Another node takes `client` over: its session answers with its state (none when Clean
    /// Start ends it) and stays, moving, until it has flushed to the new owner (or ended).
    fn hand_over(&mut self, client: Arc<str>, gen: u64, to: String, clean: bool, reply: RpcReplyPort<Option<Box<SessionSnapshot>>>) {
        // To this very node (the registrar sent the claim to the adopter of a lost node's
        // session, and the client reconnected here): nothing moves; the connect resumes the
        // session here. (Moving it made the new session wait for its own flush, up to
        // `name_free`'s bound, with this actor — every connect of the node — blocked.)
        if to == self.broker.config.node.name && !clean && self.sessions.contains_key(&client) {
            let _ = reply.send(None);
            return;
        }
        // Asked again while it answers an earlier hand-over: it answers this one next (with
        // nothing if it has moved by then).
        if let Some(m) = self.moving.get_mut(&client) {
            m.asked = gen;
            if let Err(e) = m.s.send_message(SessionMessage::HandOver { gen, to, clean, reply }) {
                tracing::debug!(client_id = %client, error = %e, "moving session gone");
            }
            return;
        }
        let Some((s, load)) = self.sessions.take(&client) else {
            let _ = reply.send(None);
            return;
        };
        let was = self.gens.remove(&client);
        if s.send_message(SessionMessage::HandOver { gen, to, clean, reply }).is_ok() {
            self.moving.insert(client, Moving { s, load, gen: was, asked: gen, moved: false });
        }
    }

    /// A session asked to hand itself over answered: moved, or it stays (the asker gave up
    /// waiting) and is this node's again, under its key and generation.
    fn answered(&mut self, client: Arc<str>, id: ActorId, gen: u64, stays: bool) {
        let Some(m) = self.moving.get_mut(&client).filter(|m| m.s.get_id() == id) else { return };
        if !stays {
            m.moved = true;
        }
        // Asked again meanwhile: the later answer decides.
        if !stays || m.asked != gen {
            return;
        }
        let Some(m) = self.moving.remove(&client) else { return };
        // `spawn` refuses a new session while this one may stay, so the key is free.
        if let Some(other) = self.sessions.get(&client) {
            tracing::error!(client_id = %client, other = %other.get_id(), "a session that stayed found its key taken; it keeps running unlisted until it expires");
            return;
        }
        self.sessions.insert(client.clone(), m.s, m.load);
        if let Some(g) = m.gen {
            self.gens.insert(client, g);
        }
    }

    /// Every session writes its persistent state, all at once; this actor stays free for the
    /// hand-overs of clients that reconnect elsewhere meanwhile (a stopping node).
    fn persist_all(&self, reply: RpcReplyPort<()>) {
        let waits: Vec<_> = self
            .sessions
            .map
            .values()
            .filter_map(|(s, _)| {
                let (tx, rx) = ractor::concurrency::oneshot();
                s.send_message(SessionMessage::Persist(Some(tx.into()))).ok().map(|_| rx)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
        tokio::spawn(async move {
            for w in waits {
                let _ = tokio::time::timeout_at(deadline, w).await;
            }
            let _ = reply.send(());
        });
    }

    async fn room(&mut self, client: &Arc<str>, cap: usize) -> bool {
        let Some(prefix) = namespace(client) else { return true };
        if cap == 0 || self.sessions.contains_key(client) {
            return true;
        }
        let keys = self.sessions.of_principal(prefix);
        if keys.len() < cap {
            return true;
        }
        let same: Vec<(Arc<str>, ActorRef<SessionMessage>)> =
            keys.iter().filter_map(|k| self.sessions.get(k).map(|s| (k.clone(), s.clone()))).collect();
        // Only sessions without a connection can make way: the connected ones are not asked.
        let offline: Vec<&(Arc<str>, ActorRef<SessionMessage>)> = same.iter().filter(|(k, _)| !self.sessions.online(k)).collect();
        // The namespace is full: the session its principal left longest ago makes way.
        let mut idle: Option<(u64, Arc<str>)> = None;
        for (k, s) in offline {
            if let Ok(ractor::rpc::CallResult::Success(i)) = s.ask(SessionMessage::Info, CALL).await {
                if let (false, Some(at)) = (i.connected, i.disconnected_at_ms) {
                    if idle.as_ref().is_none_or(|(t, _)| at < *t) {
                        idle = Some((at, k.clone()));
                    }
                }
            }
        }
        let Some((_, k)) = idle else { return false };
        let Some(s) = self.sessions.remove(&k) else { return false };
        tracing::info!(client_id = %k, cap, "session limit of its principal reached: ending its longest-disconnected session");
        let gen = self.gens.remove(&k).unwrap_or(0);
        let _ = s.ask(SessionMessage::Discard, CALL).await;
        if let Some(c) = self.broker.cluster.get() {
            c.disowned(k, gen);
        }
        same.len() - 1 < cap
    }
}

impl Actor for RegistryActor {
    type Msg = RegistryMessage;
    type State = RegistryState;
    type Arguments = Arc<Broker>;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, broker: Arc<Broker>) -> Result<Self::State, ActorProcessingErr> {
        // Persistent sessions come back from the store: at node start (loaded from disk) and
        // after a crash of this actor (which takes its child sessions with it). This is the
        // first message in the mailbox: nobody has this actor's reference yet.
        me.tell(RegistryMessage::Restore)?;
        Ok(RegistryState { broker, sessions: Sessions::default(), moving: HashMap::new(), gens: HashMap::new() })
    }

    async fn handle(&self, me: ActorRef<Self::Msg>, msg: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match msg {
            RegistryMessage::Connect { client_id, clean_start, attach, takeover, attached, reply } => {
                let _ = reply.send(st.connect(&me, client_id, clean_start, attach, takeover, attached).await);
            }
            RegistryMessage::SessionEnded { client_id, id } => {
                if st.sessions.get(&client_id).is_some_and(|s| s.get_id() == id) {
                    st.sessions.remove(&client_id);
                    let gen = st.gens.remove(&client_id).unwrap_or(0);
                    if let Some(c) = st.broker.cluster.get() {
                        c.disowned(client_id.clone(), gen);
                    }
                }
                if st.moving.get(&client_id).is_some_and(|m| m.s.get_id() == id) {
                    st.moving.remove(&client_id);
                }
            }
            RegistryMessage::HandOver { client, gen, to, clean, reply } => st.hand_over(client, gen, to, clean, reply),
            RegistryMessage::Answered { client, id, gen, stays } => st.answered(client, id, gen, stays),
            RegistryMessage::Release { client, gen } => {
                if let Some(m) = st.moving.get(&client) {
                    let _ = m.s.tell(SessionMessage::Release(gen));
                }
            }
            RegistryMessage::Flush { client, gen, deliveries } => {
                if let Some(s) = st.sessions.get(&client) {
                    let _ = s.tell(SessionMessage::HandOverFlush { gen, deliveries });
                }
            }
            RegistryMessage::Adopt(snap, from) => st.adopt(&me, *snap, from).await,
            RegistryMessage::Discard(client) => {
                let connected = match st.sessions.get(&client) {
                    Some(s) => matches!(s.ask(SessionMessage::Info, CALL).await, Ok(ractor::rpc::CallResult::Success(i)) if i.connected),
                    None => false,
                };
                if connected {
                    tracing::info!(client_id = %client, "another node holds a copy of a connected session; claiming it back to merge");
                    let (broker, me) = (st.broker.clone(), me.clone());
                    tokio::spawn(async move {
                        if let Some(c) = broker.cluster.get() {
                            let claimed = Box::pin(c.claim(client.clone(), false)).await;
                            let _ = me.tell(RegistryMessage::Merge { client, claimed });
                        }
                    });
                } else if let Some(s) = st.sessions.remove(&client) {
                    tracing::info!(client_id = %client, "session is owned by another node; dropping the copy here");
                    st.gens.remove(&client);
                    let _ = s.ask(SessionMessage::Discard, CALL).await;
                }
            }
            RegistryMessage::Merge { client, claimed } => {
                let s = st.sessions.get(&client).cloned();
                let Some(c) = st.broker.cluster.get() else { return Ok(()) };
                if claimed.gen == 0 || claimed.refused {
                    return Ok(()); // the registrar did not answer or refused: nothing was claimed
                }
                st.gens.insert(client.clone(), claimed.gen);
                if let Some(s) = &s {
                    let (gen, from) = (claimed.gen, claimed.from.clone());
                    let _ = s.tell(SessionMessage::Merge { gen, from: from.clone(), state: claimed.state });
                    match from {
                        Some(node) => c.release(client, gen, node),
                        None => c.claim_done(client, gen),
                    }
                } else {
                    c.claim_done(client, claimed.gen);
                }
            }
            RegistryMessage::DiscardDevice(number) => {
                let prefix = format!("{number}\u{0}");
                let ended = st.sessions.of_principal(&prefix);
                for client in ended {
                    if let Some(s) = st.sessions.remove(&client) {
                        st.gens.remove(&client);
                        let _ = s.ask(SessionMessage::Discard, CALL).await;
                    }
                }
            }
            RegistryMessage::Room { client, cap, reply } => {
                let _ = reply.send(st.room(&client, cap).await);
            }
            RegistryMessage::Owned(reply) => {
                let _ = reply.send(st.sessions.map.keys().map(|c| (c.clone(), st.gens.get(c).copied().unwrap_or(0))).collect());
            }
            RegistryMessage::Restore => st.restore(&me).await,
            RegistryMessage::PersistAll(reply) => st.persist_all(reply),
            RegistryMessage::PeersChanged(gone) => {
                let persistent = st.sessions.map.values().filter(|(_, l)| l.persistent.load(std::sync::atomic::Ordering::Relaxed));
                for (s, _) in persistent {
                    let _ = s.send_message(SessionMessage::PeersChanged(gone.clone()));
                }
            }
            RegistryMessage::Moving(reply) => {
                let _ = reply.send(st.moving.len());
            }
            RegistryMessage::Count(reply) => {
                let _ = reply.send(st.sessions.map.len());
            }
            RegistryMessage::List(pattern, reply) => {
                let _ = reply.send(st.sessions.list(pattern.as_deref()));
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
        let (who, why) = match evt {
            SupervisionEvent::ActorFailed(who, err) => (who, Some(err.to_string())),
            SupervisionEvent::ActorTerminated(who, _, reason) => (who, reason.filter(|r| r == "killed")),
            _ => return Ok(()),
        };
        if let Some(why) = why {
            // A session that crashed loses its in-memory state; its last persisted snapshot remains
            // on disk, and its client's connection closes (it notices the session is gone).
            tracing::error!(actor = %who.get_name().unwrap_or_default(), error = %why, "session actor crashed");
        }
        st.sessions.remove_actor(who.get_id());
        if !st.moving.is_empty() {
            st.moving.retain(|_, m| m.s.get_id() != who.get_id());
        }
        Ok(())
    }
}

impl ractor::Message for RegistryMessage {}
