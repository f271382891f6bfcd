//! The actor inspector's instrumentation. ractor keeps no per-actor statistics, so every actor
//! of the node runs wrapped in [`Instrumented`], which registers it in a node-wide table and
//! times each message it handles; senders that use [`Tell`] count what they enqueue, so
//! *mailbox depth* = enqueued − handled. Cost per message: two clock reads and three relaxed
//! atomic adds on the receiver, one read-locked hash lookup and one atomic add on the sender
//! (measured by `loadtest --scenario inspect`, which runs with `node.actor_stats` on and off).
//!
//! Messages not sent through [`Tell`] (ractor timers, frames from other nodes) are handled
//! without having been counted; the handler raises `enqueued` to `handled` so the depth never
//! goes negative — it can only under-report while such messages wait.
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorStatus, Message, MessagingErr, RpcReplyPort, SupervisionEvent};
use serde::Serialize;

/// Whether message timing and send counting run (`node.actor_stats`); actors are registered
/// (for `actors list/tree`) either way.
static ENABLED: AtomicBool = AtomicBool::new(true);
const SHARDS: usize = 32;
/// Live actors by pid, in shards (senders read-lock one shard per counted send).
type Shard = RwLock<HashMap<u64, Arc<Entry>>>;
static TABLE: LazyLock<Vec<Shard>> = LazyLock::new(|| (0..SHARDS).map(|_| RwLock::default()).collect());
/// Restarts by actor name (a supervisor or owner recreated it after a crash).
static RESTARTS: LazyLock<Mutex<HashMap<String, u32>>> = LazyLock::new(Default::default);

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// One running actor's counters.
pub struct Entry {
    cell: ActorCell,
    kind: &'static str,
    started: Instant,
    started_ms: u64,
    enqueued: AtomicU64,
    handled: AtomicU64,
    busy_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Entry {
    /// A message handled since `t` (None: statistics are off).
    fn record(&self, t: Option<Instant>) {
        let Some(t) = t else { return };
        let ns = t.elapsed().as_nanos() as u64;
        let h = self.handled.fetch_add(1, Relaxed) + 1;
        self.busy_ns.fetch_add(ns, Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
        self.enqueued.fetch_max(h, Relaxed);
    }
}

fn shard(pid: u64) -> &'static Shard {
    &TABLE[(pid as usize) % SHARDS]
}

fn register(cell: ActorCell, kind: &'static str) -> Arc<Entry> {
    let e = Arc::new(Entry {
        cell: cell.clone(),
        kind,
        started: Instant::now(),
        started_ms: crate::message::now_ms(),
        enqueued: AtomicU64::new(0),
        handled: AtomicU64::new(0),
        busy_ns: AtomicU64::new(0),
        max_ns: AtomicU64::new(0),
    });
    let pid = cell.get_id().pid();
    if let Ok(mut t) = shard(pid).write() {
        t.insert(pid, e.clone());
    }
    e
}

fn deregister(id: ActorId) {
    let pid = id.pid();
    if let Ok(mut t) = shard(pid).write() {
        t.remove(&pid);
    }
}

/// A message was enqueued for the actor `id` (no-op for actors of other nodes).
pub fn sent(id: ActorId) {
    if !enabled() || !id.is_local() {
        return;
    }
    if let Ok(t) = shard(id.pid()).read() {
        if let Some(e) = t.get(&id.pid()) {
            e.enqueued.fetch_add(1, Relaxed);
        }
    }
}

/// An actor named `name` was started again after it crashed.
pub fn restarted(name: &str) {
    if let Ok(mut r) = RESTARTS.lock() {
        *r.entry(name.to_string()).or_default() += 1;
    }
}

/// Counted sends: use these instead of `cast`/`call` so the receiver's mailbox depth is known.
pub trait Tell<M: Message> {
    fn tell(&self, m: M) -> Result<(), MessagingErr<M>>;
    fn ask<R, F>(&self, f: F, timeout: Option<Duration>) -> impl Future<Output = Result<CallResult<R>, MessagingErr<M>>> + Send
    where
        R: Send + 'static,
        F: FnOnce(RpcReplyPort<R>) -> M + Send;
}

impl<M: Message> Tell<M> for ActorRef<M> {
    fn tell(&self, m: M) -> Result<(), MessagingErr<M>> {
        sent(self.get_id());
        self.cast(m)
    }
    fn ask<R, F>(&self, f: F, timeout: Option<Duration>) -> impl Future<Output = Result<CallResult<R>, MessagingErr<M>>> + Send
    where
        R: Send + 'static,
        F: FnOnce(RpcReplyPort<R>) -> M + Send,
    {
        sent(self.get_id());
        self.call(f, timeout)
    }
}

/// An actor wrapped for the inspector: `Actor::spawn(name, Instrumented(MyActor, "kind"), args)`.
pub struct Instrumented<A>(pub A, pub &'static str);

pub struct Tracked<S> {
    entry: Arc<Entry>,
    pub inner: S,
}

impl<A: Actor> Actor for Instrumented<A> {
    type Msg = A::Msg;
    type State = Tracked<A::State>;
    type Arguments = A::Arguments;

    async fn pre_start(&self, me: ActorRef<Self::Msg>, args: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let entry = register(me.get_cell(), self.1);
        match self.0.pre_start(me.clone(), args).await {
            Ok(inner) => Ok(Tracked { entry, inner }),
            Err(e) => {
                deregister(me.get_id());
                Err(e)
            }
        }
    }

    async fn post_start(&self, me: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        self.0.post_start(me, &mut st.inner).await
    }

    async fn post_stop(&self, me: ActorRef<Self::Msg>, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let r = self.0.post_stop(me.clone(), &mut st.inner).await;
        deregister(me.get_id());
        r
    }

    async fn handle(&self, me: ActorRef<Self::Msg>, m: Self::Msg, st: &mut Self::State) -> Result<(), ActorProcessingErr> {
        let t = enabled().then(Instant::now);
        let r = self.0.handle(me, m, &mut st.inner).await;
        st.entry.record(t);
        r
    }

    async fn handle_serialized(
        &self,
        me: ActorRef<Self::Msg>,
        m: ractor::message::SerializedMessage,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let t = enabled().then(Instant::now);
        let r = self.0.handle_serialized(me, m, &mut st.inner).await;
        st.entry.record(t);
        r
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<Self::Msg>,
        e: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let t = enabled().then(Instant::now);
        let r = self.0.handle_supervisor_evt(me, e, &mut st.inner).await;
        st.entry.record(t);
        r
    }
}

/// What the inspector shows of one actor.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ActorInfo {
    /// `kind:id` (the registered name), or `kind@pid` for unnamed actors.
    pub name: String,
    pub kind: String,
    pub node: String,
    pub pid: u64,
    pub status: String,
    /// Messages waiting in the mailbox.
    pub mailbox: u64,
    pub handled: u64,
    pub mean_us: f64,
    pub max_us: f64,
    pub restarts: u32,
    pub age_secs: f64,
    pub started_ms: u64,
    /// The supervising actor's name (none for a root).
    pub parent: Option<String>,
    pub children: usize,
}

fn name_of(cell: &ActorCell, kind: &str) -> String {
    cell.get_name().unwrap_or_else(|| format!("{kind}@{}", cell.get_id().pid()))
}

/// An actor's name as operators read and type it: the session of a device (or of a service
/// account, `@user`) is `session:{device}/{client id}`. Its registered name separates the two
/// with U+0000 (which no client id can contain, and no terminal can type).
pub fn shown_name(name: &str) -> String {
    name.replacen('\0', "/", 1)
}

/// The registered name of an actor named as [`shown_name`] shows it.
fn registered(name: &str) -> Option<ActorCell> {
    ractor::registry::where_is(name.to_string()).or_else(|| {
        let (device, client) = name.strip_prefix("session:")?.split_once('/')?;
        ractor::registry::where_is(format!("session:{device}\0{client}"))
    })
}

fn info(e: &Entry, node: &str, restarts: &HashMap<String, u32>) -> ActorInfo {
    let handled = e.handled.load(Relaxed);
    let raw = name_of(&e.cell, e.kind);
    let name = shown_name(&raw);
    ActorInfo {
        kind: e.kind.to_string(),
        node: node.to_string(),
        pid: e.cell.get_id().pid(),
        status: format!("{:?}", e.cell.get_status()).to_lowercase(),
        mailbox: e.enqueued.load(Relaxed).saturating_sub(handled),
        handled,
        mean_us: if handled == 0 { 0.0 } else { e.busy_ns.load(Relaxed) as f64 / handled as f64 / 1e3 },
        max_us: e.max_ns.load(Relaxed) as f64 / 1e3,
        restarts: restarts.get(&raw).copied().unwrap_or(0),
        age_secs: e.started.elapsed().as_secs_f64(),
        started_ms: e.started_ms,
        parent: e.cell.try_get_supervisor().map(|p| p.get_name().unwrap_or_else(|| format!("actor@{}", p.get_id().pid()))),
        children: e.cell.get_children().len(),
        name,
    }
}

/// Every live actor of this node (stopped ones still in the table are pruned).
pub fn list(node: &str) -> Vec<ActorInfo> {
    let restarts = RESTARTS.lock().map(|r| r.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for s in TABLE.iter() {
        let mut dead = Vec::new();
        if let Ok(t) = s.read() {
            for (pid, e) in t.iter() {
                if e.cell.get_status() == ActorStatus::Stopped {
                    dead.push(*pid);
                } else {
                    out.push(info(e, node, &restarts));
                }
            }
        }
        if !dead.is_empty() {
            if let Ok(mut t) = s.write() {
                for pid in dead {
                    t.remove(&pid);
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// One actor by name (or `kind@pid`).
pub fn show(node: &str, name: &str) -> Option<ActorInfo> {
    if let Some(cell) = registered(name) {
        let pid = cell.get_id().pid();
        let e = shard(pid).read().ok()?.get(&pid).cloned()?;
        let restarts = RESTARTS.lock().map(|r| r.clone()).unwrap_or_default();
        return Some(info(&e, node, &restarts));
    }
    list(node).into_iter().find(|a| a.name == name)
}

/// A node of the supervision tree.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TreeNode {
    pub name: String,
    pub kind: String,
    pub children: Vec<TreeNode>,
}

/// The supervision tree(s) of this node: every instrumented actor without a supervisor is a
/// root; children come from ractor's links (uninstrumented ones show as kind `ractor`).
/// `max_children` bounds each level (the count of the rest is given as a placeholder node).
pub fn tree(max_children: usize) -> Vec<TreeNode> {
    let kinds: HashMap<u64, &'static str> =
        TABLE.iter().filter_map(|s| s.read().ok()).flat_map(|t| t.iter().map(|(p, e)| (*p, e.kind)).collect::<Vec<_>>()).collect();
    let roots: Vec<ActorCell> = TABLE
        .iter()
        .filter_map(|s| s.read().ok())
        .flat_map(|t| {
            t.values()
                .filter(|e| e.cell.try_get_supervisor().is_none() && e.cell.get_status() != ActorStatus::Stopped)
                .map(|e| e.cell.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    fn walk(c: &ActorCell, kinds: &HashMap<u64, &'static str>, max: usize, depth: usize) -> TreeNode {
        let kind = kinds.get(&c.get_id().pid()).copied().unwrap_or("ractor");
        let mut kids = c.get_children();
        kids.sort_by_key(|k| k.get_name());
        let total = kids.len();
        let mut children: Vec<TreeNode> =
            if depth > 16 { vec![] } else { kids.iter().take(max).map(|k| walk(k, kinds, max, depth + 1)).collect() };
        if total > children.len() {
            children.push(TreeNode { name: format!("… {} more", total - children.len()), kind: String::new(), children: vec![] });
        }
        TreeNode { name: shown_name(&name_of(c, kind)), kind: kind.to_string(), children }
    }
    let mut out: Vec<TreeNode> = roots.iter().map(|r| walk(r, &kinds, max_children, 0)).collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Per kind: live actors and messages waiting in their mailboxes (for `/metrics`), without
/// building every actor's full info.
pub fn counts() -> HashMap<&'static str, (u64, u64)> {
    let mut m: HashMap<&'static str, (u64, u64)> = HashMap::new();
    for s in TABLE.iter() {
        if let Ok(t) = s.read() {
            for e in t.values().filter(|e| e.cell.get_status() != ActorStatus::Stopped) {
                let c = m.entry(e.kind).or_default();
                c.0 += 1;
                c.1 += e.enqueued.load(Relaxed).saturating_sub(e.handled.load(Relaxed));
            }
        }
    }
    m
}

/// Live actors on this node.
pub fn total() -> u64 {
    counts().values().map(|c| c.0).sum()
}

/// Glob match with `*` (any run) and `?` (one character).
pub fn glob(p: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (p.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}
